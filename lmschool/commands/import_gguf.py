"""`lmschool import MODEL.gguf --out DIR [--dtype float32|bfloat16] [--force]`: a GGUF file -> an HF directory.

    lmschool import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
    lmschool sft --init models/smollm2 ...          # or generate, chat, eval, dpo, ...

The directory is what every lmschool command and `transformers` load: `model.safetensors`
(weights dequantised to --dtype), `config.json` (lmschool's ModelConfig through `to_hf_config`),
`tokenizer.json` and `tokenizer_config.json` (the file's tokenizer and its own chat template),
`generation_config.json` and a checksummed `manifest.json`. The reading and converting are pure
functions in lmschool/gguf.py; this command checks --out, converts everything in memory
(so a bad file fails before anything is written) and writes the directory atomically. Module
name: `import` is a Python keyword.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmschool.checkpoint import write_manifest
from lmschool.files import atomic_dir, check_output_dir, ordinary_file
from lmschool.gguf import build_tokenizer, model_config, open_gguf, read_metadata, state_dict
from lmschool.hf import to_hf_config
from lmschool.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, metavar="MODEL.gguf", help="a llama.cpp GGUF model file (Llama family)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the dequantised weights (default float32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds a model lmschool wrote")


def write_directory(directory: Path, tensors: dict, cfg, backend, tok_config: dict, dtype: str) -> None:
    """The HF files into an existing (temporary) directory, the manifest last."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    ordinary_file(directory / "model.safetensors")
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
    tokenizer = Tokenizer.load(directory)   # lmschool's reading of it: the ids it stops and pads with
    bos_id = tokenizer.bos_id
    eos_id = backend.token_to_id(tok_config["eos_token"]) if tok_config.get("eos_token") else None
    stop = list(dict.fromkeys(i for i in (eos_id, *tokenizer.stop_ids) if i is not None))   # file's eos first
    hf = to_hf_config(cfg, "lm", bos_token_id=bos_id, eos_token_id=stop[0] if stop else None,
                      pad_token_id=tokenizer.pad_id)
    hf["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"_from_model_config": False, "do_sample": False, "bos_token_id": bos_id,
           "eos_token_id": stop, "pad_token_id": tokenizer.pad_id}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_manifest(directory)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "model", args.force)
    started = time.perf_counter()
    reader = open_gguf(args.gguf)
    meta = read_metadata(reader)
    cfg = model_config(meta, args.gguf)
    backend, tok_config = build_tokenizer(meta, args.gguf)
    tensors = state_dict(reader, cfg, DTYPES[args.dtype], args.gguf)
    with atomic_dir(args.out) as staging:
        write_directory(staging, tensors, cfg, backend, tok_config, args.dtype)
    n_params = sum(v.numel() for v in tensors.values())
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    print(f"imported {args.gguf.name}: {cfg.model_type}, {n_params / 1e6:.1f}M parameters "
          f"({', '.join(kinds)} -> {args.dtype}), {cfg.vocab_size} tokens, in {time.perf_counter() - started:.1f}s")
    print(f"wrote {args.out}")
    return 0
