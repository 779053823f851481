"""The `lmschool` command: one subcommand per step of the pipeline.

Each subcommand lives in its own module, imported only when it is run (so `lmschool --help`
is instant). A command module exposes:

    HELP: str                                  one line for `lmschool --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int       exit status

Errors a user can fix (bad config key, bad data line, missing file) are raised as
`lmschool.errors.UserError` and printed as one clear line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmschool.errors import UserError

# name -> module implementing it
COMMANDS: dict[str, str] = {
    "world": "lmschool.world.command",
    "tokenizer": "lmschool.tokenizer_command",
    "pretrain": "lmschool.stages.pretrain",
    "sft": "lmschool.stages.sft",
    "label": "lmschool.stages.label",
    "reward": "lmschool.stages.reward",
    "score": "lmschool.score_command",
    "dpo": "lmschool.stages.dpo",
    "ppo": "lmschool.stages.ppo",
    "generate": "lmschool.generate_command",
    "chat": "lmschool.chat",
    "eval": "lmschool.eval_command",
    "run": "lmschool.pipeline",
    "report": "lmschool.report",
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(
        prog="lmschool",
        description="Train a chat model in three stages: pre-training, SFT, learning from feedback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    chosen = None
    for name, modname in COMMANDS.items():
        if wanted == name:
            module = importlib.import_module(modname)
            p = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(p)
            chosen = module
        else:
            sub.add_parser(name, help=f"(see `lmschool {name} --help`)")
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"lmschool {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlmschool {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
