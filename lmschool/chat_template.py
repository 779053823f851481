"""Chat templates: a conversation -> the text a model reads, and the characters of it it is trained to write.

    template = JinjaTemplate(source, specials={"bos_token": "<s>", "eos_token": "</s>"}, added=[...])
    text, spans = template.render(messages, add_generation_prompt=False)   # spans: [(start, end)] chars

Two kinds, one interface (`render`, `completion_text`, `end_of_turn`, `source`):

- `ChatML`: lmschool's own template, written in Python (`tokenizer._turns`) and saved as its Jinja
  twin (`tokenizer.CHAT_TEMPLATE`). Every model pre-trained by lmschool uses it; its text and spans
  are exactly those lmschool has always trained on.
- `JinjaTemplate`: a checkpoint's own template (tokenizer_config.json `chat_template`), rendered as
  `transformers` renders it: a sandboxed Jinja environment with trim_blocks/lstrip_blocks, loop
  controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and the special
  tokens (`bos_token`, `eos_token`, ...) as variables. The spans of assistant turns are found
  - from `{% generation %}` ... `{% endgeneration %}` markers when the template has them (what
    Hugging Face's `return_assistant_tokens_mask` and TRL's assistant-only loss read), each assistant
    message's block in order;
  - otherwise by rendering prefixes: assistant turn i is the text that `messages[:i+1]` adds to
    `messages[:i]` with the generation prompt, up to and including the template's end-of-turn
    token (what follows it, e.g. ChatML's "\\n", is not the model's to write). Each prefix must be a
    prefix of the whole rendering; a template that rewrites earlier turns once later ones follow
    (e.g. one that drops past reasoning) is refused with the fix: add generation markers.
  The end-of-turn token is found once, by rendering a probe answer and reading the added token that
  follows it: <|im_end|> (ChatML: Qwen, SmolLM2), <|eot_id|> (Llama-3), </s> (Mistral [INST]),
  <end_of_turn> (Gemma). A template whose answers end with no special token is refused: a model
  trained on it could not learn to stop.

Errors a user can fix are UserErrors of one line naming the fix. Token ids and the loss mask are made
from (text, spans) by `Tokenizer` (lmschool/tokenizer.py), which encodes the text once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

from lmschool.errors import UserError

Spans = list[tuple[int, int]]
PROBE_ANSWER = "Zq9Probe answer."   # a probe no template rewrites (no leading/trailing whitespace)
FIX = ("give SFT a template that can (lmschool sft --chat-template FILE.jinja, e.g. one with "
       "{% generation %} markers), or --chat-template chatml where the tokenizer has <|im_start|>/<|im_end|>")


# ---- the Jinja environment, as transformers builds it --------------------------------------------

@lru_cache(maxsize=16)
def _compile(source: str):
    """The compiled template and its generation tracker (cached: SFT renders thousands of rows)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """`{% generation %}...{% endgeneration %}`: records each block's (start, end) in the output."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self.tracking = ContextVar("generation_tracking", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = self.tracking.get()
            if tracking is not None:   # the output so far is the blocks yielded before this one
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse as Jinja (line {e.lineno}: {e.message}); "
                        "fix tokenizer_config.json's chat_template, or " + FIX) from None
    tracker = next(ext for ext in env.extensions.values() if isinstance(ext, GenerationTracker))
    return template, tracker


@contextmanager
def _tracking(tracker, blocks: list[str], spans: Spans):
    token = tracker.tracking.set((blocks, spans))
    try:
        yield
    finally:
        tracker.tracking.reset(token)


# ---- the two kinds of template ------------------------------------------------------------------

class ChatML:
    """lmschool's own template (see lmschool/tokenizer.py: `_turns`, `CHAT_TEMPLATE`)."""

    end_of_turn = "<|im_end|>"
    has_markers = True

    def __init__(self):
        from lmschool.tokenizer import CHAT_TEMPLATE
        self.source = CHAT_TEMPLATE

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               trained: Sequence[int] | None = None) -> tuple[str, Spans]:
        """(text, spans) with spans over the content + <|im_end|> of the assistant turns (those in
        `trained` if given). The same pieces, in the same order, as lmschool always rendered."""
        from lmschool.tokenizer import _turns

        pieces = list(_turns(messages, add_generation_prompt))
        if trained is not None:   # turns are 3 pieces each; the content piece is the trained one
            keep = {3 * i + 1 for i in trained}
            pieces = [(piece, flag and k in keep) for k, (piece, flag) in enumerate(pieces)]
        spans, start = [], 0
        for piece, flag in pieces:
            if flag:
                spans.append((start, start + len(piece)))
            start += len(piece)
        return "".join(piece for piece, _ in pieces), spans


class JinjaTemplate:
    """A checkpoint's own Jinja chat template (see the module docstring).

    source: the template text. specials: the template's variables for special tokens (bos_token,
    eos_token, ... as strings). added: every added special token's text, in which the end of turn
    is looked for."""

    def __init__(self, source: str, specials: dict[str, str], added: Sequence[str]):
        self.source, self.specials, self.added = source, dict(specials), tuple(added)
        self.has_markers = "generation" in source and _has_generation_tag(source)
        self._end_of_turn: str | None = None

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._run(messages, add_generation_prompt, None)

    def _run(self, messages: list[dict], add_generation_prompt: bool, spans: Spans | None) -> str:
        import jinja2

        template, tracker = _compile(self.source)
        variables = {**self.specials, "messages": messages, "add_generation_prompt": add_generation_prompt}
        blocks: list[str] = []
        try:
            if spans is None:
                return template.render(**variables)
            with _tracking(tracker, blocks, spans):
                for block in template.generate(**variables):
                    blocks.append(block)
            return "".join(blocks)
        except jinja2.exceptions.TemplateError as e:   # raise_exception(...) or a template bug
            raise UserError(f"the chat template refused the conversation: {' '.join(str(e).split())[:160]} "
                            f"(roles {'/'.join(m['role'] for m in messages)}); reshape the conversation as "
                            "the template expects, or " + FIX) from None

    @property
    def end_of_turn(self) -> str:
        """The added token that closes an assistant turn (found once, from a probe answer)."""
        if self._end_of_turn is None:
            prompt = [{"role": "user", "content": "Hi"}]
            full = self.text(prompt + [{"role": "assistant", "content": PROBE_ANSWER}])
            at = full.rfind(PROBE_ANSWER)
            after = full[at + len(PROBE_ANSWER):].lstrip(" ") if at >= 0 else ""
            found = [t for t in self.added if t and after.startswith(t)]
            if at < 0 or not found:
                raise UserError("the chat template ends an assistant answer with no special token "
                                f"(after the answer it writes {after[:30]!r}), so a model could not learn "
                                "to stop; " + FIX)
            self._end_of_turn = max(found, key=len)
        return self._end_of_turn

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               trained: Sequence[int] | None = None) -> tuple[str, Spans]:
        """(text, spans of the assistant turns' answers with their end-of-turn token); `trained`:
        the indices of the assistant messages to mark (default: all of them)."""
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = assistants if trained is None else list(trained)
        if self.has_markers:
            spans: Spans = []
            text = self._run(messages, add_generation_prompt, spans)
            if len(spans) != len(assistants):
                raise UserError(f"the chat template's {{% generation %}} blocks ({len(spans)}) do not match the "
                                f"conversation's {len(assistants)} assistant turns, so the answers to train "
                                "on cannot be found; " + FIX)
            by_message = dict(zip(assistants, spans))
            return text, [by_message[i] for i in trained]
        self.end_of_turn   # a template whose answers end with no special token fails here, first
        text = self.text(messages, add_generation_prompt)
        return text, [self._span_by_prefix(messages, i, text) for i in trained]

    def _span_by_prefix(self, messages: list[dict], i: int, full: str) -> tuple[int, int]:
        """Assistant turn i: what messages[:i+1] adds to messages[:i] + generation prompt, cut after
        its end-of-turn token."""
        before = self.text(messages[:i], add_generation_prompt=True)
        through = self.text(messages[:i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(f"the chat template renders turn {i} differently once later turns follow "
                            "(rendering a prefix of the conversation is not a prefix of the whole), so the "
                            "answers to train on cannot be found; " + FIX)
        eot = self.end_of_turn
        end = through.rfind(eot, len(before))
        if end < 0:
            raise UserError(f"the chat template does not close assistant turn {i} with its end-of-turn "
                            f"token {eot}; " + FIX)
        return len(before), end + len(eot)

    def completion_text(self, prompt: list[dict], response: str) -> str:
        """The text an answer adds after the prompt's generation prompt, up to and including the
        end-of-turn token: what the model writes (e.g. "Paris.<|eot_id|>")."""
        messages = [*prompt, {"role": "assistant", "content": response}]
        text, (span,) = self.render(messages, trained=[len(prompt)])
        prefix = self.text(prompt, add_generation_prompt=True)
        if not text.startswith(prefix):
            raise UserError("the chat template renders the prompt differently once an answer follows, so "
                            "answers cannot be encoded after it; " + FIX)
        return text[len(prefix):span[1]]


def template_specials(config: dict) -> dict[str, str]:
    """The special-token variables a template reads (bos_token, eos_token, ...), as transformers
    passes them: tokenizer_config.json's strings ("" where unset, so `bos_token + ...` renders)."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        out[key] = token if isinstance(token, str) else ""
    return out


def _has_generation_tag(source: str) -> bool:
    """Whether the template source holds a `{% generation %}` tag (not just the word)."""
    import re
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
