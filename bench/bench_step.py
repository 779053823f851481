"""Per-step cost of lmschool's training loop against a minimal plain-PyTorch loop (issue 20).

    .venv/bin/python bench/bench_step.py [--shape S4-128|L4-256|all] [--steps 120] [--profile]

Both sides train the same model (lmschool's `Transformer`, same initial weights) on windows of the
same token array (the school world's corpus under a BPE of the shape's vocabulary), with AdamW
(fused, the same settings), gradient clipping to 1.0 and a cosine schedule with warmup. The
minimal loop is what a careful person writes in one file: sample windows, forward, cross-entropy,
backward, clip, step, zero; nothing logged. lmschool's side is the whole `Trainer.fit` a stage
runs: the data source's `micro_batches`, `train_step` (NaN guard, metrics), the metrics file every
log_every (10) steps, the progress display off. Rounds of steps are interleaved, so both sides see
the same drift of a shared machine; the figure is the median time of a step.

Shapes: S4-128 (vocab 512, hidden 128, MLP 344, 4 layers, 4 heads: 0.86M parameters; context 64,
batch 12) and L4-256 (vocab 4096, hidden 256, MLP 688, 4 layers; context 256, batch 8).
Settings: fp32 eager (the bar: >= 1.0x the minimal loop), and lmschool's faster settings (bf16
autocast, torch.compile), each against the minimal fp32 loop.

--profile prints torch.profiler's top operators for lmschool fp32 eager and for the minimal
loop (self CPU time over the profiled steps), and the Python-side split of lmschool's step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--worker" in sys.argv:   # a side in its own process: torch (and OpenMP) start before lmschool,
    import torch  # noqa: E402,F401  so OpenMP keeps its default waiting, as in a script without lmschool
import lmschool  # noqa: E402,F401  (its OMP_WAIT_POLICY=PASSIVE default applies to the in-process sides)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmschool.data.pretrain import TokenWindows  # noqa: E402
from lmschool.losses.lm import lm_loss  # noqa: E402
from lmschool.model import ModelConfig, build_model  # noqa: E402
from lmschool.runtime import resolve_precision  # noqa: E402
from lmschool.trainer import TrainConfig, Trainer, schedule  # noqa: E402

SHAPES = {
    "S4-128": (ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=64), 64, 12),
    "L4-256": (ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=256), 256, 8),
}
LR, WARMUP = 1e-3, 10


def corpus_tokens(vocab: int) -> np.ndarray:
    """The default school world's corpus under a BPE of `vocab` ids (real text, real loss curves)."""
    from lmschool.data.text import read_documents
    from lmschool.tokenizer import train_tokenizer
    from lmschool.world.build import write
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp) / "w", seed=0, preset_name="default")
        docs = list(read_documents(Path(tmp) / "w" / "corpus.txt"))
    tok = train_tokenizer(docs, vocab)
    ids = [t for doc in tok.encode_batch(docs, add_special_tokens=False) for t in (*doc, tok.eos_id)]
    return np.array(ids, dtype=np.uint16)


class MinimalLoop:
    """The plain loop: no logging, no checks; the same model, optimizer, clip and schedule."""

    def __init__(self, cfg: ModelConfig, tokens: np.ndarray, seq: int, batch: int, total: int):
        self.model = build_model(cfg, seed=0).train()
        self.data = torch.from_numpy(tokens.astype(np.int64))
        self.seq, self.batch, self.total, self.step = seq, batch, total, 0
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                     lr=LR, betas=(0.9, 0.95), fused=True)
        self.gen = torch.Generator().manual_seed(0)

    def run(self, n: int) -> float:
        for _ in range(n):
            s = self.step
            lr = LR * (s + 1) / WARMUP if s < WARMUP else \
                LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (self.total - WARMUP))))
            for g in self.opt.param_groups:
                g["lr"] = lr
            ix = torch.randint(self.data.numel() - self.seq - 1, (self.batch,), generator=self.gen)
            chunk = torch.stack([self.data[i:i + self.seq + 1] for i in ix.tolist()])
            x, y = chunk[:, :-1], chunk[:, 1:]
            logits = self.model(x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
        return float(loss.detach())


class LmschoolLoop:
    """`Trainer.fit` as pretrain runs it, n steps at a time (the schedule fixed to the whole run)."""

    def __init__(self, cfg: ModelConfig, tokens: np.ndarray, seq: int, batch: int, total: int,
                 precision: str, compile_: bool, run_dir: Path):
        tc = TrainConfig(max_steps=total, batch_size=batch, lr=LR, warmup_steps=WARMUP, precision=precision,
                         compile=compile_, device="cpu", log_every=10, eval_every=0, save_every=0)
        self.trainer = Trainer(build_model(cfg, seed=0), lm_loss, tc, run_dir, progress=False,
                               lr=schedule(dataclasses.replace(tc), LR))
        self.data = TokenWindows(tokens, seq, batch, seed=0)

    def run(self, n: int) -> float:
        self.trainer.cfg.max_steps = self.trainer.step + n
        return self.trainer.fit(self.data)["loss"]


class OwnProcess:
    """The minimal loop in a process of its own that never imports lmschool before torch, so OpenMP
    waits as it does by default (idle threads spin a while before sleeping) rather than under
    lmschool's PASSIVE: the minimal script as a user would run it. Driven over a pipe, so its
    rounds interleave with the others; the parent sleeps while it runs."""

    def __init__(self, shape: str, threads: int, total: int):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", shape, "--threads", str(threads),
                                      "--steps", str(total)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the worker did not start (said {line!r}); run it alone to see why")

    def run(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker(shape: str, total: int) -> None:
    """The other end of OwnProcess: a line n on stdin runs n steps; the loss goes back."""
    cfg, seq, batch = SHAPES[shape]
    loop = MinimalLoop(cfg, corpus_tokens(cfg.vocab_size), seq, batch, total)
    print("ready", flush=True)
    for line in sys.stdin:
        print(loop.run(int(line)), flush=True)


def profile(fn, steps: int, top: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile as prof
    fn(3)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn(steps)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=44)


def python_split(loop: LmschoolLoop, steps: int) -> dict:
    """Wall time per step of the pieces of lmschool's step, measured by wrapping them."""
    tr, data = loop.trainer, loop.data
    spent = {"micro_batches": 0.0, "forward+loss": 0.0, "backward": 0.0, "optimizer_step (clip, guard, AdamW)": 0.0}
    orig_mb, orig_opt, orig_compute = data.micro_batches, tr.optimizer_step, tr.compute_loss

    def timed(name, f):
        def g(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            spent[name] += time.perf_counter() - t
            return out
        return g

    data.micro_batches = timed("micro_batches", orig_mb)
    tr.optimizer_step = timed("optimizer_step (clip, guard, AdamW)", orig_opt)
    tr.compute_loss = timed("forward+loss", orig_compute)
    orig_backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", orig_backward)
    t = time.perf_counter()
    try:
        loop.run(steps)
    finally:
        torch.Tensor.backward = orig_backward
        data.micro_batches, tr.optimizer_step, tr.compute_loss = orig_mb, orig_opt, orig_compute
    total = time.perf_counter() - t
    out = {k: v / steps * 1e3 for k, v in spent.items()}
    out["rest (train_step / fit bookkeeping)"] = total / steps * 1e3 - sum(out.values())
    out["total"] = total / steps * 1e3
    return out


def bench_shape(name: str, steps: int, per_round: int, do_profile: bool, threads: int, bf16: bool) -> list[dict]:
    cfg, seq, batch = SHAPES[name]
    tokens = corpus_tokens(cfg.vocab_size)
    total = steps + 40
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"minimal fp32": MinimalLoop(cfg, tokens, seq, batch, total),
                 "minimal fp32, own process (OpenMP default waiting)": OwnProcess(name, threads, total)}
        settings = [("fp32", False), ("fp32", True)]
        if bf16:
            settings += [("bf16", False), ("bf16", True)]
        for precision, comp in settings:
            sides[f"lmschool {precision}{' compile' if comp else ''}"] = LmschoolLoop(
                cfg, tokens, seq, batch, total, precision, comp, Path(tmp) / f"{precision}-{comp}")
        for side in sides.values():      # warm up (and compile) every side first
            side.run(5)
        times = {k: [] for k in sides}
        for _ in range(max(1, steps // per_round)):
            for k, side in sides.items():
                t = time.perf_counter()
                side.run(per_round)
                times[k].append((time.perf_counter() - t) / per_round)
        base = statistics.median(times["minimal fp32"])
        for k, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"shape": name, "side": k, "ms_per_step": ms * 1e3, "tokens_per_s": batch * seq / ms,
                         "speed_vs_minimal_fp32": base / ms, "threads": threads})
        print(f"\n{name}: context {seq}, batch {batch}, {cfg.num_params() / 1e6:.2f}M parameters, "
              f"{threads} threads, median of {len(ts)} rounds of {per_round} steps")
        print("| side | ms/step | tokens/s | speed vs minimal fp32 loop |")
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['side']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['speed_vs_minimal_fp32']:.2f}x |")
        if do_profile:
            lm = sides["lmschool fp32"]
            print("\nlmschool fp32 eager, where a step's time goes (ms/step):")
            for k, v in python_split(lm, 30).items():
                print(f"  {k:40s} {v:7.2f}")
            print("\nlmschool fp32 eager, torch.profiler, 20 steps:")
            print(profile(lm.run, 20))
            print("\nminimal fp32 loop, torch.profiler, 20 steps:")
            print(profile(sides["minimal fp32"].run, 20))
        sides["minimal fp32, own process (OpenMP default waiting)"].close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="all", choices=[*SHAPES, "all"])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                    help="bf16 rows: auto = where the CPU runs bf16 fast (lmschool's precision=auto picks it)")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    ap.add_argument("--worker", metavar="SHAPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.worker, args.steps)
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} "
          "(in-process sides)")
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and resolve_precision(torch.device("cpu"), "auto") == "bf16")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; bf16 rows: {'yes' if bf16 else 'no (this CPU has no fast bf16)'}")
    rows = []
    for name in SHAPES if args.shape == "all" else [args.shape]:
        rows += bench_shape(name, args.steps, args.per_round, args.profile, args.threads, bf16)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
