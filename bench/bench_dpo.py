"""DPO step throughput: lmschool (`lmschool dpo`) vs TRL's `DPOTrainer`, side by side in one run, on CPU.

    .venv/bin/python bench/bench_dpo.py [--steps 20] [--warmup 3] [--batch 8] [--threads 2] [--rounds 2]
        [--precisions fp32 bf16] [--json out.json] [--lmschool-set KEY=VALUE ...]

Same model on both sides: the SFT checkpoint runs/demo2/sft/model (LlamaForCausalLM, vocab 2286,
hidden 256, 4 layers) with its tokenizer and ChatML template. Same data: the first
(warmup + steps) x batch "train" pairs of runs/demo2/label/prefs.jsonl (TRL conversational format),
so one run is one epoch over exactly those pairs on both sides and both reference passes cover the
same pairs. Same loss (sigmoid DPO, beta 0.1), batch size, AdamW lr 1e-5, weight decay 0, grad clip 1,
max length 256 (the checkpoint's context), reference log-probs precomputed before training
(lmschool: reference=cached; TRL: precompute_ref_log_probs=True), both reference passes in batches
of `--batch` pairs.

Each (side, precision) runs in its own child process (this script with --child), the sides alternating,
`--rounds` times; medians are reported. pairs/s = batch x steps / wall time of the measured steps, each
timed from the previous step's end (data, forward, backward, optimizer), after `--warmup` steps.
The reference pass is timed on its own (lmschool: around reference_logprobs; TRL: around
_precompute_ref_logps, which runs in DPOTrainer.__init__). Results: bench/RESULTS_dpo.md.
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
BETA, LR, MAX_LEN = 0.1, 1e-5, 256


def write_pairs(path: Path, n: int) -> None:
    out = []
    for line in PREFS.read_text().splitlines():
        row = json.loads(line)
        if row.get("split", "train") == "train":
            out.append(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}))
        if len(out) == n:
            break
    assert len(out) == n, f"only {len(out)} train pairs"
    path.write_text("".join(o + "\n" for o in out))


def lmschool_child(a, data: Path, tmp: Path) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    import lmschool.stages.dpo as dpo
    from lmschool import cli
    from lmschool.trainer import Trainer

    ends, ref = [], {}
    orig_step, orig_ref = Trainer.train_step, dpo.reference_logprobs

    def train_step(self, micro):
        r = orig_step(self, micro)
        ends.append(time.perf_counter())
        return r

    def reference_logprobs(*args, **kw):
        t = time.perf_counter()
        r = orig_ref(*args, **kw)
        ref["s"] = time.perf_counter() - t
        return r

    Trainer.train_step, dpo.reference_logprobs = train_step, reference_logprobs
    out = tmp / "run"
    rc = cli.main(["dpo", "--init", str(MODEL), "--data", str(data), "--out", str(out),
                   "loss=dpo", f"beta={BETA}", f"lr={LR}", f"max_steps={a.warmup + a.steps}",
                   f"batch_size={a.batch}", f"eval_batch_size={a.batch}", f"threads={a.threads}",
                   f"precision={a.precision}", f"max_len={MAX_LEN}", "log_every=1000000", "device=cpu",
                   *a.lmschool_set])
    assert rc == 0, rc
    summary = json.loads((out / "summary.json").read_text())
    assert torch.get_num_threads() == a.threads, torch.get_num_threads()
    seconds = ends[-1] - ends[a.warmup - 1]
    return {"pairs_per_s": a.batch * a.steps / seconds, "ref_pass_s": ref["s"],
            "summary_seconds_reference_pass": summary.get("seconds_reference_pass"),
            "steps_timed": len(ends) - a.warmup, "train_loss": summary.get("train_loss")}


def trl_child(a, data: Path, tmp: Path) -> dict:
    import torch
    import transformers
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    # a fresh datasets cache each run: TRL caches precomputed reference log-probs on disk by fingerprint
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp / "hf_cache"))
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    args = DPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=a.batch, max_length=MAX_LEN, beta=BETA,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, adam_beta2=0.95,
        max_grad_norm=1.0, max_steps=a.warmup + a.steps, bf16=a.precision == "bf16", use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10 ** 6, precompute_ref_log_probs=True,
        precompute_ref_batch_size=a.batch, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        gradient_checkpointing=False)  # TRL 1.x turns it on by default: off, as lmschool does not recompute
    ends, ref = [], {}

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *x, **kw):
            ends.append(time.perf_counter())

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *x, **kw):
            t = time.perf_counter()
            r = super()._precompute_ref_logps(*x, **kw)
            ref["s"] = time.perf_counter() - t
            return r

    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                              callbacks=[Timer()])
    out = trainer.train()
    assert torch.get_num_threads() == a.threads, torch.get_num_threads()
    seconds = ends[-1] - ends[a.warmup - 1]
    return {"pairs_per_s": a.batch * a.steps / seconds, "ref_pass_s": ref["s"],
            "steps_timed": len(ends) - a.warmup, "train_loss": out.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    add_common_arguments(ap)
    a = ap.parse_args()

    if a.child:
        run_child(a, {"lmschool": lmschool_child, "trl": trl_child})
        return

    versions = print_versions()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data, (a.warmup + a.steps) * a.batch)
        results = run_rounds(
            a.rounds, a.precisions,
            lambda side, precision: [sys.executable, __file__, "--child", side, "--precision", precision,
                                     "--data", str(data), "--steps", str(a.steps), "--warmup", str(a.warmup),
                                     "--batch", str(a.batch), "--threads", str(a.threads),
                                     "--lmschool-set", *a.lmschool_set],
            lambda res: (f"{res['pairs_per_s']:.1f} pairs/s, reference pass {res['ref_pass_s']:.2f}s "
                         f"(loss {res['train_loss']:.4f})"))
    print(f"\nmedians over {a.rounds} rounds; batch {a.batch} pairs, {a.steps} steps after {a.warmup} warm-up, "
          f"{a.threads} threads")
    print(f"{'side':9s} {'prec':5s} {'pairs/s':>8s} {'ref s':>7s} {'ratio':>6s}")
    table = []
    for precision in a.precisions:
        med = medians(results, precision, ["pairs_per_s", "ref_pass_s"])
        for side, m in med.items():
            ratio = m["pairs_per_s"] / med["trl"]["pairs_per_s"] if "trl" in med else float("nan")
            print(f"{side:9s} {precision:5s} {m['pairs_per_s']:8.1f} {m['ref_pass_s']:7.2f} {ratio:6.2f}x")
            table.append({"side": side, "precision": precision, **m, "ratio_vs_trl": ratio})
    write_json(a.json, versions, table, results)

if __name__ == "__main__":
    main()
