"""Config: YAML + overrides over documented dataclasses; every mistake names its key."""

import pytest

from lmschool import config
from lmschool.errors import ConfigError
from lmschool.stages.pretrain import PretrainConfig


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-3\nmodel:\n  hidden_size: 128\n")
    cfg = config.load(PretrainConfig, path, ["max_steps=7", "model.num_hidden_layers=3", "lr=2e-3",
                                             "precision=bf16"])
    assert (cfg.max_steps, cfg.lr, cfg.model.hidden_size, cfg.model.num_hidden_layers) == (7, 2e-3, 128, 3)
    assert cfg.precision == "bf16"
    assert cfg.model.intermediate_size == 688       # untouched defaults stay


@pytest.mark.parametrize("override, message", [
    (["max_step=3"], r"unknown config key 'max_step' \(did you mean 'max_steps'\?\)"),
    (["model.hiden_size=3"], r"unknown config key 'model.hiden_size' \(did you mean 'model.hidden_size'"),
    (["max_steps=abc"], r"'max_steps': expected int, got 'abc'"),
    (["compile=3"], r"'compile': expected bool"),
    (["precision=fp8"], r"'precision': expected one of 'auto', 'fp32', 'bf16'"),
    (["lr=-1"], r"'lr': must be positive"),
    (["lr=inf"], r"'lr': expected a finite number, got inf"),
    (["weight_decay=nan"], r"'weight_decay': expected a finite number, got nan"),
    (["model.num_key_value_heads=3"], r"'model.num_key_value_heads': 3 must divide"),
    (["seq_len"], r"not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(PretrainConfig, None, override)


def test_saved_config_round_trips(tmp_path):
    cfg = config.load(PretrainConfig, None, ["max_steps=9", "model.hidden_size=64"])
    config.save(cfg, tmp_path / "config.yaml")
    again = config.load(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg


def test_every_field_is_documented():
    lines = config.describe(PretrainConfig)
    undocumented = [line for line in lines if line.endswith(": ")]
    assert not undocumented, undocumented


@pytest.mark.parametrize("text, line", [("lr: [1, 2\nmax_steps: 3\n", 2), ("max_steps:\t\t2\n", 1)])
def test_bad_yaml_is_one_line_naming_the_line(tmp_path, text, line):
    """PyYAML's message is several lines quoting the text; the error is one line, file:line."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(PretrainConfig, path)
    assert "\n" not in str(e.value) and f"{path}:{line} is not valid YAML" in str(e.value)
