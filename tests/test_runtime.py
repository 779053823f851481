"""Device, precision and RNG (lmschool/runtime.py)."""

import random

import numpy as np
import pytest
import torch

from lmschool.errors import UserError
from lmschool.runtime import autocast, pick_device, resolve_precision, rng_state, set_rng_state


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device='foo' is not a device; use auto, cpu, cuda or cuda:N"):
        pick_device("foo")
    with pytest.raises(UserError, match="device='meta' is not supported"):
        pick_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(UserError, match="torch sees no CUDA GPU here; use device=cpu"):
        pick_device("cuda")


def test_precision_and_autocast():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    assert resolve_precision(cpu, "auto") in ("fp32", "bf16")
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_rng_state_round_trip():
    """Restoring the state makes torch, Python and NumPy draw the same numbers again."""
    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])


def test_openmp_waiting(monkeypatch):
    """A short spin on an idle machine, passive waiting on a busy one, and an explicit setting
    left alone (lmschool._openmp_waiting runs at import, before torch loads OpenMP)."""
    import os

    import lmschool
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    env = {}
    lmschool._openmp_waiting(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.9, 0.5))
    env = {}
    lmschool._openmp_waiting(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for theirs in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(theirs)
        lmschool._openmp_waiting(env)
        assert env == theirs
