"""The Hugging Face config mapping (lmschool/hf.py): what lmschool writes, `transformers` reads as
the same model, and what a Llama / Mistral / Qwen2 / Qwen3 config.json says, lmschool reads back unchanged.
(Logits against `transformers` are compared in test_model.py; here only the config's fields.)"""

from dataclasses import replace

import pytest

from lmschool.errors import UserError
from lmschool.hf import from_hf_config, to_hf_config
from lmschool.model import ModelConfig

LLAMA = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rope_theta=50000.0, tie_word_embeddings=True)
QWEN2 = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, qkv_bias=True)
QWEN3 = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                    model_type="qwen3", tie_word_embeddings=True)
MISTRAL = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      model_type="mistral", sliding_window=32)


@pytest.mark.parametrize("cfg, head", [(LLAMA, "lm"), (QWEN2, "lm"), (QWEN3, "lm"), (MISTRAL, "lm"),
                                       (LLAMA, "score"), (QWEN3, "score")])
def test_round_trip(cfg, head):
    """Everything comes back, the family too (a checkpoint saves back as what it was loaded as);
    head_dim comes back explicit (config.json always states it)."""
    assert from_hf_config(to_hf_config(cfg, head)) == (replace(cfg, head_dim=cfg.dim_head), head)


@pytest.mark.parametrize("cfg, family", [(LLAMA, "LlamaConfig"), (QWEN2, "Qwen2Config"), (QWEN3, "Qwen3Config"),
                                         (MISTRAL, "MistralConfig")])
def test_transformers_reads_the_same_shape(cfg, family):
    import transformers
    d = to_hf_config(cfg)
    assert transformers.AutoConfig.for_model(**d).__class__.__name__ == family
    hf = getattr(transformers, family).from_dict(d)
    assert getattr(hf, "head_dim", cfg.dim_head) == cfg.dim_head
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == \
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.max_position_embeddings) == \
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings)
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings and hf.rms_norm_eps == cfg.rms_norm_eps


def test_reads_old_and_new_rope_styles():
    """rope_theta at the top (old) or inside rope_parameters (new); Llama 3's scaling either way."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    base = to_hf_config(LLAMA)
    old = {**base, "rope_parameters": None, "rope_theta": 20000.0, "rope_scaling": scaling}
    new = {**base, "rope_theta": None, "rope_scaling": None, "rope_parameters": {**scaling, "rope_theta": 20000.0}}
    for d in (old, new):
        cfg, _ = from_hf_config({k: v for k, v in d.items() if v is not None})
        assert cfg.rope_theta == 20000.0 and cfg.rope_scaling == scaling


def test_mistral_sliding_window_caps_the_context():
    """Mistral 7B v0.1's window (4096 of 32768 positions): lmschool keeps sequences inside the
    window (max_position_embeddings 4096) and writes the window back; none: the whole context."""
    d = {**to_hf_config(LLAMA), "model_type": "mistral", "architectures": ["MistralForCausalLM"],
         "max_position_embeddings": 32768, "sliding_window": 4096}
    cfg, _ = from_hf_config(d)
    assert (cfg.model_type, cfg.max_position_embeddings, cfg.sliding_window) == ("mistral", 4096, 4096)
    assert to_hf_config(cfg)["sliding_window"] == 4096
    cfg, _ = from_hf_config({**d, "sliding_window": None})
    assert (cfg.max_position_embeddings, cfg.sliding_window) == (32768, None)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported; lmschool loads llama, mistral, qwen2, qwen3"),
    ({"model_type": "qwen2", "use_sliding_window": True}, r"sliding-window attention on some layers \(use_sliding_window\)"),
    ({"model_type": "mistral", "sliding_window": "4k"}, "'sliding_window' must be a positive integer or null"),
    ({"architectures": ["LlamaForSequenceClassification"], "num_labels": 3}, "a reward model must have num_labels 1"),
    ({"hidden_size": None}, "'hidden_size' must be a positive integer, got None"),
    ({"num_hidden_layers": "2"}, "'num_hidden_layers' must be a positive integer, got '2'"),
])
def test_refusals_name_the_file_and_the_reason(change, message):
    with pytest.raises(UserError, match=f"x/config.json: {message}"):
        from_hf_config({**to_hf_config(LLAMA), **change}, "x/config.json")
