"""`lmschool run`: the whole pipeline on the school world, one run directory per stage.

    lmschool run [--out runs/demo] [--preset tiny|default] [--from STAGE] [STAGE.key=value ...]

Stages run in order (world -> pretrain -> ... as they are built), each as its own command
with its own run directory under --out. A finished stage (its summary is written) is not
redone when `run` is started again; an unfinished one resumes from its last checkpoint;
`--from STAGE` redoes that stage and every later one. A failed stage stops the run, names the
stage, and leaves the earlier stages intact.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmschool.errors import UserError

HELP = "run the whole pipeline on the school world (world, pre-training, ...)"

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Stage:
    name: str
    done_file: str                                  # relative to the stage directory
    argv: Callable[[Path, str, list[str]], list[str]]  # (out, preset, overrides) -> CLI argv


def _config(name: str, preset: str) -> list[str]:
    path = CONFIGS / f"{name}-{preset}.yaml"
    if not path.is_file():
        path = CONFIGS / f"{name}.yaml"
    return ["--config", str(path)] if path.is_file() else []


STAGES = [
    Stage("world", "world.json",
          lambda out, preset, o: ["world", "--out", str(out / "world"), "--preset", preset, "--force"]),
    Stage("pretrain", "summary.json",
          lambda out, preset, o: ["pretrain", "--data", str(out / "world" / "corpus.txt"),
                                  "--out", str(out / "pretrain"), *_config("pretrain", preset), *o]),
    Stage("sft", "summary.json",
          lambda out, preset, o: ["sft", "--init", str(out / "pretrain"), "--data", str(out / "world" / "sft.jsonl"),
                                  "--eval", str(out / "world" / "eval.jsonl"),
                                  "--replay", str(out / "world" / "corpus.txt"), "--out", str(out / "sft"),
                                  *_config("sft", preset), *o]),
]
NAMES = [s.name for s in STAGES]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR")
    parser.add_argument("--preset", choices=["tiny", "default"], default="default",
                        help="tiny: seconds, for tests; default: the full demo")
    parser.add_argument("--from", dest="from_stage", choices=NAMES, help="redo this stage and all later ones")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.key=value",
                        help="per-stage config overrides, e.g. pretrain.max_steps=100")


def split_overrides(items: list[str]) -> dict[str, list[str]]:
    per_stage: dict[str, list[str]] = {n: [] for n in NAMES}
    for item in items:
        stage, _, rest = item.partition(".")
        if stage not in per_stage or not rest or "=" not in rest:
            raise UserError(f"override '{item}' must look like STAGE.key=value with STAGE one of "
                            f"{', '.join(NAMES)} (e.g. pretrain.max_steps=100)")
        per_stage[stage].append(rest)
    return per_stage


def run(args: argparse.Namespace) -> int:
    from lmschool.cli import main as cli_main

    out: Path = args.out
    overrides = split_overrides(args.overrides)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_stage:
        for stage in STAGES[NAMES.index(args.from_stage):]:
            shutil.rmtree(out / stage.name, ignore_errors=True)
    t0 = time.time()
    seconds: dict[str, float] = {}
    timing_file = out / "timings.json"
    if timing_file.is_file():
        seconds = json.loads(timing_file.read_text())
    for i, stage in enumerate(STAGES, 1):
        stage_dir = out / stage.name
        header = f"[{i}/{len(STAGES)}] {stage.name}"
        if (stage_dir / stage.done_file).is_file():
            print(f"{header}: done already ({stage_dir})", file=sys.stderr)
            continue
        argv = stage.argv(out, args.preset, overrides[stage.name])
        if stage.name != "world" and stage_dir.exists():
            argv.append("--resume")
        print(f"{header}: lmschool {' '.join(argv)}  (elapsed {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        t_stage = time.time()
        status = cli_main(argv)
        if status != 0:
            print(f"lmschool run: stage '{stage.name}' failed (exit {status}); earlier stages in {out} are "
                  f"intact. Fix the cause and run again to continue from this stage.", file=sys.stderr)
            return status
        seconds[stage.name] = seconds.get(stage.name, 0.0) + time.time() - t_stage
        timing_file.write_text(json.dumps(seconds, indent=2) + "\n")
    print(f"lmschool run: all {len(STAGES)} stages done in {time.time() - t0:.0f}s -> {out}", file=sys.stderr)
    return 0
