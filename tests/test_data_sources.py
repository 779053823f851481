"""Data sources (lmschool/data/sources.py): the same rows from JSONL, JSON, Parquet, CSV, a
`datasets.save_to_disk` directory (Dataset and DatasetDict@split) read by every reader (SFT
conversations, preference pairs, unpaired answers, prompts) give the same data as from JSONL; a bad
row is `source:row N`; a missing extra, an unreachable hub name and a directory that is no dataset
are one line each; and a prompt file's extra columns (a gold `answer`) reach a --scorer as keyword
arguments through `lmschool label`."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from lmschool.checkpoint import save_model
from lmschool.cli import main
from lmschool.data.preference import read_pairs
from lmschool.data.prompts import read_prompts
from lmschool.data.sft import load_examples
from lmschool.data.sources import parse_hub_name, read_rows
from lmschool.data.unpaired import read_unpaired
from lmschool.errors import DataError, UserError
from lmschool.model import ModelConfig, build_model
from lmschool.tokenizer import train_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

MESSAGES = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]
            for i in range(4)]
SFT_ROWS = [{"messages": m} for m in MESSAGES[:2]] + [{"prompt": "Hi", "completion": "Hello."},
                                                     {"prompt": MESSAGES[2][:1], "completion": MESSAGES[2][1:]}]
PAIR_ROWS = [  # TRL's standard and conversational forms, with an extra column
    {"prompt": "What is 1 plus 1?", "chosen": "It is 2.", "rejected": "It is 3.", "category": "arithmetic"},
    {"prompt": MESSAGES[3][:1], "chosen": [{"role": "assistant", "content": "It is 6."}],
     "rejected": [{"role": "assistant", "content": "Six, I think."}], "category": "arithmetic"},
]
PROMPT_ROWS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(3)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], byte_level=True)


def write(kind: str, rows: list[dict], path):
    """`rows` as a source of `kind` at `path` (a file, or a directory for datasets)."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":   # message lists as JSON cells, as people write them
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, bool)) else v for k, v in r.items()})
    elif kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "datasetdict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                              "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
        return f"{path}@test"
    return path


KINDS = ["json", "parquet", "csv", "dataset", "datasetdict"]


def source(tmp_path, kind, rows, name="data"):
    suffix = {"dataset": "", "datasetdict": ""}.get(kind, "." + kind)
    return write(kind, rows, tmp_path / f"{name}{suffix}")


def strip_where(items):
    return [{k: v for k, v in vars(x).items() if k != "meta"} | {"meta": {k: v for k, v in x.meta.items() if k != "where"}}
            for x in items]


# Parquet and datasets hold one schema: a column of strings in some rows and lists in others cannot
# be stored, so the standard and conversational forms are written as separate files there.
def by_form(rows):
    return [[r] for r in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_gets_the_jsonl_rows(kind, tmp_path, tok):
    for i, rows in enumerate(by_form(SFT_ROWS)):
        expect, _ = load_examples([write("jsonl", rows, tmp_path / f"s{i}.jsonl")], tok, 64)
        got, stats = load_examples([source(tmp_path, kind, rows, f"s{i}")], tok, 64)
        assert [(e.input_ids.tolist(), e.labels.tolist()) for e in got] == \
               [(e.input_ids.tolist(), e.labels.tolist()) for e in expect] and stats.rows == 1
    for i, rows in enumerate(by_form(PAIR_ROWS)):
        expect = read_pairs(write("jsonl", rows, tmp_path / f"p{i}.jsonl"))
        assert strip_where(read_pairs(source(tmp_path, kind, rows, f"p{i}"))) == strip_where(expect)
        assert strip_where(read_unpaired(source(tmp_path, kind, rows, f"u{i}"))) == \
            strip_where(read_unpaired(tmp_path / f"p{i}.jsonl"))
    got = read_prompts(source(tmp_path, kind, PROMPT_ROWS, "prompts"))
    assert [(r["prompt"], r["answer"]) for r in got] == [([{"role": "user", "content": r["prompt"]}], r["answer"])
                                                         for r in PROMPT_ROWS]


def test_json_accepts_a_wrapped_list_and_json_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": PROMPT_ROWS}))
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    for name in ("a.json", "b.json"):
        assert [r for _, r in read_rows(tmp_path / name, "expected prompts")] == PROMPT_ROWS


@pytest.mark.parametrize("kind, where", [("json", "bad.json:row 2"), ("parquet", "bad.parquet:row 2"),
                                         ("csv", "bad.csv:line 3"), ("dataset", "bad:row 2")])
def test_a_bad_row_names_its_source_and_row(kind, where, tmp_path):
    rows = [PAIR_ROWS[0], {**PAIR_ROWS[0], "rejected": PAIR_ROWS[0]["chosen"]}]
    with pytest.raises(DataError, match=f"^{tmp_path / where}: \"chosen\" and \"rejected\" are the same answer"):
        read_pairs(source(tmp_path, kind, rows, "bad"))
    missing = [{"prompt": "Hi", "chosen": "Yo"}]
    with pytest.raises(DataError, match=r":(row|line) \d+: .*rejected"):
        read_pairs(source(tmp_path, kind, missing, "missing"))


def test_bad_sources_are_one_line(tmp_path):
    (tmp_path / "list.json").write_text('{"a": 1, "b": 2}')
    with pytest.raises(DataError, match="holds a JSON dict; expected a list of rows"):
        list(read_rows(tmp_path / "list.json", "expected prompts"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        list(read_rows(tmp_path / "bad.parquet", "expected prompts"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by `datasets.save_to_disk`"):
        list(read_rows(tmp_path / "plain", "expected prompts"))
    dd = write("datasetdict", PROMPT_ROWS, tmp_path / "dd")
    with pytest.raises(DataError, match="no split valid; the dataset has train, test"):
        list(read_rows(str(dd).replace("@test", "@valid"), "expected prompts"))


def test_hub_names(monkeypatch, tmp_path):
    assert parse_hub_name("hf:trl-lib/tldr") == ("trl-lib/tldr", None, None)
    assert parse_hub_name("hf:openai/gsm8k:main@test") == ("openai/gsm8k", "main", "test")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    with pytest.raises(DataError) as e:
        read_prompts("hf:lmschool-tests/no-such-dataset@train")
    message = str(e.value)
    assert message.startswith("hf:lmschool-tests/no-such-dataset@train: cannot be loaded from the Hugging Face hub")
    assert "\n" not in message and "give a local file" in message


def test_a_missing_extra_names_it(monkeypatch, tmp_path):
    path = write("parquet", PROMPT_ROWS, tmp_path / "p.parquet")
    write("dataset", PROMPT_ROWS, tmp_path / "d")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)    # import fails, as when not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    for src, what in ((path, "pyarrow"), (tmp_path / "d", "datasets"), ("hf:trl-lib/tldr", "datasets")):
        with pytest.raises(UserError, match=f"needs the `{what}` package; pip install 'lmschool\\[data\\]'"):
            read_prompts(src)


# ---- extra columns reach a --scorer ------------------------------------------------------------

SEEN: list = []


def gold_score(prompts, responses, answer):
    """A verifiable reward: 10 where the response holds the gold answer, plus its length mod 3 so that
    a random policy's answers differ (records what it was given)."""
    SEEN.append(list(answer))
    return [10.0 * (a in r) + len(r) % 3 for r, a in zip(responses, answer)]


def trl_style(completions, answer, **kwargs):
    """TRL's reward-function convention: keywords, completions, the dataset's columns."""
    SEEN.append(("trl", list(answer), sorted(kwargs)))
    return [float(len(c) % 3) for c in completions]


def test_columns_reach_the_scorer_through_label(tmp_path, tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=96)
    save_model(tmp_path / "policy", build_model(cfg, seed=0), tok, extra={"stage": "sft"})
    prompts = write("parquet", PROMPT_ROWS, tmp_path / "prompts.parquet")
    common = ["label", "--policy", str(tmp_path / "policy"), "--prompts", str(prompts), "--samples", "4",
              "max_new_tokens=12", "threads=1", "precision=fp32", "device=cpu"]
    SEEN.clear()
    assert main([*common[:5], "--out", str(tmp_path / "a.jsonl"), "--scorer", "test_data_sources:gold_score",
                 *common[5:]]) == 0
    # the probe (the first row's answer, twice), then each prompt's 4 answers with its own gold answer
    assert SEEN == [["0", "0"], ["0"] * 4 + ["2"] * 4 + ["4"] * 4]
    SEEN.clear()
    assert main([*common[:5], "--out", str(tmp_path / "b.jsonl"), "--scorer", "test_data_sources:trl_style",
                 *common[5:]]) == 0
    assert SEEN[-1] == ("trl", ["0"] * 4 + ["2"] * 4 + ["4"] * 4, ["prompts"])   # as TRL passes them


def test_a_column_the_data_lacks_is_one_line(tmp_path, tok, capsys):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=96)
    save_model(tmp_path / "policy", build_model(cfg, seed=0), tok, extra={"stage": "sft"})
    prompts = write("jsonl", [{"prompt": "Hi"}], tmp_path / "prompts.jsonl")
    assert main(["label", "--policy", str(tmp_path / "policy"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "a.jsonl"), "--scorer", "test_data_sources:gold_score", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes the column(s) answer, which the data does not have" in err[0]
    assert not (tmp_path / "a.jsonl").exists()


TEXT_ROWS = [{"text": f"Pupil {i} likes the colour {c}.\nA second line."} for i, c in enumerate(["red", "blue", "green"])]


@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_text_from_every_source(kind, tmp_path, tok):
    """`pretrain --data` (and --replay, --ptx, `tokenizer train`) read a "text" column from every
    source: the same documents, the same token files and the same bytes as {"text"} JSONL."""
    from lmschool.data.pretrain import prepare
    from lmschool.data.text import check_data, read_documents, text_fingerprint

    jsonl = write("jsonl", TEXT_ROWS, tmp_path / "t.jsonl")
    src = source(tmp_path, kind, TEXT_ROWS, "t")
    if kind == "datasetdict":   # its "test" split holds every row
        assert list(read_documents(str(src).replace("@test", "@train"))) == [TEXT_ROWS[0]["text"]]
    assert list(read_documents(src)) == [r["text"] for r in TEXT_ROWS]
    assert check_data([src]) == check_data([jsonl])
    a, b = prepare([jsonl], tok, tmp_path / "a"), prepare([src], tok, tmp_path / "b")
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    assert {k: a[k] for k in ("train", "val")} == {k: b[k] for k in ("train", "val")}
    assert text_fingerprint([src]) != text_fingerprint([source(tmp_path, kind, TEXT_ROWS[:2], "t2")])


def test_a_text_row_without_text_names_its_row(tmp_path):
    from lmschool.data.text import check_data

    src = write("parquet", [{"text": "fine", "content": "a"}, {"content": "no text here"}], tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 2: expected a \"text\" string .*no text column "
                                        r"\(columns: content\); name the text column"):
        check_data([src])


def test_pretrain_reads_parquet_and_resumes_only_on_the_same_rows(tmp_path, capsys):
    rows = [{"text": f"Pupil {i} has a cat called Tom {i}. " * 4} for i in range(60)]
    data = write("parquet", rows, tmp_path / "corpus.parquet")
    small = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_hidden_layers=1",
             "model.num_attention_heads=2", "model.num_key_value_heads=2", "vocab_size=300", "seq_len=16",
             "batch_size=2", "eval_every=0", "log_every=1", "save_every=1", "samples=0", "compile=false"]
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "max_steps=2", *small]) == 0
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 60
    (out / "summary.json").unlink()                                  # as if it had stopped before the end
    other = write("parquet", rows[:59], tmp_path / "other.parquet")
    capsys.readouterr()
    assert main(["pretrain", "--data", str(other), "--out", str(out), "--resume", "max_steps=2", *small]) == 2
    assert "the training data differs" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--resume", "max_steps=2", *small]) == 0
