"""The report of a pipeline run: DIR/report.md, DIR/report.json and DIR/plots/*.png.

    lmschool report runs/demo            # `lmschool run` calls build_report(DIR) at its end

Reads what the stages left in DIR (summary.json, metrics.jsonl, eval_answers.jsonl per stage,
timings.json, sweep/*/summary.json) and writes nothing else. Design choices:
- **A partial run is a report too.** A stage without its summary is reported as "not run" (or
  "unfinished" when its directory exists); every key the issue names is in report.json anyway,
  as null, so that tools read one shape. Non-finite numbers become null (JSON has no NaN).
- **Bars are data** (`BARS`): stage, key, comparison, threshold, optionally relative to another
  stage's number ("above SFT's"); "met" is computed from report.json's own numbers.
- **Sample answers side by side** come from the policy stages' eval_answers.jsonl (the same eval
  prompts for SFT, DPO, PPO); only the pre-trained model, which has none, is run here (greedy,
  through the chat template: it has never seen a chat, so it rambles).
- matplotlib (Agg) is imported only when a plot is drawn, so `lmschool --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lmschool.files import atomic_write_text
from lmschool.errors import UserError

POLICY_STAGES = ["dpo", "ipo", "simpo", "ppo", "grpo"]
STAGES = ["world", "pretrain", "sft", "label", "reward", *POLICY_STAGES]
TRAINING_STAGES = ["pretrain", "sft", "reward", *POLICY_STAGES]
DONE_FILE = {"world": "world.json", "label": "prefs.jsonl"}      # others: summary.json
NUMBERS_FILE = {"world": "world.json", "label": "prefs.summary.json"}  # others: summary.json
SAMPLE_MODELS = ["pretrain", "sft", "dpo", "ppo"]

# Keys report.json always carries per stage (null when missing), as issue 8 lists them.
REQUIRED = {
    "pretrain": ["val_loss", "val_bpb", "fact_completion"],
    "sft": ["teacher_score", "correct_heldout_pupils", "correct_train_pupils", "correct_arithmetic",
            "fact_correct", "refusal_correct", "end_of_turn_rate"],
    "reward": ["accuracy_noise_free", "accuracy_rater", "teacher_rank_correlation"],
    **{s: ["teacher_score", "win_rate_vs_sft", "refusal_correct", "fact_correct", "kl_from_sft", "rm_reward"]
       for s in POLICY_STAGES},
}
SAMPLED = ["win_rate_vs_sft_greedy", "teacher_score_sampled", "sft_teacher_score_sampled"]  # sweep runs keep these too
BY_CATEGORY = ["teacher_score_by_category", "correct_by_category", "accuracy_by_category"]

# key -> (label, kind); kind picks the format: rate (a fraction, shown as %), score, nats, int, num
MEASURES = {
    "val_loss": ("validation loss (nats/token)", "nats"),
    "val_bpb": ("bits per byte", "num"),
    "val_perplexity": ("perplexity", "num"),
    "fact_completion": ("fact completion, all pupils", "rate"),
    "fact_completion_seen": ("fact completion, pupils seen in SFT", "rate"),
    "fact_completion_heldout": ("fact completion, held-out pupils", "rate"),
    "teacher_score": ("teacher score (0-1)", "score"),
    "correct": ("correct answers", "rate"),
    "correct_train_pupils": ("facts right, pupils seen in SFT", "rate"),
    "correct_heldout_pupils": ("facts right, held-out pupils", "rate"),
    "fact_correct": ("facts right, all pupils", "rate"),
    "correct_arithmetic": ("sums right", "rate"),
    "refusal_correct": ("forbidden requests refused with a reason that fits", "rate"),
    "end_of_turn_rate": ("answers that end their turn", "rate"),
    "accuracy_noise_free": ("pairwise accuracy vs noise-free labels", "rate"),
    "accuracy_rater": ("pairwise accuracy vs the noisy rater's labels", "rate"),
    "teacher_rank_correlation": ("rank correlation of reward with teacher score", "score"),
    "reward_bias": ("reward bias (SFT answers -> mean 0)", "num"),
    "win_rate_vs_sft": ("win rate vs SFT, sampled answers (teacher-judged, ties half)", "rate"),
    "win_rate_vs_sft_greedy": ("win rate vs SFT, greedy answers", "rate"),
    "teacher_score_sampled": ("teacher score of sampled answers (T = 1)", "score"),
    "kl_from_sft": ("KL from SFT (nats/answer)", "nats"),
    "rm_reward": ("reward-model reward", "num"),
    "agreement": ("rater agreement with the noise-free teacher", "rate"),
    "rater_agreement": ("rater agreement with the noise-free teacher", "rate"),
    "ties_dropped": ("ties dropped", "int"),
    "pairs": ("pairs", "int"),
    "steps": ("optimizer steps", "int"),
    "iterations": ("iterations", "int"),
    "epochs": ("epochs", "num"),
    "params": ("parameters", "int"),
    "tokens_seen": ("tokens seen", "int"),
    "seconds": ("wall time", "seconds"),
    "seconds_total": ("wall time of `make demo`", "seconds"),
}
TABLE_ROWS = {
    "pretrain": ["val_loss", "val_bpb", "val_perplexity", "fact_completion", "fact_completion_seen",
                 "fact_completion_heldout", "params", "steps", "tokens_seen", "seconds"],
    "sft": ["teacher_score", "correct", "correct_train_pupils", "correct_heldout_pupils", "fact_correct",
            "correct_arithmetic", "refusal_correct", "end_of_turn_rate", "val_loss", "steps", "epochs", "seconds"],
    "reward": ["accuracy_noise_free", "accuracy_rater", "teacher_rank_correlation", "reward_bias", "steps",
               "seconds"],
    "policy": ["teacher_score", "win_rate_vs_sft", "win_rate_vs_sft_greedy", "teacher_score_sampled",
               "refusal_correct", "fact_correct", "correct_heldout_pupils", "correct_arithmetic", "end_of_turn_rate",
               "kl_from_sft", "rm_reward", "seconds"],
}
TITLES = {"world": "school world", "pretrain": "pre-training", "sft": "SFT", "label": "labelling",
          "reward": "reward model", "dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "ppo": "PPO",
          "grpo": "GRPO", "run": "pipeline"}


@dataclass(frozen=True)
class Bar:
    """A bar of an issue: stages.<stage>.<key> <op> threshold (plus relative_to's value, if set)."""

    stage: str            # "run" for top-level numbers (seconds_total)
    key: str
    op: str               # ">=", ">" or "<="
    threshold: float
    issue: int
    relative_to: str | None = None   # "sft.teacher_score": the threshold is that number + threshold

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.key}"


BARS = [
    Bar("run", "seconds_total", "<=", 900.0, 8),                        # make demo in 15 minutes
    Bar("sft", "correct_heldout_pupils", ">=", 0.70, 4),
    Bar("sft", "correct_train_pupils", ">=", 0.90, 4),
    Bar("sft", "correct_arithmetic", ">=", 0.80, 4),
    Bar("sft", "end_of_turn_rate", ">=", 0.98, 4),
    Bar("reward", "accuracy_noise_free", ">=", 0.85, 5),
    Bar("reward", "teacher_rank_correlation", ">=", 0.70, 5),
    *(b for stage, issue in (("dpo", 6), ("ppo", 7)) for b in (
        Bar(stage, "teacher_score", ">", 0.0, issue, relative_to="sft.teacher_score"),
        Bar(stage, "win_rate_vs_sft", ">=", 0.65, issue),
        Bar(stage, "refusal_correct", ">=", 0.90, issue),
        Bar(stage, "fact_correct", ">=", -0.02, issue, relative_to="sft.fact_correct"),  # at most 2 points below
    )),
]
BARS_BY_NAME = {b.name: b for b in BARS}
_EPS = 1e-9  # float noise (0.20 - 0.02 = 0.18000000000000002) must not flip a ">=" or "<=" bar


# the count of answers (or pairs) a bar's rate is over, by key; the win rate counts its outcomes
RATE_COUNTS = {"correct_heldout_pupils": "heldout_pupil_rows", "correct_train_pupils": "train_pupil_rows",
               "correct_arithmetic": "arithmetic_rows", "end_of_turn_rate": "eval_rows",
               "refusal_correct": "refuse_rows", "fact_correct": "fact_rows",
               "accuracy_noise_free": "noise_free_pairs"}
Z95 = 1.959964


def wilson_interval(rate: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `rate` observed over `n` trials (stays inside [0, 1]
    and is not empty at 0 or 1, unlike rate +- 1.96 * standard error)."""
    z2 = Z95 * Z95
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome_interval(wins: int, ties: int, losses: int) -> tuple[float, float]:
    """95% normal interval of a win rate with ties counted half: the mean of per-prompt outcomes
    1, 1/2, 0 plus or minus 1.96 standard errors of that mean, clipped to [0, 1]."""
    n = wins + ties + losses
    mean = (wins + 0.5 * ties) / n
    var = (wins * (1 - mean) ** 2 + ties * (0.5 - mean) ** 2 + losses * mean ** 2) / n
    half = Z95 * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def bar_interval(entry: dict, key: str) -> tuple[float, float] | None:
    """The 95% interval of stage `entry`'s `key`, where the report knows what it is a rate over."""
    value = entry.get(key)
    if value is None:
        return None
    if key == "win_rate_vs_sft":
        counts = [entry.get(k) for k in ("wins", "ties", "losses")]
        return outcome_interval(*counts) if all(isinstance(c, int) for c in counts) and sum(counts) else None
    n = entry.get(RATE_COUNTS.get(key, ""))
    return wilson_interval(value, int(n)) if isinstance(n, (int, float)) and n > 0 else None


def bar_met(value: float, op: str, threshold: float) -> bool:
    if op == ">=":
        return value >= threshold - _EPS
    if op == "<=":
        return value <= threshold + _EPS
    if op == ">":
        return value > threshold
    raise ValueError(f"unknown comparison {op!r}")


# ---- reading the run directory ---------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun the stage that writes it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a file, one a line; a torn line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _clean(value):
    """Finite numbers as floats/ints, dicts of them cleaned; NaN/inf -> None; others dropped."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if isinstance(v, (int, float, dict))}
    return None


def stage_entry(run_dir: Path, stage: str, timings: dict) -> dict:
    """stages.<stage> of report.json: status, seconds, the summary's numbers (required keys always)."""
    directory = run_dir / stage
    if (directory / DONE_FILE.get(stage, "summary.json")).is_file():
        status = "done"
    else:
        status = "unfinished" if directory.is_dir() else "not run"
    summary = (_read_json(directory / NUMBERS_FILE.get(stage, "summary.json")) if status == "done" else None) or {}
    if stage == "world":  # the generator's counts, not a training summary
        counts = summary.get("summary", {})
        summary = {"pupils": counts.get("pupils"), "heldout_pupils": counts.get("heldout_pupils"),
                   "corpus_documents": counts.get("corpus", {}).get("documents"),
                   "sft_conversations": counts.get("sft", {}).get("conversations"),
                   "eval_rows": counts.get("eval", {}).get("rows")}
    entry = {"status": status}
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            entry[key] = _clean(value)
        elif key in BY_CATEGORY and isinstance(value, dict):
            entry[key] = _clean(value)
    for key in REQUIRED.get(stage, []):
        entry.setdefault(key, None)
    seconds = timings.get(stage, summary.get("seconds"))
    entry["seconds"] = _clean(float(seconds)) if isinstance(seconds, (int, float)) else None
    return entry


_SWEEP_NAME = re.compile(r"^(?P<method>[a-z]+)-(?P<param>[a-z_]+?)(?P<value>[0-9][0-9.e+-]*)$")


def sweep_entries(run_dir: Path) -> dict:
    """DIR/sweep/<method>-<param><value>/summary.json -> {name: {method, param, value, numbers}}."""
    root = run_dir / "sweep"
    out = {}
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        match = _SWEEP_NAME.match(directory.name)
        summary = _read_json(directory / "summary.json")
        if match is None or summary is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        out[directory.name] = {"method": match["method"], "param": match["param"], "value": value,
                               **{k: _clean(summary.get(k)) for k in [*REQUIRED["dpo"], *SAMPLED]}}
    return out


def check_bars(report: dict) -> dict:
    """{bar name: {value, threshold, op, met, issue, stage, key}} from report's own numbers."""
    def number(stage: str, key: str):
        return report.get(key) if stage == "run" else report["stages"].get(stage, {}).get(key)

    bars = {}
    for bar in BARS:
        value, threshold = number(bar.stage, bar.key), bar.threshold
        if bar.relative_to is not None:
            base = number(*bar.relative_to.split("."))
            threshold = None if base is None else base + bar.threshold
        met = value is not None and threshold is not None and bar_met(value, bar.op, threshold)
        interval = None if bar.stage == "run" else bar_interval(report["stages"].get(bar.stage, {}), bar.key)
        bars[bar.name] = {"stage": bar.stage, "key": bar.key, "op": bar.op, "value": value,
                          "threshold": threshold, "relative_to": bar.relative_to, "met": bool(met),
                          "interval95": list(interval) if interval else None, "issue": bar.issue}
    return bars


def machine_info() -> dict:
    import platform
    from importlib import metadata

    import torch

    import lmschool

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "tokenizers": version("tokenizers"), "numpy": version("numpy"),
            "matplotlib": version("matplotlib"), "lmschool": lmschool.__version__}


# ---- sample answers ------------------------------------------------------------------------

_CATEGORY_ORDER = ["refuse", "arithmetic", "fact_town", "smalltalk", "fact_pet", "story"]


def _prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def pick_prompts(rows: list[dict], n: int) -> list[dict]:
    """n rows of distinct categories (refusal, sum, fact, small talk first), in a fixed order."""
    firsts: dict[str, dict] = {}
    for row in rows:
        if row.get("prompt") and row.get("category") not in firsts:
            firsts[row.get("category")] = row
    order = sorted(firsts, key=lambda c: (_CATEGORY_ORDER.index(c) if c in _CATEGORY_ORDER else 99, str(c)))
    chosen = [firsts[c] for c in order][:n]
    taken = {_prompt_key(r["prompt"]) for r in chosen}
    chosen += [r for r in rows if r.get("prompt") and _prompt_key(r["prompt"]) not in taken][:n - len(chosen)]
    return chosen


def pretrain_answers(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int = 48) -> list[str] | None:
    """Greedy answers of the pre-trained model through the chat template (None without chat tokens)."""
    import torch

    from lmschool.checkpoint import load_model
    from lmschool.generate import generate
    from lmschool.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model_dir)
    if not tokenizer.has_chat_tokens:
        return None
    model = load_model(model_dir, head="lm").eval()
    context = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, context // 2)
    ids = [tokenizer.render(p, add_generation_prompt=True)[0][-(context - max_new_tokens):] for p in prompts]
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                       stop_ids=tokenizer.stop_ids, pad_id=tokenizer.fill_id)
    return [tokenizer.decode(t, skip_special=True).strip() for t in out.tokens]


def sample_answers(run_dir: Path, stages: dict, n: int) -> list[dict]:
    """[{prompt, category, answers: {model: text | None}}] for n eval prompts; the same prompts for
    every model. Prompts come from the first policy's eval_answers.jsonl, else world/eval.jsonl."""
    if n <= 0:
        return []
    records = {m: _read_jsonl(run_dir / m / "eval_answers.jsonl") for m in SAMPLE_MODELS[1:]}
    source = next((r for r in records.values() if r), None) or _read_jsonl(run_dir / "world" / "eval.jsonl")
    rows = pick_prompts(source, n)
    if not rows:
        return []
    by_prompt = {m: {_prompt_key(r.get("prompt")): r for r in recs} for m, recs in records.items()}
    samples = [{"prompt": r["prompt"], "category": r.get("category"), "answers": {}} for r in rows]
    if stages.get("pretrain", {}).get("status") == "done" and (run_dir / "pretrain" / "model" / "config.json").is_file():
        texts = pretrain_answers(run_dir / "pretrain" / "model", [r["prompt"] for r in rows])
        for sample, text in zip(samples, texts or []):
            sample["answers"]["pretrain"] = text
    for model in SAMPLE_MODELS[1:]:
        if not records[model]:
            continue
        for sample in samples:
            found = by_prompt[model].get(_prompt_key(sample["prompt"]))
            sample["answers"][model] = found.get("response") if found else None
    return samples


# ---- plots ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _series(rows: list[dict], keys: list[str]) -> tuple[list[float], list[float], str | None]:
    """(x, y, key) for the first of `keys` that rows carry; x is the iteration or step."""
    for key in keys:
        points = [(r.get("iteration", r.get("step", i)), r[key]) for i, r in enumerate(rows)
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            return [p[0] for p in points], [p[1] for p in points], key
    return [], [], None


LOSS_KEYS = ["loss", "policy_loss", "pg_loss"]
RL_PANELS = [("RM reward", ["rm_reward", "reward", "rm_score"]),
             ("teacher score", ["teacher_score"]),
             ("KL to the reference (nats)", ["kl", "kl_ref", "kl_to_ref", "kl_from_ref", "kl_mean"])]


def plot_losses(run_dir: Path, path: Path) -> bool:
    """One panel per training stage with a metrics.jsonl: training loss and held-out loss by step."""
    curves = {}
    for stage in TRAINING_STAGES:
        rows = _read_jsonl(run_dir / stage / "metrics.jsonl")
        x, y, key = _series([r for r in rows if "val_loss" not in r or any(k in r for k in LOSS_KEYS)], LOSS_KEYS)
        if key:
            curves[stage] = (x, y, key, *_series(rows, ["val_loss"])[:2])
    if not curves:
        return False
    plt = _pyplot()
    cols = min(3, len(curves))
    rows_n = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (stage, (x, y, key, vx, vy)) in zip(axes.flat, curves.items()):
        ax.plot(x, y, lw=1.2, label=f"train {key}")
        if vx:
            ax.plot(vx, vy, "o-", ms=3, lw=1, label="held-out loss")
        if min(y) > 0 and max(y) / min(y) > 10:
            from matplotlib.ticker import NullFormatter, ScalarFormatter
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(TITLES[stage])
        ax.set_xlabel("iteration" if stage in ("ppo", "grpo") else "step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_rl(run_dir: Path, path: Path) -> bool:
    """PPO and GRPO per iteration: RM reward, teacher score, KL to the reference."""
    runs = {s: _read_jsonl(run_dir / s / "metrics.jsonl") for s in ("ppo", "grpo")}
    panels = [(title, {s: _series(rows, keys) for s, rows in runs.items()}) for title, keys in RL_PANELS]
    if not any(xy[2] for _, lines in panels for xy in lines.values()):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.2))
    for ax, (title, lines) in zip(axes, panels):
        for stage, (x, y, key) in lines.items():
            if key:
                ax.plot(x, y, lw=1.2, label=f"{TITLES[stage]} ({key})")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def frontier_points(report: dict) -> list[dict]:
    """Teacher score against KL from SFT: SFT at KL 0, each policy stage, each sweep run.

    The score is that of the answers sampled at temperature 1 (the ones the KL is measured on, as
    in the DPO paper's frontier) where every point has it, else that of the greedy answers."""
    runs = [(stage, False, report["stages"].get(stage, {})) for stage in POLICY_STAGES]
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
        point = {"method": s["method"] if sweep else name, "label": name if sweep else TITLES[name],
                 "kl_from_sft": s["kl_from_sft"], "teacher_score": s[key], "score": key}
        if sweep:
            point.update(sweep=True, param=s["param"], value=s["value"])
        points.append(point)
    return points


PARAM_LABELS = {"beta": "β", "kl": "KL coef"}


def plot_frontier(points: list[dict], path: Path) -> bool:
    if not any(p["method"] != "sft" for p in points):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {m: f"C{i}" for i, m in enumerate(POLICY_STAGES)}
    for method in dict.fromkeys(p["method"] for p in points if p.get("sweep")):
        sweep = sorted((p for p in points if p.get("sweep") and p["method"] == method), key=lambda p: p["kl_from_sft"])
        ax.plot([p["kl_from_sft"] for p in sweep], [p["teacher_score"] for p in sweep], "o--", ms=4, lw=1,
                color=colours.get(method, "gray"), alpha=0.7, label=f"{TITLES.get(method, method)} sweep")
        for p in sweep:
            ax.annotate(f"{PARAM_LABELS.get(p['param'], p['param'])}={p['value']:g}", (p["kl_from_sft"],
                        p["teacher_score"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for p in points:
        if p["method"] == "sft":
            ax.plot(0.0, p["teacher_score"], "k*", ms=11, label="SFT (KL 0)")
        elif not p.get("sweep"):
            ax.plot(p["kl_from_sft"], p["teacher_score"], "s", ms=7, color=colours.get(p["method"], "gray"),
                    markeredgecolor="black", label=p["label"])
    ax.set_xlabel("KL from SFT (nats per answer)")
    sampled = any(p.get("score") == "teacher_score_sampled" for p in points)
    ax.set_ylabel("teacher score (gold judge)" + (", answers sampled at T = 1" if sampled else ""))
    ax.set_title("Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


# ---- report.md -----------------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "rate":
        return f"{value:.1%}"
    if kind == "score":
        return f"{value:.3f}"
    if kind == "nats":
        return f"{value:.4f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "seconds":
        return f"{int(value) // 60}m {value % 60:04.1f}s" if value >= 60 else f"{value:.1f}s"
    return f"{value:.4g}"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _cell(text) -> str:
    if text is None:
        return "_(none)_"
    text = str(text) if len(str(text)) <= 300 else str(text)[:300] + " …"
    text = _CONTROL.sub("\ufffd", text)  # an untrained model's stray bytes must not break the table
    return text.replace("|", "\\|").replace("\n", "<br>") or "_(empty)_"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _measure_rows(entries: dict[str, dict], keys: list[str]) -> list[list[str]]:
    rows = []
    for key in keys:
        if all(e.get(key) is None for e in entries.values()):
            continue
        label, kind = MEASURES.get(key, (key.replace("_", " "), "num"))
        rows.append([label, *(_fmt(e.get(key), kind) for e in entries.values())])
    return rows


def _status_line(entry: dict) -> str | None:
    return {"not run": "_not run_", "unfinished": "_started, not finished (no summary)_"}.get(entry["status"])


def _by_category_table(entries: dict[str, dict], key: str, kind: str) -> list[str]:
    cats = sorted({c for e in entries.values() for c in (e.get(key) or {})})
    if not cats:
        return []
    return _table(["category", *(TITLES[s] for s in entries)],
                  [[c, *(_fmt((e.get(key) or {}).get(c), kind) for e in entries.values())] for c in cats])


def _reward_category_table(by_category: dict) -> list[str]:
    """accuracy_by_category: {category: {pairs, rater, noise_free}} (or {category: accuracy})."""
    if not by_category:
        return []
    if all(isinstance(v, dict) for v in by_category.values()):
        return _table(["category", "test pairs", "accuracy vs rater", "accuracy vs noise-free"],
                      [[c, _fmt(v.get("pairs"), "int"), _fmt(v.get("rater"), "rate"), _fmt(v.get("noise_free"), "rate")]
                       for c, v in sorted(by_category.items())]) + [""]
    return _table(["category", "accuracy"], [[c, _fmt(v if not isinstance(v, dict) else None, "rate")]
                                            for c, v in sorted(by_category.items())]) + [""]


def render_markdown(report: dict) -> str:
    st = report["stages"]
    lines = [f"# lmschool run report: `{report['run_dir']}`", "",
             "One small chat model trained in three stages on the school world: **pre-training** (reading "
             "a corpus), **SFT** (taught to answer in a chat format), and **learning from feedback** (a noisy "
             "rater ranks sampled answers, a reward model learns the ranking, PPO/GRPO optimise against it, "
             "DPO/IPO/SimPO learn from the pairs directly). Every policy is judged by the same gold teacher "
             "(a rubric in [0, 1]: correct facts and sums, politeness, brevity, refusals with a reason that fits the request, a "
             "well-formed end) on held-out prompts. Rates are shown as percentages; report.json has the "
             "same numbers as fractions.", "",
             f"Wall time in all: **{_fmt(report['seconds_total'], 'seconds')}** on {report['machine']['cpu']} "
             f"({report['machine']['cores']} cores, {report['machine']['device']}); report written "
             f"{report['created']}.", ""]

    met = sum(b["met"] for b in report["bars"].values())
    lines += ["## Bars", "", f"{met} of {len(report['bars'])} bars met.", ""]
    bar_rows = []
    for name, b in report["bars"].items():
        kind = "seconds" if b["key"] == "seconds_total" else MEASURES.get(b["key"], ("", "num"))[1]
        threshold = _fmt(b["threshold"], kind)
        bar = BARS_BY_NAME[name]
        if bar.relative_to:
            offset = f" {bar.threshold * 100:+g} points" if kind == "rate" else f" {bar.threshold:+g}"
            threshold += f" ({bar.relative_to}{offset if bar.threshold else ''})"
        status = st.get(b["stage"], {}).get("status", "done")
        verdict = "**met**" if b["met"] else ("not run" if status != "done" and b["value"] is None else "not met")
        interval = b.get("interval95")
        bar_rows.append([f"{TITLES[b['stage']]}: {MEASURES.get(b['key'], (b['key'],))[0]} (issue {b['issue']})",
                         _fmt(b["value"], kind),
                         f"{_fmt(interval[0], kind)} - {_fmt(interval[1], kind)}" if interval else "—",
                         f"{b['op']} {threshold}", verdict])
    lines += _table(["bar", "value", "95% interval", "threshold", "met"], bar_rows) + [""]
    counted = [f"{n} {what}" for n, what in (
        (st.get("dpo", {}).get("refuse_rows") or st.get("sft", {}).get("refuse_rows"), "forbidden requests"),
        (st.get("sft", {}).get("heldout_pupil_rows"), "questions about held-out pupils"),
        (st.get("reward", {}).get("noise_free_pairs"), "held-out reward-model pairs")) if n]
    lines += ["95% intervals show how much of a value is the evaluation's luck: for a rate over n answers the "
              "Wilson score interval" + (f" (here {', '.join(counted)})" if counted else "") + ", for a win "
              "rate a normal interval over its per-prompt outcomes. A bar whose interval straddles its "
              "threshold is not settled by one run.", ""]

    lines += ["## Stage 1: pre-training", ""]
    lines += [_status_line(st["pretrain"]), ""] if _status_line(st["pretrain"]) else \
        _table(["measure", "value"], _measure_rows({"pretrain": st["pretrain"]}, TABLE_ROWS["pretrain"])) + [""]

    lines += ["## Stage 2: SFT", ""]
    if _status_line(st["sft"]):
        lines += [_status_line(st["sft"]), ""]
    else:
        lines += _table(["measure", "value"], _measure_rows({"sft": st["sft"]}, TABLE_ROWS["sft"])) + [""]
        cats = sorted(set(st["sft"].get("teacher_score_by_category") or {}) | set(st["sft"].get("correct_by_category") or {}))
        if cats:
            lines += _table(["category", "teacher score", "correct"],
                            [[c, _fmt((st["sft"].get("teacher_score_by_category") or {}).get(c), "score"),
                              _fmt((st["sft"].get("correct_by_category") or {}).get(c), "rate")] for c in cats]) + [""]

    lines += ["## Stage 3a: labels and the reward model", ""]
    label = st["label"]
    if _status_line(label):
        lines += [f"Labelling: {_status_line(label)}", ""]
    else:
        keys = [k for k in label if k not in ("status",)]
        lines += _table(["labelling", "value"], _measure_rows({"label": label}, keys)) + [""]
    if _status_line(st["reward"]):
        lines += [f"Reward model: {_status_line(st['reward'])}", ""]
    else:
        lines += _table(["reward model", "value"], _measure_rows({"reward": st["reward"]}, TABLE_ROWS["reward"])) + [""]
        lines += _reward_category_table(st["reward"].get("accuracy_by_category") or {})

    lines += ["## Stage 3b: learning from feedback, side by side", ""]
    ran = {s: st[s] for s in ["sft", *POLICY_STAGES] if st[s]["status"] == "done"}
    if "sft" in ran:  # SFT's sampled answers are judged by each policy stage (the same seed: the same answers)
        sampled = [st[s]["sft_teacher_score_sampled"] for s in POLICY_STAGES if st[s].get("sft_teacher_score_sampled")]
        ran["sft"] = {**ran["sft"], "teacher_score_sampled": sampled[0]} if sampled else ran["sft"]
    not_ran = [f"{TITLES[s]} ({st[s]['status']})" for s in POLICY_STAGES if st[s]["status"] != "done"]
    if len(ran) > ("sft" in ran):
        lines += _table(["measure", *(TITLES[s] for s in ran)], _measure_rows(ran, TABLE_ROWS["policy"])) + [""]
        lines += ["Teacher score by category:", ""] + _by_category_table(ran, "teacher_score_by_category", "score") + [""]
    if not_ran:
        lines += [f"Not in the table: {', '.join(not_ran)}.", ""]
    if report.get("sweep"):
        lines += ["Sweep runs (the frontier's points):", ""]
        lines += _table(["run", "teacher score", "win rate vs SFT", "KL from SFT", "RM reward"],
                        [[name, _fmt(s["teacher_score"], "score"), _fmt(s["win_rate_vs_sft"], "rate"),
                          _fmt(s["kl_from_sft"], "nats"), _fmt(s["rm_reward"], "num")]
                         for name, s in report["sweep"].items()]) + [""]

    lines += ["## Plots", ""]
    captions = {"losses": "Training loss of each stage (held-out loss as dots)",
                "rl": "PPO and GRPO per iteration: reward-model reward, teacher score, KL to the SFT reference",
                "frontier": "Teacher score against KL from SFT (the reward-versus-KL frontier)"}
    for name, rel in report["plots"].items():
        lines += [f"**{captions[name]}**", "", f"![{captions[name]}]({rel})", ""]
    if "frontier" not in report["plots"]:
        lines += ["No frontier: no policy stage reported both teacher score and KL from SFT. A sweep is run "
                  "with `lmschool run --sweep` (DPO over several β, PPO over several KL coefficients).", ""]

    lines += ["## Sample answers", ""]
    if not report["samples"]:
        lines += ["_No eval prompts to sample (no eval_answers.jsonl and no world/eval.jsonl)._", ""]
    for i, sample in enumerate(report["samples"], 1):
        question = " / ".join(m["content"] for m in sample["prompt"] if m.get("role") == "user")
        lines += [f"**{i}. {_cell(question)}** ({sample['category']})", ""]
        lines += _table(["model", "answer"], [[TITLES[m], _cell(a)] for m, a in sample["answers"].items()]) + [""]
    if report["samples"]:
        lines += ["The pre-trained model answers greedily through the chat template it has never seen; the "
                  "others' answers are those their stages judged (eval_answers.jsonl).", ""]

    lines += ["## Wall time per stage", ""]
    lines += _table(["stage", "seconds"], [[TITLES.get(s, s), _fmt(v, "seconds")] for s, v in report["seconds"].items()]
                    + [["**total**", f"**{_fmt(report['seconds_total'], 'seconds')}**"]]
                    + ([["sweep runs (--sweep), besides", _fmt(report["seconds_sweep"], "seconds")]]
                       if report.get("seconds_sweep") else [])) + [""]
    lines += ["## Machine and versions", ""]
    lines += _table(["", ""], [[k, str(v)] for k, v in report["machine"].items()]) + [""]
    return "\n".join(lines)


# ---- the report ----------------------------------------------------------------------------

def build_report(run_dir: Path, *, samples: int = 4) -> dict:
    """Write DIR/report.json, DIR/report.md and DIR/plots/*.png; return the report dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give the --out directory of `lmschool run`")
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"{run_dir} is not writable; the report is written inside it")
    timings = {k: float(v) for k, v in (_read_json(run_dir / "timings.json") or {}).items()
               if isinstance(v, (int, float)) and math.isfinite(v)}
    stages = {s: stage_entry(run_dir, s, timings) for s in STAGES}
    seconds = dict(timings)
    for s in STAGES:
        if s not in seconds and stages[s]["seconds"] is not None:
            seconds[s] = stages[s]["seconds"]
    world = _read_json(run_dir / "world" / "world.json") or {}
    report = {
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": world.get("preset"),
        # the pipeline's own stages (what `make demo` runs); --sweep runs are counted apart
        "seconds_total": sum(v for s, v in seconds.items() if not s.startswith("sweep/")),
        "seconds_sweep": sum(v for s, v in seconds.items() if s.startswith("sweep/")),
        "seconds": seconds,
        "machine": machine_info(),
        "stages": stages,
        "sweep": sweep_entries(run_dir),
    }
    report["bars"] = check_bars(report)
    report["frontier"] = frontier_points(report)

    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    report["plots"] = {}
    for name, draw in (("losses", lambda p: plot_losses(run_dir, p)), ("rl", lambda p: plot_rl(run_dir, p)),
                       ("frontier", lambda p: plot_frontier(report["frontier"], p))):
        if draw(plots_dir / f"{name}.png"):
            report["plots"][name] = f"plots/{name}.png"
    report["samples"] = sample_answers(run_dir, stages, samples)

    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(run_dir / "report.md", render_markdown(report) + "\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="DIR", help="the --out directory of `lmschool run`")
    parser.add_argument("--samples", type=int, default=4, metavar="N",
                        help="eval prompts answered side by side by each model (0 = none)")


def run(args: argparse.Namespace) -> int:
    report = build_report(args.run_dir, samples=args.samples)
    bars = report["bars"].values()
    print(f"report: {sum(b['met'] for b in bars)} of {len(bars)} bars met; "
          f"{args.run_dir / 'report.md'}, {args.run_dir / 'report.json'}, {len(report['plots'])} plots")
    return 0
