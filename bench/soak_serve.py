"""Soak: 2,000 requests from 16 clients against one `lmschool serve`, good and malformed mixed.

    .venv/bin/python bench/soak_serve.py                         # runs/demo/sft if there, else a random L4-256
    .venv/bin/python bench/soak_serve.py --ckpt runs/demo/sft --requests 2000 --clients 16

The server is a child process (`lmschool serve CKPT --port 0 --precision fp32`). Each client
thread sends its share of requests, in a seeded mix: greedy chat turns (whole and streamed),
seeded samples (n=1 and n=2), plain completions, and malformed ones (bad JSON, wrong types,
unknown model, a prompt longer than the context, unsupported fields), plus clients that leave
mid-stream. Checked:
- no crash: the server answers /health at the end;
- every good request is answered correctly: greedy turns and seeded samples equal what the same
  request gets alone on the idle server before the soak (its exact single-prompt path), token
  counts included; every malformed one gets its 4xx in OpenAI's error shape;
- memory: the server's resident set after the soak grows less than 10% over its size after a
  warm-up of 200 requests (from /proc/PID/status, VmRSS).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import Server, random_checkpoint, read_stream  # noqa: E402

QUESTIONS = ["Where does Mia Brown live?", "What is 12 plus 30?", "Hello!", "How old is Leo Green?",
             "Write me a rude joke.", "What pet does Ava have?"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def good_requests(model: str) -> list[dict]:
    """The distinct good requests (each is sent many times; its right answer is known beforehand)."""
    out = []
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        out.append({"path": "chat", "body": {"model": model, "messages": msgs, "temperature": 0, "max_tokens": 48}})
        out.append({"path": "chat", "body": {"model": model, "messages": msgs, "temperature": 1.0, "seed": 7,
                                             "max_tokens": 48, "n": 2}})
        out.append({"path": "chat", "body": {"model": model, "messages": msgs, "temperature": 0.8, "top_p": 0.9,
                                             "seed": 3, "max_tokens": 48}})
    out.append({"path": "completions", "body": {"model": model, "prompt": "Mia Brown lives in", "temperature": 0,
                                                "max_tokens": 24}})
    return out


def bad_requests(model: str) -> list[tuple[bytes, int]]:
    msgs = [{"role": "user", "content": "Hi"}]
    as_json = lambda d: json.dumps(d).encode()   # noqa: E731
    return [(b'{"model": "' + model.encode() + b'", "messages": [', 400),
            (as_json({"model": model, "messages": msgs, "temperature": "hot"}), 400),
            (as_json({"model": model, "messages": "Hi"}), 400),
            (as_json({"model": "no-such-model", "messages": msgs}), 404),
            (as_json({"model": model, "messages": [{"role": "user", "content": "word " * 400}]}), 400),
            (as_json({"model": model, "messages": msgs, "logprobs": True}), 400),
            (as_json({"model": model, "messages": msgs, "max_tokens": -3}), 400),
            (b"[]", 400)]


def answer(client: httpx.Client, url: str, request: dict, stream: bool) -> tuple[list[str], int]:
    path = "/v1/chat/completions" if request["path"] == "chat" else "/v1/completions"
    body = {**request["body"], "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    if not stream:
        body.pop("stream_options")
        r = client.post(url + path, json=body)
        r.raise_for_status()
        data = r.json()
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in data["choices"]]
        return texts, data["usage"]["completion_tokens"]
    return read_stream(client, url + path, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else ROOT / "runs/demo/sft"
        if not args.ckpt and not ckpt.is_dir():
            ckpt = random_checkpoint(Path(tmp))
        server = Server(ckpt)
        goods, bads = good_requests(server.model), bad_requests(server.model)
        with httpx.Client(timeout=600) as client:   # the right answers: each request alone on the idle server
            expected = [answer(client, server.url, g, stream=False) for g in goods]
        rng = random.Random(0)
        plan = [rng.random() for _ in range(args.requests)]
        lock, counts, failures = threading.Lock(), {"good": 0, "bad": 0, "left": 0}, []
        next_index = [0]
        rss = {}

        def client_loop():
            with httpx.Client(timeout=600) as client:
                while True:
                    with lock:
                        i = next_index[0]
                        if i >= len(plan):
                            return
                        next_index[0] += 1
                        if i == args.warmup:
                            rss["warm"] = rss_kib(server.proc.pid)
                    roll, pick = plan[i], int(plan[i] * 1e6)
                    try:
                        if roll < 0.25:
                            body, status = bads[pick % len(bads)]
                            r = client.post(server.url + "/v1/chat/completions", content=body,
                                            headers={"content-type": "application/json"})
                            error = r.json().get("error", {})
                            assert r.status_code == status and set(error) == {"message", "type", "param", "code"}, \
                                f"bad request {body[:60]!r}: {r.status_code} {r.text[:200]}"
                            kind = "bad"
                        elif roll < 0.30:   # a client that leaves after its first piece
                            g = goods[pick % len(goods)]
                            with client.stream("POST", server.url + "/v1/chat/completions" if g["path"] == "chat"
                                               else server.url + "/v1/completions", json={**g["body"], "stream": True}) as r:
                                next(r.iter_lines())
                            kind = "left"
                        else:
                            k = pick % len(goods)
                            got = answer(client, server.url, goods[k], stream=roll < 0.65)
                            assert got == expected[k], f"request {goods[k]['body']}: {got} != {expected[k]}"
                            kind = "good"
                        with lock:
                            counts[kind] += 1
                    except Exception as e:   # noqa: BLE001 (every failure is counted and shown)
                        with lock:
                            failures.append(f"#{i}: {type(e).__name__}: {e}")

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        with httpx.Client(timeout=60) as client:
            stats = client.get(server.url + "/health").json()
        rss["end"] = rss_kib(server.proc.pid)
        alive = server.proc.poll() is None
        server.close()
    growth = rss["end"] / rss["warm"] - 1
    print(f"checkpoint {ckpt}: {args.requests} requests from {args.clients} clients in {wall:.1f} s")
    print(f"good answered correctly {counts['good']}, malformed refused correctly {counts['bad']}, "
          f"left mid-stream {counts['left']}, failures {len(failures)}")
    for f in failures[:10]:
        print("  ", f)
    print(f"server alive: {alive}; engine: {stats['finished']} finished, {stats['cancelled']} cancelled, "
          f"{stats['failed']} failed, rows active at the end {stats['rows_active']}")
    print(f"server memory (RSS): {rss['warm'] / 1024:.1f} MiB after {args.warmup} requests, "
          f"{rss['end'] / 1024:.1f} MiB at the end: {100 * growth:+.1f}% (bar: < 10%)")
    ok = alive and not failures and growth < 0.10 and stats["rows_active"] == 0
    print("SOAK PASSED" if ok else "SOAK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
