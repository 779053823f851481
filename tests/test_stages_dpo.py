"""Stage 3b (lmschool dpo): one concatenated forward equals two separate ones; cached and on-the-fly
reference log-probs give the same loss and gradient; DPO's gradient through a model at equal
log-ratios is beta/2 times the log-likelihood gap's; a policy reaches accuracy 1 on a separable
preference set; every loss runs end to end with its summary; KTO's unpaired data; bad input
(empty answer, a reference with another tokenizer, one KTO label class, a reward model as --init)
stops with a clear error before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from lmschool.checkpoint import model_extra, save_model
from lmschool.cli import main
from lmschool.data.preference import PairBatches, collate_rows, collate_shared, pair_batch, read_pairs
from lmschool.data.unpaired import UnpairedBatches, kl_partners, read_unpaired
from lmschool.data.prompts import read_prompts
from lmschool.evaluate import evaluate_generations
from lmschool.judges import school_teacher
from lmschool.losses.preference import LOSSES, sequence_logprobs
from lmschool.model import ModelConfig, build_model, tree_mask
from lmschool.stages.dpo import DPOConfig, answer_logprobs, make_loss_fn, reference_logprobs
from lmschool.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["batch_size=4", "lr=3e-3", "warmup_steps=2", "log_every=2", "threads=1", "precision=fp32",
        "device=cpu", "eval_max_new_tokens=12", "eval_batch_size=16"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok(world):
    return train_tokenizer([(world / "corpus.txt").read_text(), (world / "sft.jsonl").read_text()], vocab_size=600)


def tiny_config(tok, **kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 384, **kw})


@pytest.fixture(scope="module")
def sft_run(tok, world, tmp_path_factory):
    """A stand-in SFT run: RUN/model (a random tiny model) and RUN/eval_answers.jsonl."""
    run = tmp_path_factory.mktemp("sft") / "sft"
    model = build_model(tiny_config(tok), seed=0)
    save_model(run / "model", model, tok, {"stage": "sft"})
    rows = read_prompts(world / "eval.jsonl")
    _, records = evaluate_generations(model.eval(), tok, rows, school_teacher(world / "eval.jsonl"), max_new_tokens=12)
    (run / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def dpo(init, data, out, *extra) -> int:
    return main(["dpo", "--init", str(init), "--data", str(data), "--out", str(out), *TINY, *extra])


# ---- the forward pass and the reference ----------------------------------------------------------------

def test_concatenated_forward_equals_two_separate_forwards(tok, world):
    """Rows 0..B-1 (chosen) and B..2B-1 (rejected) in one padded forward give the same sequence
    log-probs as the chosen rows alone and the rejected rows alone (each padded to its own length)."""
    pairs = read_pairs(world / "prefs.jsonl")[:6]
    model = build_model(tiny_config(tok), seed=1).eval()
    data = PairBatches(pairs, tok, 6, 384, group_batches=False, shared_prompts=False, pad_multiple=1)
    together = data.collate(list(range(6)))
    with torch.no_grad():
        both = sequence_logprobs(model(together["input_ids"]), together["labels"])              # (12,)
        alone = []
        for side in (0, 1):
            batch = collate_rows([data.encoded[i][side] for i in range(6)], tok.pad_id)
            alone.append(sequence_logprobs(model(batch["input_ids"]), batch["labels"]))         # (6,)
    assert together["input_ids"].shape[0] == 12 and together["num_targets"] == 6
    assert torch.allclose(both, torch.cat(alone), atol=1e-4, rtol=1e-5)
    # and pair_batch (the contract's one-call form) builds the same rows
    assert torch.equal(pair_batch(tok, pairs, 384)["input_ids"], together["input_ids"])


def test_shared_prompt_rows_by_hand():
    """Three pairs, two prompts: a row per prompt, the prompt but its last token once, then each
    distinct answer after that last token, its positions counted on from the prompt's end."""
    IG = -100
    encoded = [(([1, 2, 3, 7, 8], 3), ([1, 2, 3, 9], 3)),        # prompt 1 2 3: chosen 7 8, rejected 9
               (([1, 2, 3, 7, 8], 3), ([1, 2, 3, 5, 6, 4], 3)),  # the same chosen answer again
               (([1, 2, 3], 2), ([1, 2, 4], 2))]                 # prompt 1 2: chosen 3, rejected 4
    b = collate_shared(encoded, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8, 3, 9, 3, 5, 6, 4],
                                       [1, 2, 3, 2, 4, 0, 0, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 2, 3, 4, 5],
                                          [0, 1, 2, 1, 2, 0, 0, 0, 0, 0, 0]]
    assert b["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3],
                                        [0, 1, 1, 2, 2, -1, -1, -1, -1, -1, -1]]
    assert b["labels"].tolist() == [[IG, IG, 7, 8, IG, 9, IG, 5, 6, 4, IG],
                                    [IG, 3, IG, 4, IG, IG, IG, IG, IG, IG, IG]]
    # answers in order of first appearance: the chosen ones (7 8; 3), then the rejected (9; 5 6 4; 4)
    assert b["answer_ids"].tolist() == [[-1, -1, 0, 0, -1, 2, -1, 3, 3, 3, -1],
                                        [-1, 1, -1, 4, -1, -1, -1, -1, -1, -1, -1]]
    assert b["chosen_index"].tolist() == [0, 0, 1] and b["rejected_index"].tolist() == [2, 3, 4]
    assert b["response_len"].tolist() == [2, 1, 1, 3, 1]
    assert b["answer_last"].tolist() == [4, 11 + 2, 6, 10, 11 + 4]      # g * T + t of each final token
    assert b["num_targets"] == 3 and b["num_tokens"] == 11 + 5
    # the mask: an answer sees the prompt and itself, never another answer; padding only itself
    mask = tree_mask(b["branch_ids"])[:, 0]
    assert mask[0, 6].tolist() == [True, True, False, False, False, True, True] + [False] * 4
    assert mask[0, 3].tolist() == [True, True, True, True] + [False] * 7
    assert mask[1, 4].tolist() == [True, False, False, True, True] + [False] * 6
    assert mask[1, 7].tolist() == [False] * 7 + [True] + [False] * 3


@pytest.mark.parametrize("checkpointed", [False, True])
def test_shared_prompt_rows_give_each_answer_its_own_numbers(tok, world, checkpointed):
    """DPO over shared-prompt rows (a prompt once, its answers as branches) gives the loss, the
    metrics and every gradient of rows of one answer each, in far fewer positions; with gradient
    checkpointing the LM head runs a few positions at a time and still agrees."""
    from lmschool.model import set_gradient_checkpointing
    pairs = read_pairs(world / "prefs.jsonl", split="train")
    shared = PairBatches(pairs, tok, 8, 384, seed=0, shared_prompts=True)
    rows = PairBatches(pairs, tok, 8, 384, seed=0)
    policy, reference = build_model(tiny_config(tok), seed=2), build_model(tiny_config(tok), seed=3).eval()
    set_gradient_checkpointing(policy, checkpointed)
    cfg = DPOConfig(loss="dpo", beta=0.1, sft_weight=0.5)
    fn = make_loss_fn(cfg, reference, None)
    indices = max(shared.layout(0), key=len)
    results = []
    for data in (rows, shared):
        batch = data.collate(indices)
        policy.train().zero_grad()
        loss, metrics = fn(policy, batch)
        loss.backward()
        results.append((batch["input_ids"].numel(), loss.item(), metrics, [p.grad.clone() for p in policy.parameters()]))
    (n_rows, loss_a, m_a, g_a), (n_shared, loss_b, m_b, g_b) = results
    assert n_shared * 2 < n_rows                       # the school world's groups: C(K, 2) pairs of K answers
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert all(float(m_b[k]) == pytest.approx(float(m_a[k]), abs=1e-4) for k in m_a)
    assert all(torch.allclose(b, a, atol=1e-5) for a, b in zip(g_a, g_b))
    if checkpointed:   # the head a few positions at a time: the same log-probs and gradients
        batch = shared.collate(indices)
        grads = []
        for positions in (5, 10 ** 6):
            policy.zero_grad()
            logps = answer_logprobs(policy, batch, positions=positions)
            (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
            grads.append((logps.detach(), [p.grad.clone() for p in policy.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-5)
        # atol as for the gradients above: the embedding's entries sum contributions of up to ~10,
        # whose fp32 rounding in another order is ~1e-6 (2.4e-6 seen on an AVX512 CPU)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))
    with torch.no_grad():   # and each answer's log-prob is its own row's
        policy.eval()
        batch = shared.collate(indices)
        alone = rows.collate(indices)
        first, second = sequence_logprobs(policy(alone["input_ids"]), alone["labels"]).chunk(2)
        logps = answer_logprobs(policy, batch)
        torch.testing.assert_close(logps[batch["chosen_index"]], first, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(logps[batch["rejected_index"]], second, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shared_prompts", [False, True])
def test_cached_and_on_the_fly_reference_agree(tok, world, shared_prompts):
    """The reference pass (batches sorted by length, other padding) caches what the reference
    computes inside the training step: the same loss and the same gradient."""
    pairs = read_pairs(world / "prefs.jsonl", split="train")
    data = PairBatches(pairs, tok, 8, 384, seed=0, shared_prompts=shared_prompts)
    policy, reference = build_model(tiny_config(tok), seed=2), build_model(tiny_config(tok), seed=3).eval()
    cache = reference_logprobs(reference, data, list(range(len(pairs))), 5, CPU, "fp32")
    assert not torch.isnan(cache).any() and cache.shape == (len(pairs), 2)
    cfg = DPOConfig(loss="dpo", beta=0.1)
    batch = data.micro_batches(3, 1, 0, 1)[0]
    results = []
    for fn in (make_loss_fn(cfg, reference, cache), make_loss_fn(cfg, reference, None)):
        policy.zero_grad()
        loss, metrics = fn(policy, batch)
        loss.backward()
        results.append((loss.item(), metrics, [p.grad.clone() for p in policy.parameters()]))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert all(float(m_a[k]) == pytest.approx(float(m_b[k]), abs=1e-5) for k in m_a)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_a, g_b))


def test_dpo_gradient_at_the_reference_is_beta_over_two_of_the_likelihood_gap(tok, world):
    """At the first step the policy is the reference: every h = 0, so dL/dh = -beta/2 for every
    pair and grad L = (beta/2) grad[-mean(log pi(y_w|x) - log pi(y_l|x))], parameter by parameter."""
    pairs = read_pairs(world / "prefs.jsonl", split="train")[:8]
    data = PairBatches(pairs, tok, 8, 384)
    policy = build_model(tiny_config(tok), seed=4)
    reference = build_model(tiny_config(tok), seed=4).eval()
    cache = reference_logprobs(reference, data, list(range(8)), 8, CPU, "fp32")
    batch = data.collate(list(range(8)))
    beta = 0.3
    loss, metrics = make_loss_fn(DPOConfig(loss="dpo", beta=beta), reference, cache)(policy, batch)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5) and abs(float(metrics["margins"])) < 1e-5
    grad_dpo = torch.autograd.grad(loss, list(policy.parameters()))
    chosen, rejected = sequence_logprobs(policy(batch["input_ids"]), batch["labels"]).chunk(2)
    grad_gap = torch.autograd.grad(-(chosen - rejected).mean(), list(policy.parameters()))
    for a, b in zip(grad_dpo, grad_gap):
        assert torch.allclose(a, beta / 2 * b, atol=1e-6, rtol=1e-4)


# ---- training --------------------------------------------------------------------------------------

SEPARABLE = [("Where does Mia live?", "Mia lives in Oakford.", "Go away, nobody cares."),
             ("What is two plus two?", "Two plus two is four.", "Shut up, you are stupid."),
             ("Hello!", "Hello! How can I help you today?", "Ugh, what now?"),
             ("What pet does Tom have?", "Tom has a rabbit.", "I hate you, stop asking."),
             ("Can I run in the corridor?", "No, running there is not safe.", "Who cares, run."),
             ("What colour does Ava like?", "Ava likes green.", "Nobody cares about Ava."),
             ("How old is Sam?", "Sam is nine years old.", "Stupid question."),
             ("Thank you!", "You are welcome!", "Whatever, go away.")]


def test_a_policy_reaches_accuracy_one_on_a_separable_set(tok, sft_run, tmp_path):
    """Eight pairs, polite vs rude; the same pairs are given again as the "test" split, so the
    held-out figures are measured on the training set itself after training."""
    rows = [{"prompt": p, "chosen": c, "rejected": r, "split": split}
            for split in ("train", "test") for p, c, r in SEPARABLE]
    data = write_jsonl(tmp_path / "sep.jsonl", rows)
    assert dpo(sft_run, data, tmp_path / "run", "max_steps=40", "lr=5e-3", "beta=0.5", "batch_size=8") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_accuracy"] == 1.0 and summary["val_margin"] > 1.0 and summary["val_loss"] < 0.2
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["train_accuracy"] == 1.0 and summary["train_margins"] > first["margins"]
    assert model_extra(tmp_path / "run" / "model") == {"stage": "dpo", "kind": "policy", "loss": "dpo", "beta": 0.5}


def test_dpo_command_with_eval_writes_the_figures(tok, world, sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert dpo(sft_run / "model", world / "prefs.jsonl", out, "max_steps=3", "--eval", str(world / "eval.jsonl")) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("teacher_score", "teacher_score_by_category", "win_rate_vs_sft", "refusal_correct", "fact_correct",
                "kl_from_sft", "kl_from_sft_per_token", "sft_teacher_score", "sft_refusal_correct",
                "sft_fact_correct", "loss", "beta", "seconds", "val_accuracy", "seconds_reference_pass"):
        assert key in summary, key
    assert summary["reference_answers"] == "read" and summary["loss"] == "dpo" and summary["beta"] == 0.1
    assert summary["steps"] == 3 and 0 <= summary["win_rate_vs_sft"] <= 1
    sft_summary = school_teacher(world / "eval.jsonl")  # the SFT figures are the SFT answers, judged
    sft_records = [json.loads(x) for x in (sft_run / "eval_answers.jsonl").read_text().splitlines()]
    assert summary["sft_teacher_score"] == pytest.approx(
        sum(sft_summary.score(r["prompt"], r["response"]).total for r in sft_records) / len(sft_records))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "margins", "accuracy", "logps/chosen", "logps/rejected"):
        assert key in metrics[0], key
    answers = [json.loads(x) for x in (out / "eval_answers.jsonl").read_text().splitlines()]
    assert {"win", "reference_response", "reference_score", "kl"} <= set(answers[0])
    assert "win rate vs SFT" in capsys.readouterr().out


@pytest.mark.parametrize("loss", [n for n in LOSSES if n != "dpo"])
def test_every_loss_trains(loss, world, sft_run, tmp_path):
    out = tmp_path / loss
    assert dpo(sft_run, world / "prefs.jsonl", out, f"loss={loss}", "max_steps=2", "sft_weight=0.1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == loss and summary["steps"] == 2 and summary["val_loss"] == summary["val_loss"]
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "nll" in metrics and "rewards/chosen" in metrics
    if loss in ("simpo", "orpo"):
        assert summary["seconds_reference_pass"] < 0.05      # no reference pass


def test_on_the_fly_reference_trains_like_the_cache(world, sft_run, tmp_path):
    for mode in ("cached", "on_the_fly"):
        assert dpo(sft_run, world / "prefs.jsonl", tmp_path / mode, "max_steps=3", f"reference={mode}") == 0
    a, b = (json.loads((tmp_path / m / "summary.json").read_text()) for m in ("cached", "on_the_fly"))
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


# ---- KTO's unpaired data --------------------------------------------------------------------------

def test_unpaired_reader_and_kl_rows(tok, tmp_path):
    lines = [{"prompt": "hi", "completion": "Hello!", "label": True},
             {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4."}],
              "label": False, "split": "train"},
             {"prompt": "bye", "chosen": "Goodbye!", "rejected": "Go away.", "split": "test"}]
    path = write_jsonl(tmp_path / "u.jsonl", lines)
    every = read_unpaired(path)
    assert [(c.completion, c.label) for c in every] == [("Hello!", True), ("4.", False), ("Goodbye!", True),
                                                        ("Go away.", False)]
    assert every[3].meta["where"] == f"{path}:3 (rejected)" and len(read_unpaired(path, split="test")) == 2
    partner = kl_partners(7, seed=1)
    assert sorted(partner.tolist()) == list(range(7)) and all(partner[i] != i for i in range(7))
    data = UnpairedBatches(every, tok, 4, 64)
    batch = data.collate([0, 1, 2, 3])
    # row 4 + i: prompt of example i, answer of its partner
    for i in range(4):
        j = int(data.partner[i])
        ids, plen = data.kl_rows[i]
        assert tok.decode(ids[plen:-1]) == every[j].completion
        assert torch.equal(batch["input_ids"][4 + i, :len(ids)], torch.as_tensor(ids))
    assert batch["label"].tolist() == [True, False, True, False] and batch["num_targets"] == 4


# ---- bad input ---------------------------------------------------------------------------------------

def test_empty_answer_is_an_error_naming_the_line(sft_run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "Hello!", "rejected": "Go away."},
                                              {"prompt": "hi", "chosen": "  ", "rejected": "Go away."}])
    assert dpo(sft_run, data, tmp_path / "run") == 2
    assert f"{data}:2: \"chosen\" is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_reference_with_another_tokenizer_is_refused(tok, world, sft_run, tmp_path, capsys):
    other = train_tokenizer([(world / "corpus.txt").read_text()], vocab_size=500)
    save_model(tmp_path / "other", build_model(tiny_config(other), seed=0), other)
    out = tmp_path / "run"
    assert dpo(sft_run, world / "prefs.jsonl", out, "--reference", str(tmp_path / "other")) == 2
    assert "has another tokenizer than --init" in capsys.readouterr().err and not out.exists()


def test_kto_with_one_label_class_is_refused(sft_run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "hi", "completion": "Hello!", "label": True},
                                              {"prompt": "yo", "completion": "Hi there!", "label": True}])
    assert dpo(sft_run, data, tmp_path / "run", "loss=kto") == 2
    assert "all 2 training answers are labelled desirable (true)" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi", "completion": "Hello!", "label": "yes"}])
    assert dpo(sft_run, bad, tmp_path / "run", "loss=kto") == 2
    assert f"{bad}:1: \"label\" is 'yes'" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_reward_model_as_init_is_refused(tok, world, tmp_path, capsys):
    save_model(tmp_path / "rm", build_model(tiny_config(tok), head="score", seed=0), tok,
               {"kind": "reward", "reward_bias": 0.0})
    assert dpo(tmp_path / "rm", world / "prefs.jsonl", tmp_path / "run") == 2
    assert "is a reward model" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_resume_with_other_data_is_refused(world, sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert dpo(sft_run, world / "prefs.jsonl", out, "max_steps=2", "save_every=1") == 0
    (out / "summary.json").unlink()                                  # as if it had stopped before the end
    lines = (world / "prefs.jsonl").read_text().splitlines()
    other = write_jsonl(tmp_path / "other.jsonl", lines[: len(lines) // 2])
    capsys.readouterr()
    assert dpo(sft_run, other, out, "max_steps=2", "--resume") == 2
    err = capsys.readouterr().err
    assert "training data differs" in err and str(out / "data.json") in err and str(other) in err


def test_existing_run_is_not_overwritten(world, sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert dpo(sft_run, world / "prefs.jsonl", out, "max_steps=1") == 2
    assert "already holds a run" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("flag", ["--scorer", "--reference-answers"])
def test_eval_options_without_eval_are_refused(flag, tmp_path, capsys):
    """--scorer and --reference-answers serve --eval; without it they were silently unused
    (bad-input matrix, issue 19)."""
    assert dpo(tmp_path / "init", tmp_path / "p.jsonl", tmp_path / "run", flag, "x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} is for judging the --eval answers" in err[0]
    assert not (tmp_path / "run").exists()
