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
from lmschool.model import Transformer, padding_mask


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
    matrix each (29 matmuls per step become 17), makes the decode step about 1.5x faster.

    How: `with packed:` sets each Linear's instance attribute `forward` to a packed call and
    removes it on exit, so the model is altered only while a step runs (never across a `yield`
    of `stream`), and weights are packed from their current values on every `generate` call (PPO
    updates them between calls). A fused group runs its matmul when its first member sees a new
    input tensor and hands the other members their slice of the output when they are called
    with that same tensor (as `Attention` and `MLP` do); called with another input, a member
    computes afresh. Under bf16 autocast the packed weights are bf16 and inputs are cast to
    bf16, as autocast would. `PackedLinears.maybe(...)` returns None where packing does not apply
    (not CPU, no oneDNN, other dtypes) or where the op fails its one-off check against `F.linear`.
    Not thread-safe: another thread using the same model during `generate` would see the packed
    forwards.
    """

    def __init__(self, model: nn.Module, batch: int, dtype: torch.dtype):
        self.dtype, self.batch = dtype, batch
        self.forwards: list[tuple[nn.Linear, object]] = []
        self.memos: list[list] = []
        grouped: set[int] = set()
        for parent in model.modules():
            for names in FUSED_LINEARS:
                members = [getattr(parent, name, None) for name in names]
                if all(type(m) is nn.Linear for m in members) and len({m.in_features for m in members}) == 1:
                    self._add(members)
                    grouped.update(id(m) for m in members)
        for module in model.modules():
            if type(module) is nn.Linear and id(module) not in grouped:
                self._add([module])

    def _add(self, modules: list[nn.Linear]) -> None:
        dtype = self.dtype
        weight = torch.cat([m.weight.detach() for m in modules]).to(dtype)           # (sum O, C)
        bias = None
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                              for m in modules]).to(dtype)                           # (sum O,)
        weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.batch)
        sizes = [m.out_features for m in modules]
        memo: list = [None, None]  # [the last input, its outputs split per member]
        self.memos.append(memo)

        def member(i: int):
            def forward(x: torch.Tensor) -> torch.Tensor:
                if memo[0] is not x:
                    y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "")
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
        if batch < 2:   # one row: the plain matrix-vector products are faster (bench/RESULTS_generate.md)
            return None
        dtype = weight.dtype
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        if dtype not in (torch.float32, torch.bfloat16) or not _packing_works(dtype):
            return None
        return cls(model, batch, dtype)


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
    weights = packed if packed is not None else _freezing() if frozen else contextlib.nullcontext()
    with torch.inference_mode(), weights:
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
