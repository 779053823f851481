"""The run directory every stage opens (lmschool/stages/common.py): --force replaces only an
lmschool run, and only once the new run has finished; a failed or killed --force run leaves the
old run as it was (issue 19). Shown on pre-training, the stage every pipeline starts with; the
other stages open their run directory through the same open_run / finish_run."""

import json

import pytest

from lmschool.cli import main
from lmschool.files import RUN_MARKER, staging_dir

TINY = ["max_steps=6", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "seq_len=32", "batch_size=4", "vocab_size=300", "log_every=3",
        "eval_every=0", "save_every=3", "lr=3e-3", "warmup_steps=1", "threads=1", "precision=fp32"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs.\n" for i in range(300)))
    return path


def pretrain(text_file, out, *extra):
    return main(["pretrain", "--data", str(text_file), "--out", str(out), *TINY, *extra])


def snapshot(run):
    """Every file of a run directory and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_force_never_deletes_what_lmschool_did_not_write(tmp_path, text_file, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    assert pretrain(text_file, mine, "--force") == 2
    assert "holds thesis.tex, which lmschool did not write" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    # the same inside a finished run: a file put there by the user keeps the run from being replaced
    run = tmp_path / "run"
    assert pretrain(text_file, run) == 0 and (run / RUN_MARKER).is_file()
    (run / "notes.txt").write_text("my notes")
    before = snapshot(run)
    assert pretrain(text_file, run, "--force") == 2
    assert "holds notes.txt" in capsys.readouterr().err and snapshot(run) == before


def test_a_failed_force_run_leaves_the_old_run_whole(tmp_path, text_file, capsys):
    """The new run is built beside the old one: a run that fails after every check has passed
    (here it diverges) leaves the old run byte for byte; the next start removes the unfinished
    copy, and a --force run that finishes replaces the old run with nothing left beside it."""
    run = tmp_path / "run"
    assert pretrain(text_file, run) == 0
    before = snapshot(run)
    assert pretrain(text_file, run, "--force", "lr=1e9", "grad_clip=0") == 2
    assert "became" in capsys.readouterr().err          # TrainingDiverged: loss or grad norm non-finite
    assert snapshot(run) == before and staging_dir(run).is_dir()
    assert pretrain(text_file, run, "--force", "max_steps=3") == 0
    assert "removed the unfinished replacement" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt", "run"]


def test_a_bad_init_with_force_changes_nothing(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert pretrain(text_file, run) == 0
    before = snapshot(run)
    assert pretrain(text_file, run, "--force", "--init", str(tmp_path / "no-such-run")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["book.txt", "run"]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "ppo"])
def test_a_damaged_init_writes_nothing(stage, world, tmp_path, capsys):
    """Every stage loads --init's model before it opens --out: the bad-input matrix (issue 19)
    found a damaged --init leaving a new --out behind (its marker, and for pre-training the
    tokenised data), with the error after it."""
    from lmschool.checkpoint import save_model
    from lmschool.model import ModelConfig, build_model
    from lmschool.tokenizer import train_tokenizer

    tok = train_tokenizer([], byte_level=True)
    init = tmp_path / "init"
    save_model(init, build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             max_position_embeddings=1024), seed=0), tok)
    weights = init / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    data = {"pretrain": ["--data", str(world / "corpus.txt")], "sft": ["--data", str(world / "sft.jsonl")],
            "reward": ["--data", str(world / "prefs.jsonl")], "dpo": ["--data", str(world / "prefs.jsonl")],
            "ppo": ["--prompts", str(world / "prompts.jsonl"), "--scorer", "teacher"]}[stage]
    out = tmp_path / "out"
    assert main([stage, "--init", str(init), *data, "--out", str(out), "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init is damaged" in err[0], err
    assert not out.exists()


def test_resume_continues_only_an_lmschool_run(tmp_path, text_file, capsys):
    """--resume on a directory lmschool did not start as a run (a world, a user's files) trained
    into it, exit 0 (bad-input matrix, issue 19); a run with a user's note in it still resumes."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    assert pretrain(text_file, mine, "--resume") == 2
    assert "is not an lmschool run (it has no .lmschool-run)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    run = tmp_path / "run"
    assert pretrain(text_file, run, "max_steps=3") == 0
    (run / "notes.txt").write_text("my notes")
    capsys.readouterr()
    assert pretrain(text_file, run, "--resume") == 0
    assert "is already finished" in capsys.readouterr().out and (run / "notes.txt").is_file()
