"""Gradient errors of the op and of SDPA against a float64 reference (cpu tensors).

    .venv/bin/python benchmarks/grad_errors.py

For each problem and dtype: the max abs error of dq, dk, dv (ours and SDPA's) against the
gradients of standard attention computed in float64 (autograd of the written-out formula),
for one random output gradient; the largest reference gradient for scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import torch_xegpu_attn

PROBLEMS = [  # (B, Hq, Hkv, L, S, E), causal
    ((2, 8, 8, 512, 512, 64), False),
    ((2, 8, 8, 512, 512, 64), True),
    ((1, 8, 2, 300, 700, 128), False),
]


def reference(q, k, v, causal, gqa):
    if gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def grads(fn, inputs, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad.to(out.dtype))


def main() -> None:
    torch.manual_seed(0)
    print(f"{'problem':<40} {'dtype':<9} {'ours dq/dk/dv':>28} {'SDPA dq/dk/dv':>28} {'max |grad|':>10}")
    for (b, hq, hkv, l, s, e), causal in PROBLEMS:
        gqa = hq != hkv
        q = torch.randn(b, hq, l, e, dtype=torch.float64)
        k, v = (torch.randn(b, hkv, s, e, dtype=torch.float64) for _ in range(2))
        grad = torch.randn(b, hq, l, e, dtype=torch.float64)
        ref = grads(lambda q, k, v: reference(q, k, v, causal, gqa), (q, k, v), grad, torch.float64)
        name = f"B={b} Hq={hq} Hkv={hkv} L={l} S={s} E={e}{' causal' if causal else ''}"
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            row = []
            for fn in (torch_xegpu_attn.attention, F.scaled_dot_product_attention):
                got = grads(lambda q, k, v: fn(q, k, v, is_causal=causal, enable_gqa=gqa), (q, k, v), grad, dtype)
                row.append("/".join(f"{(a.double() - r).abs().max().item():.1e}" for a, r in zip(got, ref)))
            biggest = max(r.abs().max().item() for r in ref)
            print(f"{name:<40} {str(dtype)[6:]:<9} {row[0]:>28} {row[1]:>28} {biggest:10.2f}")


if __name__ == "__main__":
    main()
