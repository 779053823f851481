"""The school world generator: determinism, formats, no leakage, documented shares, bad arguments.

Everything runs on the `tiny` preset (a fraction of a second per build) except the checks on the
default world's facts, which build the facts only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmschool.cli import main
from lmschool.world.build import FILES, build, completion_probes, write
from lmschool.world.corpus import DOC_END
from lmschool.world.facts import FACT_TYPES, VOCAB, build_world
from lmschool.world.numbers import parse_numbers, to_words
from lmschool.world.presets import CATEGORIES, FACT_CATEGORIES, PRESETS, get_preset
from lmschool.world.teacher import Teacher
from procs import child_env, lmschool

ROLES = {"system", "user", "assistant"}


def _rows(directory: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text(encoding="utf-8").splitlines()]


def _user_turns(messages: list[dict]) -> tuple[str, ...]:
    return tuple(m["content"] for m in messages if m["role"] == "user")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny"
    write(out, seed=0, preset_name="tiny")
    return out


@pytest.fixture(scope="module")
def world(tiny) -> dict:
    return json.loads((tiny / "world.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def teacher(world) -> Teacher:
    return Teacher(world)


# ---- determinism and files ----------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    again = tmp_path / "again"
    write(again, seed=0, preset_name="tiny")
    for name in FILES:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name


def test_files_do_not_depend_on_the_process(tiny, tmp_path):
    """Another process with another string-hash seed writes the same bytes (no set order leaks)."""
    out = tmp_path / "other"
    lmschool("world", "--out", out, "--preset", "tiny", env=child_env(PYTHONHASHSEED="12345"))
    for name in FILES:
        assert (tiny / name).read_bytes() == (out / name).read_bytes(), name


def test_another_seed_gives_another_world():
    a, _ = build(0, "tiny")
    b, _ = build(1, "tiny")
    assert a["corpus.txt"] != b["corpus.txt"]
    assert json.loads(a["world.json"])["pupils"] != json.loads(b["world.json"])["pupils"]


def test_every_file_is_written_and_parses(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == sorted(FILES)
    for row in _rows(tiny, "sft.jsonl"):
        messages = row["messages"]
        assert row["category"] in CATEGORIES
        assert {m["role"] for m in messages} <= ROLES and all(m["content"] for m in messages)
        body = messages[1:] if messages[0]["role"] == "system" else messages
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
        assert len(body) == 2 * row["turns"] and "<|" not in json.dumps(messages)
    for name, key in (("prompts.jsonl", "prompt"), ("eval.jsonl", "prompt"), ("prefs.jsonl", "prompt")):
        for row in _rows(tiny, name):
            assert row[key][-1]["role"] == "user" and row["category"] in CATEGORIES
    for row in _rows(tiny, "prefs.jsonl"):
        assert row["split"] in ("train", "test")
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in row[side]] == ["assistant"] and row[side][0]["content"]
        assert row["chosen"] != row["rejected"]
        assert ("gold_chosen" in row) == (row["split"] == "test")


def test_corpus_documents_end_with_the_endoftext_line(tiny):
    text = (tiny / "corpus.txt").read_text(encoding="utf-8")
    assert text.endswith("\n" + DOC_END + "\n")
    docs = text.split("\n" + DOC_END + "\n")[:-1]
    assert len(docs) > 100 and all(doc.strip() and DOC_END not in doc for doc in docs)
    summary = json.loads((tiny / "world.json").read_text())["summary"]
    assert summary["corpus"]["documents"] == len(docs)
    assert summary["corpus"]["characters"] == len(text)


# ---- the world's facts --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_world_size_and_heldout_share(preset):
    world = build_world(0, get_preset(preset))
    pupils = world["pupils"]
    assert len(pupils) == get_preset(preset).pupils and len(VOCAB["town"]) >= 20 and len(FACT_TYPES) >= 6
    assert len(pupils) >= (24 if preset == "smollm2" else 200)   # smollm2: a smaller world for a real 135M model
    assert len({p["name"] for p in pupils}) == len(pupils)
    assert sum(p["heldout"] for p in pupils) >= 0.15 * len(pupils)
    for p in pupils:
        assert all(p[f] in VOCAB[f] for f in FACT_TYPES)


def test_vocabularies_share_no_word():
    words = [str(v).lower() for f, vs in VOCAB.items() if f != "age" for v in vs]
    assert len(words) == len(set(words))


def test_every_probe_is_stated_in_the_corpus(tiny, world):
    corpus = (tiny / "corpus.txt").read_text(encoding="utf-8")
    probes = completion_probes(world)
    assert len(probes) == len(world["pupils"]) * len(FACT_TYPES)
    for prefix, answer in probes:
        assert f"{prefix} {answer}." in corpus, prefix
    held = completion_probes(world, heldout=True)
    seen = completion_probes(world, heldout=False)
    assert len(held) + len(seen) == len(probes) and held and seen


# ---- leakage ------------------------------------------------------------------------------------

def test_heldout_pupils_are_only_in_the_corpus_and_eval(tiny, world):
    held = [p["name"] for p in world["pupils"] if p["heldout"]]
    corpus = (tiny / "corpus.txt").read_text(encoding="utf-8")
    eval_text = (tiny / "eval.jsonl").read_text(encoding="utf-8")
    for name in ("sft.jsonl", "prompts.jsonl", "prefs.jsonl"):
        text = (tiny / name).read_text(encoding="utf-8")
        assert not [n for n in held if n in text], name
    assert all(n in corpus for n in held)
    assert any(n in eval_text for n in held)


def test_eval_prompts_are_in_no_training_file(tiny):
    evals = {_user_turns(r["prompt"]) for r in _rows(tiny, "eval.jsonl")}
    sft = {_user_turns(r["messages"]) for r in _rows(tiny, "sft.jsonl")}
    prompts = {_user_turns(r["prompt"]) for r in _rows(tiny, "prompts.jsonl")}
    prefs = {_user_turns(r["prompt"]) for r in _rows(tiny, "prefs.jsonl")}
    assert not evals & sft and not evals & prompts and not evals & prefs
    assert not prompts & sft
    test_prefs = {_user_turns(r["prompt"]) for r in _rows(tiny, "prefs.jsonl") if r["split"] == "test"}
    train_prefs = {_user_turns(r["prompt"]) for r in _rows(tiny, "prefs.jsonl") if r["split"] == "train"}
    assert test_prefs and not test_prefs & train_prefs


# ---- documented shares --------------------------------------------------------------------------

def test_every_category_is_present_in_its_documented_share(tiny):
    preset = get_preset("tiny")
    sft = _rows(tiny, "sft.jsonl")
    for name, rows, mix in (("sft.jsonl", sft, preset.sft_mix),
                            ("prompts.jsonl", _rows(tiny, "prompts.jsonl"), preset.prompt_mix)):
        for category in CATEGORIES:
            share = sum(r["category"] == category for r in rows) / len(rows)
            assert share > 0, (name, category)
            assert abs(share - mix[category]) <= 1 / len(rows) + 1e-9, (name, category)
    assert sum(r["category"] == "refuse" for r in sft) == round(0.12 * len(sft))
    assert any(r["turns"] > 1 for r in sft)
    evals = _rows(tiny, "eval.jsonl")
    for category in CATEGORIES:
        assert any(r["category"] == category for r in evals)
    for category in FACT_CATEGORIES:
        assert {r["heldout"] for r in evals if r["category"] == category} == {True, False}


def test_at_least_a_fifth_of_sft_answers_are_imperfect(tiny, teacher):
    """Judged by the teacher, not by the generator's own style labels."""
    rows = _rows(tiny, "sft.jsonl")
    totals = [teacher.score(r["messages"][:-1], r["messages"][-1]["content"]).total for r in rows]
    assert sum(t < 1.0 for t in totals) >= 0.2 * len(rows)
    assert sum(t == 1.0 for t in totals) >= 0.5 * len(rows)


def test_readme_gives_the_counts(tiny):
    readme = (tiny / "README.md").read_text(encoding="utf-8")
    for name in ("sft.jsonl", "prompts.jsonl", "prefs.jsonl", "eval.jsonl"):
        assert f"{len(_rows(tiny, name))}" in readme and name in readme
    assert DOC_END in readme and "held-out" in readme.lower() and "agreement" in readme


# ---- the teacher reads every prompt the generator writes ----------------------------------------

def test_teacher_recognises_every_generated_prompt(tiny, teacher):
    cases = [(r["messages"][:-1], r) for r in _rows(tiny, "sft.jsonl")]
    cases += [(r["prompt"], r) for n in ("prompts.jsonl", "prefs.jsonl", "eval.jsonl")
              for r in _rows(tiny, n)]
    for prompt, row in cases:
        q = teacher.read_prompt(prompt)
        assert q.category == row["category"], (prompt, q)
        if row.get("expected") is not None:
            assert q.expected == row["expected"], (prompt, q)


def test_reference_and_good_answers_score_full_marks(tiny, teacher):
    for row in _rows(tiny, "eval.jsonl"):
        score = teacher.score(row["prompt"], row["reference"])
        assert score.total == 1.0, (row, score)
    for row in _rows(tiny, "sft.jsonl"):
        if row["answers"][-1] == "good":
            score = teacher.score(row["messages"][:-1], row["messages"][-1]["content"])
            assert score.total == 1.0, (row, score)
            assert teacher.flaws(row["messages"][:-1], row["messages"][-1]["content"]) == []


def test_prefs_test_split_carries_the_noise_free_label(tiny):
    test = [r for r in _rows(tiny, "prefs.jsonl") if r["split"] == "test"]
    for row in test:
        assert row["gold_chosen"] == (row["score_chosen"] > row["score_rejected"])
    assert any(r["gold_chosen"] for r in test)


# ---- numbers ------------------------------------------------------------------------------------

def test_numbers_round_trip_in_words_and_digits():
    for n in range(1000):
        assert parse_numbers(to_words(n)) == [n]
        assert parse_numbers(f"{to_words(n)} and {n}") == [n, n]
    assert to_words(34) == "thirty-four" and to_words(105) == "one hundred and five"
    assert parse_numbers("Take twelve away from fifty-five, you get 43.") == [12, 55, 43]


# ---- the command and bad arguments --------------------------------------------------------------

def test_command_writes_the_world(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--preset", "tiny"]) == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(FILES)
    assert "wrote" in capsys.readouterr().out


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "tiny" in err and "default" in err
    assert not (tmp_path / "w").exists()


def test_non_empty_dir_needs_force_and_force_replaces_only_a_world(tmp_path, capsys):
    out = tmp_path / "w"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["world", "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me"
    # --force replaces a world, never a user's files (issue 19: it used to delete mine.txt)
    assert main(["world", "--out", str(out), "--preset", "tiny", "--force"]) == 2
    assert "holds mine.txt, which lmschool did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    assert main(["world", "--out", str(out), "--preset", "tiny"]) == 0
    assert main(["world", "--out", str(out), "--preset", "tiny", "--seed", "1", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert '"seed": 1' in (out / "world.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary directory left behind


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["world", "--out", str(blocker / "w"), "--preset", "tiny"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"
    assert main(["world", "--out", str(blocker), "--preset", "tiny", "--force"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_parent_is_a_clear_error(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(["world", "--out", str(parent / "w"), "--preset", "tiny"]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)
