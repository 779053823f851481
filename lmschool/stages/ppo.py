"""Stage 3c: PPO against a reward model or a scorer, and critic-free RL (GRPO, RLOO) in the same loop.

    lmschool ppo --init runs/sft --reward runs/reward --prompts runs/world/prompts.jsonl \\
        --eval runs/world/eval.jsonl --out runs/ppo [--config configs/ppo.yaml] [key=value ...]
    lmschool ppo --init runs/sft --scorer teacher --prompts runs/world/prompts.jsonl \\
        --eval runs/world/eval.jsonl --out runs/grpo --config configs/grpo.yaml    # advantage=grpo

Four roles (InstructGPT; "Secrets of RLHF"): the *policy* (trained, from --init), the frozen
*reference* (a copy of --init), the frozen *reward*: a reward model from `lmschool reward`
(--reward; its score at the answer's last token minus its `reward_bias`) or a scorer function
(--scorer module:function taking (prompts, responses) -> [float]; `--scorer teacher` is the school
world's teacher of the world.json beside --prompts, a verifiable reward), and for advantage=gae a
*critic* with a scalar head, initialised from the reward model (or from --init's backbone with a
new head when a scorer is the reward). advantage=grpo / rloo need no critic. Dropout is off in all.

One iteration (config field `max_steps` counts them):
1. Rollout: `batch_size` prompts (a pure function of the iteration, so resume needs no data
   state), each sampled `group_size` times from the policy with the KV-cache sampler at
   `temperature`; a response ends at <|im_end|> or after `max_new_tokens`.
2. Score: the reward per response; minus `missing_eos_penalty` where no <|im_end|> was written
   (the "EOS trick" of the N+ implementation details); optional whitening and clipping.
3. Log-probs of the responses under the policy (recomputed in a forward pass with logits / T,
   compared with the sampler's as `logprob_mismatch`; with one optimizer step per rollout and no
   critic, taken from that step's own forward instead: `reuse_logprobs`) and under the reference;
   the critic's values.
4. Rewards and advantages (lmschool.losses.ppo): per-token reward -beta * KL_t plus the score at
   the last token, then GAE (gamma, lam) and whitening; or, critic-free, the sequence reward
   (score - beta * KL, or the score alone with `kl_in_loss`, GRPO's k3 term) against the group
   mean (grpo) or the leave-one-out mean (rloo). beta is fixed or adapts to `kl_target`.
5. Update: `ppo_epochs` passes over shuffled minibatches: the clipped policy loss, the clipped
   value loss x `vf_coef`, optional entropy bonus, optional PPO-ptx (`ptx_coef` x the
   next-token loss on windows of --ptx text, InstructGPT's gamma). Policy and critic have their
   own AdamW (optim.py) and gradient clipping; bf16 autocast where the hardware runs it fast.

PPO runs on the one loop (trainer.py): an iteration is the trainer's step (`PPO.iteration`),
each minibatch update a trainer optimizer step (`backward` per micro-batch, `optimizer_step`:
policy and critic clipped each on its own, the NaN guard); the trainer sets the learning rates,
writes metrics and progress, saves and resumes. What an update needs travels in one record,
`lmschool.rollout.Rollout`. The reward and the teacher are judges (lmschool/judges.py).

RUN/metrics.jsonl gets one line per iteration: reward (RM or scorer), teacher_score (on the
rollouts, when a school world is beside --prompts or --eval), kl, kl_coef, entropy, clipfrac,
approx_kl, vf_loss, explained_variance, response_length, no_eos_rate, rollout_tokens_per_s,
update_tokens_per_s and more. Every `save_every` iterations RUN/checkpoints/step-N holds the
policy and trainer_state.pt (critic, both optimizers, KL controller, RNG, iteration): `--resume`
continues exactly as an uninterrupted run would. At the end: RUN/model (the policy,
`"kind": "policy"`), and with --eval the DPO stage's evaluation (`evaluate.evaluate_policy`:
teacher score per category, win rate against the SFT answers of RUN_SFT/eval_answers.jsonl found
beside --init (greedy, and sampled where they were sampled with the same settings), KL from SFT)
in RUN/summary.json and RUN/eval_answers.jsonl.

Under torchrun (`torchrun --nproc_per_node=N -m lmschool ppo ...`, parallel=ddp) each process
samples its contiguous 1/N of every iteration's prompts (whole groups, its own random stream:
rank 0 draws as one process would) and updates on its own rollouts in minibatches of
minibatch_size/N rows, with the policy's and the critic's gradients averaged by DDP; the
whitening statistics, the adaptive beta's KL and the logged figures are all-reduced over the
ranks, so every rank steps the same weights with the same beta. batch_size and minibatch_size
must be multiples of N. With parallel=fsdp the policy and the critic are sharded (FSDP2, as in every
stage) and each rank samples from a whole copy of the policy gathered for the rollout (the ranks decode
for different numbers of steps, which a sharded model's per-block gathers could not follow) and reads
its old log-probs from it; the reference and a reward model stay whole on every rank (no gradients:
a quarter of a trained model's memory), as the end-of-run evaluation on rank 0 needs them.

This module is long because one algorithm needs all of it (about 700 lines): PPOConfig's 45
documented fields are 130 lines of declarations, one iteration with its minibatch loss 235, the
command with PPO's end-of-run evaluation 150. Splitting the iteration from its config and its
command would spread one algorithm over several files without making any part shorter to read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from lmschool import distributed
from lmschool.adapters import WithoutAdapters, for_training
from lmschool.checkpoint import load_model, resolve
from lmschool.config import check
from lmschool.data.prompts import fitting_prompts, read_prompts
from lmschool.errors import UserError
from lmschool.files import atomic_write_text
from lmschool.generate import generate
from lmschool.judges import TeacherJudge, make_judge, row_fields, school_teacher, world_file
from lmschool.losses.lm import lm_loss
from lmschool.losses.ppo import (ADVANTAGES, KLController, explained_variance, gae, kl_penalty, masked_mean,
                                 masked_whiten, policy_loss, token_rewards, value_loss)
from lmschool.rollout import ResponseLogprobs, Rollout, in_chunks, response_logprobs, response_values
from lmschool.runtime import autocast, to_device
from lmschool.stages.common import (Timer, add_run_arguments, check_same_data, check_vocab, context_length,
                                    finish_run, load_stage_config, open_init, open_run, save_resolved_config,
                                    write_data_info)
from lmschool.tokenizer import Tokenizer
from lmschool.trainer import TrainConfig, Trainer, schedule


@dataclass
class PPOConfig(TrainConfig):
    """RL from a reward: the loop's settings (TrainConfig) plus rollout, reward, advantage and update."""

    max_steps: int = 20
    """RL iterations (each: one rollout batch, then ppo_epochs of updates on it)."""
    batch_size: int = 32
    """Prompts per iteration (each sampled group_size times)."""
    grad_accum: int = 1
    """Micro-batches each minibatch is split into (same gradient, less memory)."""
    lr: float = 3e-5
    """Policy learning rate (peak)."""
    critic_lr: float = 1e-4
    """Critic learning rate (peak; follows the policy's schedule)."""
    warmup_steps: int = 0
    """Linear warmup, in iterations."""
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate decay after warmup, over iterations."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    eval_every: int = 0
    """Judge greedy answers to --eval with the teacher every this many iterations (0 = only at the end)."""
    save_every: int = 10
    """Write a resumable checkpoint every this many iterations (0 = only at the end)."""
    log_every: int = 1
    """Print a progress line every this many iterations (metrics.jsonl gets every iteration)."""
    compile: bool = False
    """Not supported by PPO: the policy changes every iteration (the sampler packs its weights instead)."""

    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    """gae: critic + GAE (PPO); grpo: group-normalised scores (GRPO); rloo: leave-one-out baseline (RLOO)."""
    group_size: int = 1
    """Samples per prompt (G, or K for RLOO); grpo and rloo need >= 2."""
    max_new_tokens: int = 64
    """Longest sampled response; one cut here gets missing_eos_penalty."""
    temperature: float = 0.7
    """Sampling temperature of the rollouts (the log-probs are recomputed with logits / temperature)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response without <|im_end|> (the EOS trick; 0 = off)."""
    whiten_scores: bool = False
    """Whiten the sequence scores over each rollout batch (mean 0, std 1) before the KL is added."""
    score_clip: float = 0.0
    """Clip the scores to [-score_clip, score_clip] after whitening (0 = off)."""
    kl_coef: float = 0.05
    """beta: weight of the KL to the reference (initial value when kl_target is set)."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al.): the sequence KL (nats) to steer beta towards; null = fixed beta."""
    kl_horizon: int = 10000
    """Adaptive KL: rollouts over which beta may change by up to 20%."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate used in the reward (or the loss): k1 = log-ratio, k3 = GRPO's."""
    kl_in_loss: bool = False
    """Put beta x KL in the loss (GRPO) instead of the reward (InstructGPT)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten the advantages over each rollout batch."""
    scale_group_std: bool = True
    """grpo: divide by the group's std (false = Dr. GRPO)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    minibatch_size: int = 16
    """Sequences per optimizer step."""
    clip_eps: float = 0.2
    """Policy ratio clip range epsilon."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    vf_clip: float = 0.2
    """Value clip range around the rollout's values (0 = off)."""
    critic_warmup: int = 0
    """First iterations that train only the critic (its head starts as the reward model's, not a value)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (entropy is logged either way)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the next-token loss on --ptx text per minibatch (InstructGPT's gamma)."""
    ptx_windows: int = 4
    """PPO-ptx: windows of context-length text per minibatch (on each process under torchrun)."""
    eval_max_new_tokens: int = 128
    """Longest greedy answer to each --eval prompt (keep SFT's for a fair win rate)."""
    eval_batch_size: int = 32
    """Prompts answered at once in the evaluation."""
    kl_samples: int = 1
    """Answers sampled per eval prompt (temperature 1) from the policy and from the SFT model, for the
    sampled win rate (win_rate_vs_sft) and kl_from_sft."""
    reuse_logprobs: bool = True
    """When a rollout gets exactly one optimizer step (ppo_epochs 1, minibatch_size >= the rollout)
    and nothing before the update needs the policy's log-probs (no critic, KL in the loss or off),
    take the old log-probs from the training forward (detached: the ratio is 1, the gradient the
    same) instead of a separate no-grad pass over the rollout, as TRL's GRPOTrainer does."""
    pack_rollouts: bool = True
    """Read rollouts packed (several sequences end to end in one row, each attending only to itself)
    where that computes at least 15% fewer positions than right-padded rows (rollout.pack); false:
    always padded. The same numbers up to float rounding."""
    shared_prompts: bool = True
    """In packed rollouts, the answers to one prompt (GRPO's group) share it: the prompt computed once,
    each answer after it attending to the prompt and itself (rollout.pack). Same numbers."""

    def __post_init__(self):
        super().__post_init__()
        check(not self.compile, "compile", "is not supported by PPO (the policy changes every iteration)")
        check(self.critic_lr > 0, "critic_lr", "must be positive")
        check(self.group_size >= 1, "group_size", "must be >= 1")
        if self.advantage in ("grpo", "rloo"):
            check(self.group_size >= 2, "group_size",
                  f"advantage={self.advantage} compares samples of one prompt: set group_size >= 2 (e.g. 4)")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0 (RL samples; greedy rollouts do not explore)")
        check(self.missing_eos_penalty >= 0, "missing_eos_penalty", "must be >= 0 (it is subtracted)")
        check(self.score_clip >= 0, "score_clip", "must be >= 0 (0 = off)")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.kl_target is None or self.kl_target > 0, "kl_target", "must be > 0 (or null for fixed beta)")
        check(self.kl_horizon >= 1, "kl_horizon", "must be >= 1")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma/lam", "must be in [0, 1]")
        check(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        check(self.minibatch_size >= 1, "minibatch_size", "must be >= 1")
        check(self.minibatch_size >= self.grad_accum, "grad_accum", "must be <= minibatch_size")
        check(self.clip_eps > 0, "clip_eps", "must be > 0")
        check(self.vf_coef >= 0 and self.vf_clip >= 0, "vf_coef/vf_clip", "must be >= 0")
        check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        check(self.critic_warmup >= 0, "critic_warmup", "must be >= 0")
        check(self.critic_warmup == 0 or self.advantage == "gae", "critic_warmup", "needs advantage=gae (a critic)")
        check(self.ptx_coef >= 0, "ptx_coef", "must be >= 0")
        check(self.ptx_windows >= 1, "ptx_windows", "must be >= 1")
        check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", "must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(self.kl_samples >= 1, "kl_samples", "must be >= 1")

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.group_size

    @property
    def single_step(self) -> bool:
        """True where the old log-probs can come from the update's own forward (see reuse_logprobs)."""
        return (self.reuse_logprobs and self.ppo_epochs == 1 and self.minibatch_size >= self.rollout_size
                and self.advantage != "gae" and (self.kl_in_loss or self.kl_coef == 0))


CONFIG = PPOConfig  # what `lmschool run` checks every stage's overrides against before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True, metavar="CKPT",
                        help="the policy to start from (and the frozen reference): an SFT run or model directory")
    reward = parser.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward", metavar="RM_CKPT", help="a reward model from `lmschool reward` (run or model dir)")
    reward.add_argument("--scorer", metavar="MODULE:FUNCTION",
                        help="a reward function (prompts, responses) -> [float]; 'teacher' = the school "
                             "world's teacher of the world.json beside --prompts (else the default world)")
    parser.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                        help='RL prompts, JSONL: {"prompt": "..." | [messages ending with a user turn]}')
    parser.add_argument("--eval", type=Path, metavar="FILE",
                        help="prompts to answer and judge at the end (eval.jsonl); win rate against "
                             "--init's eval_answers.jsonl")
    parser.add_argument("--ptx", type=Path, action="append", metavar="FILE",
                        help="pre-training text for PPO-ptx (with ptx_coef > 0); repeatable")
    add_run_arguments(parser)


# ---- the four roles -----------------------------------------------------------------------------

def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere (N+ details: it makes log-probs of the same tokens disagree)."""
    model.config.dropout = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    return model


# ---- one iteration: the loop's step -----------------------------------------------------------------

class PPO:
    """The four roles and the KL controller. The policy is the trainer's model and the critic its
    second group; `iteration()` is the trainer's step: one rollout, then its updates."""

    def __init__(self, cfg: PPOConfig, trainer: Trainer, reference, reward, critic, tokenizer: Tokenizer,
                 prompts: list[dict], prompt_ids: list[list[int]], teacher=None, ptx=None,
                 eval_rows: list[dict] | None = None):
        self.cfg, self.trainer, self.policy = cfg, trainer, trainer.model
        # under torchrun the losses' forwards go through DDP (gradients averaged over the ranks);
        # sampling and the no-gradient passes use the plain modules. One process: the same modules.
        # under parallel=fsdp policy and critic are sharded (the trainer shards both): every forward
        # runs on every rank, and FSDP reduce-scatters the gradients itself
        self.dist = trainer.dist
        self.train_policy = trainer.train_model   # PPO-ptx's next-token loss
        ddp = self.dist.enabled and not trainer.sharded
        self.train_logprobs = distributed.wrap(ResponseLogprobs(self.policy), self.dist) if ddp else None
        self.train_critic = distributed.wrap(critic, self.dist) if ddp and critic is not None else critic
        self.reference, self.reward, self.critic = reference, reward, critic
        self.tokenizer, self.prompts, self.prompt_ids = tokenizer, prompts, prompt_ids
        self.teacher, self.ptx, self.eval_rows = teacher, ptx, eval_rows
        self.device, self.precision, self.pad_id = trainer.device, trainer.precision, tokenizer.fill_id
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        trainer.stateful["kl"] = self.kl_ctl   # checkpointed with the trainer's state

    @property
    def step(self) -> int:
        return self.trainer.step

    def prompt_indices(self, step: int) -> list[int]:
        """The prompts of iteration `step`: consecutive slices of per-epoch permutations (seeded)."""
        n, B = len(self.prompts), self.cfg.batch_size
        orders: dict[int, np.ndarray] = {}
        out = []
        for k in range(step * B, (step + 1) * B):
            epoch, i = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
            out.append(int(orders[epoch][i]))
        return out

    def my_prompts(self, step: int) -> list[int]:
        """This process's share of the iteration's prompts: a contiguous 1/world of them (whole groups)."""
        everyone = self.prompt_indices(step)
        share = len(everyone) // self.dist.world_size
        return everyone[self.dist.rank * share:(self.dist.rank + 1) * share]

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """masked_whiten over every process's rollouts: the mean and the (unbiased) variance from
        all-reduced sums, so each rank whitens with the statistics one process would use."""
        if not self.dist.enabled:
            return masked_whiten(x, mask)
        m = mask.to(x.dtype)
        sums = distributed.all_reduce_sum(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()]).double())
        n, s1, s2 = sums.tolist()
        mean = s1 / n
        var = (s2 - s1 * mean) / max(n - 1, 1)
        return (x - mean) * (var + 1e-8) ** -0.5 * m

    def over_ranks(self, metrics: dict) -> dict:
        """Each rank's figures of its rollouts -> the figures of all of them: means of per-rank means
        (every rank has as many rollouts), throughputs summed. One process: as they are."""
        if not self.dist.enabled:
            return metrics
        keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("lr", "kl_coef")]
        totals = distributed.all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return {**metrics, **{k: t if k.endswith("_per_s") else t / self.dist.world_size
                              for k, t in zip(keys, totals.tolist())}}

    def iteration(self) -> dict:
        cfg, tok = self.cfg, self.tokenizer
        step = self.trainer.step
        lr = self.trainer.set_lr()

        # 1. rollout: each prompt group_size times, in contiguous groups (this process's share)
        index = [i for i in self.my_prompts(step) for _ in range(cfg.group_size)]
        t0 = time.time()
        # under parallel=fsdp each rank samples from a whole copy of the policy (the ranks decode
        # for different numbers of steps, which a sharded model's gathers could not follow)
        sampler = self.trainer.whole_model(everywhere=True)
        with autocast(self.device, self.precision):   # each rank its own draws (rank 0: one process's)
            gen = generate(sampler, [self.prompt_ids[i] for i in index], cfg.max_new_tokens,
                           temperature=cfg.temperature, stop_ids=tok.stop_ids, pad_id=self.pad_id,
                           seed=cfg.seed * 1_000_003 + step + 7_919 * self.dist.rank, return_logprobs=True)
        rollout_s = time.time() - t0
        ended = torch.tensor([bool(t) and t[-1] == tok.end_of_turn_id for t in gen.tokens], device=self.device)
        rollout = Rollout.build([self.prompt_ids[i] + t for i, t in zip(index, gen.tokens)],
                                [len(self.prompt_ids[i]) for i in index], self.pad_id, self.device)
        texts = [tok.decode(t, skip_special=True).strip() for t in gen.tokens]
        prompts = [self.prompts[i]["prompt"] for i in index]
        mask = rollout.mask
        sampler_lp = torch.zeros_like(mask)                                                 # (N, R)
        for i, lp in enumerate(gen.logprobs):
            sampler_lp[i, :len(lp)] = torch.tensor(lp)

        # 2.-4. scores, log-probs, values, advantages: into the record
        t1 = time.time()
        raw_scores, non_score = self.prepare(rollout, ended, prompts, texts,
                                             row_fields([self.prompts[i] for i in index]), sampler)
        del sampler
        prepare_s = time.time() - t1

        # 5. updates (with single_step, they fill in the old log-probs and entropy)
        t2 = time.time()
        kl_coef = self.kl_ctl.value
        update = self.update(rollout, kl_coef, step)
        update_s = time.time() - t2
        seq_kl_k1 = ((rollout.old_logprobs - rollout.ref_logprobs) * mask).sum(1)          # (N,)
        kl_mean = self.over_ranks({"kl": seq_kl_k1.mean().item()})["kl"]   # the same beta on every rank
        self.kl_ctl.update(kl_mean, rollout.size * self.dist.world_size)
        self.trainer.step += 1
        update_tokens = update.pop("_tokens")

        n_resp = mask.sum().item()
        metrics = {
            "reward": raw_scores.mean().item(),
            "reward_std": raw_scores.std().item() if raw_scores.numel() > 1 else 0.0,
            "score": rollout.scores.mean().item(),
            "no_eos_rate": 1.0 - ended.float().mean().item(),
            "kl": seq_kl_k1.mean().item(),
            "kl_per_token": (seq_kl_k1.sum() / max(n_resp, 1)).item(),
            "kl_coef": kl_coef,
            "non_score_reward": non_score.sum(1).mean().item(),
            "entropy": masked_mean(rollout.entropy, mask).item(),
            "response_length": n_resp / rollout.size,
            "logprob_mismatch": masked_mean((rollout.old_logprobs - sampler_lp).abs(), mask).item(),
            "lr": lr,
            **update,
            "rollout_tokens_per_s": n_resp / max(rollout_s, 1e-9),
            "update_tokens_per_s": update_tokens / max(update_s, 1e-9),
            "rollout_seconds": rollout_s, "score_seconds": prepare_s, "update_seconds": update_s,
        }
        if rollout.values is not None:
            metrics["explained_variance"] = explained_variance(rollout.values, rollout.returns, mask)
            metrics["value_mean"] = masked_mean(rollout.values, mask).item()
        if self.teacher is not None:
            metrics["teacher_score"] = float(np.mean(self.teacher(prompts, texts)[0]))
        metrics = self.over_ranks(metrics)
        metrics["sample"] = {"prompt": prompts[0][-1]["content"], "response": texts[0],
                             "reward": raw_scores[0].item()}
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
            metrics.update(self.periodic_eval())
        return metrics

    def prepare(self, rollout: Rollout, ended: torch.Tensor, prompts: list, texts: list[str],
                fields: dict | None = None, policy: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2.-4. of an iteration, no gradient: fill in the rollout's scores, log-probs
        (policy, unless single_step, and reference), values, advantages and returns. Returns the
        raw scores (N,) and the non-score (KL) reward (N, R), for the metrics. fields: the prompts'
        other columns, per rollout, for a --scorer (judges.row_fields); policy: the policy's
        weights to read (the sampler's whole copy under parallel=fsdp; else the policy)."""
        policy = policy if policy is not None else self.policy
        cfg, chunk, mask = self.cfg, self.cfg.minibatch_size, rollout.mask
        packing = {"packing": cfg.pack_rollouts, "shared_prompts": cfg.shared_prompts}
        with torch.no_grad(), autocast(self.device, self.precision):
            raw_scores = self.reward.rollout_scores(prompts, texts, rollout.input_ids, rollout.last_index,
                                                    chunk, **(fields or {})).float()     # (N,)
            T = cfg.temperature
            if not cfg.single_step:   # else the update's forward fills them in
                rollout.old_logprobs, rollout.entropy = in_chunks(
                    lambda b: response_logprobs(policy, b, T, **packing), rollout, chunk)   # (N, R) each
            rollout.ref_logprobs, = in_chunks(lambda b: response_logprobs(self.reference, b, T, **packing)[0],
                                              rollout, chunk)                             # (N, R)
            if self.critic is not None:
                rollout.values, = in_chunks(lambda b: response_values(self.critic, b, **packing), rollout, chunk)

        scores = raw_scores - cfg.missing_eos_penalty * (~ended).float()
        if cfg.whiten_scores:
            scores = self.whiten(scores[None], torch.ones_like(scores[None]))[0]
        if cfg.score_clip:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        rollout.scores = scores
        reward_kl = 0.0 if cfg.kl_in_loss else self.kl_ctl.value
        old, ref = rollout.old_logprobs, rollout.ref_logprobs   # old is None with single_step: no KL here
        if cfg.advantage == "gae":
            kl = kl_penalty(old, ref, cfg.kl_estimator) * mask                                  # (N, R)
            rewards, non_score = token_rewards(scores, kl, mask, reward_kl)
            advantages, rollout.returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        else:
            non_score = (-reward_kl * kl_penalty(old, ref, cfg.kl_estimator) * mask
                         if reward_kl else torch.zeros_like(mask, dtype=torch.float32))     # (N, R)
            sequence_reward = scores + non_score.sum(1)                                    # (N,)
            kwargs = {"scale_std": cfg.scale_group_std} if cfg.advantage == "grpo" else {}
            advantages = ADVANTAGES[cfg.advantage](sequence_reward, cfg.group_size, **kwargs)[:, None] * mask
        rollout.advantages = self.whiten(advantages, mask) if cfg.whiten_advantages else advantages
        return raw_scores, non_score

    def update(self, rollout: Rollout, kl_coef: float, step: int) -> dict:
        """ppo_epochs passes of minibatch steps over the rollout; returns mean metrics."""
        cfg = self.cfg
        if cfg.single_step:   # the one optimizer step's forward is pi_old: written here as it runs
            rollout.old_logprobs = torch.zeros_like(rollout.ref_logprobs)
            rollout.entropy = torch.zeros_like(rollout.ref_logprobs)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)
        sums: dict[str, float] = {}
        n_steps, tokens = 0, 0
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        minibatch = cfg.minibatch_size // self.dist.world_size   # this process's rows of a minibatch
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(rollout.size, generator=gen)
            for start in range(0, rollout.size, minibatch):
                m = self.minibatch_step(rollout, order[start:start + minibatch], kl_coef,
                                        step * 10_000 + n_steps, train_policy=step >= cfg.critic_warmup)
                tokens += m.pop("_tokens")
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
        out = {k: v / n_steps for k, v in sums.items()}
        out["_tokens"] = tokens
        return out

    def minibatch_step(self, rollout: Rollout, rows: torch.Tensor, kl_coef: float, ptx_step: int,
                       train_policy: bool = True) -> dict:
        """One trainer optimizer step of the policy (unless warming up the critic) and of the
        critic on the rollout rows `rows`: grad_accum micro-batches, PPO-ptx, then each model
        clipped on its own and stepped. Losses are token means over the minibatch (each
        micro-batch weighted by its share of the tokens)."""
        cfg, trainer = self.cfg, self.trainer
        # every rank's tokens of the minibatch: the micro-batch weights add up to 1 over all ranks
        mb_tokens = distributed.all_reduce_sum(rollout.mask[rows].sum().float()).clamp(min=1)
        sums: dict[str, float] = {}
        loss_total, tokens = 0.0, 0
        for part in (rows[i::cfg.grad_accum] for i in range(cfg.grad_accum)):
            if not part.numel():
                continue
            sub = rollout.rows(part)
            loss, metrics = trainer.backward(lambda b: self.loss(b, kl_coef, train_policy), sub,
                                             (sub.mask.sum() / mb_tokens).item())
            if cfg.single_step:
                R = sub.tokens.shape[1]
                rollout.old_logprobs[part, :R], rollout.entropy[part, :R] = sub.old_logprobs, sub.entropy
            loss_total += loss
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            tokens += int(sub.last_index.sum().item()) + sub.size
        if self.ptx is not None and train_policy:   # PPO-ptx: gamma * next-token loss on this rank's text windows
            batch = to_device(self.ptx.micro_batches(ptx_step, 1, self.dist.rank, self.dist.world_size)[0],
                              self.device)
            loss, metrics = trainer.backward(self.ptx_loss, batch, 1.0 / self.dist.world_size)
            loss_total += loss
            sums.update(metrics)
            tokens += batch["input_ids"].numel()
        # each rank's figures are its share of the minibatch's means: summed, every rank has the means
        sums = distributed.sum_over_ranks(sums)
        sums.update(trainer.optimizer_step(trainer.groups if train_policy else trainer.groups[1:], loss_total))
        sums["_tokens"] = tokens
        return sums

    def loss(self, sub: Rollout, kl_coef: float, train_policy: bool) -> tuple[torch.Tensor, dict]:
        """The loss of a micro-batch of the rollout: the clipped policy loss, minus the entropy
        bonus, plus beta x KL with kl_in_loss (GRPO), plus vf_coef x the clipped value loss."""
        cfg = self.cfg
        loss = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        if train_policy:
            if self.train_logprobs is not None:   # under torchrun: through DDP
                logprobs, entropy = self.train_logprobs(sub, cfg.temperature, entropy_grad=cfg.entropy_coef > 0,
                                                        packing=cfg.pack_rollouts, shared_prompts=cfg.shared_prompts)
            else:
                logprobs, entropy = response_logprobs(self.policy, sub, cfg.temperature,
                                                      entropy_grad=cfg.entropy_coef > 0, packing=cfg.pack_rollouts,
                                                      shared_prompts=cfg.shared_prompts)
            if cfg.single_step:   # the one step of this rollout: pi_old = this forward, detached
                sub.old_logprobs, sub.entropy = logprobs.detach(), entropy.detach()
            pg_loss, pm = policy_loss(logprobs, sub.old_logprobs, sub.advantages, sub.mask, cfg.clip_eps)
            entropy = masked_mean(entropy, sub.mask)
            loss = pg_loss - cfg.entropy_coef * entropy if cfg.entropy_coef else pg_loss
            metrics.update(pg_loss=pg_loss.item(), **pm, update_entropy=entropy.item())
            if cfg.kl_in_loss and kl_coef:      # GRPO: beta * KL_k3 in the loss
                kl = masked_mean(kl_penalty(logprobs, sub.ref_logprobs, cfg.kl_estimator), sub.mask)
                loss = loss + kl_coef * kl
                metrics["kl_loss"] = kl.item()
        if self.critic is not None:
            v = response_values(self.train_critic, sub, cfg.pack_rollouts, cfg.shared_prompts)
            vf_loss, vm = value_loss(v, sub.values, sub.returns, sub.mask, cfg.vf_clip)
            loss = loss + cfg.vf_coef * vf_loss
            metrics.update(vf_loss=vf_loss.item(), **vm)
        return loss, metrics

    def ptx_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, _ = lm_loss(self.train_policy, batch)
        return self.cfg.ptx_coef * loss, {"ptx_loss": loss.item()}

    def periodic_eval(self) -> dict:
        """Greedy answers to the --eval prompts judged by the teacher, mid-run (eval_every), on rank 0
        (every rank calls it: under parallel=fsdp the whole policy is gathered onto rank 0)."""
        from lmschool.evaluate import evaluate_generations
        if not self.eval_rows or self.teacher is None:
            return {}
        policy = self.trainer.whole_model()
        if not self.dist.is_main:
            return {}
        with autocast(self.device, self.precision):
            summary, _ = evaluate_generations(policy, self.tokenizer, self.eval_rows, self.teacher,
                                              max_new_tokens=self.cfg.eval_max_new_tokens,
                                              batch_size=self.cfg.eval_batch_size, seed=self.cfg.seed)
        return {"eval_teacher_score": summary.get("teacher_score")}

# ---- the command ---------------------------------------------------------------------------------

def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r["prompt"], sort_keys=True).encode())
    return h.hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(PPOConfig, args)
    timer = Timer()
    # --- everything is checked before --out is touched ---
    init, tokenizer = open_init(args.init)
    context = context_length(init) or 0
    prompts = read_prompts(args.prompts)
    prompts, prompt_ids, too_long = fitting_prompts(prompts, tokenizer, context=context,
                                                    max_new_tokens=cfg.max_new_tokens)
    if too_long:
        print(f"ppo: {too_long} prompts of {args.prompts} leave fewer than max_new_tokens="
              f"{cfg.max_new_tokens} positions of the context ({context}); left out", file=sys.stderr)
    eval_rows = read_prompts(args.eval) if args.eval else None
    if cfg.ptx_coef > 0 and not args.ptx:
        raise UserError("ptx_coef > 0 needs --ptx FILE (pre-training text for PPO-ptx)")
    if args.ptx and cfg.ptx_coef == 0:
        raise UserError("--ptx was given but ptx_coef is 0; set ptx_coef (e.g. ptx_coef=0.5) or leave out --ptx")
    if args.ptx:
        from lmschool.data.text import check_data
        check_data(args.ptx)
    dist = distributed.init(cfg.device)
    for key in ("batch_size", "minibatch_size"):
        if dist.enabled and getattr(cfg, key) % dist.world_size:
            raise UserError(f"ppo: config key '{key}' ({getattr(cfg, key)}) must be a multiple of the "
                            f"{dist.world_size} torchrun processes (each samples and trains on an equal share)")
    device = dist.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the reward (checks --reward's kind and tokenizer, --scorer's import), and the teacher that
    # judges the rollouts too when the school world is known
    reward = make_judge(args.scorer, args.reward, beside=[args.prompts], tokenizer=tokenizer, device=device,
                        batch_size=cfg.eval_batch_size, probe=prompts[0])
    teacher = (TeacherJudge(school_teacher(args.prompts, args.eval))
               if world_file(args.prompts, args.eval) or args.scorer == "teacher" else None)

    # the models: a damaged --init or --reward stops here, before --out is opened
    torch.manual_seed(cfg.seed)
    policy = for_training(load_model(init, head="lm"), cfg.lora, base=init, seed=cfg.seed)
    policy = disable_dropout(policy).to(device)
    check_vocab(policy, tokenizer, f"--init {init}")
    if cfg.lora.enabled:   # the reference is the policy with its adapters off: no second copy
        reference = WithoutAdapters(policy)
    else:
        reference = disable_dropout(load_model(init, head="lm")).to(device).eval().requires_grad_(False)
    critic = None
    if cfg.advantage == "gae":
        source = resolve(args.reward) if args.reward else init
        critic = load_model(source, head="score", new_head=not args.reward)
        critic = for_training(critic, cfg.lora, base=source, seed=cfg.seed + 1, modules_to_save=("score",),
                              saved=False)   # with lora.r > 0 the critic trains adapters (and its head) too
        critic = disable_dropout(critic).to(device)

    run = open_run(args.out, args, dist, "ppo")
    if run.finished:
        return 0
    out, resuming = run.path, run.resuming
    data_info = {"data": str(args.prompts), "rows": len(prompts), "fingerprint": _fingerprint(prompts)}
    if dist.is_main:
        check_same_data(out, data_info, resuming)
        save_resolved_config(cfg, out)
        write_data_info(out, data_info)

    ptx = None
    if args.ptx:
        from lmschool.data.pretrain import TokenWindows, load_tokens, prepare
        if dist.is_main and not (resuming and (out / "ptx" / "meta.json").is_file()):
            prepare(list(args.ptx), tokenizer, out / "ptx", val_fraction=0.01, seed=cfg.seed)
        distributed.barrier()
        ptx = TokenWindows(load_tokens(out / "ptx", "train"), context, cfg.ptx_windows, seed=cfg.seed + 1)
    # the one loop: an iteration is a step; policy and critic follow one schedule (peak x
    # lr_at(step, lr=1)), each with its own AdamW and clipping; every iteration a metrics line
    scale = schedule(cfg, 1.0)
    trainer = Trainer(policy, None, cfg, out, tokenizer=tokenizer, extra=_extra(cfg, args),
                      desc="ppo" if cfg.advantage == "gae" else cfg.advantage,
                      lr=lambda step: cfg.lr * scale(step), log_every_step=True,
                      progress_keys=("reward", "teacher_score", "kl", "response_length"), dist=dist)
    if critic is not None:
        trainer.add_model("critic", critic, lambda step: cfg.critic_lr * scale(step))
    loop = PPO(cfg, trainer, reference, reward, critic, tokenizer, prompts, prompt_ids, teacher=teacher,
               ptx=ptx, eval_rows=eval_rows)
    if resuming:
        trainer.resume()
    trainer.fit(step=loop.iteration)
    trainer.gather()   # under parallel=fsdp: the whole policy on rank 0, which evaluates it alone
    loop.policy = trainer.model
    trainer.save_final()

    if dist.is_main:   # the end-of-run evaluation: rank 0 alone
        summary = finish(loop, args, cfg, out, eval_rows)
        summary["prompts_skipped_too_long"] = too_long
        summary["seconds"] = timer.seconds
        finish_run(run, summary)
        print_summary(summary, run.out / "model")
    distributed.barrier()
    return 0


def _extra(cfg: PPOConfig, args) -> dict:
    return {"kind": "policy", "stage": "ppo", "advantage": cfg.advantage,
            "reward": str(args.reward) if args.reward else args.scorer}


def _median(path: Path, key: str, skip_first: bool = True) -> float | None:
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]
    values = values[1:] if skip_first and len(values) > 1 else values
    return statistics.median(values) if values else None


def finish(loop: PPO, args, cfg: PPOConfig, out: Path, eval_rows) -> dict:
    """summary.json: the run's last iteration, and with --eval the DPO stage's evaluation."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = lines[-1] if lines else {}
    summary = {
        "stage": "ppo", "advantage": cfg.advantage, "init": str(resolve(args.init)),
        "reward_source": loop.reward.name, "iterations": loop.step,
        "rollouts": loop.step * cfg.rollout_size, "kl_coef": loop.kl_ctl.value, "kl_coef_initial": cfg.kl_coef,
        "rollout_reward_final": last.get("reward"), "rollout_teacher_score_final": last.get("teacher_score"),
        "rollout_kl_final": last.get("kl"), "precision": loop.precision,
        "rollout_tokens_per_s": _median(out / "metrics.jsonl", "rollout_tokens_per_s"),
        "update_tokens_per_s": _median(out / "metrics.jsonl", "update_tokens_per_s"),
        "train_seconds": sum(r.get("rollout_seconds", 0) + r.get("score_seconds", 0) + r.get("update_seconds", 0)
                             for r in lines),
    }
    if eval_rows is None:
        return summary
    from lmschool.evaluate import evaluate_policy, reference_answers, run_file
    t0 = time.time()
    summary_file, answers = run_file(args.init, "summary.json"), run_file(args.init, "eval_answers.jsonl")
    sft_summary = json.loads(summary_file.read_text()) if summary_file is not None else None
    sft_records = reference_answers(answers, eval_rows, explicit=False, stage="ppo") if answers else None
    judge = TeacherJudge(school_teacher(args.eval))
    loop.policy.eval()
    with autocast(loop.device, loop.precision):
        results, records = evaluate_policy(
            loop.policy, loop.reference, loop.tokenizer, eval_rows, judge, reference_records=sft_records,
            max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
            kl_samples=cfg.kl_samples, seed=cfg.seed)
        answered = [r for r in records if r.get("response") is not None]
        fields = row_fields([row for row, r in zip(eval_rows, records) if r.get("response") is not None])
        rm, _ = loop.reward([r["prompt"] for r in answered], [r["response"] for r in answered], **fields)
        sft_rm = None
        if answered and all(r.get("reference_response") is not None for r in answered):
            sft_rm, _ = loop.reward([r["prompt"] for r in answered], [r["reference_response"] for r in answered],
                                    **fields)
    for r, v in zip(answered, rm):
        r["rm_reward"] = v
    summary.update(results)
    summary["rm_reward"] = float(np.mean(rm)) if rm else None
    summary["sft_rm_reward"] = float(np.mean(sft_rm)) if sft_rm else None
    if sft_summary:
        for key in ("teacher_score", "teacher_score_by_category", "fact_correct", "refusal_correct",
                    "correct", "correct_arithmetic", "end_of_turn_rate", "answer_tokens_mean"):
            if key in sft_summary:   # evaluate_policy's own figures (judged here) take precedence
                summary.setdefault(f"sft_{key}", sft_summary[key])
    summary["eval_seconds"] = time.time() - t0
    atomic_write_text(out / "eval_answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return summary


def print_summary(s: dict, model_dir: Path) -> None:
    def num(key, fmt=".3f"):
        return "n/a" if s.get(key) is None else format(s[key], fmt)

    print(f"ppo ({s['advantage']}): {s['iterations']} iterations, {s['rollouts']} rollouts in "
          f"{s['seconds']:.0f}s; final rollout reward {num('rollout_reward_final')}, KL "
          f"{num('rollout_kl_final')} -> {model_dir}")
    if "teacher_score" in s:
        print(f"ppo: teacher score {num('teacher_score')} (SFT {num('sft_teacher_score')}); win rate vs SFT "
              f"{num('win_rate_vs_sft', '.0%')} sampled, {num('win_rate_vs_sft_greedy', '.0%')} greedy; refusals {num('refusal_correct', '.0%')} (SFT "
              f"{num('sft_refusal_correct', '.0%')}); facts {num('fact_correct', '.0%')} (SFT "
              f"{num('sft_fact_correct', '.0%')}); KL from SFT {num('kl_from_sft')} nats; reward "
              f"{num('rm_reward')} (SFT {num('sft_rm_reward')})")
