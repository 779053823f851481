"""Reward model: Bradley-Terry loss and accuracy on hand-worked numbers, the reward read at the
answer's last token under left and right padding, `transformers` reading our checkpoint to the same
rewards, a tiny model learning a separable preference set to 100% (with the bias centring the
training answers), Spearman with ties by hand, `lmschool score`, and checkpoint kinds and bad
input as clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmschool.checkpoint import load_model, model_extra, save_model
from lmschool.cli import main
from lmschool.data.preference import (Pair, collate_pairs, collate_shared, collate_unique, encode_pair, pair_batch,
                                      read_pairs, response_batch)
from lmschool.errors import UserError
from lmschool.losses.reward import bradley_terry_loss, reward_loss, rewards_at, sequence_rewards
from lmschool.model import ModelConfig, build_model
from lmschool.checkpoint import check_kind
from lmschool.stages.reward import evaluate_pairs, score_responses, spearman
from lmschool.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], byte_level=True)


def tiny_cfg(tok) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=96)


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "model"
    save_model(path, build_model(tiny_cfg(tok), seed=0), tok, extra={"stage": "sft"})
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- the loss ----------------------------------------------------------------------------------

def test_bradley_terry_by_hand():
    """r_c = (2, 0, 1), r_r = (0, 0, 3): deltas 2, 0, -2.
    -log sigma(2) = log(1 + e^-2) = 0.126928; -log sigma(0) = log 2 = 0.693147;
    -log sigma(-2) = log(1 + e^2) = 2.126928. Accuracy: only the first is right (a tie is wrong): 1/3.
    Margin 1: -log sigma(1) = 0.313262, -log sigma(-1) = 1.313262, -log sigma(-3) = 3.048587.
    Centring 0.1 adds 0.1 x (2 + 0)^2 = 0.4, 0, 0.1 x (1 + 3)^2 = 1.6."""
    c, r = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    losses, m = bradley_terry_loss(c, r)
    assert torch.allclose(losses, torch.tensor([0.126928, 0.693147, 2.126928]), atol=1e-6)
    assert float(m["accuracy"]) == pytest.approx(1 / 3) and float(m["margin"]) == pytest.approx(0.0)
    assert float(m["reward_chosen"]) == pytest.approx(1.0) and float(m["reward_rejected"]) == pytest.approx(1.0)
    losses, _ = bradley_terry_loss(c, r, margin=1.0)
    assert torch.allclose(losses, torch.tensor([0.313262, 1.313262, 3.048587]), atol=1e-6)
    losses, _ = bradley_terry_loss(c, r, centring=0.1)
    assert torch.allclose(losses, torch.tensor([0.526928, 0.693147, 3.726928]), atol=1e-6)
    # a per-pair margin, as the data's "margin" column gives
    losses, _ = bradley_terry_loss(c, r, margin=torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(losses, torch.tensor([0.126928, 1.313262, 2.126928]), atol=1e-6)


def test_rewards_at_reads_each_rows_last_token():
    scores = torch.arange(12.0).view(3, 4)            # row b, position t holds 4b + t
    assert rewards_at(scores, torch.tensor([3, 0, 2])).tolist() == [3.0, 4.0, 10.0]


def test_reward_loss_is_the_mean_over_pairs_of_the_batch(tok):
    model = build_model(tiny_cfg(tok), head="score", seed=3).eval()
    pairs = [Pair([{"role": "user", "content": "hi"}], "Hello!", "Go.", {}),
             Pair([{"role": "user", "content": "2+2?"}], "It is 4.", "5", {})]
    batch = pair_batch(tok, pairs, max_len=96)
    with torch.no_grad():
        loss, metrics = reward_loss(model, batch)
        alone = [reward_loss(model, pair_batch(tok, [p], max_len=96))[0] for p in pairs]
        r = sequence_rewards(model, batch)
    assert loss.item() == pytest.approx(sum(a.item() for a in alone) / 2, abs=1e-5)
    expected = sum(math.log1p(math.exp(-(r[i] - r[i + 2]).item())) for i in range(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_one_row_per_distinct_answer_gives_the_same_loss(tok):
    """K = 3 answers to a prompt make C(3, 2) = 3 pairs: 6 rows as chosen/rejected halves, 3 rows
    when each distinct answer is one row (InstructGPT's single forward per completion)."""
    model = build_model(tiny_cfg(tok), head="score", seed=3).eval()
    p = [{"role": "user", "content": "hi"}]
    pairs = [Pair(p, "Hello!", "Go.", {}), Pair(p, "Hello!", "Hm", {}), Pair(p, "Hm", "Go.", {})]
    encoded = [encode_pair(tok, x, 96) for x in pairs]
    halves, unique = collate_pairs(encoded, tok.pad_id), collate_unique(encoded, tok.pad_id)
    assert halves["input_ids"].shape[0] == 6 and unique["input_ids"].shape[0] == 3
    # rows in order of first use: chosen answers first (Hello!, Hm), then Go.
    assert unique["chosen_index"].tolist() == [0, 0, 1] and unique["rejected_index"].tolist() == [2, 1, 2]
    assert halves["num_targets"] == unique["num_targets"] == 3
    with torch.no_grad():
        a, ma = reward_loss(model, halves, margin=0.5, centring=0.1)
        b, mb = reward_loss(model, unique, margin=0.5, centring=0.1)
    assert a.item() == pytest.approx(b.item(), abs=1e-6) and float(ma["accuracy"]) == float(mb["accuracy"])


def test_shared_prompt_rows_give_each_answer_its_own_reward_and_gradient(tok):
    """The prompt once and its three answers as branches (each attending to the prompt and itself):
    every answer's reward, the loss and every gradient are those of a row per answer."""
    model = build_model(tiny_cfg(tok), head="score", seed=3)
    p, q = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "Name a pet."}]
    pairs = [Pair(p, "Hello!", "Go.", {}), Pair(p, "Hello!", "Hm", {}), Pair(p, "Hm", "Go.", {}),
             Pair(q, "A cat.", "No.", {})]
    encoded = [encode_pair(tok, x, 96) for x in pairs]
    unique, shared = collate_unique(encoded, tok.pad_id), collate_shared(encoded, tok.pad_id)
    assert shared["input_ids"].shape[0] == 2 and shared["num_tokens"] < unique["num_tokens"]
    results = []
    for batch in (unique, shared):
        model.zero_grad()
        rewards = sequence_rewards(model, batch)
        loss, _ = reward_loss(model, batch, margin=0.5, centring=0.1)
        loss.backward()
        results.append((rewards[batch["chosen_index"]], rewards[batch["rejected_index"]], loss.item(),
                        [t.grad.clone() for t in model.parameters()]))
    (ca, ra, la, ga), (cb, rb, lb, gb) = results
    torch.testing.assert_close(cb, ca, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rb, ra, atol=1e-5, rtol=1e-5)
    assert lb == pytest.approx(la, abs=1e-6)
    assert all(torch.allclose(b, a, atol=1e-6) for a, b in zip(ga, gb))


# ---- where the reward is read ------------------------------------------------------------------------

PROMPTS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "What is two plus two?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a pet."}]]
RESPONSES = ["Hello there, friend.", "Four.", "A cat."]


def left_padded(batch: dict) -> dict:
    """`batch`'s right-padded rows moved to the right end (the pads, still pad ids, on the left),
    with position_ids counting real tokens only, segment_ids -1 at the pads (from which the model
    builds its mask), and every last_index T - 1."""
    T = batch["input_ids"].shape[1]
    lengths = batch["last_index"] + 1                                        # (B,)
    shift = T - lengths                                                      # (B,)
    index = (torch.arange(T)[None, :] - shift[:, None]) % T                  # (B, T) gather right -> left
    valid = torch.arange(T)[None, :] >= shift[:, None]                       # (B, T)
    return {"input_ids": batch["input_ids"].gather(1, index),
            "position_ids": (valid.long().cumsum(-1) - 1).clamp(min=0),      # (B, T)
            "segment_ids": torch.where(valid, 0, -1),                        # (B, T)
            "last_index": torch.full_like(lengths, T - 1)}


def test_reward_read_at_the_last_token_with_left_and_right_padding(tok):
    model = build_model(tiny_cfg(tok), head="score", seed=4).eval()
    with torch.no_grad():
        alone = []
        for p, r in zip(PROMPTS, RESPONSES):
            single = response_batch(tok, [p], [r], max_len=96)
            assert single["input_ids"][0, -1] == tok.im_end_id          # no padding: the last token
            alone.append(model(single["input_ids"])[0, -1])
        alone = torch.stack(alone)
        right = response_batch(tok, PROMPTS, RESPONSES, max_len=96)
        left = left_padded(right)
        assert (right["input_ids"][torch.arange(3), right["last_index"]] == tok.im_end_id).all()
        assert (right["input_ids"] == tok.pad_id).any() and (left["input_ids"] == tok.pad_id).any()
        assert torch.allclose(sequence_rewards(model, right), alone, atol=1e-5)
        assert torch.allclose(sequence_rewards(model, left), alone, atol=1e-5)
        # the score at the last padded position of a right-padded row is something else
        T = right["input_ids"].shape[1]
        padded_row = int((right["last_index"] < T - 1).nonzero()[0])
        assert not torch.allclose(model(right["input_ids"])[padded_row, -1], alone[padded_row], atol=1e-3)


def test_transformers_reads_our_reward_checkpoint_to_the_same_rewards(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = build_model(tiny_cfg(tok), head="score", seed=5).eval()
    save_model(tmp_path / "rm", model, tok, extra={"kind": "reward", "reward_bias": 0.25})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == tok.pad_id
    pairs = [Pair(p, r, r + " Yes.", {}) for p, r in zip(PROMPTS, RESPONSES)]
    batch = pair_batch(tok, pairs, max_len=96)                                  # right-padded, 6 rows
    with torch.no_grad():
        ours = sequence_rewards(model, batch)
        theirs = hf(batch["input_ids"]).logits[:, 0]     # pooled at each row's last non-pad token
        assert (ours - theirs).abs().max().item() <= 1e-4
        left = left_padded(response_batch(tok, PROMPTS, RESPONSES, max_len=96))
        valid = (left["segment_ids"] == 0).long()
        theirs = hf(left["input_ids"], attention_mask=valid, position_ids=left["position_ids"]).logits[:, 0]
        assert (sequence_rewards(model, left) - theirs).abs().max().item() <= 1e-4
    # the bias is ours to subtract: score_responses applies it
    got = score_responses(model, tok, PROMPTS, RESPONSES, bias=0.25)
    assert torch.allclose(torch.tensor(got), ours[:3] - 0.25, atol=1e-5)


# ---- evaluation figures ------------------------------------------------------------------------

def test_spearman_with_ties_by_hand():
    """x = (1, 2, 2, 3) ranks (1, 2.5, 2.5, 4); y = (1, 3, 2, 4) ranks (1, 3, 2, 4). Centred:
    (-1.5, 0, 0, 1.5) and (-1.5, 0.5, -0.5, 1.5); covariance sum 4.5, squares 4.5 and 5:
    rho = 4.5 / sqrt(22.5) = 0.948683."""
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.948683, abs=1e-6)
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


def test_evaluate_pairs_by_hand():
    """Three pairs; the model puts chosen above rejected in pairs 0 and 2 (rater accuracy 2/3).
    Noise-free labels: pair 0 gold (the rater was right), pair 1 not gold (the rater was wrong, and
    the model sided with the teacher), pair 2 from its scores 0.2 < 0.6 (not gold): noise-free
    accuracy = (right, right, wrong) = 2/3."""
    p = [{"role": "user", "content": "q"}]
    pairs = [Pair(p, "a", "b", {"category": "x", "gold_chosen": True}),
             Pair(p, "c", "d", {"category": "x", "gold_chosen": False}),
             Pair(p, "e", "f", {"category": "y", "score_chosen": 0.2, "score_rejected": 0.6})]
    figures = evaluate_pairs(pairs, torch.tensor([1.0, 0.0, 0.5]).numpy(), torch.tensor([0.0, 1.0, 0.1]).numpy())
    assert figures["accuracy_rater"] == pytest.approx(2 / 3) and figures["accuracy_noise_free"] == pytest.approx(2 / 3)
    assert figures["accuracy_by_category"]["x"] == {"pairs": 2, "rater": 0.5, "noise_free": 1.0}
    assert figures["accuracy_by_category"]["y"] == {"pairs": 1, "rater": 1.0, "noise_free": 0.0}
    assert figures["correlation_answers"] == 2 and figures["teacher_rank_correlation"] is None  # 2 points


# ---- the command -------------------------------------------------------------------------------

TRAIN = ["batch_size=4", "lr=3e-3", "warmup_steps=2", "epochs=6", "save_every=0", "log_every=1", "threads=1",
         "precision=fp32", "device=cpu", "eval_batch_size=8"]


def separable(n_train=24, n_test=6):
    """Polite answers preferred to rude ones, asked in many ways: the first answer token decides."""
    lines = []
    for i in range(n_train + n_test):
        lines.append({"prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                      "chosen": [{"role": "assistant", "content": f"Sure, it is {2 * i}."}],
                      "rejected": [{"role": "assistant", "content": f"No! Go away {i}."}],
                      "category": "even" if i % 2 == 0 else "odd",
                      "split": "test" if i >= n_train else "train", "gold_chosen": True,
                      "score_chosen": 1.0 - 0.01 * i, "score_rejected": 0.3 - 0.01 * i})
    return lines


def test_reward_learns_a_separable_set_to_100_percent(tok, policy, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", separable())
    out = tmp_path / "rm"
    assert main(["reward", "--init", str(policy), "--data", str(data), "--out", str(out), *TRAIN]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_rater"] == 1.0 and summary["accuracy_noise_free"] == 1.0
    assert summary["test_pairs"] == 6 and summary["train_pairs"] == 24 and summary["test_split"] == "file"
    assert summary["teacher_rank_correlation"] > 0.7
    assert summary["accuracy_by_category"]["odd"]["rater"] == 1.0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["train_loss"] < first["loss"]
    # a reward checkpoint: kind and bias in config.json, loadable with the scalar head
    extra = model_extra(out)
    assert extra["kind"] == "reward" and extra["reward_bias"] == summary["reward_bias"] != 0.0
    rm = load_model(out, head="score")
    train = read_pairs(data, split="train")
    prompts = [p.prompt for p in train for _ in range(2)]
    answers = [a for p in train for a in (p.chosen, p.rejected)]
    rewards = score_responses(rm, tok, prompts, answers, bias=extra["reward_bias"])
    assert abs(sum(rewards) / len(rewards)) < 1e-4                     # the training answers average 0
    assert all(rewards[i] > rewards[i + 1] for i in range(0, len(rewards), 2))
    # `lmschool score` prints the same reward
    capsys.readouterr()
    assert main(["score", str(out), "--prompt", train[0].prompt[0]["content"], "--response", train[0].chosen]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(rewards[0], abs=1e-4)
    # transformers reads the trained checkpoint to the same raw scores
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    batch = pair_batch(tok, read_pairs(data, split="test"), max_len=96)
    with torch.no_grad():
        diff = sequence_rewards(rm, batch) - hf(batch["input_ids"]).logits[:, 0]
    assert diff.abs().max().item() <= 1e-4
    # the finished run is not redone, and a second run does not overwrite it
    assert main(["reward", "--init", str(policy), "--data", str(data), "--out", str(out), "--resume", *TRAIN]) == 0
    assert main(["reward", "--init", str(policy), "--data", str(data), "--out", str(out), *TRAIN]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_without_a_test_split_groups_are_held_out(tok, policy, tmp_path):
    lines = [{k: v for k, v in line.items() if k != "split"} for line in separable(20, 0)]
    data = write_jsonl(tmp_path / "prefs.jsonl", lines)
    out = tmp_path / "rm"
    overrides = [o for o in TRAIN if not o.startswith("epochs")] + ["max_steps=2", "test_fraction=0.2"]
    assert main(["reward", "--init", str(policy), "--data", str(data), "--out", str(out), *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_pairs"] == 4 and summary["train_pairs"] == 16 and summary["steps"] == 2


def test_checkpoint_kinds_are_checked(tok, policy, tmp_path, capsys):
    rm = tmp_path / "rm"
    save_model(rm, build_model(tiny_cfg(tok), head="score"), tok, extra={"kind": "reward", "reward_bias": 0.0})
    check_kind(policy, "policy")
    check_kind(rm, "reward")
    with pytest.raises(UserError, match="is a reward model .* needs a policy"):
        check_kind(rm, "policy", "--init")
    with pytest.raises(UserError, match="is a policy .* needs a reward model"):
        check_kind(policy, "reward")
    data = write_jsonl(tmp_path / "prefs.jsonl", separable(4, 0))
    assert main(["reward", "--init", str(rm), "--data", str(data), "--out", str(tmp_path / "out"), *TRAIN]) == 2
    assert "--init needs a policy" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["score", str(policy), "--prompt", "hi", "--response", "Hello."]) == 2
    assert "needs a reward model" in capsys.readouterr().err


def test_bad_preference_line_is_a_file_line_error_and_nothing_is_written(policy, tmp_path, capsys):
    lines = separable(4, 0)
    lines[2]["rejected"] = lines[2]["chosen"]
    data = write_jsonl(tmp_path / "prefs.jsonl", lines)
    out = tmp_path / "out"
    assert main(["reward", "--init", str(policy), "--data", str(data), "--out", str(out), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3" in err and "the same answer" in err and not out.exists()
    assert main(["reward", "--init", str(policy), "--data", str(data), "--out", str(out), "margin=-1"]) == 2
    assert "margin" in capsys.readouterr().err
