"""Compare two `lmschool run` directories figure for figure: report.json, every stage's
summary.json and metrics.jsonl (line by line), the eval answers and the preference pairs.
Wall times, throughput, paths and dates are left out (they differ between any two runs).

    python bench/compare_runs.py BEFORE AFTER        # prints each difference, or IDENTICAL; exit 1 on any

Used for behaviour-preserving changes (issue 14): the same `lmschool run --preset tiny` in fp32
without compile, on one thread, before and after, must give the same numbers
(bench/RESULTS.md, "Session 5").
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

IGNORED = ("seconds", "time", "tokens_per_s", "per_s", "path", "init", "dir", "out", "_at", "elapsed", "eta",
           "reward_source", "prompts", "data", "world", "reference", "created")


def ignored(key: str) -> bool:
    return any(word in key.lower() for word in IGNORED)


def walk(a, b, where: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if ignored(str(k)):
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
            else:
                walk(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} items before, {len(b)} after")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{where}[{i}]", diffs)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        diffs.append(f"{where}: {str(a)[:80]!r} before, {str(b)[:80]!r} after")


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(before: Path, after: Path) -> list[str]:
    diffs: list[str] = []
    for f in sorted(before.glob("*/summary.json")) + [before / "report.json"]:
        g = after / f.relative_to(before)
        if not g.is_file():
            diffs.append(f"{g}: missing")
        else:
            walk(json.loads(f.read_text()), json.loads(g.read_text()), str(f.relative_to(before)), diffs)
    for f in sorted(before.glob("*/metrics.jsonl")):
        g = after / f.relative_to(before)
        if not g.is_file():
            diffs.append(f"{g}: missing")
        else:
            walk(jsonl(f), jsonl(g), str(f.relative_to(before)), diffs)
    for f in sorted(before.glob("*/eval_answers.jsonl")) + sorted(before.glob("label/prefs.jsonl")):
        g = after / f.relative_to(before)
        if not g.is_file() or f.read_bytes() != g.read_bytes():
            diffs.append(f"{f.relative_to(before)}: differs")
    return diffs


if __name__ == "__main__":
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) if found else "IDENTICAL (report.json, every summary.json and metrics.jsonl, "
          "eval answers, preference pairs)")
    sys.exit(1 if found else 0)
