"""The `lmschool` command (lmschool/cli.py): every command is listed with what it does, is
importable, and a user's error is one line with exit status 2."""

import importlib

from lmschool.cli import COMMANDS, build_parser, main, parse


def test_help_says_what_each_command_does():
    parser, _, _ = build_parser([])
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


def test_overrides_and_options_in_any_order():
    """`max_steps=2 --resume lr=1e-3` used to be refused (issue 19): options may sit between
    the key=value overrides."""
    argv = ["pretrain", "max_steps=2", "--data", "a.txt", "--resume", "lr=1e-3", "--out", "run"]
    parser, _, command_parser = build_parser(argv)
    args = parse(parser, command_parser, argv)
    assert args.command == "pretrain" and args.overrides == ["max_steps=2", "lr=1e-3"] and args.resume
    assert [str(p) for p in args.data] == ["a.txt"] and str(args.out) == "run"
    argv = ["tokenizer", "train", "--data", "a.txt", "--byte-level", "--out", "tok"]   # a command with sub-commands
    parser, _, command_parser = build_parser(argv)
    assert parse(parser, command_parser, argv).byte_level


def test_bytes_that_are_not_utf8_are_one_line_and_exit_2(capsys):
    """As sys.argv carries them: undecodable bytes become lone surrogates (PEP 383)."""
    from lmschool.cli import main
    bad = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    assert main(["score", "runs/reward", "--prompt", "hi", "--response", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0xe9" in err and "not UTF-8" in err and "Traceback" not in err


def test_a_bad_argument_is_one_line_naming_the_help(capsys):
    """argparse printed its usage above the error (2-4 lines); the bad-input matrix (issue 19)
    counted 60 such cases. Sub-commands' parsers (`tokenizer train`) share the one-line error."""
    import pytest

    for argv, words in ((["world"], "required: --out"),
                        (["world", "--out", "w", "--seed", "abc"], "invalid int value: 'abc'"),
                        (["score", "r", "--prompt", "p", "--response", "x", "--frobnicate"], "unrecognized arguments: --frobnicate"),
                        (["tokenizer", "train", "--data", "a", "--out"], "--out: expected one argument"),
                        (["tokenizer", "fit"], "invalid choice: 'fit'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and words in err and "usage:" not in err, err
        assert err.startswith(f"lmschool {argv[0]}") and err.rstrip().endswith("--help`")
