"""Generation: batched and streaming sampling with a KV cache. Token ids in, token ids out.

    gen = generate(model, [[5, 9, 2], [7, 1]], max_new_tokens=64, temperature=0.7, top_p=0.9,
                   stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, seed=0,
                   return_logprobs=True)
    gen.tokens[i]  gen.finished[i]  gen.logprobs[i]

    for token in stream(model, prompt_ids, max_new_tokens=200, stop_ids=[im_end]): ...

Design choices:
- **Token ids only** (STYLE #8). Text, chat templates and stop ids come from the tokenizer; the
  callers (`lmschool generate`, chat, label, PPO rollouts) turn them into ids.
- **Left padding, one prefill, then one token per step.** Prompts of different lengths are
  left-padded so every row's next token sits in the same column. A key-valid mask (B, S_max) is
  built once: False at padding, True everywhere else (prompt and every future position). Prefill
  gets `padding_mask(key_valid[:, :P], P)`; a decode step only needs the slice
  `key_valid[:, None, None, :S]` (a view, nothing rebuilt). Position ids count real tokens only,
  so a left-padded row computes exactly what it would alone. With no padding at all, no mask is
  passed (SDPA's fast causal/unmasked path).
- **The KV cache is preallocated** by the model (`model.new_cache(B, P + max_new_tokens)`).
  Prefill computes the LM head at the last position only.
- **Finished rows.** A row finishes when it samples a stop id (kept in its tokens) and emits
  `pad_id` afterwards. Generation ends as soon as every row has finished. On CPU, rows that
  finish are also dropped from the batch (`KVCache.select`) once a quarter of it has, which
  saves their compute (`compact`, see bench/RESULTS_generate.md).
- **Sampling** is a chain of small pure functions on logits: `scale` (temperature),
  `top_k_filter`, `top_p_filter`, then an inverse-CDF draw (`inverse_cdf`: cumsum +
  searchsorted, one uniform per row) from a `torch.Generator`: the same seed gives the same
  tokens, whether or not finished rows were dropped. Temperature 0 is greedy (argmax).
- **Log-probs for RL.** With `return_logprobs=True` each sampled token comes with
  log pi_T(token) = log_softmax(logits / T)[token], the *temperature-scaled distribution before
  top-k / top-p filtering* (what PPO recomputes at its training forward, issue 7). At
  temperature 0 the unscaled log_softmax(logits) is returned.
- **Speed on CPU.** A decode step multiplies B rows by every weight matrix, so the GEMMs' fixed
  costs dominate: `PackedLinears` packs the linear weights once per call (fusing q/k/v and
  gate/up), about 1.3-1.5x the plain eager step. `compile_for_generation` adds torch.compile
  with frozen weights for models that no longer change (label, eval). No host sync per step
  except the all-finished check (cheap on CPU; every 8 steps on GPU).
- **Precision.** Run the call under `torch.autocast(device, dtype=torch.bfloat16)` to sample in
  bf16 (the cache takes the autocast dtype); sampling math is always float32.

- **Step-wise decoding for a server** (`Decoder`): the same prefill, sampling and packed
  weights, advanced one step at a time by a scheduler that adds prompts and drops rows between
  steps (continuous batching); a row alone computes exactly what `stream` computes.

This module is long because `Decoder` is the decode loop turned inside out for a scheduler: it
shares every piece above (sampling, inverse-CDF draws, packed weights, the cache), and apart
from them it would be a second copy of the loop's rules in another file.

Shapes: B batch, P longest prompt, N max new tokens, S keys so far, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmschool.config import check
from lmschool.model import KVCache, Transformer, padding_mask


@dataclass
class SamplingConfig:
    """How to sample. Stop ids come from the tokenizer and are passed to `generate` separately."""

    max_new_tokens: int = 128
    """Most tokens generated per prompt (a stop token ends a row earlier)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches p; 1.0 is off."""
    seed: int | None = None
    """Seed of the sampling generator; null uses torch's global RNG."""

    def __post_init__(self):
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1 (no new tokens is no answer)")
        check(0 <= self.temperature < math.inf, "temperature", "must be a number >= 0 (0 = greedy)")
        check(self.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1] (1.0 = off)")

    def kwargs(self) -> dict:
        """Keyword arguments for `generate` / `stream`."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, seed=self.seed)


@dataclass
class Generation:
    """What `generate` returns, one entry per prompt, in the prompts' order."""

    tokens: list[list[int]]
    """New tokens only; cut after the first stop token, which is kept."""
    finished: list[bool]
    """True where the row ended with a stop token (False: it ran out of max_new_tokens)."""
    logprobs: list[list[float]] | None = None
    """log_softmax(logits / T) of each token in `tokens` (T = 1 when greedy); None unless asked."""


# ---- sampling: pure functions on logits (..., V) ------------------------------------------------

def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32 (T = 0 -> unscaled: greedy does not need it)."""
    logits = logits.float()
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept); k=0: off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                           # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probabilities sum to at least p; set the rest to -inf. The top token is always kept; p=1: off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)             # (..., V)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs        # probability of the tokens ranked above each
    drop_sorted = mass_before >= p                # the nucleus already holds p without it
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, return_logprobs: bool = False,
           uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one token per row. logits (B, V) -> tokens (B,) int64, logprobs (B,) float32 or None.

    logprobs are log_softmax(logits / T) at the drawn tokens, before top-k / top-p (see module
    docstring); T = 1 when greedy. `uniform` (B,) in [0, 1) replaces the draws from `generator`
    (the decode loop draws for the whole batch, so dropping finished rows changes no sample).
    """
    scaled = scale(logits, temperature)                                            # (B, V)
    logp = scaled.log_softmax(-1) if return_logprobs else None                     # (B, V)
    if temperature == 0:
        tokens = scaled.argmax(-1)
    else:
        filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
        probs = logp.exp() if (logp is not None and filtered is scaled) else filtered.softmax(-1)
        if uniform is None:
            uniform = torch.rand(probs.shape[0], device=probs.device, generator=generator)
        tokens = inverse_cdf(probs, uniform)                                       # (B,)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1) if logp is not None else None
    return tokens, chosen


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs (B, V) from uniform (B,) in [0, 1): the first index whose
    cumulative probability exceeds u * total. One random number per row, where Gumbel-max or
    `multinomial` need V of them (on CPU those cost more than the model's decode step at B=8,
    V=4096). The sum runs in float64 so that tokens of tiny probability keep their share in a
    large vocabulary. A token of probability 0 is never drawn: its cumulative value equals its
    predecessor's, so it is never the first to exceed u."""
    cdf = probs.double().cumsum(-1)                                                # (B, V)
    u = uniform.double()[:, None] * cdf[:, -1:]                                    # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# ---- packed weights for CPU decoding ----------------------------------------------------------------

# Linears that always read the same input, so one matmul serves them all (model.py's names,
# which are Hugging Face's).
FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class PackedLinears:
    """oneDNN-packed, fused copies of a model's `nn.Linear` weights, used while a step runs (CPU).

    Why: at decode a linear layer multiplies a few rows (B, C) by a whole weight matrix. The
    default CPU GEMM re-packs the weight into its blocked layout on every call, and each call
    streams its weight from memory on its own; on L4-256 at B=8 that is most of the step.
    Packing once per `generate` call (a few ms), with q/k/v and gate/up concatenated into one
    matrix each (29 matmuls per step become 17), makes the decode step about 1.5x faster. The
    prompt's pass, many rows at once, runs on the plain weights.

    How: `with packed:` sets each Linear's instance attribute `forward` to a packed call and
    removes it on exit, so the model is altered only while a step runs (never across a `yield`
    of `stream`), and weights are packed from their current values on every `generate` call (PPO
    updates them between calls). A fused group runs its matmul when its first member sees a new
    input tensor and hands the other members their slice of the output when they are called
    with that same tensor (as `Attention` and `MLP` do); called with another input, a member
    computes afresh. Under bf16 autocast the packed weights are bf16 and inputs are cast to
    bf16, as autocast would. A linear with LoRA adapters (adapters.LoRALinear) is packed with its
    adapter folded in, W + (alpha / r) B A, as `lmschool merge` folds it (the same outputs up to
    float rounding, and one matmul instead of three); through a `WithoutAdapters` view
    (`adapters_active` False: DPO's and PPO's reference) the base weight alone. A LoRA linear
    whose adapters are switched on or off after packing computes as it is, unpacked. For one row
    (`pack=False`) the weights are not packed, as the plain matrix-vector products are faster there,
    but a model with adapters still gets them folded in.
    `PackedLinears.maybe(...)` returns None where packing does not apply
    (not CPU, no oneDNN, other dtypes) or where the op fails its one-off check against `F.linear`.
    Not thread-safe: another thread using the same model during `generate` would see the packed
    forwards.
    """

    def __init__(self, model: nn.Module, batch: int, dtype: torch.dtype, pack: bool = True):
        self.dtype, self.batch, self.pack = dtype, batch, pack
        self.with_adapters = getattr(model, "adapters_active", True)   # False through WithoutAdapters
        self.forwards: list[tuple[nn.Linear, object]] = []
        self.memos: list[list] = []
        # the adapters' own A and B layers are folded into their LoRA linear, never packed alone
        inner = {id(c) for m in model.modules() if _is_lora(m) for c in m.modules() if c is not m}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inner
                   and (type(m) is nn.Linear or _is_lora(m))]
        kinds = {id(m) for m in linears}
        grouped: set[int] = set()
        for parent in model.modules():
            for names in FUSED_LINEARS:
                members = [getattr(parent, name, None) for name in names]
                if all(id(m) in kinds for m in members) and len({m.in_features for m in members}) == 1:
                    self._add(members)
                    grouped.update(id(m) for m in members)
        for module in linears:
            if id(module) not in grouped:
                self._add([module])

    def _weight(self, m: nn.Linear) -> tuple[torch.Tensor, bool | None]:
        """The weight to pack for `m`, and for a LoRA linear whether its adapter is folded in."""
        if not _is_lora(m):
            return m.weight.detach(), None
        folded = bool(self.with_adapters and m.active)
        return ((m.weight.detach().float() + m.delta_weight()).to(m.weight.dtype) if folded
                else m.weight.detach()), folded

    def _add(self, modules: list[nn.Linear]) -> None:
        dtype = self.dtype
        weights, folded = zip(*(self._weight(m) for m in modules))
        weight = torch.cat(weights).to(dtype)                                        # (sum O, C)
        bias = None
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                              for m in modules]).to(dtype)                           # (sum O,)
        if self.pack:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.batch)
        sizes = [m.out_features for m in modules]
        memo: list = [None, None]  # [the last input, its outputs split per member]
        self.memos.append(memo)
        # the forwards read locals, never `self`: self -> forwards -> self would be a reference cycle,
        # and every call's packed copy of the weights (0.5 GB for SmolLM2) would stay in memory
        # until Python's cyclic collector happened to run
        with_adapters, pack = self.with_adapters, self.pack

        def member(i: int):
            module, packed_on = modules[i], folded[i]

            def forward(x: torch.Tensor) -> torch.Tensor:
                if packed_on is not None and (with_adapters and module.active) != packed_on:
                    return type(module).forward(module, x)   # adapters switched since packing
                if memo[0] is not x:
                    y = (torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "") if pack
                         else F.linear(x.to(dtype), weight, bias))
                    memo[0], memo[1] = x, (y.split(sizes, -1) if len(sizes) > 1 else (y,))
                return memo[1][i]
            return forward

        self.forwards += [(m, member(i)) for i, m in enumerate(modules)]

    def __enter__(self) -> PackedLinears:
        for module, forward in self.forwards:
            module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for module, _ in self.forwards:
            module.__dict__.pop("forward", None)
        for memo in self.memos:
            memo[0] = memo[1] = None

    @classmethod
    def maybe(cls, model: nn.Module, batch: int) -> PackedLinears | None:
        weight = next(model.parameters())
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return None
        dtype = weight.dtype
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        if batch < 2:   # one row: plain matrix-vector products are faster than packed ones
            # (bench/RESULTS_generate.md); only LoRA adapters are folded in, one product instead of three
            lora = any(_is_lora(m) for m in model.modules())
            return cls(model, batch, dtype, pack=False) if lora and dtype in (torch.float32, torch.bfloat16) else None
        if dtype not in (torch.float32, torch.bfloat16) or not _packing_works(dtype):
            return None
        return cls(model, batch, dtype)


def _is_lora(module: nn.Module) -> bool:
    """An adapters.LoRALinear (known by its interface: generation does not depend on adapters.py)."""
    return isinstance(module, nn.Linear) and hasattr(module, "delta_weight") and hasattr(module, "active")


_PACKING_WORKS: dict[torch.dtype, bool] = {}


def _packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs packed linears and matches `F.linear` (checked once per
    dtype and process, on a small fused layer with a bias)."""
    if dtype not in _PACKING_WORKS:
        try:
            layer = nn.ModuleDict({"q_proj": nn.Linear(24, 16), "k_proj": nn.Linear(24, 8),
                                   "v_proj": nn.Linear(24, 8, bias=False)})
            x = torch.randn(3, 24)
            with torch.inference_mode():
                expected = [F.linear(x.to(dtype), m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype))
                            for m in layer.values()]
                with PackedLinears(layer, 3, dtype):
                    got = [m(x) for m in layer.values()]
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            _PACKING_WORKS[dtype] = all(g.shape == e.shape and torch.allclose(g.float(), e.float(), atol=tol, rtol=tol)
                                        for g, e in zip(got, expected))
        except (RuntimeError, AttributeError):
            _PACKING_WORKS[dtype] = False
    return _PACKING_WORKS[dtype]


# ---- compiled decoding for a model whose weights are final -----------------------------------------

def compile_for_generation(model: Transformer) -> Transformer:
    """`torch.compile` the model for `generate` / `stream`, with inductor's *freezing*: weights
    become constants, linear weights are pre-packed and elementwise ops fused. On CPU this is
    about 1.3x the default eager path (L4-256, B=8) after a one-off compile of 10-40 s, so it
    pays where one model samples many batches with fixed weights (`lmschool label`, evaluation).

    Frozen weights are copies: a model whose weights change afterwards (a PPO policy) must not
    use it; `generate` raises if any parameter was modified since this call. Shapes (batch, cache
    length) are dynamic, so dropping finished rows or a longer prompt does not recompile.
    """
    compiled = torch.compile(model, dynamic=True)
    compiled._frozen_versions = _param_versions(model)
    return compiled


def _freezing():
    """Inductor's freezing, switched on only while a compiled decode step runs (compiling is lazy:
    it happens in a call). `torch.compile(options={"freezing": True})` does not freeze in torch
    2.13 (weights changed after compiling still changed the output), and setting the global flag
    would also freeze any other model compiled under no_grad in the process."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def _param_versions(model: nn.Module) -> list[tuple[int, int]]:
    return [(p.data_ptr(), p._version) for p in model.parameters()]


def _check_frozen(model: nn.Module) -> bool:
    """True for a model from `compile_for_generation` (raises if its weights changed since)."""
    versions = getattr(model, "_frozen_versions", None)
    if versions is None:
        return False
    if versions != _param_versions(model):
        raise ValueError("the model's weights changed after compile_for_generation, which froze "
                         "them; call compile_for_generation again, or generate with the model itself")
    return True


# ---- the decode loop ------------------------------------------------------------------------------

def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _make_generator(device: torch.device, seed: int | None,
                    generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        return torch.Generator(device=device).manual_seed(seed)
    return generator


def _decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, stop_ids: Sequence[int], pad_id: int,
            generator: torch.Generator | None, return_logprobs: bool, compact: bool,
            pack_weights: bool) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]:
    """Yield, per step, (rows, tokens, logprobs): the original indices of the rows still in the
    batch (None = all of them), their new tokens (B',) and log-probs (B',) or None.

    Rows that finished emit `pad_id` until they are dropped (compact) or every row is done.
    """
    device = _device(model)
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    if max_new_tokens <= 0:
        return
    P = max(lengths)
    S_max = P + max_new_tokens
    padded = min(lengths) < P

    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
    ids = ids.to(device)                                                           # (B, P)

    attn_mask = position_ids = key_valid = next_pos = None
    if padded:
        key_valid = torch.ones(B, S_max, dtype=torch.bool)
        for i, n in enumerate(lengths):
            key_valid[i, :P - n] = False
        key_valid = key_valid.to(device)                                           # (B, S_max)
        position_ids = (key_valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)       # (B, P)
        attn_mask = padding_mask(key_valid[:, :P], P)                              # (B, 1, P, P)
        next_pos = torch.as_tensor(lengths, device=device)[:, None]                # (B, 1)

    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)
    has_stop = stop.numel() > 0
    check_every = 1 if device.type == "cpu" else 8
    finished = torch.zeros(B, dtype=torch.bool, device=device)                     # (B,)
    rows = None                                            # original index of each row kept

    # inference_mode (and the packed weights) are entered per step, never held across a
    # `yield`: a suspended generator would otherwise leave them on in the caller's code.
    frozen = _check_frozen(model)
    with torch.inference_mode():
        # Packing costs about a decode step or two: not worth it for a handful of tokens. A
        # compiled model keeps its own kernels (dynamo cannot trace the packed op).
        compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None
        use_packed = pack_weights and not compiled and max_new_tokens >= 4
        packed = PackedLinears.maybe(model, B) if use_packed else None
    plain = _freezing() if frozen else contextlib.nullcontext()
    weights = packed if packed is not None else plain
    # The prompt's pass multiplies B x P rows, where the plain GEMM is as fast; through the packed
    # weights oneDNN held ~2 GB more for SmolLM2 at 34 x 59 rows (bench/RESULTS.md, session 14).
    with torch.inference_mode(), plain:
        cache = model.new_cache(B, S_max)
        h = model.hidden(ids, position_ids, attn_mask, cache)                      # (B, P, C)
        logits = model.lm_head(h[:, -1])                                           # (B, V)
        tokens, logprobs, finished = _next(logits, finished, rows, B, stop, pad_id, temperature,
                                           top_k, top_p, generator, return_logprobs)
    for step in range(max_new_tokens):
        yield rows, tokens, logprobs
        if step == max_new_tokens - 1:
            return
        with torch.inference_mode(), weights:
            if has_stop and step % check_every == 0:
                done = int(finished.sum())
                if done == finished.numel():
                    return
                # Drop finished rows once a quarter of the batch has finished: copying the
                # cache costs about a decode step, so a few rows are not worth it.
                if compact and done * 4 >= finished.numel():
                    keep = (~finished).nonzero().squeeze(-1)                       # (B',)
                    cache.select(keep)
                    rows = keep if rows is None else rows[keep]
                    tokens, finished = tokens[keep], finished[keep]
                    if padded:
                        key_valid, next_pos = key_valid[keep], next_pos[keep]
            if padded:
                position_ids = next_pos + step                                     # (B', 1)
                attn_mask = key_valid[:, None, None, :cache.length + 1]            # (B', 1, 1, S)
            logits = model(tokens[:, None], position_ids, attn_mask, cache)[:, -1]  # (B', V)
            tokens, logprobs, finished = _next(logits, finished, rows, B, stop, pad_id,
                                               temperature, top_k, top_p, generator,
                                               return_logprobs)


def _next(logits, finished, rows, batch, stop, pad_id, temperature, top_k, top_p, generator,
          return_logprobs):
    """Sample the next tokens (B',); rows already finished get pad_id; update `finished` (B',).

    Uniforms are drawn for all `batch` original rows and those of the kept `rows` used, so the
    samples do not depend on whether finished rows were dropped."""
    uniform = None
    if temperature > 0:
        uniform = torch.rand(batch, device=logits.device, generator=generator)     # (B,)
        uniform = uniform if rows is None else uniform[rows]                       # (B',)
    tokens, logprobs = sample(logits, temperature, top_k, top_p, generator, return_logprobs, uniform)
    if stop.numel():
        tokens = tokens.masked_fill(finished, pad_id)
        finished = finished | torch.isin(tokens, stop)
    return tokens, logprobs, finished


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int | None = None,
             generator: torch.Generator | None = None, return_logprobs: bool = False,
             compact: bool | None = None, pack_weights: bool = True) -> Generation:
    """Sample continuations of a batch of prompts (lists of token ids, any lengths).

    temperature 0 = greedy; top_k 0 and top_p 1.0 = off. `seed` (or an explicit `generator`)
    makes the draws reproducible; with neither, torch's global RNG is used. `compact` drops
    finished rows from the batch (default: on for CPU); `pack_weights` runs linear layers on
    CPU through once-packed weights (`PackedLinears`). Call it under torch.autocast to run the
    model in bf16. Returns a `Generation` (tokens, finished, logprobs per prompt).
    """
    if getattr(model, "head", "lm") != "lm":
        raise ValueError("generate needs a model with the LM head (head='lm'), not a scalar-head model")
    if not prompts:
        return Generation([], [], [] if return_logprobs else None)
    device = _device(model)
    gen = _make_generator(device, seed, generator)
    if compact is None:
        compact = device.type == "cpu"
    B = len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
            out_lp = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
            for step, (rows, tokens, logprobs) in enumerate(_decode(
                    model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, pad_id,
                    gen, return_logprobs, compact, pack_weights)):
                if rows is None:
                    out[:, step] = tokens
                    if out_lp is not None:
                        out_lp[:, step] = logprobs
                else:
                    out[rows, step] = tokens
                    if out_lp is not None:
                        out_lp[rows, step] = logprobs
    finally:
        model.train(was_training)

    stops = set(int(s) for s in stop_ids)
    tokens_out, finished_out, lp_out = [], [], [] if return_logprobs else None
    for i, row in enumerate(out.tolist()):
        end = next((j + 1 for j, t in enumerate(row) if t in stops), None)
        finished_out.append(end is not None)
        tokens_out.append(row[:end] if end is not None else row)
        if lp_out is not None:
            lp_out.append(out_lp[i, :len(tokens_out[-1])].tolist())
    return Generation(tokens_out, finished_out, lp_out)


def stream(model: Transformer, prompt: Sequence[int], max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] = (), seed: int | None = None,
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled; the stop token, if sampled, is
    yielded last. Same arguments and draws as `generate` with a batch of one."""
    device = _device(model)
    gen = _make_generator(device, seed, generator)
    was_training = model.training
    model.eval()
    try:
        for _, tokens, _ in _decode(model, [prompt], max_new_tokens, temperature, top_k, top_p,
                                    stop_ids, 0, gen, False, False, True):
            yield int(tokens[0])
    finally:
        model.train(was_training)


# ---- step-wise decoding for a server: rows join and leave between steps ----------------------------

@dataclass
class RowSampling:
    """How one row of a `Decoder` samples and when it ends (a server's request may differ from its
    neighbours in every one of these)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the row's own generator; None uses torch's global RNG (as `generate` does)."""
    stop_ids: tuple[int, ...] = ()


@dataclass
class _Incoming:
    keys: list[int]                       # the rows' keys, one per sample of this prompt
    k: list[torch.Tensor]                 # per layer (1, K, P, D): the prompt's keys
    v: list[torch.Tensor]
    tokens: list[int]                     # each row's first sampled token (its next input)


class Decoder:
    """A batch that a scheduler advances one token at a time, adding prompts and dropping rows
    between steps (continuous batching: a server decodes the requests that arrive together as
    one batch, and a new request does not wait for the batch to finish).

        decoder = Decoder(model, pad_id=tokenizer.fill_id)
        first = decoder.add(prompt_ids, [RowSampling(64, temperature=0.7, seed=1)] * 2)  # [(key, token, done)]
        while len(decoder):
            for key, token, done in decoder.step(): ...
        decoder.drop(key)        # a client left: its row is gone before the next step

    Design choices:
    - **One prompt is prefilled alone** (batch 1, its own cache), exactly as `generate` / `stream`
      prefill a batch of one, and its rows (`n` samples share one prefill) join the batch at the
      next `step`. A request alone in the decoder therefore computes what `stream` computes with
      the same settings, token for token.
    - **Each row has its own generator** (`RowSampling.seed`) and draws one uniform per step from
      it, as `stream` does: a seeded row samples the same tokens whatever rows it shares a step
      with (up to float rounding of the batched matrix products). Rows with equal temperature,
      top-k and top-p are sampled together (`sample` is row-wise).
    - **Left padding in one shared cache.** Every row's tokens end at the same column L (the
      cache's length); `key_valid` (B, capacity) marks each row's padding out, position ids count
      each row's own tokens. When rows join or leave, the cache is rebuilt once (all of that
      step's changes together): survivors and newcomers right-aligned at the new L, which is the
      longest row's length, so columns every row pads are trimmed and the cache never outgrows
      its longest row plus the most tokens any row may still write. Rows that finished are left
      in the batch until a quarter of it has, or until rows join (copying the cache costs about a
      step); a dropped row is skipped at once either way.
    - **Per-row stop ids and lengths**: a chat turn, a plain completion and a benchmark row that
      ignores end-of-text can share a step.

    Not thread-safe: one thread (the scheduler's) calls it. Run calls under `torch.autocast` for
    bf16, as `generate`. Shapes: B rows, L cache length, K kv heads, D head size, V vocabulary.
    """

    def __init__(self, model: Transformer, pad_id: int = 0, pack_weights: bool = True):
        if getattr(model, "head", "lm") != "lm":
            raise ValueError("a Decoder needs a model with the LM head (head='lm')")
        self.model, self.pad_id, self.pack_weights = model.eval(), pad_id, pack_weights
        self.device = _device(model)
        self._next_key = 0
        self.keys: list[int] = []            # the batch's rows, in cache order
        self.settings: dict[int, RowSampling] = {}
        self.generators: dict[int, torch.Generator | None] = {}
        self.produced: dict[int, int] = {}   # tokens sampled so far per row
        self.dead: set[int] = set()          # finished or dropped rows still in the cache
        self.incoming: list[_Incoming] = []
        self.cache = None
        self.key_valid = self.next_pos = self.tokens = None   # (B, capacity), (B,), (B,)
        self.padded = False
        self._packed: dict[torch.dtype, PackedLinears | None] = {}

    def __len__(self) -> int:
        """Rows still decoding (joined or about to join)."""
        return sum(1 for k in self.keys if k not in self.dead) + sum(len(i.keys) for i in self.incoming)

    # ---- rows in and out ------------------------------------------------------------------------

    def add(self, prompt: Sequence[int], rows: Sequence[RowSampling]) -> list[tuple[int, int, bool]]:
        """Prefill `prompt` once and sample each row's first token: [(key, token, done)], one per
        row. A row that is done at once (a stop id, or max_new_tokens 1) never joins the batch."""
        if not prompt:
            raise ValueError("the prompt is empty; every prompt needs at least one token")
        if not rows:
            return []
        ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=self.device)   # (1, P)
        with torch.inference_mode():
            cache = self.model.new_cache(1, len(prompt))
            h = self.model.hidden(ids, None, None, cache)                              # (1, P, C)
            logits = self.model.lm_head(h[:, -1])                                      # (1, V)
        out, joining = [], _Incoming([], cache.k, cache.v, [])
        for settings in rows:
            key = self._next_key
            self._next_key += 1
            self.settings[key], self.produced[key] = settings, 0
            self.generators[key] = _make_generator(self.device, settings.seed, None)
            token = self._sample(logits, [key])[0]
            done = self._count(key, token)
            out.append((key, token, done))
            if done:
                self._forget(key)
            else:
                joining.keys.append(key)
                joining.tokens.append(token)
        if joining.keys:
            self.incoming.append(joining)
        return out

    def drop(self, key: int) -> None:
        """Stop decoding a row (its client left); it is skipped from the next step on."""
        if key not in self.settings:      # finished already, or never added
            return
        for joining in self.incoming:
            if key in joining.keys:
                i = joining.keys.index(key)
                del joining.keys[i], joining.tokens[i]
                self._forget(key)
                self.incoming = [j for j in self.incoming if j.keys]
                return
        self.dead.add(key)

    def _forget(self, key: int) -> None:
        for table in (self.settings, self.generators, self.produced):
            table.pop(key, None)

    def _count(self, key: int, token: int) -> bool:
        """Count a sampled token; True when the row is done (a stop id, or its last token)."""
        self.produced[key] += 1
        settings = self.settings[key]
        return token in settings.stop_ids or self.produced[key] >= settings.max_new_tokens

    # ---- one step ----------------------------------------------------------------------------------

    def step(self) -> list[tuple[int, int, bool]]:
        """Decode one token for every live row: [(key, token, done)]. Rows done leave the batch."""
        live = [k for k in self.keys if k not in self.dead]
        if self.incoming or (self.dead and (len(self.dead) * 4 >= len(self.keys) or not live)):
            self._rebuild()
            live = list(self.keys)
        if not live:
            return []
        model, cache = self.model, self.cache
        with torch.inference_mode():
            packed = self._packing() if len(self.keys) >= 2 else None
            with packed if packed is not None else contextlib.nullcontext():
                position_ids = self.next_pos[:, None] if self.padded else None                 # (B, 1)
                attn_mask = self.key_valid[:, None, None, :cache.length + 1] if self.padded else None
                logits = model(self.tokens[:, None], position_ids, attn_mask, cache)[:, -1]   # (B, V)
            self.next_pos += 1
            index = {k: i for i, k in enumerate(self.keys)}
            rows = [index[k] for k in live]
            tokens = self._sample(logits, live, rows)
            self.tokens[rows] = torch.as_tensor(tokens, device=self.device)
        out = []
        for key, token in zip(live, tokens):
            done = self._count(key, token)
            out.append((key, token, done))
            if done:
                self.dead.add(key)
                self._forget(key)
        if not self.incoming and len(self.dead) == len(self.keys):
            self._rebuild()     # every row has finished: let the cache go now, not at the next request
        return out

    def _sample(self, logits: torch.Tensor, keys: list[int], rows: list[int] | None = None) -> list[int]:
        """Sample one token per key from logits (B, V) at `rows` (default: row 0 for every key).
        Keys with the same settings are sampled together; each draws its uniform from its own
        generator, as `_next` draws for a batch of one."""
        rows = rows if rows is not None else [0] * len(keys)
        tokens = [0] * len(keys)
        groups: dict[tuple, list[int]] = {}
        for j, key in enumerate(keys):
            s = self.settings[key]
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(j)
        for (temperature, top_k, top_p), js in groups.items():
            uniform = None
            if temperature > 0:
                uniform = torch.cat([torch.rand(1, device=logits.device, generator=self.generators[keys[j]])
                                     for j in js])                                     # (b,)
            picked = logits[rows[js[0]]][None] if len(js) == 1 else logits[[rows[j] for j in js]]  # (b, V)
            drawn, _ = sample(picked, temperature, top_k, top_p, uniform=uniform)
            for j, token in zip(js, drawn.tolist()):
                tokens[j] = token
        return tokens

    def _packing(self) -> PackedLinears | None:
        """Linear weights packed once per dtype (the model's weights do not change while served)."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        if dtype not in self._packed:
            self._packed[dtype] = PackedLinears.maybe(self.model, 8) if self.pack_weights else None
        return self._packed[dtype]

    def _rebuild(self) -> None:
        """Lay the cache out afresh for the surviving rows and the newcomers (see the class doc)."""
        old = [i for i, k in enumerate(self.keys) if k not in self.dead]               # survivors' rows
        for k in self.keys:
            if k in self.dead:
                self._forget(k)
        self.dead.clear()
        keys = [self.keys[i] for i in old]
        lengths = self.next_pos[old].tolist() if old else []   # each row's tokens in the cache
        tokens = self.tokens[old].tolist() if old else []
        for joining in self.incoming:
            keys += joining.keys
            lengths += [joining.k[0].shape[2]] * len(joining.keys)
            tokens += joining.tokens
        self.keys = keys
        if not keys:
            self.cache = self.key_valid = self.next_pos = self.tokens = None
            self.incoming = []
            return
        L = max(lengths)
        capacity = L + max(self.settings[k].max_new_tokens - self.produced[k] for k in keys)
        dtype = (self.cache.k[0] if self.cache is not None else self.incoming[0].k[0]).dtype
        new = KVCache(self.model.config, len(keys), capacity, self.device, dtype)
        with torch.inference_mode():
            if old:   # every survivor's tokens lie in the last w columns of the old cache
                S, w = self.cache.length, min(self.cache.length, L)
                index = torch.as_tensor(old, device=self.device)
                for dst, src in ((new.k, self.cache.k), (new.v, self.cache.v)):
                    for layer in range(len(dst)):
                        dst[layer][:len(old), :, L - w:L] = src[layer][index, :, S - w:S]
            row = len(old)
            for joining in self.incoming:
                P, n = joining.k[0].shape[2], len(joining.keys)
                for dst, src in ((new.k, joining.k), (new.v, joining.v)):
                    for layer in range(len(dst)):
                        dst[layer][row:row + n, :, L - P:L] = src[layer][:, :, :P]
                row += n
            new.length = L
            starts = torch.as_tensor([L - n for n in lengths], device=self.device)              # (B,)
            self.key_valid = torch.arange(capacity, device=self.device)[None] >= starts[:, None]  # (B, capacity)
            self.next_pos = torch.as_tensor(lengths, device=self.device)                          # (B,)
            self.tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)           # (B,)
        self.cache, self.padded, self.incoming = new, min(lengths) < L, []
