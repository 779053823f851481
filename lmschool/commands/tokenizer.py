"""`lmschool tokenizer train`: train a byte-level BPE tokenizer on text files and save it.

    lmschool tokenizer train --data corpus.txt --vocab-size 4096 --out runs/tokenizer
    lmschool tokenizer train --data corpus.txt --byte-level --out runs/bytes

Data: plain UTF-8 text (documents separated by lines holding exactly `<|endoftext|>`), or a
`.jsonl` file with one {"text": ...} object per line. Every file is checked before training, so a
bad file fails fast and names itself (and the line). The tokenizer is written to a temporary
directory beside --out and renamed into place: --out is complete or untouched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmschool.data.text import check_data, iter_texts
from lmschool.errors import UserError
from lmschool.files import atomic_dir, check_output_dir
from lmschool.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a tokenizer; save it as a Hugging Face tokenizer directory")
    train.add_argument("--data", type=Path, action="append", required=True, metavar="FILE",
                       help="text file, or rows with a \"text\" column (JSONL, JSON, Parquet, CSV, a saved "
                            "dataset DIR, hf:NAME); repeat for more files")
    train.add_argument("--vocab-size", type=int, metavar="N",
                       help=f"tokens in all, at least {256 + len(SPECIAL_TOKENS)} (unless --byte-level)")
    train.add_argument("--byte-level", action="store_true",
                       help=f"no merges: 256 bytes + {len(SPECIAL_TOKENS)} special tokens (character level)")
    train.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")
    train.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def count_tokens(tokenizer: Tokenizer, paths: list[Path], batch_size: int = 4096) -> int:
    total, batch = 0, []
    for text in (text for path in paths for text in iter_texts(path)):
        batch.append(text)
        if len(batch) == batch_size:
            total += sum(map(len, tokenizer.encode_batch(batch)))
            batch = []
    return total + sum(map(len, tokenizer.encode_batch(batch)))


def run(args: argparse.Namespace) -> int:
    if args.byte_level and args.vocab_size is not None:
        raise UserError(f"--byte-level has exactly {len(SPECIAL_TOKENS) + 256} tokens; drop --vocab-size")
    if not args.byte_level and args.vocab_size is None:
        raise UserError("--vocab-size N is required (or --byte-level for bytes only, no merges)")
    check_output_dir(args.out, "tokenizer", args.force)   # before the training, not after
    data_bytes = check_data(args.data)

    started = time.perf_counter()
    texts = (text for path in args.data for text in iter_texts(path))
    tokenizer = train_tokenizer(texts, args.vocab_size, args.byte_level, show_progress=sys.stderr.isatty())
    seconds = time.perf_counter() - started

    n_tokens = count_tokens(tokenizer, args.data)
    with atomic_dir(args.out) as staging:  # the old tokenizer stays until the new one is complete
        tokenizer.save(staging)
    kind = "byte-level" if args.byte_level else "byte-level BPE"
    print(f"{kind} tokenizer: {tokenizer.vocab_size} tokens ({len(SPECIAL_TOKENS)} special), trained in "
          f"{seconds:.1f}s on {data_bytes / 1e6:.2f} MB from {len(args.data)} file(s)")
    if args.vocab_size and tokenizer.vocab_size < args.vocab_size:
        print(f"(asked for {args.vocab_size}: the data had no more pairs of tokens to merge)")
    print(f"compression: {data_bytes / max(n_tokens, 1):.2f} bytes per token ({n_tokens:,} tokens)")
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json")
    return 0
