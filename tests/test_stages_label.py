"""`lmschool label`: rankings to pairs by hand, the noisy ranking's pairs agree with the teacher's
Bradley-Terry rater as `choose` does, the command is deterministic under a seed and writes pairs
that the reward stage reads, and bad input and existing files give clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmschool.checkpoint import save_model
from lmschool.cli import main
from lmschool.data.preference import read_pairs
from lmschool.model import ModelConfig, build_model
from lmschool.judges import FunctionJudge, TeacherJudge
from lmschool.stages.label import Answer, LabelConfig, label, rank, ranking_pairs, rate
from lmschool.tokenizer import train_tokenizer
from lmschool.world.teacher import RATER_TEMPERATURE, default_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def length_score(prompts, responses):
    """A test scorer (module:function): answer length mod 5, so ties are common."""
    return [float(len(r) % 5) for r in responses]


def one_score(prompts, responses):
    """A broken test scorer: one score, whatever the number of responses."""
    return [1.0]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], byte_level=True)


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=96)
    path = tmp_path_factory.mktemp("policy") / "model"
    save_model(path, build_model(cfg, seed=0), tok, extra={"stage": "sft"})
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "category": "arithmetic"} for i in range(6)]
    rows.append({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello!"}],
                 "category": "smalltalk"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SMALL = ["max_new_tokens=12", "batch_size=8", "threads=1", "precision=fp32", "device=cpu", "test_fraction=0.3"]


def test_ranking_to_pairs_by_hand():
    """Scores (0.5, 0.9, 0.5, 0.1), noise-free: ranking 1, 0, 2, 3 (ties in index order). Of the
    C(4, 2) = 6 pairs, (0, 2) ties and is dropped; the other five have the higher ranked answer
    first: (1, 0), (0, 3), (1, 2), (1, 3), (2, 3)."""
    rng = np.random.default_rng(0)
    scores = [0.5, 0.9, 0.5, 0.1]
    ranking = rank(scores, 0.0, rng)
    assert ranking == [1, 0, 2, 3]
    pairs, ties = ranking_pairs(scores, ranking, 0, rng)
    assert pairs == [(1, 0), (0, 3), (1, 2), (1, 3), (2, 3)] and ties == 1
    capped, _ = ranking_pairs(scores, ranking, 2, rng)
    assert len(capped) == 2 and set(capped) <= set(pairs)


def test_noisy_ranking_orders_each_pair_as_the_bradley_terry_rater():
    """Answers scoring 0.9, 0.8 and 0.5 at the world's rater temperature 0.12: in a Plackett-Luce
    ranking a comes before b with probability sigmoid((s_a - s_b) / T), whatever else is ranked:
    sigmoid(0.1 / 0.12) = 0.6971, sigmoid(0.4 / 0.12) = 0.9656, sigmoid(0.3 / 0.12) = 0.9241.
    20,000 seeded rankings: standard error <= 0.0033, so 0.015 is over four of them."""
    scores, T, n = [0.9, 0.8, 0.5], RATER_TEMPERATURE, 20000
    rng = np.random.default_rng(1)
    before = np.zeros((3, 3))
    for _ in range(n):
        position = {a: p for p, a in enumerate(rank(scores, T, rng))}
        for a in range(3):
            for b in range(3):
                before[a, b] += position[a] < position[b]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        expected = 1 / (1 + math.exp(-(scores[a] - scores[b]) / T))
        assert before[a, b] / n == pytest.approx(expected, abs=0.015)


def test_label_drops_ties_and_empty_answers_and_marks_gold():
    """One prompt, answers scored 0.2, 0.8, 0.8 and an empty one (dropped); noise-free rater:
    pairs (1, 0) and (2, 0), the tie (1, 2) dropped; both agree with the teacher."""
    rows = [{"prompt": [{"role": "user", "content": "q"}], "category": "c"}]
    answers = [[Answer(0, "low", 3, True), Answer(0, "high", 4, True), Answer(0, "also high", 9, True),
                Answer(0, "", 1, True)]]
    lines, counts = label(rows, answers, [[0.2, 0.8, 0.8, 0.0]], LabelConfig(test_fraction=0.0), 0.0)
    assert [(x["chosen"][0]["content"], x["rejected"][0]["content"]) for x in lines] == \
        [("high", "low"), ("also high", "low")]
    assert counts["ties_dropped"] == 1 and counts["empty_answers_dropped"] == 1
    assert counts["rater_agreement"] == 1.0 and all(x["gold_chosen"] for x in lines)
    assert lines[0]["score_chosen"] == 0.8 and lines[0]["group"] == 0 and lines[0]["split"] == "train"


def test_rate_gives_each_answer_its_judges_score():
    """The teacher judge's rates are Teacher.scores of each prompt's K answers (one reading of the
    prompt); a function judge gets every answer at once, in order: length_score by hand."""
    rows = [{"prompt": "What is 2 plus 3?", "category": "arithmetic"},
            {"prompt": [{"role": "user", "content": "Hello!"}], "category": "smalltalk"}]
    texts = [["Two plus three is five.", "It is six.", ""], ["Hello! I am well, thank you.", "Go away."]]
    answers = [[Answer(g, t, 1, True) for t in group] for g, group in enumerate(texts)]
    teacher = default_teacher()
    assert rate(rows, answers, TeacherJudge(teacher)) == \
        [[s.total for s in teacher.scores(row["prompt"], group)] for row, group in zip(rows, texts)]
    # lengths 23, 10, 0 and 28, 8: mod 5
    assert rate(rows, answers, FunctionJudge(length_score, "length")) == [[3.0, 0.0, 0.0], [3.0, 3.0]]


def label_cmd(policy, prompts, out, *extra):
    """Options first, then key=value overrides (argparse cannot take options after them)."""
    overrides = [x for x in extra if "=" in x and not x.startswith("--")]
    options = [x for x in extra if x not in overrides]
    return main(["label", "--policy", str(policy), "--prompts", str(prompts), "--out", str(out), "--samples", "4",
                 "--scorer", "test_stages_label:length_score", *options, *SMALL, *overrides])


def test_label_is_deterministic_under_a_seed(policy, prompts, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert label_cmd(policy, prompts, a, "seed=3") == 0
    assert label_cmd(policy, prompts, b, "seed=3") == 0
    assert label_cmd(policy, prompts, c, "seed=4") == 0
    assert a.read_text() == b.read_text() != c.read_text()
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    lines = [json.loads(x) for x in a.read_text().splitlines()]
    assert summary["prompts"] == 7 and summary["answers"] == 28 and summary["possible_pairs"] == 42
    assert summary["pairs"] == len(lines) > 0
    assert summary["pairs"] + summary["ties_dropped"] <= 42 and summary["ties_dropped"] > 0
    assert summary["rater_temperature"] == 0.0 and summary["rater_agreement"] == 1.0      # a noise-free scorer
    assert summary["groups_test"] == 2 and summary["pairs_test"] == sum(x["split"] == "test" for x in lines)
    assert {x["group"] for x in lines if x["split"] == "test"}.isdisjoint(
        {x["group"] for x in lines if x["split"] == "train"})
    assert all(x["score_chosen"] > x["score_rejected"] for x in lines)
    pairs = read_pairs(a)                                       # the reward stage reads what label writes
    assert len(pairs) == len(lines) and pairs[0].prompt[-1]["role"] == "user"
    # a noisy rater: some pairs disagree with the noise-free scorer, and the summary says how many
    noisy = tmp_path / "noisy.jsonl"
    assert label_cmd(policy, prompts, noisy, "--rater-temperature", "2") == 0
    s = json.loads((tmp_path / "noisy.summary.json").read_text())
    gold = [json.loads(x)["gold_chosen"] for x in noisy.read_text().splitlines()]
    assert s["rater_temperature"] == 2.0 and s["rater_agreement"] == sum(gold) / len(gold) < 1.0


def test_existing_output_and_bad_input_are_clear_errors(tok, policy, prompts, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    out.write_text("keep me\n")
    assert label_cmd(policy, prompts, out) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert label_cmd(policy, prompts, out, "--force", "max_prompts=2") == 0
    written = out.read_text()
    assert len(read_pairs(out)) > 0
    assert label_cmd(policy, prompts, out, "--resume", "max_prompts=3") == 0        # done: nothing redone
    assert out.read_text() == written and "nothing to do" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    assert label_cmd(policy, bad, tmp_path / "x.jsonl") == 2
    assert f"{bad}:2" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
    rm = tmp_path / "rm"
    save_model(rm, build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2), head="score"), tok,
               extra={"kind": "reward", "reward_bias": 0.0})
    assert label_cmd(rm, prompts, tmp_path / "y.jsonl") == 2
    assert "--policy needs a policy" in capsys.readouterr().err
    assert label_cmd(policy, prompts, tmp_path / "z.jsonl", "--samples", "1") == 2
    assert "samples" in capsys.readouterr().err
    # a scorer that answers badly is found on two probe answers, before any sampling
    assert label_cmd(policy, prompts, tmp_path / "w.jsonl", "--scorer", "test_stages_label:one_score") == 2
    said = capsys.readouterr()
    assert said.err == "lmschool label: error: --scorer test_stages_label:one_score returned 1 scores for 2 responses\n"
    assert said.out == ""
    assert not (tmp_path / "w.jsonl").exists()


def test_a_kill_inside_a_write_leaves_nothing_after_the_rerun(policy, prompts, tmp_path, capsys):
    """A kill while label writes prefs.summary.json leaves .prefs.summary.json.tmp-PID beside it (the
    kill -9 matrix in bench/kill_matrix.py caught one): the next label, with --resume as `lmschool
    run` passes it, removes it and labels again."""
    out = tmp_path / "prefs.jsonl"
    left = [tmp_path / ".prefs.summary.json.tmp-123", tmp_path / ".prefs.jsonl.tmp-456"]
    for f in left:
        f.write_text("{half")
    assert label_cmd(policy, prompts, out, "--resume", "max_prompts=2") == 0
    assert not any(f.exists() for f in left) and read_pairs(out)
    assert "removed" in capsys.readouterr().out
