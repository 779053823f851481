"""Tokenizer: round trips, special tokens, Hugging Face parity of ids and chat template, loss masks,
and the `lmschool tokenizer train` command's errors."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from lmschool.cli import main
from lmschool.errors import UserError
from lmschool.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, SPECIAL_TOKENS, Tokenizer, render_text, train_tokenizer

transformers = pytest.importorskip("transformers")


def corpus_lines(n: int = 3000) -> list[str]:
    """Small seeded corpus: words, sums, unicode, runs of newlines (so BPE merges "\\n\\n\\n")."""
    rng = random.Random(0)
    words = "Ann lives in Brook and has a cat called Tom . 2 + 3 = 5 ? ! héllo 日本 😀 don't".split()
    lines = []
    for i in range(n):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + "\n" * rng.choice([1, 1, 3]))
        if i % 20 == 19:
            lines.append(f"{ENDOFTEXT}\n")
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus_lines(), vocab_size=320)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tok.save(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


CONVERSATIONS = [
    [{"role": "user", "content": "Where does Ann live?"}, {"role": "assistant", "content": "Ann lives in Brook."}],
    [
        {"role": "system", "content": "Be kind and brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Say héllo in 日本 😀"},
        {"role": "assistant", "content": "héllo 😀 don't\nrun!"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]

UNICODE_SAMPLES = ["", "a", "héllo wörld", "日本語のテキスト", "😀👩‍👩‍👧 family", "e\u0301 combining", "tabs\tand\r\nCRLF",
                   "\x00\x01 control", "  leading and trailing  ", "Ωμέγα Русский عربى हिन्दी", "\n\n\n", "1234567"]


def random_unicode(rng: random.Random, n: int) -> str:
    """Code points from all planes except surrogates (which UTF-8 cannot encode)."""
    return "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                   for _ in range(n))


def test_round_trip_any_unicode(tok):
    rng = random.Random(1)
    byte_tok = train_tokenizer([], byte_level=True)
    for text in UNICODE_SAMPLES + [random_unicode(rng, rng.randint(1, 60)) for _ in range(200)]:
        for t in (tok, byte_tok):
            assert t.decode(t.encode(text)) == text


def test_special_ids_and_endoftext(tok):
    assert (tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2, 3)
    assert tok.encode(ENDOFTEXT) == [tok.eos_id]
    assert tok.encode(f"Ann\n{ENDOFTEXT}\nTom").count(tok.eos_id) == 1
    as_text = tok.encode(ENDOFTEXT, allow_special=False)
    assert len(as_text) > 1 and tok.eos_id not in as_text and tok.decode(as_text) == ENDOFTEXT
    assert tok.vocab_size == 320
    assert tok.stop_ids == [tok.eos_id, tok.im_end_id]
    # the trainer saw special tokens cut out of the text: no merges of their pieces, such as "<|"
    assert {token for token in tok.backend.get_vocab() if "|" in token} == {"|", *SPECIAL_TOKENS}


def test_byte_level_has_256_bytes_and_specials():
    byte_tok = train_tokenizer(["ignored"], byte_level=True)
    assert byte_tok.vocab_size == 256 + 4
    text = "Aé😀"
    assert byte_tok.encode(text) == [4 + b for b in text.encode("utf-8")]
    assert byte_tok.encode(IM_END) == [3]
    with pytest.raises(UserError, match="exactly 260"):
        train_tokenizer([], vocab_size=1000, byte_level=True)
    with pytest.raises(UserError, match="at least 260"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.stop_ids == tok.stop_ids and loaded.pad_id == tok.pad_id
    for text in UNICODE_SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.render(CONVERSATIONS[1]) == tok.render(CONVERSATIONS[1])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == ENDOFTEXT and config["bos_token"] is None


def test_autotokenizer_gives_our_ids(tok, hf_tok):
    for text in UNICODE_SAMPLES + [f"Ann lives in Brook.{ENDOFTEXT}Tom"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == (ENDOFTEXT, "<|pad|>", None)


def test_loads_what_transformers_saves(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)  # transformers 5 puts the template in chat_template.jinja
    loaded = Tokenizer.load(tmp_path)
    assert loaded.stop_ids == tok.stop_ids and loaded.pad_id == tok.pad_id and loaded.bos_id is None
    assert loaded.render(CONVERSATIONS[1]) == tok.render(CONVERSATIONS[1])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_jinja_template_through_transformers(tok, hf_tok, messages, add_generation_prompt):
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == render_text(messages, add_generation_prompt)
    hf = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
                                    return_assistant_tokens_mask=True)
    ids, loss_mask = tok.render(messages, add_generation_prompt)
    assert hf["input_ids"] == ids
    assert hf["assistant_masks"] == loss_mask  # the {% generation %} spans give our mask


def masked_runs(ids: list[int], loss_mask: list[int]) -> list[list[int]]:
    runs, previous = [], 0
    for token_id, m in zip(ids, loss_mask):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(token_id)
        previous = m
    return runs


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_loss_mask_is_assistant_content_and_im_end(tok, messages):
    ids, loss_mask = tok.render(messages)
    assert len(ids) == len(loss_mask) and tok.decode(ids) == render_text(messages)
    expected = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in masked_runs(ids, loss_mask)] == expected
    prompt_ids, prompt_mask = tok.render(messages, add_generation_prompt=True)
    assert not any(prompt_mask[len(ids):]) and prompt_ids[:len(ids)] == ids


def test_token_straddling_header_and_content_is_trained(tok, hf_tok):
    """Content opening with newlines merges with the header's "\\n" into one token ("\\n\\n\\n");
    that token counts as trained, as in Hugging Face's assistant mask."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nAnn"}]
    assert tok.backend.token_to_id("ĊĊĊ") is not None
    ids, loss_mask = tok.render(messages)
    assert [tok.decode(run) for run in masked_runs(ids, loss_mask)] == ["\n\n\nAnn" + IM_END]
    hf = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert hf["assistant_masks"] == loss_mask


def test_render_prompt_completion(tok):
    ids, loss_mask = tok.render_prompt_completion("Where does Ann live?", "Ann lives in Brook.")
    assert (ids, loss_mask) == tok.render(CONVERSATIONS[0])
    prompt = CONVERSATIONS[1][:4]
    ids, loss_mask = tok.render_prompt_completion(prompt, [CONVERSATIONS[1][4]])
    assert ids == tok.render(CONVERSATIONS[1])[0]
    assert [tok.decode(run) for run in masked_runs(ids, loss_mask)] == ["héllo 😀 don't\nrun!" + IM_END]
    with pytest.raises(UserError, match="only assistant"):
        tok.render_prompt_completion("Hi", [{"role": "user", "content": "Hi again"}])


@pytest.mark.parametrize("messages, complaint", [
    ([{"role": "bot", "content": "hi"}], "allowed roles: system, user, assistant"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user"}], '"role" and "content"'),
    ([], "non-empty list"),
    ([{"role": "user", "content": f"hi {IM_END}"}], "special token"),
])
def test_bad_messages_raise_user_error(tok, messages, complaint):
    with pytest.raises(UserError, match=complaint):
        tok.render(messages)


def test_tokenizer_without_chat_tokens(tmp_path):
    """A Llama-style tokenizer directory: <s>/</s>, no pad, no ChatML tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(corpus_lines(200), tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "chat_template": "{{ messages }}"}))
    llama = Tokenizer.load(tmp_path)
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.im_start_id, llama.im_end_id) == (0, 1, None, None, None)
    assert llama.stop_ids == [1] and llama.chat_template == "{{ messages }}"
    # its own template is used (not refused for lacking ChatML tokens), and found unable to end a turn
    with pytest.raises(UserError, match="ends an assistant answer with no special token"):
        llama.render(CONVERSATIONS[0])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(UserError, match="has no chat template .* --chat-template FILE.jinja"):
        Tokenizer.load(tmp_path).render(CONVERSATIONS[0])


# ---- the command -------------------------------------------------------------------------------


def test_cli_trains_on_text_and_jsonl(tmp_path, capsys):
    text_file, jsonl_file = tmp_path / "corpus.txt", tmp_path / "more.jsonl"
    text_file.write_text("".join(corpus_lines(500)), encoding="utf-8")
    jsonl_file.write_text("\n".join(json.dumps({"text": line}) for line in corpus_lines(100)) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(text_file), "--data", str(jsonl_file), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "bytes per token" in capsys.readouterr().out
    assert Tokenizer.load(out).vocab_size == 300
    assert main(["tokenizer", "train", "--data", str(text_file), "--byte-level", "--out", str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", str(text_file), "--byte-level", "--out", str(out), "--force"]) == 0
    assert Tokenizer.load(out).vocab_size == 260 and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "more.jsonl", "tok"]
    (out / "notes.md").write_text("mine")              # --force replaces a tokenizer, never a user's files
    assert main(["tokenizer", "train", "--data", str(text_file), "--byte-level", "--out", str(out), "--force"]) == 2
    assert "holds notes.md, which lmschool did not write" in capsys.readouterr().err
    assert (out / "notes.md").read_text() == "mine" and Tokenizer.load(out).vocab_size == 260


@pytest.mark.parametrize("content, complaint", [
    (None, "no such file"),
    (b"", "holds no text"),
    (b"  \n\n", "holds no text"),
    (b"fine line\ncaf\xe9 latin-1\n", ":2: not UTF-8 text"),
])
def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path, capsys, content, complaint):
    data = tmp_path / "corpus.txt"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and complaint in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ([] if content is None else ["corpus.txt"])


def test_cli_bad_jsonl_line_is_named(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err


def test_every_digit_is_its_own_token(tok):
    """Numbers split into digits (sums become column arithmetic), even when the corpus is full
    of the same two-digit numbers that BPE would otherwise merge."""
    trained = train_tokenizer([f"{a} + {b} = {a + b}." for a in range(10, 99) for b in (11, 47)] * 5, vocab_size=400)
    for t in (tok, trained):
        pieces = [t.decode([i]) for i in t.encode("47 + 38 = 85, 1999", add_special_tokens=False)]
        assert [p.strip() for p in pieces if p.strip().isdigit()] == list("4738851999")
        assert all(len(p.strip()) <= 1 for p in pieces if any(c.isdigit() for c in p))


def test_a_damaged_tokenizer_is_one_clear_error(tmp_path):
    tok = train_tokenizer([], byte_level=True)
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(UserError, match="tokenizer.json cannot be read .*the file is damaged"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, ")
    with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.load(tmp_path)
