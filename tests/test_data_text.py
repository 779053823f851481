"""Text data (lmschool/data/text.py): documents from plain text and JSONL, and the one-line errors
that name the file and line."""

import pytest

from lmschool.data.text import check_data, iter_texts, read_documents
from lmschool.errors import DataError


def test_plain_text_documents_split_on_endoftext_lines(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("Mia lives in Oakford.\nShe has a cat.\n<|endoftext|>\n\n<|endoftext|>\nTom is nine.\n")
    assert list(read_documents(f)) == ["Mia lives in Oakford.\nShe has a cat.\n", "Tom is nine.\n"]


def test_a_file_without_separators_is_one_document(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\ntwo <|endoftext|> inline is text\n")
    assert list(read_documents(f)) == ["one\ntwo <|endoftext|> inline is text\n"]


def test_jsonl_texts_are_documents_blank_lines_and_empty_texts_skipped(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "a b"}\n\n{"text": "  "}\n{"text": "c", "id": 3}\n')
    assert list(read_documents(f)) == ["a b", "c"]
    assert check_data([f]) == len("a b") + len("  ") + len("c")   # UTF-8 bytes of every text


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"ok\n\xe9t\xe9\n", r"bad.txt:2: not UTF-8 text \(byte 0xe9 at column 1\)"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", b'{"text": "a"}\n["a"]\n', r'bad.jsonl:2: expected an object with a "text" string'),
    ("bad.jsonl", b'{"body": "a"}\n', r'bad.jsonl:1: expected an object with a "text" string'),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(iter_texts(f))


def test_missing_directory_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        check_data([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="a directory, but not one written by `datasets.save_to_disk`"):
        check_data([tmp_path])
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(DataError, match="empty.txt: holds no text"):
        check_data([tmp_path / "empty.txt"])
