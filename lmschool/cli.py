"""The `lmschool` command: one subcommand per step of the pipeline, each in its own module.

A subcommand's module is imported only when it is run (so `lmschool --help` is instant); its
one-line help lives here, beside its name. A command module exposes:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int       exit status

Training stages keep their CLI in lmschool/stages/ (each reads as its step of the pipeline);
every other command lives in lmschool/commands/. Errors a user can fix (bad config key, bad data
line, missing file) are raised as `lmschool.errors.UserError` and printed as one clear line, exit
status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmschool.errors import UserError

# name -> (module implementing it, what it does in one line)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("lmschool.commands.world",
              "write the built-in school world (corpus, conversations, preferences, eval sets)"),
    "tokenizer": ("lmschool.commands.tokenizer", "train a byte-level BPE tokenizer on text or JSONL files"),
    "import": ("lmschool.commands.import_gguf",
               "import a GGUF model file (llama.cpp) as a Hugging Face model directory: weights, config, tokenizer"),
    "base": ("lmschool.stages.base",
             "stage 0: judge a base checkpoint (HF directory or GGUF) on a school world, as the stages are judged"),
    "pretrain": ("lmschool.stages.pretrain", "stage 1: pre-train a model on a text corpus (next-token prediction)"),
    "sft": ("lmschool.stages.sft", "stage 2: supervised fine-tuning on chat conversations (loss on the answers)"),
    "label": ("lmschool.stages.label",
              "stage 3: sample K answers per prompt from a policy, rank them with a rater, write preference pairs"),
    "reward": ("lmschool.stages.reward", "stage 3a: train a reward model on preference pairs (Bradley-Terry)"),
    "score": ("lmschool.commands.score", "print a reward model's reward for a response to a prompt"),
    "dpo": ("lmschool.stages.dpo",
            "stage 3b: learn from preference pairs directly (DPO, IPO, cDPO, robust DPO, SimPO, ORPO, KTO)"),
    "ppo": ("lmschool.stages.ppo",
            "stage 3c: PPO against a reward model or scorer; GRPO and RLOO (critic-free) in the same loop"),
    "generate": ("lmschool.commands.generate",
                 "print a model's continuation of a prompt (streamed; --chat for a chat turn)"),
    "chat": ("lmschool.commands.chat", "talk with a chat model: streamed answers, /reset, /system, /temperature, /quit"),
    "eval": ("lmschool.commands.eval",
             "answer eval prompts with a checkpoint and judge them (school world teacher or --scorer)"),
    "merge": ("lmschool.commands.merge",
              "fold a LoRA adapter into its base model: a plain Hugging Face checkpoint"),
    "run": ("lmschool.commands.run",
            "run the whole pipeline on the school world (world, pre-training, SFT, feedback) and write a report"),
    "report": ("lmschool.commands.report", "write report.md, report.json and plots for a `lmschool run` directory"),
    "serve": ("lmschool.commands.serve",
              "serve checkpoints over an OpenAI-compatible API, with a web page to chat, compare and read the report"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, as every other user error is (argparse prints
    the whole usage above it); the line says where the usage is. Sub-commands' parsers are of
    this class too (add_subparsers makes its parsers of the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None, argparse.ArgumentParser | None]:
    """The `lmschool` parser, the module of the command argv names (or None) and its own parser."""
    parser = Parser(
        prog="lmschool",
        description="Train a chat model in three stages: pre-training, SFT, learning from feedback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    chosen = chosen_parser = None
    for name, (modname, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if wanted == name:
            chosen, chosen_parser = importlib.import_module(modname), p
            chosen.add_arguments(p)
    return parser, chosen, chosen_parser


def parse(parser: argparse.ArgumentParser, command_parser, argv: list[str]) -> argparse.Namespace:
    """Options and key=value overrides in any order (`max_steps=2 --resume lr=1e-3`): the command's
    own parser reads its arguments intermixed, where its arguments allow it (not sub-commands)."""
    if command_parser is None:
        return parser.parse_args(argv)
    try:
        args = command_parser.parse_intermixed_args(argv[1:])
    except TypeError:      # a command with sub-commands (`tokenizer train`): ordered parsing
        return parser.parse_args(argv)
    args.command = argv[0]
    return args


def undecodable(argv: list[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates),
    as a one-line error; None when every argument is text."""
    for arg in argv:
        bad = next((ch for ch in arg if "\udc80" <= ch <= "\udcff"), None)
        if bad is not None:
            shown = arg.encode("utf-8", "surrogateescape")[:40].decode("ascii", "backslashreplace")
            return (f"argument '{shown}' holds byte 0x{ord(bad) - 0xDC00:02x}, which is not UTF-8 "
                    "text; pass arguments as UTF-8")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    problem = undecodable(argv)
    if problem:
        print(f"lmschool: error: {problem}", file=sys.stderr)
        return 2
    parser, module, command_parser = build_parser(argv)
    args = parse(parser, command_parser, argv)
    if module is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        status = int(module.run(args) or 0)
    except UserError as e:
        print(f"lmschool {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlmschool {args.command}: interrupted", file=sys.stderr)
        return 130
    if "lmschool.distributed" in sys.modules:   # a stage run by torchrun: leave its process group now
        sys.modules["lmschool.distributed"].shutdown()   # that run()'s models are gone
    return status


if __name__ == "__main__":
    sys.exit(main())
