"""What every training stage's command shares: arguments, the preamble, the run directory, summary.

    lmschool <stage> --out DIR [--config FILE] [--resume | --force] [key=value ...]

The preamble, in the order a stage calls it: before --out is touched, `open_init` (the policy
checkpoint to start from and its chat tokenizer) and `max_length` (the longest sequence: the
config key, or --init's context, never more), the data, the models (loading one is its last
check) and `check_vocab` (every token id has a row in the model's embedding); then `open_run`
(--out: new, resumed or replaced) and `check_same_data` (a resumed run reads the data it started
with, as RUN/data.json records; `write_data_info` writes that file).

A run directory that already holds a run is never silently overwritten: `--resume` continues it
from its latest checkpoint, `--force` replaces it; otherwise the command stops before any work.
`--force` replaces only an lmschool run (a directory holding anything else is refused, naming
it), and only once the new run has finished: until then it is built in a sibling directory
(`files.staging_dir`) and the old run stays where it was, so a command that fails or is killed
never leaves less than there was. `finish_run` writes summary.json and swaps the new run in.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lmschool import config as config_lib
from lmschool.checkpoint import check_kind, is_model_dir, read_config, resolve
from lmschool.errors import UserError
from lmschool.files import (RUN_MARKER, atomic_write_text, check_replaceable, check_writable, clean_leftovers,
                            is_output, staging_dir, swap_in)
from lmschool.tokenizer import Tokenizer, check_chat_template

DATA_FILE = "data.json"
"""RUN/data.json: what the run trains on (its fingerprint, counts), to check on --resume."""


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


@dataclass
class RunDir:
    """Where a stage writes: `path` is --out itself, or, with --force on an existing run, the
    sibling that `finish_run` swaps into --out's place once the new run is complete."""

    out: Path
    path: Path
    resuming: bool
    finished: bool = False


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> RunDir:
    """Check --out before any work and make the directory to write (rank 0 only)."""
    for note in clean_leftovers(out, inside=("checkpoints",)):
        print(f"lmschool: {note}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    has_run = out.is_dir() and any(out.iterdir())
    if has_run and not (resume or force):
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it, --force to "
                        f"replace it, or choose another directory")
    if has_run and resume and not is_output(out, "run"):   # else it trains into a user's (or a world's) files
        raise UserError(f"--out {out} is not an lmschool run (it has no {RUN_MARKER}), so there is nothing to "
                        "--resume; choose another --out")
    check_writable(out)
    path = out
    if has_run and force:
        check_replaceable(out, "run")
        path = staging_dir(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).touch()
    return RunDir(out, path, resuming=has_run and resume)


def open_run(out: Path, args: argparse.Namespace, dist, stage: str) -> RunDir:
    """Check and prepare --out (rank 0), then sync. `finished` when the run is already finished
    (its summary and final model exist) and there is nothing to do."""
    from lmschool import distributed
    if dist.is_main:
        run = prepare_run_dir(out, resume=args.resume, force=args.force)
    distributed.barrier()
    if not dist.is_main:   # every rank writes where rank 0 decided
        staged = args.force and staging_dir(out).is_dir()
        run = RunDir(out, staging_dir(out) if staged else out, resuming=args.resume)
    if run.resuming and (out / "summary.json").is_file() and is_model_dir(out / "model"):
        print(f"{stage}: {out} is already finished (summary.json); nothing to do")
        run.finished = True
    return run


def finish_run(run: RunDir, summary: dict) -> Path:
    """Write summary.json (the run's done file) and, for a --force run, swap it into --out's place.
    Returns --out. Rank 0 only, as writing the summary is."""
    write_summary(run.path, summary)
    if run.path != run.out:
        swap_in(run.path, run.out)
    return run.out


# ---- the preamble ------------------------------------------------------------------------------

def open_init(path: str | Path, flag: str = "--init", chat_template: str | None = None) -> tuple[Path, Tokenizer]:
    """The checkpoint a stage starts from (a run or model directory, resolved), which must be a
    policy whose tokenizer has a chat template, and that tokenizer. `chat_template` ("chatml" or a
    Jinja file, `--chat-template`) replaces the checkpoint's own template (and is saved with the run)."""
    init = resolve(path)
    check_kind(init, "policy", flag)
    tokenizer = Tokenizer.load(init)
    if chat_template is not None:
        tokenizer.use_chat_template(chat_template)
    check_chat_template(tokenizer, init)
    return init, tokenizer


def add_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", metavar="chatml|FILE.jinja",
                        help="render conversations with this template instead of the checkpoint's own (saved "
                             "with the run, so later stages use it): chatml for lmschool's ChatML, or a Jinja file")


def context_length(init: Path) -> int | None:
    """The context of the checkpoint `init` (max_position_embeddings in its config.json), or None."""
    return int(read_config(init).get("max_position_embeddings", 0)) or None


def max_length(value: int | None, key: str, init: Path) -> int:
    """The longest sequence a stage reads: config key `key`'s `value`, or --init's context when it
    is null; never longer than that context (positions past it were never trained)."""
    context = context_length(init)
    if value is None:
        if context is None:
            raise UserError(f"{init}/config.json has no max_position_embeddings; set {key}")
        return context
    if context is not None and value > context:
        raise UserError(f"{key}={value} is longer than the context of {init} "
                        f"(max_position_embeddings {context}); use at most {context}")
    return value


def check_vocab(model, tokenizer: Tokenizer, where: str) -> None:
    """Every token id the tokenizer makes needs a row in the model's embedding."""
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"{where} has vocab_size {model.config.vocab_size}, smaller than the "
                        f"tokenizer's {tokenizer.vocab_size}")


def check_same_data(out: Path, info: dict, resuming: bool, keys: tuple[str, ...] = ("fingerprint",)) -> None:
    """On --resume, refuse other data than the run started with: `keys` of `info` (this run's
    data: a "fingerprint" of its contents, "data" its files) against RUN/data.json."""
    path = out / DATA_FILE
    if not (resuming and path.is_file()):
        return
    before = json.loads(path.read_text())
    changed = [k for k in keys if before.get(k) != info.get(k)]
    if changed:
        def show(record: dict) -> str:
            return ", ".join(f"{k} {record.get(k)}" for k in changed) + f" (data: {record.get('data', '?')})"

        raise UserError(f"--resume: the training data differs from the data this run started with: "
                        f"{path} records {show(before)}, the data given now has {show(info)}; resume "
                        "with the same data and settings, or use --force")


def write_data_info(out: Path, info: dict) -> None:
    atomic_write_text(out / DATA_FILE, json.dumps(info, indent=2) + "\n")


# ---- the run directory's files ----------------------------------------------------------------

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
