"""Kill -9 matrix for `lmschool run --preset tiny` (issue 19): every kill point resumes to the same
weights, bit for bit, as an uninterrupted fp32 run.

One uninterrupted reference run, then for each kill point a run into a fresh --out that is killed
with SIGKILL at that point and started again with the same command until it finishes. Every
stage's final weights (each safetensors tensor, byte for byte), the world, label's preferences and
the summary figures that must be deterministic are compared with the reference's.

Kill points are seeded (random.Random(seed) picks the checkpoint after which to kill, or the delay
after a stage starts). Kills *inside* a write do not rely on timing: the poller spins on the run
directory and kills the moment a temporary checkpoint directory (".step-N.tmp-*") or label's
half-written pair (a ".prefs.summary.json.tmp-*", or prefs.summary.json without prefs.jsonl)
appears; the landing column says where the kill really landed, read from what the kill left.

    python bench/kill_matrix.py [--quick] [--markdown] [--only POINT] [--work DIR]

fp32, no compile, one thread per stage: the overrides the project uses for bit-for-bit comparisons.
Stages are made longer than the tiny preset's (with early checkpoints) so that kills land inside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmschool.files import is_temporary

TRAINED = ("pretrain", "sft", "reward", "dpo", "ipo", "simpo", "ppo", "grpo")
ORDER = ("world", "pretrain", "sft", "label", *TRAINED[2:])
FP32 = [f"{s}.{k}" for s in (*TRAINED, "label") for k in ("precision=fp32", "compile=false", "threads=1")]
# Longer stages with early checkpoints, so that a kill after a checkpoint still lands in its stage.
SAVE_EVERY = {"pretrain": (5, 40), "sft": (5, 20), "reward": (4, 12), "dpo": (4, 12), "ppo": (2, 8), "grpo": (2, 6)}
LONGER = [f"{s}.{k}={v}" for s, (every, last) in SAVE_EVERY.items()
          for k, v in (("max_steps", last), ("save_every", every))]
TIMING = ("seconds", "time", "per_s", "per_second", "eta", "elapsed")  # summary keys allowed to differ
MAX_RERUNS = 3


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "lmschool", "run", "--out", str(out), "--preset", "tiny", *FP32, *LONGER]


def done(out: Path, stage: str) -> bool:
    marker = {"world": out / "world" / "world.json", "label": out / "label" / "prefs.jsonl"}
    return (marker.get(stage) or out / stage / "summary.json").is_file()


def current_stage(out: Path) -> str:
    return next((s for s in ORDER if not done(out, s)), "finished")


def _steps(out: Path, stage: str) -> list[int]:
    ckpts = out / stage / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.glob("step-*")) if ckpts.is_dir() else []


# ---- kill points: (name, seed) -> a trigger(out, started) -> bool, and a landing description ----

@dataclass
class Point:
    name: str
    seed: int
    trigger: object = None          # (out, t_start) -> bool: kill now
    landed: object = None           # (out) -> str, read right after the kill
    in_write: bool = False          # a point meant to land inside a write
    hit: bool | None = None         # for in_write points: did it land inside?
    attempts: int = 1               # tries at an in-write point until one lands inside
    start_at: str | None = None     # begin from a copy of the reference with this stage and later ones removed


def after_checkpoint(stage: str, seed: int) -> Point:
    every, last = SAVE_EVERY[stage]
    step = random.Random(seed).choice(range(every, last, every))  # never the last: the stage then ends
    p = Point(f"{stage} after step {step}", seed)
    p.trigger = lambda out, t0: step in _steps(out, stage)
    p.landed = lambda out: f"{current_stage(out)}, last ckpt {(_steps(out, stage) or [None])[-1]}"
    return p


def delay_into(stage: str, seed: int) -> Point:
    """Kill a seeded delay after `stage` begins: when the stage before it is done (the world: when
    --out appears). A stage's own directory appears too late to tell (label's only at its end)."""
    delay = random.Random(seed).uniform(0.0, 1.0)
    p = Point(f"{stage} +{delay:.2f}s", seed)
    before = ORDER[ORDER.index(stage) - 1] if stage != "world" else None
    begun = {}

    def trigger(out, t0):
        if "t" not in begun and (done(out, before) if before else out.exists()):
            begun["t"] = time.monotonic()
        return "t" in begun and time.monotonic() - begun["t"] >= delay
    p.trigger = trigger
    p.landed = lambda out: current_stage(out)
    return p


def inside_checkpoint_write(stage: str, seed: int) -> Point:
    """Kill the moment a temporary checkpoint directory of the seeded step appears."""
    every, last = SAVE_EVERY[stage]
    step = random.Random(seed).choice(range(every, last, every))
    p = Point(f"{stage} inside ckpt write {step}", seed, in_write=True)
    tmp = f".step-{step:08d}.tmp-*"
    p.trigger = lambda out, t0: any((out / stage / "checkpoints").glob(tmp))

    def landed(out):
        left = [q.name for q in (out / stage / "checkpoints").glob(f".step-{step:08d}*")]
        p.hit = bool(left)
        return f"{stage} step {step}: " + (", ".join(left) if left else "write already finished")
    p.landed = landed
    return p


def inside_label_write(seed: int, which: str) -> Point:
    """`summary`: kill when .prefs.summary.json.tmp-* appears; `between`: when prefs.summary.json is
    written and prefs.jsonl is not yet."""
    p = Point(f"label {which} write", seed, in_write=True)
    def trigger(out, t0):
        d = out / "label"
        if which == "summary":  # the write lasts microseconds: a bare listdir, no Path objects
            try:
                return any(n.startswith(".prefs.summary.json.tmp-") for n in os.listdir(d))
            except FileNotFoundError:
                return False
        return (d / "prefs.summary.json").is_file() and not (d / "prefs.jsonl").is_file()

    def landed(out):
        d = out / "label"
        tmp = [q.name for q in d.glob(".prefs*.tmp-*")]
        summary, prefs = (d / "prefs.summary.json").is_file(), (d / "prefs.jsonl").is_file()
        p.hit = bool(tmp) if which == "summary" else (summary and not prefs)
        return f"label: tmp={tmp or '-'} summary={'y' if summary else 'n'} prefs={'y' if prefs else 'n'}"
    p.trigger, p.landed = trigger, landed
    if which == "summary":  # rarely caught: several tries, each from the reference up to sft (label comes next)
        p.attempts, p.start_at = 8, "label"
    return p


def points(quick: bool, base_seed: int) -> list[Point]:
    s = base_seed
    # the kills inside writes first: they are the ones that need the poller's attention
    full = [inside_checkpoint_write("pretrain", s + 11), inside_checkpoint_write("sft", s + 12),
            inside_checkpoint_write("reward", s + 13), inside_checkpoint_write("ppo", s + 14),
            inside_label_write(s + 15, "summary"), inside_label_write(s + 16, "between"),
            delay_into("world", s + 1), after_checkpoint("pretrain", s + 2), delay_into("pretrain", s + 17),
            after_checkpoint("sft", s + 3), delay_into("label", s + 4), after_checkpoint("reward", s + 5),
            after_checkpoint("dpo", s + 6), delay_into("dpo", s + 18), delay_into("ipo", s + 7),
            delay_into("simpo", s + 8), after_checkpoint("ppo", s + 9), after_checkpoint("grpo", s + 10)]
    if quick:
        keep = ("pretrain after", "label +", "ppo after", "pretrain inside", "label between")
        return [p for p in full if p.name.startswith(keep)]
    return full


# ---- running, killing, comparing ----

def run_once(out: Path, log: Path, trigger=None) -> int:
    """Start the run; SIGKILL it when trigger(out, t0) holds (-9), else return its exit status.
    The poller spins without sleeping, so it sees a temporary file within microseconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "ab") as sink:
        proc = subprocess.Popen(command(out), stdout=sink, stderr=subprocess.STDOUT, env=env)
    t0 = time.monotonic()
    while proc.poll() is None:
        if trigger is not None and trigger(out, t0):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return -9
        if time.monotonic() - t0 > 1800:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{out}: hung; see {log}")
    return proc.returncode


def tensors(out: Path, stage: str) -> dict:
    return {f"{f.name}:{k}": v for f in sorted((out / stage / "model").glob("*.safetensors"))
            for k, v in load_file(f).items()}


def same_weights(a: Path, b: Path, stage: str) -> bool:
    x, y = tensors(a, stage), tensors(b, stage)
    return bool(x) and x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and x[k].contiguous().view(-1).view(torch.uint8).equal(y[k].contiguous().view(-1).view(torch.uint8))
        for k in x)


def figures(obj, prefix=""):
    """Numeric leaves of a summary, without the timing ones."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(t in k.lower() for t in TIMING):
                yield from figures(v, f"{prefix}{k}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix.rstrip("."), obj


def summary_diffs(a: Path, b: Path) -> list[str]:
    diffs = []
    for stage in (*TRAINED, "label"):
        name = "label/prefs.summary.json" if stage == "label" else f"{stage}/summary.json"
        fa, fb = (dict(figures(json.loads((r / name).read_text()))) for r in (a, b))
        diffs += [f"{name}:{k}" for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)]
    for name in ("world/world.json", "label/prefs.jsonl"):
        if (a / name).read_bytes() != (b / name).read_bytes():
            diffs.append(name)
    return diffs


def leftovers(out: Path) -> list[str]:
    """Temporary files and directories inside the run, or beside it, after it finished."""
    inside = [p for p in out.rglob("*") if is_temporary(p.name)]
    beside = [p for p in out.parent.glob(f".{out.name}*") if is_temporary(p.name)]
    return sorted(str(p.relative_to(out.parent)) for p in inside + beside)


@dataclass
class Row:
    point: str
    seed: int
    landed: str
    reruns: int
    weights: dict = field(default_factory=dict)
    diffs: list = field(default_factory=list)
    left: list = field(default_factory=list)
    ok: bool = False


def fresh_out(p: Point, root: Path, ref: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = root / "run"
    if p.start_at:
        shutil.copytree(ref, out)
        (out / "report.json").unlink(missing_ok=True)
        for stage in ORDER[ORDER.index(p.start_at):]:
            shutil.rmtree(out / stage)
    return out


def case(p: Point, work: Path, ref: Path) -> Row:
    root = work / f"case-{p.seed}"
    for attempt in range(1, p.attempts + 1):
        out, log = fresh_out(p, root, ref), root / "run.log"
        rc = run_once(out, log, p.trigger)
        landed = p.landed(out) if rc == -9 else f"not killed (exit {rc})"
        if p.hit or attempt == p.attempts:
            break
    if p.attempts > 1:
        landed += f" (try {attempt} of {p.attempts}; from the reference's {ORDER[ORDER.index(p.start_at) - 1]})"
    reruns = 0
    while rc != 0 and reruns < MAX_RERUNS:
        reruns += 1
        rc = run_once(out, log)
    row = Row(p.name, p.seed, landed, reruns)
    if rc != 0:
        row.landed += f"; rerun failed (exit {rc}, see {log})"
        return row
    row.weights = {s: same_weights(ref, out, s) for s in TRAINED}
    row.diffs = summary_diffs(ref, out)
    row.left = leftovers(out)
    row.ok = all(row.weights.values()) and not row.diffs and not row.left
    return row


def table(rows: list[Row], markdown: bool) -> str:
    head = ["kill point", "seed", "landed", "reruns", "weights identical", "other diffs", "left behind"]
    body = [[r.point, str(r.seed), r.landed, str(r.reruns),
             "all 8" if r.weights and all(r.weights.values()) else
             ("NO: " + ",".join(s for s, v in r.weights.items() if not v) if r.weights else "-"),
             ", ".join(r.diffs[:4]) + (f" (+{len(r.diffs) - 4})" if len(r.diffs) > 4 else "") or "none",
             ", ".join(r.left) or "none"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *body])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="five kill points instead of the full matrix")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--only", default="", help="run only the kill points whose name starts with this")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the kill points")
    ap.add_argument("--work", type=Path, default=Path("runs/kill_matrix"), help="where runs are written")
    args = ap.parse_args(argv)
    marker = args.work / ".kill-matrix"   # --work is removed piece by piece: only a directory this script made
    if args.work.is_dir() and any(args.work.iterdir()) and not marker.is_file():
        ap.error(f"--work {args.work} holds files this script did not write; give a new or empty directory")
    args.work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    ref = args.work / "ref" / "run"
    if not (ref / "report.json").is_file():
        shutil.rmtree(ref.parent, ignore_errors=True)
        ref.parent.mkdir(parents=True)
        t = time.monotonic()
        assert run_once(ref, ref.parent / "run.log") == 0, f"reference run failed; see {ref.parent / 'run.log'}"
        print(f"reference: {time.monotonic() - t:.0f}s", file=sys.stderr)
    rows, pts = [], [p for p in points(args.quick, args.seed) if p.name.startswith(args.only)]
    for p in pts:
        t = time.monotonic()
        rows.append(case(p, args.work, ref))
        r = rows[-1]
        print(f"{p.name}: {'ok' if r.ok else 'FAILED'} ({r.landed}; {time.monotonic() - t:.0f}s)", file=sys.stderr)
    print(table(rows, args.markdown))
    writes = [p for p in pts if p.in_write]
    print(f"\n{sum(r.ok for r in rows)}/{len(rows)} kill points resumed bit-identical with nothing left behind; "
          f"{sum(bool(p.hit) for p in writes)}/{len(writes)} in-write kills landed inside their write")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
