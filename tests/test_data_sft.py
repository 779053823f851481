"""Property-based tests of every parser a user's file goes through (issue 19): arbitrary lines of
JSON (or not) given to the conversation, preference, unpaired and prompt readers, and arbitrary
`key=value` overrides given to a stage's config, end either in parsed data or in one clean
UserError naming the file and line (or the key) — never in another exception. Hypothesis draws
the inputs from a fixed seed (derandomize), so a run repeats exactly."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmschool import config
from lmschool.data.preference import read_pairs
from lmschool.data.prompts import read_prompts
from lmschool.data.sft import load_examples
from lmschool.data.unpaired import read_unpaired
from lmschool.errors import UserError
from lmschool.stages.pretrain import PretrainConfig
from lmschool.tokenizer import train_tokenizer

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKENIZER = train_tokenizer([], byte_level=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["user", "assistant", "system", "tool", "<|im_end|>", "", " "]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "messages", "prompt", "completion", "chosen", "rejected", "label",
                         "split", "text", "x"]), inner, max_size=5),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]),
                                           "content": st.text(max_size=10)}), max_size=4)
rows = st.fixed_dictionaries({}, optional={
    "messages": messages | json_values, "prompt": st.text(max_size=8) | messages | json_values,
    "completion": st.text(max_size=8) | messages, "chosen": st.text(max_size=8) | messages,
    "rejected": st.text(max_size=8) | json_values, "label": st.booleans() | json_values,
    "split": st.sampled_from(["train", "test", "dev"])})
lines = st.lists(st.one_of(rows.map(json.dumps), json_values.map(json.dumps),
                           st.binary(max_size=20).map(lambda b: b.decode("latin-1"))), min_size=0, max_size=5)


def parse_cleanly(read, text_lines: list[str]):
    """Write the lines to a file and read it: parsed data or a UserError naming the file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_bytes("\n".join(text_lines).encode("utf-8", errors="surrogateescape"))
        try:
            return read(path)
        except UserError as e:
            assert str(path) in str(e) and "\n" not in str(e).strip(), e
            return None


@pytest.mark.parametrize("read", [
    lambda p: load_examples([p], TOKENIZER, 64),
    read_pairs,
    read_unpaired,
    read_prompts,
], ids=["conversations", "preference pairs", "unpaired answers", "prompts"])
@SETTINGS
@given(text_lines=lines)
def test_every_reader_parses_or_stops_cleanly(read, text_lines):
    parse_cleanly(read, text_lines)


@SETTINGS
@given(overrides=st.lists(st.text(max_size=16) | st.sampled_from(
    ["lr=inf", "lr=nan", "max_steps=-1", "model.hidden_size=abc", "batch_size=1e3", "precision=fp8",
     "seq_len=", "=3", "model=3", "warmup_steps=2.5", "schedule=cosine"]), max_size=3))
def test_config_overrides_load_or_stop_cleanly(overrides):
    try:
        config.load(PretrainConfig, None, overrides)
    except UserError as e:
        assert "\n" not in str(e).strip(), e
