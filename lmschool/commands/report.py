"""`lmschool report DIR`: (re)write the report of a `lmschool run` directory (lmschool/report/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmschool.report import build_report
from lmschool.data.prompts import SIDE_BY_SIDE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="DIR", help="the --out directory of `lmschool run`")
    parser.add_argument("--samples", type=int, default=SIDE_BY_SIDE, metavar="N",
                        help=f"eval prompts answered side by side by each model (0 = none; pre-training "
                             f"answers the first {SIDE_BY_SIDE})")


def run(args: argparse.Namespace) -> int:
    report = build_report(args.run_dir, samples=args.samples)
    print(f"report: {args.run_dir / 'report.md'}, {args.run_dir / 'report.json'}, {len(report['plots'])} plots")
    return 0
