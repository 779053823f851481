"""Stage 1, reading: pre-train a model to predict the next token of a corpus.

    lmschool pretrain --data corpus.txt --out runs/pretrain [--config configs/pretrain.yaml] [key=value ...]
    lmschool pretrain --data more.txt --init runs/pretrain --out runs/continued   # continued pre-training
    torchrun --nproc_per_node=2 -m lmschool pretrain --data corpus.txt --out runs/pretrain

Steps: train a byte-level BPE tokenizer on the data (or take --tokenizer / the --init checkpoint's),
tokenise into memmapped train/val splits (RUN/data), build the model (or load --init: an lmschool
run or a local Hugging Face Llama/Qwen2 directory), train with the one loop (trainer.fit),
then write RUN/model (a Hugging Face checkpoint) and RUN/summary.json: validation loss, bits per
byte, a few samples, and — when the data is a school world's corpus (world.json beside it) — the
greedy fact-completion accuracy over all pupils.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmschool import distributed
from lmschool.adapters import for_training
from lmschool.checkpoint import check_kind, load_model, resolve
from lmschool.config import check
from lmschool.data.jsonl import read_jsonl
from lmschool.data.pretrain import TokenWindows, load_tokens, prepare, val_batches
from lmschool.data.prompts import SIDE_BY_SIDE, pick_prompts
from lmschool.data.text import check_data, text_fingerprint
from lmschool.evaluate import lm_loss_and_bpb
from lmschool.files import atomic_write_text
from lmschool.generate import generate
from lmschool.judges import school_teacher, world_file
from lmschool.losses.lm import lm_loss
from lmschool.model import ModelConfig, build_model
from lmschool.runtime import autocast
from lmschool.stages.common import (Timer, add_run_arguments, check_same_data, check_vocab,
                                    finish_run, load_stage_config, open_run, save_resolved_config, write_data_info)
from lmschool.tokenizer import Tokenizer, train_tokenizer
from lmschool.trainer import TrainConfig, fit
from lmschool.world.build import completion_probes
from lmschool.world.facts import FACT_TYPES


@dataclass
class PretrainConfig(TrainConfig):
    """Pre-training: the loop's settings (TrainConfig) plus data, tokenizer and model shape."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (ignored with --init; model.vocab_size is set from the tokenizer)."""
    seq_len: int = 256
    """Tokens per training window."""
    vocab_size: int = 4096
    """Tokenizer size when one is trained here."""
    byte_level: bool = False
    """Train a pure byte-level tokenizer (no merges) instead of BPE."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    eval_tokens: int = 262144
    """Validation tokens used by each evaluation (0 = the whole split)."""
    samples: int = 3
    """Number of sample continuations written to summary.json."""

    def __post_init__(self):
        super().__post_init__()
        check(self.seq_len >= 8, "seq_len", "must be >= 8")
        check(0 < self.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)")
        check(self.vocab_size >= 260, "vocab_size", "must be >= 260 (256 bytes + 4 special tokens)")


CONFIG = PretrainConfig  # what `lmschool run` checks every stage's overrides against before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, action="append", required=True, metavar="FILE",
                        help="UTF-8 text (documents separated by <|endoftext|> lines), or rows with a \"text\" column: JSONL, "
                             "JSON, Parquet, CSV, a datasets.save_to_disk DIR[@SPLIT], hf:NAME[:CONFIG][@SPLIT]; repeatable")
    parser.add_argument("--init", metavar="CKPT", help="start from this checkpoint (lmschool run or HF directory)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR", help="use this tokenizer instead of training one")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(PretrainConfig, args)
    check_data(args.data)  # every file readable, UTF-8 and non-empty, before --out is touched
    # the school world beside the corpus, for the closing fact probes: a damaged one stops here
    world = school_teacher(*args.data).world if world_file(*args.data) else None
    torch.manual_seed(cfg.seed)
    check(not cfg.lora.enabled or bool(args.init), "lora.r", "adapters adapt a trained model, but pre-training "
          "from scratch trains every weight: give --init CKPT (continued pre-training) or leave lora.r at 0")
    init_model = None
    if args.init:   # a missing or damaged --init stops here, before --out is opened
        args.init = resolve(args.init)
        check_kind(args.init, "policy", "--init")
        init_model = for_training(load_model(args.init, head="lm"), cfg.lora, base=args.init, seed=cfg.seed)
        if args.tokenizer is None:
            Tokenizer.load(args.init)
    if args.tokenizer is not None:
        Tokenizer.load(args.tokenizer)
    timer = Timer()
    dist = distributed.init(cfg.device)
    run = open_run(args.out, args, dist, "pretrain")
    if run.finished:
        return 0
    out, resuming = run.path, run.resuming
    data_info = {"data": [str(p) for p in args.data], "fingerprint": text_fingerprint(args.data)}
    check_same_data(out, data_info, resuming)  # a resumed run reads RUN/data, tokenised when it started

    # --- tokenizer and data (rank 0 prepares, the others wait and read) ---
    tok_dir, data_dir = out / "tokenizer", out / "data"
    if dist.is_main and not (resuming and (data_dir / "meta.json").is_file()):
        tokenizer = _get_tokenizer(args, cfg)
        tokenizer.save(tok_dir)
        prepare(list(args.data), tokenizer, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    distributed.barrier()
    tokenizer = Tokenizer.load(tok_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")

    # --- model ---
    if init_model is not None:
        model = init_model
        check_vocab(model, tokenizer, f"--init {args.init}")
        cfg.model = model.config
    else:
        cfg.model.vocab_size = tokenizer.vocab_size
        cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, cfg.seq_len)
        model = build_model(cfg.model, seed=cfg.seed)
    if dist.is_main:
        save_resolved_config(cfg, out)
        write_data_info(out, data_info)

    special = {i for i in (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id,
                           tokenizer.im_start_id, tokenizer.im_end_id) if i is not None}
    text_tokens = meta["val"]["tokens"] - meta["val"]["documents"]
    bytes_per_token = meta["val"]["bytes"] / max(text_tokens, 1)

    def evaluate(m):
        return lm_loss_and_bpb(m, val_batches(val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_tokens or None),
                               special_ids=special, bytes_per_text_token=bytes_per_token)

    data = TokenWindows(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    extra = {"stage": "pretrain"}
    trainer, final = fit(model, data, lm_loss, cfg, out, evaluate=evaluate, tokenizer=tokenizer,
                         extra=extra, dist=dist, resume=resuming, desc="pretrain")

    if dist.is_main:
        model = trainer.model.eval()
        full = final  # fit's closing evaluation (eval_tokens of the validation split)
        summary = {
            "stage": "pretrain",
            "val_loss": full["val_loss"],
            "val_bpb": full.get("val_bpb"),
            "val_perplexity": math.exp(min(full["val_loss"], 50)),
            "steps": trainer.step,
            "params": model.config.num_params(),
            "train_tokens": meta["train"]["tokens"],
            "val_tokens": meta["val"]["tokens"],
            "tokens_seen": trainer.tokens_seen * dist.world_size,
            "epochs": trainer.tokens_seen * dist.world_size / max(meta["train"]["tokens"], 1),
            "seconds": timer.seconds,
            "val_tokens_evaluated": full["val_tokens"],
            "precision": trainer.precision,
            "samples": sample_continuations(model, tokenizer, val_tokens, cfg),
        }
        with torch.no_grad(), autocast(trainer.device, trainer.precision):
            summary.update(school_world_probes(model, tokenizer, world))
        write_chat_answers(out, args.data)
        finish_run(run, summary)
        print(f"pretrain: val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.4f} bits per byte, "
              f"{summary['steps']} steps in {summary['seconds']:.0f}s -> {run.out / 'model'}")
        if "fact_completion" in summary:
            print(f"pretrain: fact completion {summary['fact_completion']:.1%} over "
                  f"{summary['fact_completion_probes']} probes")
    distributed.barrier()   # the group is left by cli.main, once this run's models are freed
    return 0


def _get_tokenizer(args, cfg: PretrainConfig) -> Tokenizer:
    if args.tokenizer is not None:
        return Tokenizer.load(args.tokenizer)
    if args.init:
        return Tokenizer.load(resolve(args.init))
    from lmschool.data.text import iter_texts
    texts = (t for path in args.data for t in iter_texts(path))
    return train_tokenizer(texts, None if cfg.byte_level else cfg.vocab_size, byte_level=cfg.byte_level)


def sample_continuations(model, tokenizer, val_tokens: np.ndarray, cfg: PretrainConfig) -> list[dict]:
    """Continue the first words of a few validation windows (temperature 0.8, seeded)."""
    if cfg.samples <= 0 or val_tokens.size < 16:
        return []
    starts = np.linspace(0, val_tokens.size - 16, cfg.samples).astype(int)
    prompts = [val_tokens[s:s + 8].astype(np.int64).tolist() for s in starts]
    out = generate(model, prompts, max_new_tokens=48, temperature=0.8, top_k=50,
                   stop_ids=[tokenizer.eos_id], pad_id=tokenizer.fill_id, seed=cfg.seed)
    return [{"prompt": tokenizer.decode(p), "completion": tokenizer.decode(t, skip_special=True)}
            for p, t in zip(prompts, out.tokens)]


def school_world_probes(model, tokenizer, world: dict | None) -> dict:
    """Greedy fact completion ("<pupil> lives in" -> town) when the corpus is a school world's
    (`world`: the world.json beside it, read and checked before training; None: none)."""
    return fact_completion(model, tokenizer, world) if world is not None else {}


# ---- the fact-completion probe: does the pre-trained model complete facts it has read? ----------
#
# Each probe is a corpus-phrased prefix ("Mia Smith lives in") and its answer ("Oakford"); the
# model continues the prefix greedily and is right when the continuation starts with the answer
# as a whole word. Reported over all pupils, and separately over the held-out ones (whose facts
# only the corpus states: the knowledge SFT must later carry from reading into chat).

def is_completion(text: str, answer: str) -> bool:
    text = text.lstrip()
    if not text.lower().startswith(answer.lower()):
        return False
    rest = text[len(answer):]
    return not rest or not rest[0].isalnum()


@torch.no_grad()
def fact_completion(model, tokenizer, world: dict, batch_size: int = 256, max_new_tokens: int = 5) -> dict:
    """Greedy completion accuracy over every pupil and fact type; also held-out pupils alone and
    per fact type. Probes come from `completion_probes` (pupils in world order, facts in order)."""
    hits = {}                                       # (heldout, fact) -> [correct, total]
    for heldout in (False, True):
        probes = completion_probes(world, heldout=heldout)
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            # In the token stream every document follows an end-of-document token: so does a probe.
            prompts = [[tokenizer.eos_id, *tokenizer.encode(prefix, add_special_tokens=False)]
                       for prefix, _ in chunk]
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_ids=[tokenizer.eos_id], pad_id=tokenizer.fill_id)
            for j, ((_, answer), toks) in enumerate(zip(chunk, out.tokens)):
                cell = hits.setdefault((heldout, FACT_TYPES[(i + j) % len(FACT_TYPES)]), [0, 0])
                cell[0] += is_completion(tokenizer.decode(toks, skip_special=True), answer)
                cell[1] += 1

    def rate(cells):
        cells = list(cells)
        return sum(c for c, _ in cells) / max(sum(n for _, n in cells), 1)

    return {
        "fact_completion": rate(hits.values()),
        "fact_completion_probes": sum(n for _, n in hits.values()),
        "fact_completion_heldout": rate(v for (h, _), v in hits.items() if h),
        "fact_completion_seen": rate(v for (h, _), v in hits.items() if not h),
        "fact_completion_by_fact": {f: rate(v for (_, g), v in hits.items() if g == f) for f in FACT_TYPES},
    }


def write_chat_answers(out: Path, data_paths: list[Path], max_new_tokens: int = 48) -> None:
    """RUN/eval_answers.jsonl, when a school world is beside the data: the saved model's greedy
    answers, through the chat template it has never seen (so it rambles), to the eval prompts the
    report shows side by side (pick_prompts of the world's eval.jsonl). The report reads them as it
    reads every later stage's answers, and runs no model itself. Written before summary.json, the
    stage's done file, so a finished stage has them."""
    world = world_file(*data_paths)
    eval_file = world.parent / "eval.jsonl" if world is not None else None
    if eval_file is None or not eval_file.is_file():
        return
    rows = pick_prompts([row for _, row in read_jsonl(eval_file, "expected {\"prompt\": [...], ...}")], SIDE_BY_SIDE)
    tokenizer = Tokenizer.load(out / "model")
    if not rows or not tokenizer.has_chat_tokens:
        return
    with torch.random.fork_rng(devices=[]):   # loading draws an initialisation: later stages' RNG stays as it was
        model = load_model(out / "model", head="lm").eval()
    context = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, context // 2)
    ids = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0][-(context - max_new_tokens):] for r in rows]
    with torch.no_grad():
        generated = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                             stop_ids=tokenizer.stop_ids, pad_id=tokenizer.fill_id)
    answers = [{"prompt": r["prompt"], "category": r.get("category"), "heldout": r.get("heldout"),
                "response": tokenizer.decode(t, skip_special=True).strip()} for r, t in zip(rows, generated.tokens)]
    atomic_write_text(out / "eval_answers.jsonl", "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
