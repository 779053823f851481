"""LoRA policy sampling: packed weights with the adapters folded in (now) against the unpacked LoRA
forward (before), beside the plain model without adapters.

    GOMP_SPINCOUNT=20000 .venv/bin/python bench/probe_lora_sampling.py

L4-256 (as bench_generate.py), random weights, LoRA r=16 on all seven projections; 64-token prompts,
128 new tokens, temperature 1, 2 threads; medians of 3 interleaved runs after a warm-up.
Results: bench/RESULTS.md, "Session 10: sampling with LoRA adapters".
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmschool  # noqa: E402,F401  (its OpenMP waiting)
import torch  # noqa: E402

from lmschool.adapters import LoraConfig, add_lora  # noqa: E402
from lmschool.generate import generate  # noqa: E402
from lmschool.model import ModelConfig, build_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=256)
    base = build_model(cfg, seed=0).eval()
    lora = add_lora(copy.deepcopy(base), LoraConfig(r=16), base="base", seed=0).eval()
    for B in (8, 1):
        prompts = torch.randint(4, 4096, (B, 64), generator=torch.Generator().manual_seed(0)).tolist()
        runs = {
            "plain model": lambda: generate(base, prompts, 128, temperature=1.0, seed=0),
            "LoRA, unpacked (before)": lambda: generate(lora, prompts, 128, temperature=1.0, seed=0,
                                                        pack_weights=False),
            "LoRA, adapters folded (now)": lambda: generate(lora, prompts, 128, temperature=1.0, seed=0),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for run in runs.values():
            run()
        for _ in range(3):
            for name, run in runs.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        for name, seconds in times.items():
            print(f"batch {B}: {name}: {B * 128 / statistics.median(seconds):.0f} tok/s")


if __name__ == "__main__":
    main()
