"""What the serve tests share: two tiny taught checkpoints laid out as a pipeline run (sft, dpo,
world/, report.md and a plot), and a live server on a free port in this process.

The models are taught a few conversations until their greedy answers are exactly those, so
a test can say what a right answer is; "sft" and "dpo" are taught different answers to "Hi!",
so a comparison shows two different answers.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

TAUGHT = {
    "sft": [("Hi!", "Hello! How can I help?"), ("What is 2 plus 3?", "2 plus 3 is 5."),
            ("Where does Mia live?", "Mia lives in Oakford."), ("Hello", "Hi.")],
    "dpo": [("Hi!", "Hello there, friend."), ("What is 2 plus 3?", "Five."),
            ("Where does Mia live?", "In Oakford."), ("Hello", "Hi.")],
}
HANG_GUARD_S = 600   # waits end on a condition; this only stops a hung test


def taught_model(tok, pairs, run_dir: Path, seed: int = 0, context: int = 256):
    """A 2-layer model trained on `pairs` (user, assistant) until it answers them greedily."""
    from lmschool.data.sft import SFTBatches, make_example
    from lmschool.losses.lm import lm_loss
    from lmschool.model import ModelConfig, build_model
    from lmschool.trainer import TrainConfig, fit

    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    examples = [make_example(*tok.render(c), f"t:{i}") for i, c in enumerate(conversations)]
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=context), seed=seed)
    cfg = TrainConfig(max_steps=120, batch_size=4, lr=1e-2, warmup_steps=10, log_every=60, eval_every=0,
                      save_every=0, device="cpu", threads=1, precision="fp32")
    trainer, _ = fit(model, SFTBatches(examples, 4, pad_id=tok.pad_id), lm_loss, cfg, run_dir, tokenizer=tok,
                     desc="t")
    return trainer.model.eval()


def pipeline_run(root: Path, world_dir: Path) -> Path:
    """root/run: sft/ and dpo/ (taught checkpoints), world/ (the tiny world), report.md, plots/."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmschool.tokenizer import train_tokenizer

    run = root / "run"
    tok = train_tokenizer([], byte_level=True)
    for name, pairs in TAUGHT.items():
        taught_model(tok, pairs, run / name, seed=len(name))
    shutil.copytree(world_dir, run / "world")
    (run / "plots").mkdir()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [2.0, 1.0, 0.5])
    fig.savefig(run / "plots" / "losses.png")
    plt.close(fig)
    (run / "machine.json").write_text("{}\n")
    (run / "report.md").write_text("# lmschool run report: `run`\n\nTwo **taught** models.\n\n"
                                   "| stage | facts right |\n|---|---|\n| SFT | 81.5% |\n| DPO | 81.0% |\n\n"
                                   "![Training loss](plots/losses.png)\n")
    return run


def wait_for(condition, what: str):
    """Poll `condition()` until it is true (no fixed sleep decides a result; the guard is a hang)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def paused_after(engine, steps: int = 1):
    """The engine runs `steps` more decode steps, then waits until the block ends: a stream started
    in the block is then known to be running, not finished. (Taking `engine.hold()` once a first
    chunk has arrived is a race: a tiny model can write a whole answer in between, and a test
    waiting on that answer's slot or cancel then waits forever.) Yields an Event set once the
    engine waits."""
    waiting, go, done = threading.Event(), threading.Event(), [0]
    step = engine._step   # bound: the engine's thread looks _step up on the instance at every step

    def step_then_wait(name, decoder):
        step(name, decoder)
        done[0] += 1
        if done[0] >= steps and not go.is_set():
            waiting.set()
            go.wait(HANG_GUARD_S)

    engine._step = step_then_wait
    try:
        yield waiting
    finally:
        del engine._step   # the class's own again
        go.set()


class LiveServer:
    """The app over `served` models with uvicorn on a free port, in a thread of this process (the
    engine is at hand for `hold()` and its counters)."""

    def __init__(self, served: dict, *, api_key=None, report_run=None, **engine_kw):
        import uvicorn

        from lmschool.commands.serve import bind
        from lmschool.serve.app import create_app
        from lmschool.serve.models import Teachers
        from lmschool.serve.engine import Engine

        self.engine = Engine(served, **engine_kw)
        app = create_app(served, self.engine, api_key=api_key, report_run=report_run, teachers=Teachers())
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        if not self.server.started:
            raise AssertionError("the server thread died before it started (see the log above)")

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=HANG_GUARD_S)
        self.engine.stop()
