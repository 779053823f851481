"""report.md from a hand-made report dict (issue 15's additions): the "What each stage taught" table
(one row per stage that ran, SFT beside its demonstrations), the three examples (left out when no
policy ran), and the labels of the new figures in the stage tables."""

from lmschool.pipeline import NAMES
from lmschool.report.intervals import add_intervals
from lmschool.report.markdown import LESSON_COLUMNS, MEASURES, examples_section, lesson_rows, render_markdown


def stages(**done):
    """Every stage of the registry, "not run" but those given (status done, their figures)."""
    out = {name: {"status": "not run"} for name in NAMES}
    out.update({name: add_intervals({"status": "done", **figures}) for name, figures in done.items()})
    return out


SFT = {"fact_correct": 0.5, "end_of_turn_rate": 0.99, "refusal_correct": 0.8, "flaw_rate": 0.25,
       "demonstration_flaw_share": 0.27, "hallucination_rate": 0.5, "behaviour_score": 0.8,
       "demonstration_behaviour_score": 0.85, "flaw_rates": {"padded": 0.1, "invented": 0.1}}
DPO = {"fact_correct": 0.48, "end_of_turn_rate": 1.0, "refusal_correct": 0.95, "flaw_rate": 0.05,
       "hallucination_rate": 0.1, "behaviour_score": 0.9, "win_rate_vs_sft": 0.7, "wins": 6, "ties": 2,
       "losses": 2, "flaw_rates": {"padded": 0.05, "invented": 0.0}}


def test_lesson_rows_by_hand():
    """Win rate 0.7 from 6 wins, 2 ties, 2 losses: interval 0.452082-0.947918 (test_report.py), shown
    45.2-94.8%. SFT's flaws beside its demonstrations' 27%; without SFT's own count, the world's 28%."""
    rows = lesson_rows(stages(world={"demonstration_flaw_share": 0.28}, pretrain={"fact_completion": 0.5},
                              sft=SFT, dpo=DPO))
    assert rows == [
        ["pre-training", "50.0%", "—", "—", "—", "—", "—", "—"],
        ["SFT", "50.0%", "99.0%", "80.0%", "25.0% (demonstrations 27.0%)", "50.0%", "0.800 (demonstrations 0.850)",
         "—"],
        ["DPO", "48.0%", "100.0%", "95.0%", "5.0%", "10.0%", "0.900", "70.0% (45.2-94.8%)"],
    ]
    assert all(len(r) == len(LESSON_COLUMNS) for r in rows)
    sft_alone = {k: v for k, v in SFT.items() if not k.startswith("demonstration")}
    rows = lesson_rows(stages(world={"demonstration_flaw_share": 0.28}, sft=sft_alone, ppo={"flaw_rate": 0.2}))
    assert rows[0][4] == "25.0% (demonstrations 28.0%)" and rows[0][6] == "0.800"
    assert [r[0] for r in rows] == ["SFT", "PPO"] and rows[1][4] == "20.0%" and rows[1][7] == "—"
    assert lesson_rows(stages()) == []


EXAMPLES = [{"prompt": [{"role": "user", "content": "Can I climb onto the roof?"}], "category": "refuse",
             "sft": {"answer": "Sure | go up", "score": 0.3},
             "answers": {"dpo": {"answer": "No: you could fall.", "score": 0.95}, "ppo": None}}]


def test_examples_section():
    lines = examples_section({"examples": EXAMPLES})
    assert lines[0] == "## Examples"                                        # fewer than three prompts
    assert "**1. Can I climb onto the roof?** (refuse)" in lines
    assert "| SFT | Sure \\| go up | 0.300 |" in lines
    assert "| DPO | No: you could fall. | 0.950 |" in lines
    assert "| PPO | _(none)_ | — |" in lines
    assert examples_section({"examples": EXAMPLES * 3})[0] == "## Three examples"
    assert examples_section({"examples": []}) == [] and examples_section({}) == []


def report(st, examples):
    return {"run_dir": "runs/x", "created": "now", "seconds_total": 60.0, "seconds": {"sft": 60.0},
            "machine": {"cpu": "cpu", "cores": 1, "device": "cpu"}, "stages": st, "sweep": {}, "plots": {},
            "samples": [], "examples": examples}


def test_the_report_opens_with_what_each_stage_taught():
    st = stages(sft=SFT, dpo=DPO, reward={"accuracy_noise_free": 0.9, "rater_agreement_noise_free": 0.9,
                                           "noise_free_pairs": 20})
    md = render_markdown(report(st, EXAMPLES * 3))
    assert md.index("## What each stage taught") < md.index("## Three examples") < md.index("## Stage 1")
    assert "| SFT | 50.0% | 99.0% | 80.0% | 25.0% (demonstrations 27.0%) |" in md
    # the new figures in the stage tables, with their labels (and intervals where counted)
    assert f"| {MEASURES['rater_agreement_noise_free'][0]} | 90.0% (69.9-97.2%) |" in md
    assert f"| {MEASURES['flaw_rate'][0]} | 25.0% | 5.0% |" in md          # SFT and DPO side by side
    assert f"| {MEASURES['demonstration_behaviour_score'][0]} | 0.850 |" in md
    flaws = md.split("| flaw | SFT | DPO |")[1].split("\n\n")[0]           # in the teacher's order, padded first
    assert flaws.splitlines()[2:] == ["| padded | 10.0% | 5.0% |", "| invented | 10.0% | 0.0% |"]
    # no policy ran: no examples; nothing ran: no table either
    md = render_markdown(report(stages(sft=SFT), []))
    assert "## What each stage taught" in md and "## Three examples" not in md and "## Examples" not in md
    assert "## What each stage taught" not in render_markdown(report(stages(), []))
