"""GRPO iteration time: lmschool (`lmschool ppo`, advantage=grpo) vs TRL's `GRPOTrainer`, side by side, on CPU.

    .venv/bin/python bench/bench_grpo.py [--iterations 20] [--warmup 3] [--prompts-per-step 2] [--group 4]
        [--threads 2] [--rounds 2] [--precisions fp32 bf16] [--json out.json] [--lmschool-set KEY=VALUE ...]

One iteration = sample `group` completions for each of `prompts-per-step` prompts (8 per iteration by
default: 2 x 4), score them, compute the reference log-probs, and take one optimizer step on them (one
GRPO epoch, the whole rollout as one minibatch). Same on both sides:
- model: the SFT checkpoint runs/demo2/sft/model (Llama, vocab 2286, hidden 256, 4 layers) as the policy
  and as the frozen reference, its tokenizer and ChatML template; sampling stops at `<|im_end|>` or
  `<|endoftext|>` (lmschool: the tokenizer's stop ids; TRL: generation_config.json's eos_token_id [0, 3])
  or after 64 new tokens; temperature 1.0, no top-k / top-p;
- prompts: the first (warmup + iterations) x prompts-per-step prompts of runs/demo2/world/prompts.jsonl
  (conversational), each iteration the same ones on both sides: lmschool draws them with its seeded
  permutation (`PPO.prompt_indices`), and TRL gets the dataset in that order with shuffle_dataset=False
  (both children check it);
- reward: a teacher-free toy scorer, `letter_e_score` below (how many times "e" appears in the answer,
  over 10), a pure Python function of the completion's text; no missing-EOS penalty (lmschool's
  missing_eos_penalty=0; TRL has none);
- loss: clipped surrogate (eps 0.2) on group-normalised advantages ((r - mean) / std over the G samples of
  a prompt; lmschool scale_group_std, TRL scale_rewards="group"), token mean over the rollout (TRL
  loss_type "dapo"), plus beta x the k3 KL to the reference in the loss with beta 0.04 (lmschool
  kl_coef=0.04 kl_estimator=k3 kl_in_loss=true; TRL beta=0.04); AdamW lr 3e-5 constant, weight decay 0,
  beta2 0.95, grad clip 1; gradient checkpointing off (TRL's configs turn it on by default).

What differs, by each library's design:
- generation: lmschool's own KV-cache sampler (packed weights on CPU, finished rows dropped from the
  batch); TRL `model.generate` of transformers (DynamicCache, left padding, every row until all finish);
- old log-probs: lmschool always recomputes the policy's log-probs of the rollout in a no-grad pass
  (for the ratio, the entropy and the sampler mismatch metric); TRL skips that pass when generation and
  optimizer steps line up (as here: num_iterations 1, steps_per_generation 1) and uses the detached
  log-probs of the training forward instead, so lmschool does one forward more per iteration;
- TRL multiplies the k3 term by the importance ratio (use_bias_correction_kl, its default; the ratio is
  1 here, so only the compute differs);
- bf16: lmschool runs generation, scoring and the update under bf16 autocast; TRL gets `bf16=True`, and
  accelerate wraps the model's forward in bf16 autocast, which its generation goes through too (the
  unwrapped model keeps the wrapper); weights stay fp32 on both sides.
Sampling draws differ (different samplers and seeds), so the completions, and their lengths, differ
between the sides: each run reports its mean completion length; compare it before reading the ratio.
(The toy reward favours answers with more e's, so on both sides completions tend to lengthen over a run.)

Each (side, precision) runs in its own child process (this script with --child), the sides alternating,
`--rounds` times. Seconds per iteration: the median, over the iterations after `--warmup`, of the time
from one iteration's end to the next's (rollout, scoring, update, the loop's bookkeeping); then the median
over rounds. Generation share: time in the sampler (lmschool: its `rollout_seconds`, the `generate` call;
TRL: `_generate_single_turn`, i.e. `model.generate` and the EOS masking) over the measured iterations'
time. lmschool runs in-process through `lmschool.cli.main(["ppo", ...])` with `PPO.iteration` wrapped
(no --eval, no checkpoints, the prompts file copied to a directory without world.json so that no teacher
score is computed); TRL with `logging_steps` huge, no saving, no tqdm, use_vllm=False.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sides import add_common_arguments, medians, print_versions, run_child, run_rounds, write_json


ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs/demo2/sft/model"
PROMPTS = ROOT / "runs/demo2/world/prompts.jsonl"
LR, BETA, CLIP_EPS, MAX_NEW_TOKENS, TEMPERATURE, SEED = 3e-5, 0.04, 0.2, 64, 1.0, 0


# ---- the toy reward, one function for both sides ------------------------------------------------------

def letter_e_score(text: str) -> float:
    """How many times the letter "e" appears in an answer, over 10: cheap, teacher-free, deterministic."""
    return text.count("e") / 10


def lmschool_scorer(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """lmschool's --scorer signature: (prompts as message lists, response texts) -> one float each."""
    return [letter_e_score(r) for r in responses]


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward-function signature; conversational completions are [{"role": "assistant", ...}]."""
    return [letter_e_score(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


# ---- data -------------------------------------------------------------------------------------------

def write_prompts(path: Path, n: int) -> None:
    """The first n prompts of prompts.jsonl ({"prompt": [messages]} only)."""
    lines = PROMPTS.read_text().splitlines()[:n]
    assert len(lines) == n, f"only {len(lines)} prompts"
    path.write_text("".join(json.dumps({"prompt": json.loads(ln)["prompt"]}) + "\n" for ln in lines))


def lmschool_prompt_order(n: int, per_step: int, n_steps: int) -> list[list[int]]:
    """The prompt indices (into the file) of each iteration, as `lmschool ppo` draws them."""
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT))
    from lmschool.stages.ppo import PPO, PPOConfig

    loop = SimpleNamespace(prompts=[None] * n, cfg=PPOConfig(batch_size=per_step, seed=SEED))
    return [PPO.prompt_indices(loop, step) for step in range(n_steps)]


# ---- the two sides ----------------------------------------------------------------------------------

def measured(a, ends: list[float], gen_s: list[float], lengths: list[float]) -> dict:
    """Per-iteration figures after warm-up; iteration i's time runs from iteration i-1's end."""
    times = [t1 - t0 for t0, t1 in zip(ends[a.warmup - 1:], ends[a.warmup:])]
    gen = gen_s[a.warmup:]
    return {"s_per_iter": statistics.median(times), "s_per_iter_mean": statistics.mean(times),
            "gen_s_per_iter": statistics.median(gen), "gen_share": sum(gen) / sum(times),
            "completion_len": statistics.mean(lengths[a.warmup:]), "iters_timed": len(times)}


def lmschool_child(a, prompts: Path, order: list[list[int]], tmp: Path) -> dict:
    import shutil

    import torch
    sys.path.insert(0, str(ROOT))
    from lmschool import cli
    from lmschool.stages.ppo import PPO

    ends, gen_s, lengths, seen = [], [], [], []
    orig_iteration = PPO.iteration

    def iteration(self):
        seen.append(self.prompt_indices(self.step))
        metrics = orig_iteration(self)
        ends.append(time.perf_counter())
        gen_s.append(metrics["rollout_seconds"])             # the generate() call
        lengths.append(metrics["response_length"])           # mean tokens per completion
        return metrics

    PPO.iteration = iteration
    # a directory with no world.json beside the prompts: no teacher score in the loop
    (tmp / "prompts").mkdir()
    local = shutil.copy(prompts, tmp / "prompts" / "prompts.jsonl")
    out = tmp / "run"
    G, P = a.group, a.prompts_per_step
    rc = cli.main(["ppo", "--init", str(MODEL), "--scorer", "__main__:lmschool_scorer", "--prompts", str(local),
                   "--out", str(out), "advantage=grpo", f"group_size={G}", f"batch_size={P}",
                   f"minibatch_size={G * P}", "ppo_epochs=1", f"max_new_tokens={MAX_NEW_TOKENS}",
                   f"temperature={TEMPERATURE}", f"clip_eps={CLIP_EPS}", f"kl_coef={BETA}", "kl_estimator=k3",
                   "kl_in_loss=true", "whiten_advantages=false", "scale_group_std=true",
                   "missing_eos_penalty=0.0", f"lr={LR}", "schedule=constant", "warmup_steps=0",
                   "weight_decay=0.0", "beta2=0.95", "grad_clip=1.0", f"max_steps={a.warmup + a.iterations}",
                   f"seed={SEED}", "save_every=0", "log_every=1000000", f"threads={a.threads}",
                   f"precision={a.precision}", "device=cpu", *a.lmschool_set])
    assert rc == 0, rc
    assert seen == order, "lmschool sampled other prompts than the order TRL was given"
    assert torch.get_num_threads() == a.threads, torch.get_num_threads()
    return measured(a, ends, gen_s, lengths)


def trl_child(a, prompts: Path, order: list[list[int]], tmp: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    ordered = [rows[i] for step in order for i in step]              # iteration k: rows k*P .. (k+1)*P - 1
    dataset = Dataset.from_list(ordered)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    G, P = a.group, a.prompts_per_step
    args = GRPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=G * P, num_generations=G,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, shuffle_dataset=False,
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=BETA,
        epsilon=CLIP_EPS, scale_rewards="group", loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, max_steps=a.warmup + a.iterations,
        bf16=a.precision == "bf16", gradient_checkpointing=False, use_vllm=False, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=10 ** 6, log_completions=False, dataloader_num_workers=0, seed=SEED,
        disable_tqdm=True)
    ends, gen_s, lengths, seen = [], [], [], []
    gen_now = [0.0]                                      # sampler seconds since the last step's end

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *x, **kw):
            ends.append(time.perf_counter())
            gen_s.append(gen_now[0])
            gen_now[0] = 0.0

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *x, **kw):
            t = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*x, **kw)
            gen_now[0] += time.perf_counter() - t
            lengths.append(statistics.mean(len(c) for c in completion_ids))
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            seen.append([x["prompt"] for x in inputs[::G]])  # the iteration's prompts, once each
            return super()._generate_and_score_completions(inputs)

    trainer = TimedGRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=dataset,
                               processing_class=tok, callbacks=[Timer()])
    trainer.train()
    assert torch.get_num_threads() == a.threads, torch.get_num_threads()
    assert seen == [[rows[i]["prompt"] for i in step] for step in order], "TRL sampled other prompts"
    return measured(a, ends, gen_s, lengths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20, help="measured iterations per run")
    ap.add_argument("--warmup", type=int, default=3, help="iterations before the measured ones")
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    add_common_arguments(ap)
    ap.add_argument("--order", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.warmup < 1 or a.iterations < 1 or a.group < 2:
        ap.error("--warmup and --iterations must be >= 1, --group >= 2 (GRPO compares samples of a prompt)")

    if a.child:
        run_child(a, {"lmschool": lmschool_child, "trl": trl_child}, json.loads(a.order.read_text()))
        return

    versions = print_versions()
    n_steps = a.warmup + a.iterations
    n_prompts = n_steps * a.prompts_per_step
    with tempfile.TemporaryDirectory() as tmp:
        data, order_file = Path(tmp) / "prompts.jsonl", Path(tmp) / "order.json"
        write_prompts(data, n_prompts)
        order_file.write_text(json.dumps(lmschool_prompt_order(n_prompts, a.prompts_per_step, n_steps)))
        results = run_rounds(
            a.rounds, a.precisions,
            lambda side, precision: [sys.executable, __file__, "--child", side, "--precision", precision,
                                     "--data", str(data), "--order", str(order_file),
                                     "--iterations", str(a.iterations), "--warmup", str(a.warmup),
                                     "--prompts-per-step", str(a.prompts_per_step), "--group", str(a.group),
                                     "--threads", str(a.threads), "--lmschool-set", *a.lmschool_set],
            lambda res: (f"{res['s_per_iter']:.2f} s/iteration (generation {res['gen_share']:.0%}), "
                         f"{res['completion_len']:.1f} tokens/completion"))

    print(f"\nmedians over {a.rounds} rounds; {a.prompts_per_step} prompts x {a.group} completions per "
          f"iteration, {a.iterations} iterations after {a.warmup} warm-up, {a.threads} threads\n")
    print("| side | precision | s/iteration | generation s/iteration | generation share | tokens/completion "
          "| ratio (TRL s / side s) |")
    print("|------|-----------|-------------|------------------------|------------------|-------------------"
          "|------------------------|")
    table = []
    for precision in a.precisions:
        med = medians(results, precision, ["s_per_iter", "gen_s_per_iter", "gen_share", "completion_len"])
        for side, m in med.items():
            ratio = med["trl"]["s_per_iter"] / m["s_per_iter"] if "trl" in med else float("nan")
            print(f"| {side} | {precision} | {m['s_per_iter']:.2f} | {m['gen_s_per_iter']:.2f} | "
                  f"{m['gen_share']:.0%} | {m['completion_len']:.1f} | {ratio:.2f}x |")
            table.append({"side": side, "precision": precision, **m, "speedup_vs_trl": ratio})
    write_json(a.json, versions, table, results)


if __name__ == "__main__":
    main()
