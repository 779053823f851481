"""The run report on a hand-made run directory: report.json's keys and ranges, missing stages
reported as not run, valid PNG plots linked from report.md, sample answers side by side (the
pre-trained model's written by pre-training), a report that reads files only; and the project's
bars (bench/bars.py) computed from report.json's numbers (one pass and one fail worked by hand)."""

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmschool.checkpoint import save_model
from lmschool.cli import main
from lmschool.generate import generate
from lmschool.model import ModelConfig, build_model
from lmschool.pipeline import BY_NAME
from lmschool.report import build_report
from lmschool.data.prompts import pick_prompts
from lmschool.report import intervals
from lmschool.report.collect import REQUIRED, required
from lmschool.report.markdown import with_interval
from lmschool.stages.pretrain import write_chat_answers
from lmschool.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _load_bars():
    spec = importlib.util.spec_from_file_location("bench_bars", ROOT / "bench" / "bars.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bars_py = _load_bars()

PROMPTS = [
    ([{"role": "user", "content": "Can I run in the corridor?"}], "refuse", None),
    ([{"role": "user", "content": "What is 3 plus 4?"}], "arithmetic", None),
    ([{"role": "user", "content": "What town does Mia Smith live in?"}], "fact_town", True),
    ([{"role": "user", "content": "Which town is Tom Lee from?"}], "fact_town", False),
    ([{"role": "user", "content": "Hello! How are you?"}], "smalltalk", None),
]


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_jsonl(path, rows, torn_tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn_tail)


def policy_summary(score, win, refusal, fact, kl, rm=None, seconds=10.0, **conduct):
    by_cat = {"arithmetic": score - 0.1, "fact_town": score, "refuse": score + 0.05}
    return {"teacher_score": score, "teacher_score_by_category": by_cat, "win_rate_vs_sft": win,
            "refusal_correct": refusal, "fact_correct": fact, "kl_from_sft": kl, "rm_reward": rm,
            "correct_heldout_pupils": 0.3, "correct_arithmetic": 0.4, "end_of_turn_rate": 1.0, "seconds": seconds,
            **conduct}


def answers(tag):
    return [{"prompt": p, "category": c, "heldout": h, "response": f"{tag} answer {i} | with a pipe",
             "score": 0.5} for i, (p, c, h) in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run without IPO, SimPO (unfinished) and GRPO; numbers chosen for the bar checks."""
    d = tmp_path_factory.mktemp("demo")
    write_json(d / "timings.json", {"world": 1.0, "pretrain": 100.0, "sft": 200.0, "reward": 50.0,
                                    "dpo": 60.0, "ppo": 300.0, "sweep/dpo-beta0.3": 40.0})
    write_json(d / "world" / "world.json", {"preset": "tiny", "summary": {"pupils": 12, "heldout_pupils": 3,
               "demonstration_flaw_share": 0.28, "corpus": {"documents": 50}, "sft": {"conversations": 40}, "eval": {"rows": 5}}})
    write_jsonl(d / "world" / "eval.jsonl", [{"prompt": p, "category": c, "heldout": h} for p, c, h in PROMPTS])
    tok = train_tokenizer([], byte_level=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    save_model(d / "pretrain" / "model", build_model(cfg, seed=0), tok)
    write_chat_answers(d / "pretrain", [d / "world" / "corpus.txt"])   # what pre-training does at its end
    write_json(d / "pretrain" / "summary.json", {"val_loss": 1.2, "val_bpb": 1.6, "fact_completion": 0.5,
                                                 "steps": 40, "seconds": 99.0})
    write_jsonl(d / "pretrain" / "metrics.jsonl",
                [{"step": s, "loss": 6.0 / s, "lr": 1e-3} for s in range(1, 41)] + [{"step": 40, "val_loss": 1.2}],
                torn_tail='{"step": 41, "lo')  # a run killed mid-line
    write_json(d / "sft" / "summary.json", {
        "teacher_score": 0.75, "teacher_score_by_category": {"arithmetic": 0.6, "fact_town": 0.8, "refuse": 0.7},
        "correct_by_category": {"arithmetic": 0.4, "fact_town": 0.5}, "correct_heldout_pupils": 0.31,
        "correct_train_pupils": 0.93, "correct_arithmetic": 0.4, "fact_correct": 0.50, "refusal_correct": 0.8,
        "end_of_turn_rate": 0.99, "val_loss": float("nan"), "seconds": 190.0, "flaw_rate": 0.24,
        "demonstration_behaviour_score": 0.85})
    write_jsonl(d / "sft" / "metrics.jsonl", [{"step": s, "loss": 2.0 - s / 20} for s in range(1, 21)])
    write_jsonl(d / "sft" / "eval_answers.jsonl", answers("sft"))
    write_json(d / "reward" / "summary.json", {"accuracy_noise_free": 0.9, "accuracy_rater": 0.74,
                                               "rater_agreement_noise_free": 0.9,
                                               "teacher_rank_correlation": 0.65, "reward_bias": -0.3,
                                               "accuracy_by_category": {"refuse": {"pairs": 20, "rater": 0.7,
                                                                                   "noise_free": 0.95}},
                                               "seconds": 49.0})
    write_jsonl(d / "reward" / "metrics.jsonl", [{"step": s, "loss": 0.7 - s / 100} for s in range(1, 11)])
    write_json(d / "dpo" / "summary.json", policy_summary(0.80, 0.70, 0.95, 0.47, 3.5, seconds=59.0,
                                                            wins=6, ties=2, losses=2, flaw_rate=0.08,
                                                            hallucination_rate=0.10, behaviour_score=0.85))
    write_jsonl(d / "dpo" / "metrics.jsonl", [{"step": s, "loss": 0.69 - s / 50} for s in range(1, 11)])
    write_jsonl(d / "dpo" / "eval_answers.jsonl", answers("dpo")[::-1])  # other order: matched by prompt
    write_json(d / "ppo" / "summary.json", policy_summary(0.78, 0.66, 0.90, 0.49, 1.5, rm=0.4, wins=80, ties=0,
                                                            losses=20, flaw_rate=0.09, hallucination_rate=0.11,
                                                            behaviour_score=0.84))
    write_jsonl(d / "ppo" / "metrics.jsonl",
                [{"step": i, "reward": 0.1 * i, "teacher_score": 0.7 + 0.01 * i, "kl": 0.2 * i,
                  "entropy": 1.0, "pg_loss": -0.01 * i} for i in range(1, 6)])
    write_jsonl(d / "ppo" / "eval_answers.jsonl", answers("ppo")[:2])  # answers to two prompts only
    write_jsonl(d / "label" / "prefs.jsonl", [])
    write_json(d / "label" / "prefs.summary.json", {"pairs": 300, "rater_agreement": 0.75, "ties_dropped": 12})
    (d / "simpo").mkdir()                                             # started, no summary
    for name, score, kl in (("dpo-beta0.05", 0.82, 6.0), ("dpo-beta0.5", 0.77, 1.0), ("ppo-kl0.01", 0.79, 4.0)):
        write_json(d / "sweep" / name / "summary.json", policy_summary(score, 0.6, 0.9, 0.5, kl))
    report = build_report(d, samples=3)
    return d, report, tok, cfg


def test_report_json_has_the_issue_keys_finite_and_in_range(run_dir):
    d, report, *_ = run_dir
    on_disk = json.loads((d / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk["stages"] == report["stages"]
    assert set(REQUIRED) == {"world", "base", "pretrain", "sft", "reward", "policy"}   # base: with --base only
    assert "base" not in on_disk["stages"]   # this run has no base/ directory: the shape it always had
    for stage in ("world", "pretrain", "sft", "reward", "dpo", "ipo", "simpo", "ppo", "grpo"):
        keys = required(BY_NAME[stage])
        assert keys and set(keys) | {"seconds", "status"} <= set(on_disk["stages"][stage]), stage
    assert "bars" not in on_disk   # the project's bars are not the product's: bench/bars.py
    # seconds from timings.json (not the summary's 99 s); a stage without a timing keeps its summary's
    assert report["stages"]["pretrain"]["seconds"] == 100.0 and report["stages"]["dpo"]["seconds"] == 60.0
    assert report["seconds_total"] == 1 + 100 + 200 + 50 + 60 + 300   # what make demo runs: not --sweep's runs
    assert report["seconds_sweep"] == 40
    assert report["stages"]["sft"]["val_loss"] is None  # NaN in the summary -> null, not invalid JSON
    rates = ["fact_completion", "correct_heldout_pupils", "correct_train_pupils", "correct_arithmetic", "fact_correct",
             "refusal_correct", "end_of_turn_rate", "accuracy_noise_free", "accuracy_rater", "win_rate_vs_sft",
             "teacher_score"]
    for stage, entry in on_disk["stages"].items():
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value), (stage, key)
                if key in rates:
                    assert 0 <= value <= 1, (stage, key, value)
    assert on_disk["stages"]["sft"]["teacher_score_by_category"]["fact_town"] == 0.8
    assert on_disk["machine"]["torch"] == torch.__version__ and on_disk["machine"]["cores"] >= 1
    assert on_disk["preset"] == "tiny"


def test_missing_stages_are_not_run_and_say_so(run_dir):
    d, report, *_ = run_dir
    st = report["stages"]
    assert st["ipo"]["status"] == "not run" and st["grpo"]["status"] == "not run"
    assert st["label"] == {"status": "done", "pairs": 300, "rater_agreement": 0.75, "ties_dropped": 12,
                           "seconds": None}
    assert st["simpo"]["status"] == "unfinished"
    assert st["ipo"]["teacher_score"] is None and st["ipo"]["seconds"] is None
    md = (d / "report.md").read_text()
    assert "IPO (not run)" in md and "SimPO (unfinished)" in md
    assert "| rater agreement with the noise-free teacher | 75.0% |" in md
    assert "| refuse | 20 | 70.0% | 95.0% |" in md  # the reward model's accuracy by category


ISSUE_15_BARS = [
    "run.seconds_total", "world.demonstration_flaw_share", "sft.correct_heldout_pupils", "sft.correct_train_pupils",
    "sft.end_of_turn_rate",
    *(f"{m}.{bar}" for m in ("dpo", "ppo") for bar in (
        "win_rate_vs_sft", "win_rate_vs_sft_interval95.low", "refusal_correct", "hallucination_rate",
        "flaw_rate vs sft.flaw_rate", "fact_correct vs sft.fact_correct",
        "behaviour_score vs sft.demonstration_behaviour_score")),
    "best.win_rate_vs_sft", "reward.accuracy_noise_free",
    "reward.accuracy_noise_free vs reward.rater_agreement_noise_free"]


def test_the_bars_are_issue_15s():
    """The list of issue 15 (and issue 8's wall time); the old sums and rank-correlation bars are gone."""
    assert [b.name for b in bars_py.BARS] == ISSUE_15_BARS
    assert {b.issue for b in bars_py.BARS if b.name != "run.seconds_total"} == {15}
    assert bars_py.BARS_BY_NAME["best.win_rate_vs_sft"].best_of == ("dpo", "ipo", "simpo", "ppo", "grpo")


def test_bars_are_computed_from_the_numbers(run_dir):
    """By hand, from the fixture's numbers:
    world.demonstration_flaw_share 0.28 in [0.15, 0.35]                     -> met
    sft.correct_heldout_pupils 0.31 >= 0.70                                  -> not met
    dpo.win_rate_vs_sft 0.70 >= 0.60                                         -> met
    dpo's interval from 6 wins, 2 ties, 2 losses: low 0.452082 > 0.55        -> not met
    ppo's from 80, 0, 20: mean 0.8, var 0.16, half 1.959964 * 0.04, low 0.721601 > 0.55 -> met
    dpo.flaw_rate 0.08 <= sft's 0.24 / 3 (= 0.07999999999999999 in floats)  -> met (the edge)
    ppo.flaw_rate 0.09 <= 0.08                                               -> not met
    dpo.hallucination_rate 0.10 <= 0.10, ppo's 0.11                          -> met, not met
    dpo.fact_correct 0.47 >= sft's 0.50 - 0.02 = 0.48                        -> not met
    ppo.fact_correct 0.49 >= 0.48                                            -> met
    dpo.behaviour_score 0.85 >= SFT's demonstrations' 0.85, ppo's 0.84       -> met, not met
    ppo.refusal_correct 0.90 >= 0.90 (equal)                                 -> met
    best: DPO's 0.70 (PPO 0.66; IPO, SimPO, GRPO did not run) >= 0.65        -> met
    reward.accuracy_noise_free 0.9 >= 0.80                                   -> met
    reward.accuracy_noise_free 0.9 > the rater's 0.9 (equal)                 -> not met
    run.seconds_total 711 <= 900                                             -> met"""
    _, report, *_ = run_dir
    bars = bars_py.check_bars(report)
    expected = {"world.demonstration_flaw_share": True, "sft.correct_heldout_pupils": False,
                "dpo.win_rate_vs_sft": True, "dpo.win_rate_vs_sft_interval95.low": False,
                "ppo.win_rate_vs_sft_interval95.low": True,
                "dpo.flaw_rate vs sft.flaw_rate": True, "ppo.flaw_rate vs sft.flaw_rate": False,
                "dpo.hallucination_rate": True, "ppo.hallucination_rate": False,
                "dpo.fact_correct vs sft.fact_correct": False, "ppo.fact_correct vs sft.fact_correct": True,
                "dpo.behaviour_score vs sft.demonstration_behaviour_score": True,
                "ppo.behaviour_score vs sft.demonstration_behaviour_score": False,
                "ppo.refusal_correct": True, "best.win_rate_vs_sft": True, "reward.accuracy_noise_free": True,
                "reward.accuracy_noise_free vs reward.rater_agreement_noise_free": False, "run.seconds_total": True}
    assert {k: bars[k]["met"] for k in expected} == expected
    assert list(bars) == ISSUE_15_BARS
    assert bars["dpo.win_rate_vs_sft_interval95.low"]["value"] == pytest.approx(0.452082, abs=1e-6)
    assert bars["ppo.win_rate_vs_sft_interval95.low"]["value"] == pytest.approx(0.721601, abs=1e-6)
    assert bars["dpo.flaw_rate vs sft.flaw_rate"]["threshold"] == pytest.approx(0.08)
    assert bars["dpo.fact_correct vs sft.fact_correct"]["threshold"] == pytest.approx(0.48)
    assert bars["best.win_rate_vs_sft"]["value"] == 0.70 and bars["best.win_rate_vs_sft"]["best_stage"] == "dpo"
    # the same bar without its stage: not met, value null
    partial = {"stages": {"sft": {"flaw_rate": 0.3, "fact_correct": 0.5}}, "seconds_total": 10.0}
    flaw = bars_py.check_bars(partial)["dpo.flaw_rate vs sft.flaw_rate"]
    assert flaw["value"] is None and not flaw["met"] and flaw["threshold"] == pytest.approx(0.1)
    md = bars_py.render(report)
    row = next(line for line in md.splitlines() if "DPO: facts right, all pupils" in line)
    assert "47.0%" in row and ">= 48.0% (sft.fact_correct -2 points)" in row and row.endswith("| not met |")
    row = next(line for line in md.splitlines() if "DPO: sampled answers with a demonstrator's flaw" in line)
    assert "<= 8.0% (sft.flaw_rate / 3)" in row and row.endswith("| **met** |")
    row = next(line for line in md.splitlines() if line.startswith("| best feedback method:"))
    assert "| 70.0% (DPO) |" in row and row.endswith("| **met** |")
    row = next(line for line in md.splitlines() if "lower end of its 95% interval" in line and "PPO" in line)
    assert "| > 55.0% |" in row and row.endswith("| **met** |")
    assert "| in 15.0% - 35.0% | **met** |" in md
    assert "## Bars" not in (run_dir[0] / "report.md").read_text()


def test_bars_at_their_edges():
    """Each kind of bar met and not met at its edge, on hand-made reports."""
    def check(name, **stages):
        return bars_py.check_bars({"stages": stages, "seconds_total": 900.0})[name]

    share = "world.demonstration_flaw_share"
    assert [check(share, world={"demonstration_flaw_share": v})["met"] for v in (0.15, 0.35, 0.1499, 0.3501)] == \
        [True, True, False, False]
    assert not check(share, world={})["met"]
    # float noise at either end must not flip it: 0.01 + 0.34 = 0.35000000000000003, 0.29 - 0.14 = 0.14999999999999997
    assert check(share, world={"demonstration_flaw_share": 0.01 + 0.34})["met"]
    assert check(share, world={"demonstration_flaw_share": 0.29 - 0.14})["met"]
    # a third of SFT's flaw rate: 0.3 / 3 = 0.09999999999999999 in floats; 0.1 meets it, 0.1001 does not
    flaw = "dpo.flaw_rate vs sft.flaw_rate"
    assert check(flaw, sft={"flaw_rate": 0.3}, dpo={"flaw_rate": 0.1})["met"]
    assert not check(flaw, sft={"flaw_rate": 0.3}, dpo={"flaw_rate": 0.1001})["met"]
    # exactly 2 points below SFT is allowed, though 0.20 - 0.02 = 0.18000000000000002 in floats
    fact = "dpo.fact_correct vs sft.fact_correct"
    assert check(fact, sft={"fact_correct": 0.20}, dpo={"fact_correct": 0.18})["met"]
    assert not check(fact, sft={"fact_correct": 0.20}, dpo={"fact_correct": 0.179})["met"]
    assert check("run.seconds_total")["met"]
    # the interval's lower end: 60 wins of 100: mean 0.6, var 0.24, half 1.959964 * 0.0489898 = 0.096018,
    # low 0.503982 (not > 0.55) though the win rate meets its own bar
    low = check("dpo.win_rate_vs_sft_interval95.low", dpo={"win_rate_vs_sft": 0.6, "wins": 60, "ties": 0, "losses": 40})
    assert low["value"] == pytest.approx(0.503982, abs=1e-6) and not low["met"]
    assert check("dpo.win_rate_vs_sft", dpo={"win_rate_vs_sft": 0.6})["met"]
    assert not check("dpo.win_rate_vs_sft", dpo={"win_rate_vs_sft": 0.5999})["met"]
    assert check("dpo.win_rate_vs_sft_interval95.low", dpo={"win_rate_vs_sft": 0.6})["value"] is None  # no counts
    # the best of the stages that ran: IPO's 0.65 (the first of equals), then nothing over 0.65
    best = "best.win_rate_vs_sft"
    got = check(best, dpo={"win_rate_vs_sft": 0.6}, ipo={"win_rate_vs_sft": 0.65}, grpo={"win_rate_vs_sft": 0.65},
                ppo={"win_rate_vs_sft": None})
    assert (got["value"], got["best_stage"], got["met"]) == (0.65, "ipo", True)
    got = check(best, dpo={"win_rate_vs_sft": 0.6}, grpo={"win_rate_vs_sft": 0.6499})
    assert (got["best_stage"], got["met"]) == ("grpo", False)
    assert check(best)["value"] is None and not check(best)["met"]
    # the reward model above its raters: strictly
    above = "reward.accuracy_noise_free vs reward.rater_agreement_noise_free"
    assert check(above, reward={"accuracy_noise_free": 0.8, "rater_agreement_noise_free": 0.79})["met"]
    assert not check(above, reward={"accuracy_noise_free": 0.8, "rater_agreement_noise_free": 0.8})["met"]
    assert check("reward.accuracy_noise_free", reward={"accuracy_noise_free": 0.8})["met"]
    assert not check("reward.accuracy_noise_free", reward={"accuracy_noise_free": 0.7999})["met"]
    behaviour = "dpo.behaviour_score vs sft.demonstration_behaviour_score"
    assert bars_py.threshold_text(bars_py.BARS_BY_NAME[behaviour], 0.85, "score") == \
        ">= 0.850 (sft.demonstration_behaviour_score)"


def test_intervals_by_hand():
    """Wilson, 18 of 20 (z = 1.959964, z^2 = 3.841459): centre (0.9 + z^2/40) / (1 + z^2/20) =
    0.996036 / 1.192073 = 0.835553, half z * sqrt(0.9 * 0.1 / 20 + z^2 / 1600) / 1.192073 =
    1.959964 * 0.083072 / 1.192073 = 0.136584: [0.69897, 0.97214] (the textbook 0.699-0.972). 0 of
    20: [0, 2 * 0.080563 = 0.16113]. Win rate from 6 wins, 2 ties, 2 losses: mean 0.7, variance
    (6 * 0.3^2 + 2 * 0.2^2 + 2 * 0.7^2) / 10 = 0.16, half 1.959964 * sqrt(0.016) = 0.247918."""
    assert intervals.wilson_interval(0.9, 20) == pytest.approx((0.69897, 0.97214), abs=1e-5)
    assert intervals.wilson_interval(0.0, 20) == pytest.approx((0.0, 0.16113), abs=1e-5)
    assert intervals.outcome_interval(6, 2, 2) == pytest.approx((0.452082, 0.947918), abs=1e-6)
    assert intervals.interval95({"refusal_correct": 0.9, "refuse_rows": 20}, "refusal_correct") == \
        pytest.approx((0.69897, 0.97214), abs=1e-5)
    assert intervals.interval95({"win_rate_vs_sft": 0.7, "wins": 6, "ties": 2, "losses": 2}, "win_rate_vs_sft") == \
        pytest.approx((0.452082, 0.947918), abs=1e-6)
    # no count, no interval (older summaries); a bar over a count gets one in report.json
    assert intervals.interval95({"refusal_correct": 0.9}, "refusal_correct") is None
    bars = bars_py.check_bars({"stages": {"dpo": {"refusal_correct": 0.9, "refuse_rows": 20}}, "seconds_total": 1.0})
    assert bars["dpo.refusal_correct"]["interval95"] == pytest.approx([0.69897, 0.97214], abs=1e-5)
    assert bars["dpo.behaviour_score vs sft.demonstration_behaviour_score"]["interval95"] is None
    assert bars["run.seconds_total"]["interval95"] is None
    # the report writes them beside the figures: report.json and the tables of report.md
    entry = intervals.add_intervals({"refusal_correct": 0.9, "refuse_rows": 20, "teacher_score": 0.5})
    assert entry["refusal_correct_interval95"] == pytest.approx([0.69897, 0.97214], abs=1e-5)
    assert "teacher_score_interval95" not in entry
    assert with_interval(entry, "refusal_correct", "rate") == "90.0% (69.9-97.2%)"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pngs_linked_from_the_markdown(run_dir):
    d, report, *_ = run_dir
    assert set(report["plots"]) == {"losses", "rl", "frontier"}
    md = (d / "report.md").read_text()
    for rel in report["plots"].values():
        width, height = png_size(d / rel)
        assert width > 100 and height > 100
        assert f"]({rel})" in md
    # the frontier: SFT at KL 0, DPO and PPO, three sweep points; IPO/SimPO/GRPO have none
    points = {p["label"]: (p["kl_from_sft"], p["teacher_score"]) for p in report["frontier"]}
    assert points == {"SFT": (0.0, 0.75), "DPO": (3.5, 0.80), "PPO": (1.5, 0.78), "dpo-beta0.05": (6.0, 0.82),
                      "dpo-beta0.5": (1.0, 0.77), "ppo-kl0.01": (4.0, 0.79)}
    assert report["sweep"]["dpo-beta0.05"]["param"] == "beta" and report["sweep"]["ppo-kl0.01"]["value"] == 0.01


def test_side_by_side_answers(run_dir):
    d, report, tok, _ = run_dir
    samples = report["samples"]
    # one prompt per category, refusal and sum first; the same prompts for every model
    assert [s["category"] for s in samples] == ["refuse", "arithmetic", "fact_town"]
    assert [list(s["answers"]) for s in samples] == [["pretrain", "sft", "dpo", "ppo"]] * 3
    assert samples[2]["answers"]["dpo"] == "dpo answer 2 | with a pipe"   # matched by prompt, not position
    assert samples[2]["answers"]["ppo"] is None                          # PPO answered two prompts only
    # the pre-trained model's answers (written by pre-training for the first 4 side-by-side prompts,
    # one batch) are its greedy continuations of the chat-templated prompts
    from lmschool.checkpoint import load_model
    model = load_model(d / "pretrain" / "model")
    rows = pick_prompts([{"prompt": p, "category": c} for p, c, _ in PROMPTS], 4)
    ids = [tok.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    out = generate(model, ids, max_new_tokens=48, temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    expected = [tok.decode(t, skip_special=True).strip() for t in out.tokens]
    written = [json.loads(line) for line in (d / "pretrain" / "eval_answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in written] == [r["prompt"] for r in rows]
    assert [r["response"] for r in written] == expected and all(expected)  # (seed 0 rambles bytes)
    assert [s["answers"]["pretrain"] for s in samples] == expected[:3]
    md = (d / "report.md").read_text()
    assert "dpo answer 2 \\| with a pipe" in md and "Can I run in the corridor?" in md


def test_pick_prompts_prefers_distinct_categories_then_fills():
    rows = [{"prompt": [{"role": "user", "content": str(i)}], "category": c}
            for i, c in enumerate(["fact_age", "fact_age", "story", "refuse"])]
    assert [r["prompt"][0]["content"] for r in pick_prompts(rows, 4)] == ["3", "2", "0", "1"]


def test_partial_run_and_the_command(tmp_path, capsys):
    """A run killed after the world: every stage but the world is not run, no plots, still a report."""
    d = tmp_path / "run"
    write_json(d / "world" / "world.json", {"preset": "default", "summary": {"pupils": 240}})
    write_jsonl(d / "world" / "eval.jsonl", [{"prompt": p, "category": c} for p, c, _ in PROMPTS])
    (d / "pretrain").mkdir()
    write_jsonl(d / "pretrain" / "metrics.jsonl", [], torn_tail='{"step"')
    assert main(["report", str(d)]) == 0
    assert f"{d / 'report.md'}" in capsys.readouterr().out
    report = json.loads((d / "report.json").read_text())
    assert report["stages"]["world"]["pupils"] == 240 and report["stages"]["pretrain"]["status"] == "unfinished"
    assert report["plots"] == {} and report["seconds_total"] == 0
    assert all(not b["met"] for name, b in bars_py.check_bars(report).items() if name != "run.seconds_total")
    assert [s["answers"] for s in report["samples"]] == [{}] * 4  # prompts from eval.jsonl, no model yet
    md = (d / "report.md").read_text()
    assert "## Stage 1: pre-training\n\n_started, not finished (no summary)_" in md
    assert "No frontier" in md and "Labelling: _not run_" in md


def test_bad_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope is not a directory" in capsys.readouterr().err
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sft/summary.json is not valid JSON" in err
    assert not (tmp_path / "report.md").exists()


TORCH_SIDE = ["torch", "lmschool.model", "lmschool.generate", "lmschool.checkpoint", "lmschool.trainer",
              "lmschool.stages"]


def test_importing_the_report_does_not_load_matplotlib_or_torch():
    """`lmschool --help` and `lmschool run` import this module; matplotlib loads only to draw, and the
    report (and the pipeline's registry it reads) imports nothing torch-side."""
    code = ("import sys, lmschool.report, lmschool.commands.report; "
            f"print(sorted(m for m in sys.modules if m in ('torch', 'matplotlib') or m in {TORCH_SIDE!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_the_report_reads_files_only(run_dir):
    """Writing a whole report (plots and the pre-trained model's answers included) runs no model:
    no lmschool module that touches a model is loaded, nor torch (the machine comes from machine.json)."""
    d = run_dir[0]
    code = (f"import sys; from lmschool.report import build_report; build_report({str(d)!r}, samples=3); "
            f"print(sorted(m for m in sys.modules if m in {TORCH_SIDE!r} or m.startswith('lmschool.stages')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
    assert json.loads((d / "report.json").read_text())["samples"][0]["answers"]["pretrain"]


def test_smollm2_bars_measure_each_stage_against_the_one_before():
    """A smollm2 run (report.json's preset) is held to issue 16's bars: pre-training's fact completion
    above the base's, SFT's teacher score above the base's, the best method's above SFT's, 40
    minutes and 16 GiB; any other preset to issues 8 and 15's."""
    stages = {"base": {"fact_completion": 0.10, "teacher_score": 0.30},
              "pretrain": {"fact_completion": 0.10}, "sft": {"teacher_score": 0.31, "correct_heldout_pupils": 0.6,
                                                             "end_of_turn_rate": 0.98},
              "dpo": {"teacher_score": 0.40, "win_rate_vs_sft": 0.59}, "ppo": {"teacher_score": 0.35,
                                                                               "win_rate_vs_sft": 0.61}}
    report = {"preset": "smollm2", "stages": stages, "seconds_total": 2400.0, "peak_memory_gib": 16.01}
    bars = bars_py.check_bars(report)
    assert {b["issue"] for b in bars.values()} == {16} and len(bars) == len(bars_py.SMOLLM2_BARS)
    assert {name: b["met"] for name, b in bars.items()} == {
        "run.seconds_total": True, "run.peak_memory_gib": False,
        "pretrain.fact_completion vs base.fact_completion": False,   # equal is no gain
        "sft.teacher_score vs base.teacher_score": True, "sft.correct_heldout_pupils": True,
        "sft.end_of_turn_rate": True, "best.teacher_score vs sft.teacher_score": True,
        "best.win_rate_vs_sft": True}
    assert bars["best.teacher_score vs sft.teacher_score"]["best_stage"] == "dpo"
    assert "issue 16" in bars_py.render(report)
    assert set(bars_py.check_bars({**report, "preset": "default"})) == set(bars_py.BARS_BY_NAME)
