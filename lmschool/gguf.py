"""GGUF import: a llama.cpp model file -> the parts of a Hugging Face directory, as pure functions.

    reader = open_gguf(path)                 # a UserError naming the file if it is not a whole GGUF
    meta = read_metadata(reader)             # key -> value (strings, numbers, lists)
    cfg = model_config(meta, path)           # lmschool's ModelConfig, so to_hf_config names the family
    tensors = state_dict(reader, cfg, torch.float32, path)     # HF names, dequantised
    backend, tok_config = build_tokenizer(meta, path)           # tokenizer.json + tokenizer_config.json

`lmschool import` (lmschool/commands/import_gguf.py) writes them. (`import gguf` here is the
`gguf` package from PyPI: imports are absolute.) Design choices:
- **The `gguf` package reads the file and dequantises** (`gguf.quants.dequantize`, numpy); every
  type it can dequantise imports, and one it cannot is a UserError naming the tensor and its type.
  Everything is dequantised in memory before anything is written.
- **Shapes.** GGUF lists a tensor's dimensions fastest-first (ne0 = columns), the reverse of torch;
  the dequantised numpy array is already (rows, columns), and is reshaped to the reversed GGUF shape.
- **Names** map from llama.cpp's (`blk.N.attn_q.weight`) to Hugging Face's
  (`model.layers.N.self_attn.q_proj.weight`) through one table. No `output.weight` means tied
  embeddings.
- **q/k rows are un-permuted.** llama.cpp's converter reorders each head's rows of the Llama q and k
  projections so that RoPE rotates adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face's Llama
  rotates the halves (x_i, x_{i+D/2}). GGUF row 2i + j of a head is HF row j * D/2 + i, so a view
  (heads, D/2, 2, C) with its middle axes swapped gives HF's order back (`unpermute_rows`).
- **Tokenizer.** `tokenizer.ggml.model == "gpt2"` is byte-level BPE: the token list is the
  vocabulary (ids are positions), `tokenizer.ggml.merges` the merges, control tokens (type 3) are
  special added tokens, user-defined ones (type 4) plain added tokens. The split before the byte
  map follows `tokenizer.ggml.pre` as llama.cpp does (SmolLM's splits every digit alone); an
  unknown one is refused rather than guessed. The chat template is the file's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from lmschool.errors import UserError
from lmschool.model import ModelConfig, Transformer

ARCHITECTURES = ("llama",)
# llama.cpp's name of a per-layer tensor -> Hugging Face's (under model.layers.N.)
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL, USER_DEFINED = 3, 4    # llama.cpp's token types

# The split before the byte map, by `tokenizer.ggml.pre` (the regexes llama.cpp uses for them).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_SPLITS = {   # name -> splits applied in turn
    "default": [GPT2_SPLIT], "gpt-2": [GPT2_SPLIT], "smollm": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT], "qwen2": [QWEN2_SPLIT],
}


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over `path`, or a UserError saying why the file cannot be one."""
    try:
        import gguf
    except ImportError:
        raise UserError("importing a GGUF file needs the `gguf` package: pip install 'lmschool[gguf]'") from None
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {problem}; give the path of a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:   # the reader raises ValueError, IndexError, ... on a cut-off file
        raise UserError(f"{path}: the GGUF file cannot be read ({type(e).__name__}: {str(e)[:80]}); "
                        "it is truncated or damaged: download it again") from None


def read_metadata(reader) -> dict:
    """The file's key/value metadata as Python values (a field's `parts` indexed by its `data`)."""
    import gguf
    meta = {}
    for key, field in reader.fields.items():
        if not field.types or key.startswith("GGUF."):
            continue
        values = [field.parts[i] for i in field.data]
        kind = field.types[-1]   # an array's element type is listed after ARRAY
        if kind == gguf.GGUFValueType.STRING:
            values = [bytes(v).decode("utf-8", errors="replace") for v in values]
        else:
            values = [v.item() if v.size == 1 else v.tolist() for v in values]
        meta[key] = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
    return meta


def model_config(meta: dict, where: Path) -> ModelConfig:
    """lmschool's ModelConfig from `{arch}.*` metadata; the vocabulary size is the token list's."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch!r} is not supported; lmschool imports "
                        f"{', '.join(ARCHITECTURES)} GGUF files")

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise UserError(f"{where}: metadata {arch}.{key} is missing; the file is not a complete {arch} model")
        return value

    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UserError(f"{where}: RoPE scaling ({meta[f'{arch}.rope.scaling.type']}) is not supported by the importer")
    heads = need("attention.head_count")
    hidden = need("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{where}: no tokenizer.ggml.tokens; the file carries no tokenizer")
    return ModelConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=meta.get(f"{arch}.attention.key_length", hidden // heads),
        max_position_embeddings=need("context_length"),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=False,   # set by state_dict's caller once the tensors are known
        model_type=arch,
    )


def hf_name(name: str) -> str | None:
    """Hugging Face's name for a llama.cpp tensor name, or None for one this importer does not know."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return f"{TOP_NAMES[stem]}.{suffix}" if stem in TOP_NAMES else None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's RoPE row order of a q or k projection (out, in) back to Hugging Face's:
    within a head, GGUF row 2i + j is HF row j * D/2 + i."""
    out, cols = w.shape
    D = out // n_heads
    return w.view(n_heads, D // 2, 2, cols).transpose(1, 2).reshape(out, cols)   # (H*D, C)


def state_dict(reader, cfg: ModelConfig, dtype: torch.dtype, where: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to `dtype` under its Hugging Face name, q/k un-permuted. Sets
    cfg.tie_word_embeddings when the file has no output projection. Checks the names and shapes
    against the model the config describes (built on the meta device: no memory)."""
    from gguf.quants import dequantize
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise UserError(f"{where}: tensor {t.name} is not one lmschool's {cfg.model_type} model has "
                            "(e.g. Llama 3.1 rope_freqs); this file cannot be imported")
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{where}: tensor {t.name} is quantised as {t.tensor_type.name}, which the "
                            "gguf package cannot dequantise; use a file of another quantisation") from None
        w = torch.from_numpy(np.array(values, dtype=np.float32))   # a copy: the file is mapped read-only
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))    # GGUF lists dims fastest-first
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w.reshape(w.shape[0], -1), cfg.num_attention_heads).reshape(w.shape)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w.reshape(w.shape[0], -1), cfg.num_key_value_heads).reshape(w.shape)
        tensors[name] = w.to(dtype)
    cfg.tie_word_embeddings = "lm_head.weight" not in tensors
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(cfg).state_dict_for_save().items()}
    missing = sorted(set(expected) - set(tensors))
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in tensors.items()
             if k in expected and v.shape != expected[k]]
    extra = sorted(set(tensors) - set(expected))
    if missing or wrong or extra:
        raise UserError(f"{where}: the tensors do not match the metadata: missing {missing[:3]}, "
                        f"wrong shape {wrong[:3]}, unexpected {extra[:3]}; the file is inconsistent")
    return tensors


def build_tokenizer(meta: dict, where: Path) -> tuple[tokenizers.Tokenizer, dict]:
    """tokenizer.json (a `tokenizers.Tokenizer`) and tokenizer_config.json (a dict) from the
    `tokenizer.*` metadata of a byte-level BPE (`tokenizer.ggml.model` "gpt2")."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{where}: tokenizer.ggml.model {kind!r} is not supported; lmschool imports "
                        "byte-level BPE tokenizers ('gpt2')")
    if pre not in PRE_SPLITS:
        raise UserError(f"{where}: tokenizer.ggml.pre {pre!r} is not a known split; known: "
                        f"{', '.join(sorted(PRE_SPLITS))}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, type_ in zip(tokens, types) if type_ == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, type_ in zip(tokens, types) if type_ == USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and isinstance(bos_id, int) and 0 <= bos_id < len(tokens):
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config
