"""report.md: a pipeline run's figures as tables, its plots and sample answers, from report.json's dict.

The figures are the run's facts: each measure, by stage and side by side, with the SFT baseline
beside every method. The project's acceptance bars (thresholds from its issues) are not the
product's: bench/bars.py prints them from report.json.
"""

from __future__ import annotations

import re

from lmschool.pipeline import TITLES, names

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
    "rater_agreement": ("rater agreement with the noise-free teacher", "rate"),
    "ties_dropped": ("ties dropped", "int"),
    "pairs": ("pairs", "int"),
    "steps": ("optimizer steps", "int"),
    "epochs": ("epochs", "num"),
    "params": ("parameters", "int"),
    "tokens_seen": ("tokens seen", "int"),
    "seconds": ("wall time", "seconds"),
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

def fmt(value, kind: str) -> str:
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


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def with_interval(entry: dict, key: str, kind: str) -> str:
    """The figure, and its 95% interval where the report has one: "76.2% (66.1-84.0%)"."""
    interval = entry.get(f"{key}_interval95")
    if entry.get(key) is None or not interval:
        return fmt(entry.get(key), kind)
    low, high = fmt(interval[0], kind).rstrip("%"), fmt(interval[1], kind)
    return f"{fmt(entry[key], kind)} ({low}-{high})"


def _measure_rows(entries: dict[str, dict], keys: list[str]) -> list[list[str]]:
    rows = []
    for key in keys:
        if all(e.get(key) is None for e in entries.values()):
            continue
        label, kind = MEASURES.get(key, (key.replace("_", " "), "num"))
        rows.append([label, *(with_interval(e, key, kind) for e in entries.values())])
    return rows


def _status_line(entry: dict) -> str | None:
    return {"not run": "_not run_", "unfinished": "_started, not finished (no summary)_"}.get(entry["status"])


def _by_category_table(entries: dict[str, dict], key: str, kind: str) -> list[str]:
    cats = sorted({c for e in entries.values() for c in (e.get(key) or {})})
    if not cats:
        return []
    return table(["category", *(TITLES[s] for s in entries)],
                  [[c, *(fmt((e.get(key) or {}).get(c), kind) for e in entries.values())] for c in cats])


def _reward_category_table(by_category: dict) -> list[str]:
    """accuracy_by_category: {category: {pairs, rater, noise_free}} (or {category: accuracy})."""
    if not by_category:
        return []
    if all(isinstance(v, dict) for v in by_category.values()):
        return table(["category", "test pairs", "accuracy vs rater", "accuracy vs noise-free"],
                      [[c, fmt(v.get("pairs"), "int"), fmt(v.get("rater"), "rate"), fmt(v.get("noise_free"), "rate")]
                       for c, v in sorted(by_category.items())]) + [""]
    return table(["category", "accuracy"], [[c, fmt(v if not isinstance(v, dict) else None, "rate")]
                                            for c, v in sorted(by_category.items())]) + [""]


def render_markdown(report: dict) -> str:
    st = report["stages"]
    policies = names("policy")
    lines = [f"# lmschool run report: `{report['run_dir']}`", "",
             "One small chat model trained in three stages on the school world: **pre-training** (reading "
             "a corpus), **SFT** (taught to answer in a chat format), and **learning from feedback** (a noisy "
             "rater ranks sampled answers, a reward model learns the ranking, PPO/GRPO optimise against it, "
             "DPO/IPO/SimPO learn from the pairs directly). Every policy is judged by the same gold teacher "
             "(a rubric in [0, 1]: correct facts and sums, politeness, brevity, refusals with a reason that fits the request, a "
             "well-formed end) on held-out prompts. Rates are shown as percentages; report.json has the "
             "same numbers as fractions. In parentheses beside a rate, its 95% interval (report.json: "
             "`<key>_interval95`): how much of it is the evaluation's luck — the Wilson score interval "
             "for a rate over n answers, a normal interval over the per-prompt outcomes for a win rate.", "",
             f"Wall time in all: **{fmt(report['seconds_total'], 'seconds')}** on {report['machine']['cpu']} "
             f"({report['machine']['cores']} cores, {report['machine']['device']}); report written "
             f"{report['created']}.", ""]

    lines += ["## Stage 1: pre-training", ""]
    lines += [_status_line(st["pretrain"]), ""] if _status_line(st["pretrain"]) else \
        table(["measure", "value"], _measure_rows({"pretrain": st["pretrain"]}, TABLE_ROWS["pretrain"])) + [""]

    lines += ["## Stage 2: SFT", ""]
    if _status_line(st["sft"]):
        lines += [_status_line(st["sft"]), ""]
    else:
        lines += table(["measure", "value"], _measure_rows({"sft": st["sft"]}, TABLE_ROWS["sft"])) + [""]
        cats = sorted(set(st["sft"].get("teacher_score_by_category") or {}) | set(st["sft"].get("correct_by_category") or {}))
        if cats:
            lines += table(["category", "teacher score", "correct"],
                            [[c, fmt((st["sft"].get("teacher_score_by_category") or {}).get(c), "score"),
                              fmt((st["sft"].get("correct_by_category") or {}).get(c), "rate")] for c in cats]) + [""]

    lines += ["## Stage 3a: labels and the reward model", ""]
    label = st["label"]
    if _status_line(label):
        lines += [f"Labelling: {_status_line(label)}", ""]
    else:
        keys = [k for k in label if k not in ("status",)]
        lines += table(["labelling", "value"], _measure_rows({"label": label}, keys)) + [""]
    if _status_line(st["reward"]):
        lines += [f"Reward model: {_status_line(st['reward'])}", ""]
    else:
        lines += table(["reward model", "value"], _measure_rows({"reward": st["reward"]}, TABLE_ROWS["reward"])) + [""]
        lines += _reward_category_table(st["reward"].get("accuracy_by_category") or {})

    lines += ["## Stage 3b: learning from feedback, side by side", ""]
    ran = {s: st[s] for s in ["sft", *policies] if st[s]["status"] == "done"}
    if "sft" in ran:  # SFT's sampled answers are judged by each policy stage (the same seed: the same answers)
        sampled = [st[s]["sft_teacher_score_sampled"] for s in policies if st[s].get("sft_teacher_score_sampled")]
        ran["sft"] = {**ran["sft"], "teacher_score_sampled": sampled[0]} if sampled else ran["sft"]
    not_ran = [f"{TITLES[s]} ({st[s]['status']})" for s in policies if st[s]["status"] != "done"]
    if len(ran) > ("sft" in ran):
        lines += table(["measure", *(TITLES[s] for s in ran)], _measure_rows(ran, TABLE_ROWS["policy"])) + [""]
        lines += ["Teacher score by category:", ""] + _by_category_table(ran, "teacher_score_by_category", "score") + [""]
    if not_ran:
        lines += [f"Not in the table: {', '.join(not_ran)}.", ""]
    if report.get("sweep"):
        lines += ["Sweep runs (the frontier's points):", ""]
        lines += table(["run", "teacher score", "win rate vs SFT", "KL from SFT", "RM reward"],
                        [[name, fmt(s["teacher_score"], "score"), fmt(s["win_rate_vs_sft"], "rate"),
                          fmt(s["kl_from_sft"], "nats"), fmt(s["rm_reward"], "num")]
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
        lines += table(["model", "answer"], [[TITLES[m], _cell(a)] for m, a in sample["answers"].items()]) + [""]
    if report["samples"]:
        lines += ["The pre-trained model answers greedily through the chat template it has never seen; the "
                  "others' answers are those their stages judged (eval_answers.jsonl).", ""]

    lines += ["## Wall time per stage", ""]
    lines += table(["stage", "seconds"], [[TITLES.get(s, s), fmt(v, "seconds")] for s, v in report["seconds"].items()]
                    + [["**total**", f"**{fmt(report['seconds_total'], 'seconds')}**"]]
                    + ([["sweep runs (--sweep), besides", fmt(report["seconds_sweep"], "seconds")]]
                       if report.get("seconds_sweep") else [])) + [""]
    lines += ["## Machine and versions", ""]
    lines += table(["", ""], [[k, str(v)] for k, v in report["machine"].items()]) + [""]
    return "\n".join(lines)
