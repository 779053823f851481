"""Stage 1 data: documents -> token ids in flat numpy memmaps, and batches of windows from them.

`prepare` tokenises every document, appends the end-of-document id, splits documents into
train and validation (a seeded choice of whole documents, so no document is in both; a corpus of
one document is split by position instead), and writes `train.bin` / `val.bin` (uint16 when the
vocabulary fits, else uint32) and `meta.json` with the counts — including the UTF-8 byte count
of each split, which turns a loss in nats per token into bits per byte.

`TokenWindows` serves training batches as a pure function of the step: a seeded random choice
of windows of `seq_len + 1` tokens, so a resumed run sees exactly the batches it would have,
and the global batch is the same however it is split into micro-batches and processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmschool.data.text import read_documents
from lmschool.errors import DataError


@dataclass
class Split:
    tokens: int
    bytes: int
    documents: int


def prepare(paths: list[Path], tokenizer, out_dir: Path, *, val_fraction: float = 0.05, seed: int = 0,
            chunk: int = 2048) -> dict:
    """Tokenise `paths` into out_dir/{train,val}.bin; return (and write) meta.json."""
    docs: list[str] = []
    for path in paths:
        before = len(docs)
        docs.extend(read_documents(path))
        if len(docs) == before:
            raise DataError(f"{path}: holds no text; give a UTF-8 text file or {{\"text\": ...}} JSONL")
    eos = tokenizer.eos_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-document token (<|endoftext|> or its eos_token)")
    ids: list[list[int]] = []
    for i in range(0, len(docs), chunk):
        ids.extend(tokenizer.encode_batch(docs[i:i + chunk], add_special_tokens=False))
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    out_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    if len(docs) >= 2:
        n_val = max(1, int(round(len(docs) * val_fraction)))
        val_set = set(rng.choice(len(docs), size=n_val, replace=False).tolist())
        parts = {"train": [i for i in range(len(docs)) if i not in val_set], "val": sorted(val_set)}
        splits = {}
        for name, idx in parts.items():
            arr = np.fromiter((t for i in idx for t in (*ids[i], eos)), dtype=dtype)
            arr.tofile(out_dir / f"{name}.bin")
            nbytes = sum(len(docs[i].encode("utf-8")) for i in idx)
            splits[name] = Split(int(arr.size), nbytes, len(idx))
    else:  # one long document: the last val_fraction of its tokens validates
        arr = np.array(ids[0] + [eos], dtype=dtype)
        cut = int(arr.size * (1 - val_fraction))
        text_bytes = len(docs[0].encode("utf-8"))
        arr[:cut].tofile(out_dir / "train.bin")
        arr[cut:].tofile(out_dir / "val.bin")
        splits = {"train": Split(cut, int(text_bytes * cut / arr.size), 1),
                  "val": Split(int(arr.size - cut), int(text_bytes * (arr.size - cut) / arr.size), 1)}
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "eos_id": eos,
            "files": [str(p) for p in paths], "seed": seed, "val_fraction": val_fraction,
            **{name: vars(s) for name, s in splits.items()}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_tokens(out_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((out_dir / "meta.json").read_text())
    return np.memmap(out_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")


class TokenWindows:
    """Random windows of a token array; `micro_batches(step, ...)` is deterministic in the step."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        if tokens.size < seq_len + 2:
            raise DataError(f"the training split has {tokens.size} tokens, fewer than one window of "
                            f"seq_len={seq_len} + 1; give more text or lower seq_len")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def window_starts(self, step: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.tokens.size - self.seq_len - 1, size=n)

    def make_batch(self, starts: np.ndarray) -> dict:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]          # (B, T+1)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))             # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]                                      # (B, T) each
        return {"input_ids": x, "labels": y, "num_targets": y.numel(), "num_tokens": x.numel()}

    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        B = self.batch_size
        starts = self.window_starts(step, B * n_micro * world)                  # the global batch
        mine = starts[rank * B * n_micro:(rank + 1) * B * n_micro]
        return [self.make_batch(mine[m * B:(m + 1) * B]) for m in range(n_micro)]


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None):
    """Consecutive non-overlapping windows covering the split (up to max_tokens), for evaluation."""
    n = tokens.size - 1                                  # targets available
    if max_tokens:
        n = min(n, max_tokens)
    length = min(seq_len, n)
    if length < 1:
        return
    starts = np.arange(0, n - length + 1, length)
    for i in range(0, starts.size, batch_size):
        idx = starts[i:i + batch_size, None] + np.arange(length + 1)[None, :]  # (B, T+1)
        chunk = torch.from_numpy(tokens[idx].astype(np.int64))
        yield {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}
