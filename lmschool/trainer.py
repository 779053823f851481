"""The one training loop every stage uses, PPO included: `Trainer.fit` (and `fit(...)` around it).

A stage brings its model and either
- a data source with `micro_batches(step, n_micro, rank, world) -> list[dict]` that is a pure
  function of the step (so resuming needs no data state, and 1 x 8 accumulation sees the same
  examples as 8 x 1), and `loss_fn(model, batch) -> (loss, metrics)` where `loss` is a mean over
  the batch's `num_targets` items (tokens, pairs, ...): each step of the loop is `train_step`, one
  optimizer step; or
- its own step, `fit(step=...)`: PPO's is one RL iteration (a rollout, then ppo_epochs x
  minibatches of optimizer steps), made of the pieces `train_step` is made of: `set_lr`,
  `backward` per micro-batch, `optimizer_step`. The loop counts these steps (cfg.max_steps).

The trainer owns one or more groups of (model, AdamW, learning rate): the stage's model, and any
a stage adds with `add_model` (PPO's critic, with its own critic_lr). The learning rate is a pure
function of the step (optim.lr_at). Each group is clipped to grad_clip on its own.

One step reads top to bottom: set the learning rates, micro-steps (forward under autocast, scale,
backward), clip each group, NaN guard (a non-finite loss or gradient norm stops the run with
TrainingDiverged and no weight updated), optimizer steps, zero grads. Micro-batch losses are
weighted by their share of the global batch's targets, so accumulation and DDP give the same
gradient as one big batch. Then the loop logs, and evaluates / checkpoints when due.

Logged to RUN/metrics.jsonl every log_every steps (every step with `log_every_step`, as PPO
asks): loss, lr, grad_norm, tokens/s, the loss_fn's metrics (or the stage step's), and evaluation
results when due. A progress bar with ETA on a terminal, plain log lines otherwise. A checkpoint
(RUN/checkpoints/step-N) holds the model and trainer_state.pt: step, optimizers, RNG, the added
models' weights and any state a stage registered in `Trainer.stateful` (PPO's KL controller);
`resume()` continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch

from lmschool import adapters, distributed
from lmschool.adapters import LoraConfig
from lmschool.checkpoint import (checkpoint_dirs, latest_checkpoint, load_training_state, save_model,
                                 save_training_checkpoint)
from lmschool.config import check, to_dict
from lmschool.errors import UserError
from lmschool.model import Transformer, set_gradient_checkpointing
from lmschool.optim import build_optimizer, lr_at
from lmschool.runtime import (MetricSinks, Progress, autocast, check_tracker, pick_device, resolve_precision,
                              rng_state, set_rng_state, to_device)


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
    gradient_checkpointing: bool = False
    """Keep only each block's input and recompute its activations in the backward pass: much less
    activation memory for about a third more compute; the same gradients."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also send the metrics.jsonl figures to TensorBoard (RUN/tensorboard) or Weights & Biases (RUN/wandb)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters: lora.r > 0 trains only low-rank adapters (lmschool/adapters.py), saved in the PEFT format."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp (each process holds the whole model) or fsdp (FSDP2: weights, gradients and
    AdamW state sharded across the processes; checkpoints are still whole). One process ignores it."""

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
        check_tracker(self.report_to)
        check(self.parallel != "fsdp" or distributed.launched_by_torchrun(), "parallel",
              "fsdp shards the model across torchrun processes; launch with "
              "`torchrun --nproc_per_node=N -m lmschool ...`, or leave parallel=ddp on one process")
        check(self.parallel != "fsdp" or self.lora.r == 0, "parallel",
              "fsdp with LoRA adapters (lora.r > 0) is not supported; use parallel=ddp (adapters are small)")


class DataSource(Protocol):
    def micro_batches(self, step: int, n_micro: int, rank: int, world: int) -> list[dict]:
        """The micro-batches this process trains on at optimizer step `step`."""


LossFn = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict]"]


class TrainingDiverged(UserError):
    """The loss or gradient became NaN/inf; weights were not updated."""


@dataclass
class Group:
    """A model the trainer steps, with its own AdamW and learning rate; clipped on its own."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]   # the learning rate of a step: a pure function of the step


def schedule(cfg: TrainConfig, peak: float) -> Callable[[int], float]:
    """The learning rate of each step: up to `peak` with cfg's warmup and decay (optim.lr_at)."""
    return lambda step: lr_at(step, lr=peak, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                              min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.schedule)


class Trainer:
    """Owns the optimizers, precision, DDP wrapping, checkpoints and metrics of a stage's models."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None, cfg: TrainConfig, run_dir: str | Path,
                 *, tokenizer=None, extra: dict | None = None, dist: distributed.Dist | None = None,
                 desc: str = "train", progress: bool = True, lr: Callable[[int], float] | None = None,
                 log_every_step: bool = False, progress_keys: tuple[str, ...] = ("loss", "lr")):
        self.cfg, self.loss_fn, self.run_dir = cfg, loss_fn, Path(run_dir)
        self.dist = dist or distributed.Dist(device=pick_device(cfg.device))
        self.device = self.dist.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = model.to(self.device)          # the plain module: saved, evaluated
        self.tokenizer, self.extra, self.desc, self.show_progress = tokenizer, extra, desc, progress
        self.log_every_step = log_every_step        # every step a metrics line; log_every paces the progress
        self.progress_keys = progress_keys          # the metrics the progress display shows
        self.precision = resolve_precision(self.device, cfg.precision)
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(self.model, True)
        self.sharded = self.dist.enabled and cfg.parallel == "fsdp"
        if self.sharded:   # FSDP2 replaces the parameters by shards: the optimizer is built on those
            distributed.shard(self.model, self.dist)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=(cfg.beta1, cfg.beta2))
        self.groups = [Group("model", self.model, self.optimizer, lr or schedule(cfg, cfg.lr))]
        self.stateful: dict = {}   # name -> an object with state_dict / load_state_dict, kept in checkpoints
        self.step = 0
        self.train_model = self.model if self.sharded else distributed.wrap(self.model, self.dist)
        self.compute_loss = lambda batch: loss_fn(self.train_model, batch)
        if cfg.compile and self.dist.enabled:
            self.train_model = torch.compile(self.train_model)
        elif cfg.compile:
            # model and loss in one graph: 16% faster than compiling the model alone (L4-256,
            # bf16, CPU), since the logits' upcast and log-softmax fuse with the LM head
            self.compute_loss = torch.compile(self.compute_loss)
        self.tokens_seen = 0
        self.sinks: MetricSinks | None = None   # TensorBoard / W&B while fit runs (cfg.report_to)

    def add_model(self, name: str, model: torch.nn.Module, lr: Callable[[int], float]) -> Group:
        """Train `model` too, with its own AdamW (cfg's weight decay and betas) and learning rate;
        its weights and optimizer go into the checkpoints' trainer_state.pt as NAME, NAME_optimizer.
        Under parallel=fsdp it is sharded as the stage's model is (its forwards must run on every rank)."""
        if self.cfg.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        model = model.to(self.device)
        if self.sharded:
            distributed.shard(model, self.dist)
        optimizer = build_optimizer(model, lr=lr(self.step), weight_decay=self.cfg.weight_decay,
                                    betas=(self.cfg.beta1, self.cfg.beta2))
        self.groups.append(Group(name, model, optimizer, lr))
        return self.groups[-1]

    # ---- the pieces of a step ----------------------------------------------------------------
    def set_lr(self) -> float:
        """Every group's learning rate for this step; returns the model's."""
        for group in self.groups:
            for param_group in group.optimizer.param_groups:
                param_group["lr"] = group.lr(self.step)
        return self.groups[0].lr(self.step)

    def backward(self, compute: Callable[[object], tuple[torch.Tensor, dict]], batch, weight: float
                 ) -> tuple[float, dict]:
        """One micro-step: `compute(batch) -> (loss, metrics)` under autocast, then the backward
        of loss x weight (x processes, since DDP averages gradients; the weights of a step's
        micro-batches add up to 1 over all processes). Returns the loss and metrics x weight."""
        with autocast(self.device, self.precision):
            loss, metrics = compute(batch)
        scale = weight * self.dist.world_size
        (loss * scale if scale != 1.0 else loss).backward()
        return loss.detach().float().item() * weight, {k: float(v) * weight for k, v in metrics.items()}

    def optimizer_step(self, groups: list[Group], loss: float) -> dict[str, float]:
        """Clip each group's gradient norm to grad_clip; stop if the loss or a norm is not finite
        (TrainingDiverged, no weight updated); step and zero. Returns the norms: grad_norm for the
        model, NAME_grad_norm for an added group."""
        norms = {"grad_norm" if g is self.groups[0] else f"{g.name}_grad_norm": self._clip(g.model)
                 for g in groups}
        if not all(math.isfinite(x) for x in (loss, *norms.values())):
            for g in groups:
                g.optimizer.zero_grad(set_to_none=True)
            last = latest_checkpoint(self.run_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in norms.items())
            lr = self.optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(
                f"loss became {loss} ({shown}) at step {self.step}; weights were not updated and "
                f"{where}. Try a lower lr (now {lr:.3g}) or grad_clip.")
        for g in groups:
            g.optimizer.step()
            g.optimizer.zero_grad(set_to_none=True)
        return norms

    def _clip(self, model: torch.nn.Module) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if distributed.is_sharded(model):   # the norm over all shards; max_norm inf scales by exactly 1
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or math.inf)
            return float(distributed.full_value(norm))
        if self.cfg.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    # ---- one optimizer step on a stage's data ------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Accumulate gradients over `micro_batches`, clip, check, step. Returns metrics."""
        lr = self.set_lr()
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
            with contextlib.nullcontext() if sync else distributed.no_sync(self.train_model):
                loss, metrics = self.backward(self.compute_loss, batch, counts[i].item() / total)
            loss_total += loss
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            self.tokens_seen += int(batch.get("num_tokens", 0))
        norms = self.optimizer_step(self.groups, loss_total)
        self.step += 1
        # each rank holds its share of the global mean: the sum over ranks is the global mean
        totals = distributed.sum_over_ranks({**sums, "loss": loss_total})
        return {"loss": totals.pop("loss"), "lr": lr, **norms, **totals}

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The resume state (every rank must call it under parallel=fsdp: the AdamW shards are gathered)."""
        optimizer = (distributed.full_optimizer_state(self.model, self.optimizer) if self.sharded
                     else self.optimizer.state_dict())
        state = {"step": self.step, "optimizer": optimizer, "rng": rng_state(),
                 "tokens_seen": self.tokens_seen}
        for g in self.groups[1:]:   # a model with adapters: its trained tensors only (the base is on disk)
            if self.sharded:   # whole, gathered from the shards (on rank 0)
                state[g.name] = distributed.full_state_dict(g.model)
                state[f"{g.name}_optimizer"] = distributed.full_optimizer_state(g.model, g.optimizer)
                continue
            state[g.name] = (adapters.trainable_state_dict(g.model) if adapters.has_adapters(g.model) else
                             {k: v.detach().cpu() for k, v in g.model.state_dict().items()})
            state[f"{g.name}_optimizer"] = g.optimizer.state_dict()
        for name, obj in self.stateful.items():
            state[name] = obj.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.sharded:
            distributed.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for g in self.groups[1:]:
            if g.name not in state:
                raise UserError(f"--resume: the checkpoint has no {g.name} (the run was started without "
                                "one); resume with the settings it started with, or use --force")
            if self.sharded:   # each rank keeps its shard of the whole tensors
                distributed.load_full_state_dict(g.model, state[g.name])
                distributed.load_full_optimizer_state(g.model, g.optimizer, state[f"{g.name}_optimizer"])
                continue
            if adapters.has_adapters(g.model):
                missing = sorted(set(adapters.trainable_state_dict(g.model)) - set(state[g.name]))
                if missing:
                    raise UserError(f"--resume: the checkpoint's {g.name} has no {missing[0]} (the run was started "
                                    "with other lora settings); resume with the settings it started with, or use --force")
                g.model.load_state_dict(state[g.name], strict=False)
            else:
                g.model.load_state_dict(state[g.name])
            g.optimizer.load_state_dict(state[f"{g.name}_optimizer"])
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        set_rng_state(state["rng"])
        self.tokens_seen = int(state.get("tokens_seen", 0))

    def whole_model(self, everywhere: bool = False) -> torch.nn.Module | None:
        """The model to save or evaluate alone on rank 0: itself, or under parallel=fsdp a plain copy
        with the gathered weights on rank 0 (None on the other ranks; every rank must call it).
        everywhere: a copy on every rank (PPO samples its rollouts from one)."""
        if not self.sharded:
            return self.model
        tensors = distributed.full_state_dict(self.model, everywhere=everywhere)
        if not (self.dist.is_main or everywhere):
            return None
        plain = Transformer(self.model.config, self.model.head)
        plain.load_state_dict(tensors)
        return plain.to(self.device)

    def gather(self) -> None:
        """After training under parallel=fsdp: the model becomes the whole model on rank 0 (None on
        the others), for the stage's final evaluation, summary and save_final, which rank 0 runs alone."""
        if self.sharded:
            self.model = self.whole_model()
            self.sharded = False

    def save_checkpoint(self) -> Path | None:
        path = None
        model = self.whole_model()
        state = self.state_dict() if self.sharded else None   # gathered by every rank
        if self.dist.is_main:
            path = save_training_checkpoint(self.run_dir, self.step, model, state or self.state_dict(),
                                            self.tokenizer, self.extra, self.cfg.keep_last)
        distributed.barrier()
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of the run directory, if any. Returns whether it did."""
        from safetensors.torch import load_file
        last = latest_checkpoint(self.run_dir)   # the newest intact one; skipped ones are said
        if last is None:
            if checkpoint_dirs(self.run_dir):
                raise UserError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'} can be resumed from "
                                "(each is damaged, see above); pass --force to start the run afresh")
            if self.dist.is_main:   # only rank 0 writes metrics.jsonl: two ranks rewriting it lose lines
                truncate_metrics(self.run_dir / "metrics.jsonl", 0)   # killed before its first checkpoint: afresh
            return False
        with_adapters = (last / adapters.ADAPTER_CONFIG).is_file()
        if with_adapters != adapters.has_adapters(self.model):
            started = "with LoRA adapters" if with_adapters else "without LoRA (lora.r=0)"
            raise UserError(f"--resume: {self.run_dir} was started {started}; resume with the settings it started "
                            "with (RUN/config.yaml), or pass --force to start afresh")
        try:
            if with_adapters:
                adapters.load_adapter_state(self.model, load_file(str(last / adapters.ADAPTER_WEIGHTS)), str(last))
            elif self.sharded:
                distributed.load_full_state_dict(self.model, load_file(str(last / "model.safetensors")))
            else:
                self.model.load_state_dict(load_file(str(last / "model.safetensors")), strict=False)
        except (RuntimeError, UserError) as e:   # another shape: the config changed since the run started
            raise UserError(f"--resume: {last} holds a model of another shape than this config builds "
                            f"({str(e).splitlines()[-1].strip()[:120]}); resume with the settings the run "
                            "started with (RUN/config.yaml), or pass --force to start afresh") from None
        self.load_state_dict(load_training_state(last))
        if self.dist.is_main:   # only rank 0 writes metrics.jsonl: two ranks rewriting it lose lines
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return True

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, data: DataSource | None = None, evaluate: Callable[[torch.nn.Module], dict] | None = None,
            *, step: Callable[[], dict] | None = None) -> dict:
        """Steps until cfg.max_steps: `train_step` on data's micro-batches, or the stage's own
        `step()` (one step of the loop that advances self.step by one and returns its metrics).
        With cfg.report_to, every metrics line goes to TensorBoard / W&B too while it runs."""
        if self.dist.is_main and self.cfg.report_to != "none":
            self.sinks = MetricSinks(self.cfg.report_to, self.run_dir, to_dict(self.cfg), self.step)
        try:
            return self._fit(data, evaluate, step)
        finally:
            if self.sinks is not None:
                self.sinks.close()
                self.sinks = None

    def _fit(self, data, evaluate, step) -> dict:
        cfg = self.cfg
        if step is None:
            def step():
                return self.train_step(data.micro_batches(self.step, cfg.grad_accum, self.dist.rank,
                                                          self.dist.world_size))
        metrics_path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        progress = Progress(cfg.max_steps, self.step, self.desc, self.show_progress and self.dist.is_main,
                            self.progress_keys)
        last: dict = {}
        t_log, tokens_log = time.time(), self.tokens_seen
        try:
            while self.step < cfg.max_steps:
                last = step()
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                if log_now and data is not None:   # the data's tokens/s over the log interval
                    dt = max(time.time() - t_log, 1e-9)
                    last["tokens_per_s"] = (self.tokens_seen - tokens_log) * self.dist.world_size / dt
                    t_log, tokens_log = time.time(), self.tokens_seen
                if log_now or self.log_every_step:
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
        if self.dist.is_main:   # nan (e.g. PPO's explained variance of constant returns) -> null
            with open(path, "a") as f:
                f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                    for k, v in record.items()}) + "\n")
            if self.sinks is not None:
                self.sinks.log(record)

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
    trainer.gather()   # the stage's summary and final evaluation run on rank 0 alone: a whole model
    trainer.save_final()
    distributed.barrier()
    return trainer, final
