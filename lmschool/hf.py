"""Hugging Face config mapping. Weights already use HF names, so only `config.json` needs a map.

`to_hf_config` writes what `transformers` expects of a Llama (or, with q/k/v bias, a Qwen2)
checkpoint; `from_hf_config` reads a local Llama / Qwen2 / Mistral-without-sliding-window
`config.json`, old style (`rope_theta`, `rope_scaling`) or new (`rope_parameters`).
"""

from __future__ import annotations

from lmschool.errors import UserError
from lmschool.model import ModelConfig

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def to_hf_config(cfg: ModelConfig, head: str = "lm", *, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, extra: dict | None = None) -> dict:
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    arch = {"llama": "Llama", "qwen2": "Qwen2"}[model_type]
    arch += "ForCausalLM" if head == "lm" else "ForSequenceClassification"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.dim_head,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if model_type == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    else:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.num_hidden_layers)
    if head == "score":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                   problem_type="regression")
    if extra:
        out["lmschool"] = extra
    return out


def from_hf_config(d: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """HF config dict -> (ModelConfig, head) where head is 'lm' or 'score'."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UserError(f"{where}: model_type {model_type!r} is not supported; lmschool loads "
                        f"Llama-family checkpoints ({', '.join(SUPPORTED_TYPES)})")
    if d.get("use_sliding_window") or (model_type == "mistral" and d.get("sliding_window")):
        raise UserError(f"{where}: sliding-window attention is not supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in required:
        if not isinstance(d.get(key), int) or isinstance(d.get(key), bool) or d[key] < 1:
            raise UserError(f"{where}: {key!r} must be a positive integer, got {d.get(key)!r}; "
                            f"a model's config.json needs {', '.join(required)}")
    archs = d.get("architectures") or []
    head = "score" if any("SequenceClassification" in a for a in archs) else "lm"
    if head == "score" and d.get("num_labels", len(d.get("id2label") or {0: 0})) != 1:
        raise UserError(f"{where}: a reward model must have num_labels 1")
    rope = d.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    qkv_bias = model_type == "qwen2"
    cfg = ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)) and not qkv_bias,
        qkv_bias=qkv_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        initializer_range=d.get("initializer_range", 0.02),
    )
    return cfg, head
