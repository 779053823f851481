"""Run every benchmark in bench/, one after another (they need a quiet machine: run nothing else).

    .venv/bin/python bench/run_all.py [--only train,generate,...]

Each script prints its markdown table; copy the rows with the date and machine into RESULTS.md.
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}

ap = argparse.ArgumentParser()
ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(SCRIPTS)}")
args = ap.parse_args()
names = args.only.split(",") if args.only else list(SCRIPTS)
failed = []
for name in names:
    if name not in SCRIPTS:
        sys.exit(f"unknown benchmark {name!r}; known: {', '.join(SCRIPTS)}")
    print(f"\n===== bench_{name}.py =====", flush=True)
    if subprocess.run([sys.executable, str(SCRIPTS[name])]).returncode != 0:
        failed.append(name)
sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
