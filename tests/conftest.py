"""Every test starts from the same random state, so a failure reproduces."""

import os
import random

import lmschool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads OpenMP)
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles never download anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and two threads stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny school world, written afresh for each test module that asks for it."""
    from lmschool.world.build import write
    out = tmp_path_factory.mktemp("world") / "w"
    write(out, seed=0, preset_name="tiny")
    return out
