"""`lmschool run`: the whole pipeline on the school world, then its report.

    lmschool run [--out runs/demo] [--preset tiny|default] [--from STAGE] [--sweep] [STAGE.key=value ...]

The stages and how they run are in lmschool/pipeline.py; the report in lmschool/report/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmschool.pipeline import NAMES, SWEEP_DPO_BETAS, SWEEP_PPO_KL, run_stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR")
    parser.add_argument("--preset", choices=["tiny", "default"], default="default",
                        help="tiny: seconds, for tests; default: the full demo")
    parser.add_argument("--from", dest="from_stage", choices=NAMES, help="redo this stage and all later ones")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also run IPO, SimPO and GRPO, and DPO at beta {', '.join(map(str, SWEEP_DPO_BETAS))} "
                             f"and PPO at KL coefficients {', '.join(map(str, SWEEP_PPO_KL))} for the "
                             "reward-vs-KL frontier")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.key=value",
                        help="per-stage config overrides, e.g. pretrain.max_steps=100 dpo.beta=0.2")


def run(args: argparse.Namespace) -> int:
    status = run_stages(args.out, args.preset, from_stage=args.from_stage, sweep=args.sweep,
                        overrides=args.overrides)
    if status != 0:
        return status
    from lmschool.report import build_report
    build_report(args.out)
    print(f"lmschool run: report in {args.out / 'report.md'} (and report.json, plots/)", file=sys.stderr)
    return 0
