"""Stage 1 end to end on tiny settings: a user's text file -> an HF checkpoint + bits per byte;
bad input gives the documented message, exit status 2, and leaves earlier outputs intact."""

import json

import pytest
import torch

from lmschool.cli import main

transformers = pytest.importorskip("transformers")

TINY = ["max_steps=30", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "seq_len=32", "batch_size=4", "vocab_size=300", "log_every=10",
        "eval_every=15", "save_every=15", "lr=3e-3", "warmup_steps=5", "threads=1"]


@pytest.fixture
def text_file(tmp_path):
    lines = [f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs, naïvely. ☕\n" for i in range(600)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_pretrain_on_a_text_file(tmp_path, text_file):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["val_bpb"] < 8 and summary["steps"] == 30
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    assert any("val_loss" in m for m in metrics)
    assert (out / "config.yaml").is_file()
    # the final model is a Hugging Face checkpoint with our tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    ids = torch.tensor([tok("Line 5: the quick")["input_ids"]])
    from lmschool.checkpoint import load_model
    ours = load_model(out).eval()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    # resuming a finished run is a no-op; continued pre-training from it works
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), "--resume", *TINY]) == 0
    assert main(["pretrain", "--data", str(text_file), "--init", str(out), "--out", str(tmp_path / "more"),
                 *TINY[:1]]) == 0


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"),
    (b"   \n\n", "holds no text"),
    (b"good line\nbad \xff byte\n", ":2: not UTF-8"),
])
def test_bad_data_is_reported_and_nothing_is_lost(tmp_path, capsys, content, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}')
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["pretrain", "--data", str(bad), "--out", str(out), "--force", *TINY]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    assert (out / "summary.json").read_text() == '{"earlier": true}'


def test_missing_file_unknown_key_and_existing_run(tmp_path, capsys, text_file):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), "max_step=3"]) == 2
    assert "unknown config key 'max_step' (did you mean 'max_steps'?)" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main(["pretrain", "--data", str(text_file), "--out", str(out)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_resume_with_other_text_is_refused(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), *TINY, "max_steps=4", "save_every=2"]) == 0
    (out / "summary.json").unlink()                                  # as if it had stopped before the end
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text(encoding="utf-8") + "One more line.\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["pretrain", "--data", str(other), "--out", str(out), "--resume", *TINY, "max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "training data differs" in err and str(out / "data.json") in err and str(other) in err
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), "--resume", *TINY, "max_steps=4"]) == 0


@pytest.mark.parametrize("world", [b'{"pupils": [', b"[]", b'{"a": "\xff"}', b'{"seed": 0}'])
def test_a_damaged_world_beside_the_corpus_stops_before_training(tmp_path, text_file, capsys, world):
    """world.json beside --data feeds the closing fact probes; damaged, it was a traceback after
    the whole training, with --out written (bad-input matrix, issue 19)."""
    (text_file.parent / "world.json").write_bytes(world)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "world.json" in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
