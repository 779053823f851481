"""JSON Lines input, read one way everywhere: each row with its `file:line`, and the checks every
conversation gets, so that a bad line is one clear error naming where it is and what was expected.

    for where, row in read_jsonl("data.jsonl", 'expected {"messages": [...]}'):
        messages = check_conversation(row["messages"], where)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmschool.errors import DataError, UserError
from lmschool.tokenizer import validate_messages


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSONL file; where = "file:line".

    Raises DataError for a missing file, bad UTF-8, bad JSON, or a line that is not an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; {what}, one per line")
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, 1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {what}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: {what}, got {line.strip():.80}")
            yield where, row


def check_conversation(messages: object, where: str, need_assistant: bool = True) -> list[dict]:
    """validate_messages plus what training needs: no empty content, at least one assistant turn."""
    try:
        validate_messages(messages)
    except UserError as e:
        raise DataError(f"{where}: {e}") from None
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise DataError(f"{where}: message {i} ({m['role']}) has empty content; give it text or "
                            "remove the message")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to "
                        "learn from it; add the answer as {\"role\": \"assistant\", ...}")
    return messages
