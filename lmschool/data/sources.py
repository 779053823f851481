"""Data sources: every --data / --prompts / --eval row, whatever holds it, as (where, row) pairs.

    for where, row in read_rows("prefs.parquet", 'expected {"prompt", "chosen", "rejected"}'):
        ...   # where = "prefs.parquet:row 3"; the same validators as for JSONL follow

What a source may be (by its name):

    FILE.jsonl (or any other name)   JSON Lines, one object per line          where = FILE:LINE
    FILE.json                        a JSON list of objects (or JSON Lines)   where = FILE:row N
    FILE.parquet                     Parquet (pyarrow)                        where = FILE:row N
    FILE.csv                         CSV with a header row (stdlib); a cell of a conversational column
                                     (messages, prompt, chosen, rejected, completion) holding a JSON
                                     list of messages is read as that list; label true/false as a bool
                                                                              where = FILE:line L
    DIR                              a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict:
                                     its "train" split, or DIR@SPLIT)         where = DIR:row N
    hf:NAME[:CONFIG][@SPLIT]         `datasets.load_dataset(NAME, CONFIG, split=SPLIT or "train")`
                                                                              where = hf:...:row N

Rows are TRL's standard or conversational formats as they are; Arrow's nulls (a column some rows
lack) are dropped, so a missing field reads as missing. `pyarrow` and `datasets` are optional
(`pip install 'lmschool[data]'`): imported only for a source that needs them, and their absence is
one line naming the extra. An unreachable hub name is one line too (HF_DATASETS_OFFLINE=1, no
network, or no such dataset), as is anything else that cannot be read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from lmschool.data.jsonl import read_jsonl
from lmschool.errors import DataError, UserError

HF_PREFIX = "hf:"
CONVERSATIONAL = ("messages", "prompt", "chosen", "rejected", "completion")
EXTRA = "pip install 'lmschool[data]'"


def read_rows(source: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of `source` (see the module docstring); `what` is the expected
    format, for errors. Raises DataError (a bad source or row) or UserError (a missing extra)."""
    name = str(source)
    if name.startswith(HF_PREFIX):
        yield from _dataset_rows(name, _load_hub(name), what)
        return
    path, split = split_suffix(Path(source))
    if path.is_dir():
        yield from _dataset_rows(name, _load_disk(path, split, name), what)
        return
    suffix = path.suffix.lower()
    if suffix == ".json" and path.is_file():
        yield from _json_rows(path, what)
    elif suffix == ".parquet" and path.is_file():
        yield from _parquet_rows(path, what)
    elif suffix == ".csv" and path.is_file():
        yield from _csv_rows(path, what)
    else:
        yield from read_jsonl(path, what)


def split_suffix(path: Path) -> tuple[Path, str | None]:
    """DIR@SPLIT -> (DIR, SPLIT) for a saved DatasetDict; anything else as it is."""
    name = str(path)
    if "@" in path.name and not path.exists():
        base, _, split = name.rpartition("@")
        if Path(base).is_dir():
            return Path(base), split
    return path, None


def _check_row(where: str, row: object, what: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: {what}, got {json.dumps(row, ensure_ascii=False, default=str)[:80]}")
    return row


# ---- files -------------------------------------------------------------------------------------

def _json_rows(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (at byte {e.start}); convert the file to UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":   # JSON Lines named .json, as `datasets` reads it too
            yield from read_jsonl(path, what)
            return
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        f"expected a list of rows, each {what.removeprefix('expected ')}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))   # {"data": [...]}, {"train": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}; expected a list of rows, each "
                        f"{what.removeprefix('expected ')}")
    for i, row in enumerate(data, 1):
        yield f"{path}:row {i}", _check_row(f"{path}:row {i}", row, what)


def _csv_cell(key: str, value: str):
    if key in CONVERSATIONAL and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else value
    if key == "label" and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _csv_rows(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                where = f"{path}:line {reader.line_num}"
                if None in row:
                    raise DataError(f"{where}: more cells than the header's {len(reader.fieldnames)} columns; "
                                    "quote cells that hold commas")
                yield where, {k: _csv_cell(k, v) for k, v in row.items() if v is not None and v != ""}
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (at byte {e.start}); convert the file to UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e}); {what}") from None


def _parquet_rows(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    pq = _optional("pyarrow.parquet", "pyarrow", f"{path} is Parquet")
    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", _without_nulls(row)
    except (OSError, ValueError) as e:   # pyarrow's ArrowInvalid is a ValueError: a damaged file
        raise DataError(f"{path}: cannot be read as Parquet ({' '.join(str(e).split())[:100]})") from None


# ---- `datasets`: saved directories and the hub -------------------------------------------------

def _optional(module: str, package: str, why: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{why}, which needs the `{package}` package; {EXTRA}") from None


def _load_disk(path: Path, split: str | None, name: str):
    datasets = _optional("datasets", "datasets", f"{name} is a directory, read as a saved `datasets` dataset")
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a directory, but not one written by `datasets.save_to_disk` (no "
                        "dataset_dict.json or state.json); give a file (JSONL, JSON, Parquet, CSV) or such a directory")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:   # datasets raises many kinds for a damaged directory
        raise DataError(f"{path}: cannot be read by datasets.load_from_disk ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:100]})") from None
    return _pick_split(data, split, name)


def _pick_split(data, split: str | None, name: str):
    if not hasattr(data, "keys"):   # a Dataset
        if split is not None:
            raise DataError(f"{name}: the dataset has no splits, so @{split} cannot be chosen; drop it")
        return data
    splits = list(data.keys())
    chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise DataError(f"{name}: no split {chosen or '(none given)'}; the dataset has {', '.join(splits)}: "
                        "name one with @SPLIT")
    return data[chosen]


def parse_hub_name(name: str) -> tuple[str, str | None, str | None]:
    """"hf:NAME[:CONFIG][@SPLIT]" -> (NAME, CONFIG, SPLIT)."""
    spec = name[len(HF_PREFIX):]
    spec, _, split = spec.partition("@")
    dataset, _, config = spec.partition(":")
    if not dataset:
        raise UserError(f"{name}: give a dataset name, hf:NAME[:CONFIG][@SPLIT] (e.g. hf:trl-lib/ultrafeedback_binarized@train)")
    return dataset, config or None, split or None


def _load_hub(name: str):
    dataset, config, split = parse_hub_name(name)
    datasets = _optional("datasets", "datasets", f"{name} is a Hugging Face hub dataset")
    try:
        return datasets.load_dataset(dataset, config, split=split or "train")
    except Exception as e:   # offline, unknown name, no such split or config: all one line
        reason = " ".join(str(e).split())[:160]
        raise DataError(f"{name}: cannot be loaded from the Hugging Face hub ({type(e).__name__}: {reason}); "
                        "check the name, config and split, and the network (HF_DATASETS_OFFLINE=1 allows only "
                        "cached datasets), or give a local file") from None


def _dataset_rows(name: str, data, what: str) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(data, 1):
        yield f"{name}:row {i}", _check_row(f"{name}:row {i}", _without_nulls(row), what)


def _without_nulls(row: dict) -> dict:
    """Arrow fills a column a row lacks with null: drop those, so a missing field reads as missing."""
    return {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row
