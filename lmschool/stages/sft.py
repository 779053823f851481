"""Stage 2, being taught: supervised fine-tuning on conversations, with the loss on the answers.

    lmschool sft --init runs/pretrain --data runs/world/sft.jsonl --eval runs/world/eval.jsonl \\
        --replay runs/world/corpus.txt --out runs/sft [--config configs/sft.yaml] [--resume | --force] \\
        [key=value ...]
    torchrun --nproc_per_node=2 -m lmschool sft ...          # the same, on two processes

--init is a pre-training run directory or a local Hugging Face Llama/Mistral/Qwen directory;
conversations are rendered with its tokenizer's own chat template (lmschool's ChatML for a model it
pre-trained), or the one --chat-template names (chatml, or a Jinja file), which the run saves. The model shape, tokenizer and context (max_seq_len defaults to the
checkpoint's max_position_embeddings) come from it. --data is chat JSONL (`{"messages": [...]}` or
`{"prompt", "completion"}`, see lmschool/data/sft.py for the rules, truncation included).
--replay adds `replay_windows` windows of pre-training text to every step, so that the model does
not forget what it read but is not asked about in SFT (lmschool.data.sft.WithReplay).

Steps: read and check every line of the data (and of --eval) before --out is touched; render them
through the tokenizer's chat template; hold out `val_fraction` of the conversations; train with
the one loop (trainer.fit) on batches padded by length bucket or packed; then write RUN/model (a
Hugging Face checkpoint that stops at its template's end of turn), RUN/summary.json and, with --eval, the answers to
the eval prompts in RUN/eval_answers.jsonl, judged by the school world's teacher (the world.json
beside the eval file) or by --scorer module:function; each record also keeps one answer sampled at
temperature 1 and how it was sampled (`sampled`, `sampled_with`), which DPO's and PPO's judging
read instead of sampling the SFT model again.

summary.json: held-out loss, steps, epochs, examples (dropped / truncated counts), tokens/s, and
with --eval: teacher_score (mean and per category), correct (overall and per category),
fact_correct, correct_train_pupils, correct_heldout_pupils, correct_arithmetic, refusal_correct,
end_of_turn_rate (see lmschool.evaluate.evaluate_generations).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmschool import distributed
from lmschool.adapters import for_training
from lmschool.checkpoint import load_model
from lmschool.config import check
from lmschool.data.pretrain import TokenWindows, load_tokens, prepare
from lmschool.data.prompts import read_prompts
from lmschool.data.sft import SFTBatches, WithReplay, eval_batches, fingerprint, load_examples, split_examples
from lmschool.data.text import check_data, is_row_source, text_fingerprint
from lmschool.data.sources import read_rows
from lmschool.errors import UserError
from lmschool.evaluate import evaluate_generations, evaluate_sampled, judge_demonstrations
from lmschool.files import atomic_write_text
from lmschool.judges import make_judge
from lmschool.losses.lm import IGNORE, lm_loss, target_lm_loss, token_nll
from lmschool.runtime import autocast
from lmschool.stages.common import (Timer, add_chat_template_argument, add_run_arguments, check_same_data, check_vocab, finish_run,
                                    load_stage_config, max_length, open_init, open_run, save_resolved_config,
                                    write_data_info)
from lmschool.trainer import TrainConfig, fit


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the loop's settings (TrainConfig) plus data, batching and evaluation."""

    max_steps: int = 0
    """Optimizer steps; 0 = derived from epochs: ceil(epochs x training conversations / global batch)."""
    epochs: float = 3.0
    """Passes over the training conversations, used when max_steps is 0."""
    batch_size: int = 16
    """Conversations per micro-batch per process; with packing, rows of max_seq_len tokens."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    eval_every: int = 100
    """Held-out loss every this many steps (0 = only at the end)."""
    save_every: int = 200
    """Write a resumable checkpoint every this many steps (0 = only at the end)."""
    max_seq_len: int | None = None
    """Longest example in positions the model reads; null = the checkpoint's max_position_embeddings."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Train on the assistant turns (content and <|im_end|>) only, or on every token."""
    truncation: Literal["drop", "truncate", "error"] = "drop"
    """A conversation longer than max_seq_len: drop it (counted), keep its start, or stop with file:line."""
    packing: bool = False
    """Pack conversations into rows of max_seq_len tokens (attention stays within each) instead of padding them."""
    bucket_batches: int = 32
    """Length bucketing: sort each run of this many global batches by length (1 = off)."""
    pad_multiple: int = 8
    """Round a batch's padded length up to a multiple of this (fewer shapes for compile)."""
    val_fraction: float = 0.05
    """Share of conversations held out for the validation loss (0 = none)."""
    replay_windows: int = 4
    """With --replay: windows of max_seq_len tokens of that text per step per process (next-token loss)."""
    eval_max_new_tokens: int = 128
    """Longest answer generated for each --eval prompt."""
    eval_batch_size: int = 32
    """Conversations per batch of the held-out loss, and prompts answered at once for --eval."""
    eval_temperature: float = 0.0
    """Sampling temperature of the --eval answers (0 = greedy)."""

    def __post_init__(self):
        super().__post_init__()
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.max_seq_len is None or self.max_seq_len >= 8, "max_seq_len", "must be >= 8 (or null)")
        check(self.bucket_batches >= 1, "bucket_batches", "must be >= 1")
        check(self.pad_multiple >= 1, "pad_multiple", "must be >= 1")
        check(0 <= self.val_fraction < 0.5, "val_fraction", "must be in [0, 0.5)")
        check(self.replay_windows >= 1, "replay_windows", "must be >= 1 (leave out --replay for none)")
        check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", "must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(self.eval_temperature >= 0, "eval_temperature", "must be >= 0")


CONFIG = SFTConfig  # what `lmschool run` checks every stage's overrides against before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True, metavar="CKPT",
                        help="the model to fine-tune: a pre-training run or a local HF Llama/Qwen2 directory")
    parser.add_argument("--data", type=Path, action="append", required=True, metavar="FILE",
                        help='chat JSONL: {"messages": [...]} or {"prompt", "completion"} per line; repeatable')
    parser.add_argument("--eval", type=Path, metavar="FILE",
                        help='prompts to answer and judge at the end ({"prompt": ...} JSONL, e.g. eval.jsonl)')
    parser.add_argument("--replay", type=Path, action="append", metavar="SOURCE",
                        help="pre-training text (as for `lmschool pretrain --data`) mixed into every step "
                             "(replay_windows) so the model keeps what it read; repeatable")
    parser.add_argument("--scorer", metavar="MODULE:FUNCTION",
                        help="judge --eval answers with this (prompts, responses) -> [float] function "
                             "instead of the school world's teacher")
    add_chat_template_argument(parser)
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(SFTConfig, args)
    timer = Timer()

    # --- everything is checked before --out is touched ---
    if args.scorer and not args.eval:   # it would be silently unused
        raise UserError("--scorer judges the --eval answers; give --eval FILE too, or leave out --scorer")
    init, tokenizer = open_init(args.init, chat_template=args.chat_template)
    cfg.max_seq_len = max_length(cfg.max_seq_len, "max_seq_len", init)
    examples, stats = load_examples(args.data, tokenizer, cfg.max_seq_len, loss_on=cfg.loss_on,
                                    truncation=cfg.truncation)
    eval_rows = read_prompts(args.eval) if args.eval else None
    scorer = None
    if eval_rows is not None:
        scorer = make_judge(args.scorer, beside=[args.eval], probe=eval_rows[0])
    if args.replay:
        check_data(args.replay)  # readable, UTF-8, not empty
    train, val = split_examples(examples, cfg.val_fraction, cfg.seed)
    dist = distributed.init(cfg.device)
    pad_id = tokenizer.fill_id
    data = SFTBatches(train, cfg.batch_size, seed=cfg.seed, packing=cfg.packing, max_seq_len=cfg.max_seq_len,
                      bucket_batches=cfg.bucket_batches, pad_id=pad_id, pad_multiple=cfg.pad_multiple)
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world_size
    per_epoch = data.steps_per_epoch(global_batch)
    if cfg.max_steps == 0:
        cfg.max_steps = math.ceil(cfg.epochs * per_epoch)

    torch.manual_seed(cfg.seed)
    model = load_model(init, head="lm")   # a damaged --init stops here, before --out is opened
    model = for_training(model, cfg.lora, base=init, seed=cfg.seed)   # lora.r > 0: adapters only
    check_vocab(model, tokenizer, f"--init {init}")
    run = open_run(args.out, args, dist, "sft")
    if run.finished:
        return 0
    out, resuming = run.path, run.resuming
    data_info = {"data": [str(p) for p in args.data], "fingerprint": fingerprint(train),
                 "train_examples": len(train), "val_examples": len(val),
                 "replay": [[str(p), text_fingerprint([p]) if is_row_source(p) else p.stat().st_size]
                            for p in args.replay or []]}
    check_same_data(out, data_info, resuming, keys=("fingerprint", "replay"))
    if args.replay:
        data = WithReplay(data, replay_source(args.replay, tokenizer, out / "replay", cfg, dist, resuming))
    if dist.is_main:
        save_resolved_config(cfg, out)
        write_data_info(out, {**data_info, **vars(stats)})

    def evaluate(m) -> dict:
        return held_out_loss(m, val, cfg.eval_batch_size, pad_id)

    loss_fn = lm_loss if cfg.compile else target_lm_loss  # fixed shapes for compile; else the head at targets only
    trainer, final = fit(model, data, loss_fn, cfg, out, evaluate=evaluate if val else None,
                         tokenizer=tokenizer, extra={"stage": "sft"}, dist=dist, resume=resuming, desc="sft")

    if dist.is_main:
        summary = {
            "stage": "sft",
            "init": str(init),
            "val_loss": final.get("val_loss"),
            "train_loss": final.get("loss"),
            "steps": trainer.step,
            "epochs": trainer.step / per_epoch,
            "train_examples": len(train),
            "val_examples": len(val),
            "rows": stats.rows,
            "dropped_too_long": stats.dropped_too_long,
            "truncated": stats.truncated,
            "max_seq_len": cfg.max_seq_len,
            "loss_on": cfg.loss_on,
            "packing": cfg.packing,
            "replay_windows_per_step": cfg.replay_windows * dist.world_size if args.replay else 0,
            "tokens_seen": trainer.tokens_seen * dist.world_size,
            "tokens_per_s": logged_tokens_per_s(out / "metrics.jsonl"),
        }
        if eval_rows is not None:
            model = trainer.model.eval()
            with autocast(trainer.device, trainer.precision):  # answers in bf16 where it is fast
                results, records = evaluate_generations(
                    model, tokenizer, eval_rows, scorer, max_new_tokens=cfg.eval_max_new_tokens,
                    batch_size=cfg.eval_batch_size, temperature=cfg.eval_temperature, seed=cfg.seed)
                # the distribution feedback starts from: sampled answers, their flaws (school world);
                # kept in the records, where DPO's and PPO's judging read them instead of sampling again
                sampled, per_row = evaluate_sampled(
                    model, tokenizer, eval_rows, scorer, max_new_tokens=cfg.eval_max_new_tokens,
                    batch_size=cfg.eval_batch_size, seed=cfg.seed)
                summary.update(sampled)
                for i, fields in per_row.items():
                    records[i].update(fields)
            summary.update(results)
            summary.update(judge_demonstrations(scorer, read_conversations(args.data)))
            summary.update(scorer=args.scorer or "teacher", eval_precision=trainer.precision)
            atomic_write_text(out / "eval_answers.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        summary["seconds"] = timer.seconds
        finish_run(run, summary)
        print_summary("sft", summary, run.out / "model")
    distributed.barrier()   # the group is left by cli.main, once this run's models are freed
    return 0


def read_conversations(paths: list[Path]) -> list[dict]:
    """The rows of the --data files, as written (for judging the demonstrations themselves)."""
    return [row for path in paths for _, row in read_rows(path, "--data")]


def replay_source(paths: list[Path], tokenizer, directory: Path, cfg: SFTConfig, dist,
                  resuming: bool) -> TokenWindows:
    """Tokenise the --replay text into RUN/replay (rank 0, once) and serve windows of it."""
    if dist.is_main and not (resuming and (directory / "meta.json").is_file()):
        prepare(list(paths), tokenizer, directory, val_fraction=0.01, seed=cfg.seed)
    distributed.barrier()
    return TokenWindows(load_tokens(directory, "train"), cfg.max_seq_len, cfg.replay_windows, seed=cfg.seed + 1)


@torch.no_grad()
def held_out_loss(model, examples, batch_size: int, pad_id: int) -> dict:
    """Mean next-token loss over the trained tokens of held-out conversations."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id):
        labels = batch["labels"].to(device)
        nll = token_nll(model(batch["input_ids"].to(device)), labels)              # (B, T)
        total += nll.sum().item()
        n += int((labels != IGNORE).sum())
    return {"val_loss": total / max(n, 1)}


def logged_tokens_per_s(path: Path) -> float | None:
    """Median of the logged training speeds (real, non-padding tokens per second), the first left out."""
    import statistics
    speeds = [r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "tokens_per_s" in r]
    return statistics.median(speeds[1:] or speeds) if speeds else None


def print_summary(stage: str, s: dict, model_dir: Path) -> None:
    def pct(key):
        return "n/a" if s.get(key) is None else f"{s[key]:.0%}"

    line = f"{stage}: {s['steps']} steps ({s['epochs']:.1f} epochs) in {s['seconds']:.0f}s"
    if s.get("val_loss") is not None:
        line += f", held-out loss {s['val_loss']:.4f}"
    print(line + f" -> {model_dir}")
    if s.get("dropped_too_long") or s.get("truncated"):
        print(f"{stage}: {s['dropped_too_long']} conversations dropped and {s['truncated']} truncated "
              f"for being longer than max_seq_len={s['max_seq_len']}")
    if "teacher_score" in s:
        print(f"{stage}: teacher score {s['teacher_score']:.3f}; correct: train pupils "
              f"{pct('correct_train_pupils')}, held-out pupils {pct('correct_heldout_pupils')}, arithmetic "
              f"{pct('correct_arithmetic')}, refusals {pct('refusal_correct')}; end of turn "
              f"{pct('end_of_turn_rate')}")
    elif "score" in s:
        print(f"{stage}: mean score {s['score']:.3f}; end of turn {pct('end_of_turn_rate')}")
