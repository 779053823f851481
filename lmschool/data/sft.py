"""Stage 2 data: chat JSONL -> token ids and labels, and batches of them as a pure function of the step.

Formats, one JSON object per line (blank lines skipped, other keys such as "category" ignored):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "..." | [messages], "completion": "..." | [assistant messages]}

Every conversation is rendered by the tokenizer's chat template (`Tokenizer.render`,
`render_prompt_completion`: the checkpoint's own, or lmschool's ChatML), never here. Its loss mask
(`loss_on="assistant"`, the default) covers each assistant turn's answer and its end-of-turn token
(`<|im_end|>` in ChatML), so the model learns to stop; `loss_on="all"`
trains on every token. An example of L tokens gives L-1 next-token positions; tokens after the last
trained one (the "\\n" that closes the last turn) teach nothing and are cut off.

Too long for the context (more than `max_seq_len` positions, i.e. `max_seq_len + 1` tokens):

    truncation="drop"      skip it and count it (the default: a cut answer would teach the model
                           to stop mid-sentence, or never learn to stop)
    truncation="truncate"  keep its first max_seq_len + 1 tokens; dropped (and counted) if no
                           trained token is left
    truncation="error"     stop with `file:line: ... is N tokens ...`

Batches (`SFTBatches`), as a pure function of the step (as `TokenWindows` is), so resuming,
accumulation and DDP see exactly the same examples. Each epoch is a seeded permutation of the
training examples. Two layouts:

    padded (default): batch_size conversations per micro-batch, right-padded to the longest
        (rounded up to `pad_multiple`); causal attention needs no mask, since a real token only
        attends to earlier, real tokens. Length bucketing: each run of `bucket_batches` global
        batches of the epoch is sorted by length, cut into batches and the batches shuffled, so a
        batch holds conversations of similar length and little padding. An epoch is N // G
        steps (G = global batch); each epoch's permutation leaves out another N mod G.
    packed (packing=true): the epoch's conversations are packed (best-fit decreasing, 1024 at a
        time) into rows of up to max_seq_len tokens, and batch_size counts rows, as in TRL. Each
        conversation has its own position ids (0, 1, ...) and segment id, from which the model
        builds a mask that lets it attend only to itself, so packing changes no conversation's
        loss (tested against padding and against one at a time). Steps per epoch come from
        epoch 0's row count.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmschool.data.jsonl import check_conversation
from lmschool.data.sources import read_rows
from lmschool.errors import DataError, UserError
from lmschool.losses.lm import IGNORE

FORMAT_HINT = ('expected {"messages": [{"role": ..., "content": ...}, ...]} or '
               '{"prompt": ..., "completion": ...}')


# ---- reading ----------------------------------------------------------------------------------

def render_row(row: dict, where: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one data row in either format, through the tokenizer's chat template."""
    try:
        return _render_row(row, where, tokenizer)
    except UserError as e:   # the chat template refused it: name the row
        raise DataError(f"{where}: {e}") from None


def _render_row(row: dict, where: str, tokenizer) -> tuple[list[int], list[int]]:
    if "messages" in row:
        messages = check_conversation(row["messages"], where)
        return tokenizer.render(messages)
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion_messages = ([{"role": "assistant", "content": completion}]
                               if isinstance(completion, str) else completion)
        check_conversation(prompt_messages, where + " (prompt)", need_assistant=False)
        check_conversation(completion_messages, where + " (completion)")
        if any(m["role"] != "assistant" for m in completion_messages):
            raise DataError(f"{where}: the completion may hold only assistant messages; put the other "
                            "turns in the prompt")
        return tokenizer.render_prompt_completion(prompt_messages, completion_messages)
    raise DataError(f"{where}: {FORMAT_HINT}; this line has keys {sorted(row)}")


# ---- examples ---------------------------------------------------------------------------------

@dataclass
class Example:
    """One training example: `input_ids` (L,) and `labels` (L,), labels[t] = the token after t, or
    IGNORE where no loss is taken. `where` is its file:line."""

    input_ids: np.ndarray
    labels: np.ndarray
    where: str

    def __len__(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class LoadStats:
    """What reading the data did, for summary.json."""

    rows: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    first_dropped: list[str] = field(default_factory=list)


def make_example(ids: list[int], mask: list[int], where: str, loss_on: str = "assistant") -> Example | None:
    """Shift (ids, mask) into inputs and labels; None if nothing is trained."""
    mask = [1] * len(ids) if loss_on == "all" else mask
    last = max((i for i, m in enumerate(mask) if m), default=0)
    if last == 0:  # the first token is never a target
        return None
    ids_arr = np.asarray(ids[:last + 1], dtype=np.int32)                   # (L+1,), int32 to save memory
    mask_arr = np.asarray(mask[1:last + 1], dtype=bool)                     # (L,)
    labels = np.where(mask_arr, ids_arr[1:], IGNORE).astype(np.int32)       # (L,)
    return Example(ids_arr[:-1], labels, where)


def load_examples(paths: list[Path], tokenizer, max_seq_len: int, *, loss_on: str = "assistant",
                  truncation: str = "drop") -> tuple[list[Example], LoadStats]:
    """Read, check and render every row of `paths` (see the module docstring for the rules)."""
    examples, stats = [], LoadStats()
    for path in paths:
        before = stats.rows
        for where, row in read_rows(path, FORMAT_HINT):
            stats.rows += 1
            ids, mask = render_row(row, where, tokenizer)
            example = make_example(ids, mask, where, loss_on)    # never None: an answer is trained
            if len(example) > max_seq_len:
                if truncation == "error":
                    raise DataError(f"{where}: the conversation is {len(example) + 1} tokens (up to the end of "
                                    f"its last answer), more than max_seq_len + 1 = {max_seq_len + 1}; shorten "
                                    "it, raise max_seq_len, or set truncation=drop (skip and count) or "
                                    "truncation=truncate (keep the start)")
                if truncation == "truncate":
                    example = make_example(ids[:max_seq_len + 1], mask[:max_seq_len + 1], where, loss_on)
                if truncation == "drop" or example is None:
                    _drop(stats, where)
                    continue
                stats.truncated += 1
            examples.append(example)
        if stats.rows == before:
            raise DataError(f"{path}: holds no conversations; {FORMAT_HINT}, one per line")
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"no conversation fits the context of max_seq_len={max_seq_len} positions "
                        f"({stats.dropped_too_long} dropped as too long, the first at {stats.first_dropped[0]}); "
                        "raise max_seq_len or set truncation=truncate")
    return examples, stats


def _drop(stats: LoadStats, where: str) -> None:
    stats.dropped_too_long += 1
    if len(stats.first_dropped) < 5:
        stats.first_dropped.append(where)


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded choice of round(N * val_fraction) examples (at least one if val_fraction > 0)
    held out for validation; the rest train. Order is kept within each part."""
    n = len(examples)
    if val_fraction <= 0 or n < 2:
        return examples, []
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    val = set(np.random.default_rng([seed, 1]).choice(n, size=n_val, replace=False).tolist())
    return ([e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val])


def fingerprint(examples: list[Example]) -> str:
    """A hash of the examples' tokens and labels: a resumed run checks its data did not change."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.input_ids.astype(np.int64).tobytes())
        h.update(e.labels.astype(np.int64).tobytes())
    return h.hexdigest()[:16]


# ---- collating --------------------------------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_batch(examples: list[Example], pad_id: int, pad_multiple: int = 1) -> dict:
    """Right-padded rows, one example each. Returns input_ids, labels (B, T), num_targets,
    num_tokens (real tokens). Causal attention needs no mask: a real token never sees the padding."""
    B, T = len(examples), _round_up(max(len(e) for e in examples), pad_multiple)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        input_ids[i, :n] = torch.from_numpy(e.input_ids)
        labels[i, :n] = torch.from_numpy(e.labels)
    return {"input_ids": input_ids, "labels": labels,
            "num_targets": int((labels != IGNORE).sum()), "num_tokens": sum(len(e) for e in examples)}


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices into rows of at most `capacity`: longest first, each into the row whose
    free space fits it most tightly (a new row if none does). Rows in order of creation."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []                       # (free space, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (space - lengths[i], r))
    return rows


def pack_batch(examples: list[Example], rows: list[list[int]], pad_id: int, pad_multiple: int = 1) -> dict:
    """Rows of packed examples (`rows`: indices into `examples`, one list per row). Returns
    input_ids, labels, position_ids (restarting at 0 for each example), segment_ids (the example's
    index in `examples`, -1 at padding) (R, T), num_targets, num_tokens (real tokens). The model
    builds the attention mask from segment_ids (`lmschool.model.segment_mask`)."""
    fill = max(sum(len(examples[i]) for i in row) for row in rows)
    R, T = len(rows), _round_up(fill, pad_multiple)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e, n = examples[i], len(examples[i])
            input_ids[r, start:start + n] = torch.from_numpy(e.input_ids)
            labels[r, start:start + n] = torch.from_numpy(e.labels)
            position_ids[r, start:start + n] = torch.arange(n)
            segment_ids[r, start:start + n] = i
            start += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "segment_ids": segment_ids,
            "num_targets": int((labels != IGNORE).sum()),
            "num_tokens": sum(len(examples[i]) for row in rows for i in row)}


# ---- batches as a pure function of the step ---------------------------------------------------

class SFTBatches:
    """Training batches of SFT examples; `micro_batches(step, ...)` is deterministic in the step.

    A batch is made of units: one example each when padding, one row of packed examples each when
    packing; batch_size counts units. See the module docstring for epochs, bucketing and packing.
    """

    PACK_CHUNK = 1024  # examples packed together: rows differ from epoch to epoch

    def __init__(self, examples: list[Example], batch_size: int, *, seed: int = 0, packing: bool = False,
                 max_seq_len: int | None = None, bucket_batches: int = 32, pad_id: int = 0,
                 pad_multiple: int = 8):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.packing, self.bucket_batches = packing, bucket_batches
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.lengths = np.array([len(e) for e in examples])
        self.max_seq_len = max_seq_len or int(self.lengths.max())
        if self.lengths.max() > self.max_seq_len:
            raise ValueError(f"an example is {self.lengths.max()} tokens, longer than max_seq_len={self.max_seq_len}")
        self._cache: dict[tuple, object] = {}

    def _cached(self, key: tuple, make):
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of the examples for `epoch`."""
        return self._cached(("order", epoch),
                            lambda: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Packing: the epoch's permutation, packed chunk by chunk into rows, rows shuffled."""
        def make():
            order, rows = self.epoch_order(epoch), []
            for start in range(0, len(order), self.PACK_CHUNK):
                chunk = order[start:start + self.PACK_CHUNK]
                rows += [[int(chunk[i]) for i in row]
                         for row in best_fit_decreasing(self.lengths[chunk].tolist(), self.max_seq_len)]
            shuffle = np.random.default_rng([self.seed, epoch, 3]).permutation(len(rows))
            return [rows[i] for i in shuffle]
        return self._cached(("rows", epoch), make)

    def steps_per_epoch(self, global_batch: int) -> int:
        """Optimizer steps in an epoch of global batches of `global_batch` units. Packing: from the
        rows of epoch 0 (other epochs pack into about as many; one with fewer rows repeats its first)."""
        units = len(self.epoch_rows(0)) if self.packing else len(self.examples)
        if units < global_batch:
            what = (f"{units} packed rows of {self.max_seq_len} tokens" if self.packing
                    else f"{units} training conversations")
            raise DataError(f"there are {what}, fewer than one global batch of {global_batch} "
                            "(batch_size x grad_accum x processes); lower batch_size")
        return units // global_batch

    def global_batch(self, step: int, global_batch: int) -> list[list[int]]:
        """The units of optimizer step `step`: lists of example indices (one per unit)."""
        G = global_batch
        per_epoch = self.steps_per_epoch(G)
        epoch, j = divmod(step, per_epoch)
        if self.packing:
            rows = self.epoch_rows(epoch)
            return [rows[(j * G + k) % len(rows)] for k in range(G)]
        K = self.bucket_batches
        chunk, k = divmod(j, K)

        def make():  # sort the chunk's examples by length, cut into batches, shuffle the batches
            first = chunk * K
            n_batches = min(K, per_epoch - first)
            idx = self.epoch_order(epoch)[first * G:(first + n_batches) * G]
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]           # (n_batches * G,)
            order = np.random.default_rng([self.seed, epoch, chunk, 2]).permutation(n_batches)
            return idx.reshape(n_batches, G)[order]
        return [[int(i)] for i in self._cached(("chunk", epoch, chunk, G), make)[k]]

    def collate(self, units: list[list[int]]) -> dict:
        examples = [self.examples[i] for unit in units for i in unit]
        if self.packing:
            rows, start = [], 0
            for unit in units:
                rows.append(list(range(start, start + len(unit))))
                start += len(unit)
            return pack_batch(examples, rows, self.pad_id, self.pad_multiple)
        return pad_batch(examples, self.pad_id, self.pad_multiple)

    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        B = self.batch_size
        units = self.global_batch(step, B * n_micro * world)
        mine = units[rank * B * n_micro:(rank + 1) * B * n_micro]
        return [self.collate(mine[m * B:(m + 1) * B]) for m in range(n_micro)]


class WithReplay:
    """SFT batches plus, in every step, one micro-batch of `replay` windows of pre-training text.

    Fine-tuning on answers alone makes a small model forget facts it read but is never asked about
    in SFT (school world, L4-256: the pre-trained model completed 32% of held-out pupils' facts;
    after SFT it answered 13% of them right, with replay 33%). A little of the pre-training
    objective in every step keeps them (InstructGPT's "pretraining mix"). The
    trainer weighs micro-batches by their targets, so the loss is the mean over SFT answer tokens
    and replay tokens alike. Both sources are pure functions of the step."""

    def __init__(self, sft: SFTBatches, replay):
        self.sft, self.replay = sft, replay

    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        return self.sft.micro_batches(step, n_micro, rank, world) + self.replay.micro_batches(step, 1, rank, world)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[dict]:
    """Padded batches of `examples` in order of length (little padding), for held-out loss."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for i in range(0, len(order), batch_size):
        yield pad_batch([examples[j] for j in order[i:i + batch_size]], pad_id)
