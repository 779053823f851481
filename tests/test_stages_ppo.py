"""Stage 3c on tiny models: recomputed log-probs equal the sampler's, rollout bookkeeping by hand,
a policy learns a toy scorer (PPO with a critic, GRPO, RLOO), a reward model as the reward,
resume equals an uninterrupted run, and bad input (a reward model as --init, a policy as
--reward, a tokenizer mismatch, a scorer that does not import or returns non-numbers, prompts
longer than the context) is a clear error that writes nothing."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lmschool.checkpoint import load_model, save_model
from lmschool.cli import main
from lmschool.generate import generate
from lmschool.model import ModelConfig, build_model
from lmschool.rollout import Rollout, response_logprobs
from lmschool.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["batch_size=8", "minibatch_size=8", "max_new_tokens=8", "temperature=1.0", "lr=3e-2", "critic_lr=1e-2",
        "ppo_epochs=4",
        "missing_eos_penalty=0", "save_every=0", "threads=1", "precision=fp32", "device=cpu"]

SCORER = '''
def lowercase_share(prompts, responses):
    """The share of a response's characters that are lowercase ASCII letters (about 0.1 for a
    random byte-level model: 26 of 260 tokens)."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]

def not_numbers(prompts, responses):
    return ["high"] * len(responses)

def too_few(prompts, responses):
    return [1.0]
'''


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([], byte_level=True)


def tiny_config(tok, context=64):
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=context)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "model"
    save_model(path, build_model(tiny_config(tok), seed=0), tok, {"stage": "sft"})
    return path


@pytest.fixture(scope="module")
def rm(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "model"
    save_model(path, build_model(tiny_config(tok), head="score", seed=1), tok, {"kind": "reward", "reward_bias": 0.5})
    return path


@pytest.fixture()
def scorer(tmp_path, monkeypatch):
    (tmp_path / "toy_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_scorer"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"Say something {i}."} for i in range(6)]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ppo(init, prompts, out, *overrides, flags=(), reward=("--scorer", "toy_scorer:lowercase_share"), expect=0):
    code = main(["ppo", "--init", str(init), *reward, "--prompts", str(prompts), "--out", str(out),
                 *flags, *TINY, *overrides])
    assert code == expect
    return out


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---- rollout bookkeeping ------------------------------------------------------------------------

def test_rollout_build_by_hand():
    """Prompts [5, 6, 7] + response [8, 9] and prompt [5] + response [8, 9, 10]: the logits at
    position prompt_len - 1 + t predict response token t; the reward is read at the last token."""
    r = Rollout.build([[5, 6, 7, 8, 9], [5, 8, 9, 10]], [3, 1], pad_id=1, device="cpu")
    assert r.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 1]]
    assert r.tokens.tolist() == [[8, 9, 1], [8, 9, 10]]
    assert r.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.positions[0, :2].tolist() == [2, 3] and r.positions[1].tolist() == [0, 1, 2]
    assert r.last_index.tolist() == [4, 3]
    sub = r.rows(torch.tensor([0]))
    assert sub.input_ids.tolist() == [[5, 6, 7, 8, 9]] and sub.tokens.tolist() == [[8, 9]]


def test_rollout_rows_carry_every_field():
    """A minibatch of a filled record takes the same rows of every field, trimmed to its longest
    response: row 0 has 2 response tokens, so its (N, R) fields keep 2 of the 3 columns."""
    r = Rollout.build([[5, 6, 7, 8, 9], [5, 8, 9, 10]], [3, 1], pad_id=1, device="cpu")
    per_token = torch.arange(6.0).view(2, 3)
    r.scores, r.old_logprobs, r.ref_logprobs = torch.tensor([0.5, -1.0]), per_token, per_token + 10
    r.advantages, r.values, r.returns, r.entropy = per_token + 20, per_token + 30, per_token + 40, per_token + 50
    sub = r.rows(torch.tensor([0]))
    assert sub.scores.tolist() == [0.5] and sub.old_logprobs.tolist() == [[0.0, 1.0]]
    assert sub.ref_logprobs.tolist() == [[10.0, 11.0]] and sub.advantages.tolist() == [[20.0, 21.0]]
    assert sub.values.tolist() == [[30.0, 31.0]] and sub.returns.tolist() == [[40.0, 41.0]]
    assert sub.entropy.tolist() == [[50.0, 51.0]] and sub.mask.tolist() == [[1.0, 1.0]]
    assert Rollout.build([[5, 6]], [1], 1, "cpu").rows(torch.tensor([0])).values is None


def test_response_entropy_of_uniform_and_certain():
    """The entropy PPO logs and adds as a bonus (response_logprobs): a model whose logits are
    [0, 0, 0, 0] after prompt token 5 and [100, 0, 0, 0] after 7 gives H = log 4 = 1.386294
    and 0, and log-probs of token 0 of log(1/4) and 0."""
    from types import SimpleNamespace
    model = SimpleNamespace(hidden=lambda ids: ids[..., None].float(),                       # (N, L, 1)
                            lm_head=lambda h: torch.where(h == 7, torch.tensor([100.0, 0, 0, 0]),
                                                          torch.zeros(4)))               # (N, R, 4)
    batch = Rollout.build([[3, 5, 0], [3, 7, 0]], [2, 2], pad_id=0, device="cpu")
    logprobs, entropy = response_logprobs(model, batch, temperature=1.0)
    assert torch.allclose(entropy, torch.tensor([[math.log(4)], [0.0]]), atol=1e-5)
    assert torch.allclose(logprobs, torch.tensor([[math.log(0.25)], [0.0]]), atol=1e-5)


def test_recomputed_logprobs_equal_the_samplers(tok, ckpt):
    """The training forward (right padding, LM head at response positions, logits / T) gives the
    log-probs the KV-cache sampler (left padding) drew the tokens with."""
    model = load_model(ckpt, head="lm")
    prompts = [tok.render([{"role": "user", "content": c}], add_generation_prompt=True)[0]
               for c in ("hi", "a longer question")]
    gen = generate(model, prompts, 10, temperature=0.7, stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=3,
                   return_logprobs=True)
    batch = Rollout.build([p + t for p, t in zip(prompts, gen.tokens)], [len(p) for p in prompts],
                          tok.pad_id, "cpu")
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, batch, 0.7)
    for i, lp in enumerate(gen.logprobs):
        assert torch.allclose(logprobs[i, :len(lp)], torch.tensor(lp), atol=1e-4)
    assert (entropy > 0).all()



def test_chunks_of_alike_length_give_the_rows_own_numbers():
    """in_chunks runs rows of alike length together (less padding) and puts the results back in
    the rows' order: chunks of 2 of six rows of lengths 9, 3, 7, 3, 5, 9 give each row what one
    forward over all six gives it, for log-probs, entropy and a score head's values."""
    from lmschool.rollout import by_length, in_chunks, response_values
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=16)
    policy, critic = build_model(cfg, seed=1).eval(), build_model(cfg, head="score", seed=2).eval()
    lengths = [9, 3, 7, 3, 5, 9]
    seqs = [torch.randint(2, 32, (n,)).tolist() for n in lengths]
    batch = Rollout.build(seqs, [2] * 6, pad_id=0, device="cpu")
    chunks, order = by_length(batch.last_index, 2)
    assert [c.tolist() for c in chunks] == [[1, 3], [4, 2], [0, 5]] and order.tolist() == [1, 3, 4, 2, 0, 5]
    with torch.no_grad():
        whole = response_logprobs(policy, batch, 0.8)
        values = response_values(critic, batch)
    got = in_chunks(lambda b: response_logprobs(policy, b, 0.8), batch, 2)
    for g, w in zip(got, whole):
        assert torch.allclose(g * batch.mask, w * batch.mask, atol=1e-5)
    got_values, = in_chunks(lambda b: response_values(critic, b), batch, 2)
    assert torch.allclose(got_values * batch.mask, values * batch.mask, atol=1e-5)


def test_pack_lays_sequences_end_to_end():
    """Sequences of lengths 3, 2, 4 (prompts of 1 token) in rows of width 5, best fit, longest
    first: row 0 holds the third, row 1 the first then the second; positions count from 0 in each
    sequence; each response position points into the flattened rows (a padded response slot at
    its sequence's last token)."""
    from lmschool.rollout import pack
    batch = Rollout.build([[7, 8, 9], [4, 5], [1, 2, 3, 6]], [1, 1, 1], pad_id=0, device="cpu")
    packed = pack(batch, width=5)
    assert packed.input_ids.tolist() == [[1, 2, 3, 6, 0], [7, 8, 9, 4, 5]]
    assert packed.segment_ids.tolist() == [[2, 2, 2, 2, -1], [0, 0, 0, 1, 1]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed.positions.tolist() == [[5, 6, 7], [8, 9, 9], [0, 1, 2]]
    # rows 6 wide: 2 rows of 6 are no fewer positions than 3 padded rows of 4, so it stays padded
    assert pack(batch, width=6) is None


def test_pack_shares_a_prompt_among_its_answers():
    """Three answers to the prompt 1 2 3 and one to the prompt 4 (GRPO's groups): the shared prompt
    once (but its last token), then each answer after that last token, positions counting on from
    the prompt's end; each response position points at its own branch. Sequences and trees are
    laid out in an order of their own (by their tokens), whatever the rollout's row order."""
    from lmschool.rollout import pack
    seqs = [[1, 2, 3, 7, 8], [1, 2, 3, 9], [4, 5, 6], [1, 2, 3, 5, 6, 7]]
    batch = Rollout.build(seqs, [3, 3, 1, 3], pad_id=0, device="cpu")
    packed = pack(batch, width=12, min_saving=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 5, 6, 7, 3, 7, 8, 3, 9, 0], [4, 5, 6] + [0] * 9]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 2, 3, 4, 2, 3, 0], [0, 1, 2] + [0] * 9]
    assert packed.branch_ids.tolist() == [[0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, -1], [1, 1, 1] + [-1] * 9]
    assert packed.segment_ids.tolist() == [[3] * 11 + [-1], [2, 2, 2] + [-1] * 9]
    # response token t of sequence i is predicted at batch.positions[i, t] = prompt_len - 1 + t
    assert packed.positions.tolist() == [[6, 7, 8], [9, 10, 10], [12, 13, 14], [2, 3, 4]]
    backwards = Rollout.build(seqs[::-1], [3, 1, 3, 3], pad_id=0, device="cpu")
    assert torch.equal(pack(backwards, width=12, min_saving=0).input_ids, packed.input_ids)
    unshared = pack(batch, width=12, min_saving=0, shared_prompts=False)
    assert unshared.input_ids[0].tolist() == [1, 2, 3, 5, 6, 7, 1, 2, 3, 7, 8, 0]   # best fit: 6 + 5 | 4 + 3
    assert unshared.branch_ids[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, -1]


def test_packed_rollouts_give_the_rows_own_numbers():
    """Reading a rollout packed (one sequence of 40 tokens and eleven of 3-10, in one row of 128)
    gives each response token the log-prob, entropy, value and gradient the right-padded rows give it."""
    from lmschool.rollout import pack, response_values
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64)
    policy, critic = build_model(cfg, seed=1), build_model(cfg, head="score", seed=2)
    lengths = [40, 3, 7, 3, 5, 9, 10, 4, 6, 8, 3, 5]
    seqs = [torch.randint(2, 32, (n,)).tolist() for n in lengths]
    for i in (3, 4, 5, 6):        # a group of answers to one prompt (GRPO's), which packing shares
        seqs[i][:2] = seqs[2][:2]
    batch = Rollout.build(seqs, [2] * 12, pad_id=0, device="cpu")
    assert pack(batch) is not None and pack(batch).input_ids.shape == (1, 128)
    assert int((pack(batch).branch_ids > 1).sum()) > 0
    results = []
    for packing in (False, True):
        policy.zero_grad()
        logprobs, entropy = response_logprobs(policy, batch, 0.8, entropy_grad=True, packing=packing)
        ((logprobs + entropy) * batch.mask).sum().backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        values = response_values(critic, batch, packing)
        results.append((logprobs * batch.mask, entropy * batch.mask, values * batch.mask, grads))
    (lp0, h0, v0, g0), (lp1, h1, v1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(h0, h1, atol=1e-5)
    assert torch.allclose(v0, v1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1))


# ---- learning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo"])
def test_policy_learns_a_toy_scorer(ckpt, prompts, scorer, tmp_path, advantage):
    """The share of lowercase letters in 8-token answers of a random byte-level model starts near
    0.1 and passes 0.4 within 10 iterations (it reaches 0.7-0.95 in practice)."""
    extra = ["max_steps=10", f"advantage={advantage}", "kl_coef=0.01"]
    extra += ["batch_size=16"] if advantage == "gae" else ["group_size=4", "batch_size=4"]
    if advantage == "grpo":
        extra += ["kl_in_loss=true", "kl_estimator=k3"]
    run = ppo(ckpt, prompts, tmp_path / "run", *extra)
    rewards = [m["reward"] for m in metrics(run)]
    assert rewards[0] < 0.15 and sum(rewards[-2:]) / 2 > 0.4, rewards
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 10 and summary["advantage"] == advantage
    assert json.loads((run / "model" / "config.json").read_text())["lmschool"]["kind"] == "policy"


def test_reward_model_as_reward_with_eval(ckpt, rm, prompts, tmp_path):
    """--reward: the critic starts as the reward model; the summary holds the DPO stage's
    evaluation against SFT answers found beside --init (none here: the reference answers afresh)
    and the reward model's reward of the eval answers."""
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "category": "smalltalk"}) + "\n"
                                 for i in range(3)))
    run = ppo(ckpt, prompts, tmp_path / "run", "max_steps=2", "eval_max_new_tokens=6", flags=("--eval", str(eval_path)),
              reward=("--reward", str(rm)))
    m = metrics(run)
    assert len(m) == 2 and all("explained_variance" in x and "vf_loss" in x for x in m)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("teacher_score", "win_rate_vs_sft", "kl_from_sft", "rm_reward", "sft_rm_reward", "kl_coef"):
        assert summary[key] is not None, key
    records = [json.loads(x) for x in (run / "eval_answers.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all("rm_reward" in r and "win" in r for r in records)


# ---- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_resume_equals_uninterrupted(ckpt, prompts, scorer, tmp_path, advantage):
    """4 iterations straight, or 2 + a checkpoint, then resumed for 2: the same metrics (every
    one but timings: rewards, KL, losses, the adaptive beta, both gradient norms) and the same
    final weights."""
    extra = ["max_steps=4", f"advantage={advantage}", "kl_target=1", "kl_horizon=50"]
    if advantage == "grpo":
        extra += ["group_size=4", "batch_size=2"]
    full = ppo(ckpt, prompts, tmp_path / "full", *extra)
    part = ppo(ckpt, prompts, tmp_path / "part", *extra, "save_every=2")
    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-00000002"]
    ppo(ckpt, prompts, part, *extra, "save_every=2", flags=("--resume",))
    def untimed(m):   # every metric (rewards, KL, beta, losses, both grad norms, ...) but times
        return {k: v for k, v in m.items() if not k.endswith(("seconds", "per_s"))}

    assert [untimed(m) for m in metrics(full)] == [untimed(m) for m in metrics(part)]
    if advantage == "gae":
        assert all("critic_grad_norm" in m and "vf_loss" in m for m in metrics(part))
    a, b = load_model(full / "model"), load_model(part / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- bad input ----------------------------------------------------------------------------------

def test_reward_model_as_init_is_refused(rm, prompts, tmp_path, capsys):
    ppo(rm, prompts, tmp_path / "run", reward=("--scorer", "teacher"), expect=2)
    assert "is a reward model" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_policy_as_reward_is_refused(ckpt, prompts, tmp_path, capsys):
    ppo(ckpt, prompts, tmp_path / "run", reward=("--reward", str(ckpt)), expect=2)
    err = capsys.readouterr().err
    assert "is a policy" in err and "--reward needs a reward model" in err and not (tmp_path / "run").exists()


def test_reward_model_with_another_tokenizer_is_refused(tok, ckpt, prompts, tmp_path, capsys):
    other = train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300)
    path = tmp_path / "rm"
    save_model(path, build_model(tiny_config(other), head="score"), other, {"kind": "reward", "reward_bias": 0.0})
    ppo(ckpt, prompts, tmp_path / "run", reward=("--reward", str(path)), expect=2)
    assert "has another tokenizer than --init" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:f", "cannot import module"),
    ("toy_scorer:missing", "has no function"),
    ("toy_scorer:not_numbers", "must return one number per response"),
    ("toy_scorer:too_few", "returned 1 scores for 2 responses"),
])
def test_bad_scorer_is_a_clear_error(ckpt, prompts, scorer, tmp_path, capsys, spec, message):
    """A scorer that cannot be imported, or answers two probe answers badly, stops PPO before
    --out is opened (not in the first rollout, leaving a run directory behind)."""
    ppo(ckpt, prompts, tmp_path / "run", "max_steps=1", reward=("--scorer", spec), expect=2)
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_prompts_longer_than_the_context_are_left_out_and_none_fitting_is_refused(ckpt, scorer, tmp_path, capsys):
    """As `lmschool label` does: a prompt that leaves no room for max_new_tokens is left out (counted in
    summary.json); a file where none fits is refused, naming the line, before anything is written."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 80}) + "\n")
    ppo(ckpt, long, tmp_path / "none", expect=2)
    err = capsys.readouterr().err
    assert "long.jsonl:1" in err and "context of 64" in err and not (tmp_path / "none").exists()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("short", "x" * 80, "also short")))
    run = ppo(ckpt, mixed, tmp_path / "run", "max_steps=1")
    assert "1 prompts of" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["prompts_skipped_too_long"] == 1


def test_critic_free_needs_a_group(ckpt, prompts, scorer, tmp_path, capsys):
    ppo(ckpt, prompts, tmp_path / "run", "advantage=grpo", expect=2)
    assert "group_size >= 2" in capsys.readouterr().err


def test_ppo_ptx_and_entropy_bonus(ckpt, prompts, scorer, tmp_path, capsys):
    """PPO-ptx adds the next-token loss on --ptx text (logged as ptx_loss); --ptx without a
    ptx_coef, or a ptx_coef without --ptx, is refused before anything is written."""
    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat. " * 200)
    run = ppo(ckpt, prompts, tmp_path / "run", "max_steps=2", "ptx_coef=0.5", "ptx_windows=2",
              "entropy_coef=0.01", flags=("--ptx", str(text)))
    assert all(m["ptx_loss"] > 0 for m in metrics(run))
    ppo(ckpt, prompts, tmp_path / "bad", flags=("--ptx", str(text)), expect=2)
    assert "ptx_coef is 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["ppo", "ppo-tiny", "grpo", "grpo-tiny"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from lmschool import config
    from lmschool.stages.ppo import PPOConfig
    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    cfg = config.load(PPOConfig, path)
    assert cfg.advantage == ("gae" if name.startswith("ppo") else "grpo")


def test_critic_warmup_leaves_the_policy_unchanged(ckpt, prompts, scorer, tmp_path):
    run = ppo(ckpt, prompts, tmp_path / "run", "max_steps=2", "critic_warmup=2")
    a, b = load_model(ckpt), load_model(run / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all("vf_loss" in m and "pg_loss" not in m for m in metrics(run))


def test_one_step_per_rollout_reuses_the_training_forward(ckpt, prompts, scorer, tmp_path):
    """GRPO with one optimizer step per rollout (ppo_epochs 1, the whole rollout one minibatch, KL
    in the loss): taking the old log-probs from the update's own forward (reuse_logprobs, the
    default) gives the same training as the separate no-grad pass: the same logged rewards, KL,
    entropy, losses and gradient norms, and the same final weights (to float32 rounding)."""
    extra = ["max_steps=3", "advantage=grpo", "group_size=4", "batch_size=2", "minibatch_size=8",
             "ppo_epochs=1", "kl_in_loss=true", "kl_estimator=k3", "kl_coef=0.1"]
    reused = ppo(ckpt, prompts, tmp_path / "reused", *extra)
    separate = ppo(ckpt, prompts, tmp_path / "separate", *extra, "reuse_logprobs=false")
    keys = ("reward", "kl", "entropy", "pg_loss", "kl_loss", "grad_norm", "logprob_mismatch")
    for a, b in zip(metrics(reused), metrics(separate), strict=True):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5, abs=1e-6)
    x, y = load_model(reused / "model"), load_model(separate / "model")
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


def test_non_finite_loss_stops_with_weights_unchanged(ckpt, prompts, scorer, tmp_path, monkeypatch, capsys):
    """A NaN in the policy loss stops the run at iteration 0 with the trainer's one-line error
    (exit 2); no weights were updated and no model was written."""
    from lmschool.stages import ppo as stage
    real = stage.policy_loss

    def poisoned(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        return loss * math.nan, m

    monkeypatch.setattr(stage, "policy_loss", poisoned)
    run = ppo(ckpt, prompts, tmp_path / "run", "max_steps=2", expect=2)
    err = capsys.readouterr().err
    assert "loss became nan" in err and "at step 0; weights were not updated" in err
    assert not (run / "model").exists()
