"""What every training stage's command shares: arguments, the run directory, config, summary.

    lmschool <stage> --out DIR [--config FILE] [--resume | --force] [key=value ...]

A run directory that already holds a run is never silently overwritten: `--resume` continues it
from its latest checkpoint, `--force` replaces it; otherwise the command stops before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from lmschool import config as config_lib
from lmschool.files import atomic_write_text
from lmschool.errors import UserError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run directory to write")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of config values")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    group.add_argument("--force", action="store_true", help="replace --out if it already holds a run")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted for nesting (e.g. max_steps=200 model.hidden_size=128)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def load_stage_config(cls, args: argparse.Namespace):
    if getattr(args, "help_config", False):
        print("\n".join(config_lib.describe(cls)))
        raise SystemExit(0)
    return config_lib.load(cls, args.config, args.overrides)


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> bool:
    """Check --out before any work. Returns True when there is a run to resume."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    has_run = out.is_dir() and any(out.iterdir())
    if has_run and not (resume or force):
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it, --force to "
                        f"replace it, or choose another directory")
    parent = out.parent if not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable")
    if has_run and force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return has_run and resume


def open_run(out: Path, args: argparse.Namespace, dist, stage: str) -> bool | None:
    """Check and prepare --out (rank 0), then sync. Returns whether the run resumes, or None
    when it is already finished (its summary and final model exist) and there is nothing to do."""
    from lmschool import distributed
    resuming = prepare_run_dir(out, resume=args.resume, force=args.force) if dist.is_main else args.resume
    distributed.barrier()
    if resuming and (out / "summary.json").is_file() and (out / "model" / "config.json").is_file():
        print(f"{stage}: {out} is already finished (summary.json); nothing to do")
        return None
    return resuming


def save_resolved_config(cfg, out: Path) -> None:
    config_lib.save(cfg, out / "config.yaml")


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


class Timer:
    def __init__(self):
        self.t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0
