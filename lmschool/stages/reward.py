"""Stage 3a, the class discussion: a reward model learns which answers the raters prefer.

    lmschool reward --init runs/sft --data runs/label/prefs.jsonl --out runs/reward \\
        [--config configs/reward.yaml] [--resume | --force] [key=value ...]
    torchrun --nproc_per_node=2 -m lmschool reward ...          # the same, on two processes

--init is the SFT policy (a run directory or an HF directory); --data is preference JSONL
(lmschool/data/preference.py: TRL's standard or conversational form), e.g. from `lmschool label`
or the school world's prefs.jsonl.

Steps, as InstructGPT (Ouyang et al. 2022, sec. 3.5) and the N+ implementation details:
- the model is the SFT network with its LM head replaced by a scalar head, initialised
  N(0, 1/sqrt(d + 1)) (`model.init_weights`); a sequence's reward is the score at the
  `<|im_end|>` that ends the answer;
- Bradley-Terry loss -log sigma(r_c - r_r), optionally with a margin and reward centring
  (lmschool/losses/reward.py); the pairs of one prompt group share a micro-batch where they fit
  (`PairBatches`), where the prompt is one row and each distinct answer a branch after it
  (`collate_shared`): the C(K, 2) pairs of K answers cost one prompt and K answers, not K(K - 1)
  prompts and answers (shared_prompts=false: a row per distinct answer); one epoch is the
  default (more over-fits: InstructGPT sec. C.2);
- after training, a bias is set so that the SFT policy's answers (the training pairs' answers,
  which `lmschool label` sampled from it) have mean reward 0; it is stored in the checkpoint's
  config.json ("lmschool": {"kind": "reward", "reward_bias": b}) and every reader subtracts it:
  reward = score at the last token - b.

RUN/model is a `LlamaForSequenceClassification` (num_labels 1) that `transformers` loads as it is
(its pooled logit is the raw score at the last non-pad token; subtract reward_bias).

summary.json, on the held-out ("split": "test") pairs, or on `test_fraction` of the prompt groups
held out here when the file has none: accuracy_rater (agreement with the file's labels),
accuracy_noise_free (with the noise-free teacher: "gold_chosen", or the pair's teacher scores),
rater_agreement_noise_free (the rater's own labels against the same noise-free ones: a reward model
above it has denoised its raters), accuracy_by_category, teacher_rank_correlation (Spearman between reward and the teacher score of
the test answers, from the lines' score_chosen / score_rejected; also its mean within each prompt,
teacher_rank_correlation_within_prompt, over prompts with 3 or more answers), reward_bias, steps,
seconds.

`checkpoint.check_kind(path, expected)` is what the policy stages call to refuse a reward model as a policy
(and this stage to refuse a policy where a reward model is expected, and the reverse).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmschool import distributed
from lmschool.adapters import for_training
from lmschool.checkpoint import load_model
from lmschool.config import check
from lmschool.data.preference import Pair, PairBatches, collate_shared, encode_pair, read_pairs, response_batch
from lmschool.errors import DataError
from lmschool.files import atomic_write_text
from lmschool.losses.reward import reward_loss, sequence_rewards
from lmschool.stages.common import (Timer, add_run_arguments, check_same_data, check_vocab, finish_run,
                                    load_stage_config, max_length, open_init, open_run, save_resolved_config,
                                    write_data_info)
from lmschool.trainer import TrainConfig, fit


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model training: the loop's settings (TrainConfig) plus data, loss and evaluation."""

    max_steps: int = 0
    """Optimizer steps; 0 = derived from epochs: ceil(epochs x micro-batches / (grad_accum x processes))."""
    epochs: float = 1.0
    """Passes over the training pairs, used when max_steps is 0 (InstructGPT: one; more over-fits)."""
    batch_size: int = 32
    """Pairs per micro-batch per process (each distinct answer among them is one row)."""
    lr: float = 3e-4
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    eval_every: int = 0
    """Held-out accuracy every this many steps (0 = only at the end)."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (0 = only at the end)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    max_seq_len: int | None = None
    """Longest row (prompt + answer) in tokens; longer prompts lose their start. null = the checkpoint's context."""
    margin: float = 0.0
    """Bradley-Terry margin m in -log sigma(r_c - r_r - m) (added to a line's own "margin")."""
    centring: float = 0.0
    """Reward-centring coefficient c of c * (r_c + r_r)^2 (0 = off; TRL suggests 0.01)."""
    group_batches: bool = True
    """Keep the pairs of one prompt group in one micro-batch where they fit (InstructGPT)."""
    bucket_batches: int = 16
    """Length bucketing: sort each run of this many micro-batches of pairs by length (1 = off)."""
    shared_prompts: bool = True
    """One row per prompt: the prompt computed once, each distinct answer after it attending to the
    prompt and itself, its reward read at its last token (the same rewards as a row per answer, in
    about half the positions for K = 4 answers a prompt). false = a row per distinct answer."""
    test_fraction: float = 0.1
    """When the data has no "split": "test" lines, hold out this share of prompt groups for evaluation."""
    eval_batch_size: int = 64
    """Pairs per batch when evaluating, answers per batch when setting the bias."""
    bias_answers: int = 512
    """Training answers (a seeded choice) whose mean reward the bias sets to 0 (0 = all of them)."""

    def __post_init__(self):
        super().__post_init__()
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.max_seq_len is None or self.max_seq_len >= 8, "max_seq_len", "must be >= 8 (or null)")
        check(self.margin >= 0, "margin", "must be >= 0")
        check(self.centring >= 0, "centring", "must be >= 0")
        check(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(self.bucket_batches >= 1, "bucket_batches", "must be >= 1")
        check(self.bias_answers >= 0, "bias_answers", "must be >= 0")


CONFIG = RewardConfig  # what `lmschool run` checks every stage's overrides against before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True, metavar="CKPT",
                        help="the SFT policy to start from (run directory or HF Llama/Qwen2 directory)")
    parser.add_argument("--data", type=Path, required=True, metavar="FILE",
                        help='preference JSONL: {"prompt", "chosen", "rejected"} per line (e.g. from lmschool label)')
    add_run_arguments(parser)


# ---- scoring ------------------------------------------------------------------------------------

@torch.no_grad()
def score_responses(model, tokenizer, prompts: list[list[dict]], responses: list[str], *,
                    bias: float = 0.0, batch_size: int = 64, max_len: int | None = None) -> list[float]:
    """Rewards (score at the last token - bias) of (prompt, response) pairs, in order."""
    device = next(model.parameters()).device
    max_len = max_len or model.config.max_position_embeddings
    out = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(responses[i]))   # similar lengths: little padding
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = response_batch(tokenizer, [prompts[i] for i in chunk], [responses[i] for i in chunk], max_len)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        for i, r in zip(chunk, (sequence_rewards(model, batch) - bias).tolist()):
            out[i] = r
    model.train(was_training)
    return out


@torch.no_grad()
def pair_rewards(model, encoded: list[tuple], pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw rewards of the chosen and of the rejected answer of encoded pairs: two (N,) arrays.
    The pairs of one prompt go in one batch where they fit, as shared-prompt rows."""
    device = next(model.parameters()).device
    chosen, rejected = np.zeros(len(encoded)), np.zeros(len(encoded))

    def prompt(i: int) -> tuple[int, ...]:
        ids, prompt_len = encoded[i][0]
        return tuple(ids[:prompt_len])

    order = sorted(range(len(encoded)), key=lambda i: (len(prompt(i)), prompt(i)))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate_shared([encoded[i] for i in chunk], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        r = sequence_rewards(model, batch)                                           # (A,)
        chosen[chunk] = r[batch["chosen_index"]].cpu().numpy()
        rejected[chunk] = r[batch["rejected_index"]].cpu().numpy()
    return chosen, rejected


# ---- evaluation ---------------------------------------------------------------------------------

def noise_free_label(pair: Pair) -> bool | None:
    """Whether the noise-free judge prefers `chosen`: the line's "gold_chosen", else its teacher
    scores (score_chosen, score_rejected); None when the line has neither or the scores tie."""
    meta = pair.meta
    if isinstance(meta.get("gold_chosen"), bool):
        return meta["gold_chosen"]
    a, b = meta.get("score_chosen"), meta.get("score_rejected")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a != b:
        return a > b
    return None


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2                  # mean of ranks start+1..end
            start = end
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None with fewer than 3 points or
    a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else None


def _mean(values) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def evaluate_pairs(pairs: list[Pair], chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Held-out figures from each pair's rewards (see the module docstring)."""
    right = chosen > rejected                                                 # (N,) agrees with the rater
    gold = [noise_free_label(p) for p in pairs]
    noise_free = {i: bool(right[i]) == g for i, g in enumerate(gold) if g is not None}
    by_cat: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_cat.setdefault(str(p.meta.get("category", "all")), []).append(i)
    # the test answers, once each, with their teacher scores
    answers: dict[tuple[str, str], tuple[float, float]] = {}
    for i, p in enumerate(pairs):
        for text, r, key in ((p.chosen, chosen[i], "score_chosen"), (p.rejected, rejected[i], "score_rejected")):
            s = p.meta.get(key)
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                answers[(p.group, text)] = (float(r), float(s))
    rewards_scores = list(answers.values())
    per_group: dict[str, list[tuple[float, float]]] = {}
    for (group, _), value in answers.items():
        per_group.setdefault(group, []).append(value)
    within = [spearman([r for r, _ in v], [s for _, s in v]) for v in per_group.values()]
    within = [w for w in within if w is not None]
    return {
        "test_pairs": len(pairs),
        "accuracy_rater": _mean(right.tolist()),
        "accuracy_noise_free": _mean(noise_free.values()),
        "noise_free_pairs": len(noise_free),
        "rater_agreement_noise_free": _mean(g for g in gold if g is not None),   # the rater against the same labels
        "accuracy_by_category": {
            c: {"pairs": len(idx), "rater": _mean(bool(right[i]) for i in idx),
                "noise_free": _mean(noise_free[i] for i in idx if i in noise_free)}
            for c, idx in sorted(by_cat.items())},
        "teacher_rank_correlation": spearman([r for r, _ in rewards_scores], [s for _, s in rewards_scores]),
        "correlation_answers": len(rewards_scores),
        "teacher_rank_correlation_within_prompt": _mean(within),
        "correlation_prompts": len(within),
        "test_reward_margin": float((chosen - rejected).mean()) if len(pairs) else None,
    }


# ---- the stage ----------------------------------------------------------------------------------

def split_pairs(pairs: list[Pair], test_fraction: float, seed: int) -> tuple[list[Pair], list[Pair], str]:
    """(train, test, how): the file's "split", or a seeded share of prompt groups held out."""
    test = [p for p in pairs if p.split == "test"]
    if test:
        return [p for p in pairs if p.split != "test"], test, "file"
    if test_fraction <= 0:
        return pairs, [], "none"
    groups = sorted({p.group for p in pairs})
    n_test = min(len(groups) - 1, max(1, round(len(groups) * test_fraction)))
    if n_test <= 0:
        return pairs, [], "none"
    held = set(np.random.default_rng([seed, 5]).choice(len(groups), size=n_test, replace=False).tolist())
    held_groups = {g for i, g in enumerate(groups) if i in held}
    return ([p for p in pairs if p.group not in held_groups], [p for p in pairs if p.group in held_groups],
            f"{test_fraction:g} of prompt groups")


def run(args: argparse.Namespace) -> int:
    from lmschool.stages.sft import logged_tokens_per_s

    cfg = load_stage_config(RewardConfig, args)
    timer = Timer()

    # --- everything is checked before --out is touched ---
    init, tokenizer = open_init(args.init)
    cfg.max_seq_len = max_length(cfg.max_seq_len, "max_seq_len", init)
    pairs = read_pairs(args.data)
    train, test, split_how = split_pairs(pairs, cfg.test_fraction, cfg.seed)
    if not train:
        raise DataError(f"{args.data}: every pair is in the test split; nothing to train on")
    data = PairBatches(train, tokenizer, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed,
                       group_batches=cfg.group_batches, unique_rows=True, shared_prompts=cfg.shared_prompts,
                       bucket_batches=cfg.bucket_batches)
    test_encoded = [encode_pair(tokenizer, p, cfg.max_seq_len) for p in test]
    dist = distributed.init(cfg.device)
    micro_per_step = cfg.grad_accum * dist.world_size
    per_epoch = data.steps_per_epoch(micro_per_step)
    if cfg.max_steps == 0:
        cfg.max_steps = math.ceil(cfg.epochs * per_epoch)

    torch.manual_seed(cfg.seed)
    model = load_model(init, head="score", new_head=True)   # a damaged --init stops here, before --out
    model = for_training(model, cfg.lora, base=init, seed=cfg.seed, modules_to_save=("score",))  # the head trains
    check_vocab(model, tokenizer, f"--init {init}")
    run = open_run(args.out, args, dist, "reward")
    if run.finished:
        return 0
    out, resuming = run.path, run.resuming
    data_info = {"data": str(args.data), "fingerprint": data.fingerprint(), "train_pairs": len(train),
                 "test_pairs": len(test), "test_split": split_how, "groups": len(data.groups)}
    check_same_data(out, data_info, resuming)
    if dist.is_main:
        save_resolved_config(cfg, out)
        write_data_info(out, data_info)
    pad_id = data.pad_id

    def evaluate(m) -> dict:
        chosen, rejected = pair_rewards(m, test_encoded, pad_id, cfg.eval_batch_size)
        figures = evaluate_pairs(test, chosen, rejected)
        return {"test_accuracy_rater": figures["accuracy_rater"],
                "test_accuracy_noise_free": figures["accuracy_noise_free"]}

    def loss_fn(m, batch):
        return reward_loss(m, batch, margin=cfg.margin, centring=cfg.centring)

    extra = {"stage": "reward", "kind": "reward", "reward_bias": 0.0}
    t_fit = Timer()
    trainer, final = fit(model, data, loss_fn, cfg, out, evaluate=evaluate if test else None,
                         tokenizer=tokenizer, extra=extra, dist=dist, resume=resuming, desc="reward")

    train_seconds = t_fit.seconds
    if dist.is_main:
        model = trainer.model.eval()  # final figures in float32: bf16 scores would tie more often
        bias = policy_answers_bias(model, tokenizer, train, cfg)
        chosen, rejected = pair_rewards(model, test_encoded, pad_id, cfg.eval_batch_size)
        trainer.extra = {**extra, "reward_bias": bias}
        trainer.save_final()                                     # again, now with the bias
        summary = {"stage": "reward", "init": str(init), "data": str(args.data),
                   "train_pairs": len(train), "test_split": split_how, **evaluate_pairs(test, chosen, rejected),
                   "reward_bias": bias, "train_loss": final.get("loss"),
                   "train_accuracy": _last_logged(out / "metrics.jsonl", "accuracy"),
                   "steps": trainer.step, "epochs": trainer.step / per_epoch, "batch_size": cfg.batch_size,
                   "max_seq_len": cfg.max_seq_len, "margin": cfg.margin, "centring": cfg.centring,
                   "group_batches": cfg.group_batches, "precision": trainer.precision,
                   "tokens_per_s": logged_tokens_per_s(out / "metrics.jsonl")}
        summary["train_seconds"] = train_seconds
        summary["pairs_per_s"] = summary["epochs"] * len(train) / max(train_seconds, 1e-9)
        summary["seconds"] = timer.seconds
        write_test_rewards(out / "test_rewards.jsonl", test, chosen - bias, rejected - bias)
        finish_run(run, summary)
        print_summary(summary, run.out / "model")
    distributed.barrier()   # the group is left by cli.main, once this run's models are freed
    return 0


def policy_answers_bias(model, tokenizer, train: list[Pair], cfg: RewardConfig) -> float:
    """Mean raw reward of the training pairs' answers (the SFT policy's samples, when the pairs
    come from `lmschool label`): a seeded choice of `bias_answers` of them."""
    answers = list({(json.dumps(p.prompt), text): (p.prompt, text)
                    for p in train for text in (p.chosen, p.rejected)}.values())
    if cfg.bias_answers and len(answers) > cfg.bias_answers:
        keep = np.random.default_rng([cfg.seed, 7]).choice(len(answers), cfg.bias_answers, replace=False)
        answers = [answers[i] for i in sorted(keep.tolist())]
    rewards = score_responses(model, tokenizer, [p for p, _ in answers], [r for _, r in answers],
                              batch_size=cfg.eval_batch_size, max_len=cfg.max_seq_len)
    return float(np.mean(rewards))


def write_test_rewards(path: Path, test: list[Pair], chosen: np.ndarray, rejected: np.ndarray) -> None:
    lines = []
    for p, c, r in zip(test, chosen.tolist(), rejected.tolist()):
        lines.append(json.dumps({"where": p.meta.get("where"), "category": p.meta.get("category"),
                                 "reward_chosen": round(c, 5), "reward_rejected": round(r, 5),
                                 "gold_chosen": noise_free_label(p),
                                 "score_chosen": p.meta.get("score_chosen"),
                                 "score_rejected": p.meta.get("score_rejected")}) + "\n")
    atomic_write_text(path, "".join(lines))


def _last_logged(path: Path, key: str) -> float | None:
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]
    return values[-1] if values else None


def print_summary(s: dict, model_dir: Path) -> None:
    def pct(value):
        return "n/a" if value is None else f"{value:.1%}"

    def num(value):
        return "n/a" if value is None else f"{value:.3f}"

    print(f"reward: {s['steps']} steps ({s['epochs']:.2f} epochs, {s['train_pairs']} pairs) in "
          f"{s['seconds']:.0f}s -> {model_dir}")
    print(f"reward: held-out accuracy {pct(s['accuracy_rater'])} against the rater, "
          f"{pct(s['accuracy_noise_free'])} against the noise-free teacher ({s['test_pairs']} pairs); "
          f"rank correlation with the teacher {num(s['teacher_rank_correlation'])}; "
          f"bias {s['reward_bias']:.4f}")
