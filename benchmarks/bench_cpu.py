"""CPU benchmark: torch.ops.xegpu.attention against F.scaled_dot_product_attention.

Reports, in one run:
  * compile time of a new spec (disk cache off, fresh spec), per stage;
  * cost of a cache hit: the op's host overhead on a tiny problem, and a disk
    hit in this process (memory cache cleared);
  * time of both on the problems of issue 2 (and a bf16 and two decode-like
    ones), interleaved, median of N runs.

    python benchmarks/bench_cpu.py [--repeats 11] [--threads N] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("XEGPU_ATTN_CACHE_DIR", tempfile.mkdtemp(prefix="xegpu_attn_bench_"))
import torch_xegpu_attn  # noqa: E402
from torch_xegpu_attn import AttentionSpec, CompileReport  # noqa: E402
from torch_xegpu_attn.cache import CACHE, STATS  # noqa: E402
from torch_xegpu_attn.compiler import compile_spec  # noqa: E402
from torch_xegpu_attn.timing import median_ms  # noqa: E402

PROBLEMS = [  # (B, Hq, Hkv, L, S, E), dtype, causal: the problems of issue 2, then decode-like ones
    ((2, 8, 8, 1024, 1024, 64), torch.float32, False),
    ((2, 8, 8, 1024, 1024, 64), torch.float32, True),
    ((1, 8, 8, 2048, 2048, 128), torch.float32, False),
    ((1, 8, 8, 2048, 2048, 128), torch.float32, True),
    ((2, 8, 8, 1024, 1024, 64), torch.bfloat16, True),
    ((1, 32, 32, 1, 4096, 128), torch.float32, False),
    ((1, 32, 8, 1, 4096, 128), torch.float32, False),
]




def bench_compile() -> None:
    spec = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float32", scale=0.123, length_class="long")
    report = CompileReport()
    start = time.perf_counter()
    compile_spec(spec, report=report)
    total = time.perf_counter() - start
    stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in report.stage_seconds.items())
    print(f"compile of a new spec: {total:.2f} s  (ms per stage: {stages})")


def bench_hits(repeats: int) -> None:
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    torch_xegpu_attn.attention(q, k, v)  # compile
    ours = median_ms(lambda: torch_xegpu_attn.attention(q, k, v), repeats * 20)
    op = median_ms(lambda: torch.ops.xegpu.attention(q, k, v), repeats * 20)
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats * 20)
    print(f"cache hit, tiny problem (1x1x8x16): attention() {ours * 1e3:.1f} us, "
          f"torch.ops.xegpu.attention {op * 1e3:.1f} us, SDPA {sdpa * 1e3:.1f} us")
    CACHE.clear_memory()
    before = STATS["disk_hits"]
    start = time.perf_counter()
    torch_xegpu_attn.attention(q, k, v)
    took = (time.perf_counter() - start) * 1e3
    assert STATS["disk_hits"] == before + 1
    print(f"disk cache hit (memory cleared, same process): {took:.2f} ms")


def bench_problems(repeats: int, rows: list) -> None:
    print(f"threads: {torch.get_num_threads()}, median of {repeats}")
    print(f"{'problem':<44} {'ours ms':>9} {'SDPA ms':>9} {'ours/SDPA':>9} {'GFLOP/s':>8} {'max err vs SDPA':>15}")
    for (b, hq, hkv, l, s, e), dtype, causal in PROBLEMS:
        q = torch.randn(b, hq, l, e, dtype=dtype)
        k, v = (torch.randn(b, hkv, s, e, dtype=dtype) for _ in range(2))
        gqa = hq != hkv
        ours_fn = lambda: torch_xegpu_attn.attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
        sdpa_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
        err = (ours_fn() - sdpa_fn()).abs().max().item()  # also compiles
        ours_fn(), sdpa_fn()
        ours_t, sdpa_t = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine state
            ours_t.append(median_ms(ours_fn, 1))
            sdpa_t.append(median_ms(sdpa_fn, 1))
        o, t_sdpa = statistics.median(ours_t), statistics.median(sdpa_t)
        flops = 4.0 * b * hq * l * s * e / (2 if causal else 1)
        heads = f"H={hq}" if not gqa else f"Hq={hq} Hkv={hkv}"
        lengths = f"L=S={l}" if l == s else f"L={l} S={s}"
        name = f"B={b} {heads} {lengths} E={e} {str(dtype)[6:]}{' causal' if causal else ''}"
        print(f"{name:<44} {o:9.2f} {t_sdpa:9.2f} {o / t_sdpa:9.2f} {flops / o / 1e6:8.1f} {err:15.2e}")
        rows.append({"problem": name, "ours_ms": round(o, 3), "sdpa_ms": round(t_sdpa, 3),
                     "ratio": round(o / t_sdpa, 3), "threads": torch.get_num_threads()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--csv", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_compile()
    bench_hits(args.repeats)
    rows: list = []
    bench_problems(args.repeats, rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
