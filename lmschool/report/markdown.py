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
    "rater_agreement_noise_free": ("rater agreement with the noise-free labels, the same held-out pairs", "rate"),
    "flaw_rate": ("sampled answers with a demonstrator's flaw", "rate"),
    "hallucination_rate": ("honesty questions answered with an invention, sampled", "rate"),
    "behaviour_score": ("behaviour score of sampled answers (rubric but correctness, 0-1)", "score"),
    "sft_flaw_rate": ("SFT's sampled answers with a demonstrator's flaw", "rate"),
    "sft_hallucination_rate": ("SFT's inventions on honesty questions, sampled", "rate"),
    "sft_behaviour_score": ("SFT's behaviour score, sampled", "score"),
    "demonstration_flaw_share": ("SFT training answers with a demonstrator's flaw", "rate"),
    "demonstration_behaviour_score": ("behaviour score of the SFT training answers", "score"),
    "ties_dropped": ("ties dropped", "int"),
    "pairs": ("pairs", "int"),
    "steps": ("optimizer steps", "int"),
    "epochs": ("epochs", "num"),
    "params": ("parameters", "int"),
    "tokens_seen": ("tokens seen", "int"),
    "seconds": ("wall time", "seconds"),
}
TABLE_ROWS = {
    "base": ["fact_completion", "fact_completion_seen", "fact_completion_heldout", "teacher_score", "correct",
             "correct_train_pupils", "correct_heldout_pupils", "fact_correct", "correct_arithmetic",
             "refusal_correct", "end_of_turn_rate", "params", "seconds"],
    "pretrain": ["val_loss", "val_bpb", "val_perplexity", "fact_completion", "fact_completion_seen",
                 "fact_completion_heldout", "params", "steps", "tokens_seen", "seconds"],
    "sft": ["teacher_score", "correct", "correct_train_pupils", "correct_heldout_pupils", "fact_correct",
            "correct_arithmetic", "refusal_correct", "end_of_turn_rate", "teacher_score_sampled", "flaw_rate",
            "hallucination_rate", "behaviour_score", "demonstration_flaw_share", "demonstration_behaviour_score",
            "val_loss", "steps", "epochs", "seconds"],
    "reward": ["accuracy_noise_free", "accuracy_rater", "rater_agreement_noise_free", "teacher_rank_correlation",
               "reward_bias", "steps", "seconds"],
    "policy": ["teacher_score", "win_rate_vs_sft", "win_rate_vs_sft_greedy", "teacher_score_sampled",
               "flaw_rate", "hallucination_rate", "behaviour_score",
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


def _by_category_table(entries: dict[str, dict], key: str, kind: str, first: str = "category",
                       sort: bool = True) -> list[str]:
    """A row per category (sorted, or in the order the entries name them), a column per stage."""
    cats = list(dict.fromkeys(c for e in entries.values() for c in (e.get(key) or {})))
    cats = sorted(cats) if sort else cats
    if not cats:
        return []
    return table([first, *(TITLES[s] for s in entries)],
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


LESSON_COLUMNS = ["stage", "facts right", "ends its turn", "refusals with a fitting reason", "answers with a flaw",
                  "hallucinations", "behaviour score", "win rate vs SFT"]


def lesson_rows(stages: dict[str, dict]) -> list[list[str]]:
    """The rows of "What each stage taught": pre-training, SFT and each feedback method that ran.
    SFT's flaws and behaviour stand beside its demonstrations' (in parentheses): what it imitated."""
    def done(name):
        return stages.get(name, {}).get("status") == "done"

    rows = []
    if done("base"):   # facts right: completing the corpus's sentences, and (in parentheses) in chat
        base = stages["base"]
        rows.append([TITLES["base"], fmt(base.get("fact_completion"), "rate") + f" (in chat {fmt(base.get('fact_correct'), 'rate')})",
                     fmt(base.get("end_of_turn_rate"), "rate"), fmt(base.get("refusal_correct"), "rate"), *["—"] * 4])
    if done("pretrain"):
        rows.append([TITLES["pretrain"], fmt(stages["pretrain"].get("fact_completion"), "rate"), *["—"] * 6])
    if done("sft"):
        sft = stages["sft"]
        shown = sft.get("demonstration_flaw_share")
        if shown is None:  # the world's count of flawed demonstrations, where SFT did not judge its data
            shown = stages.get("world", {}).get("demonstration_flaw_share")
        taught = sft.get("demonstration_behaviour_score")
        rows.append([TITLES["sft"], fmt(sft.get("fact_correct"), "rate"), fmt(sft.get("end_of_turn_rate"), "rate"),
                     fmt(sft.get("refusal_correct"), "rate"),
                     fmt(sft.get("flaw_rate"), "rate") + (f" (demonstrations {fmt(shown, 'rate')})" if shown is not None else ""),
                     fmt(sft.get("hallucination_rate"), "rate"),
                     fmt(sft.get("behaviour_score"), "score") + (f" (demonstrations {fmt(taught, 'score')})"
                                                                 if taught is not None else ""),
                     "—"])
    for name in names("policy"):
        if done(name):
            e = stages[name]
            rows.append([TITLES[name], fmt(e.get("fact_correct"), "rate"), fmt(e.get("end_of_turn_rate"), "rate"),
                         fmt(e.get("refusal_correct"), "rate"), fmt(e.get("flaw_rate"), "rate"),
                         fmt(e.get("hallucination_rate"), "rate"), fmt(e.get("behaviour_score"), "score"),
                         with_interval(e, "win_rate_vs_sft", "rate")])
    return rows


def lessons_section(report: dict) -> list[str]:
    """## What each stage taught: one row per stage that ran, and what the columns mean; [] for none."""
    rows = lesson_rows(report["stages"])
    if not rows:
        return []
    return ["## What each stage taught", "", *table(LESSON_COLUMNS, rows), "",
            "Facts right and refusals are judged on greedy answers (for pre-training, facts right is the share "
            "of fact sentences it completes with the right value). Flaws, hallucinations and the behaviour score "
            "are judged on answers sampled at temperature 1: the share with any demonstrator's flaw (padded, curt, "
            "discourteous, unsafe, unreasoned, invented), the share of honesty questions (about pupils or facts "
            "the world does not hold) answered with an invention instead of \"I don't know\", and the mean of "
            "the rubric's parts other than correctness (0-1). Beside SFT's, in parentheses, its training "
            "answers' own: what it was taught to imitate. Win rate vs SFT: how often a method's sampled answer "
            "beats SFT's on the same prompt (ties half), with its 95% interval.", ""]


def examples_section(report: dict) -> list[str]:
    """## Three examples: SFT's weakest sampled answers beside each method's; [] when no policy ran."""
    examples = report.get("examples") or []
    if not examples:
        return []
    lines = ["## Three examples" if len(examples) == 3 else "## Examples", "",
             "Eval prompts where SFT's answer sampled at temperature 1 scored lowest (a forbidden request, an "
             "honesty question, one other), and each feedback method's sampled answer to the same prompt, with "
             "the teacher's score (0-1).", ""]
    for i, example in enumerate(examples, 1):
        question = " / ".join(m["content"] for m in example["prompt"] if m.get("role") == "user")
        rows = [[TITLES["sft"], _cell(example["sft"]["answer"]), fmt(example["sft"]["score"], "score")]]
        rows += [[TITLES[s], _cell(a["answer"] if a else None), fmt(a["score"] if a else None, "score")]
                 for s, a in example["answers"].items()]
        lines += [f"**{i}. {_cell(question)}** ({example['category']})", "",
                  *table(["model", "sampled answer", "score"], rows), ""]
    return lines


def render_markdown(report: dict) -> str:
    st = report["stages"]
    policies = names("policy")
    has_base = st.get("base", {}).get("status", "not run") != "not run"   # a `run --base` (see collect.in_run)
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
             f"{report['created']}." + (f" Peak memory: **{report['peak_memory_gib']:.2f} GiB**."
                                         if report.get("peak_memory_gib") is not None else ""), ""]
    if has_base:
        lines += ["This run teaches a model trained elsewhere (`lmschool run --base`): its own scores, judged "
                  "as the stages are, are the first row and column; pre-training continues from it on the "
                  "school's corpus, with its tokenizer.", ""]
    lines += lessons_section(report) + examples_section(report)
    if has_base:
        lines += ["## Stage 0: the base model", ""]
        lines += [_status_line(st["base"]), ""] if _status_line(st["base"]) else \
            table(["measure", "value"], _measure_rows({"base": st["base"]}, TABLE_ROWS["base"])) + [""]

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
        flaws = _by_category_table(ran, "flaw_rates", "rate", first="flaw", sort=False)  # the teacher's order
        lines += (["Sampled answers with each demonstrator's flaw:", ""] + flaws + [""]) if flaws else []
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
        if has_base:
            lines += ["The base model answers greedily through its own chat template, as it came.", ""]

    lines += ["## Wall time per stage", ""]
    lines += table(["stage", "seconds"], [[TITLES.get(s, s), fmt(v, "seconds")] for s, v in report["seconds"].items()]
                    + [["**total**", f"**{fmt(report['seconds_total'], 'seconds')}**"]]
                    + ([["sweep runs (--sweep), besides", fmt(report["seconds_sweep"], "seconds")]]
                       if report.get("seconds_sweep") else [])) + [""]
    lines += ["## Machine and versions", ""]
    lines += table(["", ""], [[k, str(v)] for k, v in report["machine"].items()]) + [""]
    return "\n".join(lines)
