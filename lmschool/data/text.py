"""Reading text data: plain UTF-8 files, or rows with a "text" column, as lines or as documents.

Plain text files separate documents with a line holding exactly `<|endoftext|>` (the school
world's corpus does); a file without such lines is one document. In `{"text": ...}` JSONL, and in
every other data source lmschool reads (JSON, Parquet, CSV, a `datasets.save_to_disk` directory,
`hf:NAME[:CONFIG][@SPLIT]`; lmschool/data/sources.py), each row's "text" is a document: TRL's
language-modelling format. Every problem is a DataError naming the file and line (or row), and
what would be right.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from lmschool.data.sources import HF_PREFIX, read_rows, split_suffix
from lmschool.errors import DataError
from lmschool.tokenizer import ENDOFTEXT

TEXT_ROW = 'expected rows with a "text" string'


def is_row_source(path: Path | str) -> bool:
    """A source of rows (JSON, Parquet, CSV, a saved dataset directory, hf:NAME) rather than a text
    file or {"text"} JSONL, which are read line by line here."""
    name = str(path)
    if name.startswith(HF_PREFIX):
        return True
    path = Path(path)
    if split_suffix(path)[0].is_dir():   # a saved dataset: DIR or DIR@SPLIT
        return True
    return path.suffix.lower() in (".json", ".parquet", ".csv") and path.is_file()


def _row_texts(path: Path | str) -> Iterator[str]:
    for where, row in read_rows(path, TEXT_ROW):
        text = row.get("text")
        if not isinstance(text, str):
            found = ", ".join(sorted(row)) or "none"
            raise DataError(f'{where}: expected a "text" string (TRL\'s language-modelling format), got '
                            f"{'a ' + type(text).__name__ if 'text' in row else 'no text column'} "
                            f"(columns: {found}); name the text column \"text\"")
        yield text


def iter_texts(path: Path) -> Iterator[str]:
    """The texts of one data file: its lines (plain text) or its "text" fields (.jsonl).

    Raises DataError naming the file (and line) if it is missing, not UTF-8 or holds bad JSON.
    A row source (is_row_source) gives the "text" of each row.
    """
    if is_row_source(path):
        yield from _row_texts(path)
        return
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; "
                        "expected a UTF-8 text file or a .jsonl file")
    is_jsonl = path.suffix == ".jsonl"
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}); convert the file to UTF-8, "
                                "e.g. `iconv -f latin1 -t utf-8`") from None
            if not is_jsonl:
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); "
                                'expected one {"text": ...} object per line') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{line_number}: expected an object with a "text" string, '
                                f"got {line.strip():.80}")
            yield record["text"]


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one data file (see the module docstring); empty documents are skipped."""
    if is_row_source(path):
        yield from (text for text in _row_texts(path) if text.strip())
        return
    path = Path(path)
    if path.suffix == ".jsonl":
        for text in iter_texts(path):
            if text.strip():
                yield text
        return
    lines: list[str] = []
    for line in iter_texts(path):
        if line.rstrip("\r\n") == ENDOFTEXT:
            if "".join(lines).strip():
                yield "".join(lines)
            lines = []
        else:
            lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines)


def check_data(paths: list[Path]) -> int:
    """Read every file once; return the total size of its texts in UTF-8 bytes. A file with no
    text (empty, or only whitespace) is an error."""
    total_bytes = 0
    for path in paths:
        has_text = False
        for text in iter_texts(path):
            total_bytes += len(text.encode("utf-8"))
            has_text = has_text or bool(text.strip())
        if not has_text:
            raise DataError(f"{path}: holds no text; give a file with the training text")
    return total_bytes


def text_fingerprint(paths: list[Path]) -> str:
    """A hash of the data, in order: a file's bytes as they are, a row source's texts (for --resume
    to refuse other data than the run started with)."""
    h = hashlib.sha256()
    for path in paths:
        if is_row_source(path):
            for text in _row_texts(path):
                h.update(text.encode("utf-8"))
                h.update(b"\0")
        else:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]
