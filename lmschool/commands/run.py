"""`lmschool run`: the whole pipeline on the school world, then its report.

    lmschool run [--out runs/demo] [--preset tiny|default|smollm2] [--base CKPT] [--from STAGE] [--sweep]
                 [STAGE.key=value ...]

    lmschool run --preset smollm2 --out runs/smollm2          # SmolLM2-135M-Instruct through all three stages
    lmschool run --base models/qwen3-0.6b --preset smollm2     # any supported checkpoint, the same sizes

The stages and how they run are in lmschool/pipeline.py; the report in lmschool/report/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmschool.pipeline import NAMES, PRESETS, SWEEP_DPO_BETAS, SWEEP_PPO_KL, run_stages, smollm2_gguf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR")
    parser.add_argument("--preset", choices=list(PRESETS), default="default",
                        help="tiny: seconds, for tests; default: the full demo; smollm2: a smaller world and "
                             "steps for a 135M model (--base defaults to SmolLM2-135M-Instruct)")
    parser.add_argument("--base", type=Path, metavar="CKPT",
                        help="teach this model instead of one trained from scratch: a Hugging Face directory "
                             "(llama, mistral, qwen2, qwen3) or a .gguf file; judged first (the report's base column)")
    parser.add_argument("--from", dest="from_stage", choices=NAMES, help="redo this stage and all later ones")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also run IPO, SimPO and GRPO, and DPO at beta {', '.join(map(str, SWEEP_DPO_BETAS))} "
                             f"and PPO at KL coefficients {', '.join(map(str, SWEEP_PPO_KL))} for the "
                             "reward-vs-KL frontier")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.key=value",
                        help="per-stage config overrides, e.g. pretrain.max_steps=100 dpo.beta=0.2")


def run(args: argparse.Namespace) -> int:
    base = args.base
    if base is None and args.preset == "smollm2":
        base = smollm2_gguf()   # not installed: one line naming the pip command
    status = run_stages(args.out, args.preset, from_stage=args.from_stage, sweep=args.sweep,
                        overrides=args.overrides, base=base.resolve() if base is not None else None)
    if status != 0:
        return status
    from lmschool.report import build_report
    build_report(args.out)
    print(f"lmschool run: report in {args.out / 'report.md'} (and report.json, plots/)", file=sys.stderr)
    return 0
