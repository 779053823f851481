"""Stage 3 data for KTO: unpaired answers, each marked desirable (thumbs up) or not (thumbs down).

One JSON object per line (blank lines skipped), TRL's "unpaired preference" form:

    {"prompt": "..." | [messages ending with a user turn],
     "completion": "..." | [{"role": "assistant", "content": "..."}], "label": true | false}

A preference-pair line ({"prompt", "chosen", "rejected"}, see lmschool/data/preference.py) is read
as two answers, the chosen one desirable and the rejected one not (TRL's
`unpair_preference_dataset`), so KTO can run on the same pairs as DPO. Other keys are kept in
`meta` (with "where" = "file:line"); `split` works as for pairs. Errors name file:line: a missing
field, an empty answer, a label that is not true/false, and (`check_labels`) data with only one
label class, from which KTO cannot learn (both terms of its loss are needed).

Batches (`UnpairedBatches`), as a pure function of the step: B answers per micro-batch, rows
0..B-1 the answers themselves and rows B..2B-1 each prompt with the answer of its *KL partner*,
another example fixed once for the whole run (a seeded cyclic shift of a permutation, so no
example is its own partner). Those mismatched rows give KTO's KL reference point
(`losses.preference.kto_kl`); because the partners are fixed, the reference model's log-probs of
both kinds of row can be cached once, like DPO's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmschool.data.preference import (check_fields, collate_rows, encode_response, fingerprint,
                                      fit_to_length, parse_pair, read_answer, read_meta, read_prompt,
                                      step_indices)
from lmschool.data.sources import read_rows
from lmschool.errors import DataError

FORMAT_HINT = ('expected {"prompt": "..." | [messages ending with a user turn], "completion": "..." | '
               '[{"role": "assistant", "content": ...}], "label": true | false} (or a preference pair '
               '{"prompt", "chosen", "rejected"})')


@dataclass
class Completion:
    """One answer to a prompt and whether it is desirable."""

    prompt: list[dict]
    """Chat messages ending with a user turn."""
    completion: str
    """The assistant answer (text, no special tokens)."""
    label: bool
    """True: desirable (thumbs up); False: undesirable."""
    meta: dict
    """Every other key of the line and "where" (file:line, plus " (chosen)" / " (rejected)" for pairs)."""

    @property
    def split(self) -> str:
        return self.meta.get("split") or "train"


def parse_completion(row: dict, where: str) -> Completion:
    """Check one {"prompt", "completion", "label"} line (see the module docstring)."""
    fields = ("prompt", "completion", "label")
    check_fields(row, where, fields, FORMAT_HINT)
    prompt = read_prompt(row["prompt"], where, "the completion answers")
    completion = read_answer(row["completion"], where, "completion")
    if not isinstance(row["label"], bool):
        raise DataError(f"{where}: \"label\" is {row['label']!r}; it must be true (desirable) or false "
                        "(undesirable)")
    return Completion(prompt, completion, row["label"], read_meta(row, where, fields))


def read_unpaired(path: str | Path, *, split: str | None = None) -> list[Completion]:
    """Every answer of an unpaired JSONL file (pair lines give two), or those of one split."""
    out, rows = [], 0
    for where, row in read_rows(path, FORMAT_HINT):
        rows += 1
        if "completion" not in row and "chosen" in row:
            pair = parse_pair(row, where)
            meta = dict(pair.meta)
            items = [Completion(pair.prompt, pair.chosen, True, {**meta, "where": f"{where} (chosen)"}),
                     Completion(pair.prompt, pair.rejected, False, {**meta, "where": f"{where} (rejected)"})]
        else:
            items = [parse_completion(row, where)]
        out += [c for c in items if split is None or c.split == split]
    if rows == 0:
        raise DataError(f"{path}: holds no answers; {FORMAT_HINT}, one per line")
    return out


def check_labels(examples: list[Completion], path) -> tuple[int, int]:
    """(desirable, undesirable) counts; a DataError unless both are present."""
    good = sum(c.label for c in examples)
    bad = len(examples) - good
    if good == 0 or bad == 0:
        only = "desirable (true)" if good else "undesirable (false)"
        raise DataError(f"{path}: all {len(examples)} training answers are labelled {only}; KTO needs "
                        "both desirable and undesirable answers (its loss compares each with the "
                        "policy's average drift); add answers of the other kind")
    return good, bad


def kl_partners(n: int, seed: int) -> np.ndarray:
    """partner[i] != i for n >= 2: a seeded permutation, each element paired with the next one."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


class UnpairedBatches:
    """KTO micro-batches: `micro_batches(step, ...)` is deterministic in the step.

    Each batch: input_ids, labels (2B, T), response_len (2B,) as `collate_rows` makes them (rows
    0..B-1 the answers, B..2B-1 the KL rows), "index" (B,) the examples' indices, "label" (B,)
    bool, num_targets = B, num_tokens. Each epoch is a seeded permutation cut into micro-batches of
    batch_size; an optimizer step takes the next n_micro x world of them (rank r the r-th n_micro).
    """

    def __init__(self, examples: list[Completion], tokenizer, batch_size: int, max_len: int, *,
                 seed: int = 0, pad_multiple: int = 8):
        if len(examples) < 2:
            raise DataError(f"there are {len(examples)} training answers; KTO needs at least two")
        self.examples, self.batch_size, self.seed, self.pad_multiple = examples, batch_size, seed, pad_multiple
        self.pad_id = tokenizer.fill_id
        self.partner = kl_partners(len(examples), seed)
        self.rows = [fit_to_length(*encode_response(tokenizer, c.prompt, c.completion), max_len, c.meta["where"])
                     for c in examples]
        self.kl_rows = [fit_to_length(*encode_response(tokenizer, c.prompt, examples[int(j)].completion), max_len,
                             c.meta["where"] + " (KL row)") for c, j in zip(examples, self.partner)]

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """A hash of the encoded answers, their KL rows and labels, for RUN/data.json."""
        return fingerprint(ids + [-1, p, -2] + kl + [-1, kp, -3, int(e.label)]
                           for (ids, p), (kl, kp), e in zip(self.rows, self.kl_rows, self.examples))

    def length(self, i: int) -> int:
        """Tokens in the longer row of example i (its answer or its KL row)."""
        return max(len(self.rows[i][0]), len(self.kl_rows[i][0]))

    sort_key = length   # a pass in order of length (the reference's) sorts by this

    def layout(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def steps_per_epoch(self, micro_per_step: int) -> int:
        n = len(self.layout(0))
        if n < micro_per_step:
            raise DataError(f"there are {len(self.examples)} training answers in {n} micro-batches of up "
                            f"to {self.batch_size}, fewer than one optimizer step's {micro_per_step}; "
                            "lower batch_size or grad_accum")
        return n // micro_per_step

    def collate(self, indices: list[int]) -> dict:
        """The micro-batch of examples `indices` (see the class docstring)."""
        batch = collate_rows([self.rows[i] for i in indices] + [self.kl_rows[i] for i in indices],
                             self.pad_id, self.pad_multiple)
        batch.update(index=torch.as_tensor(indices, dtype=torch.long),
                     label=torch.as_tensor([self.examples[i].label for i in indices], dtype=torch.bool),
                     num_targets=len(indices))
        return batch

    def indices(self, step: int, n_micro: int, rank: int, world: int) -> list[list[int]]:
        """The example indices of this process's micro-batches at optimizer step `step`."""
        return step_indices(self, step, n_micro, rank, world)

    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        return [self.collate(b) for b in self.indices(step, n_micro, rank, world)]
