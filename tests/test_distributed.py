"""Several processes (torchrun, gloo on CPU): two DDP ranks equal one process with the same global
batch — the same losses and the same final weights (STYLE.md #10). The children run with
`torchrun --standalone` (a free port each time) and show their output when they fail (tests/procs.py).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from procs import run_checked, torchrun

DDP_SCRIPT = """
import sys, numpy as np, torch
from lmschool import distributed
from lmschool.data.pretrain import TokenWindows
from lmschool.losses.lm import lm_loss
from lmschool.model import ModelConfig, build_model
from lmschool.trainer import TrainConfig, fit
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
toks = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16)
batch = int(sys.argv[2])
d = distributed.init("cpu")
tc = TrainConfig(max_steps=4, batch_size=batch, lr=3e-3, warmup_steps=1, log_every=1, eval_every=0,
                 save_every=0, device="cpu", threads=1, precision="fp32")
fit(build_model(cfg), TokenWindows(toks, 16, batch, seed=3), lm_loss, tc, sys.argv[1], dist=d, desc="t")
distributed.shutdown()
"""


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_ddp_two_processes_equal_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run_checked([sys.executable, str(script), str(tmp_path / "one"), "8"])
    torchrun(2, script, tmp_path / "two", "4")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert torch.allclose(torch.tensor(one), torch.tensor(two), atol=1e-5)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
