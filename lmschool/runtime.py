"""Where and how the work runs: device, precision (autocast), RNG state, a progress display.

Shared by every stage and command (training, sampling, evaluation), so each picks its device and
precision the same way:
- `pick_device("auto")` is CUDA when there is a GPU, else the CPU; a device that is not there is a
  clear error, not a traceback.
- `resolve_precision("auto")` is bf16 autocast where the hardware runs it fast, else fp32; weights
  and optimizer state stay fp32 either way.
- `rng_state()` / `set_rng_state()` capture torch, Python, NumPy (and CUDA) generators, so a
  resumed run draws the same numbers as an uninterrupted one.
- `Progress` is a tqdm bar on a terminal and plain log lines in logs and CI.
- `MetricSinks` sends what the trainer writes to RUN/metrics.jsonl to TensorBoard (event files
  in RUN/tensorboard) or Weights & Biases (`report_to`); either package is imported only then.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import sys
import time

import numpy as np
import torch

from lmschool.errors import ConfigError, UserError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; 'cpu', 'cuda' or 'cuda:N' as given, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r}, but torch sees no CUDA GPU here; use device=cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name!r}, but there are only {torch.cuda.device_count()} GPUs")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device, precision: str):
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto' -> bf16 where the hardware runs it fast (CUDA with bf16; CPUs with AVX512-BF16 or
    AMX, through oneDNN), else fp32. Weights and optimizer state stay fp32 either way."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: the instructions that make bf16 matrix products faster than fp32 on a CPU.
    (oneDNN's own bf16 check also says yes on plain AVX512, where bf16 is emulated: there a SmolLM2
    pre-training step took 2.5x the time of fp32; bench/RESULTS.md, session 14.)"""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]) if isinstance(state["python"], list) else state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """A tqdm bar on a terminal; plain lines (every log_every steps) in logs and CI; both show the
    metrics named by `keys`."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, keys: tuple[str, ...] = ("loss", "lr")):
        self.enabled, self.tty, self.keys = enabled, sys.stderr.isatty(), keys
        self.total, self.start, self.t0 = total, initial, time.time()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
        self.desc = desc

    def update(self, step: int, metrics: dict, log_line: bool) -> None:
        if not self.enabled:
            return
        show = {k: metrics[k] for k in self.keys if isinstance(metrics.get(k), (int, float))}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in show.items()}, refresh=False)
        elif log_line:
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            text = " ".join(f"{k} {v:.4g}" for k, v in show.items())
            print(f"[{self.desc}] step {step}/{self.total} {text} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()




# ---- where metrics go besides metrics.jsonl -----------------------------------------------------------

TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard (or 'lmschool[tracking]')"),
            "wandb": ("wandb", "pip install wandb (or 'lmschool[tracking]')")}


def check_tracker(report_to: str) -> None:
    """Before any work: the package `report_to` needs is installed (a ConfigError naming the fix)."""
    if report_to == "none":
        return
    module, fix = TRACKERS[report_to]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"config key 'report_to': {report_to} is not installed here; {fix}, "
                          "or use report_to=none") from None


class MetricSinks:
    """The figures of each metrics.jsonl line, as scalars at its step, sent to TensorBoard (event
    files in RUN/tensorboard; a resumed run drops the events past its checkpoint, as it does the
    jsonl lines) or to W&B (a run named after RUN, its files in RUN/wandb, the same W&B run when
    RUN resumes; WANDB_MODE=offline keeps it on this machine, WANDB_PROJECT names the project,
    default lmschool). Numbers only: strings, dicts (PPO's sample) and non-finite values are left
    to metrics.jsonl."""

    def __init__(self, report_to: str, run_dir, config: dict | None = None, start_step: int = 0):
        self.report_to, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        elif report_to == "wandb":
            import os
            import secrets

            import wandb
            # one W&B run per lmschool run: its id kept in RUN/wandb/run-id, so a resumed run
            # continues the same W&B run (steps it logs again past the checkpoint are W&B's to drop)
            id_file = run_dir / "wandb" / "run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            if not run_id:
                run_id = secrets.token_hex(6)       # W&B ids: lowercase letters and digits
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id + "\n")
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmschool"), name=run_dir.name,
                                  dir=str(run_dir), config=config or {}, id=run_id, resume="allow")

    @staticmethod
    def scalars(record: dict) -> dict[str, float]:
        return {k: float(v) for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}

    def log(self, record: dict) -> None:
        step, values = int(record.get("step", 0)), self.scalars(record)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        elif self.run is not None and values:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
        self.writer = self.run = None
