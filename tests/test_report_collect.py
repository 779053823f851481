"""report.json's figures from a hand-made run directory (issue 15's additions): the world's share of
flawed demonstrations, the conduct figures required of SFT, the reward model and every policy
stage (null when a stage did not write them), nested dicts such as flaw_rates kept as they are,
their 95% intervals over the right counts, and the three examples picked from the policy stages'
eval_answers.jsonl."""

import json

import pytest

from lmschool.report.collect import collect, feedback_examples, pick_examples


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ask(text):
    return [{"role": "user", "content": text}]


def record(text, category, sft_score, method_score=None, tag="dpo"):
    """An eval_answers.jsonl record of a policy stage: SFT's sampled answer and the method's."""
    row = {"prompt": ask(text), "category": category, "response": "greedy", "score": 0.5}
    if sft_score is not None:
        row["reference_sampled"] = [[f"sft says {text}", sft_score], [f"sft again {text}", 0.0]]
        row["sampled"] = [[f"{tag} says {text}", method_score if method_score is not None else 1.0]]
    return row


# SFT's sampled answers, by hand: refuse 0.9 / 0.4, unknown 0.35, smalltalk 0.5 (earlier), fact 0.5,
# arithmetic without samples, story 0.8
RECORDS = [record("Can I run in the corridor?", "refuse", 0.9),
           record("Can I climb onto the roof?", "refuse", 0.4),
           record("Where does Zed Quill live?", "unknown", 0.35),
           record("Hello! How are you?", "smalltalk", 0.5),
           record("What town does Mia Smith live in?", "fact_town", 0.5),
           record("What is 3 plus 4?", "arithmetic", None),
           record("Tell me a story about Tom.", "story", 0.8)]


def test_pick_examples_by_hand():
    """refuse: 0.4 beats 0.9; unknown: the only one; other: smalltalk and fact_town tie at 0.5 and the
    fact question wins though it comes later; arithmetic has no sampled answers and is never picked.
    A fourth: the lowest left, smalltalk (0.5) before story (0.8) and the corridor (0.9)."""
    texts = [[m["content"] for m in r["prompt"]][0] for r in pick_examples(RECORDS, 4)]
    assert texts == ["Can I climb onto the roof?", "Where does Zed Quill live?",
                     "What town does Mia Smith live in?", "Hello! How are you?"]
    # no honesty question: its slot goes to the lowest left once the others are filled (smalltalk 0.5)
    without = [r for r in RECORDS if r["category"] != "unknown"]
    assert [r["category"] for r in pick_examples(without, 3)] == ["refuse", "fact_town", "smalltalk"]
    # lower scores win over the fact preference: a story at 0.1 is the "other"
    lower = RECORDS + [record("Tell me a story about Mia.", "story", 0.1)]
    assert [r["category"] for r in pick_examples(lower, 3)] == ["refuse", "unknown", "story"]
    assert pick_examples(RECORDS, 0) == [] and pick_examples([], 3) == []


def world_json():
    return {"preset": "tiny", "summary": {"pupils": 12, "heldout_pupils": 3, "demonstration_flaw_share": 0.28,
            "corpus": {"documents": 50}, "eval": {"rows": 7},
            "sft": {"conversations": 40, "demonstrators": {"careful": 29, "padder": 6, "guesser": 5},
                    "flaws": {"padded": 6, "invented": 5}}}}


def sft_summary():
    return {"teacher_score": 0.75, "fact_correct": 0.5, "refusal_correct": 0.8, "end_of_turn_rate": 0.99,
            "teacher_score_sampled": 0.6, "flaw_rate": 0.25, "conduct_rows": 40,
            "flaw_rates": {"padded": 0.1, "curt": 0.05, "discourteous": 0.0, "unsafe": 0.05, "unreasoned": 0.05,
                           "invented": 0.1},
            "hallucination_rate": 0.5, "unknown_rows": 8, "behaviour_score": 0.8,
            "demonstration_behaviour_score": 0.85, "demonstration_flaw_share": 0.27,
            "demonstration_flaw_rates": {"padded": 0.15, "invented": 0.12}, "demonstration_rows": 400}


def policy_summary(flaw_rate):
    return {"teacher_score": 0.8, "win_rate_vs_sft": 0.7, "wins": 6, "ties": 2, "losses": 2,
            "refusal_correct": 0.9, "refuse_rows": 20, "fact_correct": 0.5, "kl_from_sft": 1.0,
            "flaw_rate": flaw_rate, "conduct_rows": 50, "flaw_rates": {"padded": flaw_rate, "invented": None},
            "hallucination_rate": 0.1, "unknown_rows": 20, "behaviour_score": 0.9,
            "sft_flaw_rate": 0.1, "sft_conduct_rows": 20, "sft_hallucination_rate": 0.9, "sft_unknown_rows": 20,
            "sft_flaw_rates": {"padded": 0.1}}


@pytest.fixture()
def run_dir(tmp_path):
    """World, SFT, reward, DPO and PPO done (PPO answered three prompts, in another order); IPO's
    records are there but it has no summary (not finished); GRPO, SimPO not run."""
    d = tmp_path / "run"
    write_json(d / "machine.json", {"cpu": "test", "cores": 1, "device": "cpu"})
    write_json(d / "world" / "world.json", world_json())
    write_json(d / "sft" / "summary.json", sft_summary())
    write_json(d / "reward" / "summary.json", {"accuracy_noise_free": 0.9, "noise_free_pairs": 20,
                                               "rater_agreement_noise_free": 0.9, "accuracy_rater": 0.7})
    write_json(d / "dpo" / "summary.json", policy_summary(0.1))
    write_jsonl(d / "dpo" / "eval_answers.jsonl", RECORDS)
    write_json(d / "ppo" / "summary.json", {"win_rate_vs_sft": 0.6})
    write_jsonl(d / "ppo" / "eval_answers.jsonl",
                [record(r["prompt"][0]["content"], r["category"], 0.0, 0.7, tag="ppo") for r in RECORDS[:3]][::-1])
    write_jsonl(d / "ipo" / "eval_answers.jsonl", [record(r["prompt"][0]["content"], r["category"], 0.0, tag="ipo")
                                                   for r in RECORDS])
    return d


def test_the_conduct_figures_are_in_report_json(run_dir):
    st = collect(run_dir, created="now")["stages"]
    assert st["world"]["demonstration_flaw_share"] == 0.28
    assert st["world"]["demonstrators"] == {"careful": 29, "padder": 6, "guesser": 5}
    assert st["world"]["demonstration_flaws"] == {"padded": 6, "invented": 5}
    assert st["sft"]["flaw_rates"] == sft_summary()["flaw_rates"]            # nested, as it was
    assert st["sft"]["demonstration_flaw_rates"] == {"padded": 0.15, "invented": 0.12}
    assert st["dpo"]["flaw_rates"] == {"padded": 0.1, "invented": None}      # a null inside stays null
    assert st["dpo"]["sft_flaw_rates"] == {"padded": 0.1}
    for key in ("flaw_rate", "hallucination_rate", "behaviour_score", "demonstration_behaviour_score"):
        assert st["sft"][key] == sft_summary()[key], key
    assert st["reward"]["rater_agreement_noise_free"] == 0.9
    # required keys a stage did not write are null; a stage not run has them too
    for key in ("flaw_rate", "hallucination_rate", "behaviour_score"):
        assert st["ppo"][key] is None and st["grpo"][key] is None and st["dpo"][key] is not None
    assert st["grpo"]["status"] == "not run" and st["ipo"]["status"] == "unfinished"


def test_the_conduct_intervals_are_over_their_counts(run_dir):
    """Wilson by hand (see test_report.py): 0.9 of 20 -> [0.69897, 0.97214], so 0.1 of 20 ->
    [0.02786, 0.30103]; 0.1 of 50: centre (0.1 + z^2/100) / (1 + z^2/50) = 0.1384146 / 1.0768292 =
    0.128539, half 1.959964 * sqrt(0.0018 + z^2/10000) / 1.0768292 = 0.085063 -> [0.043476, 0.213602].
    DPO's flaw rate is over its 50 sampled answers, its hallucinations and SFT's (the sft_ keys) over
    20; the rater over the reward model's 20 noise-free pairs."""
    st = collect(run_dir, created="now")["stages"]
    dpo = st["dpo"]
    assert dpo["flaw_rate_interval95"] == pytest.approx([0.043476, 0.213602], abs=1e-6)
    assert dpo["hallucination_rate_interval95"] == pytest.approx([0.02786, 0.30103], abs=1e-5)
    assert dpo["sft_flaw_rate_interval95"] == pytest.approx([0.02786, 0.30103], abs=1e-5)
    assert dpo["sft_hallucination_rate_interval95"] == pytest.approx([0.69897, 0.97214], abs=1e-5)
    assert st["reward"]["rater_agreement_noise_free_interval95"] == pytest.approx([0.69897, 0.97214], abs=1e-5)
    assert "flaw_rate_interval95" not in st["ppo"]                           # no rate, no interval


def test_the_three_examples(run_dir):
    """The prompts of test_pick_examples_by_hand, SFT's answers from DPO's records (the first policy
    stage); PPO's matched by prompt (it answered only the first three records: not the fact
    question); IPO's left out (unfinished)."""
    examples = collect(run_dir, created="now")["examples"]
    assert [e["category"] for e in examples] == ["refuse", "unknown", "fact_town"]
    roof = examples[0]
    assert roof["prompt"] == ask("Can I climb onto the roof?")
    assert roof["sft"] == {"answer": "sft says Can I climb onto the roof?", "score": 0.4}  # the first sample
    assert roof["answers"] == {"dpo": {"answer": "dpo says Can I climb onto the roof?", "score": 1.0},
                               "ppo": {"answer": "ppo says Can I climb onto the roof?", "score": 0.7}}
    assert examples[2]["answers"]["ppo"] is None
    # without DPO, SFT's answers come from PPO's records (all scored 0: the first three in slot order)
    (run_dir / "dpo" / "summary.json").unlink()
    examples = feedback_examples(run_dir)
    assert [e["sft"]["score"] for e in examples] == [0.0] * 3 and list(examples[0]["answers"]) == ["ppo"]
    # no policy stage done: no examples
    (run_dir / "ppo" / "summary.json").unlink()
    assert feedback_examples(run_dir) == []


def test_a_torn_last_line_is_skipped_and_a_damaged_one_named(tmp_path, capsys):
    """A torn last line (a run killed mid-write) is skipped with one line naming it; a bad line
    elsewhere is an error naming file:line."""
    from lmschool.errors import UserError
    from lmschool.report.collect import read_jsonl_rows
    torn = tmp_path / "metrics.jsonl"
    torn.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl_rows(torn) == [{"step": 1}, {"step": 2}]
    assert capsys.readouterr().err == (f"lmschool report: skipped {torn}:3, a torn last line (the run was "
                                       "killed while writing it)\n")
    damaged = tmp_path / "eval_answers.jsonl"
    damaged.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(UserError, match="eval_answers.jsonl:2"):
        read_jsonl_rows(damaged)


def test_peak_memory_and_the_base_column_only_where_the_run_has_them(tmp_path):
    """peak_memory_gib: the largest of DIR/memory.json's per-stage figures (null without the file);
    stages.base only in a run with a base/ directory, its required keys null until it is done."""
    write_json(tmp_path / "world" / "world.json", {"preset": "tiny"})
    report = collect(tmp_path, created="now")
    assert report["peak_memory_gib"] is None and "base" not in report["stages"]
    write_json(tmp_path / "memory.json", {"world": 0.2, "sft": 3.25, "dpo": 2.5, "bad": "x"})
    (tmp_path / "base").mkdir()
    report = collect(tmp_path, created="now")
    assert report["peak_memory_gib"] == 3.25
    assert list(report["stages"])[:3] == ["world", "base", "pretrain"]
    assert report["stages"]["base"]["status"] == "unfinished" and report["stages"]["base"]["teacher_score"] is None
    write_json(tmp_path / "base" / "summary.json", {"fact_completion": 0.25, "teacher_score": 0.4, "base": "x.gguf"})
    base = collect(tmp_path, created="now")["stages"]["base"]
    assert base["status"] == "done" and base["fact_completion"] == 0.25 and base["teacher_score"] == 0.4
