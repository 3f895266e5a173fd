"""Host cost of a cache-hit call: torch_xegpu_attn.attention and torch.ops.xegpu.attention next to SDPA.

A tiny problem (default B=1, H=1, L=S=8, E=16, float32), so that the time is
the host's: argument checks, dispatch, output allocation, launch.  The three
entry points are timed interleaved (one batch of calls of each in turn, so
all three see the same machine state); each batch gives a per-call mean, and
the report is the median over batches.  The kernel is compiled and the call
recorded before timing: every timed call is a cache hit (a replay).

    python benchmarks/bench_host.py [--shape 1,1,8,16] [--batches 31] [--calls 500] [--dtype float32]
                                    [--device cpu|cuda] [--training]

--training times a training step instead: the forward of inputs that require gradients and
`torch.autograd.grad` of its output, ours next to SDPA's (the training forward and the backward
are replayed too once recorded).

On CUDA the launches are asynchronous: the time is the host's alone (the
device is synchronized between batches).

Prints the three medians in microseconds and the ratio of each entry point to
SDPA; exits 1 if the outputs disagree with SDPA.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

if not os.environ.get("XEGPU_ATTN_CACHE_DIR"):  # a private disk cache, removed at exit
    os.environ["XEGPU_ATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="xegpu_attn_bench_host_")
    atexit.register(shutil.rmtree, os.environ["XEGPU_ATTN_CACHE_DIR"], ignore_errors=True)
import torch_xegpu_attn  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    """Mean wall time of one call over a batch of `calls`, in microseconds."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def inference_entries(q, k, v) -> dict:
    return {
        "torch_xegpu_attn.attention": lambda: torch_xegpu_attn.attention(q, k, v),
        "torch.ops.xegpu.attention": lambda: torch.ops.xegpu.attention(q, k, v),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v),
    }


def training_entries(q, k, v) -> dict:
    """A forward and backward of each (inputs that require gradients, one output gradient)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def step(fn):
        return lambda: torch.autograd.grad(fn(*leaves), leaves, grad)
    return {"torch_xegpu_attn.attention fwd+bwd": step(torch_xegpu_attn.attention),
            "F.scaled_dot_product_attention fwd+bwd": step(F.scaled_dot_product_attention)}


def measure(entries: dict, batches: int, calls: int, sync=lambda: None) -> dict:
    """Medians (us) of the entry points, interleaved batch by batch (`sync` after each)."""
    for fn in entries.values():  # warm up: compile, record, fill caches
        for _ in range(50):
            fn()
    times = {name: [] for name in entries}
    for _ in range(batches):
        for name, fn in entries.items():
            times[name].append(per_call_us(fn, calls))
            sync()
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1,1,8,16", help="B,H,L,E (L = S)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, default=31)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--training", action="store_true", help="time a forward and backward step")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(*shape, dtype=dtype, device=args.device) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(q, k, v)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    for name, out in (("attention", torch_xegpu_attn.attention(q, k, v)), ("op", torch.ops.xegpu.attention(q, k, v))):
        if not torch.allclose(out, sdpa, rtol=tol, atol=tol):
            print(f"{name}: output differs from SDPA", file=sys.stderr)
            return 1
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    entries = (training_entries if args.training else inference_entries)(q, k, v)
    medians = measure(entries, args.batches, args.calls, sync)
    replays = torch_xegpu_attn.stats()["replays"]
    base = medians[list(entries)[-1]]
    what = "training step" if args.training else "cache-hit host cost"
    print(f"{what}, {args.shape} {args.dtype} on {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.batches} interleaved batches of {args.calls} calls ({replays} replays):")
    for name, us in medians.items():
        print(f"  {name:<32} {us:6.2f} us  ({us / base:.2f} x SDPA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
