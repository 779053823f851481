"""`lmschool chat CKPT`: talk with a chat model in the terminal; answers stream as they are written.

    lmschool chat runs/sft                                   # a person at the keyboard
    lmschool chat runs/sft --system "Be brief." --temperature 0.7 --top-p 0.9 --seed 1 --precision fp32
    printf 'What is 12 plus 30?\\n/reset\\nHello!\\n' | lmschool chat runs/sft --temperature 0

Each line is one user turn; the conversation is kept (rendered through the tokenizer's one chat
template, so the model sees exactly what it was trained on) until `/reset`. Commands:

    /reset           forget the conversation (the system message stays)
    /system TEXT     set the system message (empty TEXT removes it)
    /temperature T   sampling temperature from now on (0 = greedy)
    /quit            leave (so does end of input, Ctrl-D)
    /help            this list

With piped input (not a terminal) there is no "you>" prompt and each answer is written as one line
of stdout, so a script can read answer i from line i; notes (a cleared conversation, dropped turns)
go to stderr. When the conversation outgrows the model's context, the oldest turns are dropped.
Ctrl-C while an answer is written stops that answer and forgets the turn.

Text is printed only once whole characters are decoded (`TextStream`): a byte-level BPE token can
hold part of a UTF-8 character.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


from lmschool.errors import UserError

COMMANDS_HELP = """commands:
  /reset           forget the conversation (the system message stays)
  /system TEXT     set the system message (empty TEXT removes it)
  /temperature T   sampling temperature from now on (0 = greedy)
  /quit            leave (so does Ctrl-D)"""


class Chat:
    """A conversation with a model: `reply(text, write)` adds a user turn, streams the answer to
    `write` piece by piece, keeps it in the conversation and returns it."""

    def __init__(self, model, tokenizer, *, system: str | None = None, temperature: float = 0.7,
                 top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None,
                 precision: str = "fp32", note=lambda text: None):
        if not tokenizer.has_chat_template:
            raise UserError("this checkpoint's tokenizer has no chat template, so it cannot chat; use an "
                            "SFT checkpoint (or `lmschool generate` for plain text)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system, self.temperature, self.top_k, self.top_p = system, temperature, top_k, top_p
        self.max_new_tokens, self.seed, self.precision, self.note = max_new_tokens, seed, precision, note
        self.turns: list[dict] = []
        self.replies = 0

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reset(self) -> None:
        self.turns = []

    def _prompt(self) -> list[int]:
        """The rendered conversation, dropping the oldest turns while it leaves too little room."""
        context = self.model.config.max_position_embeddings
        room = min(self.max_new_tokens, max(context // 4, 1))
        while True:
            ids, _ = self.tokenizer.render(self.messages, add_generation_prompt=True)
            if len(ids) + room <= context:
                return ids
            if len(self.turns) <= 1:
                self.turns = []
                raise UserError(f"that message is {len(ids)} tokens with the chat template, too long for the "
                                f"model's context of {context}; write a shorter one")
            drop = 2 if len(self.turns) > 2 else 1
            self.turns = self.turns[drop:]
            self.note("(the oldest turn was dropped to fit the model's context)")

    def reply(self, text: str, write=lambda piece: None) -> str:
        from lmschool.generate import stream
        from lmschool.runtime import autocast
        from lmschool.tokenizer import TextStream

        self.turns.append({"role": "user", "content": text})
        prompt = self._prompt()
        max_new = min(self.max_new_tokens, self.model.config.max_position_embeddings - len(prompt))
        seed = None if self.seed is None else self.seed + self.replies
        self.replies += 1
        out = TextStream(self.tokenizer)
        device = next(self.model.parameters()).device
        try:
            with autocast(device, self.precision):
                for token in stream(self.model, prompt, max_new_tokens=max_new, temperature=self.temperature,
                                    top_k=self.top_k, top_p=self.top_p, stop_ids=self.tokenizer.stop_ids,
                                    seed=seed):
                    piece = out.push(token)
                    if piece:
                        write(piece)
            write(out.flush())
        except KeyboardInterrupt:
            self.turns.pop()
            raise
        answer = out.text.strip()
        self.turns.append({"role": "assistant", "content": answer or "..."})
        return answer


def repl(chat: Chat, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> int:
    """Read user turns and commands line by line until /quit or end of input."""

    def note(text: str) -> None:
        print(text, file=stderr, flush=True)

    chat.note = note
    if interactive:
        note(f"chatting with {chat.model.config.num_params() / 1e6:.1f}M parameters; /help for commands")
    while True:
        try:
            if interactive and stdin is sys.stdin:
                line = input("you> ")
            else:
                if interactive:
                    stdout.write("you> ")
                    stdout.flush()
                line = stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:
            stdout.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                chat.reset()
                note("(conversation cleared)")
            elif command == "/system":
                chat.system = rest or None
                note(f"(system message {'set' if rest else 'removed'})")
            elif command == "/temperature":
                try:
                    value = float(rest)
                    if value < 0:
                        raise ValueError
                except ValueError:
                    note(f"(/temperature needs a number >= 0, e.g. /temperature 0.7; got {rest!r})")
                    continue
                chat.temperature = value
                note(f"(temperature {value:g})")
            elif command == "/help":
                note(COMMANDS_HELP)
            else:
                note(f"(unknown command {command}; /help lists them)")
            continue
        if interactive:
            stdout.write("assistant> ")

        def write(piece: str) -> None:
            if not interactive:  # one answer per line, whatever newlines the model writes
                piece = piece.replace("\r", " ").replace("\n", " ")
            stdout.write(piece)
            stdout.flush()

        try:
            chat.reply(line, write)
        except KeyboardInterrupt:
            note("\n(interrupted; that turn is forgotten)")
        except UserError as e:
            note(f"({e})")
        stdout.write("\n")
        stdout.flush()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="model directory or run directory (e.g. runs/sft)")
    parser.add_argument("--system", metavar="TEXT", help="system message to start with")
    parser.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 = greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest answer (default 256)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible answers")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="bf16 autocast, fp32, or auto (bf16 where the hardware runs it fast; default)")


def run(args: argparse.Namespace) -> int:
    from lmschool.checkpoint import load_model, resolve
    from lmschool.generate import SamplingConfig
    from lmschool.runtime import pick_device, resolve_precision
    from lmschool.tokenizer import Tokenizer

    SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p)  # checks the values
    path = resolve(args.checkpoint)
    tokenizer = Tokenizer.load(path)
    if not tokenizer.has_chat_template:
        raise UserError(f"{path}: its tokenizer has no chat template (tokenizer_config.json has no "
                        "chat_template), so it cannot chat; use an SFT checkpoint (or `lmschool generate` "
                        "for plain text)")
    device = pick_device(args.device)
    model = load_model(path, head="lm", device=device)
    chat = Chat(model, tokenizer, system=args.system, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                precision=resolve_precision(device, args.precision))
    return repl(chat, sys.stdin, sys.stdout, sys.stderr, interactive=sys.stdin.isatty())
