"""Gradient checkpointing (model.set_gradient_checkpointing, the `gradient_checkpointing` key of every
training stage): the same gradients as without it (with dropout, whose RNG state is replayed; for
the LM head, the scalar head and LoRA adapters), only in training with gradients (never in
evaluation or sampling), and a stage trained with it logs the same figures as without."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils.checkpoint

from lmschool.adapters import LoraConfig, add_lora
from lmschool.cli import main
from lmschool.model import ModelConfig, build_model, set_gradient_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, dropout=0.1)
IDS = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))


def gradients(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)   # the same dropout masks on both sides
    out = model(IDS)
    (out.float().logsumexp(-1) if out.dim() == 3 else out).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["lm", "score"])
def test_the_same_gradients_as_without(head):
    model = build_model(CFG, head=head, seed=0)
    plain, recomputed = gradients(model, False), gradients(model, True)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_the_same_adapter_gradients_with_lora():
    model = add_lora(build_model(CFG, seed=0), LoraConfig(r=4, dropout=0.1), base="x")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain, recomputed = gradients(model, False), gradients(model, True)
    assert plain and all("lora_" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_only_training_with_gradients_recomputes(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_model(CFG, seed=0)
    set_gradient_checkpointing(model, True)
    model.train()(IDS)
    assert len(calls) == CFG.num_hidden_layers
    with torch.no_grad():
        model(IDS)                     # e.g. PPO's reference and old log-probs
    model.eval()(IDS)                  # evaluation
    assert len(calls) == CFG.num_hidden_layers


def test_a_stage_logs_the_same_figures_with_it(world, tmp_path):
    from lmschool.checkpoint import save_model
    from lmschool.tokenizer import train_tokenizer
    tok = train_tokenizer([(world / "sft.jsonl").read_text()], vocab_size=400)
    init = tmp_path / "sft"
    save_model(init, build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2,
                                             max_position_embeddings=256), seed=0), tok)
    runs = {}
    for on in (False, True):
        out = tmp_path / f"sft-{on}"
        assert main(["sft", "--init", str(init), "--data", str(world / "sft.jsonl"), "--out", str(out),
                     "max_steps=3", "batch_size=4", "log_every=1", "val_fraction=0", "threads=1",
                     "precision=fp32", "device=cpu", f"gradient_checkpointing={str(on).lower()}"]) == 0
        runs[on] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[False], runs[True]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
