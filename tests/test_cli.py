"""The `lmschool` command (lmschool/cli.py): every command is listed with what it does, is
importable, and a user's error is one line with exit status 2."""

import importlib

from lmschool.cli import COMMANDS, build_parser, main


def test_help_says_what_each_command_does():
    parser, _ = build_parser([])
    text = parser.format_help()
    for name, (_, help_line) in COMMANDS.items():
        assert name in text and " ".join(help_line.split()[:3]) in " ".join(text.split())
    assert "see `lmschool" not in text


def test_every_command_module_has_the_interface():
    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_no_command_prints_help_and_a_user_error_is_one_line(capsys, tmp_path):
    assert main([]) == 0
    assert main(["eval", str(tmp_path / "missing"), "--data", str(tmp_path / "e.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmschool eval: error: ")
