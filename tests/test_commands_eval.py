"""`lmschool eval` (lmschool/commands/eval.py): its arguments are checked before any checkpoint is
read (the evaluation itself is tested with SFT, in test_stages_sft.py)."""

import pytest

from lmschool.cli import main


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "-1"),
                                         ("--temperature", "inf"), ("--max-new-tokens", "0"),
                                         ("--batch-size", "0")])
def test_bad_sampling_arguments_are_one_line(flag, value, tmp_path, capsys):
    """--temperature nan was accepted: nan < 0 is false (bad-input matrix, issue 19)."""
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(tmp_path / "eval.jsonl"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--temperature a number >= 0" in err[0], err
