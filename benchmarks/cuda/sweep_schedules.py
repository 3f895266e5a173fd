"""Prefill schedule sweep of the nvvm target: XEGPU_ATTN_SCHEDULE variants next to SDPA's flash
(or, --baseline efficient, its memory-efficient backend: what SDPA runs for float32).

Each variant overrides fields of the target's options (the same JSON the
XEGPU_ATTN_SCHEDULE knob takes); each row is timed for every variant and for
SDPA's flash backend on the same tensors (triton.testing.do_bench medians).
This is how the target's prefill defaults were chosen.

    python benchmarks/cuda/sweep_schedules.py --precompile sm_90a   # here: fill the disk cache
    python benchmarks/cuda/sweep_schedules.py                       # on the GPU machine
    python benchmarks/cuda/sweep_schedules.py --dtypes float32 --baseline efficient --variants '["", "{\\"kv_tile\\": 32}"]'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import torch_xegpu_attn

VARIANTS = ["", '{"kv_tile": 64}', '{"kv_tile": 32}', '{"row_tile": 256}', '{"row_tile": 256, "kv_tile": 64}']
#: largest error relative to flash's largest output element a variant's output may have (f16
#: and bf16 roundings of both differ by about 1e-2 at most): above it the row reports it wrong.
WRONG = 3e-2
#: interleaved rounds per row (flash and every variant in each, the order rotated); medians reported.
ROUNDS = 3


DIMS = (64, 128)
DTYPES = (torch.float16,)
CAUSAL = (False, True)
BASELINE = "flash"


def rows(lengths):
    for dtype in DTYPES:
        for d in DIMS:
            for causal in CAUSAL:
                for n in lengths:
                    yield dtype, d, n, causal


def tensors(dtype, d, n, device):
    b, h = 16384 // n, 2048 // d
    return [torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3)]


def with_schedule(variant: str):
    if variant:
        os.environ["XEGPU_ATTN_SCHEDULE"] = variant
    else:
        os.environ.pop("XEGPU_ATTN_SCHEDULE", None)


def precompile(arch: str, variants, lengths) -> None:
    for variant in variants:
        with_schedule(variant)
        for dtype, d, n, causal in rows(lengths):
            q, k, v = tensors(dtype, d, n, "meta")
            try:
                torch_xegpu_attn.precompile(q, k, v, is_causal=causal, target="nvvm", arch=arch)
                print(f"{variant or 'default':40} d={d} N={n} causal={causal}: ok", flush=True)
            except Exception as error:  # noqa: BLE001 (a variant the target refuses is reported)
                print(f"{variant or 'default':40} d={d} N={n} causal={causal}: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]}", flush=True)


def sweep(variants, lengths) -> None:
    import statistics
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    print(f"{'dtype':>8} {'D':>4} {'N':>6} {'causal':>6} {BASELINE[:6]:>6} " + " ".join(f"{(v or 'default')[:14]:>14}" for v in variants)
          + f"   (TFLOPS; ratio to {BASELINE}; medians of {ROUNDS} interleaved rounds)")
    for dtype, d, n, causal in rows(lengths):
        q, k, v = tensors(dtype, d, n, "cuda")
        flops = 4.0 * q.size(0) * q.size(1) * n * n * d / (2 if causal else 1)

        def flash():  # the baseline: SDPA's flash backend, or its efficient one
            backend = SDPBackend.FLASH_ATTENTION if BASELINE == "flash" else SDPBackend.EFFICIENT_ATTENTION
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def ours(variant):
            with_schedule(variant)
            return torch_xegpu_attn.attention(q, k, v, is_causal=causal)

        entries = [("flash", flash)] + [(variant, lambda variant=variant: ours(variant)) for variant in variants]
        times = {name: [] for name, _ in entries}
        reference = flash().float()
        for name, fn in entries:
            try:
                out = fn()  # load, record
            except Exception as error:  # noqa: BLE001 (a variant the target refuses is reported)
                times[name] = f"{type(error).__name__[:14]:>14}"
                continue
            error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            if not error <= WRONG:  # a variant that computes something else is not timed
                times[name] = f"{'wrong %.1e' % error:>14}"
        for round_ in range(ROUNDS):
            for name, fn in entries[round_ % len(entries):] + entries[:round_ % len(entries)]:
                if isinstance(times[name], list):
                    times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        t_flash = statistics.median(times["flash"])
        cells = [times[v] if isinstance(times[v], str) else
                 f"{flops / statistics.median(times[v]) / 1e9:6.0f} {t_flash / statistics.median(times[v]):6.3f} "
                 for v in variants]
        print(f"{str(dtype)[6:]:>8} {d:4d} {n:6d} {str(causal):>6} {flops / t_flash / 1e9:6.0f} " + " ".join(cells),
              flush=True)
    with_schedule("")


def main(argv=None) -> int:
    global DIMS, DTYPES, CAUSAL, ROUNDS, BASELINE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precompile", metavar="ARCH", default="")
    parser.add_argument("--variants", default="", help="a JSON list of XEGPU_ATTN_SCHEDULE strings")
    parser.add_argument("--lengths", default="2048,4096,16384")
    parser.add_argument("--dims", default="64,128", help="head dims")
    parser.add_argument("--dtypes", default="float16", help="float16, bfloat16, float32, comma-separated")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds per row")
    parser.add_argument("--baseline", choices=("flash", "efficient"), default="flash",
                        help="SDPA's backend next to the variants (flash refuses float32)")
    args = parser.parse_args(argv)
    BASELINE = args.baseline
    ROUNDS = args.rounds
    DIMS = tuple(int(x) for x in args.dims.split(","))
    DTYPES = tuple(getattr(torch, name) for name in args.dtypes.split(","))
    CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    variants = json.loads(args.variants) if args.variants else VARIANTS
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.precompile:
        precompile(args.precompile, variants, lengths)
    else:
        sweep(variants, lengths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
