"""Collecting a pipeline run's figures into report.json's shape, from the files its stages left.

Reads, per stage of the registry (lmschool/pipeline.py: directory, done file, numbers file, kind),
its numbers file (summary.json; the world's world.json, labelling's prefs.summary.json),
DIR/timings.json, DIR/sweep/*/summary.json and each sampled model's eval_answers.jsonl. It runs no
model and imports nothing torch-side (the pre-trained model's answers are written by pre-training
itself); the machine is the one `lmschool run` recorded in DIR/machine.json.
- **A partial run is a report too.** A stage without its done file is "not run" (or "unfinished"
  when its directory exists); every key of REQUIRED is in report.json anyway, as null, so that tools
  read one shape. Non-finite numbers become null (JSON has no NaN).
- **Sample answers side by side** (`side_by_side_answers`): the same eval prompts, one per category
  (`pick_prompts`), answered by the pre-trained, SFT, DPO and PPO models, from their eval_answers.jsonl.
- **Three examples** (`feedback_examples`): where SFT's answer sampled at temperature 1 scores lowest
  (a forbidden request, an honesty question, one other), beside each feedback method's sampled
  answer, from the policy stages' eval_answers.jsonl (`reference_sampled` is SFT's, `sampled` theirs).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from lmschool.data.prompts import pick_prompts, prompt_key
from lmschool.errors import UserError
from lmschool.pipeline import BY_NAME, STAGES, Stage, names
from lmschool.report.intervals import add_intervals

SAMPLE_MODELS = ["base", "pretrain", "sft", "dpo", "ppo"]   # the side-by-side columns, in this order

# Keys report.json always carries per stage (null when missing), as issues 8 and 15 list them; by stage
# name, or by kind for the policy stages (each judged the same way); issue 15 adds the conduct
# figures (flaws, hallucinations, behaviour) and the demonstrations' own.
REQUIRED = {
    "world": ["demonstration_flaw_share"],
    # a --base run's first column: pre-training's measure and SFT's, of the model as it came
    "base": ["fact_completion", "teacher_score", "end_of_turn_rate", "correct_train_pupils",
             "correct_heldout_pupils", "fact_correct", "refusal_correct"],
    "pretrain": ["val_loss", "val_bpb", "fact_completion"],
    "sft": ["teacher_score", "correct_heldout_pupils", "correct_train_pupils", "correct_arithmetic",
            "fact_correct", "refusal_correct", "end_of_turn_rate", "flaw_rate", "hallucination_rate",
            "behaviour_score", "demonstration_behaviour_score"],
    "reward": ["accuracy_noise_free", "accuracy_rater", "teacher_rank_correlation", "rater_agreement_noise_free"],
    "policy": ["teacher_score", "win_rate_vs_sft", "refusal_correct", "fact_correct", "kl_from_sft", "rm_reward",
               "flaw_rate", "hallucination_rate", "behaviour_score"],
}
SAMPLED = ["win_rate_vs_sft_greedy", "teacher_score_sampled", "sft_teacher_score_sampled"]  # sweep runs keep these too
BY_CATEGORY = ["teacher_score_by_category", "correct_by_category", "accuracy_by_category"]
# the dicts a numbers file may hold that report.json keeps as they are (numbers, or dicts of them)
NESTED = [*BY_CATEGORY, "flaw_rates", "sft_flaw_rates", "demonstration_flaw_rates", "demonstrators",
          "demonstration_flaws"]


def required(stage: Stage) -> list[str]:
    return REQUIRED.get(stage.name, REQUIRED.get(stage.kind, []))


# ---- reading the run directory ---------------------------------------------------------------

def read_json_object(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun the stage that writes it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


_SAID_TORN: set[tuple[Path, int]] = set()


def read_jsonl_rows(path: Path) -> list[dict]:
    """The JSON objects of a file, one a line. A torn last line (a run killed mid-write) is skipped;
    a bad line anywhere else is a UserError naming file:line (the file was damaged, not cut short)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                if (path, number) not in _SAID_TORN:   # said once, however often the file is read
                    _SAID_TORN.add((path, number))
                    print(f"lmschool report: skipped {path}:{number}, a torn last line (the run was killed "
                          "while writing it)", file=sys.stderr)
                continue
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); rerun the stage that writes it") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _clean(value):
    """Finite numbers as floats/ints, dicts of them (and of nulls) cleaned; NaN/inf -> None; others dropped."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):  # a null inside stays null (a flaw no answer could show, say)
        return {str(k): _clean(v) for k, v in value.items() if v is None or isinstance(v, (int, float, dict))}
    return None


def stage_entry(run_dir: Path, stage: Stage, timings: dict) -> dict:
    """stages.<stage> of report.json: status, seconds, the numbers file's numbers (required keys always)."""
    directory = stage.directory(run_dir)
    if stage.done(run_dir):
        status = "done"
    else:
        status = "unfinished" if directory.is_dir() else "not run"
    summary = (read_json_object(directory / stage.numbers_file) if status == "done" else None) or {}
    if stage.kind == "world":  # the generator's counts, not a training summary
        counts = summary.get("summary", {})
        summary = {"pupils": counts.get("pupils"), "heldout_pupils": counts.get("heldout_pupils"),
                   "corpus_documents": counts.get("corpus", {}).get("documents"),
                   "sft_conversations": counts.get("sft", {}).get("conversations"),
                   "eval_rows": counts.get("eval", {}).get("rows"),
                   # the share of SFT answers its demonstrators wrote with a flaw, by whom and which
                   "demonstration_flaw_share": counts.get("demonstration_flaw_share"),
                   "demonstrators": counts.get("sft", {}).get("demonstrators"),
                   "demonstration_flaws": counts.get("sft", {}).get("flaws")}
    entry = {"status": status}
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            entry[key] = _clean(value)
        elif key in NESTED and isinstance(value, dict):
            entry[key] = _clean(value)
    for key in required(stage):
        entry.setdefault(key, None)
    seconds = timings.get(stage.name, summary.get("seconds"))
    entry["seconds"] = _clean(float(seconds)) if isinstance(seconds, (int, float)) else None
    return add_intervals(entry)


_SWEEP_NAME = re.compile(r"^(?P<method>[a-z]+)-(?P<param>[a-z_]+?)(?P<value>[0-9][0-9.e+-]*)$")


def sweep_entries(run_dir: Path) -> dict:
    """DIR/sweep/<method>-<param><value>/summary.json -> {name: {method, param, value, numbers}}."""
    root = run_dir / "sweep"
    out = {}
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        match = _SWEEP_NAME.match(directory.name)
        summary = read_json_object(directory / "summary.json")
        if match is None or summary is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        out[directory.name] = {"method": match["method"], "param": match["param"], "value": value,
                               **{k: _clean(summary.get(k)) for k in [*REQUIRED["policy"], *SAMPLED]}}
    return out


def machine_info(run_dir: Path) -> dict:
    """The machine the run ran on, as `lmschool run` recorded it in DIR/machine.json; for a run
    without one, what can be told without loading torch (threads and device unknown)."""
    recorded = read_json_object(run_dir / "machine.json")
    if recorded is not None:
        return recorded
    from lmschool.pipeline import machine_info as this_machine
    return this_machine(with_torch=False)


# ---- sample answers side by side ------------------------------------------------------------

def side_by_side_answers(run_dir: Path, n: int) -> list[dict]:
    """[{prompt, category, answers: {model: text | None}}] for n eval prompts; the same prompts for
    every model of SAMPLE_MODELS that wrote eval_answers.jsonl, matched by prompt. Prompts come from
    the first of SFT, DPO, PPO with answers (every eval prompt), else world/eval.jsonl."""
    if n <= 0:
        return []
    records = {m: read_jsonl_rows(BY_NAME[m].directory(run_dir) / "eval_answers.jsonl") for m in SAMPLE_MODELS}
    source = next((r for m, r in records.items() if r and m not in ("base", "pretrain")), None) or \
        read_jsonl_rows(run_dir / "world" / "eval.jsonl")
    rows = pick_prompts(source, n)
    if not rows:
        return []
    samples = [{"prompt": r["prompt"], "category": r.get("category"), "answers": {}} for r in rows]
    for model in SAMPLE_MODELS:
        if not records[model]:
            continue
        by_prompt = {prompt_key(r.get("prompt")): r for r in records[model]}
        for sample in samples:
            found = by_prompt.get(prompt_key(sample["prompt"]))
            sample["answers"][model] = found.get("response") if found else None
    return samples


# ---- three examples: SFT's sampled answer where it fails, and what feedback made of it ----------

EXAMPLE_SLOTS = ["refuse", "unknown", None]  # a forbidden request, an honesty question, any other


def first_sample(record: dict, key: str) -> tuple[str, float] | None:
    """(answer, score) of a record's first answer under `key` ("sampled" or "reference_sampled",
    each [[answer, score], ...]), or None where there is none."""
    samples = record.get(key)
    first = samples[0] if isinstance(samples, list) and samples else None
    if not (isinstance(first, list) and len(first) >= 2 and isinstance(first[0], str)
            and isinstance(first[1], (int, float)) and not isinstance(first[1], bool)):
        return None
    return first[0], float(first[1])


def pick_examples(records: list[dict], n: int) -> list[dict]:
    """n records whose SFT sampled answer ("reference_sampled") scores lowest: one of each slot of
    EXAMPLE_SLOTS in turn (None: a category other than the slots'), then the lowest of those left.
    Equal scores go to a fact question first (the third slot's "e.g."), then to the earlier record."""
    pool = [(i, r) for i, r in enumerate(records) if r.get("prompt") and first_sample(r, "reference_sampled")]

    def order(item):
        i, r = item
        return first_sample(r, "reference_sampled")[1], not str(r.get("category")).startswith("fact_"), i

    chosen: list[int] = []
    for slot in EXAMPLE_SLOTS[:n]:
        fits = [item for item in pool if item[0] not in chosen and
                (item[1].get("category") == slot if slot else item[1].get("category") not in EXAMPLE_SLOTS)]
        if fits:
            chosen.append(min(fits, key=order)[0])
    chosen += [i for i, _ in sorted(pool, key=order) if i not in chosen][:n - len(chosen)]
    return [records[i] for i in chosen]


def feedback_examples(run_dir: Path, n: int = 3) -> list[dict]:
    """[{prompt, category, sft: {answer, score}, answers: {stage: {answer, score} | None}}] for n
    eval prompts (pick_examples) where SFT's sampled answer scores lowest, with each finished policy
    stage's sampled answer to the same prompt (matched by prompt). SFT's answers are those the first
    policy stage with any judged (each stage samples the SFT model with the same seed); [] when no
    policy stage ran."""
    records = {s: read_jsonl_rows(BY_NAME[s].directory(run_dir) / "eval_answers.jsonl")
               for s in names("policy") if BY_NAME[s].done(run_dir)}
    records = {s: rows for s, rows in records.items() if rows}
    source = next((rows for rows in records.values() if any(first_sample(r, "reference_sampled") for r in rows)), [])
    by_prompt = {stage: {prompt_key(r.get("prompt")): r for r in rows} for stage, rows in records.items()}
    examples = []
    for record in pick_examples(source, n):
        answer, score = first_sample(record, "reference_sampled")
        example = {"prompt": record["prompt"], "category": record.get("category"),
                   "sft": {"answer": answer, "score": score}, "answers": {}}
        for stage, answered in by_prompt.items():
            found = answered.get(prompt_key(record["prompt"]))
            sample = first_sample(found, "sampled") if found else None
            example["answers"][stage] = {"answer": sample[0], "score": sample[1]} if sample else None
        examples.append(example)
    return examples


# ---- the figures, together -----------------------------------------------------------------

def frontier_points(report: dict) -> list[dict]:
    """Teacher score against KL from SFT: SFT at KL 0, each policy stage, each sweep run.

    The score is that of the answers sampled at temperature 1 (the ones the KL is measured on, as
    in the DPO paper's frontier) where every point has it, else that of the greedy answers."""
    runs = [(stage, False, report["stages"].get(stage, {})) for stage in names("policy")]
    runs += [(name, True, s) for name, s in report.get("sweep", {}).items()]
    runs = [(name, sweep, s) for name, sweep, s in runs
            if s.get("teacher_score") is not None and s.get("kl_from_sft") is not None]
    sampled = bool(runs) and all(s.get("teacher_score_sampled") is not None for _, _, s in runs)
    key = "teacher_score_sampled" if sampled else "teacher_score"
    points = []
    sft = report["stages"].get("sft", {})
    sft_score = runs[0][2].get("sft_teacher_score_sampled") if sampled else sft.get("teacher_score")
    if sft_score is not None:
        points.append({"method": "sft", "label": "SFT", "kl_from_sft": 0.0, "teacher_score": sft_score,
                       "score": key})
    for name, sweep, s in runs:
        point = {"method": s["method"] if sweep else name, "label": name if sweep else BY_NAME[name].title,
                 "kl_from_sft": s["kl_from_sft"], "teacher_score": s[key], "score": key}
        if sweep:
            point.update(sweep=True, param=s["param"], value=s["value"])
        points.append(point)
    return points


def read_timings(run_dir: Path) -> dict[str, float]:
    return {k: float(v) for k, v in (read_json_object(run_dir / "timings.json") or {}).items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def peak_memory_gib(run_dir: Path) -> float | None:
    """The run's largest resident memory in GiB: the largest of DIR/memory.json's per-stage peaks
    (ru_maxrss of the `lmschool run` process after each stage); None for a run without one."""
    values = [v for v in (read_json_object(run_dir / "memory.json") or {}).values()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return max(values) if values else None


def in_run(run_dir: Path, stage: Stage) -> bool:
    """Whether the stage belongs in this run's report: all of them, but the base stage only in a
    run that has one (a run from scratch keeps the report's shape it always had)."""
    return not stage.with_base or stage.directory(run_dir).is_dir()


def collect(run_dir: Path, *, created: str) -> dict:
    """report.json's figures but the plots and the side-by-side answers: the stages, their times,
    the machine, the sweep, the frontier's points and three examples of what feedback changed."""
    timings = read_timings(run_dir)
    stages = {s.name: stage_entry(run_dir, s, timings) for s in STAGES if in_run(run_dir, s)}
    seconds = dict(timings)
    for s in stages:
        if s not in seconds and stages[s]["seconds"] is not None:
            seconds[s] = stages[s]["seconds"]
    world = read_json_object(run_dir / "world" / "world.json") or {}
    report = {
        "run_dir": str(run_dir),
        "created": created,
        "preset": world.get("preset"),
        # the pipeline's own stages (what `make demo` runs); --sweep runs are counted apart
        "seconds_total": sum(v for s, v in seconds.items() if not s.startswith("sweep/")),
        "seconds_sweep": sum(v for s, v in seconds.items() if s.startswith("sweep/")),
        "seconds": seconds,
        "peak_memory_gib": peak_memory_gib(run_dir),
        "machine": machine_info(run_dir),
        "stages": stages,
        "sweep": sweep_entries(run_dir),
    }
    report["frontier"] = frontier_points(report)
    report["examples"] = feedback_examples(run_dir)
    return report
