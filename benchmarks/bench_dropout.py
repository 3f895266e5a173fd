"""CPU: the cost of dropout in training, ours next to SDPA's.

    .venv/bin/python benchmarks/bench_dropout.py [--repeats 7]

Forward + backward (torch.autograd.grad) of B=2 H=8 L=S=1024 E=64 float32, causal and not, with
dropout_p 0 and 0.1, the four interleaved, median of N runs (ms).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import torch_xegpu_attn
from torch_xegpu_attn.timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1024, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 8, 1024, 64)

    def step(fn, p, causal):
        return lambda: torch.autograd.grad(fn(q, k, v, dropout_p=p, is_causal=causal), (q, k, v), grad)

    print(f"threads: {torch.get_num_threads()}, median of {args.repeats}; forward + backward, ms")
    for causal in (False, True):
        fns = {f"{name} p={p}": step(fn, p, causal) for name, fn in (("ours", torch_xegpu_attn.attention),
                                                                       ("SDPA", F.scaled_dot_product_attention))
               for p in (0.0, 0.1)}
        for fn in fns.values():
            fn()  # compiles (or loads) the kernels
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(median_ms(fn, 1))
        row = ", ".join(f"{name} {statistics.median(t):.1f}" for name, t in times.items())
        print(f"B=2 H=8 L=S=1024 E=64 f32{' causal' if causal else ''}: {row}")


if __name__ == "__main__":
    main()
