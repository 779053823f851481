"""Reading rows one way (lmschool/data/jsonl.py) and prompts one way (lmschool/data/prompts.py)."""

import json

import pytest

from lmschool.data.jsonl import check_conversation, read_jsonl
from lmschool.data.prompts import encode_prompts, read_prompts
from lmschool.errors import DataError
from lmschool.tokenizer import train_tokenizer


def write(tmp_path, *rows, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f


def test_read_jsonl_gives_file_and_line(tmp_path):
    f = write(tmp_path, {"a": 1}, "", {"b": 2})
    assert list(read_jsonl(f, "x")) == [(f"{f}:1", {"a": 1}), (f"{f}:3", {"b": 2})]


@pytest.mark.parametrize("line, message", [
    ("{oops", r"p.jsonl:1: not valid JSON \(.* at column 2\); expected X"),
    ("[1, 2]", r"p.jsonl:1: expected X, got \[1, 2\]"),
])
def test_read_jsonl_errors(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        list(read_jsonl(write(tmp_path, line), "expected X"))


def test_check_conversation():
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    assert check_conversation(ok, "f:1") == ok
    with pytest.raises(DataError, match="f:1: message 1 \\(assistant\\) has empty content"):
        check_conversation([ok[0], {"role": "assistant", "content": " "}], "f:1")
    with pytest.raises(DataError, match="f:1: the conversation has no assistant turn"):
        check_conversation(ok[:1], "f:1")
    assert check_conversation(ok[:1], "f:1", need_assistant=False) == ok[:1]


def test_read_prompts_forms(tmp_path):
    f = write(tmp_path, {"prompt": "What is 2 plus 2?", "category": "sums"},
              {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
              {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    a, b, c = read_prompts(f)
    assert a == {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "category": "sums", "where": f"{f}:1"}
    assert [m["role"] for m in b["prompt"]] == ["system", "user"]
    assert c["prompt"] == [{"role": "user", "content": "Hi"}] and c["reference"] == "Hello!"


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, r"p.jsonl:1: expected \{\"prompt\".*this line has keys \['text'\]"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "p.jsonl:1: the prompt's last turn is assistant; it must end with the user turn"),
    ({"messages": [{"role": "system", "content": "a"}]}, "p.jsonl:1: the conversation has no user turn"),
])
def test_read_prompts_errors(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        read_prompts(write(tmp_path, row))


def test_an_empty_prompt_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="p.jsonl: holds no prompts"):
        read_prompts(write(tmp_path, ""))


def test_encode_prompts_renders_the_chat_template_and_checks_room(tmp_path):
    tok = train_tokenizer([], byte_level=True)
    rows = read_prompts(write(tmp_path, {"prompt": "Hi"}))
    (ids,) = encode_prompts(rows, tok, context=64, max_new_tokens=8)
    assert ids == tok.render(rows[0]["prompt"], add_generation_prompt=True)[0]
    with pytest.raises(DataError, match=f"p.jsonl:1: the prompt is {len(ids)} tokens; with max_new_tokens=60"):
        encode_prompts(rows, tok, context=64, max_new_tokens=60)
