"""Stage 2: the loss mask on hand-built conversations, padded = packed = one at a time, batches as a
pure function of the step, a tiny model that overfits and then answers word for word, resume, bad
input (file:line, nothing overwritten), replay of pre-training text, and generation-based
evaluation (`lmschool eval`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmschool.checkpoint import load_model, save_model
from lmschool.cli import main
from lmschool.data.sft import (SFTBatches, best_fit_decreasing, load_examples, make_example, pack_batch,
                               pad_batch, render_row)
from lmschool.errors import DataError
from lmschool.data.prompts import read_prompts
from lmschool.evaluate import evaluate_generations
from lmschool.judges import school_teacher
from lmschool.generate import Generation, generate
from lmschool.losses.lm import IGNORE, lm_loss, target_lm_loss, token_nll
from lmschool.model import ModelConfig, build_model
from lmschool.tokenizer import IM_END, Tokenizer, train_tokenizer
from lmschool.trainer import TrainConfig, fit

TINY = ["batch_size=4", "lr=3e-3", "warmup_steps=5", "log_every=5", "eval_every=0", "save_every=0",
        "threads=1", "precision=fp32", "val_fraction=0", "eval_max_new_tokens=24", "device=cpu"]

CONVERSATIONS = [
    [{"role": "user", "content": "Where does Mia live?"}, {"role": "assistant", "content": "Mia lives in Oakford."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 30?"},
     {"role": "assistant", "content": "12 plus 30 is 42."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "What pet does Tom have?"}, {"role": "assistant", "content": "Tom has a rabbit."}],
    [{"role": "user", "content": "Can you run in the corridor?"},
     {"role": "assistant", "content": "No, running there is dangerous."}],
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([], byte_level=True)  # byte b has id 4 + b: hand-checkable


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=192)
    path = tmp_path_factory.mktemp("init") / "model"
    save_model(path, build_model(cfg, seed=0), tok)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def targets(tok, example) -> str:
    """The text of the tokens an example is trained to write, in order."""
    return tok.decode([int(t) for t in example.labels if t != IGNORE])


# ---- the loss mask ------------------------------------------------------------------------------

def test_loss_mask_is_exactly_the_answers_and_their_end_of_turn(tok):
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}]
    ids, mask = tok.render(conversation)
    e = make_example(ids, mask, "x:1")
    # "yo" + <|im_end|> + "4" + <|im_end|>: 2 + 1 + 1 + 1 = 5 targets, nothing else
    assert targets(tok, e) == f"yo{IM_END}4{IM_END}" and e.num_targets == 5
    # inputs: the rendered text up to (not including) the final <|im_end|>; the closing "\n" is cut
    text = tok.decode(ids)
    assert text.endswith(f"4{IM_END}\n") and tok.decode(e.input_ids.tolist()) == text[:-len(IM_END) - 1]
    # each target sits right after its input token: labels[t] == input_ids[t + 1]
    trained = np.nonzero(e.labels != IGNORE)[0]
    assert all(e.labels[t] == ids[t + 1] for t in trained)
    # loss on every token: every next token, the closing "\n" included
    every = make_example(ids, mask, "x:1", loss_on="all")
    assert every.num_targets == len(ids) - 1 and tok.decode(every.labels.tolist()) == tok.decode(ids[1:])


def test_prompt_completion_trains_the_completion_only(tok):
    e = make_example(*render_row({"prompt": "hi", "completion": "yo"}, "x:1", tok), "x:1")
    assert targets(tok, e) == f"yo{IM_END}"
    row = {"prompt": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "old"},
                      {"role": "user", "content": "b?"}], "completion": "new"}
    e = make_example(*render_row(row, "x:2", tok), "x:2")
    assert targets(tok, e) == f"new{IM_END}"
    # the same conversation as messages trains both answers
    e = make_example(*render_row({"messages": row["prompt"] + [{"role": "assistant", "content": "new"}]},
                                 "x:3", tok), "x:3")
    assert targets(tok, e) == f"old{IM_END}new{IM_END}"


# ---- batching ---------------------------------------------------------------------------------

def examples_of(tok, n=12):
    rows = [{"messages": CONVERSATIONS[i % 4][:-1] + [{"role": "assistant", "content": "x" * (3 + 5 * (i % 12))}]}
            for i in range(n)]
    return [make_example(*render_row(r, f"f:{i}", tok), f"f:{i}") for i, r in enumerate(rows)]


def per_example_loss(model, batch, n) -> torch.Tensor:
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                       segment_ids=batch.get("segment_ids"))
    nll = token_nll(logits, batch["labels"]).double()                               # (B, T)
    B, T = batch["input_ids"].shape                                                 # padded: example i is row i
    seg = batch.get("segment_ids", torch.arange(B)[:, None].expand(B, T))
    on = batch["labels"] != IGNORE
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, seg[on], nll[on])
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, seg[on], torch.ones_like(nll[on]))
    return total / count


def test_padded_packed_and_one_at_a_time_give_the_same_loss(tok):
    examples = examples_of(tok)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=192),
                        seed=1).eval()
    alone = torch.cat([per_example_loss(model, pad_batch([e], 1), 1) for e in examples])
    padded = per_example_loss(model, pad_batch(examples, 1, pad_multiple=8), len(examples))
    rows = best_fit_decreasing([len(e) for e in examples], 384)     # rows longer than the context: positions restart
    packed_batch = pack_batch(examples, rows, 1, pad_multiple=8)
    packed = per_example_loss(model, packed_batch, len(examples))
    assert packed_batch["input_ids"].shape[0] < len(examples) // 2          # rows really hold several
    assert (packed_batch["segment_ids"][0] >= 0).sum() > len(examples[0]) + 10
    assert torch.allclose(alone, padded, atol=1e-5) and torch.allclose(alone, packed, atol=1e-5)
    # the batch loss (mean over targets) is the target-weighted mean of the per-example losses
    weights = torch.tensor([e.num_targets for e in examples], dtype=torch.float64)
    for batch in (pad_batch(examples, 1), packed_batch):
        with torch.no_grad():
            loss, _ = lm_loss(model, batch)
        assert abs(loss.item() - float((alone * weights).sum() / weights.sum())) < 1e-5


def test_the_head_at_targets_only_gives_the_same_loss_and_gradients(tok):
    """target_lm_loss (the LM head on the ~40% of positions that are targets) against lm_loss (the
    head everywhere, non-targets masked afterwards), on a padded and on a packed batch: the same
    loss and the same gradient of every parameter, the tied embedding included."""
    examples = examples_of(tok)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=192),
                        seed=2)
    rows = best_fit_decreasing([len(e) for e in examples], 192)
    for batch in (pad_batch(examples, 1, pad_multiple=8), pack_batch(examples, rows, 1, pad_multiple=8)):
        assert 0 < (batch["labels"] != IGNORE).float().mean() < 0.9
        grads = []
        for loss_fn in (lm_loss, target_lm_loss):
            model.zero_grad()
            loss, _ = loss_fn(model, batch)
            loss.backward()
            grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        (full, g_full), (sparse, g_sparse) = grads
        assert abs(full - sparse) < 1e-5
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_sparse))


def test_packed_batches_hold_each_conversation_once_per_epoch(tok, tmp_path):
    examples = examples_of(tok, n=40)
    data = SFTBatches(examples, 2, seed=3, packing=True, max_seq_len=192, pad_id=1)
    per_epoch = data.steps_per_epoch(2)
    rows = data.epoch_rows(0)
    assert all(sum(len(examples[i]) for i in row) <= 192 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(40))         # each once, none lost
    assert len(rows) < 40 / 2 and per_epoch == len(rows) // 2
    seen = [i for s in range(per_epoch) for unit in data.global_batch(s, 2) for i in unit]
    assert len(seen) == len(set(seen)) > 30
    assert data.epoch_rows(1) != rows                                          # repacked each epoch
    # 2 micro-batches of 1 row hold what 1 micro-batch of 2 rows holds
    one = SFTBatches(examples, 1, seed=3, packing=True, max_seq_len=192, pad_id=1).micro_batches(5, 2, 0, 1)
    two = data.micro_batches(5, 1, 0, 1)[0]
    assert sum(b["num_tokens"] for b in one) == two["num_tokens"]
    width = two["input_ids"].shape[1]
    rows_of_one = [torch.nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]), value=1) for b in one]
    assert torch.equal(torch.cat(rows_of_one), two["input_ids"])
    # a short run on packed rows learns
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=192)
    train = TrainConfig(max_steps=10, batch_size=2, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                        save_every=0, device="cpu", threads=1, precision="fp32")
    _, final = fit(build_model(cfg, seed=0), data, lm_loss, train, tmp_path, desc="t")
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert final["loss"] < first


def test_batches_are_a_pure_function_of_the_step(tok):
    examples = examples_of(tok, n=30)
    data = SFTBatches(examples, 4, seed=0, bucket_batches=3)
    G = 8
    per_epoch = data.steps_per_epoch(G)
    assert per_epoch == 3
    first = [[i for (i,) in data.global_batch(s, G)] for s in range(2 * per_epoch)]
    again = [[i for (i,) in data.global_batch(s, G)] for s in reversed(range(2 * per_epoch))][::-1]
    assert first == again                                            # any order of calls, same batches
    epoch0 = [i for b in first[:per_epoch] for i in b]
    assert len(set(epoch0)) == len(epoch0) == per_epoch * G          # an example at most once per epoch
    assert first[:per_epoch] != first[per_epoch:]                    # a new permutation each epoch
    # 2 micro-batches of 4 hold the global batch of 8 that 1 micro-batch of 8 holds
    split = [b["input_ids"].shape[0] for b in data.micro_batches(1, 2, 0, 1)]
    assert split == [4, 4]
    two = SFTBatches(examples, 8, seed=0, bucket_batches=3).micro_batches(1, 1, 0, 1)[0]

    def conversations(batch):  # each row without its right padding (pad_id 0, which no conversation holds)
        return [tuple(row[:int(row.nonzero().max()) + 1].tolist()) for row in batch["input_ids"]]
    got = [c for b in data.micro_batches(1, 2, 0, 1) for c in conversations(b)]
    assert sorted(got) == sorted(conversations(two))
    # bucketing: a batch holds examples of similar length, so it pads less than random batches
    def padding(bucket):
        d = SFTBatches(examples, 4, seed=0, bucket_batches=bucket, pad_multiple=1)
        batches = [b for s in range(per_epoch) for b in d.micro_batches(s, 2, 0, 1)]
        return sum(b["input_ids"].numel() - b["num_tokens"] for b in batches)
    assert padding(3) < padding(1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        data.steps_per_epoch(31)


# ---- the command --------------------------------------------------------------------------------

def sft(ckpt, data, out, *extra, expect=0):
    options = [x for i, x in enumerate(extra) if x.startswith("--") or (i and extra[i - 1] in ("--eval", "--replay"))]
    overrides = [x for x in extra if x not in options]
    argv = ["sft", "--init", str(ckpt), "--data", str(data), "--out", str(out), *options, *TINY, *overrides]
    assert main(argv) == expect


def test_overfits_then_answers_word_for_word(tok, ckpt, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    out = tmp_path / "run"
    sft(ckpt, data, out, "max_steps=120", "lr=1e-2", "warmup_steps=10")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["train_loss"] < 0.05
    model = load_model(out).eval()
    trained = Tokenizer.load(out / "model")
    prompts = [trained.render(c[:-1], add_generation_prompt=True)[0] for c in CONVERSATIONS]
    gen = generate(model, prompts, max_new_tokens=40, temperature=0, stop_ids=trained.stop_ids, pad_id=1)
    for c, tokens, finished in zip(CONVERSATIONS, gen.tokens, gen.finished):
        assert finished and tokens[-1] == trained.im_end_id
        assert trained.decode(tokens[:-1]) == c[-1]["content"]
    # the checkpoint stops at <|im_end|> in transformers too (generation_config eos ids)
    config = json.loads((out / "model" / "generation_config.json").read_text())
    assert trained.im_end_id in config["eos_token_id"]


def test_resume_equals_uninterrupted(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS * 3])
    sft(ckpt, data, tmp_path / "full", "max_steps=12")
    part = tmp_path / "part"
    sft(ckpt, data, part, "max_steps=12", "save_every=6", "keep_last=1")
    # as if killed at step 9: no final model or summary, the checkpoint of step 6, metrics to 9
    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-00000006"]
    sft(ckpt, data, part, "max_steps=12", "save_every=6", "keep_last=1", "--resume")

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "full") == losses(part)


def test_resume_with_other_data_is_refused(ckpt, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS * 2])
    out = tmp_path / "run"
    sft(ckpt, data, out, "max_steps=4")
    (out / "summary.json").unlink()
    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": c} for c in CONVERSATIONS * 3])
    sft(ckpt, other, out, "max_steps=4", "--resume", expect=2)
    assert "training data differs" in capsys.readouterr().err


GOOD = {"messages": CONVERSATIONS[0]}


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', ":2: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ":2: the conversation has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     ":2: message 0 has role 'robot'; allowed roles: system, user, assistant"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
     ":2: message 0 (user) has empty content"),
    ({"prompt": "hi", "completion": ""}, ":2 (completion): message 0 (assistant) has empty content"),
    ({"text": "hi"}, ":2: expected {\"messages\""),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 300}]},
     ":2: the conversation is 322 tokens"),
])
def test_bad_input_names_file_and_line_and_loses_nothing(ckpt, tmp_path, capsys, line, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}')
    sft(ckpt, data, out, "--force", "truncation=error", expect=2)
    err = capsys.readouterr().err
    assert f"{data}{message}" in err, err
    assert (out / "summary.json").read_text() == '{"earlier": true}'


def test_too_long_conversations_are_dropped_or_truncated_and_counted(tok, ckpt, tmp_path):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 300}]}
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, long] * 4)
    examples, stats = load_examples([data], tok, 192, truncation="drop")
    assert (len(examples), stats.dropped_too_long, stats.truncated) == (4, 4, 0)
    assert stats.first_dropped[0] == f"{data}:2"
    examples, stats = load_examples([data], tok, 192, truncation="truncate")
    assert (len(examples), stats.dropped_too_long, stats.truncated) == (8, 0, 4)
    header = len(tok.render(long["messages"][:1], add_generation_prompt=True)[0])
    cut = examples[1]
    assert len(cut) == 192 and targets(tok, cut) == "x" * (193 - header)   # the start, no <|im_end|>
    sft(ckpt, data, tmp_path / "run", "max_steps=2", "truncation=drop")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropped_too_long"] == 4 and summary["train_examples"] == 4


def test_checkpoint_without_chat_tokens_is_a_clear_error(tmp_path, capsys):
    import tokenizers
    from tokenizers import models, pre_tokenizers
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["hello world"] * 10, tokenizers.trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    llama = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"})
    path = tmp_path / "llama"
    save_model(path, build_model(ModelConfig(vocab_size=llama.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2)), llama)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    sft(path, data, tmp_path / "run", expect=2)
    assert "has no chat template" in capsys.readouterr().err   # and the fix: --chat-template FILE.jinja
    assert not (tmp_path / "run").exists()
    assert main(["chat", str(path)]) == 2
    assert "has no chat template" in capsys.readouterr().err


# ---- generation-based evaluation --------------------------------------------------------------------

def test_figures_of_a_model_that_answers_with_the_references(tok, world, monkeypatch):
    """A stand-in for generate that answers every prompt with its reference (then <|im_end|>): the
    teacher finds every answer right; one that never stops has an end-of-turn rate of 0."""
    rows = read_prompts(world / "eval.jsonl")
    by_prompt = {json.dumps(r["prompt"]): r["reference"] for r in rows}
    rendered = {tuple(tok.render(r["prompt"], add_generation_prompt=True)[0]): r["reference"] for r in rows}
    assert len(by_prompt) == len(rows)

    def fake_generate(model, prompts, max_new_tokens, stop=True, **kw):
        answers = [tok.encode(rendered[tuple(p)]) + ([tok.im_end_id] if stop else []) for p in prompts]
        return Generation(answers, [stop] * len(prompts))

    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=512))
    monkeypatch.setattr("lmschool.generate.generate", fake_generate)
    summary, records = evaluate_generations(model, tok, rows, school_teacher(world / "eval.jsonl"))
    for key in ("correct", "fact_correct", "correct_train_pupils", "correct_heldout_pupils",
                "correct_arithmetic", "refusal_correct", "end_of_turn_rate"):
        assert summary[key] == 1.0, key
    assert summary["eval_rows"] == len(rows) == len(records) and 0.8 < summary["teacher_score"] <= 1
    assert records[0]["response"] == rows[0]["reference"] and records[0]["end_of_turn"]
    monkeypatch.setattr("lmschool.generate.generate", lambda *a, **kw: fake_generate(*a, stop=False, **kw))
    summary, _ = evaluate_generations(model, tok, rows, lambda prompts, responses: [0.5] * len(prompts))
    assert summary["end_of_turn_rate"] == 0.0 and summary["score"] == 0.5 and "correct" not in summary


def test_sft_and_eval_commands_write_the_figures(tok, ckpt, world, tmp_path, capsys):
    from lmschool.judges import RewardModelJudge
    out = tmp_path / "run"
    sft(ckpt, world / "sft.jsonl", out, "max_steps=3", "packing=true", "val_fraction=0.1",
        "--eval", str(world / "eval.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("teacher_score", "correct_heldout_pupils", "correct_train_pupils", "correct_arithmetic",
                "fact_correct", "refusal_correct", "end_of_turn_rate"):
        assert 0 <= summary[key] <= 1, key
    assert summary["val_loss"] > 0 and summary["packing"] is True
    answers = [json.loads(x) for x in (out / "eval_answers.jsonl").read_text().splitlines()]
    assert len(answers) == summary["eval_rows"] + summary["eval_skipped_too_long"]
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(world / "eval.jsonl"), "--out", str(tmp_path / "e.json"),
                 "--answers", str(tmp_path / "a.jsonl"), "--max-new-tokens", "24", "--precision", "fp32"]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["teacher_score"] == pytest.approx(summary["teacher_score"])   # the same greedy answers
    assert main(["eval", str(out), "--data", str(world / "eval.jsonl"), "--out", str(tmp_path / "s.json"),
                 "--scorer", "lmschool.world.teacher:reward", "--max-new-tokens", "4"]) == 0
    assert "score" in json.loads((tmp_path / "s.json").read_text())
    # an existing --out is kept unless --force (it used to be overwritten), checked before any answer
    before = (tmp_path / "s.json").read_text()
    assert main(["eval", str(out), "--data", str(world / "eval.jsonl"), "--out", str(tmp_path / "s.json"),
                 "--max-new-tokens", "4"]) == 2
    assert "s.json exists; pass --force" in capsys.readouterr().err and (tmp_path / "s.json").read_text() == before
    assert main(["eval", str(out), "--data", str(world / "eval.jsonl"), "--out", str(tmp_path / "s.json"),
                 "--max-new-tokens", "4", "--force"]) == 0
    # a reward model as the judge: each answer's score is the reward-model judge's, and the summary says which
    rm = tmp_path / "rm"
    save_model(rm, load_model(out, head="score", new_head=True), tok, {"kind": "reward", "reward_bias": 0.25})
    assert main(["eval", str(out), "--data", str(world / "eval.jsonl"), "--out", str(tmp_path / "r.json"),
                 "--answers", str(tmp_path / "r.jsonl"), "--reward", str(rm), "--max-new-tokens", "4",
                 "--precision", "fp32"]) == 0
    by_rm = json.loads((tmp_path / "r.json").read_text())
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    records = [r for r in records if r["response"] is not None]
    judge = RewardModelJudge(rm, tok)
    judged, _ = judge([r["prompt"] for r in records], [r["response"] for r in records])
    assert [r["score"] for r in records] == pytest.approx(judged, abs=1e-5)
    assert by_rm["scorer"] == judge.name and "correct" not in by_rm and by_rm["score"] is not None
    assert main(["eval", str(out), "--data", str(world / "eval.jsonl"), "--scorer", "nope:f"]) == 2
    assert "cannot import module 'nope'" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]},
                                               {"prompt": [{"role": "assistant", "content": "hi"}]}])
    assert main(["eval", str(out), "--data", str(bad)]) == 2
    assert f"{bad}:2: the prompt's last turn is assistant" in capsys.readouterr().err


def test_replay_adds_windows_of_pretraining_text(ckpt, world, tmp_path, capsys):
    from lmschool.data.sft import WithReplay
    out = tmp_path / "run"
    sft(ckpt, world / "sft.jsonl", out, "max_steps=2", "replay_windows=3", "--replay", str(world / "corpus.txt"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replay_windows_per_step"] == 3 and (out / "replay" / "train.bin").is_file()
    from lmschool.data.pretrain import TokenWindows
    windows = TokenWindows(np.arange(1000) % 7, 192, 3, seed=1)
    mixed = WithReplay(SFTBatches(examples_of(Tokenizer.load(ckpt), 8), 4), windows).micro_batches(0, 2, 0, 1)
    assert len(mixed) == 3 and mixed[-1]["input_ids"].shape == (3, 192) and mixed[-1]["num_targets"] == 3 * 192
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\n")
    sft(ckpt, world / "sft.jsonl", tmp_path / "other", "--replay", str(bad), expect=2)
    assert f"{bad}:2: not UTF-8" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_scorer_without_eval_is_refused(tmp_path, capsys):
    """--scorer judges --eval's answers; without --eval it was silently unused (bad-input matrix)."""
    assert main(["sft", "--init", str(tmp_path / "init"), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "run"), "--scorer", "mypkg:score"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scorer judges the --eval answers; give --eval FILE too" in err[0]
    assert not (tmp_path / "run").exists()
