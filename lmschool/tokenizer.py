"""Tokenizer: byte-level BPE via the `tokenizers` library, special tokens, and the one chat template.

Design choices:
- **Byte-level BPE** (GPT-2 / Llama-3 style): text is split by the Llama-3 regex, mapped to the 256
  byte symbols, then merged. The initial alphabet is all 256 bytes, so any UTF-8 text round-trips
  and nothing is ever unknown. `byte_level=True` gives the pure byte tokenizer (no merges) for
  character-level work: byte b has id 4 + b.
- **Special tokens have the first ids** in every tokenizer lmschool trains:
      0 <|endoftext|>   end of a document (the EOS of plain text)
      1 <|pad|>         padding (never trained on)
      2 <|im_start|>    start of a chat turn (ChatML)
      3 <|im_end|>      end of a chat turn: what a chat model emits to stop
  In corpus text a line holding exactly `<|endoftext|>` separates documents; the string always
  encodes to its single id (unless `allow_special=False`).
- **lmschool's chat template** is ChatML, written once in Python (`render_text`) and once in Jinja
  (`CHAT_TEMPLATE`, saved in tokenizer_config.json) that produce the same string; the tests prove
  it through `transformers`' `apply_chat_template`. The Jinja template wraps trained spans in
  `{% generation %}` so Hugging Face's `return_assistant_tokens_mask` (and TRL's assistant-only
  loss) give the same mask.
- **A checkpoint's own template** is kept: a tokenizer loaded with a `chat_template` other than
  CHAT_TEMPLATE renders through it (lmschool/chat_template.py: Jinja as transformers runs it, the
  assistant spans by generation markers or by rendering prefixes) and saves it back. A fresh
  tokenizer (`train_tokenizer`) and one saved with CHAT_TEMPLATE use ChatML. A loaded tokenizer
  with no template has none: `render` is one line naming the fix (`use_chat_template`, which
  `lmschool sft --chat-template chatml|FILE.jinja` calls).
- Every stage (SFT, DPO, PPO, chat, eval) gets its token ids and loss mask from `render`, which
  encodes the template's whole text once and marks the tokens that overlap the trained spans
  (each assistant answer and its end-of-turn token), so its ids are exactly the template's.
- **Saved files** are Hugging Face's: `tokenizer.json` + `tokenizer_config.json`
  (`PreTrainedTokenizerFast`, no BOS, `eos_token` = `<|endoftext|>`, `pad_token` = `<|pad|>`).
  eos_token stays the document end (what a base model emits); a chat model stops at its template's
  end of turn (`<|im_end|>`, Llama-3's `<|eot_id|>`, Gemma's `<end_of_turn>` ...) as well, so
  `stop_ids` lists both, plus the ids of generation_config.json's `eos_token_id` when the directory
  has one: the list lmschool writes back there, which is what `transformers.generate` stops on.
- `Tokenizer.load` also reads a local Hugging Face tokenizer directory (Llama, Qwen2, Mistral ...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmschool.chat_template import ChatML, JinjaTemplate, template_specials
from lmschool.errors import UserError

ENDOFTEXT, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, PAD, IM_START, IM_END)  # ids 0, 1, 2, 3
CHAT_ROLES = ("system", "user", "assistant")

# Llama-3's pre-tokenizer split, except that every digit is its own token (as in Llama 1/2 and
# DeepSeek): with digit groups, "47 + 38 = 85" is a lookup over 90 x 90 opaque tokens that a
# small model cannot learn from a few thousand sums; with single digits it is column addition.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Jinja twin of render_text(). `generation` marks the tokens a model is trained to produce.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def validate_messages(messages: object) -> list[dict]:
    """Check a conversation: a list of {"role": system|user|assistant, "content": str}.

    Raises UserError naming the message; callers add file:line. Content may not contain a chat
    special token, which would silently change the turn structure.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f"a conversation must be a non-empty list of messages, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f'message {i} must be an object with "role" and "content", got {message!r:.80}')
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise UserError(f"message {i} has role {role!r}; allowed roles: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        for special in SPECIAL_TOKENS:
            if special in content:
                raise UserError(f"message {i} ({role}) content contains the special token {special}, "
                                "which would break the turn structure; remove it")
    return messages


def _turns(messages: list[dict], add_generation_prompt: bool) -> Iterator[tuple[str, bool]]:
    """The template as (piece, trained) pairs; trained pieces are what the model learns to write."""
    for message in messages:
        yield f"{IM_START}{message['role']}\n", False
        yield message["content"] + IM_END, message["role"] == "assistant"
        yield "\n", False
    if add_generation_prompt:
        yield f"{IM_START}assistant\n", False


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template as a string: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn,
    then `<|im_start|>assistant\\n` if add_generation_prompt. Same string as CHAT_TEMPLATE."""
    validate_messages(messages)
    return "".join(piece for piece, _ in _turns(messages, add_generation_prompt))


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def _split_specials(texts: Iterable[str]) -> Iterator[str]:
    """Cut special tokens out of training text: BpeTrainer would otherwise learn merges like '<|'."""
    pattern = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def _byte_level_setup(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int | None = None, byte_level: bool = False, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` tokens in all (4 special + 256 bytes +
    merges; fewer if the text has no more pairs to merge). `byte_level=True` skips training and
    returns the 260-token byte tokenizer; `vocab_size` must then be None or 260."""
    n_base = len(SPECIAL_TOKENS) + 256
    if byte_level:
        if vocab_size not in (None, n_base):
            raise UserError(f"a byte-level tokenizer has exactly {n_base} tokens (256 bytes + "
                            f"{len(SPECIAL_TOKENS)} special), not {vocab_size}; leave the vocab size out")
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        vocab |= {char: len(SPECIAL_TOKENS) + b for b, char in _bytes_to_unicode().items()}
        tok = _byte_level_setup(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])))
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return Tokenizer(tok)
    if vocab_size is None or vocab_size < n_base:
        raise UserError(f"vocab size must be at least {n_base} (256 bytes + {len(SPECIAL_TOKENS)} "
                        f"special tokens), got {vocab_size}; for bytes only use byte-level mode")
    tok = _byte_level_setup(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(_split_specials(texts), trainer)
    return Tokenizer(tok)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special-token ids and the chat template.

    `backend` does the work (it is tokenizer.json); `config` is the tokenizer_config.json it was
    loaded with (empty for a fresh one), kept when saving so a Hugging Face tokenizer saves back
    as it came.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None,
                 generation_stop_ids: Sequence[int] = ()):
        self.backend = backend
        self.config = dict(config or {})
        self.generation_stop_ids = [int(i) for i in generation_stop_ids]
        """generation_config.json's eos_token_id(s) where the directory has one (stop ids too)."""
        # eos_id is the end of a document: <|endoftext|> where it exists (Qwen2's config names
        # <|im_end|> instead, its end of turn), else the config's eos_token (Llama's </s>, ...).
        endoftext_id = self._id_of(ENDOFTEXT)
        self.eos_id = endoftext_id if endoftext_id is not None else self._config_token_id("eos_token")
        self.pad_id = self._config_token_id("pad_token") if "pad_token" in self.config else self._id_of(PAD)
        self.bos_id = self._config_token_id("bos_token")
        self.im_start_id, self.im_end_id = self._id_of(IM_START), self._id_of(IM_END)
        self.template = self._own_template()
        """The chat template (ChatML or JinjaTemplate, lmschool/chat_template.py), or None."""

    def _own_template(self) -> ChatML | JinjaTemplate | None:
        """lmschool's ChatML for a fresh tokenizer or one saved with CHAT_TEMPLATE; the config's own
        template otherwise (a list of named ones: the "default"); None when a loaded one has none."""
        source = self.config.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
        if source is None:
            return ChatML() if not self.config and self.has_chat_tokens else None
        if source == CHAT_TEMPLATE and self.has_chat_tokens:
            return ChatML()
        return JinjaTemplate(str(source), template_specials(self.config), self.special_tokens)

    @property
    def special_tokens(self) -> list[str]:
        """The text of every added special token (<|im_end|>, <|eot_id|>, </s> ...)."""
        if getattr(self, "_special_tokens", None) is None:   # once: Llama-3 has 256 of them
            self._special_tokens = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        return self._special_tokens

    def use_chat_template(self, spec: str) -> None:
        """Render with another template from now on (and save it): "chatml" for lmschool's ChatML
        (the tokenizer must have <|im_start|>/<|im_end|>), else the path of a Jinja file."""
        if spec == "chatml":
            if not self.has_chat_tokens:
                raise UserError(f"--chat-template chatml needs a tokenizer with the tokens {IM_START} and "
                                f"{IM_END}, and this one lacks them; give --chat-template FILE.jinja with a "
                                "template written in the tokenizer's own special tokens")
            self.config["chat_template"], self.template = CHAT_TEMPLATE, ChatML()
            return
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--chat-template {spec}: no such file; give a Jinja chat template file, or "
                            "chatml for lmschool's ChatML")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--chat-template {spec}: not UTF-8 text; give a Jinja chat template file") from None
        self.config["chat_template"] = source
        self.template = self._own_template()

    @property
    def fill_id(self) -> int:
        """The id that fills padded positions: pad_id, or 0 for a tokenizer without a pad token
        (padding is masked out of every loss and attention, so any id does)."""
        return self.pad_id if self.pad_id is not None else 0

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a directory:
        one written by `save` or a local Hugging Face checkpoint's."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise UserError(f"{directory}: no tokenizer.json there; expected a tokenizer directory "
                            "written by `lmschool tokenizer train` or a Hugging Face checkpoint")
        try:
            tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:   # the tokenizers library raises a bare Exception for a bad file
            raise UserError(f"{directory / 'tokenizer.json'} cannot be read ({str(e)[:80]}); the file is "
                            "damaged: use the tokenizer of another checkpoint of the run, or train it again") from None
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{config_path} is not valid JSON ({e}); the file is damaged") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        if (directory / "chat_template.jinja").is_file():  # newer transformers save it apart
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tok, config, _generation_eos_ids(directory / "generation_config.json"))

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory` (created if needed),
        with the chat template it renders with (CHAT_TEMPLATE for ChatML, else its own)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = dict(self.config) or {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": ENDOFTEXT,
            "pad_token": PAD,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
        }
        if self.template is not None:
            config["chat_template"] = self.template.source
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(config_text, encoding="utf-8")

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included (the smallest embedding table that fits)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_tokens(self) -> bool:
        return self.im_start_id is not None and self.im_end_id is not None

    @property
    def has_chat_template(self) -> bool:
        return self.template is not None

    @property
    def end_of_turn_id(self) -> int | None:
        """The token that closes an assistant turn under the chat template (<|im_end|> for ChatML),
        or None without a template or with one whose end of turn cannot be found."""
        if isinstance(self.template, ChatML) or self.template is None:
            return self.im_end_id if self.template is not None else None
        try:
            return self._id_of(self.template.end_of_turn)
        except UserError:
            return None

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: end of document, end of turn and generation_config.json's
        eos_token_id (those this tokenizer has)."""
        end_of_turn = self.im_end_id if self.template is None else self.end_of_turn_id
        return [i for i in dict.fromkeys([self.eos_id, end_of_turn, *self.generation_stop_ids]) if i is not None]

    @property
    def chat_template(self) -> str | None:
        return self.template.source if self.template is not None else self.config.get("chat_template")

    def _id_of(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _config_token_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # older configs store AddedToken dicts
            token = token.get("content")
        return self._id_of(token) if isinstance(token, str) else None

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. allow_special: special-token strings in the text become their ids
        (otherwise they are encoded as plain text). add_special_tokens: apply the tokenizer's
        post-processor as Hugging Face does by default (Llama tokenizers prepend BOS; lmschool's
        add nothing)."""
        return self.encode_batch([text], allow_special, add_special_tokens)[0]

    def encode_batch(
        self, texts: Sequence[str], allow_special: bool = True, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """encode() for many texts at once, in parallel threads."""
        self.backend.encode_special_tokens = not allow_special
        try:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
            return [encoding.ids for encoding in encodings]
        finally:
            self.backend.encode_special_tokens = False

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    # ---- chat ---------------------------------------------------------------------------------

    def render(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the chat template and the loss mask: 1 on each assistant turn's answer and
        its end-of-turn token (`<|im_end|>` in ChatML, so the model learns to stop), 0 on role
        headers, what follows the end of turn (ChatML's "\\n") and every non-assistant turn."""
        self._check_messages(messages)
        return self._render(*self._template().render(messages, add_generation_prompt))

    def render_prompt_completion(
        self, prompt: str | list[dict], completion: str | list[dict]
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a prompt/completion pair, TRL's conventions: a string prompt is one
        user turn, a string completion one assistant turn. The mask covers the completion's turns
        only (answer + end of turn), not assistant turns inside the prompt."""
        prompt_messages = _as_messages(prompt, "user")
        completion_messages = _as_messages(completion, "assistant")
        self._check_messages(prompt_messages)
        self._check_messages(completion_messages)
        if any(m["role"] != "assistant" for m in completion_messages):
            raise UserError("a completion may hold only assistant messages; put other turns in the prompt")
        messages = prompt_messages + completion_messages
        trained = range(len(prompt_messages), len(messages))
        return self._render(*self._template().render(messages, trained=trained))

    def encode_response(self, prompt: list[dict], response: str) -> tuple[list[int], int]:
        """(ids, prompt_len): the prompt with the generation prompt, then the answer as the template
        closes it, through its end-of-turn token (the last id). ChatML: render(prompt, True) +
        encode(response) + [<|im_end|>], the answer's text never read as special tokens; another
        template: the text its answer adds after the prompt, encoded with it (or apart from it, as
        TRL encodes a completion, where the prompt's ids would change), so the prompt's ids are
        those a policy is given."""
        template = self._template()
        prompt_ids, _ = self.render(prompt, add_generation_prompt=True)
        if isinstance(template, ChatML):
            response_ids = self.encode(response, allow_special=False, add_special_tokens=False)
            return prompt_ids + response_ids + [self.im_end_id], len(prompt_ids)
        self._check_messages([{"role": "assistant", "content": response}])
        text = template.completion_text(prompt, response)
        # the whole text's ids where the prompt's are a prefix of them (a Metaspace tokenizer would
        # otherwise open the answer with a word-start mark it never has in context)
        whole = self.encode(template.text(prompt, add_generation_prompt=True) + text, add_special_tokens=False)
        if whole[:len(prompt_ids)] == prompt_ids:
            return whole, len(prompt_ids)
        return prompt_ids + self.encode(text, add_special_tokens=False), len(prompt_ids)

    def _template(self) -> ChatML | JinjaTemplate:
        if self.template is None:
            raise UserError("this tokenizer has no chat template (tokenizer_config.json has no chat_template), so "
                            "it cannot render conversations; use a checkpoint whose tokenizer has one, or give "
                            "`lmschool sft --chat-template FILE.jinja` (or `chatml`, for a tokenizer with "
                            f"{IM_START}/{IM_END})")
        return self.template

    def _check_messages(self, messages: list[dict]) -> None:
        """validate_messages, and under another template no message holding one of its special tokens."""
        validate_messages(messages)
        if isinstance(self.template, JinjaTemplate):
            specials = [t for t in self.special_tokens if t]
            for i, message in enumerate(messages):
                found = next((t for t in specials if t in message["content"]), None)
                if found is not None:
                    raise UserError(f"message {i} ({message['role']}) content contains the special token {found}, "
                                    "which would break the turn structure; remove it")

    def _render(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Encode the template's text once, then mark every token that overlaps a trained span.

        A token straddling a boundary (BPE may merge the header's "\\n" with content that starts
        with a newline) counts as trained, as in Hugging Face's assistant mask: the model must
        learn to write it. Spans end at the end-of-turn token, a special token, so their ends never
        straddle.
        """
        encoding = self.backend.encode(text, add_special_tokens=False)
        loss_mask, span_index = [], 0
        for token_start, token_end in encoding.offsets:  # offsets are characters, ascending
            while span_index < len(spans) and spans[span_index][1] <= token_start:
                span_index += 1
            inside = span_index < len(spans) and spans[span_index][0] < token_end and token_start < token_end
            loss_mask.append(int(inside))
        return encoding.ids, loss_mask


def check_same_tokenizer(theirs: Tokenizer, ours: Tokenizer, theirs_name: str, ours_name: str) -> None:
    """A second model that reads the first one's token ids (a DPO reference, a reward model) must
    read them as the same tokens: same vocabulary (added tokens included) and the same stop ids.
    theirs_name / ours_name say where each came from, e.g. "--reward runs/rm", "--init runs/sft"."""
    a = ours.backend.get_vocab(with_added_tokens=True)
    b = theirs.backend.get_vocab(with_added_tokens=True)
    if a == b and ours.stop_ids == theirs.stop_ids:
        return
    differ = sorted(set(a.items()) ^ set(b.items()))[:3]
    raise UserError(f"{theirs_name} has another tokenizer than {ours_name} ({len(b)} vs {len(a)} tokens; "
                    f"differing entries such as {differ}); it must read the same token ids, so give one "
                    "trained from the same checkpoint, with the same tokenizer")


class TextStream:
    """Token ids in, text out as soon as it is whole: decode all ids so far and return the new
    suffix, holding back a trailing partial UTF-8 character (decoded as U+FFFD) until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special=True)
        new, self.text = text[len(self.text):], text
        return new


def check_chat_template(tokenizer: Tokenizer, path) -> None:
    """Raise a UserError naming `path` unless its tokenizer has a chat template to render with."""
    if not tokenizer.has_chat_template:
        fix = ("--chat-template chatml (lmschool's ChatML: this tokenizer has its tokens) or FILE.jinja"
               if tokenizer.has_chat_tokens else "--chat-template FILE.jinja")
        raise UserError(f"{path}: its tokenizer has no chat template (tokenizer_config.json has no "
                        "chat_template), so conversations cannot be rendered; use a checkpoint with one, "
                        f"or give `lmschool sft` {fix}")


def _generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list of ids), [] without one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return []   # a damaged generation config only loses its extra stop ids; the model check names it
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
