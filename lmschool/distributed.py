"""The only module that touches torch.distributed: torchrun set-up, DDP or FSDP2 wrapping, rank helpers.

`torchrun --nproc_per_node=N -m lmschool <stage> ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
`init()` then joins the process group (gloo on CPU, nccl on GPU). Without torchrun everything
here is a no-op on one process, so stages call these helpers unconditionally.

Two ways to train on N processes (the config key `parallel`):
- ddp (the default): every rank holds the whole model and its AdamW state; gradients are averaged
  (DistributedDataParallel). Simple and fast while the model fits one device.
- fsdp: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023), applied to each
  decoder block and then to the root (embeddings, final norm, head): every parameter, gradient and
  AdamW moment is split in N shards along dim 0 (DTensors); a block's full weights exist only
  while it runs (all-gather before, reduce-scatter of its gradients after). Memory per rank falls
  from ~16 bytes per parameter to ~16/N plus one block's gathered weights.
Checkpoints stay whole Hugging Face directories either way: `full_state_dict` gathers the shards
onto rank 0 (on the CPU), which writes model.safetensors as one process would; resume loads the
whole file on every rank and keeps each rank's shard (`load_full_state_dict`). The AdamW state
of an FSDP run is saved keyed by parameter name (`full_optimizer_state`), also whole.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmschool.runtime import pick_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if launched by torchrun; pick each rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return Dist(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE, even to 1)."""
    return "WORLD_SIZE" in os.environ


def shard(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2 in place: each decoder block its own shard group (gathered only while it runs), then
    the root (embeddings, norm, head; a tied head shares the embedding's shard). Returns the model,
    now an FSDPModule whose parameters are DTensors; build its optimizer after this."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    if hasattr(model, "hidden"):   # losses that run the head in chunks call hidden(), not forward()
        register_fsdp_forward_method(model, "hidden")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module):
    """Accumulate this micro-batch's gradients locally, without the all-reduce (DDP) or reduce-scatter
    (FSDP) that the step's last micro-batch does for all of them."""
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. FSDP's total gradient norm) as a plain tensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded model, on rank 0's CPU ({} on the other ranks), or with
    `everywhere` on every rank's device. Every rank must call it (the shards are all-gathered)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=not everywhere))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole weights (read by every rank) into a sharded model: each rank keeps its shard.
    Keys the file leaves out (a tied lm_head) keep their values."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options(strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole AdamW state of a sharded model, keyed by parameter name, on rank 0 ({} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=_options())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each rank's figures summed over the ranks, e.g. its share of a global mean -> the mean. Every
    rank must call it with the same keys. One process: the figures as they are."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    totals = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, totals.tolist()))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group once a command is done (`lmschool.cli.main` calls it after the
    command has returned, so the stage's DDP / FSDP models are already freed): a wrapped model
    that outlives its process group can abort the process at exit ("terminate called without an
    active exception", seen with gloo on rank 1 of a PPO run). Every rank waits for the others
    first, then cycles are collected before the group goes."""
    if dist.is_available() and dist.is_initialized():
        import gc
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
