"""The one training loop every stage uses: `fit(model, data, loss_fn, cfg, run_dir)`.

A stage brings three things: the model, a data source with `micro_batches(step, n_micro, rank,
world) -> list[dict]` that is a pure function of the step (so resuming needs no data state, and
1 x 8 accumulation sees the same examples as 8 x 1), and `loss_fn(model, batch) -> (loss,
metrics)` where `loss` is a mean over the batch's `num_targets` items (tokens, pairs, ...).

Each step reads top to bottom: evaluate / checkpoint when due, micro-steps (forward under
autocast, scale, backward), clip, NaN guard, optimizer step, zero grads, log. Micro-batch losses
are weighted by their share of the global batch's targets, so accumulation and DDP give the same
gradient as one big batch. The learning rate is a pure function of the step (optim.lr_at).

Logged per step to RUN/metrics.jsonl: loss, lr, grad_norm, tokens/s, the loss_fn's metrics, and
evaluation results when due. A progress bar with ETA on a terminal, plain log lines otherwise.
PPO and other loops that make their own batches call `Trainer.train_step` directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch

from lmschool import distributed
from lmschool.checkpoint import (latest_checkpoint, load_training_state, save_model,
                                 save_training_checkpoint)
from lmschool.config import check
from lmschool.errors import UserError
from lmschool.optim import build_optimizer, lr_at
from lmschool.runtime import (Progress, autocast, pick_device, resolve_precision, rng_state, set_rng_state,
                              to_device)


@dataclass
class TrainConfig:
    """Settings of the training loop, shared by every stage."""

    max_steps: int = 1000
    """Number of optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size x grad_accum x processes)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    eval_every: int = 200
    """Evaluate every this many steps (0 = only at the end)."""
    save_every: int = 500
    """Write a resumable checkpoint every this many steps (0 = only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: bf16 autocast (weights stay fp32), fp32, or auto (bf16 where the GPU/CPU runs it fast)."""
    compile: bool = False
    """Compile the model with torch.compile (faster steps after a one-off compile)."""
    seed: int = 0
    """Seed for data order, initialisation and dropout."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)."""

    def __post_init__(self):
        check(self.max_steps >= 0, "max_steps", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        check(self.lr > 0, "lr", "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


class DataSource(Protocol):
    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        """The micro-batches this process trains on at optimizer step `step`."""


LossFn = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict]"]


class TrainingDiverged(UserError):
    """The loss or gradient became NaN/inf; weights were not updated."""


class Trainer:
    """Owns the optimizer, precision, DDP wrapping, checkpoints and metrics for one model."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, run_dir: str | Path,
                 *, tokenizer=None, extra: dict | None = None, dist: distributed.Dist | None = None,
                 desc: str = "train", progress: bool = True):
        self.cfg, self.loss_fn, self.run_dir = cfg, loss_fn, Path(run_dir)
        self.dist = dist or distributed.Dist(device=pick_device(cfg.device))
        self.device = self.dist.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = model.to(self.device)          # the plain module: saved, evaluated
        self.tokenizer, self.extra, self.desc, self.show_progress = tokenizer, extra, desc, progress
        self.precision = resolve_precision(self.device, cfg.precision)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=(cfg.beta1, cfg.beta2))
        self.step = 0
        self.train_model = distributed.wrap(self.model, self.dist)
        self.compute_loss = lambda batch: loss_fn(self.train_model, batch)
        if cfg.compile and self.dist.enabled:
            self.train_model = torch.compile(self.train_model)
        elif cfg.compile:
            # model and loss in one graph: 16% faster than compiling the model alone (L4-256,
            # bf16, CPU), since the logits' upcast and log-softmax fuse with the LM head
            self.compute_loss = torch.compile(self.compute_loss)
        self.tokens_seen = 0

    # ---- one optimizer step -----------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Accumulate gradients over `micro_batches`, clip, check, step. Returns metrics."""
        cfg, model = self.cfg, self.train_model
        lr = lr_at(self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                   min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # each micro-batch's weight: its share of the global batch's targets
        counts = torch.tensor([float(b.get("num_targets", 1)) for b in micro_batches])
        total = distributed.all_reduce_sum(counts.sum().clone()).item()
        if total <= 0:
            raise UserError(f"step {self.step}: the batch has no target tokens (all masked out)")
        sums: dict[str, float] = {}
        loss_total = 0.0
        self.model.train()
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            sync = i == len(micro_batches) - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            with ctx:
                with autocast(self.device, self.precision):
                    loss, metrics = self.compute_loss(batch)
                weight = counts[i].item() / total
                (loss * weight * self.dist.world_size).backward()
            loss_total += loss.detach().float().item() * weight
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            self.tokens_seen += int(batch.get("num_tokens", 0))
        grad_norm = self._clip()
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            last = latest_checkpoint(self.run_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {loss_total} (grad norm {grad_norm}) at step {self.step}; weights were "
                f"not updated and {where}. Try a lower lr (now {lr:.3g}) or grad_clip.")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # each rank holds its share of the global mean: the sum over ranks is the global mean
        keys = sorted(sums)
        totals = distributed.all_reduce_sum(torch.tensor([loss_total] + [sums[k] for k in keys],
                                                         dtype=torch.float64)).tolist()
        return {"loss": totals[0], "lr": lr, "grad_norm": grad_norm, **dict(zip(keys, totals[1:]))}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.tokens_seen = int(state.get("tokens_seen", 0))

    def save_checkpoint(self, extra_state: dict | None = None) -> Path | None:
        path = None
        if self.dist.is_main:
            state = self.state_dict()
            if extra_state:
                state["extra"] = extra_state
            path = save_training_checkpoint(self.run_dir, self.step, self.model, state, self.tokenizer,
                                            self.extra, self.cfg.keep_last)
        distributed.barrier()
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of the run directory, if any. Returns whether it did."""
        from safetensors.torch import load_file
        last = latest_checkpoint(self.run_dir)
        if last is None:
            return False
        tensors = load_file(str(last / "model.safetensors"))
        self.model.load_state_dict(tensors, strict=False)
        self.load_state_dict(load_training_state(last))
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return True

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, data: DataSource, evaluate: Callable[[torch.nn.Module], dict] | None = None) -> dict:
        cfg = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        progress = Progress(cfg.max_steps, self.step, self.desc, self.show_progress and self.dist.is_main)
        last: dict = {}
        t_log, tokens_log = time.time(), self.tokens_seen
        try:
            while self.step < cfg.max_steps:
                micro = data.micro_batches(self.step, cfg.grad_accum, self.dist.rank, self.dist.world_size)
                last = self.train_step(micro)
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                if log_now:
                    dt = max(time.time() - t_log, 1e-9)
                    last["tokens_per_s"] = (self.tokens_seen - tokens_log) * self.dist.world_size / dt
                    t_log, tokens_log = time.time(), self.tokens_seen
                    self._log(metrics_path, {"step": self.step, **last})
                progress.update(self.step, last, log_now)
                if self.step < cfg.max_steps:  # the end is evaluated and saved below
                    if evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._log(metrics_path, {"step": self.step, **self._evaluate(evaluate)})
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
        finally:
            progress.close()
        final = {"step": self.step, "loss": last.get("loss")}
        if evaluate:
            results = self._evaluate(evaluate)
            self._log(metrics_path, {"step": self.step, **results})
            final.update(results)
        return final

    def _evaluate(self, evaluate) -> dict:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            out = evaluate(self.model)
        self.model.train()
        return out

    def _log(self, path: Path, record: dict) -> None:
        if self.dist.is_main:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_final(self, path: str | Path | None = None) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_model(path or self.run_dir / "model", self.model, self.tokenizer, self.extra)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(line + "\n" for line in keep))


def fit(model, data: DataSource, loss_fn: LossFn, cfg: TrainConfig, run_dir: str | Path, *,
        evaluate=None, tokenizer=None, extra=None, dist=None, resume: bool = False,
        desc: str = "train") -> tuple[Trainer, dict]:
    """Train `model` for cfg.max_steps (resuming from RUN/checkpoints if asked); save RUN/model."""
    trainer = Trainer(model, loss_fn, cfg, run_dir, tokenizer=tokenizer, extra=extra, dist=dist, desc=desc)
    if resume:
        trainer.resume()
    final = trainer.fit(data, evaluate)
    trainer.save_final()
    distributed.barrier()
    return trainer, final
