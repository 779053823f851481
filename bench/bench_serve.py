"""Benchmark: `lmschool serve` with 8 concurrent clients against the same 8 requests one after another.

    .venv/bin/python bench/bench_serve.py                          # runs/demo/sft if there, else a random L4-256
    .venv/bin/python bench/bench_serve.py --ckpt runs/demo/sft --repeats 5
    .venv/bin/python bench/bench_serve.py --stream false           # whole answers instead of SSE

One server (`python -m lmschool serve CKPT --port 0`, a child process, fp32) and, in this process,
8 requests for chat completions of exactly 64 new tokens each (`ignore_eos`, temperature 1, seeds
0-7, streamed as server-sent events by default): first one after another, then all 8 at once
(threads released by a barrier), repeated and interleaved, medians reported. Throughput is the
8 x 64 tokens over the wall time of the whole set. The bar (issue 18): concurrent >= 3x sequential.

Also checked: every answer has 64 tokens, and the concurrent answers equal the sequential ones
(same seeds) in all but float-rounding flips (counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS, NEW_TOKENS = 8, 64
PROMPTS = ["Where does Mia Brown live?", "What is 12 plus 30?", "Tell me about your pet.", "Hello!",
           "How old is Leo Green?", "What colour does Ava like?", "Write me a rude joke.", "What is 7 plus 5?"]


def random_checkpoint(directory: Path) -> Path:
    """The demo's model shape (L4-256: hidden 256, 4 layers, context 256), random weights, byte-level BPE."""
    from lmschool.checkpoint import save_model
    from lmschool.model import ModelConfig, build_model
    from lmschool.tokenizer import train_tokenizer

    tok = train_tokenizer([], byte_level=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, tie_word_embeddings=True, max_position_embeddings=256)
    save_model(directory / "l4-256", build_model(cfg, seed=0), tok)
    return directory / "l4-256"


class Server:
    """`lmschool serve` in a child process; its port read from the line it prints at start."""

    def __init__(self, ckpt: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "lmschool", "serve", str(ckpt), "--port", "0",
                                      "--precision", "fp32", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            self.proc.kill()
            raise SystemExit(f"the server did not start:\n{line}{self.proc.stdout.read()}")
        self.url = line.split(" at ")[1].split("/ ")[0]
        self.model = line.split(": ", 1)[1].split(" on ")[0].split(", ")[0]
        # drain its output so a chatty server never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def read_stream(client: httpx.Client, url: str, body: dict) -> tuple[list[str], int | None]:
    """POST a streaming request and read its server-sent events: each choice's text, in index order,
    and the completion tokens of the closing usage chunk (None without one)."""
    texts, tokens = {}, None
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                piece = c["delta"].get("content") if "delta" in c else c.get("text")
                texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
    return [texts[i] for i in sorted(texts)], tokens


def ask(client: httpx.Client, server: Server, i: int, stream: bool) -> tuple[str, int]:
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 1.0, "seed": i, "stream": stream,
            "stream_options": {"include_usage": True}}
    if not stream:
        r = client.post(f"{server.url}/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]
    texts, tokens = read_stream(client, f"{server.url}/v1/chat/completions", body)
    return "".join(texts), tokens or 0


def sequential(server, stream):
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        answers = [ask(client, server, i, stream) for i in range(CLIENTS)]
        return time.perf_counter() - start, answers


def concurrent(server, stream):
    answers = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS + 1)

    def one(i):
        with httpx.Client(timeout=600) as client:
            barrier.wait()
            answers[i] = ask(client, server, i, stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="checkpoint to serve (default: runs/demo/sft if there, else a random L4-256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", default="true", choices=["true", "false"])
    args = parser.parse_args()
    stream = args.stream == "true"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else ROOT / "runs/demo/sft"
        if not args.ckpt and not ckpt.is_dir():
            ckpt = random_checkpoint(Path(tmp))
        server = Server(ckpt)
        try:
            sequential(server, stream)          # warm-up: first-call costs out of the timings
            seq_times, con_times, flips = [], [], 0
            for _ in range(args.repeats):
                t, seq_answers = sequential(server, stream)
                seq_times.append(t)
                t, con_answers = concurrent(server, stream)
                con_times.append(t)
                assert all(n == NEW_TOKENS for _, n in seq_answers + con_answers), "an answer was not 64 tokens"
                flips += sum(a[0] != b[0] for a, b in zip(seq_answers, con_answers))
        finally:
            server.close()
    tokens = CLIENTS * NEW_TOKENS
    seq, con = statistics.median(seq_times), statistics.median(con_times)
    print(f"checkpoint {ckpt.name if args.ckpt or ckpt.is_dir() else 'random L4-256'}, {CLIENTS} requests x "
          f"{NEW_TOKENS} new tokens, {'streamed' if stream else 'whole answers'}, median of {args.repeats}")
    print("| clients | wall s | tokens/s |")
    print("|---|---|---|")
    print(f"| 1 after another | {seq:.2f} | {tokens / seq:.0f} |")
    print(f"| {CLIENTS} at once | {con:.2f} | {tokens / con:.0f} |")
    print(f"speed-up {seq / con:.2f}x (bar: >= 3x); answers that differ between the two runs: {flips} "
          f"of {CLIENTS * args.repeats}")


if __name__ == "__main__":
    main()
