"""What the side-by-side benchmarks (bench_dpo, bench_reward, bench_grpo) share: each (side,
precision) runs in its own child process (the script itself with --child), the sides alternating
from round to round, and the child reports one line "RESULT {json}" on stdout."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SIDES = ("lmschool", "trl")

# offline and quiet, before transformers / trl / datasets are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """Threads, rounds, precisions, --json, and the hidden arguments of a child run."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--lmschool-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for lmschool's side (e.g. the setting before a change)")
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)


def print_versions() -> dict:
    """Print and return the library versions and the machine."""
    import torch
    import transformers
    import trl
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__}
    print(json.dumps(versions), f"| {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", flush=True)
    return versions


def report(result: dict) -> None:
    """A child's last words: its result as one parseable line."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(a: argparse.Namespace, sides: dict[str, Callable], *plan) -> None:
    """In a child process: run side `a.child`'s function on (args, data file, *plan, a temporary
    directory) and report its result."""
    with tempfile.TemporaryDirectory() as tmp:
        report(sides[a.child](a, a.data, *plan, Path(tmp)))


def run_rounds(rounds: int, precisions: list[str], command: Callable[[str, str], list[str]],
               describe: Callable[[dict], str]) -> dict[tuple[str, str], list[dict]]:
    """Run `command(side, precision)` for every round, precision and side (lmschool first in even
    rounds, TRL first in odd ones); returns (side, precision) -> the children's results, each with
    its wall time `wall_s`. A failed child is reported with its stderr and left out."""
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(rounds):
        for precision in precisions:
            for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
                t = time.perf_counter()
                p = subprocess.run(command(side, precision), capture_output=True, text=True)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not lines:
                    print(f"{side} {precision} FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
                    continue
                res = json.loads(lines[-1][len("RESULT "):])
                res["wall_s"] = time.perf_counter() - t
                results.setdefault((side, precision), []).append(res)
                print(f"round {rnd} {side:8s} {precision}: {describe(res)}, run {res['wall_s']:.0f}s", flush=True)
    return results


def medians(results: dict[tuple[str, str], list[dict]], precision: str, keys: list[str]) -> dict[str, dict]:
    """side -> {key: median over rounds} for one precision (sides that produced results)."""
    return {s: {k: statistics.median(r[k] for r in results[(s, precision)]) for k in keys}
            for s in SIDES if (s, precision) in results}


def write_json(path: Path | None, versions: dict, table: list[dict], results: dict, **extra) -> None:
    """--json: versions, the table of medians, every child's result (and `extra` keys)."""
    if path:
        path.write_text(json.dumps({"versions": versions, **extra, "table": table,
                                    "runs": {f"{s}/{p}": r for (s, p), r in results.items()}}, indent=1))
