"""Reward-model training throughput: lmschool (`lmschool reward`) vs TRL's `RewardTrainer`, side by side, on CPU.

    .venv/bin/python bench/bench_reward.py [--steps 20] [--warmup 3] [--batch 8] [--threads 2] [--rounds 2]
        [--precisions fp32 bf16] [--json out.json] [--lmschool-set KEY=VALUE ...]

Same model on both sides: the SFT checkpoint runs/demo2/sft/model (Llama, vocab 2286, hidden 256,
4 layers) with its LM head replaced by a new scalar head (lmschool: `load_model(..., head="score",
new_head=True)` inside the reward stage; TRL: `AutoModelForSequenceClassification.from_pretrained(...,
num_labels=1)`). Same loss (Bradley-Terry, -log sigma(r_c - r_r), no margin, no centring), AdamW lr 3e-4
(10 warm-up steps, cosine), weight decay 0, beta2 0.95, grad clip 1, max length 256 (the checkpoint's
context; no pair is longer, so neither side cuts or drops one), gradient checkpointing off on both sides
(TRL's configs turn it on by default).

Same pairs in the same micro-batches: the file is the first (warmup + steps) x batch "train" pairs of
runs/demo2/label/prefs.jsonl (conversational format, with their "group"). lmschool lays them out as
`lmschool reward` does (`PairBatches`: a prompt group's pairs share a micro-batch where they fit, length
bucketing over 16 batches, seed 0), so a micro-batch holds *up to* `--batch` pairs. This script computes
that layout once and gives TRL exactly those micro-batches (a batch sampler over the same rows), so both
sides train on the same pairs, step for step; the lmschool child checks that it saw that layout.
pairs/s = pairs in the measured steps / their wall time, each step timed from the previous step's end
(data, forward, backward, optimizer), after `--warmup` steps; steps/s and rows/s (forward rows) likewise.

What still differs, by each library's design (reported per run as rows/pair and padded tokens/pair):
- rows: lmschool forwards one row per *distinct* answer of a micro-batch (`collate_unique`: K answers to a
  prompt give up to C(K, 2) pairs but K rows; prefs.jsonl also repeats pairs), TRL two rows per pair;
- the score's position: lmschool reads it at the answer's `<|im_end|>`; TRL renders the whole conversation
  with the chat template, which adds the "\\n" after `<|im_end|>`, and reads the last non-pad token (one
  token more per row);
- padding: lmschool pads a batch to a multiple of 8 tokens and runs causal attention with no mask (right
  padding never reaches the scored token); TRL pads to the longest row and passes an attention mask (sdpa).

Each (side, precision) runs in its own child process (this script with --child), the sides alternating,
`--rounds` times; medians are reported. lmschool runs in-process through `lmschool.cli.main(["reward",
...])` with `Trainer.train_step` wrapped to timestamp each step (test_fraction=0: no held-out
evaluation; the bias pass after training is outside the timed steps); TRL with `logging_steps` huge, no
saving, no tqdm.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sides import add_common_arguments, medians, print_versions, run_child, run_rounds, write_json


ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs/demo2/sft/model"
PREFS = ROOT / "runs/demo2/label/prefs.jsonl"
LR, WARMUP_STEPS, MAX_LEN, SEED = 3e-4, 10, 256, 0
# lmschool's batching, passed to the stage and used here to compute the layout TRL replays
LAYOUT = {"group_batches": True, "bucket_batches": 16}


def write_pairs(path: Path, n: int) -> None:
    """The first n "train" pairs of prefs.jsonl, with prompt/chosen/rejected and the prompt group."""
    out = []
    for line in PREFS.read_text().splitlines():
        row = json.loads(line)
        if row.get("split", "train") == "train":
            out.append(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected", "group") if k in row}))
        if len(out) == n:
            break
    assert len(out) == n, f"only {len(out)} train pairs"
    path.write_text("".join(o + "\n" for o in out))


def lmschool_layout(data: Path, batch: int, n_steps: int) -> list[list[int]]:
    """The pair indices of the first n_steps micro-batches `lmschool reward` trains on (epoch 0)."""
    sys.path.insert(0, str(ROOT))
    from lmschool.data.preference import PairBatches, read_pairs
    from lmschool.tokenizer import Tokenizer

    batches = PairBatches(read_pairs(data), Tokenizer.load(MODEL), batch, MAX_LEN, seed=SEED, unique_rows=True,
                          **LAYOUT)
    layout = batches.layout(0)
    assert len(layout) >= n_steps, f"{len(layout)} micro-batches, fewer than {n_steps} steps"
    return layout[:n_steps]


def measured(a, ends: list[float], shapes: list[tuple[int, int, int]]) -> dict:
    """Throughput of the steps after warm-up. shapes: (pairs, rows, padded tokens) per step."""
    seconds = ends[-1] - ends[a.warmup - 1]
    timed = shapes[a.warmup:]
    pairs = sum(p for p, _, _ in timed)
    rows = sum(r for _, r, _ in timed)
    return {"pairs_per_s": pairs / seconds, "steps_per_s": len(timed) / seconds, "rows_per_s": rows / seconds,
            "steps_timed": len(timed), "pairs_timed": pairs, "rows_per_pair": rows / pairs,
            "tokens_per_pair": sum(t for _, _, t in timed) / pairs}


def lmschool_child(a, data: Path, layout: list[list[int]], tmp: Path) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from lmschool import cli
    from lmschool.trainer import Trainer

    ends, shapes, seen = [], [], []
    orig_step = Trainer.train_step

    def train_step(self, micro):
        r = orig_step(self, micro)
        ends.append(time.perf_counter())
        (batch,) = micro                                    # grad_accum 1: one micro-batch per step
        ids = batch["input_ids"]                            # (distinct answers, T)
        seen.append(batch["index"].tolist())
        shapes.append((batch["num_targets"], ids.shape[0], ids.numel()))
        return r

    Trainer.train_step = train_step
    out = tmp / "run"
    rc = cli.main(["reward", "--init", str(MODEL), "--data", str(data), "--out", str(out),
                   f"lr={LR}", f"warmup_steps={WARMUP_STEPS}", "schedule=cosine", "weight_decay=0.0",
                   "beta2=0.95", "grad_clip=1.0", f"max_steps={a.warmup + a.steps}", f"batch_size={a.batch}",
                   f"max_seq_len={MAX_LEN}", f"seed={SEED}", "test_fraction=0",
                   *(f"{k}={str(v).lower()}" for k, v in LAYOUT.items()), f"threads={a.threads}",
                   f"precision={a.precision}", "log_every=1000000", "save_every=0", "device=cpu", *a.lmschool_set])
    assert rc == 0, rc
    assert seen == layout, "lmschool trained on other micro-batches than the layout TRL was given"
    assert torch.get_num_threads() == a.threads, torch.get_num_threads()
    summary = json.loads((out / "summary.json").read_text())
    return {**measured(a, ends, shapes), "train_loss": summary.get("train_loss")}


def trl_child(a, data: Path, layout: list[list[int]], tmp: Path) -> dict:
    import torch
    import transformers
    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(a.threads)
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp / "hf_cache"))
    torch.manual_seed(SEED)                              # the new score head's init, as lmschool seeds its own
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        MODEL, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    args = RewardConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=a.batch, max_length=MAX_LEN,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP_STEPS, weight_decay=0.0,
        adam_beta2=0.95, max_grad_norm=1.0, max_steps=a.warmup + a.steps, bf16=a.precision == "bf16",
        gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10 ** 6,
        dataloader_num_workers=0, seed=SEED, disable_tqdm=True)
    ends, shapes = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *x, **kw):
            ends.append(time.perf_counter())

    class LayoutRewardTrainer(RewardTrainer):
        """RewardTrainer that trains on lmschool's micro-batches (a batch sampler) instead of random ones."""

        def get_train_dataloader(self):
            rows = self._remove_unused_columns(self.train_dataset, description="Training")
            return self.accelerator.prepare(DataLoader(rows, batch_sampler=layout, collate_fn=self.data_collator))

        def compute_loss(self, model, inputs, *x, **kw):
            if model.training:
                ids = inputs["input_ids"]                   # (2B, T): chosen rows, then rejected rows
                shapes.append((ids.shape[0] // 2, ids.shape[0], ids.numel()))
            return super().compute_loss(model, inputs, *x, **kw)

    trainer = LayoutRewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                  callbacks=[Timer()])
    assert len(trainer.train_dataset) == len(dataset), "TRL dropped pairs longer than max_length"
    out = trainer.train()
    assert torch.get_num_threads() == a.threads, torch.get_num_threads()
    assert [p for p, _, _ in shapes] == [len(b) for b in layout], "TRL's batches differ from the layout"
    return {**measured(a, ends, shapes), "train_loss": out.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch (at most; see the docstring)")
    add_common_arguments(ap)
    ap.add_argument("--layout", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be >= 1 (a step's time runs from the previous step's end)")

    if a.child:
        run_child(a, {"lmschool": lmschool_child, "trl": trl_child}, json.loads(a.layout.read_text()))
        return

    versions = print_versions()
    with tempfile.TemporaryDirectory() as tmp:
        data, layout_file = Path(tmp) / "pairs.jsonl", Path(tmp) / "layout.json"
        write_pairs(data, (a.warmup + a.steps) * a.batch)
        layout = lmschool_layout(data, a.batch, a.warmup + a.steps)
        layout_file.write_text(json.dumps(layout))
        print(f"{sum(map(len, layout))} pairs in {len(layout)} micro-batches of up to {a.batch}", flush=True)
        results = run_rounds(
            a.rounds, a.precisions,
            lambda side, precision: [sys.executable, __file__, "--child", side, "--precision", precision,
                                     "--data", str(data), "--layout", str(layout_file), "--steps", str(a.steps),
                                     "--warmup", str(a.warmup), "--batch", str(a.batch),
                                     "--threads", str(a.threads), "--lmschool-set", *a.lmschool_set],
            lambda res: (f"{res['pairs_per_s']:.1f} pairs/s, {res['steps_per_s']:.2f} steps/s, "
                         f"{res['rows_per_pair']:.2f} rows/pair (loss {res['train_loss']:.4f})"))

    print(f"\nmedians over {a.rounds} rounds; up to {a.batch} pairs per step, {a.steps} steps after {a.warmup} "
          f"warm-up, {a.threads} threads\n")
    print("| side | precision | pairs/s | steps/s | rows/s | rows/pair | padded tokens/pair | ratio vs TRL (pairs/s) |")
    print("|------|-----------|---------|---------|--------|-----------|--------------------|------------------------|")
    table = []
    for precision in a.precisions:
        med = medians(results, precision, ["pairs_per_s", "steps_per_s", "rows_per_s", "rows_per_pair",
                                           "tokens_per_pair"])
        for side, m in med.items():
            ratio = m["pairs_per_s"] / med["trl"]["pairs_per_s"] if "trl" in med else float("nan")
            print(f"| {side} | {precision} | {m['pairs_per_s']:.1f} | {m['steps_per_s']:.2f} | {m['rows_per_s']:.1f} | "
                  f"{m['rows_per_pair']:.2f} | {m['tokens_per_pair']:.0f} | {ratio:.2f}x |")
            table.append({"side": side, "precision": precision, **m, "ratio_vs_trl": ratio})
    write_json(a.json, versions, table, results, layout=layout)


if __name__ == "__main__":
    main()
