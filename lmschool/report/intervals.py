"""95% intervals beside the report's rates: how much of a figure is the evaluation's luck.

A rate over n answers (facts right over the questions asked, refusals over the forbidden
requests, reward-model accuracy over held-out pairs, flawed answers over the answers sampled,
invented answers over the honesty questions) gets the Wilson score interval; a win rate
with ties counted half gets a normal interval over its per-prompt outcomes (1, 1/2, 0). Each is
written beside its figure in report.json as `<key>_interval95: [low, high]`, computed from the
counts the stage wrote in its summary (RATE_COUNTS names which count a rate is over).
"""

from __future__ import annotations

import math

# rate key -> the summary key of the count it is over
RATE_COUNTS = {"correct_heldout_pupils": "heldout_pupil_rows", "correct_train_pupils": "train_pupil_rows",
               "correct_arithmetic": "arithmetic_rows", "end_of_turn_rate": "eval_rows",
               "refusal_correct": "refuse_rows", "fact_correct": "fact_rows",
               "accuracy_noise_free": "noise_free_pairs",
               # the rater on the same held-out pairs as the reward model's accuracy_noise_free
               "rater_agreement_noise_free": "noise_free_pairs",
               # the conduct of sampled answers (issue 15): over all of them, over the honesty questions'
               "flaw_rate": "conduct_rows", "hallucination_rate": "unknown_rows",
               # ... and of the SFT reference's, judged by a policy stage
               "sft_flaw_rate": "sft_conduct_rows", "sft_hallucination_rate": "sft_unknown_rows"}
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


def interval95(entry: dict, key: str) -> tuple[float, float] | None:
    """The 95% interval of a stage entry's `key`, where the entry says what it is a rate over."""
    value = entry.get(key)
    if value is None:
        return None
    if key == "win_rate_vs_sft":
        counts = [entry.get(k) for k in ("wins", "ties", "losses")]
        return outcome_interval(*counts) if all(isinstance(c, int) for c in counts) and sum(counts) else None
    n = entry.get(RATE_COUNTS.get(key, ""))
    return wilson_interval(value, int(n)) if isinstance(n, (int, float)) and n > 0 else None


def add_intervals(entry: dict) -> dict:
    """`<key>_interval95` beside every rate of `entry` whose count it knows."""
    for key in [*RATE_COUNTS, "win_rate_vs_sft"]:
        interval = interval95(entry, key)
        if interval is not None:
            entry[f"{key}_interval95"] = list(interval)
    return entry
