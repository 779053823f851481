"""Benchmark: lmschool `generate` vs `transformers` `generate` (KV cache), side by side in one run.

    .venv/bin/python bench/bench_generate.py            # prints the table, writes bench/RESULTS_generate.md
    .venv/bin/python bench/bench_generate.py --quick    # 1 repeat, no file written
    GOMP_SPINCOUNT=20000 .venv/bin/python bench/bench_generate.py --append   # a second table

lmschool is imported before torch, so its OpenMP waiting applies to both sides (a short spin when
the machine is idle at start, else OMP_WAIT_POLICY=PASSIVE: sleeping threads cost every small
parallel region a wake-up; see lmschool/__init__.py and RESULTS_generate.md). Run it on a quiet
machine; the table's header says which waiting it got.

Model "L4-256" (vocab 4096, hidden 256, intermediate 688, 4 layers, 4 heads, tied embeddings),
random weights, saved with `lmschool.checkpoint.save_model` and loaded from that directory by both
sides. Prompts of 64 random tokens, 128 new tokens, sampling at temperature 1 with no top-k/top-p
and no stop id (every row runs to 128 tokens), torch.set_num_threads(2). Each configuration has
a warm-up run, then the repeats are interleaved (transformers, ours, ours-bf16, ...) so that
drift on a shared machine hits every row alike; the median is reported.

Rows:
- transformers: `LlamaForCausalLM.generate(do_sample=True)`, its default dynamic KV cache.
- transformers static cache: the same with `cache_implementation="static"`.
- lmschool float32: `lmschool.generate.generate` (linear weights packed once per call, the
  default on CPU), and the same with `pack_weights=False`.
- lmschool compile_for_generation: `torch.compile` with inductor freezing (weights frozen and
  pre-packed, for a policy that no longer changes, e.g. `lmschool label`); compile time excluded
  (done in the warm-up run, reported below the table).
- lmschool bf16 autocast (where the CPU runs bf16 fast): the same call under `torch.autocast("cpu", torch.bfloat16)`.
- lmschool bf16 weights: a bf16 copy of the model (`model.to(torch.bfloat16)`), no autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmschool  # noqa: E402,F401  (before torch: its OMP_WAIT_POLICY default applies to both sides)
import torch  # noqa: E402

from lmschool.checkpoint import load_model, save_model  # noqa: E402
from lmschool.generate import compile_for_generation, generate  # noqa: E402
from lmschool.model import ModelConfig, build_model  # noqa: E402
from lmschool.runtime import resolve_precision  # noqa: E402

L4_256 = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, tie_word_embeddings=True, max_position_embeddings=256)
PROMPT_LEN, NEW_TOKENS = 64, 128
COMMAND = ".venv/bin/python bench/bench_generate.py"
NOTES = """Notes (from the runs that made this file):
- `OMP_WAIT_POLICY=PASSIVE` (lmschool's choice on a busy machine) makes every parallel region wake sleeping
  OpenMP threads. A decode step is ~25 small parallel regions, so both sides lose ~30% with it
  at batch 8, and our packed GEMMs at batch 1 lose more than the plain GEMV path.
  `GOMP_SPINCOUNT=20000` (spin ~tens of microseconds, then sleep) gives back the speed of the
  default policy; second table.
- The decode step is bound by the fixed cost of small GEMMs and by streaming ~17 MB of weights
  plus the KV cache from memory each step; packing the weights once (`PackedLinears`, q/k/v and
  gate/up fused) removes the per-call re-packing. `compile_for_generation` (inductor freezing)
  also fuses the elementwise ops; it needs weights that no longer change.
- On a CPU with AVX512-BF16 but no AMX, bf16 halves the bytes moved but not the per-op costs; with
  AVX2 only (no bf16 arithmetic) the bf16 rows are left out (they run 5-8x slower).
"""


def ours(model, autocast: bool = False, **kwargs):
    def run(prompts: torch.Tensor, seed: int) -> int:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = generate(model, prompts.tolist(), NEW_TOKENS, temperature=1.0, seed=seed, **kwargs)
        return sum(len(t) for t in out.tokens)
    return run


def theirs(hf_model, **gen_kwargs):
    def run(prompts: torch.Tensor, seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                                    **gen_kwargs)
        return (out.shape[1] - prompts.shape[1]) * out.shape[0]
    return run


def measure(runs: dict, batch: int, repeats: int, warmup: dict) -> dict[str, float]:
    """Median generated tokens/s per configuration, repeats interleaved across configurations."""
    prompts = torch.randint(4, L4_256.vocab_size, (batch, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(batch))
    for name, run in runs.items():  # warm-up (compiles where there is something to compile)
        t0 = time.perf_counter()
        run(prompts, 0)
        warmup[f"{name}, batch {batch}"] = time.perf_counter() - t0
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            n = run(prompts, r + 1)
            speeds[name].append(n / (time.perf_counter() - t0))
            assert n == batch * NEW_TOKENS, f"{name} generated {n} tokens, expected {batch * NEW_TOKENS}"
    return {name: statistics.median(v) for name, v in speeds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, do not write the results file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS_generate.md")
    parser.add_argument("--append", action="store_true", help="add this run's table to --out instead of replacing it")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    torch.set_num_threads(2)

    import transformers
    from transformers import LlamaForCausalLM
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "L4-256", build_model(L4_256, seed=0))
        model = load_model(Path(tmp) / "L4-256", head="lm").eval()
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "L4-256", dtype=torch.float32).eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    compiled = compile_for_generation(copy.deepcopy(model))

    runs = {
        "transformers generate (dynamic cache), float32": theirs(hf),
        "transformers generate (static cache), float32": theirs(hf, cache_implementation="static"),
        "lmschool generate, float32, unpacked weights": ours(model, pack_weights=False),
        "lmschool generate, float32": ours(model),
        "lmschool generate, float32, compile_for_generation": ours(compiled),
    }
    if resolve_precision(torch.device("cpu"), "auto") == "bf16":   # not on CPUs without fast bf16 (8x slower)
        runs["lmschool generate, bf16 autocast"] = ours(model, autocast=True)
        runs["lmschool generate, bf16 weights"] = ours(model_bf16)
    baseline = "transformers generate (dynamic cache), float32"
    warmup: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    results = {b: measure(runs, b, repeats, warmup) for b in (8, 1)}

    lines = [
        "# Generation throughput: lmschool vs transformers",
        "",
        f"Model L4-256 (random weights), {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, sampling at "
        f"temperature 1, no stop; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}, "
        f"{platform.processor() or platform.machine()} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}). Median of {repeats} interleaved runs "
        "after a warm-up; generated tokens/s (higher is better), and the ratio to transformers' default "
        "generate in the same run.",
        "",
        NOTES,
        "| configuration | batch 8 tok/s | vs transformers | batch 1 tok/s | vs transformers |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in runs:
        cells = []
        for b in (8, 1):
            v = results[b][name]
            cells += [f"{v:,.0f}", f"{v / results[b][baseline]:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    compile_s = [f"{v:.0f} s" for k, v in warmup.items() if "compile_for_generation" in k]
    lines += ["", f"1-minute load average before the run: {load_before:.2f} on {os.cpu_count()} CPUs (the run "
              "itself adds about 1-2; a value above ~0.3 before means another process was competing "
              "and the numbers are noisy)."]
    lines += ["", f"Warm-up of compile_for_generation (includes compiling): {', '.join(compile_s)} "
              "(batch 8, batch 1)."]
    spin = os.environ.get("GOMP_SPINCOUNT")
    append = " --append" if args.append else ""
    lines += ["", f"Reproduce: `{'GOMP_SPINCOUNT=' + spin + ' ' if spin else ''}{COMMAND}{append}`", ""]
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        if args.append and args.out.exists():
            table = args.out.read_text() + "\n" + table.split("\n", 2)[2].replace(NOTES + "\n", "")
        args.out.write_text(table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
