"""Decode schedule variants of the nvvm target (bf16, D=128, L=1, GQA 32/8) next to SDPA's cuDNN and flash.

Each variant overrides some of the decode class's ScheduleOptions (the JSON the
XEGPU_ATTN_SCHEDULE knob takes: split counts, prefetch); every row times each
variant as the GPU time of a CUDA graph of 20 calls and as an eager call
(triton.testing.do_bench medians), with SDPA's backends on the same tensors.
Rows below DECODE_MIN_KEYS keys run the prefill kernel (their variants do not
apply: shown once).  This is how the decode defaults were chosen.

    python benchmarks/cuda/decode_variants.py --precompile sm_90a   # here: fill the disk cache
    python benchmarks/cuda/decode_variants.py                       # on the GPU machine
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torch_xegpu_attn
from sweep_schedules import with_schedule  # (this folder: the same knob, set per variant)

VARIANTS = ["", '{"combine_cols": 0}', '{"combine_cols": 8}', '{"prefetch": "tiles"}', '{"split_min_keys": 128}',
            '{"split_fill": 396}', '{"split_fill": 396, "split_min_keys": 128}', '{"kv_splits": 32}']
SHAPES = ((1, 256), (1, 511), (1, 512), (1, 1024), (1, 4096), (1, 32768), (8, 4096), (8, 32768))


def tensors(b: int, s: int, device: str):
    q = torch.randn(b, 32, 1, 128, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(b, 8, s, 128, dtype=torch.bfloat16, device=device) for _ in range(2))
    return q, k, v


def precompile(arch: str, variants) -> None:
    from torch_xegpu_attn.targets.nvvm import DECODE_MIN_KEYS
    for variant in variants:
        with_schedule(variant)
        for b, s in SHAPES:
            if variant and s < DECODE_MIN_KEYS:
                continue  # the prefill kernel: run with the defaults only
            key = torch_xegpu_attn.precompile(*tensors(b, s, "meta"), enable_gqa=True, target="nvvm", arch=arch)
            print(f"{variant or 'default':50} B={b} S={s}: {key}", flush=True)


def graph_time(call) -> float:
    """GPU time of one call: a CUDA graph of 20 calls, replayed (ms per call)."""
    from triton.testing import do_bench
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            call()
    return do_bench(graph.replay, warmup=5, rep=50, return_mode="median") / 20


def run(variants) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    from torch_xegpu_attn.targets.nvvm import DECODE_MIN_KEYS
    for b, s in SHAPES:
        q, k, v = tensors(b, s, "cuda")
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            eager = do_bench(sdpa, warmup=25, rep=100, return_mode="median")
            print(f"{name:50} B={b} S={s:6d} graph {graph_time(sdpa) * 1e3:7.1f} us  eager {eager * 1e3:7.1f} us",
                  flush=True)
        for variant in (variants if s >= DECODE_MIN_KEYS else [""]):
            with_schedule(variant)
            call = lambda: torch_xegpu_attn.attention(q, k, v, enable_gqa=True)  # noqa: E731
            err = (call().double() - reference).abs().max().item()
            eager = do_bench(call, warmup=25, rep=100, return_mode="median")
            label = variant or ("default" if s >= DECODE_MIN_KEYS else "default (prefill class)")
            print(f"{label:50} B={b} S={s:6d} graph {graph_time(call) * 1e3:7.1f} us  eager {eager * 1e3:7.1f} us"
                  f"  err {err:.1e}", flush=True)
        with_schedule("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precompile", metavar="ARCH", default="", help="fill the disk cache, no GPU needed")
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    args = parser.parse_args()
    if args.precompile:
        precompile(args.precompile, args.variants)
    else:
        run(args.variants)


if __name__ == "__main__":
    main()
