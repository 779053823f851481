"""Hugging Face config mapping. Weights already use HF names, so only `config.json` needs a map.

`to_hf_config` writes what `transformers` expects of the model's family (`ModelConfig.model_type`:
llama, mistral, qwen2, qwen3); `from_hf_config` reads a local `config.json` of those families, old
style (`rope_theta`, `rope_scaling`) or new (`rope_parameters`), so a checkpoint saves back as the
family it was loaded as. Sliding windows: a Mistral window is honoured by keeping every sequence
inside it (max_position_embeddings is capped at the window, and longer inputs are refused where
lengths are checked); Qwen2/Qwen3's `use_sliding_window` (windows on some layers) is refused.
"""

from __future__ import annotations

from lmschool.errors import UserError
from lmschool.model import FAMILIES, ModelConfig

SUPPORTED_TYPES = FAMILIES
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def to_hf_config(cfg: ModelConfig, head: str = "lm", *, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, extra: dict | None = None) -> dict:
    model_type = cfg.model_type
    arch = ARCHITECTURES[model_type] + ("ForCausalLM" if head == "lm" else "ForSequenceClassification")
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
    elif model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:   # qwen2, qwen3
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
        if model_type == "qwen3":
            out.update(attention_bias=cfg.attention_bias)
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
                        f"{', '.join(SUPPORTED_TYPES)} checkpoints")
    if d.get("use_sliding_window"):
        raise UserError(f"{where}: sliding-window attention on some layers (use_sliding_window) is not "
                        "supported; a checkpoint with use_sliding_window false loads")
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
    max_positions = d.get("max_position_embeddings", 2048)
    window = d.get("sliding_window") if model_type == "mistral" else None
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise UserError(f"{where}: 'sliding_window' must be a positive integer or null, got {window!r}")
        max_positions = min(max_positions, window)   # every sequence inside the window: exact attention
    cfg = ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"),
        max_position_embeddings=max_positions,
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)) and model_type in ("llama", "qwen3"),
        qkv_bias=qkv_bias,
        mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama",
        initializer_range=d.get("initializer_range", 0.02),
        model_type=model_type,
        sliding_window=window,
    )
    return cfg, head
