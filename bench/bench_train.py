"""Training throughput of lmschool vs a plain PyTorch loop over `transformers.LlamaForCausalLM`.

    .venv/bin/python bench/bench_train.py [--steps 30] [--curve-steps 200] [--threads 2]

The fixed model "L4-256": vocab 4096, hidden 256, intermediate 688, 4 layers, 4 heads, tied
embeddings, sequence 256, batch 8, 2 threads. Both sides start from the same weights, see the
same batches and use the same AdamW settings; both are measured in this one run (the machine
is shared and absolute speeds drift). MFU = model FLOPs per token (6N + attention) x tokens/s,
over the machine's measured matmul ceiling at the same precision.

Rows: transformers fp32, transformers bf16 autocast, lmschool fp32, lmschool fp32 +
torch.compile, lmschool bf16 autocast, lmschool bf16 + torch.compile. With --curve-steps, also trains lmschool fp32 and its best
configuration for that many steps on the same data and prints both loss curves (same learning).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lmschool  # noqa: E402,F401  (its OMP_WAIT_POLICY default applies to both sides)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmschool.checkpoint import save_model  # noqa: E402
from lmschool.data.pretrain import TokenWindows  # noqa: E402
from lmschool.losses.lm import lm_loss  # noqa: E402
from lmschool.model import ModelConfig, build_model  # noqa: E402
from lmschool.trainer import TrainConfig, Trainer  # noqa: E402

L4_256 = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
SEQ, BATCH = 256, 8


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def data(seed=0) -> TokenWindows:
    """The school world's corpus (default preset) under a 4096-token BPE: real text, so the loss
    curves mean something."""
    from lmschool.data.text import read_documents
    from lmschool.tokenizer import train_tokenizer
    from lmschool.world.build import write
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp) / "w", seed=0, preset_name="default")
        docs = list(read_documents(Path(tmp) / "w" / "corpus.txt"))
    tok = train_tokenizer(docs, L4_256.vocab_size)
    ids = [t for doc in tok.encode_batch(docs, add_special_tokens=False) for t in (*doc, tok.eos_id)]
    return TokenWindows(np.array(ids, dtype=np.uint16), SEQ, BATCH, seed=seed)


def transformers_step(path: Path, precision: str):
    """A plain PyTorch loop over transformers.LlamaForCausalLM: forward, loss, backward, clip, step."""
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step(b):
        with ctx():
            logits = model(input_ids=b["input_ids"]).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), b["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def lmschool_step(precision: str, compile_: bool, max_steps: int, run_dir: Path):
    cfg = TrainConfig(max_steps=max_steps, batch_size=BATCH, lr=1e-3, warmup_steps=0, schedule="constant",
                      precision=precision, compile=compile_, device="cpu", grad_clip=1.0)
    trainer = Trainer(build_model(L4_256, seed=0), lm_loss, cfg, run_dir, progress=False)
    return lambda b: trainer.train_step([b])["loss"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    flops_tok = L4_256.flops_per_token(SEQ)
    src = data()
    batches = [src.micro_batches(s, 1, 0, 1)[0] for s in range(args.steps + args.warmup)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "l4"
        save_model(path, build_model(L4_256, seed=0))
        configs = [("transformers", "fp32", False), ("transformers", "bf16", False),
                   ("lmschool", "fp32", False), ("lmschool", "fp32", True), ("lmschool", "bf16", False),
                   ("lmschool", "bf16", True)]
        steps = {}
        for side, precision, comp in configs:       # build and warm up (compiles) every side first
            fn = (transformers_step(path, precision) if side == "transformers"
                  else lmschool_step(precision, comp, 10 ** 6, Path(tmp) / f"run-{precision}-{comp}"))
            for b in batches[:args.warmup + (3 if comp else 0)]:
                fn(b)
            steps[(side, precision, comp)] = fn
        # interleaved rounds: every side sees the same drift of a shared machine
        times = {k: [] for k in steps}
        per_round = 4
        for r in range(max(1, args.steps // per_round)):
            for k, fn in steps.items():
                t = time.perf_counter()
                for b in batches[r * per_round:(r + 1) * per_round]:
                    fn(b)
                times[k].append((time.perf_counter() - t) / per_round)
        for (side, precision, comp), ts in times.items():
            tps = BATCH * SEQ / statistics.median(ts)
            rows.append({"side": side, "precision": precision, "compile": comp, "tokens_per_s": tps,
                         "mfu": tps * flops_tok / ceilings[precision]})
            print(f"{side:13s} {precision} compile={comp!s:5s} {tps:8.0f} tok/s  MFU {rows[-1]['mfu']:.2f}",
                  flush=True)
        del steps

        curves = {}
        if args.curve_steps:
            cb = [src.micro_batches(10_000 + s, 1, 0, 1)[0] for s in range(args.curve_steps)]
            best = max((r for r in rows if r["side"] == "lmschool"), key=lambda r: r["tokens_per_s"])
            for name, prec, comp in [("fp32", "fp32", False), ("best", best["precision"], best["compile"])]:
                fn = lmschool_step(prec, comp, args.curve_steps, Path(tmp) / f"c{name}")
                curves[name] = [fn(b) for b in cb]

    base = next(r for r in rows if r["side"] == "transformers" and r["precision"] == "fp32")["tokens_per_s"]
    base_bf16 = next(r for r in rows if r["side"] == "transformers" and r["precision"] == "bf16")["tokens_per_s"]
    print()
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (both sides)")
    print(f"matmul ceiling (2 threads): fp32 {ceilings['fp32'] / 1e9:.0f} GFLOP/s, bf16 {ceilings['bf16'] / 1e9:.0f} GFLOP/s")
    print("| side | precision | torch.compile | tokens/s | MFU | vs transformers fp32 | vs transformers same precision |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        same = base if r["precision"] == "fp32" else base_bf16
        print(f"| {r['side']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['tokens_per_s']:.0f} | "
              f"{r['mfu']:.2f} | {r['tokens_per_s'] / base:.2f}x | {r['tokens_per_s'] / same:.2f}x |")
    if curves:
        a, b = np.array(curves["fp32"]), np.array(curves["best"])
        print(f"\nloss over {len(a)} steps (mean of each 20-step block), fp32 vs best:")
        for i in range(0, len(a), 20):
            print(f"  steps {i:3d}-{i + 19:3d}: fp32 {a[i:i + 20].mean():.4f}  best {b[i:i + 20].mean():.4f}")
        print(f"  final 20-step mean difference: {abs(a[-20:].mean() - b[-20:].mean()):.4f}")
    if args.json:
        args.json.write_text(json.dumps({"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows, "ceilings": ceilings, "curves": curves,
                                         "torch": torch.__version__, "machine": platform.processor()}, indent=2))


if __name__ == "__main__":
    main()
