"""SFT throughput: lmschool vs TRL's `SFTTrainer`, side by side in one run, on CPU.

    .venv/bin/python bench/bench_sft.py [--steps 40] [--warmup 6] [--threads 2] [--json out.json]

Same model on both sides: "L4-256" (vocab 4096, hidden 256, intermediate 688, 4 layers, 4 heads,
tied embeddings; random init from the same weights), with a 4096-token BPE tokenizer trained on the
school world's corpus. Same data: the school world's sft.jsonl (default preset, seed 0), rendered by
the same ChatML template (TRL reads our tokenizer_config.json's template, whose `{% generation %}`
markers give it the same assistant-only loss mask: `assistant_only_loss=True`). Same batch: 8 per
step (see below), at most 256 tokens per conversation, AdamW lr 1e-3, grad clip 1.

Tokens/s counts the same thing on both sides: real (non-padding) tokens of the conversations a step
trains on, i.e. the rendered length of each conversation, over the wall time of the measured steps,
each timed from the previous step's end (data collation, forward, backward, optimizer), after
`--warmup` steps (20 more for torch.compile, which compiles then).

Rows: TRL fp32 and bf16, with and without gradient checkpointing (its default; it only saves
memory), bf16 with length-grouped batches, and bf16 with packing (its default `bfd`, padding-free,
and `wrapped`); lmschool fp32, bf16, bf16 + torch.compile, padded (length-bucketed) and packed. "Batch
8" means 8 conversations when padding and 8 rows of 256 tokens when packing, on both sides (TRL's
meaning of packing). The bar (issue 4): lmschool's best >= 2x TRL's fastest row. Nothing is
downloaded (HF_HUB_OFFLINE). Results: bench/RESULTS_sft.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmschool.checkpoint import save_model  # noqa: E402
from lmschool.data.sft import SFTBatches, load_examples  # noqa: E402
from lmschool.losses.lm import lm_loss  # noqa: E402
from lmschool.model import ModelConfig, build_model  # noqa: E402
from lmschool.tokenizer import train_tokenizer  # noqa: E402
from lmschool.trainer import TrainConfig, Trainer  # noqa: E402

L4_256 = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
SEQ, BATCH, LR = 256, 8, 1e-3


def school_world(tmp: Path, preset: str) -> Path:
    from lmschool.world.build import write
    write(tmp / "world", seed=0, preset_name=preset)
    return tmp / "world"


def lmschool_row(examples, lengths, precision, packing, compile_, steps, warmup, run_dir) -> dict:
    """Steps of trainer.train_step on SFTBatches, timed from one step's end to the next."""
    data = SFTBatches(examples, BATCH, seed=0, packing=packing, max_seq_len=SEQ, pad_id=1)
    cfg = TrainConfig(max_steps=10 ** 6, batch_size=BATCH, lr=LR, warmup_steps=0, schedule="constant",
                      precision=precision, compile=compile_, device="cpu", grad_clip=1.0)
    trainer = Trainer(build_model(L4_256, seed=0), lm_loss, cfg, run_dir, progress=False)
    times, tokens = [], []
    t = time.perf_counter()
    for step in range(warmup + steps):
        trainer.train_step(data.micro_batches(step, 1, 0, 1))
        now = time.perf_counter()
        if step >= warmup:
            times.append(now - t)
            tokens.append(sum(lengths[i] for unit in data.global_batch(step, BATCH) for i in unit))
        t = now
    return {"tokens_per_s": sum(tokens) / sum(times), "tokens_per_step": statistics.mean(tokens)}


def trl_row(model_dir: Path, sft_file: Path, precision: str, gradient_checkpointing: bool,
            grouped: bool, packing: str | None, steps: int, warmup: int, out_dir: Path) -> dict:
    import transformers
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(sft_file), split="train").select_columns(["messages"])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_length=SEQ, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        max_steps=warmup + steps, bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=10 ** 6, assistant_only_loss=True, gradient_checkpointing=gradient_checkpointing,
        train_sampling_strategy="group_by_length" if grouped else "random",
        packing=packing is not None, packing_strategy=packing or "bfd", padding_free=packing == "bfd",
        dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    ends, tokens = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                              callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = ends[-1] - ends[warmup - 1]
    return {"tokens_per_s": sum(tokens[warmup:]) / seconds, "tokens_per_step": statistics.mean(tokens[warmup:]),
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["trl", "lmschool"], help="run one side only (for debugging)")
    ap.add_argument("--preset", default="default", help="school world preset (tiny: a quick smoke run)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = school_world(tmp, args.preset)
        texts = [line for line in (world / "corpus.txt").read_text().splitlines()]
        tokenizer = train_tokenizer(texts, vocab_size=L4_256.vocab_size)
        model_dir = tmp / "l4"
        save_model(model_dir, build_model(L4_256, seed=0), tokenizer)
        # the conversations that fit SEQ tokens (all but a few), in one file both sides read
        lines = [line for line in (world / "sft.jsonl").read_text().splitlines()
                 if len(tokenizer.render(json.loads(line)["messages"])[0]) <= SEQ]
        sft_file = tmp / "sft.jsonl"
        sft_file.write_text("".join(line + "\n" for line in lines))
        examples, stats = load_examples([sft_file], tokenizer, SEQ)
        # each example's rendered length (the same count TRL's attention mask gives)
        lengths = [len(tokenizer.render(json.loads(line)["messages"])[0]) for line in lines]
        assert stats.dropped_too_long == 0 and len(lengths) == len(examples)
        print(f"school world sft.jsonl: {len(examples)} conversations, mean {statistics.mean(lengths):.1f} "
              f"tokens; batch {BATCH}, max length {SEQ}, {args.threads} threads", flush=True)

        trl_configs = [("fp32", True, False, None), ("fp32", False, False, None),
                       ("bf16", True, False, None), ("bf16", False, False, None),
                       ("bf16", False, True, None), ("bf16", False, False, "bfd"), ("bf16", False, False, "wrapped")]
        ours = [("fp32", False, False), ("bf16", False, False), ("bf16", False, True), ("fp32", True, False),
                ("bf16", True, False), ("bf16", True, True)]
        if args.only != "lmschool":
            for precision, gc, grouped, packing in trl_configs:
                r = trl_row(model_dir, sft_file, precision, gc, grouped, packing, args.steps, args.warmup,
                            tmp / "trl")
                kind = {"bfd": "packing (bfd, padding-free)", "wrapped": "packing (wrapped)"}
                name = (f"TRL SFTTrainer {precision}" + (", gradient checkpointing" if gc else "")
                        + (", group_by_length" if grouped else "") + (f", {kind[packing]}" if packing else ""))
                rows.append({"side": "trl", "name": name, **r})
                print(f"{name:60s} {r['tokens_per_s']:8.0f} tok/s", flush=True)
        if args.only != "trl":
            for precision, packing, comp in ours:
                warm = args.warmup + (20 if comp else 0)
                r = lmschool_row(examples, lengths, precision, packing, comp, args.steps, warm, tmp / "run")
                name = f"lmschool {precision}" + (", packing" if packing else "") + (", torch.compile" if comp else "")
                rows.append({"side": "lmschool", "name": name, **r})
                print(f"{name:60s} {r['tokens_per_s']:8.0f} tok/s", flush=True)

    print()
    trl_best = max((r for r in rows if r["side"] == "trl"), key=lambda r: r["tokens_per_s"], default=None)
    print("| configuration | tokens/s | tokens/step | vs TRL's fastest |")
    print("|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / trl_best['tokens_per_s']:.2f}x" if trl_best else "-"
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_step']:.0f} | {ratio} |")
    if args.json:
        import transformers
        import trl
        args.json.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "trl": trl.__version__,
                                         "transformers": transformers.__version__,
                                         "machine": platform.processor(), "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
