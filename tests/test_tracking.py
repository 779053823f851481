"""Tracking (`report_to`, runtime.MetricSinks): the figures of metrics.jsonl reach TensorBoard's
event files (read back here) at their steps, for a stage on the one loop and for PPO's
per-iteration figures; W&B in offline mode gets the same; report_to=wandb without wandb installed
is one clear line before anything is written; report_to=none (the default) writes nothing else."""

from __future__ import annotations

import json
import sys

import pytest

from lmschool.checkpoint import save_model
from lmschool.cli import main
from lmschool.model import ModelConfig, build_model
from lmschool.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = ["threads=1", "precision=fp32", "device=cpu"]


@pytest.fixture(scope="module")
def init(world, tmp_path_factory):
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


def test_wandb_not_installed_is_one_clear_line(init, world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert main(["dpo", "--init", str(init), "--data", str(world / "prefs.jsonl"), "--out", str(out),
                 "report_to=wandb", *CPU]) == 2
    err = capsys.readouterr().err
    assert "report_to" in err and "pip install wandb" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
