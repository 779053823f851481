"""`lmschool report DIR`: (re)write the report of a `lmschool run` directory (lmschool/report/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmschool.errors import UserError
from lmschool.files import check_output_file
from lmschool.report import build_report
from lmschool.data.prompts import SIDE_BY_SIDE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="DIR", help="the --out directory of `lmschool run`")
    parser.add_argument("--samples", type=int, default=SIDE_BY_SIDE, metavar="N",
                        help=f"eval prompts answered side by side by each model (0 = none; pre-training "
                             f"answers the first {SIDE_BY_SIDE})")


def check_run_dir(run_dir: Path) -> None:
    """Before anything is written into DIR: it is a `lmschool run` directory (it holds one of the
    pipeline's stages), and the report's files can be written there."""
    from lmschool.pipeline import NAMES

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give the --out directory of `lmschool run`")
    if not any((run_dir / name).is_dir() for name in NAMES):
        raise UserError(f"{run_dir} holds none of the stages of `lmschool run` ({', '.join(NAMES)}), so there "
                        "is nothing to report and the report is not written there; give the --out directory of "
                        "`lmschool run`")
    for name in ("report.md", "report.json"):
        check_output_file(run_dir / name, force=True, flag=f"DIR/{name}")
    if (run_dir / "plots").exists() and not (run_dir / "plots").is_dir():
        raise UserError(f"{run_dir / 'plots'} is a file; the report writes its plots into a directory of that name")


def run(args: argparse.Namespace) -> int:
    if args.samples < 0:
        raise UserError(f"--samples {args.samples}: give a number >= 0 (0 = no answers side by side)")
    check_run_dir(args.run_dir)
    report = build_report(args.run_dir, samples=args.samples)
    print(f"report: {args.run_dir / 'report.md'}, {args.run_dir / 'report.json'}, {len(report['plots'])} plots")
    return 0
