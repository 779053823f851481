"""Stage 3 data: preference pairs, their token ids, and batches of chosen + rejected rows.

One JSON object per line (blank lines skipped), in either of TRL's two forms:

    standard:        {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational:  {"prompt": [messages ending with a user turn],
                      "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}

A string prompt is one user turn. Every other key ("category", "split", "group", "gold_chosen",
"score_chosen", ...) is kept in `Pair.meta`, with "where" = "file:line". `read_pairs(path,
split="train" | "test")` keeps one split (a line without "split" is train). A line with a field
missing, an empty answer, chosen equal to rejected or a prompt that does not end with a user turn
is a DataError naming its file:line.

Token ids (`encode_response`): the prompt through the tokenizer's one chat template with the
assistant header, then the answer, then `<|im_end|>`; the answer's tokens end with the end-of-turn
token, where a reward model reads its score and which a policy must learn to emit.

Batches (`pair_batch`, `PairBatches`): one concatenated, right-padded batch, rows 0..B-1 chosen and
B..2B-1 rejected, so a policy (DPO) or a reward model runs one forward for both sides; or
(`collate_shared`) one row per prompt holding the prompt once and each distinct answer after it as
a branch that sees only the prompt and itself. A row longer
than `max_len` loses the start of its prompt (the whole answer is kept); an answer that alone
leaves no room for one prompt token is a DataError. `PairBatches` serves them as a pure function
of the step (resume, accumulation and DDP see the same pairs) and keeps the pairs of one prompt
group in one micro-batch where they fit (InstructGPT: all C(K, 2) comparisons of a prompt in one
batch element, so the model does not over-fit to a prompt seen across many steps).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmschool.data.jsonl import check_conversation
from lmschool.data.sources import read_rows
from lmschool.errors import DataError
from lmschool.losses.lm import IGNORE

FORMAT_HINT = ('expected {"prompt": "..." | [messages ending with a user turn], "chosen": "..." | '
               '[{"role": "assistant", "content": ...}], "rejected": (same as chosen)}')
SPLITS = ("train", "test")


@dataclass
class Pair:
    """One preference: two answers to a prompt, `chosen` preferred over `rejected`."""

    prompt: list[dict]
    """Chat messages ending with a user turn (system / user / assistant turns allowed before)."""
    chosen: str
    """The preferred assistant answer (text, no special tokens)."""
    rejected: str
    """The other answer."""
    meta: dict
    """Every other key of the line (category, split, group, gold_chosen, scores ...) and "where"."""

    @property
    def split(self) -> str:
        return self.meta.get("split") or "train"

    @property
    def group(self) -> str:
        """The prompt group: the line's "group", else the prompt itself (pairs of one prompt)."""
        group = self.meta.get("group")
        return str(group) if group is not None else json.dumps(self.prompt, sort_keys=True)


# ---- reading ----------------------------------------------------------------------------------

def read_answer(value: object, where: str, field: str) -> str:
    """The answer text of a "chosen" / "rejected" field: a string or one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: \"{field}\" must be one assistant message, got {len(value)} "
                            f"messages; {FORMAT_HINT}")
        check_conversation(value, f"{where} ({field})", need_assistant=False)
        if value[0]["role"] != "assistant":
            raise DataError(f"{where}: \"{field}\" has role {value[0]['role']!r}; it must be the "
                            "assistant's answer (put other turns in the prompt)")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{field}\" must be a string or [{{\"role\": \"assistant\", "
                        f"\"content\": ...}}], got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: \"{field}\" is empty; every answer needs text")
    check_conversation([{"role": "assistant", "content": value}], f"{where} ({field})", need_assistant=False)
    return value


def check_fields(row: dict, where: str, fields: tuple[str, ...], hint: str) -> None:
    missing = [k for k in fields if k not in row]
    if missing:
        raise DataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(k) for k in missing)}; {hint}")


def read_prompt(value: object, where: str, answered_by: str) -> list[dict]:
    """A line's "prompt": a string (one user turn) or messages ending with the user turn that the
    answers reply to (`answered_by` says so in errors: "the two answers reply to")."""
    prompt = [{"role": "user", "content": value}] if isinstance(value, str) else value
    check_conversation(prompt, f"{where} (prompt)", need_assistant=False)
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: the prompt has no user turn; it must end with the user's message "
                        f"that {answered_by}")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt's last turn is {prompt[-1]['role']}; it must end with "
                        f"the user turn that {answered_by}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def read_meta(row: dict, where: str, fields: tuple[str, ...]) -> dict:
    """Every key of the line but `fields`, with "where"; a "split" must be train or test."""
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: \"split\" is {split!r}; use \"train\" or \"test\" (or leave it out: train)")
    return {**{k: v for k, v in row.items() if k not in fields}, "where": where}


def parse_pair(row: dict, where: str) -> Pair:
    """Check one line and make it a Pair (see the module docstring for the rules)."""
    fields = ("prompt", "chosen", "rejected")
    check_fields(row, where, fields, FORMAT_HINT)
    prompt = read_prompt(row["prompt"], where, "the two answers reply to")
    chosen, rejected = read_answer(row["chosen"], where, "chosen"), read_answer(row["rejected"], where, "rejected")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same answer, so there is no "
                        "preference to learn; drop the line")
    return Pair(prompt, chosen, rejected, read_meta(row, where, fields))


def read_pairs(path: str | Path, *, split: str | None = None) -> list[Pair]:
    """Every pair of a preference JSONL file (split=None), or those of one split ("train"/"test";
    lines without "split" count as train). Raises DataError at file:line for a bad line."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None, 'train' or 'test', not {split!r}")
    pairs, rows = [], 0
    for where, row in read_rows(path, FORMAT_HINT):
        rows += 1
        pair = parse_pair(row, where)
        if split is None or pair.split == split:
            pairs.append(pair)
    if rows == 0:
        raise DataError(f"{path}: holds no preference pairs; {FORMAT_HINT}, one per line")
    return pairs


# ---- token ids --------------------------------------------------------------------------------

def encode_response(tokenizer, prompt: list[dict], response: str) -> tuple[list[int], int]:
    """(ids, prompt_len): the prompt with the generation prompt, then the answer through its
    end-of-turn token (`Tokenizer.encode_response`). The response's tokens are ids[prompt_len:],
    ending with the end of turn (ChatML's <|im_end|>). With ChatML, the same ids as rendering the
    whole conversation (the template's final "\\n" aside): the header ends with "\\n" and the
    pre-tokenizer never merges a newline with the letters after it."""
    return tokenizer.encode_response(prompt, response)


def fit_to_length(ids: list[int], prompt_len: int, max_len: int, where: str) -> tuple[list[int], int]:
    """Cut the prompt from the left so the row fits in max_len; the response is never cut."""
    if len(ids) <= max_len:
        return ids, prompt_len
    response_len = len(ids) - prompt_len
    if response_len >= max_len:
        raise DataError(f"{where}: an answer is {response_len} tokens (with its <|im_end|>), which "
                        f"leaves no room for the prompt in max_len={max_len}; raise max_len or "
                        "drop the line")
    cut = len(ids) - max_len
    return ids[cut:], prompt_len - cut


def collate_rows(rows: list[tuple[list[int], int]], pad_id: int, pad_multiple: int = 1) -> dict:
    """Right-padded rows of (ids, prompt_len). Returns input_ids, labels, last_index, response_len.

    labels[t] = input_ids[t + 1] where that token belongs to the response, else IGNORE; so the
    response's log-prob is the sum of -token_nll over the row. last_index is each row's final
    token (its <|im_end|>)."""
    lengths = [len(ids) for ids, _ in rows]
    N, T = len(rows), -(-max(lengths) // pad_multiple) * pad_multiple
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    labels = torch.full((N, T), IGNORE, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        row = torch.as_tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = row
        labels[i, prompt_len - 1:len(ids) - 1] = row[prompt_len:]            # response tokens only
    last_index = torch.as_tensor(lengths, dtype=torch.long) - 1              # (N,)
    response_len = torch.as_tensor([len(ids) - p for ids, p in rows], dtype=torch.long)  # (N,)
    return {"input_ids": input_ids, "labels": labels, "last_index": last_index,
            "response_len": response_len, "num_tokens": sum(lengths)}


def encode_pair(tokenizer, pair: Pair, max_len: int) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
    """The (ids, prompt_len) of the chosen and of the rejected row, each cut to max_len."""
    where = pair.meta.get("where", "a pair")
    chosen = fit_to_length(*encode_response(tokenizer, pair.prompt, pair.chosen), max_len, where)
    rejected = fit_to_length(*encode_response(tokenizer, pair.prompt, pair.rejected), max_len, where)
    return chosen, rejected


def pair_batch(tokenizer, pairs: list[Pair], max_len: int, pad_multiple: int = 1) -> dict:
    """One batch of 2B rows: 0..B-1 the chosen answers, B..2B-1 the rejected ones, right-padded.

    input_ids (2B, T) long; labels (2B, T) long: next-token targets on response tokens, IGNORE
    elsewhere (-token_nll(logits, labels).sum(1) is each response's log-prob); last_index (2B,)
    long: each row's final token (<|im_end|>), where a reward model reads its score;
    response_len (2B,) long; num_targets = B (the losses are means over pairs); num_tokens."""
    encoded = [encode_pair(tokenizer, p, max_len) for p in pairs]
    return collate_pairs(encoded, tokenizer.fill_id, pad_multiple)


def collate_pairs(encoded: list[tuple], pad_id: int, pad_multiple: int = 1) -> dict:
    """pair_batch from already encoded pairs (as `encode_pair` returns them)."""
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    batch = collate_rows(rows, pad_id, pad_multiple)
    batch["num_targets"] = len(encoded)
    return batch


def collate_unique(encoded: list[tuple], pad_id: int, pad_multiple: int = 1) -> dict:
    """Pairs as one row per distinct answer, for a reward model: the K answers to a prompt give
    C(K, 2) pairs but need only K forward rows (InstructGPT sec. 3.5). Keys as collate_rows, plus
    chosen_index and rejected_index (P,) long: the rows of each pair's answers; num_targets = P."""
    rows: list[tuple[list[int], int]] = []
    where: dict[tuple, int] = {}

    def row_of(seq: tuple[list[int], int]) -> int:
        key = (tuple(seq[0]), seq[1])
        if key not in where:
            where[key] = len(rows)
            rows.append(seq)
        return where[key]

    chosen = [row_of(c) for c, _ in encoded]
    rejected = [row_of(r) for _, r in encoded]
    batch = collate_rows(rows, pad_id, pad_multiple)
    batch.update(chosen_index=torch.as_tensor(chosen, dtype=torch.long),        # (P,)
                 rejected_index=torch.as_tensor(rejected, dtype=torch.long),    # (P,)
                 num_targets=len(encoded))
    return batch


def collate_shared(encoded: list[tuple], pad_id: int, pad_multiple: int = 1) -> dict:
    """Pairs as one row per prompt: the prompt once, then each of its distinct answers as a branch
    that attends to the prompt and to itself only, its positions counted on from the prompt's end.
    Every answer gets the log-probs it would get in a row of its own (the same attention, the same
    positions), but the prompt is computed once for all its answers: the K answers a rater ranked
    give C(K, 2) pairs, and in a row per answer the prompt was computed twice per pair.

    Layout of a row: the prompt but its last token (branch 0), then per answer that last prompt
    token again followed by the answer (branch k = 1, 2, ...), so each branch's first position
    predicts its answer's first token; padding is branch -1. Prompts are matched by their ids
    after `fit_to_length`, so a prompt cut differently for two answers makes two rows.

      input_ids, position_ids, branch_ids (G, T) long; labels (G, T): the next token of the branch
      where it is an answer token, IGNORE elsewhere; answer_ids (G, T) long: the answer (0..A-1)
      whose token labels[g, t] is, -1 elsewhere; answer_last (A,) long: g * T + t of each answer's
      final token (<|im_end|>: where a reward model reads); response_len (A,); chosen_index,
      rejected_index (P,) long: each pair's answers; num_targets = P; num_tokens (without padding).

    `tree_mask(branch_ids)` (lmschool.model) is the attention mask these rows need."""
    prompts: dict[tuple, int] = {}                    # prompt ids -> row
    branches: list[list[tuple]] = []                  # per row: its distinct answers
    answers: dict[tuple, int] = {}                    # (row, answer ids) -> answer index, in order of first use

    def answer_of(seq: tuple[list[int], int]) -> int:
        ids, prompt_len = seq
        prompt, answer = tuple(ids[:prompt_len]), tuple(ids[prompt_len:])
        row = prompts.setdefault(prompt, len(prompts))
        if row == len(branches):
            branches.append([])
        if (row, answer) not in answers:
            answers[(row, answer)] = len(answers)
            branches[row].append(answer)
        return answers[(row, answer)]

    chosen = [answer_of(c) for c, _ in encoded]
    rejected = [answer_of(r) for _, r in encoded]
    rows = list(prompts)
    lengths = [len(p) - 1 + sum(len(a) + 1 for a in branches[g]) for g, p in enumerate(rows)]
    G, T = len(rows), -(-max(lengths) // pad_multiple) * pad_multiple
    input_ids = torch.full((G, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(G, T, dtype=torch.long)
    branch_ids = torch.full((G, T), -1, dtype=torch.long)
    labels = torch.full((G, T), IGNORE, dtype=torch.long)
    answer_ids = torch.full((G, T), -1, dtype=torch.long)
    answer_last = torch.zeros(len(answers), dtype=torch.long)
    response_len = torch.zeros(len(answers), dtype=torch.long)
    for g, prompt in enumerate(rows):
        P = len(prompt)
        input_ids[g, :P - 1] = torch.as_tensor(prompt[:-1], dtype=torch.long)
        position_ids[g, :P - 1] = torch.arange(P - 1)
        branch_ids[g, :P - 1] = 0
        start = P - 1
        for k, answer in enumerate(branches[g], start=1):
            n = len(answer)
            a = answers[(g, answer)]
            span = slice(start, start + n + 1)                                # last prompt token + answer
            input_ids[g, span] = torch.as_tensor((prompt[-1],) + answer, dtype=torch.long)
            position_ids[g, span] = torch.arange(P - 1, P + n)
            branch_ids[g, span] = k
            labels[g, start:start + n] = torch.as_tensor(answer, dtype=torch.long)
            answer_ids[g, start:start + n] = a
            answer_last[a], response_len[a] = g * T + start + n, n
            start += n + 1
    return {"input_ids": input_ids, "position_ids": position_ids, "branch_ids": branch_ids,
            "labels": labels, "answer_ids": answer_ids, "answer_last": answer_last,
            "response_len": response_len, "chosen_index": torch.as_tensor(chosen, dtype=torch.long),
            "rejected_index": torch.as_tensor(rejected, dtype=torch.long), "num_targets": len(encoded),
            "num_tokens": sum(lengths)}


def response_batch(tokenizer, prompts: list[list[dict]], responses: list[str], max_len: int) -> dict:
    """Right-padded rows of single (prompt, response) sequences, e.g. to score answers with a
    reward model: input_ids, labels, last_index, response_len as in `collate_rows`."""
    rows = [fit_to_length(*encode_response(tokenizer, p, r), max_len, f"answer {i}")
            for i, (p, r) in enumerate(zip(prompts, responses))]
    return collate_rows(rows, tokenizer.fill_id)


def fingerprint(sequences) -> str:
    """A hash of integer sequences (token ids and markers between them): a resumed run checks
    that its data did not change."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ---- batches as a pure function of the step -----------------------------------------------------

def _margin(pair: Pair) -> float:
    value = pair.meta.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{pair.meta.get('where', 'a pair')}: \"margin\" must be a number, got {value!r}")
    return float(value)


def step_indices(data, step: int, n_micro: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches (index lists) at optimizer step `step`, for a data source with
    `layout(epoch)` (an epoch's micro-batches) and `steps_per_epoch(micro_per_step)`: the step's
    n_micro x world micro-batches in order, rank r taking the r-th run of n_micro."""
    M = n_micro * world
    epoch, j = divmod(step, data.steps_per_epoch(M))
    batches = data.layout(epoch)
    return [batches[(j * M + rank * n_micro + m) % len(batches)] for m in range(n_micro)]


class PairBatches:
    """Training micro-batches of pairs; `micro_batches(step, ...)` is deterministic in the step.

    Each epoch is a seeded permutation of the prompt groups, laid out in micro-batches of at most
    `batch_size` pairs: a group goes whole into the current micro-batch if it fits, else starts the
    next one (a group larger than batch_size is cut). With group_batches=False single pairs are
    permuted instead. Length bucketing (bucket_batches > 1): each run of about bucket_batches x
    batch_size pairs of the permutation is sorted by length (longest answer of the group) before
    it is cut into micro-batches, and those are shuffled: a story and a one-line answer rarely
    share a batch, which on the school world pads 2.7x fewer tokens than a random layout. An optimizer step takes the next n_micro x world micro-batches (rank r the
    r-th n_micro of them); steps per epoch come from epoch 0's layout, and an epoch with fewer
    micro-batches wraps around to its first. Pairs are encoded once and kept. If any line has a
    "margin" (TRL's column), every batch carries "margin" (B,), 0 for lines without one.
    unique_rows=True collates with `collate_unique` (one row per distinct answer: reward models),
    shared_prompts=True with `collate_shared` (one row per prompt, its distinct answers as branches:
    DPO), instead of `collate_pairs` (rows 0..B-1 chosen, B..2B-1 rejected).
    """

    def __init__(self, pairs: list[Pair], tokenizer, batch_size: int, max_len: int, *, seed: int = 0,
                 group_batches: bool = True, unique_rows: bool = False, shared_prompts: bool = False,
                 bucket_batches: int = 16, pad_multiple: int = 8):
        if not pairs:
            raise DataError("there are no training pairs")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.pad_id, self.pad_multiple, self.unique_rows = tokenizer.fill_id, pad_multiple, unique_rows
        self.shared_prompts = shared_prompts
        self.encoded = [encode_pair(tokenizer, p, max_len) for p in pairs]
        self.margins = None  # the lines' "margin" (a gap the reward model must exceed), if any has one
        if any("margin" in p.meta for p in pairs):
            self.margins = [_margin(p) for p in pairs]
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault(p.group if group_batches else str(i), []).append(i)
        self.groups = list(groups.values())
        self.group_len = [max(self.length(i) for i in g) for g in self.groups]
        self.group_of = {i: k for k, g in enumerate(self.groups) for i in g}
        self.bucket_batches = bucket_batches
        self._layouts: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.encoded)

    def fingerprint(self) -> str:
        """A hash of the encoded pairs (tokens and prompt lengths), for RUN/data.json."""
        return fingerprint(c + [-1, cp, -2] + r + [-1, rp, -3] for (c, cp), (r, rp) in self.encoded)

    def length(self, i: int) -> int:
        """Tokens in the longer row of pair i."""
        (chosen, _), (rejected, _) = self.encoded[i]
        return max(len(chosen), len(rejected))

    def sort_key(self, i: int) -> tuple[int, int]:
        """Pair i's place in a pass over the pairs in order of length (e.g. the reference's): its
        group's length, then its group, so the pairs of one prompt stay together."""
        g = self.group_of[i]
        return self.group_len[g], g

    def layout(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches, as lists of pair indices."""
        if epoch not in self._layouts:
            if len(self._layouts) > 4:
                self._layouts.clear()
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups)).tolist()
            batches: list[list[int]] = []
            chunk: list[int] = []
            pairs_in_chunk = 0
            for k, g in enumerate(order):
                chunk.append(g)
                pairs_in_chunk += len(self.groups[g])
                full = self.bucket_batches > 1 and pairs_in_chunk >= self.bucket_batches * self.batch_size
                if full or k == len(order) - 1:
                    batches += self._bucket(chunk, np.random.default_rng([self.seed, epoch, len(batches), 2]))
                    chunk, pairs_in_chunk = [], 0
            self._layouts[epoch] = batches
        return self._layouts[epoch]

    def _bucket(self, groups: list[int], rng: np.random.Generator) -> list[list[int]]:
        """Lay out a chunk of groups in micro-batches: longest group first when bucketing (so a
        batch holds answers of similar length and little padding), then the batches shuffled."""
        if self.bucket_batches > 1:
            groups = sorted(groups, key=lambda g: -self.group_len[g])
        batches, current = [], []
        for g in groups:
            members = self.groups[g]
            if current and len(current) + len(members) > self.batch_size:
                batches.append(current)
                current = []
            for i in members:
                current.append(i)
                if len(current) == self.batch_size:
                    batches.append(current)
                    current = []
        if current:
            batches.append(current)
        return [batches[i] for i in rng.permutation(len(batches))] if self.bucket_batches > 1 else batches

    def steps_per_epoch(self, micro_per_step: int) -> int:
        n = len(self.layout(0))
        if n < micro_per_step:
            raise DataError(f"there are {len(self.pairs)} training pairs in {n} micro-batches of up to "
                            f"{self.batch_size}, fewer than one optimizer step's {micro_per_step} "
                            "(grad_accum x processes); lower batch_size or grad_accum")
        return n // micro_per_step

    def indices(self, step: int, n_micro: int, rank: int, world: int) -> list[list[int]]:
        """The pair indices of this process's micro-batches at optimizer step `step`."""
        return step_indices(self, step, n_micro, rank, world)

    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        return [self.collate(b) for b in self.indices(step, n_micro, rank, world)]

    def collate(self, indices: list[int]) -> dict:
        """The micro-batch of pairs `indices`; "index" (B,) holds their positions in the data
        (where per-pair values such as DPO's cached reference log-probs are looked up)."""
        collate = collate_shared if self.shared_prompts else collate_unique if self.unique_rows else collate_pairs
        batch = collate([self.encoded[i] for i in indices], self.pad_id, self.pad_multiple)
        batch["index"] = torch.as_tensor(indices, dtype=torch.long)
        if self.margins is not None:
            batch["margin"] = torch.tensor([self.margins[i] for i in indices], dtype=torch.float32)  # (B,)
        return batch
