"""`lmschool report DIR` (lmschool/commands/report.py): DIR and the report's files are checked
before anything is written (the report itself is tested in test_report*.py)."""

import pytest

from lmschool.cli import main


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_directory_that_is_not_a_run_gets_no_report(tmp_path, capsys):
    """`lmschool report` wrote report.md and plots/ into an empty directory, a user's directory
    and a stage's run directory, exit 0 (bad-input matrix, issue 19)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    assert main(["report", str(mine)]) == 2
    assert "holds none of the stages of `lmschool run`" in one_line(capsys)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert main(["report", str(mine / "thesis.tex")]) == 2
    assert "is not a directory" in one_line(capsys)


@pytest.mark.parametrize("argv_extra, make, message", [
    (["--samples", "-1"], None, "--samples -1: give a number >= 0"),
    ([], "report.md", "DIR/report.md .* is a directory"),
    ([], "report.json", "DIR/report.json .* is a directory"),
])
def test_bad_samples_or_a_directory_in_the_reports_place(tmp_path, capsys, argv_extra, make, message):
    """report.md as a directory was an IsADirectoryError after the plots had been redrawn."""
    import re

    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)
    if make:
        (run / make).mkdir()
    assert main(["report", str(run), *argv_extra]) == 2
    assert re.search(message, one_line(capsys))
    assert sorted(p.name for p in run.iterdir()) == sorted(["world"] + ([make] if make else []))
