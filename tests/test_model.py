"""Model: causality, masks, KV cache, and parity with `transformers` both ways (STYLE.md #9);
gradient checkpointing (set_gradient_checkpointing, every stage's `gradient_checkpointing` key): the
same gradients as without it (with dropout, whose RNG state is replayed; for the LM head, the scalar
head and LoRA adapters), only in training with gradients, and a stage logs the same figures."""

import json

import pytest
import torch
import torch.utils.checkpoint

from lmschool.adapters import LoraConfig, add_lora
from lmschool.checkpoint import load_model, save_model
from lmschool.cli import main
from lmschool.errors import UserError
from lmschool.model import ModelConfig, build_model, padding_mask, segment_mask, set_gradient_checkpointing, tree_mask
from lmschool.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = {
    "tied-mha": dict(tie_word_embeddings=True),
    "untied-gqa": dict(tie_word_embeddings=False, num_key_value_heads=2),
    "qwen2-qkv-bias-gqa": dict(qkv_bias=True, num_key_value_heads=1, tie_word_embeddings=False),
    "llama-attention-bias": dict(attention_bias=True, mlp_bias=True),
    "qwen3-qk-norm-gqa": dict(model_type="qwen3", num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "qwen3-attention-bias": dict(model_type="qwen3", attention_bias=True, tie_word_embeddings=False),
    "mistral-gqa": dict(model_type="mistral", num_key_value_heads=2, tie_word_embeddings=False),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


def _randomise_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def test_causality():
    model = build_model(tiny()).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_our_checkpoint_loads_in_transformers(tmp_path, variant):
    model = build_model(tiny(**VARIANTS[variant]), seed=1).eval()
    _randomise_biases(model)
    save_model(tmp_path / "ckpt", model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(hf).__name__ == ARCHITECTURES[model.config.model_type]
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # greedy generation agrees token for token
    prompt = x[:1, :5]
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(seq, hf_out)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_checkpoint_loads_in_lmschool(tmp_path, variant):
    kw = VARIANTS[variant]
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kw.get("num_key_value_heads", 4),
                  max_position_embeddings=64, tie_word_embeddings=kw.get("tie_word_embeddings", False))
    if kw.get("qkv_bias"):
        hf_cfg = transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    elif kw.get("model_type") == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, head_dim=kw.get("head_dim", 16), attention_bias=kw.get("attention_bias", False)))
    elif kw.get("model_type") == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    else:
        hf_cfg = transformers.LlamaConfig(**common, attention_bias=kw.get("attention_bias", False),
                                          mlp_bias=kw.get("mlp_bias", False))
        hf = transformers.LlamaForCausalLM(hf_cfg)
    _randomise_biases(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf").eval()
    assert model.config.model_type == (kw.get("model_type") or ("qwen2" if kw.get("qkv_bias") else "llama"))
    x = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    save_model(tmp_path / "again", model)   # saved back as the same family
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")).__name__ == type(hf).__name__


def test_mistral_with_a_sliding_window_is_exact_inside_it(tmp_path):
    """A Mistral checkpoint with a 16-token window over 64 positions loads with its context capped
    at 16: within the window, the window changes nothing and the logits are transformers'."""
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=16)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf").eval()
    assert (model.config.max_position_embeddings, model.config.sliding_window) == (16, 16)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_matches(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=256, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf").eval()
    x = torch.randint(0, 50, (1, 200))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_reward_checkpoint_loads_as_sequence_classifier(tmp_path):
    model = build_model(tiny(), head="score", seed=2).eval()
    save_model(tmp_path / "rm", model)
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf.config.pad_token_id = 0  # saved with a tokenizer in real runs; id 0 never occurs below
    x = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        ours = model(x)[:, -1]                          # (B,) score at the last token
        theirs = hf(x).logits[:, 0]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_wrong_head_is_a_clear_error(tmp_path):
    save_model(tmp_path / "rm", build_model(tiny(), head="score"))
    with pytest.raises(UserError, match="reward model"):
        load_model(tmp_path / "rm", head="lm")
    rm = load_model(tmp_path / "rm", head="score")
    assert rm.head == "score"
    save_model(tmp_path / "lm", build_model(tiny()))
    critic = load_model(tmp_path / "lm", head="score", new_head=True)
    assert critic.head == "score"


def test_segment_ids_isolate_packed_examples():
    """Two examples packed in one row give the same logits as each alone; the model builds the
    mask from segment_ids (the data emits no mask), exactly the mask `segment_mask` makes."""
    model = build_model(tiny()).eval()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, position_ids=pos, segment_ids=seg)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)
        assert torch.equal(out, model(packed, position_ids=pos, attn_mask=segment_mask(seg)))


def test_branch_ids_give_each_answer_its_prompt_and_itself():
    """A prompt once, then two answers as branches after it (each repeating the prompt's last
    token, positions going on from the prompt's end): each answer's logits are those of the prompt
    and that answer alone; the model builds `tree_mask` from branch_ids."""
    model = build_model(tiny()).eval()
    prompt, x, y = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 3))
    row = torch.cat([prompt[:, :5], prompt[:, 5:], x, prompt[:, 5:], y], dim=1)          # (1, 5 + 5 + 4)
    branch = torch.tensor([[0] * 5 + [1] * 5 + [2] * 4])
    pos = torch.tensor([list(range(5)) + list(range(5, 10)) + list(range(5, 9))])
    with torch.no_grad():
        out = model(row, position_ids=pos, branch_ids=branch)
        alone_x, alone_y = model(torch.cat([prompt, x], 1)), model(torch.cat([prompt, y], 1))
        assert torch.allclose(out[:, :5], alone_x[:, :5], atol=1e-5)
        assert torch.allclose(out[:, 5:10], alone_x[:, 5:], atol=1e-5)
        assert torch.allclose(out[:, 10:], alone_y[:, 5:], atol=1e-5)
        assert torch.equal(out, model(row, position_ids=pos, attn_mask=tree_mask(branch)))


@pytest.mark.parametrize("head", ["lm", "score"])
def test_left_padding_equals_right_padding(head):
    """Rows of different lengths, left-padded with position_ids counting real tokens only and
    either a padding mask or segment ids (-1 at the pads), give each row's last-token output
    (a reward model's reward) and every real position as right padding and as each row alone."""
    model = build_model(tiny(), head=head, seed=4).eval()
    lengths = [6, 9, 4]
    rows = [torch.randint(1, 97, (n,)) for n in lengths]
    B, T = len(rows), max(lengths)
    right = torch.zeros(B, T, dtype=torch.long)
    left = torch.zeros(B, T, dtype=torch.long)
    for i, r in enumerate(rows):
        right[i, :len(r)], left[i, T - len(r):] = r, r
    valid = left != 0                                                               # (B, T)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)                                # (B, T)
    seg = torch.where(valid, 0, -1)                                                 # (B, T)
    with torch.no_grad():
        alone = [model(r[None])[0] for r in rows]
        by_right = model(right)
        for left_out in (model(left, position_ids=pos, attn_mask=padding_mask(valid)),
                         model(left, position_ids=pos, segment_ids=seg)):
            for i, n in enumerate(lengths):
                assert torch.allclose(left_out[i, T - n:], alone[i], atol=1e-5)
                assert torch.allclose(by_right[i, :n], alone[i], atol=1e-5)
                assert torch.allclose(left_out[i, -1], by_right[i, n - 1], atol=1e-5)    # the last token


def test_kv_cache_equals_full_recompute():
    model = build_model(tiny(num_key_value_heads=2)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        first = model(x[:, :8], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(8, 10)]
        rest = model(x[:, 10:], cache=cache)  # a multi-token chunk after the prefix
    got = torch.cat([first, *steps, rest], dim=1)
    assert torch.allclose(got, full, atol=1e-5)


# ---- gradient checkpointing ---------------------------------------------------------------------

GC_CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, dropout=0.1)
GC_IDS = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))


def gradients(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)   # the same dropout masks on both sides
    out = model(GC_IDS)
    (out.float().logsumexp(-1) if out.dim() == 3 else out).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["lm", "score"])
def test_gradient_checkpointing_gives_the_same_gradients(head):
    model = build_model(GC_CFG, head=head, seed=0)
    plain, recomputed = gradients(model, False), gradients(model, True)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    model = add_lora(build_model(GC_CFG, seed=0), LoraConfig(r=4, dropout=0.1), base="x")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain, recomputed = gradients(model, False), gradients(model, True)
    assert plain and all("lora_" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_gradient_checkpointing_only_in_training_with_gradients(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_model(GC_CFG, seed=0)
    set_gradient_checkpointing(model, True)
    model.train()(GC_IDS)
    assert len(calls) == GC_CFG.num_hidden_layers
    with torch.no_grad():
        model(GC_IDS)                     # e.g. PPO's reference and old log-probs
    model.eval()(GC_IDS)                  # evaluation
    assert len(calls) == GC_CFG.num_hidden_layers


def test_a_stage_logs_the_same_figures_with_gradient_checkpointing(world, tmp_path, one_thread):
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


def test_dpo_log_probs_with_a_checkpointed_head_give_the_same_gradients():
    """With gradient checkpointing, DPO checkpoints the LM head and its log-softmax too, two rows at
    a time (its logits are most of a LoRA run's memory): the same log-probs and gradients."""
    from lmschool.losses.preference import sequence_logprobs
    from lmschool.stages.dpo import answer_logprobs
    model = build_model(GC_CFG, seed=0)
    labels = GC_IDS.clone()
    labels[:, :6] = -100
    runs = []
    for on in (False, True):
        set_gradient_checkpointing(model, on)
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        logps = answer_logprobs(model, {"input_ids": GC_IDS, "labels": labels})   # (3,): 2 rows, then 1
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        runs.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=1e-5)
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    with torch.no_grad():   # outside training: the plain path
        assert torch.equal(answer_logprobs(model, {"input_ids": GC_IDS, "labels": labels}),
                           sequence_logprobs(model(GC_IDS), labels))
