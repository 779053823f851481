"""`lmschool serve`: the step-wise Decoder against `stream` (the single-prompt path), the official
`openai` client against a live server on tiny taught checkpoints (chat, streaming, completions,
errors), the same answer as `lmschool generate` with the same seed, 32 simultaneous streaming
clients, the queue bound (429), a client killed mid-stream, malformed bodies, a pipeline run's
stages, report and teacher scores, and the command itself in a child process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import httpx
import pytest
import torch

from lmschool.generate import Decoder, RowSampling, stream
from lmschool.model import ModelConfig, build_model
from procs import child_env
from serve_fixtures import TAUGHT, LiveServer, paused_after, pipeline_run, wait_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the Decoder: rows that join and leave equal the single-prompt path -------------------------

@pytest.fixture(scope="module")
def sharp():
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      tie_word_embeddings=False)
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():   # a sharper head: sampled tokens far from ties, as in test_generate
        model.lm_head.weight.mul_(10)
    return model


PROMPTS = [[5, 9, 2, 33, 7, 1, 14], [8, 3], [40, 41, 42, 43, 12], [17]]


def decode_alone(model, prompt, settings):
    decoder = Decoder(model)
    tokens = [t for _, t, _ in decoder.add(prompt, [settings])]
    while len(decoder):
        tokens += [t for _, t, _ in decoder.step()]
    return tokens


@pytest.mark.parametrize("settings", [RowSampling(20, temperature=0), RowSampling(20, temperature=1.0, seed=5),
                                      RowSampling(20, temperature=0.7, top_k=20, top_p=0.9, seed=9)])
def test_a_row_alone_is_exactly_the_single_prompt_path(sharp, settings):
    expected = list(stream(sharp, PROMPTS[0], 20, temperature=settings.temperature, top_k=settings.top_k,
                           top_p=settings.top_p, seed=settings.seed))
    assert decode_alone(sharp, PROMPTS[0], settings) == expected


def test_rows_joining_and_leaving_sample_what_each_would_alone(sharp):
    """Four prompts join at steps 0, 2, 4, 5 with their own seeds, lengths and stop ids; one is
    dropped half-way. Every other row's tokens equal `stream`'s for its settings, and the cache
    never holds more columns than the longest row needs."""
    settings = [RowSampling(15 + 3 * i, temperature=1.0, seed=100 + i, stop_ids=(7,) if i == 1 else ())
                for i in range(4)]
    decoder, got, owner = Decoder(sharp), {i: [] for i in range(4)}, {}

    def join(i):
        for key, token, _ in decoder.add(PROMPTS[i], [settings[i]]):
            owner[key] = i
            got[i].append(token)

    join(0)
    joins, step = {2: 1, 4: 2, 5: 3}, 0
    dropped_key = None
    while len(decoder) or step <= 5:
        if step in joins:
            join(joins[step])
        if step == 9:
            dropped_key = next(k for k, i in owner.items() if i == 3)
            decoder.drop(dropped_key)
        for key, token, _ in decoder.step():
            assert key != dropped_key, "a dropped row was decoded"
            got[owner[key]].append(token)
        if decoder.cache is not None:
            longest = int(decoder.next_pos.max())
            assert decoder.cache.length == longest   # every row's padding trimmed to the longest row
        step += 1
    for i in range(3):
        s = settings[i]
        assert got[i] == list(stream(sharp, PROMPTS[i], s.max_new_tokens, temperature=1.0, seed=s.seed,
                                     stop_ids=s.stop_ids)), f"row {i}"
    assert len(got[3]) < settings[3].max_new_tokens
    assert decoder.settings == {} and decoder.cache is None   # nothing kept once every row has left


def test_n_rows_share_one_prefill_and_draw_from_their_own_seeds(sharp):
    decoder = Decoder(sharp)
    rows = [RowSampling(12, temperature=1.0, seed=s) for s in (1, 2, 3)]
    got = {}
    for key, token, _ in decoder.add(PROMPTS[2], rows):
        got[key] = [token]
    while len(decoder):
        for key, token, _ in decoder.step():
            got[key].append(token)
    assert [got[k] for k in sorted(got)] == [list(stream(sharp, PROMPTS[2], 12, temperature=1.0, seed=s))
                                             for s in (1, 2, 3)]


# ---- a live server on taught checkpoints ----------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, world):
    return pipeline_run(tmp_path_factory.mktemp("serve"), world)


@pytest.fixture(scope="module")
def served(run_dir):
    from lmschool.serve import models as catalog

    specs, report_run = catalog.find([str(run_dir)])
    return catalog.load(specs, torch.device("cpu")), report_run


@pytest.fixture(scope="module")
def server(served):
    models, report_run = served
    live = LiveServer(models, report_run=report_run, max_batch=32, max_queue=64)
    yield live
    live.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat(client, content, model="sft", **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def oracle(served, model, content, max_new, temperature=0.0, seed=None):
    """What the single-prompt path (`stream`) writes for a chat turn: the answer to compare with."""
    from lmschool.tokenizer import TextStream

    m = served[0][model]
    prompt, _ = m.tokenizer.render([{"role": "user", "content": content}], add_generation_prompt=True)
    text = TextStream(m.tokenizer)
    out = "".join(text.push(t) for t in stream(m.model, prompt, max_new, temperature=temperature, seed=seed,
                                                  stop_ids=m.tokenizer.stop_ids))
    return out + text.flush()


def test_models_and_taught_answers_whole_and_streamed(client, served):
    assert sorted(m.id for m in client.models.list().data) == ["dpo", "sft"]
    for model, pairs in TAUGHT.items():
        for question, answer in pairs:
            reply = chat(client, question, model=model)
            assert reply.choices[0].message.content == answer
            assert reply.choices[0].finish_reason == "stop"
    reply = chat(client, "Hi!", max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    m = served[0]["sft"]
    prompt, _ = m.tokenizer.render([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == len(prompt) + 3

    chunks = list(chat(client, "What is 2 plus 3?", stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "2 plus 3 is 5." and len(pieces) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(m.tokenizer.encode("2 plus 3 is 5.")) + 1   # + <|im_end|>


def test_stop_strings_cut_the_answer_whole_and_streamed(client):
    assert chat(client, "Hi!", stop=["How"]).choices[0].message.content == "Hello! "
    chunks = list(chat(client, "Where does Mia live?", stop=[" Oak", "zzz"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mia lives in" and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_seeded_samples_equal_the_single_prompt_path_and_n_counts_up_the_seed(client, served):
    reply = chat(client, "Where does Mia live?", temperature=1.0, seed=11, n=3, max_tokens=20)
    assert [c.message.content for c in reply.choices] == [oracle(served, "sft", "Where does Mia live?", 20, 1.0, s)
                                                          for s in (11, 12, 13)]


def test_completions_plain_text_echo_and_token_ids(client, served):
    m = served[0]["sft"]
    reply = client.completions.create(model="sft", prompt="Hello", max_tokens=5, temperature=0)
    ids = m.tokenizer.encode("Hello")
    expected = list(stream(m.model, ids, 5, temperature=0, stop_ids=[m.tokenizer.eos_id]))
    assert reply.choices[0].text == m.tokenizer.decode(expected, skip_special=True)
    assert reply.object == "text_completion" and reply.usage.prompt_tokens == len(ids)
    for prompt in (["Hello", "Hello"], [ids, ids]):
        echoed = client.completions.create(model="sft", prompt=prompt, max_tokens=5, temperature=0, echo=True)
        assert [c.text for c in echoed.choices] == ["Hello" + reply.choices[0].text] * 2
    streamed = client.completions.create(model="sft", prompt="Hello", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_same_answer_as_lmschool_generate_with_the_same_seed(client, run_dir, capsys):
    from lmschool.cli import main

    assert main(["generate", str(run_dir / "sft"), "--chat", "--prompt", "Tell me a story", "--seed", "3",
                 "--temperature", "1", "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    reply = chat(client, "Tell me a story", temperature=1, seed=3, max_tokens=40)
    assert reply.choices[0].message.content + "\n" == printed


def test_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "Hi!", model="nope")
    assert e.value.body["code"] == "model_not_found" and "sft" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi!", max_tokens=500)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi!", temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi!", logprobs=True)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "<|im_start|>system")
    assert "special token" in e.value.body["message"]


@pytest.mark.parametrize("body, param", [
    (b'{"model": "sft", "messages": [', None),                                           # not JSON
    (b'[1, 2]', None),                                                                   # not an object
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),                     # missing
    (b'{"model": "sft", "messages": []}', "messages"),
    (b'{"model": "sft", "messages": "Hi"}', "messages"),
    (b'{"model": "sft", "messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}', "temperature"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "n": 1.5}', "n"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', "stop"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "seed": 1e30}', "seed"),
    (b'{"model": "sft", "messages": [{"role": "user", "content": "x"}], "n": 33}', "n"),
])
def test_malformed_bodies_and_wrong_types_are_400_in_openai_shape(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param or (param and error["param"].startswith(param)), error
    assert server.engine.stats()["rows_active"] == 0


def test_completions_wrong_prompts_and_oversized_body(server):
    for prompt in ([], [10**9], [1.5], None):
        r = httpx.post(server.url + "/v1/completions", json={"model": "sft", "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    big = b'{"model": "sft", "prompt": "' + b"a" * (9 << 20) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_32_simultaneous_streaming_clients_get_complete_right_answers(server, served):
    """Greedy turns must be exactly what each model was taught; seeded samples exactly what the
    single-prompt path samples (the model is taught to wide margins: batching's float rounding
    does not flip a token)."""
    questions = [(model, q, a) for model, pairs in TAUGHT.items() for q, a in pairs]
    requests = []
    for i in range(32):
        model, question, answer = questions[i % len(questions)]
        seed = None if i % 2 == 0 else 100 + i
        expected = answer if seed is None else oracle(served, model, question, 24, 1.0, seed)
        requests.append((model, question, seed, expected))

    async def one(aclient, model, question, seed):
        kw = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
        response = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=24, stream=True, **kw)
        text, finish = "", None
        async for chunk in response:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def everyone():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, m, q, s) for m, q, s, _ in requests))

    steps_before = server.engine.stats()["steps"]
    results = asyncio.run(everyone())
    assert [text for text, _ in results] == [expected for *_, expected in requests]
    assert all(finish in ("stop", "length") for _, finish in results)
    # decoded together: far fewer steps than the tokens written one request after another
    assert server.engine.stats()["steps"] - steps_before < sum(len(e) for *_, e in requests) / 2


def test_a_full_queue_answers_429_with_retry_after(served):
    models, _ = served
    live = LiveServer(models, max_batch=1, max_queue=1)
    try:
        with paused_after(live.engine) as paused:   # the first answer cannot finish and free its slot
            first = httpx.Client(timeout=60).stream(   # a chat stream's first chunk needs no step
                "POST", live.url + "/v1/chat/completions",
                json={"model": "sft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
                      "ignore_eos": True, "stream": True})
            with first as running:
                lines = running.iter_lines()   # kept: a dropped iterator closes the stream
                assert next(lines).startswith("data: ")
                wait_for(paused.is_set, "the engine to wait")
                stats = live.engine.stats()
                assert stats["rows_active"] == 1, f"{stats}"      # running: the one slot is taken
                async_second = httpx.AsyncClient(timeout=60)

                async def second_and_third():
                    waiting = asyncio.ensure_future(async_second.post(
                        live.url + "/v1/chat/completions",
                        json={"model": "sft", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}))
                    while live.engine.stats()["requests_waiting"] < 1:
                        await asyncio.sleep(0.005)
                    third = await async_second.post(live.url + "/v1/chat/completions", json={
                        "model": "sft", "messages": [{"role": "user", "content": "Hi!"}]})
                    return waiting, third

                loop = asyncio.new_event_loop()
                waiting, third = loop.run_until_complete(second_and_third())
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
        # the first stream left (closing it), the engine runs again: the waiting one is answered
        second = loop.run_until_complete(waiting)
        loop.run_until_complete(async_second.aclose())
        loop.close()
        assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"] == "Hello! How can I help?"
        assert live.engine.stats()["refused"] == 1
    finally:
        live.close()


CLIENT = """
import sys, httpx
with httpx.stream("POST", sys.argv[1] + "/v1/chat/completions", timeout=60, json={
        "model": "sft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "ignore_eos": True,
        "stream": True}) as r:
    if r.status_code != 200:
        sys.exit(f"{r.status_code}: {r.read().decode()}")
    for line in r.iter_lines():
        if line.startswith("data: "):
            print("got", flush=True)
            sys.stdin.read()        # wait here until killed
"""


def test_a_client_killed_mid_stream_frees_its_slot_at_once(server):
    child = None
    try:
        with paused_after(server.engine) as paused:   # no step can finish the answer while the client dies
            child = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
            line = child.stdout.readline()
            assert line == "got\n", child.stderr.read()
            wait_for(paused.is_set, "the engine to wait")   # one step written: running, far from done
            before = server.engine.stats()
            assert before["rows_active"] == 1, f"{before}"
            child.send_signal(signal.SIGKILL)
            child.wait()
            wait_for(lambda: server.engine.stats()["cancelled"] == before["cancelled"] + 1, "the cancel")
            assert server.engine.stats()["rows_active"] == 0      # the slot is free before any step
        wait_for(lambda: server.engine.stats()["requests_running"] == 0, "the row to be dropped")
        assert server.engine.stats()["tokens"] - before["tokens"] < 200
        assert chat(openai.OpenAI(base_url=server.url + "/v1", api_key="none"), "Hi!").choices[0].message.content \
            == "Hello! How can I help?"
    finally:
        if child is not None:
            child.kill()
            child.wait()


def test_api_key_guards_the_api_not_the_health(served):
    models, _ = served
    live = LiveServer(models, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            chat(openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0), "Hi!")
        assert e.value.body["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/v1/models").status_code == 401
        assert httpx.get(live.url + "/api/info").status_code == 401
        assert httpx.get(live.url + "/health").json()["auth"] is True
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert chat(good, "Hi!").choices[0].message.content == "Hello! How can I help?"
    finally:
        live.close()


def test_pipeline_run_report_and_teacher_scores(server, run_dir):
    info = httpx.get(server.url + "/api/info").json()
    assert [m["id"] for m in info["models"]] == ["sft", "dpo"] and all(m["world"] for m in info["models"])
    assert info["report"] is True
    report = httpx.get(server.url + "/api/report").json()
    assert report["markdown"] == (run_dir / "report.md").read_text()
    plot = httpx.get(server.url + "/report/plots/losses.png")
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    assert httpx.get(server.url + "/report/plots/..%2Freport.md").status_code == 404
    assert httpx.get(server.url + "/report").status_code == 200

    from lmschool.world.teacher import Teacher
    teacher = Teacher.from_file(run_dir / "world" / "world.json")
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    scored = httpx.post(server.url + "/api/score", json={"model": "dpo", "messages": messages,
                                                         "responses": ["Five.", "2 plus 3 is 5."]}).json()
    assert [s["score"] for s in scored["scores"]] == [teacher.score(messages, r).total for r in ("Five.", "2 plus 3 is 5.")]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_checkpoint_ids_and_bad_arguments(run_dir, tmp_path):
    from lmschool.errors import UserError
    from lmschool.serve import models as catalog

    specs, report = catalog.find([str(run_dir / "sft"), f"other={run_dir / 'dpo' / 'model'}"])
    assert [s.id for s in specs] == ["sft", "other"] and report is None
    assert [s.id for s in catalog.find([str(run_dir / "sft" / "model")])[0]] == ["sft"]
    with pytest.raises(UserError, match="both be served as 'sft'"):
        catalog.find([str(run_dir / "sft"), str(run_dir / "sft" / "model")])
    with pytest.raises(UserError, match="does not exist"):
        catalog.find([str(tmp_path / "missing")])
    assert catalog.world_of(specs[0]) == run_dir / "world" / "world.json"


def test_the_command_serves_and_says_where(run_dir):
    child = subprocess.Popen([sys.executable, "-m", "lmschool", "serve", str(run_dir / "sft"), "--port", "0",
                              "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env())
    try:
        line = child.stdout.readline()
        assert line.startswith("lmschool serve: sft on cpu (fp32) at http://127.0.0.1:"), child.stderr.read()
        url = line.split(" at ")[1].split("/ ")[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert chat(client, "Hi!").choices[0].message.content == "Hello! How can I help?"
    finally:
        child.send_signal(signal.SIGTERM)
        status = child.wait(timeout=120)    # uvicorn shuts down, then re-raises the signal it caught
        errors = child.stderr.read()
        assert status in (0, -signal.SIGTERM) and "Traceback" not in errors, errors
    bad = subprocess.run([sys.executable, "-m", "lmschool", "serve", str(run_dir / "nope")], capture_output=True,
                         text=True, env=child_env())
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
