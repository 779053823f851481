"""The decode step's small operators in isolation: fused RMSNorm against the hand-written formula,
SDPA against hand-written attention at one query over 64-192 cached positions (batch 8, 4 heads of
64, as L4-256 at batch 8), microseconds per call, 2 threads, inference mode.

    GOMP_SPINCOUNT=20000 .venv/bin/python bench/probe_decode_ops.py

Results: bench/RESULTS.md, "Session 11: GRPO's update over packed rollouts".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lmschool  # noqa: E402,F401  (its OpenMP waiting)
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
torch.set_num_threads(2)
def bench(f, n=2000):
    for _ in range(50): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e6
with torch.inference_mode():
    x=torch.randn(8,1,256); w=torch.randn(256); eps=1e-5
    print("rms_norm fused", bench(lambda: F.rms_norm(x,(256,),w,eps)))
    print("rms manual", bench(lambda: x*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+eps)*w))
    print("rms manual2", bench(lambda: (x*torch.rsqrt(x.square().mean(-1,keepdim=True).add_(eps))).mul_(w)))
    xb=torch.randn(8,256,576); wb=torch.randn(576)
    print("big fused", bench(lambda: F.rms_norm(xb,(576,),wb,eps),200))
    print("big manual", bench(lambda: xb*torch.rsqrt(xb.pow(2).mean(-1,keepdim=True)+eps)*wb,200))
    for S in (64,128,192):
        q=torch.randn(8,4,1,64); k=torch.randn(8,4,S,64); v=torch.randn(8,4,S,64)
        a=bench(lambda: F.scaled_dot_product_attention(q,k,v))
        def man():
            s=(q@k.transpose(-1,-2))*0.125
            return s.softmax(-1)@v
        b=bench(man)
        mask=torch.ones(8,1,1,S,dtype=torch.bool)
        c=bench(lambda: F.scaled_dot_product_attention(q,k,v,attn_mask=mask))
        def man_mask():
            s=(q@k.transpose(-1,-2))*0.125
            return s.masked_fill(~mask, float('-inf')).softmax(-1)@v
        d=bench(man_mask)
        print(f"S={S}: sdpa {a:.1f} manual {b:.1f} sdpa+mask {c:.1f} manual+mask {d:.1f}")
        r=F.scaled_dot_product_attention(q,k,v); print("  maxdiff", (r-man()).abs().max().item())
