"""Preference data: both TRL forms read to the same pairs, splits, bad lines at file:line, the token
layout of a pair batch worked out by hand on the byte tokenizer, prompt cut from the left, left =
right padding, and batches as a pure function of the step that keep a prompt's pairs together."""

from __future__ import annotations

import json

import pytest
import torch

from lmschool.data.preference import (Pair, PairBatches, encode_response, pair_batch, read_pairs,
                                      response_batch)
from lmschool.errors import DataError
from lmschool.losses.lm import IGNORE, token_nll
from lmschool.model import ModelConfig, build_model
from lmschool.tokenizer import IM_END, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], byte_level=True)  # byte b has id 4 + b: hand-checkable


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


USER = [{"role": "user", "content": "hi"}]


def conv(prompt, chosen, rejected, **meta):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **meta}


def test_standard_and_conversational_forms_read_the_same(tmp_path):
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "hi", "chosen": "Hello!", "rejected": "Go away.",
                                                "category": "smalltalk"}, ""])
    con = write_jsonl(tmp_path / "con.jsonl", [conv(USER, "Hello!", "Go away.", category="smalltalk")])
    a, b = read_pairs(std), read_pairs(con)
    assert len(a) == len(b) == 1
    assert (a[0].prompt, a[0].chosen, a[0].rejected) == (b[0].prompt, b[0].chosen, b[0].rejected) == \
        (USER, "Hello!", "Go away.")
    assert a[0].meta == {"category": "smalltalk", "where": f"{std}:1"}
    assert b[0].split == "train" and b[0].group == json.dumps(USER, sort_keys=True)


def test_splits_and_groups(tmp_path):
    system = [{"role": "system", "content": "Be kind."}, *USER]
    path = write_jsonl(tmp_path / "p.jsonl", [
        conv(USER, "a", "b", split="test", group=7), conv(system, "c", "d"), conv(USER, "e", "f", split="train")])
    assert [p.chosen for p in read_pairs(path)] == ["a", "c", "e"]
    assert [p.chosen for p in read_pairs(path, split="train")] == ["c", "e"]     # no split = train
    assert [p.chosen for p in read_pairs(path, split="test")] == ["a"]
    assert read_pairs(path)[0].group == "7" and read_pairs(path)[1].prompt == system


@pytest.mark.parametrize("line, message", [
    ({"prompt": "hi", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, '"chosen" is empty'),
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}, "empty content"),
    ({"prompt": "hi", "chosen": "Same.", "rejected": "Same. "}, "the same answer"),
    ({"prompt": [{"role": "system", "content": "Be kind."}], "chosen": "a", "rejected": "b"}, "no user turn"),
    ({"prompt": [*USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "must end with"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant's answer"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "split": "dev"}, "split"),
    ({"prompt": "hi", "chosen": "a <|im_end|>", "rejected": "b"}, "special token"),
    ("[1, 2]", "expected"),
    ("{not json", "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError, match=message) as e:
        read_pairs(path)
    assert f"{path}:2" in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no preference pairs"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


def test_encode_response_is_the_rendered_conversation(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    ids, prompt_len = encode_response(tok, prompt, "It is 4.")
    full, mask = tok.render(prompt + [{"role": "assistant", "content": "It is 4."}])
    assert ids == full[:-1]                                  # all but the template's closing "\n"
    assert tok.decode(ids[prompt_len:]) == f"It is 4.{IM_END}" and ids[-1] == tok.im_end_id
    assert mask[prompt_len:-1] == [1] * (len(ids) - prompt_len) and not any(mask[:prompt_len])


def test_pair_batch_layout_by_hand(tok):
    """Prompt "hi" renders as "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n":
    1 + 5 + 2 + 1 + 1 + 1 + 10 = 21 byte-level ids. Chosen "ok" -> 21 + 2 + 1 = 24 ids; rejected
    "nope" -> 21 + 4 + 1 = 26 ids. Rows: [chosen, rejected], T = 26; labels hold the response
    tokens one position early (positions 20..22 and 20..24)."""
    batch = pair_batch(tok, [Pair(USER, "ok", "nope", {})], max_len=64)
    ids = batch["input_ids"]
    assert ids.shape == (2, 26) and batch["num_targets"] == 1 and batch["num_tokens"] == 50
    assert batch["last_index"].tolist() == [23, 25] and batch["response_len"].tolist() == [3, 5]
    assert ids[0, 24:].tolist() == [tok.pad_id] * 2                                 # right padding
    assert ids[0, 23] == ids[1, 25] == tok.im_end_id
    labels = batch["labels"]
    assert (labels[0] != IGNORE).nonzero().squeeze(1).tolist() == [20, 21, 22]
    assert (labels[1] != IGNORE).nonzero().squeeze(1).tolist() == [20, 21, 22, 23, 24]
    assert tok.decode(labels[0][labels[0] != IGNORE].tolist()) == f"ok{IM_END}"
    assert tok.decode(labels[1][labels[1] != IGNORE].tolist()) == f"nope{IM_END}"
    # labels[t] = input_ids[t + 1]: so -token_nll summed is the response's log-prob
    on = labels != IGNORE
    assert torch.equal(labels[:, :-1][on[:, :-1]], ids[:, 1:][on[:, :-1]])


def test_long_prompts_lose_their_start_and_answers_are_never_cut(tok):
    long_prompt = [{"role": "user", "content": "x" * 50}]
    full, prompt_len = encode_response(tok, long_prompt, "yes")           # 69 + 3 + 1 = 73 ids
    batch = pair_batch(tok, [Pair(long_prompt, "yes", "no", {"where": "f:3"})], max_len=40)
    assert batch["input_ids"].shape == (2, 40)
    assert batch["input_ids"][0].tolist() == full[-40:]                   # the prompt's end kept
    assert batch["response_len"].tolist() == [4, 3]
    with pytest.raises(DataError, match="f:3: an answer is 41 tokens"):
        pair_batch(tok, [Pair(USER, "y" * 40, "no", {"where": "f:3"})], max_len=40)


def test_right_padding_gives_the_same_response_logprobs_as_one_at_a_time(tok):
    """(Left padding, with position ids and a mask, is the model's to handle: test_model.py.)"""
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=96),
                        seed=1).eval()
    prompts = [USER, [{"role": "user", "content": "What is two plus two?"}], USER]
    responses = ["Hello there, friend.", "Four.", "Hi!"]

    def logprobs(batch):
        with torch.no_grad():
            logits = model(batch["input_ids"])
        return -token_nll(logits, batch["labels"]).sum(1)                              # (B,)

    right = response_batch(tok, prompts, responses, max_len=96)
    alone = torch.cat([logprobs(response_batch(tok, [p], [r], max_len=96)) for p, r in zip(prompts, responses)])
    assert (right["input_ids"][torch.arange(3), right["last_index"]] == tok.im_end_id).all()
    assert (right["input_ids"][2, right["last_index"][2] + 1:] == tok.pad_id).any()     # row 2 is padded
    assert torch.allclose(logprobs(right), alone, atol=1e-4)


def pairs_in_groups(sizes):
    pairs = []
    for g, n in enumerate(sizes):
        for k in range(n):
            pairs.append(Pair(USER, f"good {g} {k}", f"bad {g} {k}", {"group": g}))
    return pairs


def test_batches_keep_groups_together_and_are_a_pure_function_of_the_step(tok):
    sizes = [6, 6, 3, 6, 1, 6, 6, 2, 6, 6]                                    # 48 pairs in 10 groups
    pairs = pairs_in_groups(sizes)
    data = PairBatches(pairs, tok, batch_size=12, max_len=64, seed=0)
    layout = data.layout(0)
    assert sorted(i for b in layout for i in b) == list(range(48))            # each pair once
    assert all(len(b) <= 12 for b in layout)
    group_of = [p.meta["group"] for p in pairs]
    for g in range(len(sizes)):                                               # each group in one batch
        assert sum(any(group_of[i] == g for i in b) for b in layout) == 1
    per_epoch = data.steps_per_epoch(2)
    assert per_epoch == len(layout) // 2
    first = [data.micro_batches(s, 2, 0, 1) for s in range(2 * per_epoch)]
    again = [data.micro_batches(s, 2, 0, 1) for s in reversed(range(2 * per_epoch))][::-1]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for x, y in zip(first, again) for a, b in zip(x, y))
    assert data.layout(1) != layout                                           # a new order each epoch
    # two ranks with one micro-batch each see what one process with two micro-batches sees
    ranks = [data.micro_batches(3, 1, r, 2)[0] for r in range(2)]
    one = data.micro_batches(3, 2, 0, 1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ranks, one))
    # a group larger than batch_size is cut; without grouping, pairs are shuffled one by one
    assert max(len(b) for b in PairBatches(pairs_in_groups([20]), tok, 8, 64).layout(0)) == 8
    loose = PairBatches(pairs, tok, batch_size=12, max_len=64, group_batches=False).layout(0)
    assert sum(len({group_of[i] for i in b}) for b in loose) > sum(len({group_of[i] for i in b}) for b in layout)
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        data.steps_per_epoch(len(layout) + 1)


def test_length_bucketing_pads_less_and_keeps_every_pair(tok):
    """Groups alternate between short answers (2 letters) and long ones (60): bucketed batches
    hold one kind each, so they pad far less than batches of a random order."""
    pairs = [Pair(USER, ("ab" if g % 2 else "x" * 60) + f" {k}", ("cd" if g % 2 else "y" * 60) + f" {g}",
                  {"group": g}) for g in range(40) for k in range(3)]

    def padding(bucket):
        data = PairBatches(pairs, tok, batch_size=6, max_len=128, bucket_batches=bucket)
        layout = data.layout(0)
        assert sorted(i for b in layout for i in b) == list(range(120))
        batches = [data.collate(b) for b in layout]
        return sum(b["input_ids"].numel() - b["num_tokens"] for b in batches)
    assert padding(8) < 0.5 * padding(1)
