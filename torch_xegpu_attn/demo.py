"""Demo: attention on the default device with torch.ops.xegpu.attention, next to SDPA.

    python -m torch_xegpu_attn.demo [--batch 2 --heads 8 --seq 1024 --head-dim 64 --dtype float32]

Prints, for a plain and a causal problem: the max error of both against a
float64 reference, and the median time of both.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import torch_xegpu_attn
from torch_xegpu_attn.timing import median_ms




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = "cpu"  # the default device (the GPU targets have their own benchmarks and tests)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    print(f"device {device}, q/k/v {shape} {args.dtype}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
    for causal in (False, True):
        start = time.perf_counter()
        ours = torch.ops.xegpu.attention(q, k, v, is_causal=causal)
        first = time.perf_counter() - start
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        err_ours = (ours.double() - ref).abs().max().item()
        err_sdpa = (sdpa.double() - ref).abs().max().item()
        t_ours = median_ms(lambda: torch_xegpu_attn.attention(q, k, v, is_causal=causal), args.repeats)
        t_sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), args.repeats)
        label = "causal" if causal else "full  "
        print(f"{label}  xegpu::attention: max err {err_ours:.2e}, {t_ours:8.2f} ms "
              f"(first call {first:.2f} s incl. compile)   SDPA: max err {err_sdpa:.2e}, {t_sdpa:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
