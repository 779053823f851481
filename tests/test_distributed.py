"""Several processes (torchrun, gloo on CPU): two DDP ranks, and two FSDP2 ranks (parallel=fsdp),
equal one process with the same global batch — the same losses and the same final weights (STYLE.md
#10), for pre-training's, SFT's and DPO's losses; an FSDP run resumed from its (whole) checkpoint
equals the uninterrupted run. The children run with `torchrun --standalone` (a free port each time)
and show their output when they fail (tests/procs.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from procs import child_env, run_checked, torchrun

DDP_SCRIPT = """
import sys, numpy as np, torch
from lmschool import distributed
from lmschool.data.pretrain import TokenWindows
from lmschool.losses.lm import lm_loss
from lmschool.model import ModelConfig, build_model
from lmschool.trainer import TrainConfig, fit
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
toks = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16)
batch = int(sys.argv[2])
d = distributed.init("cpu")
tc = TrainConfig(max_steps=4, batch_size=batch, lr=3e-3, warmup_steps=1, log_every=1, eval_every=0,
                 save_every=0, device="cpu", threads=1, precision="fp32")
fit(build_model(cfg), TokenWindows(toks, 16, batch, seed=3), lm_loss, tc, sys.argv[1], dist=d, desc="t")
distributed.shutdown()
"""


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_ddp_two_processes_equal_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run_checked([sys.executable, str(script), str(tmp_path / "one"), "8"])
    torchrun(2, script, tmp_path / "two", "4")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert torch.allclose(torch.tensor(one), torch.tensor(two), atol=1e-5)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# pretrain, sft and dpo losses on synthetic batches: each step's global batch is a pure function of
# the step, and a rank trains on its slice (as the stages' data sources do)
FSDP_SCRIPT = """
import sys, numpy as np, torch
from lmschool import distributed
from lmschool.data.pretrain import TokenWindows
from lmschool.losses.lm import lm_loss, target_lm_loss
from lmschool.model import ModelConfig, build_model
from lmschool.stages.dpo import DPOConfig, make_loss_fn
from lmschool.trainer import TrainConfig, fit
out, batch, kind, parallel, max_steps, save_every, resume = sys.argv[1:8]
batch, max_steps, save_every = int(batch), int(max_steps), int(save_every)
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
d = distributed.init("cpu")
kw = dict(max_steps=max_steps, batch_size=batch, lr=3e-3, warmup_steps=1, log_every=1, eval_every=0,
          save_every=save_every, device="cpu", threads=1, precision="fp32", parallel=parallel)
GLOBAL = 8
seed = 123 if resume == "resume" else 0   # a resumed run must take its weights from the checkpoint

class Synthetic:
    def micro_batches(self, step, n, rank, world):
        g = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, 64, (GLOBAL, 16), generator=g)
        labels = torch.randint(0, 64, (GLOBAL, 16), generator=g)
        share = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
        if kind == "sft":   # a prompt of 3..12 tokens without targets, so ranks' target counts differ
            prompt = torch.randint(3, 13, (GLOBAL, 1), generator=g)
            labels = labels.masked_fill(torch.arange(16) < prompt, -100)
            ids, labels = ids[share], labels[share]
            return [{"input_ids": ids, "labels": labels, "num_targets": int((labels != -100).sum())}]
        idx = torch.arange(GLOBAL)[share]     # dpo: chosen rows then rejected rows (2B, T)
        labels[:, :6] = -100
        rows = torch.cat([idx, idx + GLOBAL])
        return [{"input_ids": torch.cat([ids, ids.roll(1, 0)])[rows], "labels": torch.cat([labels, labels])[rows],
                 "response_len": torch.full((2 * len(idx),), 10), "index": idx, "num_targets": len(idx)}]

if kind == "pretrain":
    toks = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16)
    fit(build_model(cfg, seed=seed), TokenWindows(toks, 16, batch, seed=3), lm_loss, TrainConfig(**kw), out, dist=d, resume=resume == "resume", desc="t")
elif kind == "sft":
    fit(build_model(cfg, seed=seed), Synthetic(), target_lm_loss, TrainConfig(**kw), out, dist=d, resume=resume == "resume", desc="t")
else:   # gradient checkpointing too: DPO's chunked head calls model.hidden(), not forward()
    c = DPOConfig(**kw, gradient_checkpointing=True)
    cache = torch.randn(GLOBAL, 2, generator=torch.Generator().manual_seed(5)) - 20
    fit(build_model(cfg, seed=seed), Synthetic(), make_loss_fn(c, None, cache), c, out, dist=d, resume=resume == "resume", desc="t")
distributed.shutdown()
"""


def same_run(a: Path, b: Path, atol=1e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and torch.allclose(torch.tensor(la), torch.tensor(lb), atol=atol), (la, lb)
    wa = load_file(str(a / "model" / "model.safetensors"))
    wb = load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol) for k in wa)


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_fsdp_two_processes_equal_one(tmp_path, kind):
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    run_checked([sys.executable, str(script), str(tmp_path / "one"), "8", kind, "ddp", "4", "0", "-"])
    torchrun(2, script, tmp_path / "two", "4", kind, "fsdp", "4", "0", "-")
    assert len(losses(tmp_path / "one")) == 4
    same_run(tmp_path / "one", tmp_path / "two")


def test_fsdp_resume_equals_uninterrupted(tmp_path):
    """An FSDP run stopped after its step-2 checkpoint and resumed (on 2 processes) equals the run
    that was not stopped: the checkpoint holds whole weights and the whole AdamW state."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    torchrun(2, script, tmp_path / "full", "4", "pretrain", "fsdp", "4", "0", "-")
    part = tmp_path / "part"
    torchrun(2, script, part, "4", "pretrain", "fsdp", "4", "2", "-")
    import shutil
    shutil.rmtree(part / "model")
    kept = [x for x in (part / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 3]
    (part / "metrics.jsonl").write_text("\n".join(kept) + "\n")   # as if killed at step 3
    torchrun(2, script, part, "4", "pretrain", "fsdp", "4", "2", "resume")
    same_run(tmp_path / "full", part, atol=1e-6)


def test_fsdp_without_torchrun_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "lmschool", "pretrain", "--data", str(tmp_path / "c.txt"),
                             "--out", str(tmp_path / "run"), "parallel=fsdp"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 2, result.stderr
    assert "parallel" in result.stderr and "torchrun" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


# ---- PPO and GRPO under torchrun ----------------------------------------------------------------

WHITEN_SCRIPT = """
import sys, torch
from types import SimpleNamespace
from lmschool import distributed
from lmschool.losses.ppo import masked_whiten
from lmschool.stages.ppo import PPO
d = distributed.init("cpu")
g = torch.Generator().manual_seed(0)
x, mask = torch.randn(6, 5, generator=g) * 3 + 1, (torch.rand(6, 5, generator=g) > 0.3).float()
mine = slice(3 * d.rank, 3 * d.rank + 3)
got = PPO.whiten(SimpleNamespace(dist=d), x[mine], mask[mine])
assert torch.allclose(got, masked_whiten(x, mask)[mine], atol=1e-6), (got, masked_whiten(x, mask)[mine])
distributed.shutdown()
"""

SCORER = '''
def lowercase_share(prompts, responses):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]

def constant(prompts, responses):
    return [1.0 for r in responses]
'''


def test_ppo_whitening_over_ranks_equals_one_process(tmp_path):
    """Each rank holds half the rollouts; whitening with the all-reduced mean and variance gives
    each rank exactly its rows of one process's whitening of all of them."""
    script = tmp_path / "whiten.py"
    script.write_text(WHITEN_SCRIPT)
    torchrun(2, script)


@pytest.fixture(scope="module")
def ppo_inputs(tmp_path_factory):
    from lmschool.checkpoint import save_model
    from lmschool.model import ModelConfig, build_model
    from lmschool.tokenizer import train_tokenizer
    tmp = tmp_path_factory.mktemp("ppo")
    tok = train_tokenizer([], byte_level=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64)
    save_model(tmp / "sft", build_model(cfg, seed=0), tok, {"stage": "sft"})
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(6)))
    (tmp / "toy_scorer.py").write_text(SCORER)
    return tmp


PPO_ARGS = ["max_new_tokens=8", "temperature=1.0", "lr=3e-2", "critic_lr=1e-2", "ppo_epochs=2", "grad_accum=2",
            "missing_eos_penalty=0", "threads=1", "precision=fp32", "device=cpu", "max_steps=4",
            "kl_target=1", "kl_horizon=50"]


def two_process_ppo(ppo_inputs: Path, advantage: str, *settings: str):
    """`run(out, *more)`: `lmschool ppo` on 2 torchrun processes with the toy scorer, PPO_ARGS,
    a rollout shape that fits the advantage (GRPO: 2 prompts x 4) and `settings`."""
    shape = (["group_size=4", "batch_size=2", "minibatch_size=4"] if advantage == "grpo"
             else ["batch_size=8", "minibatch_size=4"])
    env = child_env(PYTHONPATH=os.pathsep.join([str(ppo_inputs), *sys.path]))

    def run(out, *more):
        torchrun(2, "-m", "lmschool", "ppo", "--init", ppo_inputs / "sft", "--scorer", "toy_scorer:lowercase_share",
                 "--prompts", ppo_inputs / "prompts.jsonl", "--out", out, *PPO_ARGS, f"advantage={advantage}",
                 *shape, *settings, *more, env=env)
    return run


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_two_processes_resume_equals_uninterrupted(ppo_inputs, tmp_path, advantage):
    """PPO (with its DDP critic) and GRPO on 2 processes, each sampling half of every iteration's
    prompts: a run stopped at its step-2 checkpoint and resumed equals the uninterrupted one (every
    metric but timings, the final weights). Not compared with one process: a rank samples its
    share from its own random stream, so the responses (and every figure) differ from one
    process's; the statistics over them are all-reduced (whitening: the test above)."""
    ppo = two_process_ppo(ppo_inputs, advantage)
    ppo(tmp_path / "full", "save_every=0")
    part = tmp_path / "part"
    ppo(part, "save_every=2")
    import shutil
    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    ppo(part, "save_every=2", "--resume")
    full_m = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part_m = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    untimed = [{k: v for k, v in m.items() if not k.endswith(("seconds", "per_s"))} for m in full_m]
    assert len(full_m) == 4 and all("reward" in m and "grad_norm" in m for m in full_m)
    assert untimed == [{k: v for k, v in m.items() if not k.endswith(("seconds", "per_s"))} for m in part_m]
    if advantage == "gae":
        assert all("critic_grad_norm" in m for m in full_m)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "summary.json").read_text())["iterations"] == 4


SAME_WEIGHTS_SCRIPT = """
import sys, torch
from lmschool import cli, trainer
save_final = trainer.Trainer.save_final

def save_each_rank(self, path=None):   # every rank's policy and critic, to compare
    torch.save({g.name: g.model.state_dict() for g in self.groups}, f"{sys.argv[1]}.rank{self.dist.rank}.pt")
    return save_final(self, path)

trainer.Trainer.save_final = save_each_rank
sys.exit(cli.main(sys.argv[2:]))
"""


def test_ppo_ranks_keep_the_same_weights(ppo_inputs, tmp_path):
    """Each rank updates on its own rollouts; DDP averages the policy's and the critic's gradients,
    so after the run every rank holds the same weights (else rank 0's checkpoint would be only
    one of several diverged models)."""
    script = tmp_path / "same.py"
    script.write_text(SAME_WEIGHTS_SCRIPT)
    env = child_env(PYTHONPATH=os.pathsep.join([str(ppo_inputs), *sys.path]))
    torchrun(2, script, tmp_path / "w", "ppo", "--init", ppo_inputs / "sft", "--scorer", "toy_scorer:lowercase_share",
             "--prompts", ppo_inputs / "prompts.jsonl", "--out", tmp_path / "run", *PPO_ARGS, "max_steps=2",
             "batch_size=4", "minibatch_size=4", "ptx_coef=0", env=env)
    a, b = (torch.load(tmp_path / f"w.rank{r}.pt") for r in (0, 1))
    assert set(a) == {"model", "critic"}
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    start = load_file(str(ppo_inputs / "sft" / "model.safetensors"))
    assert any(not torch.equal(start[k], a["model"][k]) for k in start)   # the run trained


def untimed_metrics(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith(("seconds", "per_s"))} for m in lines]


def close_metrics(a: list[dict], b: list[dict], tol=1e-4) -> None:
    """The same figures within tol; a clip fraction (a share of tokens whose ratio or value lies past
    a threshold) within 2 of the minibatch's 128 tokens: a token whose new value sits at the
    threshold goes either way with the last bit of a sum in another order (DDP all-reduces whole
    gradients, FSDP reduce-scatters shards)."""
    assert len(a) == len(b) and [sorted(m) for m in a] == [sorted(m) for m in b]
    for ma, mb in zip(a, b):
        for k, v in ma.items():
            if k.endswith("clipfrac") and tol < 2 / 128:
                assert abs(mb[k] - v) <= 2 / 128, (ma["step"], k, v, mb[k])
            elif isinstance(v, float):
                assert mb[k] == pytest.approx(v, rel=tol, abs=tol), (ma["step"], k, v, mb[k])
            else:
                assert mb[k] == v, (ma["step"], k, v, mb[k])


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_fsdp_equals_ddp(ppo_inputs, tmp_path, advantage):
    """PPO (policy and critic sharded) and GRPO with parallel=fsdp on 2 processes equal the same runs
    with parallel=ddp: each rank samples its share from a whole copy of the policy gathered for the
    rollout, from its own random stream, so both runs draw the same responses and take the same
    steps (every metric, the responses, the final weights). PPO's fsdp run stopped at its step-2
    checkpoint and resumed equals the uninterrupted one (the critic and both AdamW states come back
    whole from the checkpoint)."""
    ppo = two_process_ppo(ppo_inputs, advantage, "lr=3e-3", "critic_lr=3e-3")
    ppo(tmp_path / "ddp", "save_every=0", "parallel=ddp")
    ppo(tmp_path / "fsdp", "save_every=0", "parallel=fsdp")
    ddp, fsdp = untimed_metrics(tmp_path / "ddp"), untimed_metrics(tmp_path / "fsdp")
    assert len(ddp) == 4 and all("reward" in m and "grad_norm" in m for m in ddp)
    # the update's figures are the minibatch's means over both ranks, not one rank's share of them
    assert all(abs(m["ratio"] - 1) < 0.1 for m in ddp + fsdp), [m["ratio"] for m in ddp + fsdp]
    if advantage == "gae":
        assert all("critic_grad_norm" in m for m in fsdp)
    # within 1e-3: at this lr the policy moves far in 4 iterations (ratios down to 0.5), and by step 4
    # the two ways of summing differ by up to 4e-4 in a gradient norm; grad_norm and critic_grad_norm
    # are compared because AdamW's steps would hide a wrongly scaled gradient
    close_metrics(ddp, fsdp, tol=1e-3)
    # 16 AdamW steps at lr 3e-2 move weights by up to 0.3; the two ways of summing leave 4e-5
    same_run(tmp_path / "ddp", tmp_path / "fsdp", atol=1e-4)
    if advantage == "grpo":
        return
    part = tmp_path / "part"
    ppo(part, "save_every=2", "parallel=fsdp")
    import shutil
    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    ppo(part, "save_every=2", "parallel=fsdp", "--resume")
    close_metrics(fsdp, untimed_metrics(part), tol=1e-6)
    same_run(tmp_path / "fsdp", part, atol=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ppo_ptx_two_processes_equal_one(ppo_inputs, tmp_path, parallel):
    """PPO-ptx on 2 processes (each its ptx_windows of the step's global text windows) equals one
    process with twice the windows, where the reward is constant (GRPO advantages are 0 and beta is
    0, so the next-token loss on the --ptx text is the policy's only gradient): the same ptx_loss
    and grad_norm every iteration and the same weights, whatever each rank sampled."""
    text = tmp_path / "ptx.txt"
    text.write_text("".join(f"Line {i}: the pupils read and write and count to {i * 7}.\n" for i in range(300)))
    env = child_env(PYTHONPATH=os.pathsep.join([str(ppo_inputs), *sys.path]))
    args = ["ppo", "--init", ppo_inputs / "sft", "--scorer", "toy_scorer:constant", "--prompts",
            ppo_inputs / "prompts.jsonl", "--ptx", text, *PPO_ARGS, "advantage=grpo", "group_size=2", "batch_size=2",
            "minibatch_size=4", "ppo_epochs=1", "grad_accum=1", "kl_coef=0", "kl_target=null", "ptx_coef=0.5",
            "max_steps=3", "save_every=0"]
    run_checked([sys.executable, "-m", "lmschool", *map(str, args), "--out", str(tmp_path / "one"),
                 "ptx_windows=4"], env=env)
    torchrun(2, "-m", "lmschool", *args, "--out", tmp_path / "two", "ptx_windows=2", f"parallel={parallel}", env=env)
    one, two = untimed_metrics(tmp_path / "one"), untimed_metrics(tmp_path / "two")
    for key in ("ptx_loss", "grad_norm"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-5), key
    assert all(m["ptx_loss"] > 1 for m in one)
    same_run(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_reward_fsdp_two_processes_equal_one(ppo_inputs, tmp_path):
    """The reward stage under parallel=fsdp on 2 processes equals one process accumulating the same
    two micro-batches of 2 pairs (grad_accum 2): the same losses, held-out accuracy and weights."""
    from test_stages_reward import separable
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable()))
    args = ["reward", "--init", ppo_inputs / "sft", "--data", data, "lr=3e-3", "warmup_steps=2", "epochs=2",
            "save_every=0", "log_every=1", "threads=1", "precision=fp32", "device=cpu", "eval_batch_size=8",
            "eval_every=3"]
    run_checked([sys.executable, "-m", "lmschool", *map(str, args), "--out", str(tmp_path / "one"), "batch_size=2",
                 "grad_accum=2"])
    torchrun(2, "-m", "lmschool", *args, "--out", tmp_path / "two", "batch_size=2", "parallel=fsdp")
    assert len(losses(tmp_path / "one")) == 12
    same_run(tmp_path / "one", tmp_path / "two")
    one, two = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert two["accuracy_rater"] == one["accuracy_rater"] and two["reward_bias"] == pytest.approx(one["reward_bias"])
