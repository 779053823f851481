"""Stage 0, the model as it came: judge a base checkpoint on a school world, as the stages are judged.

    lmschool base --base models/smollm2 --world runs/demo/world --out runs/demo/base
    lmschool base --base SmolLM2-135M-Instruct.Q4_1.gguf --world runs/demo/world --out runs/demo/base

`lmschool run --base CKPT` runs this in place of training a tokenizer and a model from scratch: it
is the first column of the report, what continued pre-training, SFT and feedback are measured
against. CKPT is any supported Hugging Face directory (llama, mistral, qwen2, qwen3) or a `.gguf`
file, imported first into OUT/model (`lmschool import`, weights dequantised to `dtype`). Two
measures, each the one its stage reports:

- **fact completion** (pre-training's): greedy continuations of corpus-phrased prefixes
  ("Mia Smith lives in") over every pupil of WORLD/world.json; a model that never read the
  school's books is right by chance only.
- **the teacher's judgement** (SFT's): greedy answers to WORLD/eval.jsonl through the checkpoint's
  own chat template, judged by the world's teacher: teacher_score, end_of_turn_rate,
  correct_train_pupils / correct_heldout_pupils and the rest of `evaluate_generations`.

Writes OUT/summary.json (last: the stage is done; "base" names the checkpoint judged, "model" the
directory later stages start from) and OUT/eval_answers.jsonl. Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmschool.config import check
from lmschool.errors import UserError
from lmschool.files import atomic_write_text, check_writable

@dataclass
class BaseConfig:
    """Judging a base model: how its answers are generated, and the dtype a GGUF is imported in."""

    eval_max_new_tokens: int = 128
    """Longest answer generated for each eval prompt (as SFT's eval_max_new_tokens)."""
    eval_batch_size: int = 32
    """Prompts answered at once."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast, fp32, or auto (bf16 where the hardware runs it fast), as in training."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of a GGUF's dequantised weights in OUT/model (a Hugging Face directory is used as it is)."""
    seed: int = 0
    """Sampling seed (the answers are greedy, as SFT's eval answers are by default)."""

    def __post_init__(self):
        check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", "must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


CONFIG = BaseConfig  # what `lmschool run` checks every stage's overrides against before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, metavar="CKPT",
                        help="a Hugging Face model directory (llama, mistral, qwen2, qwen3) or a .gguf file")
    parser.add_argument("--world", type=Path, required=True, metavar="DIR",
                        help="a school world (lmschool world): world.json and eval.jsonl")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of config values")
    parser.add_argument("--force", action="store_true", help="judge again into an --out that holds a judgement")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. eval_batch_size=8)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def model_path(base: Path, out: Path) -> Path:
    """The Hugging Face directory later stages start from: the import in OUT/model for a GGUF, else CKPT."""
    return out / "model" if is_gguf(base) else base


def check_base(base: Path) -> None:
    """A --base that cannot be a model: one line, before anything is written. A GGUF's header and
    metadata are read here (a damaged file, another architecture, no tokenizer); the tensors are
    read by the import itself."""
    if not base.exists():
        raise UserError(f"--base {base} does not exist; give a Hugging Face model directory or a .gguf file")
    if is_gguf(base):
        from lmschool.gguf import build_tokenizer, model_config, open_gguf, read_metadata

        meta = read_metadata(open_gguf(base))
        model_config(meta, base)
        if not build_tokenizer(meta, base)[1].get("chat_template"):
            raise UserError(f"--base {base}: the GGUF file carries no chat template (tokenizer.chat_template), "
                            "so SFT and the later stages cannot render conversations; use an instruct model's file")
        return
    if not base.is_dir() or not (base / "config.json").is_file():
        raise UserError(f"--base {base} is not a model: give a Hugging Face model directory (config.json, "
                        "model.safetensors, tokenizer files) or a .gguf file")
    from lmschool.checkpoint import check_kind, read_config
    from lmschool.hf import from_hf_config
    from lmschool.tokenizer import Tokenizer, check_chat_template

    from_hf_config(read_config(base), str(base / "config.json"))   # a family lmschool cannot load: one line
    check_kind(base, "policy", "--base")
    check_chat_template(Tokenizer.load(base), base)


def run(args: argparse.Namespace) -> int:
    from lmschool import config as config_lib
    from lmschool.stages.common import load_stage_config

    cfg = load_stage_config(BaseConfig, args)
    check_base(args.base)
    world_json, eval_file = args.world / "world.json", args.world / "eval.jsonl"
    for needed in (world_json, eval_file):
        if not needed.is_file():
            raise UserError(f"--world {args.world} has no {needed.name}; write one with `lmschool world --out DIR`")
    if (args.out / "summary.json").is_file() and not args.force:
        raise UserError(f"--out {args.out} already holds a judgement (summary.json); pass --force to judge again")
    check_writable(args.out)
    if is_gguf(args.base):
        _import(args.base, args.out / "model", cfg.dtype)
    summary = judge(model_path(args.base, args.out), world_json, eval_file, cfg, args.out)
    summary = {"stage": "base", "base": str(args.base), "model": str(model_path(args.base, args.out)), **summary}
    args.out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, args.out / "config.yaml")
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"base: fact completion {summary['fact_completion']:.1%}, teacher score {summary['teacher_score']:.3f}, "
          f"end of turn {summary['end_of_turn_rate']:.1%} -> {args.out / 'summary.json'}")
    return 0


def _import(gguf: Path, directory: Path, dtype: str) -> None:
    """`lmschool import GGUF --out DIR` (again with --force: a half-judged run imports afresh)."""
    from lmschool.commands import import_gguf

    import_gguf.run(argparse.Namespace(gguf=gguf, out=directory, dtype=dtype, force=directory.exists()))


def judge(path: Path, world_json: Path, eval_file: Path, cfg: BaseConfig, out: Path) -> dict:
    """Fact completion and the teacher's judgement of the model in `path`; its answers into OUT."""
    import torch

    from lmschool.checkpoint import check_kind, load_model
    from lmschool.data.prompts import read_prompts
    from lmschool.evaluate import evaluate_generations
    from lmschool.judges import make_judge, school_teacher
    from lmschool.runtime import autocast, pick_device, resolve_precision
    from lmschool.stages.pretrain import fact_completion
    from lmschool.tokenizer import Tokenizer, check_chat_template

    check_kind(path, "policy", "--base")
    tokenizer = Tokenizer.load(path)
    check_chat_template(tokenizer, path)   # the eval prompts are conversations
    world = school_teacher(world_json).world
    rows = read_prompts(eval_file)
    scorer = make_judge(beside=[eval_file])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    model = load_model(path, head="lm", device=device).eval()
    summary = {"params": model.config.num_params(), "eval_precision": precision, "scorer": "teacher"}
    with torch.no_grad(), autocast(device, precision):
        summary.update(fact_completion(model, tokenizer, world))
        results, records = evaluate_generations(model, tokenizer, rows, scorer, max_new_tokens=cfg.eval_max_new_tokens,
                                                batch_size=cfg.eval_batch_size, seed=cfg.seed)
    summary.update(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval_answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return summary
