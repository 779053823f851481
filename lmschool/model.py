"""The model: a Llama-style decoder-only transformer whose checkpoints *are* Hugging Face ones.

Design choices:
- Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
  saved `model.safetensors` loads into `LlamaForCausalLM` / `MistralForCausalLM` /
  `Qwen2ForCausalLM` / `Qwen3ForCausalLM` (the config's `model_type`) as it is, and a local HF
  checkpoint of those families loads here as it is.
- RMSNorm (computed in float32), RoPE in HF's rotate-half convention (with Llama-3 frequency
  scaling when the checkpoint asks for it), SwiGLU MLP, grouped-query attention through
  `F.scaled_dot_product_attention` (`enable_gqa`), tied or untied embeddings, optional q/k/v bias
  (Qwen2) or bias on all four projections (Llama's `attention_bias`), optional RMSNorm of each
  head's queries and keys (Qwen3's q_norm / k_norm).
- Two heads: `lm_head` (vocabulary logits) for policies, `score` (one scalar per position) for
  reward models and critics, saved as `LlamaForSequenceClassification` with `num_labels: 1`.
- Attention is causal by default (the fast path); right padding needs no mask. The model builds
  any other mask itself from plain facts: packed rows pass `segment_ids` (B, T) (one id per
  packed example, its own id at padding) and get `segment_mask`; rows holding a prompt once and
  its answers as branches pass `branch_ids` (and segment_ids if several are packed) and get
  `tree_mask`; generation with left padding and a cache passes `attn_mask` (B, 1, T, S) from
  `padding_mask`. True = may attend.
- A `KVCache` makes generation O(T) per token; its positions may differ per row (left padding).
- `init_weights` is the one place weights are initialised.

Shapes: B batch, T query length, S key length (cache + T), H heads, K key/value heads, D head dim,
C hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lmschool.config import check


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")   # the Hugging Face model types lmschool reads and writes


@dataclass
class ModelConfig:
    """The shape of the network (field names are Hugging Face's config keys)."""

    vocab_size: int = 4096
    """Number of token ids (the tokenizer's size, rounded up if you like)."""
    hidden_size: int = 256
    """Width of the residual stream."""
    intermediate_size: int = 688
    """Width of the SwiGLU MLP's hidden layer."""
    num_hidden_layers: int = 4
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (grouped-query attention); null means equal to query heads."""
    head_dim: int | None = None
    """Per-head width; null means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 256
    """Longest sequence the model is trained for (context length)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """RoPE scaling as in HF configs; only rope_type 'llama3' (and 'default') is supported."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the output projection."""
    attention_bias: bool = False
    """Bias on q, k, v and o projections (Llama's attention_bias)."""
    qkv_bias: bool = False
    """Bias on q, k, v only (Qwen2); saved as a Qwen2 checkpoint."""
    mlp_bias: bool = False
    """Bias on the MLP projections (Llama's mlp_bias)."""
    qk_norm: bool = False
    """RMSNorm of each head's queries and keys before RoPE (Qwen3; set by model_type qwen3)."""
    model_type: str = "llama"
    """The Hugging Face family the model is saved as: llama, mistral, qwen2 (q/k/v bias) or qwen3 (q/k norm)."""
    sliding_window: int | None = None
    """A Mistral checkpoint's attention window, kept to save it back; lmschool caps
    max_position_embeddings at it, so every sequence fits the window and attention is exact."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of weights."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output (0 for RLHF stages)."""

    def __post_init__(self):
        check(self.vocab_size > 0, "model.vocab_size", "must be positive")
        check(self.hidden_size > 0, "model.hidden_size", "must be positive")
        check(self.num_hidden_layers > 0, "model.num_hidden_layers", "must be positive")
        check(self.num_attention_heads > 0, "model.num_attention_heads", "must be positive")
        if self.head_dim is None:
            check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                  f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check(self.num_attention_heads % self.num_key_value_heads == 0, "model.num_key_value_heads",
              f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        check(not (self.qkv_bias and self.attention_bias), "model.qkv_bias",
              "use either qkv_bias (Qwen2) or attention_bias (Llama), not both")
        if self.qkv_bias and self.model_type == "llama":
            self.model_type = "qwen2"          # q/k/v bias is Qwen2's (configs written before model_type)
        if self.model_type == "qwen3":
            self.qk_norm = True
        check(self.model_type in FAMILIES, "model.model_type",
              f"{self.model_type!r} is not a supported family ({', '.join(FAMILIES)})")
        check(self.qkv_bias == (self.model_type == "qwen2"), "model.qkv_bias",
              "q/k/v bias is Qwen2's: set it exactly when model_type is qwen2")
        check(self.qk_norm == (self.model_type == "qwen3"), "model.qk_norm",
              "q/k norm is Qwen3's: set model_type qwen3 for it")
        check(self.model_type in ("llama", "qwen3") or not self.attention_bias, "model.attention_bias",
              f"{self.model_type} has no bias on all four attention projections")
        check(self.model_type == "llama" or not self.mlp_bias, "model.mlp_bias",
              f"{self.model_type} has no MLP bias")
        check(self.sliding_window is None or self.sliding_window >= self.max_position_embeddings,
              "model.sliding_window", "must be >= max_position_embeddings (lmschool keeps sequences "
              "within the window)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            check(kind in ("default", "llama3"), "model.rope_scaling",
                  f"rope_type {kind!r} is not supported (supported: 'default', 'llama3')")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def num_params(self, head: str = "lm") -> int:
        """Parameter count (tied embeddings counted once)."""
        C, D, L = self.hidden_size, self.dim_head, self.num_hidden_layers
        H, K, V, F_ = self.num_attention_heads, self.num_key_value_heads, self.vocab_size, self.intermediate_size
        attn = C * H * D * 2 + C * K * D * 2 + (2 * D if self.qk_norm else 0)
        per_layer = attn + 3 * C * F_ + 2 * C
        emb = V * C
        out = 0 if head != "lm" or self.tie_word_embeddings else V * C
        if head == "score":
            out = C
        return emb + L * per_layer + C + out

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + attention (the PaLM appendix count)."""
        C, D, L = self.hidden_size, self.dim_head, self.num_hidden_layers
        H, K, V, F_ = self.num_attention_heads, self.num_key_value_heads, self.vocab_size, self.intermediate_size
        matmul_params = L * (C * H * D * 2 + C * K * D * 2 + 3 * C * F_) + V * C
        attention = L * 2 * H * D * seq_len  # QK^T and AV, causal counted in full, as usual
        return 6 * matmul_params + 6 * attention


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as HF does) and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        dtype = x.dtype
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with Llama-3 long-context scaling when configured."""
    D = cfg.dim_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE: x * cos + cat(-x2, x1) * sin, with the minus sign folded into
    `signed_sin` = cat(-sin, sin) (one op fewer, same numbers). x (B, H, T, D); cos (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * signed_sin


class KVCache:
    """Keys and values of every layer for generation, preallocated to `max_len` positions.

    `length` is how many positions are filled (the same for every row: rows of different
    prompt lengths are left-padded, and `key_valid` (B, max_len) marks the padding out).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at the current position; return all keys/values so far."""
        T = k.shape[2]
        start = self.length
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        return self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]

    def advance(self, T: int) -> None:
        self.length += T

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. to drop finished sequences)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        C, H, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.q_proj = nn.Linear(C, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, K * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, K * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.attention_bias)
        self.n_head, self.n_kv, self.head_dim, self.layer_idx = H, K, D, layer_idx
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:   # Qwen3: each head's queries and keys normalised before RoPE
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)                  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)                    # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, K, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                 # (B, H|K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                               # (B, K, S, D)
        causal = attn_mask is None and T > 1  # with a cache, Backbone passes a mask unless S == T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_head,
        )                                                                           # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)            # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, F_, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, F_, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(F_, C, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache))
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


class Backbone(nn.Module):
    """Embedding, blocks, final norm: HF's `LlamaModel` (named `model` in the checkpoint)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False   # see set_gradient_checkpointing

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None,
                segment_ids=None, branch_ids=None):
        """input_ids (B, T) -> hidden states (B, T, C). position_ids (B, T) or None (0, 1, ...
        after the cache); segment_ids (B, T) or None: packed rows, each attends to its own segment;
        branch_ids (B, T) or None: a prompt (0) and its answers (1, 2, ...), see `tree_mask`."""
        B, T = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None]  # (1, T)
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]   # (B, T, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)                                          # (b, T, D)
        sin = torch.cat((-sin, sin), dim=-1)                                         # (b, T, D)
        if branch_ids is not None:
            attn_mask = tree_mask(branch_ids, segment_ids)                           # (B, 1, T, T)
        elif segment_ids is not None:
            attn_mask = segment_mask(segment_ids)                                    # (B, 1, T, T)
        if cache is not None and attn_mask is None and T > 1 and cache.length > 0:
            valid = torch.ones(B, cache.length + T, dtype=torch.bool, device=input_ids.device)
            attn_mask = padding_mask(valid, T)                                        # (B, 1, T, S)
        x = self.embed_tokens(input_ids)                                             # (B, T, C)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]                # (b, 1, T, D)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:   # keep only each block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class Transformer(nn.Module):
    """The full model. head='lm' -> `LlamaForCausalLM`; head='score' -> `LlamaForSequenceClassification`.

    forward(input_ids (B, T), position_ids=None, attn_mask=None, cache=None, at=None, segment_ids=None,
            branch_ids=None)
        -> logits (B, T, V) for head 'lm', or scores (B, T) for head 'score'.
    `hidden(...)` returns the final hidden states (B, T, C) for losses that chunk the LM head.
    """

    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', not {head!r}")
        self.config, self.head = cfg, head
        self.model = Backbone(cfg)
        if head == "lm":
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def hidden(self, input_ids, position_ids=None, attn_mask=None, cache=None, segment_ids=None, branch_ids=None):
        return self.model(input_ids, position_ids, attn_mask, cache, segment_ids, branch_ids)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, at=None, segment_ids=None,
                branch_ids=None):
        """Logits (B, T, V) with the LM head, rewards (B, T) with the score head. `at`: a bool
        (B, T) mask; then only the selected positions go through the head, in row-major order:
        (N, V) or (N,) for N selected (SFT takes its loss on about 40% of positions, and the head
        and its softmax are a quarter of this model's work). segment_ids, branch_ids: see
        `Backbone.forward`."""
        h = self.model(input_ids, position_ids, attn_mask, cache, segment_ids, branch_ids)  # (B, T, C)
        if at is not None:
            h = h[at]                                                                # (N, C)
        if self.head == "lm":
            return self.lm_head(h)                                                   # (B, T, V) | (N, V)
        return self.score(h).squeeze(-1)                                             # (B, T) | (N,)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(self.config, batch, max_len, p.device, dtype)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The tensors to write: HF names, the tied `lm_head.weight` left out (HF re-ties it)."""
        sd = {k: v for k, v in self.state_dict().items()}
        if self.head == "lm" and self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing (Chen et al. 2016): in training, keep only each block's input and
    recompute the block's activations during the backward pass. Activation memory falls from every
    block's intermediates to one tensor (B, T, C) per block, for about one more forward pass of
    compute; the gradients are the same (dropout's RNG state is replayed by torch.utils.checkpoint)."""
    for module in model.modules():
        if isinstance(module, Backbone):
            module.gradient_checkpointing = on


@torch.no_grad()
def init_weights(model: Transformer, seed: int | None = None) -> None:
    """The one place weights are initialised (GPT-2 / Llama practice):

    - every Linear weight and the embedding: normal(0, initializer_range);
    - the two projections that write into the residual stream (`o_proj`, `down_proj`):
      normal(0, initializer_range / sqrt(2 * num_hidden_layers)), so the stream's variance does
      not grow with depth;
    - every bias: 0; every RMSNorm weight: 1;
    - the scalar `score` head: normal(0, 1 / sqrt(hidden_size + 1)) (the reward-model init of
      Stiennon et al. 2020 and the N+ implementation details).
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    std = cfg.initializer_range
    resid_std = std / math.sqrt(2 * cfg.num_hidden_layers)

    def normal_(t: torch.Tensor, s: float):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(s).to(t.dtype))

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if name == "score":
                normal_(module.weight, 1 / math.sqrt(cfg.hidden_size + 1))
            elif name.endswith(("o_proj", "down_proj")):
                normal_(module.weight, resid_std)
            elif name == "lm_head" and cfg.tie_word_embeddings:
                pass  # shares the embedding
            else:
                normal_(module.weight, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


def build_model(cfg: ModelConfig, head: str = "lm", seed: int | None = 0) -> Transformer:
    model = Transformer(cfg, head)
    init_weights(model, seed)
    return model


def causal_mask(T: int, device=None) -> torch.Tensor:
    """(T, T) boolean lower triangle: query t may attend keys <= t."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask for packed sequences: causal, and only within the same segment.

    segment_ids (B, T) int: one id per packed example; padding gets its own id (e.g. -1) so it
    attends only to itself. Returns (B, 1, T, T) bool, True = may attend.
    """
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                       # (B, T, T)
    return (same & causal_mask(T, segment_ids.device))[:, None]                     # (B, 1, T, T)


def tree_mask(branch_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mask for rows that hold a prompt once and several answers after it
    (`data.preference.collate_shared`, `rollout.pack`): causal, and a position of branch k >= 1
    (an answer) attends to branch 0 (the prompt) and to its own branch, never to another answer.

    branch_ids (B, T) int: 0 prompt, k >= 1 answer k, -1 padding (which attends only to itself,
    so no row is empty). segment_ids (B, T) or None: several such trees packed in a row, each
    attending only within itself. Returns (B, 1, T, T) bool, True = may attend."""
    T = branch_ids.shape[1]
    q, k = branch_ids[:, :, None], branch_ids[:, None, :]                           # (B, T, 1), (B, 1, T)
    allowed = ((k == 0) & (q >= 0)) | ((k == q) & (q > 0))                          # (B, T, T)
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=branch_ids.device)
    return ((allowed & causal_mask(T, branch_ids.device)) | eye)[:, None]          # (B, 1, T, T)


def padding_mask(key_valid: torch.Tensor, T: int | None = None) -> torch.Tensor:
    """Causal attention mask that ignores padded keys.

    key_valid (B, S) bool, True at real tokens. The last T queries are the newest positions.
    Returns (B, 1, T, S). A query at a padded position may attend itself, so no row is empty
    (an all-False row would make SDPA return NaN).
    """
    B, S = key_valid.shape
    T = S if T is None else T
    q_pos = torch.arange(S - T, S, device=key_valid.device)                          # (T,)
    k_pos = torch.arange(S, device=key_valid.device)                                 # (S,)
    causal = k_pos[None, :] <= q_pos[:, None]                                         # (T, S)
    mask = causal[None] & key_valid[:, None, :]                                       # (B, T, S)
    mask = mask | (k_pos[None, None, :] == q_pos[None, :, None])                      # self always
    return mask[:, None]                                                              # (B, 1, T, S)
