"""Backward schedule variants of the nvvm target next to SDPA's flash and cuDNN backwards.

Each variant overrides some of the backward's ScheduleOptions (the JSON the
XEGPU_ATTN_SCHEDULE knob takes) for the backward kernels only: the forward that
saves the log-sum-exp runs with the defaults, then the backward alone is timed
(triton.testing.do_bench medians) with its gradients' max error against SDPA's
flash backward on the same tensors.  The prefill benchmark's problems
(B * N = 16k, H * D = 2048) at the N given.  This is how the backward defaults
are chosen.

    python benchmarks/cuda/backward_variants.py --precompile sm_90a   # here: fill the disk cache
    python benchmarks/cuda/backward_variants.py                       # on the GPU machine
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torch_xegpu_attn
from sweep_schedules import with_schedule  # (this folder: the same knob, set per variant)

VARIANTS = ["", '{"min_blocks": 3}', '{"warpgroup_mma": false}', '{"mma_overlap": false}', '{"mma_overlap": true}',
            '{"prefetch": "keys"}', '{"prefetch": "tiles"}', '{"prefetch": "tiles-late"}']
ROWS = [(torch.float16, 64, False), (torch.float16, 64, True), (torch.bfloat16, 128, False),
        (torch.bfloat16, 128, True)]


def tensors(dtype, d: int, n: int, device: str):
    b, h = 16384 // n, 2048 // d
    return [torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(4)]


def precompile(arch: str, variants, n: int, rows=ROWS) -> None:
    for dtype, d, causal in rows:
        q, k, v, _ = tensors(dtype, d, n, "meta")
        with_schedule("")
        torch_xegpu_attn.precompile(q, k, v, is_causal=causal, target="nvvm", arch=arch, kernel="forward_lse")
        for variant in variants:
            with_schedule(variant)
            key = torch_xegpu_attn.precompile(q, k, v, is_causal=causal, target="nvvm", arch=arch,
                                              kernel="backward")
            print(f"{variant or 'default':40} {str(dtype)[6:]} D={d} causal={causal}: {key}", flush=True)
        with_schedule("")


def run(variants, n: int, rows=ROWS) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    for dtype, d, causal in rows:
        q, k, v, dout = tensors(dtype, d, n, "cuda")
        flops = 2.5 * 4.0 * q.size(0) * q.size(1) * n * n * d / (2 if causal else 1)
        expected = None
        for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            expected = expected or grads
            ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=10, rep=100,
                          return_mode="median")
            print(f"{name:40} {str(dtype)[6:]:8} D={d:3} N={n} causal={causal!s:5} {flops / ms / 1e9:6.0f} TFLOPS",
                  flush=True)
        with_schedule("")
        out = torch_xegpu_attn.attention(q, k, v, is_causal=causal)
        for variant in variants:
            with_schedule(variant)
            grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            err = max((a.double() - b.double()).abs().max().item() for a, b in zip(grads, expected))
            ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=10, rep=100,
                          return_mode="median")
            print(f"{variant or 'default':40} {str(dtype)[6:]:8} D={d:3} N={n} causal={causal!s:5} "
                  f"{flops / ms / 1e9:6.0f} TFLOPS  max |ours - flash| {err:.1e}", flush=True)
        with_schedule("")


def breakdown(n: int, repeats: int = 20) -> None:
    """Where the default backward's time goes: each kernel's mean time (torch.profiler) in one
    backward of every row, ours and SDPA flash's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    for dtype, d, causal in ROWS:
        q, k, v, dout = tensors(dtype, d, n, "cuda")
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ours = torch_xegpu_attn.attention(q, k, v, is_causal=causal)
        for name, out in (("ours", ours), ("sdpa flash", flash)):
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(repeats):
                    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
            total = sum(e.self_device_time_total for e in events) / repeats
            print(f"{name} {str(dtype)[6:]} D={d} N={n} causal={causal}: {total:.0f} us per backward", flush=True)
            for e in sorted(events, key=lambda e: -e.self_device_time_total):
                us = e.self_device_time_total / repeats
                print(f"    {us:8.1f} us {100 * us / total:5.1f}%  {e.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precompile", metavar="ARCH", default="", help="fill the disk cache, no GPU needed")
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--length", type=int, default=4096, help="N (B = 16k / N)")
    parser.add_argument("--breakdown", action="store_true", help="each kernel's time in the default backward")
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128], help="the rows of these head dims")
    args = parser.parse_args()
    rows = [row for row in ROWS if row[1] in args.head_dims]
    if args.breakdown:
        breakdown(args.length)
    elif args.precompile:
        precompile(args.precompile, args.variants, args.length, rows)
    else:
        run(args.variants, args.length, rows)


if __name__ == "__main__":
    main()
