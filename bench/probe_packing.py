"""Rollouts read packed against right-padded: the training forward and backward of
`response_logprobs` over GRPO-like rollouts, for several widths of the packed rows.

    GOMP_SPINCOUNT=20000 .venv/bin/python bench/probe_packing.py [N ...]

The policy is runs/demo2's SFT model (L4-256, vocab 2286, as bench_grpo.py uses); N rollouts (8 and
16 by default) of a 20-40-token prompt and a 5-64-token answer (random tokens, seeded), 2 threads;
medians of 5 after 2 warm-ups. Results: bench/RESULTS.md, "Session 11: GRPO's update over packed
rollouts" (which is where rollout.PACK_WIDTH comes from).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lmschool  # noqa: E402,F401  (its OpenMP waiting)
import torch  # noqa: E402

from lmschool import rollout  # noqa: E402
from lmschool.checkpoint import load_model  # noqa: E402


def rollouts(n: int, vocab: int) -> rollout.Rollout:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(20, 41, (n,), generator=g).tolist()
    answer = torch.randint(5, 65, (n,), generator=g).tolist()
    seqs = [torch.randint(4, vocab, (p + a,), generator=g).tolist() for p, a in zip(prompt, answer)]
    return rollout.Rollout.build(seqs, prompt, 0, "cpu")


def step_seconds(model, batch: rollout.Rollout, packing: bool) -> float:
    times = []
    for _ in range(7):
        t = time.perf_counter()
        model.zero_grad()
        logprobs, _ = rollout.response_logprobs(model, batch, 1.0, packing=packing)
        (logprobs * batch.mask).sum().backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    torch.set_num_threads(2)
    model = load_model(ROOT / "runs/demo2/sft/model", head="lm")
    pack = rollout.pack
    for n in [int(x) for x in sys.argv[1:]] or [8, 16]:
        batch = rollouts(n, model.config.vocab_size)
        L = batch.input_ids.shape[1]
        print(f"\n{n} rollouts, {int(batch.last_index.sum()) + n} tokens, {n} x {L} padded positions")
        padded = step_seconds(model, batch, packing=False)
        print(f"| padded | {n} x {L} | {padded * 1e3:.1f} ms | 1.00x |")
        for width in (1, 128, 256, 512):   # 1: rows as wide as the longest sequence
            packed = pack(batch, width=width, min_saving=0.0)
            if packed is None:
                continue
            rollout.pack = lambda b, width=width: pack(b, width=width, min_saving=0.0)
            try:
                t = step_seconds(model, batch, packing=True)
            finally:
                rollout.pack = pack
            P, W = packed.input_ids.shape
            print(f"| packed, width {width} | {P} x {W} | {t * 1e3:.1f} ms | {padded / t:.2f}x |")


if __name__ == "__main__":
    main()
