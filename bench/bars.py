"""The project's acceptance bars, checked on a finished run's report.json (not part of lmschool).

    python bench/bars.py runs/demo          # prints the bars table: value, 95% interval, threshold, met
    python bench/bars.py runs/demo --json   # the same as JSON

A bar is a threshold an issue set on one of the report's figures (issue 4: SFT's facts and sums,
5: the reward model, 6: DPO, 7: PPO, 8: the demo's wall time), optionally relative to SFT's
figure. The README's and RESULTS.md's bars tables come from this script. The 95% interval beside
each value says how much of it is the evaluation's luck: a Wilson score interval for a rate over
n answers (the counts are in report.json's stages), a normal interval over the per-prompt outcomes
for a win rate. Exit status 0 whatever the verdicts (1 for an unreadable report).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmschool.pipeline import TITLES  # noqa: E402
from lmschool.report.intervals import interval95  # noqa: E402
from lmschool.report.markdown import MEASURES, fmt, table  # noqa: E402


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


def bar_met(value: float, op: str, threshold: float) -> bool:
    if op == ">=":
        return value >= threshold - _EPS
    if op == "<=":
        return value <= threshold + _EPS
    if op == ">":
        return value > threshold
    raise ValueError(f"unknown comparison {op!r}")



# the pipeline as a whole has bars too (the demo's wall time)
BAR_TITLES = {**TITLES, "run": "pipeline"}
LABELS = {**MEASURES, "seconds_total": ("wall time of `make demo`", "seconds")}


def check_bars(report: dict) -> dict:
    """{bar name: {value, threshold, op, met, issue, stage, key, interval95}} from report.json's numbers."""
    def number(stage: str, key: str):
        return report.get(key) if stage == "run" else report["stages"].get(stage, {}).get(key)

    bars = {}
    for bar in BARS:
        value, threshold = number(bar.stage, bar.key), bar.threshold
        if bar.relative_to is not None:
            base = number(*bar.relative_to.split("."))
            threshold = None if base is None else base + bar.threshold
        met = value is not None and threshold is not None and bar_met(value, bar.op, threshold)
        interval = None if bar.stage == "run" else interval95(report["stages"].get(bar.stage, {}), bar.key)
        bars[bar.name] = {"stage": bar.stage, "key": bar.key, "op": bar.op, "value": value,
                          "threshold": threshold, "relative_to": bar.relative_to, "met": bool(met),
                          "interval95": list(interval) if interval else None, "issue": bar.issue}
    return bars


def render(report: dict) -> str:
    """The bars section as markdown: how many are met, the table, what the intervals mean."""
    st, bars = report["stages"], check_bars(report)
    met = sum(b["met"] for b in bars.values())
    lines = ["## Bars", "", f"{met} of {len(bars)} bars met.", ""]
    rows = []
    for name, b in bars.items():
        kind = "seconds" if b["key"] == "seconds_total" else MEASURES.get(b["key"], ("", "num"))[1]
        threshold = fmt(b["threshold"], kind)
        bar = BARS_BY_NAME[name]
        if bar.relative_to:
            offset = f" {bar.threshold * 100:+g} points" if kind == "rate" else f" {bar.threshold:+g}"
            threshold += f" ({bar.relative_to}{offset if bar.threshold else ''})"
        status = st.get(b["stage"], {}).get("status", "done")
        verdict = "**met**" if b["met"] else ("not run" if status != "done" and b["value"] is None else "not met")
        interval = b.get("interval95")
        rows.append([f"{BAR_TITLES[b['stage']]}: {LABELS.get(b['key'], (b['key'],))[0]} (issue {b['issue']})",
                     fmt(b["value"], kind),
                     f"{fmt(interval[0], kind)} - {fmt(interval[1], kind)}" if interval else "—",
                     f"{b['op']} {threshold}", verdict])
    lines += table(["bar", "value", "95% interval", "threshold", "met"], rows) + [""]
    counted = [f"{n} {what}" for n, what in (
        (st.get("dpo", {}).get("refuse_rows") or st.get("sft", {}).get("refuse_rows"), "forbidden requests"),
        (st.get("sft", {}).get("heldout_pupil_rows"), "questions about held-out pupils"),
        (st.get("reward", {}).get("noise_free_pairs"), "held-out reward-model pairs")) if n]
    lines += ["95% intervals show how much of a value is the evaluation's luck: for a rate over n answers the "
              "Wilson score interval" + (f" (here {', '.join(counted)})" if counted else "") + ", for a win "
              "rate a normal interval over its per-prompt outcomes. A bar whose interval straddles its "
              "threshold is not settled by one run.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the project's acceptance bars on a run's report.json")
    ap.add_argument("run_dir", type=Path, help="the --out directory of `lmschool run` (holds report.json)")
    ap.add_argument("--json", action="store_true", help="print the bars as JSON")
    args = ap.parse_args(argv)
    path = args.run_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"bars.py: cannot read {path} ({e}); run `lmschool run` or `lmschool report {args.run_dir}` first",
              file=sys.stderr)
        return 1
    print(json.dumps(check_bars(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
