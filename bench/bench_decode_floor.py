"""Where a batch-1 decode step's time goes on CPU: weights streamed from memory against the step.

    .venv/bin/python bench/bench_decode_floor.py

Model L4-256 (as bench_generate.py: vocab 4096, hidden 256, intermediate 688, 4 layers, random
weights), a 64-token prompt in the KV cache, one new token per forward, 2 threads. Prints
- the memory bandwidth of a matrix-vector product whose weights come from memory (40 matrices of
  688 x 256, more than a VM's share of the L3), in fp32 and bf16;
- one decoder layer run alone (its weights stay in cache), the four in sequence, and the whole
  forward at batch 1 and 8;
- the floor: the model's fp32 weight bytes / the measured bandwidth, in ms per token.
Results and what they mean: bench/RESULTS.md, "Session 10: speed against the peers again".
"""

from __future__ import annotations

import time

import lmschool  # noqa: F401  (its OpenMP waiting, as the benchmarks use)
import torch
import torch.nn.functional as F

from lmschool.model import ModelConfig, build_model


def per_call_ms(fn, n: int = 300) -> float:
    for _ in range(30):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    torch.set_num_threads(2)
    x = torch.randn(1, 256)
    bandwidth = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(688, 256).to(dtype) for _ in range(40)]
        xx = x.to(dtype)
        ms = per_call_ms(lambda: [F.linear(xx, w) for w in weights], n=20) / len(weights)
        bandwidth[dtype] = weights[0].numel() * weights[0].element_size() / (ms * 1e-3) / 1e9
        print(f"688 x 256 matrix-vector product from memory, {dtype}: {ms * 1e3:.1f} us, {bandwidth[dtype]:.1f} GB/s")
    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=256)
    model = build_model(cfg).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        for B in (1, 8):
            cache = model.new_cache(B, 200)
            model.hidden(torch.randint(0, 4096, (B, 64)), None, None, cache)
            start = cache.length
            token = torch.randint(0, 4096, (B, 1))
            h = torch.randn(B, 1, 256)
            cos, sin = torch.ones(1, 1, 1, cfg.dim_head), torch.zeros(1, 1, 1, cfg.dim_head)

            def forward():
                cache.length = start
                return model(token, None, None, cache)

            def layers(which):
                def run():
                    cache.length = start
                    y = h
                    for layer in which:
                        y = layer(y, cos, sin, None, cache)
                    return y
                return run

            one = per_call_ms(layers(model.model.layers[:1]))
            four = per_call_ms(layers(model.model.layers))
            print(f"batch {B}: one layer alone {one:.3f} ms, four in sequence {four:.3f} ms, "
                  f"whole forward {per_call_ms(forward):.3f} ms")
    floor = weight_bytes / (bandwidth[torch.float32] * 1e9) * 1e3
    print(f"fp32 weights {weight_bytes / 1e6:.1f} MB: at least {floor:.2f} ms per batch-1 token "
          f"({1e3 / floor:.0f} tokens/s) at the measured bandwidth")


if __name__ == "__main__":
    main()
