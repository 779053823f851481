"""Checkpoints that prove themselves (lmschool/checkpoint.py, issue 19): every checkpoint carries
a manifest of its files' sizes and SHA-256; a resume skips a damaged newest checkpoint with one
line and continues from the newest intact one exactly as an uninterrupted run would; loading a
damaged model is one clear error; non-finite weights are never written as a checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmschool.checkpoint import (MANIFEST, checkpoint_problem, latest_checkpoint, load_model, save_model,
                                 save_training_checkpoint)
from lmschool.data.pretrain import TokenWindows
from lmschool.errors import UserError
from lmschool.losses.lm import lm_loss
from lmschool.model import ModelConfig, build_model
from lmschool.trainer import TrainConfig, fit

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
DATA = TokenWindows(np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16), seq_len=16,
                    batch_size=4, seed=1)


def train(run, max_steps=16, resume=False, seed=0):
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                      save_every=4, keep_last=4, device="cpu", threads=1, precision="fp32")
    fit(build_model(CFG, seed=seed), DATA, lm_loss, cfg, run, resume=resume, desc="t")


def losses(run):
    return [x["loss"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def nan_weights(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def flip_middle(path):   # same size, other bytes
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
                  "model.safetensors has 100 bytes where"),
    "zeroed": (lambda c: (c / "model.safetensors").write_bytes(bytes((c / "model.safetensors").stat().st_size)),
               "its checksum differs"),
    "same-size corruption": (lambda c: flip_middle(c / "model.safetensors"), "its checksum differs"),
    "state corrupted": (lambda c: flip_middle(c / "trainer_state.pt"), "trainer_state.pt is not the file"),
    "missing file": (lambda c: (c / "config.json").unlink(), "config.json is missing"),
    "NaN weights, manifest rewritten": (lambda c: (nan_weights(c), (c / MANIFEST).unlink()),
                                        "its weights are not finite"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 16-step run, and the same run as if killed after step 12: checkpoints at
    4, 8 and 12 (the loop writes none at its end), no final model."""
    root = tmp_path_factory.mktemp("ckpt")
    train(root / "full", max_steps=16)
    shutil.copytree(root / "full", root / "part")
    shutil.rmtree(root / "part" / "model")
    return root


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_equals_uninterrupted(runs, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "part", run)
    newest = run / "checkpoints" / "step-00000012"
    spoil, reason = DAMAGE[damage]
    spoil(newest)
    assert reason in checkpoint_problem(newest)
    lines = [x for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 12]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train(run, max_steps=16, resume=True, seed=123)
    err = capsys.readouterr().err
    assert f"skipped checkpoint {newest}: " in err and reason in err
    assert losses(run) == losses(runs / "full")                     # from step 8, as if never interrupted
    a, b = load_file(str(runs / "full" / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_intact_checkpoint_is_one_clear_error(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "part", run)
    for ckpt in (run / "checkpoints").iterdir():
        flip_middle(ckpt / "model.safetensors")
    assert latest_checkpoint(run) is None
    with pytest.raises(UserError, match="no checkpoint in .* can be resumed from .*pass --force"):
        train(run, max_steps=16, resume=True)


def test_loading_a_damaged_model_is_one_clear_error(runs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(runs / "full" / "model", model)
    assert (model / MANIFEST).is_file() and load_model(model) is not None
    flip_middle(model / "model.safetensors")
    with pytest.raises(UserError, match="model is damaged: model.safetensors is not the file that was written"):
        load_model(model)
    (model / MANIFEST).unlink()                           # no manifest (older runs): safetensors says it
    (model / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="model.safetensors cannot be read .*the file is damaged"):
        load_model(model)


def test_non_finite_weights_are_never_written(tmp_path):
    model = build_model(CFG, seed=0)
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(UserError, match="not written, the weights are not finite"):
        save_training_checkpoint(tmp_path / "run", 5, model, {"step": 5})
    with pytest.raises(UserError, match="not written, the weights are not finite"):
        save_model(tmp_path / "model", model)
    assert not (tmp_path / "run" / "checkpoints" / "step-00000005").exists() and not (tmp_path / "model").exists()


def test_saved_files_are_as_readable_as_any_new_file(tmp_path):
    """model.safetensors (which safetensors writes 0600) gets the mode every other file of the
    checkpoint gets, 0o666 less the umask (0o644 with umask 022): another user can load it."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "model", build_model(CFG, seed=0))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_resuming_with_another_model_shape_is_one_clear_error(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "part", run)
    wider = ModelConfig(**{**CFG.__dict__, "hidden_size": 64, "intermediate_size": 128})
    cfg = TrainConfig(max_steps=16, batch_size=4, save_every=4, device="cpu", threads=1, precision="fp32")
    with pytest.raises(UserError, match="holds a model of another shape .*RUN/config.yaml"):
        fit(build_model(wider, seed=0), DATA, lm_loss, cfg, run, resume=True, desc="t")



def test_a_model_with_non_finite_weights_is_one_clear_error(runs, tmp_path):
    """Found by the bad-input matrix (issue 19): a NaN model whose manifest agrees loaded, and
    `lmschool score` printed nan with exit 0."""
    from lmschool.checkpoint import write_manifest

    model = tmp_path / "model"
    shutil.copytree(runs / "full" / "model", model)
    nan_weights(model)
    (model / MANIFEST).unlink()
    write_manifest(model)
    with pytest.raises(UserError, match="its weights are not finite .*use an earlier checkpoint"):
        load_model(model)


def test_a_config_that_is_not_an_object_is_one_clear_error(runs, tmp_path):
    """A config.json holding a list was an AttributeError deep in the kind check (bad-input matrix)."""
    from lmschool.checkpoint import checkpoint_kind

    model = tmp_path / "model"
    shutil.copytree(runs / "full" / "model", model)
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="config.json holds a JSON list, not an object"):
        checkpoint_kind(model)
    (model / "config.json").write_bytes(b'{"hidden_size": "\\xff"}')
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        checkpoint_kind(model)
