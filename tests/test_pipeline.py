"""`lmschool run` on the tiny preset: every stage runs; a second run redoes nothing."""

import json

from lmschool.cli import main


def test_run_tiny_then_rerun_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["run", "--out", str(out), "--preset", "tiny"]) == 0
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    assert summary["val_bpb"] > 0 and 0 <= summary["fact_completion"] <= 1
    before = (out / "pretrain" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--preset", "tiny"]) == 0
    err = capsys.readouterr().err
    assert "pretrain: done already" in err
    assert (out / "pretrain" / "summary.json").stat().st_mtime_ns == before


def test_bad_override_names_the_stage_format(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "x"), "--preset", "tiny", "max_steps=3"]) == 2
    assert "STAGE.key=value" in capsys.readouterr().err
