"""Device, precision and RNG (lmschool/runtime.py); tracking (`report_to`, runtime.MetricSinks): the
figures of metrics.jsonl reach TensorBoard's event files (read back here) at their steps, for a stage
on the one loop and for PPO's per-iteration figures; W&B in offline mode gets the same;
report_to=wandb without wandb installed is one clear line before anything is written; report_to=none
(the default) writes nothing else."""

import json
import random
import sys

import numpy as np
import pytest
import torch

from lmschool.checkpoint import save_model
from lmschool.cli import main
from lmschool.errors import UserError
from lmschool.model import ModelConfig, build_model
from lmschool.runtime import autocast, pick_device, resolve_precision, rng_state, set_rng_state
from lmschool.tokenizer import train_tokenizer


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device='foo' is not a device; use auto, cpu, cuda or cuda:N"):
        pick_device("foo")
    with pytest.raises(UserError, match="device='meta' is not supported"):
        pick_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(UserError, match="torch sees no CUDA GPU here; use device=cpu"):
        pick_device("cuda")


def test_precision_and_autocast():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    assert resolve_precision(cpu, "auto") in ("fp32", "bf16")
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_auto_precision_is_bf16_only_with_bf16_instructions(monkeypatch):
    """Plain AVX512 (oneDNN emulates bf16 there, 2.5x slower than fp32) gets fp32; AVX512-BF16 or
    AMX gets bf16."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, expected in [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision(cpu, "auto") == expected, (avx512_bf16, amx)


def test_rng_state_round_trip():
    """Restoring the state makes torch, Python and NumPy draw the same numbers again."""
    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])


def test_openmp_waiting(monkeypatch):
    """A short spin on an idle machine, passive waiting on a busy one, and an explicit setting
    left alone (lmschool._openmp_waiting runs at import, before torch loads OpenMP)."""
    import os

    import lmschool
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    env = {}
    lmschool._openmp_waiting(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.9, 0.5))
    env = {}
    lmschool._openmp_waiting(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for theirs in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(theirs)
        lmschool._openmp_waiting(env)
        assert env == theirs


# ---- tracking: report_to -------------------------------------------------------------------------

CPU = ["threads=1", "precision=fp32", "device=cpu"]


@pytest.fixture(scope="module")
def init(world, tmp_path_factory, one_thread):
    tok = train_tokenizer([(world / "corpus.txt").read_text(), (world / "sft.jsonl").read_text()], vocab_size=600)
    path = tmp_path_factory.mktemp("sft") / "model"
    save_model(path, build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2,
                                             max_position_embeddings=384), seed=0), tok, {"stage": "sft"})
    return path


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard event files: tag -> {step: value}."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_same_figures(run) -> int:
    """Each number of each metrics.jsonl line is in the event files at its step (float32 there)."""
    logged, n = scalars(run), 0
    for line in metrics(run):
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert logged[key][line["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, line["step"])
                n += 1
    return n


def test_a_stage_sends_its_metrics_to_tensorboard(init, world, tmp_path):
    out = tmp_path / "dpo"
    assert main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out),
                 "max_steps=4", "batch_size=4", "log_every=2", "eval_every=2", "report_to=tensorboard", *CPU]) == 0
    assert assert_same_figures(out) >= 2 * 9
    assert {"loss", "rewards/chosen", "accuracy", "val_loss", "grad_norm"} <= set(scalars(out))


def test_ppo_sends_every_iterations_figures(init, world, tmp_path):
    out = tmp_path / "ppo"
    assert main(["ppo", "--init", str(init), "--scorer", "teacher", "--prompts", str(world / "prompts.jsonl"),
                 "--out", str(out), "max_steps=3", "batch_size=4", "minibatch_size=4", "max_new_tokens=6",
                 "save_every=0", "report_to=tensorboard", *CPU]) == 0
    assert_same_figures(out)
    logged = scalars(out)
    for key in ("reward", "kl", "kl_coef", "vf_loss", "clipfrac", "entropy", "response_length"):
        assert sorted(logged[key]) == [1, 2, 3], key


def test_report_to_none_writes_nothing_else(init, world, tmp_path):
    out = tmp_path / "run"
    assert main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out),
                 "max_steps=1", "batch_size=4", *CPU]) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


def test_wandb_offline_gets_the_same_figures(init, world, tmp_path, monkeypatch):
    """A real offline W&B run (its .wandb file written under RUN/wandb); what it was sent is recorded
    on the way (wandb 0.31 writes offline history in a binary log with no reader of its own)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent = []
    real_init = wandb.init

    def init_and_record(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log
        monkeypatch.setattr(run, "log", lambda values, step: sent.append((step, values)) or real_log(values, step=step))
        return run

    monkeypatch.setattr(wandb, "init", init_and_record)
    out = tmp_path / "run"
    assert main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out),
                 "max_steps=2", "batch_size=4", "log_every=1", "report_to=wandb", *CPU]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and next(runs[0].glob("*.wandb")).stat().st_size > 0
    expected = [(m["step"], {k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))})
                for m in metrics(out)]
    assert sent == expected and len(sent) >= 3      # two steps and the held-out figures


def test_a_resumed_run_continues_its_wandb_run(init, world, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids, real_init = [], wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kwargs: ids.append((kwargs["id"], kwargs["resume"])) or real_init(**kwargs))
    out, args = tmp_path / "run", ["max_steps=2", "batch_size=4", "log_every=1", "save_every=1", "report_to=wandb", *CPU]
    dpo = ["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out)]
    assert main([*dpo, *args]) == 0
    (out / "summary.json").unlink()                                  # as if it had stopped before the end
    assert main([*dpo, "--resume", *args, "max_steps=3"]) == 0
    assert len(ids) == 2 and ids[0] == ids[1] and ids[0][1] == "allow" and len(ids[0][0]) >= 8
    assert (out / "wandb" / "run-id").read_text().strip() == ids[0][0]
    other = tmp_path / "other"
    assert main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(other), *args]) == 0
    assert ids[2][0] != ids[0][0]                                    # another run, another W&B run


def test_wandb_not_installed_is_one_clear_line(init, world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out),
                 "report_to=wandb", *CPU]) == 2
    err = capsys.readouterr().err
    assert "report_to" in err and "pip install wandb" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
