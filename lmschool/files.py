"""Atomic writes, and `--force` that replaces only what lmschool wrote.

Everything lmschool writes that a later command reads (checkpoints, the world's files, a trained
tokenizer, summaries) is written under a temporary name beside its place and renamed into it, so
a crash or an error never leaves a half-written file or directory behind. A replaced directory is
moved aside first and removed only once the new one is in place; `recover` finishes (or undoes) a
replacement that a kill interrupted, so the next command sees either the old state or the new one.

`--force` may replace a directory only when lmschool wrote it: `check_replaceable` refuses one
that holds anything else (a user's thesis.tex in a run directory is never deleted) or that lacks
the file its kind always has. This module imports no torch and nothing of lmschool but its errors,
so the world (plain data) may use it as the model side does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmschool.errors import UserError

# What lmschool writes into each kind of output directory, and the entry that marks it as one.
RUN_MARKER = ".lmschool-run"
OUTPUTS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    # a stage's run directory (the marker, or config.yaml for runs made before the marker)
    "run": (frozenset({RUN_MARKER, "config.yaml", "metrics.jsonl", "summary.json", "eval_answers.jsonl",
                       "data.json", "model", "checkpoints", "data", "tokenizer", "replay", "ptx",
                       "test_rewards.jsonl", "tensorboard", "wandb"}), (RUN_MARKER, "config.yaml")),
    "world": (frozenset({"README.md", "corpus.txt", "sft.jsonl", "prompts.jsonl", "prefs.jsonl", "eval.jsonl",
                         "world.json"}), ("world.json",)),
    "tokenizer": (frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "chat_template.jinja"}), ("tokenizer.json",)),
    # a model directory (`lmschool import`): its checksummed manifest marks it as lmschool's
    "model": (frozenset({"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                         "manifest.json"}), ("manifest.json",)),
}


def is_temporary(name: str) -> bool:
    """A name lmschool gives what it writes before renaming it into place (".x.tmp-123", ...)."""
    return name.startswith(".") and any(tag in name for tag in (".tmp", ".old-", ".replacing", ".replaced"))


def check_replaceable(path: Path, kind: str, flag: str = "--out") -> None:
    """Refuse to --force-replace `path` unless lmschool wrote it as a `kind` directory: every entry
    is one lmschool writes there, and the entry that marks the kind is present."""
    names, markers = OUTPUTS[kind]
    entries = sorted(p.name for p in path.iterdir())
    foreign = [n for n in entries if n not in names and not is_temporary(n)]
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{flag} {path} holds {listed}, which lmschool did not write; --force replaces only "
                        f"an lmschool {kind} directory and nothing else: choose another {flag}, or move "
                        "those files out first")
    if not any(m in entries for m in markers):
        raise UserError(f"{flag} {path} is not an lmschool {kind} directory (it has no {markers[0]}); "
                        f"--force replaces only one lmschool wrote: choose another {flag}")


def is_output(path: Path, kind: str) -> bool:
    """Whether `path` holds the entry that marks an lmschool `kind` directory (its other entries
    aside: a user's notes in a run keep it a run)."""
    return any((path / m).exists() for m in OUTPUTS[kind][1])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path` that replaces `path` only when the block finishes.

    An error inside the block removes the temporary directory and leaves `path` as it was. The
    finished directory is renamed to `staging_dir(path)` and swapped in (`swap_in`), so a kill at any
    instant leaves the old `path` or the new one (`recover` completes an interrupted swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        staging = staging_dir(path)
        shutil.rmtree(staging, ignore_errors=True)
        os.replace(tmp, staging)
        swap_in(staging, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def ordinary_file(path: str | os.PathLike) -> None:
    """Give `path` the mode a newly created file gets here (0o666 less the umask), as a library that
    writes its files private (0600) would not."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_output_file(path: Path, force: bool, flag: str = "--out") -> None:
    """Before any long work: a file `path` can be written here, and replaces an existing file
    only with --force."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise UserError(f"{flag} {path} exists; pass --force to replace it or choose another name")
    check_writable(path, flag)


def check_output_dir(out: Path, kind: str, force: bool) -> None:
    """Before any long work, for a command that writes one output directory of `kind` (OUTPUTS):
    not a file; leftovers of a killed write removed; a non-empty one replaced only with --force
    and only if it is such an output (never a user's files); writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    clean_leftovers(out)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out} exists and is not empty; pass --force to replace it "
                            "or choose another directory")
        check_replaceable(out, kind)
    check_writable(out)


def check_writable(path: Path, flag: str = "--out") -> None:
    """Before any long work: `path` (a file or directory) can be made or written, as its nearest
    existing ancestor (itself, if it is a directory) is a writable directory and not a file."""
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")


# ---- replacing a directory: build the new one beside it, swap it in at the end ------------------

def staging_dir(path: Path) -> Path:
    """Where a --force run builds the directory that will replace `path` (one name per path, so
    every torchrun rank finds it)."""
    return path.parent / f".{path.name}.replacing"


def swap_in(staging: Path, path: Path) -> None:
    """Put the finished `staging` directory in the place of `path`: the old one is moved aside,
    the new one renamed in, then the old one removed. A kill in between is mended by `recover`."""
    aside = path.parent / f".{path.name}.replaced"
    if path.exists():
        os.replace(path, aside)
    os.replace(staging, path)
    shutil.rmtree(aside, ignore_errors=True)


def recover(path: Path) -> str | None:
    """Mend what a kill left beside `path`; return one line saying what was done, or None.

    - the old directory moved aside and the finished new one not yet renamed in: rename it in;
    - both renames done, the old one not yet removed: remove it;
    - a --force run killed before it finished (its staging directory): remove it; `path`, the old
      run, was never touched."""
    aside, staging = path.parent / f".{path.name}.replaced", staging_dir(path)
    note = None
    if aside.exists() and not path.exists() and staging.is_dir():
        os.replace(staging, path)
        note = f"{path}: finished replacing it (a kill had stopped between the two renames)"
    elif aside.exists() and not path.exists():
        os.replace(aside, path)
        note = f"{path}: put the old directory back (a kill had stopped its replacement)"
    shutil.rmtree(aside, ignore_errors=True)
    if staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        note = note or f"{path}: removed the unfinished replacement a killed --force run left beside it"
    return note


def clean_leftovers(path: Path, inside: tuple[str, ...] = ()) -> list[str]:
    """At a command's start: mend or remove what killed writers left of `path` — beside it, its
    unfinished temporary copies (".NAME.tmp-*") and an interrupted swap (`recover`); inside it and in
    its subdirectories `inside` (e.g. "checkpoints"), unfinished temporary entries, but only when
    `path` is an lmschool run. Nothing else is touched. Returns one line per thing done."""
    notes = []
    if path.parent.is_dir():
        for entry in sorted(path.parent.glob(f".{path.name}.tmp-*")):
            _remove(entry)
            notes.append(f"removed {entry}, left unfinished by a killed write")
    note = recover(path)
    if note:
        notes.append(note)
    if not is_output(path, "run"):
        return notes
    for directory in (path, *(path / d for d in inside)):
        for entry in sorted(directory.glob(".*.tmp-*")) if directory.is_dir() else []:
            _remove(entry)
            notes.append(f"removed {entry}, left unfinished by a killed write")
        for entry in sorted(directory.glob(".*.replac*")) if directory.is_dir() else []:
            note = recover(directory / entry.name[1:].rsplit(".", 1)[0])
            if note:
                notes.append(note)
    return notes


def _remove(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
