"""CUDA benchmark: torch.ops.xegpu.attention (nvvm target) next to SDPA's backends, in one run.

For each row, fresh random inputs, the same tensors for every implementation,
triton.testing.do_bench medians (ours and flash: the median of 3 interleaved
rounds of those); TFLOPS = 4 * B * H * L * S * D / t (halved
when causal).  Rows: f16 and bf16, head dims 64 and 128, N = L = S from 1024
to 16384 with B * N = 16k and H * D = 2048, causal and not; then decode rows
(L = 1, S from 1k to 32k, GQA 32/8, D = 128, bf16); float32 rows next to SDPA's f32
backends (efficient, math); training rows (forward + backward and the backward
alone, the prefill rows' shapes, with the peak memory of a step).  The prefill and
training rows add FlashAttention-4 where it is installed (on the lent GPU machine:
../shared/tools/fa4_payload.sh).  Also the host cost of a cache-hit call on a tiny
problem next to SDPA's (interleaved medians).

    python benchmarks/bench_cuda.py [--csv out.csv] [--quick] [--only host,prefill,f32,decode,backward]
    python benchmarks/bench_cuda.py --precompile sm_90a     # without a GPU: its kernels, cached

Writes the CSV; `python benchmarks/plot_bench.py out.csv out.png` draws it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_xegpu_attn

#: interleaved rounds of ours and flash per prefill row (the ratio is of their medians).
ROUNDS = 3
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _time(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _fa4():
    """FlashAttention-4's flash_attn_func where it is installed (../shared/tools/fa4_payload.sh
    builds it for the lent GPU machine), else None: its columns then read "-"."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _fa4_attention(fa4, causal: bool):
    """FA4 as a function of (B, H, N, D) tensors: it takes (B, N, H, D), so the transposed views
    of the same tensors (its gradients come back through them)."""
    def attention(q, k, v):
        out = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    return attention


def _sdpa_times(q, k, v, causal: bool, gqa: bool):
    times = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
                times[name] = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                           enable_gqa=gqa))
        except RuntimeError:
            times[name] = None  # the backend refuses this problem
    return times


def prefill_rows(quick: bool, lengths=None):
    lengths = lengths or ((2048, 4096) if quick else (1024, 2048, 4096, 8192, 16384))
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            for n in lengths:
                for causal in (False, True):
                    yield dtype, d, n, causal


def bench_prefill(rows: list, quick: bool) -> None:
    fa4 = _fa4()
    print(f"{'dtype':9} {'D':>4} {'N':>6} {'causal':>6} {'ours':>7} {'flash':>7} {'cudnn':>7} {'effic.':>7} "
          f"{'fa4':>7} {'/flash':>7} {'/cudnn':>7} {'/fa4':>7}  (TFLOPS)")
    for dtype, d, n, causal in prefill_rows(quick):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
        flops = 4.0 * b * h * n * n * d / (2 if causal else 1)
        torch_xegpu_attn.attention(q, k, v, is_causal=causal)  # compile or load
        sdpa = _sdpa_times(q, k, v, causal, False)
        sdpa["fa4"] = None
        if fa4:
            with torch.no_grad():
                attention = _fa4_attention(fa4, causal)
                attention(q, k, v)  # compile
                sdpa["fa4"] = _time(lambda: attention(q, k, v))
        # The ratio's two terms: medians of ROUNDS interleaved rounds (clocks drift between rows).
        ours_runs, flash_runs = [], [sdpa["flash"]] if sdpa["flash"] else []
        for _ in range(ROUNDS):
            ours_runs.append(_time(lambda: torch_xegpu_attn.attention(q, k, v, is_causal=causal)))
            if flash_runs:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    flash_runs.append(_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
        ours = statistics.median(ours_runs)
        if flash_runs:
            sdpa["flash"] = statistics.median(flash_runs)
        tf = {name: (flops / t / 1e9 if t else None) for name, t in {"ours": ours, **sdpa}.items()}
        ratio = lambda name: tf["ours"] / tf[name] if tf[name] else float("nan")  # noqa: E731
        fmt = lambda x: f"{x:7.0f}" if x else "      -"  # noqa: E731
        print(f"{str(dtype)[6:]:9} {d:4d} {n:6d} {str(causal):>6} {fmt(tf['ours'])} {fmt(tf['flash'])} "
              f"{fmt(tf['cudnn'])} {fmt(tf['efficient'])} {fmt(tf['fa4'])} {ratio('flash'):7.2f} "
              f"{ratio('cudnn'):7.2f} {ratio('fa4'):7.2f}", flush=True)
        rows.append({"kind": "prefill", "dtype": str(dtype)[6:], "D": d, "B": b, "H": h, "L": n, "S": n,
                     "causal": causal, **{f"{k}_tflops": (round(x, 1) if x else "") for k, x in tf.items()},
                     **{f"{k}_ms": (round(t, 4) if t else "") for k, t in {"ours": ours, **sdpa}.items()}})


def _grad_times(attention, q, k, v, dout):
    """(forward + backward, backward alone) of `attention(q, k, v)` with output gradient dout."""
    def step():
        torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
    out = attention(q, k, v)
    step()  # compile or load, warm up

    def backward():
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return _time(step), _time(backward)


def bench_backward(rows: list, quick: bool, lengths=None) -> None:
    """Training: forward + backward and the backward alone, ours next to SDPA's flash, cuDNN and
    efficient backends on the same tensors; backward TFLOPS = 2.5 x the forward's FLOPs
    (4 B H N^2 D, halved when causal), forward + backward 3.5 x.  Peak memory of a training
    step (ours and SDPA's default) above the inputs.  The prefill rows' problems (`lengths`: the
    Ns given)."""
    fa4 = _fa4()
    print("\ntraining (backward TFLOPS; fwd+bwd in parentheses):")
    print(f"{'dtype':9} {'D':>4} {'N':>6} {'causal':>6} {'ours':>13} {'flash':>13} {'cudnn':>13} {'effic.':>13} "
          f"{'fa4':>13} {'/flash':>7} {'/cudnn':>7} {'/fa4':>7} {'MiB ours':>9} {'sdpa':>6}")
    for dtype, d, n, causal in prefill_rows(quick, lengths):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
        flops = 4.0 * b * h * n * n * d / (2 if causal else 1)
        times = {"ours": _grad_times(lambda q, k, v: torch_xegpu_attn.attention(q, k, v, is_causal=causal),
                                     q, k, v, dout)}
        for name, backend in BACKENDS.items():
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            try:
                times[name] = _grad_times(sdpa, q, k, v, dout)
            except RuntimeError:
                times[name] = None
        times["fa4"] = _grad_times(_fa4_attention(fa4, causal), q, k, v, dout) if fa4 else None
        memory = {"ours": _step_memory(lambda: torch_xegpu_attn.attention(q, k, v, is_causal=causal), q, k, v, dout),
                  "sdpa": _step_memory(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), q, k, v, dout)}
        tf = {name: ((3.5 * flops / t[0] / 1e9, 2.5 * flops / t[1] / 1e9) if t else None) for name, t in times.items()}
        fmt = lambda x: f"{x[1]:5.0f} ({x[0]:5.0f})" if x else "            -"  # noqa: E731
        ratio = lambda name: tf["ours"][1] / tf[name][1] if tf[name] else float("nan")  # noqa: E731
        print(f"{str(dtype)[6:]:9} {d:4d} {n:6d} {str(causal):>6} {fmt(tf['ours'])} {fmt(tf['flash'])} "
              f"{fmt(tf['cudnn'])} {fmt(tf['efficient'])} {fmt(tf['fa4'])} {ratio('flash'):7.2f} "
              f"{ratio('cudnn'):7.2f} {ratio('fa4'):7.2f} {memory['ours']:9.0f} {memory['sdpa']:6.0f}", flush=True)
        rows.append({"kind": "backward", "dtype": str(dtype)[6:], "D": d, "B": b, "H": h, "L": n, "S": n,
                     "causal": causal,
                     **{f"{k}_bwd_tflops": (round(x[1], 1) if x else "") for k, x in tf.items()},
                     **{f"{k}_fwdbwd_tflops": (round(x[0], 1) if x else "") for k, x in tf.items()},
                     **{f"{k}_step_mib": round(m, 1) for k, m in memory.items()}})


def _step_memory(forward, q, k, v, dout) -> float:
    """MiB a training step (forward, backward to q, k, v) allocates at its peak above what was
    allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(forward(), (q, k, v), dout)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def f32_rows(quick: bool):
    for d in (64, 128):
        for n in ((2048,) if quick else (1024, 2048, 4096)):
            for causal in (False, True):
                yield d, n, causal


def bench_f32(rows: list, quick: bool) -> None:
    """float32 (ours: tf32 halves, three products, f32 accuracy) next to SDPA's f32 backends:
    efficient (what SDPA picks for f32; flash and cuDNN refuse it) and math, full precision
    (allow_tf32 off, torch's default)."""
    print("\nfloat32 (TFLOPS; SDPA's efficient and math backends in full precision):")
    print(f"{'D':>4} {'N':>6} {'causal':>6} {'ours':>7} {'effic.':>7} {'math':>7} {'/effic.':>8}")
    for d, n, causal in f32_rows(quick):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float32) for _ in range(3))
        flops = 4.0 * b * h * n * n * d / (2 if causal else 1)
        torch_xegpu_attn.attention(q, k, v, is_causal=causal)
        times = {"ours": _time(lambda: torch_xegpu_attn.attention(q, k, v, is_causal=causal))}
        for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
            with sdpa_kernel(backend):
                times[name] = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        tf = {name: flops / t / 1e9 for name, t in times.items()}
        print(f"{d:4d} {n:6d} {str(causal):>6} {tf['ours']:7.1f} {tf['efficient']:7.1f} {tf['math']:7.1f} "
              f"{tf['ours'] / tf['efficient']:8.2f}", flush=True)
        rows.append({"kind": "prefill-f32", "dtype": "float32", "D": d, "B": b, "H": h, "L": n, "S": n,
                     "causal": causal, **{f"{k}_tflops": round(x, 1) for k, x in tf.items()},
                     **{f"{k}_ms": round(t, 4) for k, t in times.items()}})


def bench_decode(rows: list, quick: bool) -> None:
    print("\ndecode (bf16, D=128, L=1, GQA 32/8; us):")
    print(f"{'B':>3} {'S':>6} {'ours':>8} {'flash':>8} {'cudnn':>8} {'effic.':>8} {'floor':>8}")
    for b, s in decode_rows(quick):
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        torch_xegpu_attn.attention(q, k, v, enable_gqa=True)
        ours = _time(lambda: torch_xegpu_attn.attention(q, k, v, enable_gqa=True))
        sdpa = _sdpa_times(q, k, v, False, True)
        floor = 2 * k.numel() * 2 / 4.24e12 * 1e3  # K and V read once at the measured copy bandwidth
        fmt = lambda t: f"{t * 1e3:8.1f}" if t else "       -"  # noqa: E731
        print(f"{b:3d} {s:6d} {fmt(ours)} {fmt(sdpa['flash'])} {fmt(sdpa['cudnn'])} {fmt(sdpa['efficient'])} "
              f"{fmt(floor)}", flush=True)
        rows.append({"kind": "decode", "dtype": "bfloat16", "D": 128, "B": b, "H": 32, "L": 1, "S": s,
                     "causal": False, **{f"{k}_ms": (round(t, 5) if t else "") for k, t in
                                         {"ours": ours, **sdpa, "floor": floor}.items()}})


def bench_host(rows: list) -> None:
    """Host time of a cache-hit call on a tiny problem (launches are asynchronous), next to
    SDPA's: bench_host.py's interleaved medians."""
    from bench_host import measure
    q, k, v = (torch.randn(1, 1, 16, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    medians = measure(q, k, v, batches=21, calls=200, sync=torch.cuda.synchronize)
    print("\ncache-hit host cost, tiny problem (1x1x16x64 f16): " +
          ", ".join(f"{name} {t:.1f} us" for name, t in medians.items()))
    rows.append({"kind": "host", **{f"{n}_us": round(t, 2) for n, t in medians.items()}})


def decode_rows(quick: bool):
    return [(1, 4096), (1, 32768)] if quick else [(1, 1024), (1, 4096), (1, 32768), (8, 32768), (8, 4096)]


def precompile(arch: str, quick: bool, lengths=None) -> None:
    """Put every kernel the benchmark calls into the disk cache (meta tensors: no GPU needed)."""
    calls = []
    for dtype, d, n, causal in prefill_rows(quick):
        b, h = 16384 // n, 2048 // d
        calls.append(([torch.empty(b, h, n, d, dtype=dtype, device="meta")] * 3, {"is_causal": causal}))
    for b, s in decode_rows(quick):
        kv = torch.empty(b, 8, s, 128, dtype=torch.bfloat16, device="meta")
        calls.append(([torch.empty(b, 32, 1, 128, dtype=torch.bfloat16, device="meta"), kv, kv],
                      {"enable_gqa": True}))
    for d, n, causal in f32_rows(quick):
        b, h = 16384 // n, 2048 // d
        calls.append(([torch.empty(b, h, n, d, dtype=torch.float32, device="meta")] * 3, {"is_causal": causal}))
    calls.append(([torch.empty(1, 1, 16, 64, dtype=torch.float16, device="meta")] * 3, {}))  # bench_host
    keys = {torch_xegpu_attn.precompile(*tensors, **kw, target="nvvm", arch=arch) for tensors, kw in calls}
    for dtype, d, n, causal in prefill_rows(quick, lengths):  # the training rows
        b, h = 16384 // n, 2048 // d
        qkv = [torch.empty(b, h, n, d, dtype=dtype, device="meta")] * 3
        for kernel in ("forward_lse", "backward"):
            keys.add(torch_xegpu_attn.precompile(*qkv, is_causal=causal, target="nvvm", arch=arch, kernel=kernel))
    print(f"{len(keys)} kernels in the disk cache for {len(calls)} benchmark calls")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default="")
    parser.add_argument("--quick", action="store_true", help="fewer rows")
    parser.add_argument("--precompile", metavar="ARCH", default="",
                        help="only put the benchmark's kernels into the disk cache (on a machine without a GPU)")
    parser.add_argument("--only", default="",
                        help="comma-separated parts: host, prefill, f32, decode, backward (default all)")
    parser.add_argument("--lengths", default="", help="comma-separated N of the training rows (default: all)")
    args = parser.parse_args(argv)
    lengths = tuple(int(n) for n in args.lengths.split(",")) if args.lengths else None
    if args.precompile:
        precompile(args.precompile, args.quick, lengths)
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows: list = []
    parts = {"host": lambda: bench_host(rows), "prefill": lambda: bench_prefill(rows, args.quick),
             "f32": lambda: bench_f32(rows, args.quick), "decode": lambda: bench_decode(rows, args.quick),
             "backward": lambda: bench_backward(rows, args.quick, lengths)}
    for name in args.only.split(",") if args.only else parts:
        parts[name]()
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
