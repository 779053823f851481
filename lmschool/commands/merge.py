"""`lmschool merge BASE ADAPTER --out DIR`: fold a LoRA adapter into its base, as a plain checkpoint.

    lmschool merge runs/sft runs/dpo-lora --out runs/dpo-merged

BASE is the full checkpoint the adapter was trained on (a model or run directory; the adapter's
adapter_config.json names it as base_model_name_or_path); ADAPTER is a LoRA run or adapter
directory (lmschool's, or one peft wrote for a Llama-family model). DIR gets an ordinary Hugging
Face checkpoint with W <- W + (alpha / r) B A in every adapted projection (and the adapter's saved
modules, e.g. a reward model's score head): `transformers` loads it without peft, and it needs no
base beside it. The tokenizer and the config's lmschool section (stage, kind, reward bias) come
from the adapter's directory when it has them, else from BASE. Every lmschool command already
loads an adapter directory merged in memory; merge writes that model once, e.g. to train a new
adapter on it (whose base must be a full checkpoint) or to ship it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the full checkpoint the adapter was trained on (model or run dir)")
    parser.add_argument("adapter", metavar="ADAPTER", help="a LoRA adapter: a LoRA run or adapter directory")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the merged checkpoint")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds a model lmschool wrote")


def run(args: argparse.Namespace) -> int:
    from lmschool import adapters
    from lmschool.checkpoint import load_adapter_model, model_extra, read_config, resolve, save_model
    from lmschool.errors import UserError
    from lmschool.files import check_output_dir
    from lmschool.hf import from_hf_config
    from lmschool.tokenizer import Tokenizer

    base, adapter = resolve(args.base), resolve(args.adapter)
    if adapters.is_adapter_dir(base):
        named = adapters.read_adapter_config(base).get("base_model_name_or_path")
        raise UserError(f"BASE {base} is a LoRA adapter, not a full checkpoint; give the checkpoint it was "
                        f"trained on ({named}) as BASE")
    if not adapters.is_adapter_dir(adapter):
        raise UserError(f"ADAPTER {adapter} is a full checkpoint, not a LoRA adapter (it has no "
                        f"{adapters.ADAPTER_CONFIG}); it needs no merge: use it as it is")
    config = adapters.read_adapter_config(adapter)
    named = config.get("base_model_name_or_path")
    if named and Path(named).exists() and resolve(named).resolve() != base.resolve():
        print(f"lmschool merge: note: {adapter} was trained on {named}; merging it onto {base} as asked")
    check_output_dir(args.out, "model", args.force)
    head = from_hf_config(read_config(adapter), str(adapter))[1]
    model = load_adapter_model(adapter, head, base=base)
    tokenizer = Tokenizer.load(adapter if (adapter / "tokenizer.json").is_file() else base)
    extra = model_extra(adapter) or model_extra(base) or None
    save_model(args.out, model, tokenizer, extra)
    print(f"merged {adapter} (LoRA r={config['r']}, alpha {config['lora_alpha']:g}, "
          f"{', '.join(config['target_modules'])}) into {base} -> {args.out}")
    return 0
