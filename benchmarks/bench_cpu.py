"""CPU benchmark: torch.ops.xegpu.attention against F.scaled_dot_product_attention.

Reports, in one run:
  * compile time of a new spec (disk cache off, fresh spec), per stage;
  * cost of a cache hit: the op's host overhead on a tiny problem, and a disk
    hit in this process (memory cache cleared);
  * loops over lengths from a cold cache: a decode loop of 200 steps
    (B=1, H=8, L=1, S = 100..299, E=64) and 50 random prompt lengths
    (L = S in [1, 2048], causal, H=8, E=64): kernels compiled, compile seconds,
    wall time of the loop;
  * time of both on fixed problems (those of issue 2, a bf16 and two
    decode-like ones, then problems with key and row tails), interleaved,
    median of N runs.

    python benchmarks/bench_cpu.py [--repeats 11] [--threads N] [--csv out.csv] [--schedule JSON]
                                   [--isa avx2|avx512|sse] [--problems-only] [--backward] [--memory]

--backward times training instead (the prefill problems): forward + backward and the backward
alone, ours next to SDPA's, interleaved, median of N (backward FLOPs: 2.5 x the forward's).
--memory reports the peak memory a training step adds (resident set growth of a fresh process
whose kernels are in the disk cache) for growing lengths, ours next to SDPA's.

It prints the vector ISA both sides use and the machine's f32 GEMM ceiling
(torch.mm of 2048 x 2048 matrices, same threads, median), and per problem
the fraction of that ceiling our kernel reaches.  --isa builds our kernels
for a narrower ISA than the host's (XEGPU_ATTN_CPU_ISA) and restricts torch
to it too (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA,
set before torch loads), so that an AVX-512 host measures the AVX2 code
next to AVX2 SDPA.  --schedule overrides the cpu target's options
(XEGPU_ATTN_SCHEDULE), e.g. '{"tail": "peel"}' to time the other tail mode.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

#: what restricts torch's own CPU kernels (ATen's vector code, MKL, oneDNN) to an ISA.
TORCH_ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx512": {},
}


def _restrict_isa(argv) -> None:
    """--isa NAME: set the environment that restricts both sides before torch is imported."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[1] if arg.startswith("--isa=") else (
            args[i + 1] if arg == "--isa" and i + 1 < len(args) else None)
        if name is not None:
            if name not in TORCH_ISA_ENV:
                sys.exit(f"--isa: one of {sorted(TORCH_ISA_ENV)}")
            os.environ["XEGPU_ATTN_CPU_ISA"] = name
            os.environ.update(TORCH_ISA_ENV[name])


if __name__ == "__main__":
    _restrict_isa(None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not os.environ.get("XEGPU_ATTN_CACHE_DIR"):  # a private disk cache, removed at exit
    os.environ["XEGPU_ATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="xegpu_attn_bench_")
    atexit.register(shutil.rmtree, os.environ["XEGPU_ATTN_CACHE_DIR"], ignore_errors=True)
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
    ((2, 8, 8, 1024, 1024, 64), torch.float64, True),
    ((1, 32, 32, 1, 4096, 128), torch.float32, False),
    ((1, 32, 8, 1, 4096, 128), torch.float32, False),
]
TAIL_PROBLEMS = [  # lengths that are not multiples of the tiles
    ((2, 8, 8, 1000, 1000, 64), torch.float32, False),
    ((2, 8, 8, 1000, 1000, 64), torch.float32, True),
    ((1, 8, 8, 100, 100, 64), torch.float32, True),
    ((1, 32, 8, 1, 4000, 128), torch.float32, False),
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


class _CompileTimes(logging.Handler):
    """Collects the compile seconds the package logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds = []

    def emit(self, record):
        self.seconds.append(record.args[3])


def _length_loop(name: str, calls) -> None:
    times = _CompileTimes()
    logger = logging.getLogger("torch_xegpu_attn")
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    CACHE.clear_memory()
    with tempfile.TemporaryDirectory(prefix="xegpu_attn_bench_loop_") as folder:
        os.environ["XEGPU_ATTN_CACHE_DIR"] = folder
        start = time.perf_counter()
        for call in calls:
            call()
        wall = time.perf_counter() - start
    logger.removeHandler(times)
    print(f"{name}: {len(calls)} calls, {len(times.seconds)} kernels compiled "
          f"({', '.join(f'{t:.2f}' for t in times.seconds)} s), loop {wall:.2f} s")


def bench_length_loops() -> None:
    cache_dir = os.environ["XEGPU_ATTN_CACHE_DIR"]
    k_cache, v_cache = torch.randn(1, 8, 299, 64), torch.randn(1, 8, 299, 64)
    q = torch.randn(1, 8, 1, 64)
    decode = [lambda s=s: torch_xegpu_attn.attention(q, k_cache[:, :, :s], v_cache[:, :, :s])
              for s in range(100, 300)]
    _length_loop("decode loop B=1 H=8 L=1 S=100..299 E=64", decode)
    lengths = random.Random(0).choices(range(1, 2049), k=50)
    prompts = []
    for n in lengths:
        x = torch.randn(1, 8, n, 64)
        prompts.append(lambda x=x: torch_xegpu_attn.attention(x, x, x, is_causal=True))
    _length_loop("50 prompts L=S random in [1, 2048] B=1 H=8 E=64 causal", prompts)
    os.environ["XEGPU_ATTN_CACHE_DIR"] = cache_dir


def gemm_ceiling(repeats: int) -> float:
    """GFLOP/s of torch's f32 matrix product on this machine (2048 x 2048, median): the ceiling
    the kernels are measured against."""
    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    return 2.0 * n ** 3 / median_ms(lambda: torch.mm(a, b, out=c), repeats) / 1e6


def describe_isa() -> str:
    from torch_xegpu_attn.targets.cpu import toolchain
    host_isa = getattr(toolchain, "host_isa", None)  # releases before the ISA choice: "native"
    ours = host_isa(os.environ.get("XEGPU_ATTN_CPU_ISA", "")).name if host_isa else "native"
    return f"ours {ours}, torch {torch.backends.cpu.get_cpu_capability()}; CPU {toolchain.host_cpu()['cpu']}"


def _machine(repeats: int):
    """Print the threads, the ISA of both sides and the GEMM ceiling; return (ceiling, ISA text)."""
    ceiling, isa = gemm_ceiling(repeats), describe_isa()
    print(f"threads: {torch.get_num_threads()}, median of {repeats}; ISA: {isa}")
    print(f"f32 GEMM ceiling (torch.mm 2048^3): {ceiling:.1f} GFLOP/s")
    return ceiling, isa


def _problem_name(b, hq, hkv, l, s, e, dtype, causal) -> str:
    heads = f"H={hq}" if hq == hkv else f"Hq={hq} Hkv={hkv}"
    lengths = f"L=S={l}" if l == s else f"L={l} S={s}"
    return f"B={b} {heads} {lengths} E={e} {str(dtype)[6:]}{' causal' if causal else ''}"


def bench_problems(repeats: int, rows: list) -> None:
    ceiling, isa = _machine(repeats)
    print(f"{'problem':<44} {'ours ms':>9} {'SDPA ms':>9} {'ours/SDPA':>9} {'GFLOP/s':>8} {'ceiling':>7} "
          f"{'compile s':>9} {'max err vs SDPA':>15}")
    for (b, hq, hkv, l, s, e), dtype, causal in PROBLEMS + TAIL_PROBLEMS:
        q = torch.randn(b, hq, l, e, dtype=dtype)
        k, v = (torch.randn(b, hkv, s, e, dtype=dtype) for _ in range(2))
        gqa = hq != hkv
        ours_fn = lambda: torch_xegpu_attn.attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
        sdpa_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
        start = time.perf_counter()
        ours_fn()  # compiles (or loads) the kernel
        compile_s = time.perf_counter() - start
        err = (ours_fn() - sdpa_fn()).abs().max().item()
        ours_fn(), sdpa_fn()
        ours_t, sdpa_t = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine state
            ours_t.append(median_ms(ours_fn, 1))
            sdpa_t.append(median_ms(sdpa_fn, 1))
        o, t_sdpa = statistics.median(ours_t), statistics.median(sdpa_t)
        flops = 4.0 * b * hq * l * s * e / (2 if causal else 1)
        name = _problem_name(b, hq, hkv, l, s, e, dtype, causal)
        rate = flops / o / 1e6
        print(f"{name:<44} {o:9.2f} {t_sdpa:9.2f} {o / t_sdpa:9.2f} {rate:8.1f} {rate / ceiling:7.2f} "
              f"{compile_s:9.2f} {err:15.2e}")
        rows.append({"problem": name, "ours_ms": round(o, 3), "sdpa_ms": round(t_sdpa, 3),
                     "ratio": round(o / t_sdpa, 3), "gflops": round(rate, 1),
                     "ceiling_fraction": round(rate / ceiling, 3), "compile_s": round(compile_s, 3),
                     "threads": torch.get_num_threads(), "isa": isa})


def _training_inputs(b, hq, hkv, l, s, e, dtype):
    q = torch.randn(b, hq, l, e, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hkv, s, e, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v


def bench_backward(repeats: int, rows: list) -> None:
    """Forward + backward and backward alone of the prefill problems, ours next to SDPA's."""
    ceiling, isa = _machine(repeats)
    print(f"{'problem':<44} {'fwd+bwd ours':>12} {'SDPA':>8} {'ratio':>6} {'bwd ours':>9} {'SDPA':>8} "
          f"{'ratio':>6} {'bwd GFLOP/s':>11} {'ceiling':>7} {'max grad err vs SDPA':>20}")
    for (b, hq, hkv, l, s, e), dtype, causal in PROBLEMS + TAIL_PROBLEMS:
        if l == 1:
            continue  # decode: no training
        q, k, v = _training_inputs(b, hq, hkv, l, s, e, dtype)
        gqa = hq != hkv
        grad = torch.randn(b, hq, l, e, dtype=dtype)

        def forward(fn):
            return lambda: fn(q, k, v, is_causal=causal, enable_gqa=gqa)

        ours_fwd, sdpa_fwd = forward(torch_xegpu_attn.attention), forward(F.scaled_dot_product_attention)

        def both(fwd):
            return lambda: torch.autograd.grad(fwd(), (q, k, v), grad)

        def backward_only(fwd):
            out = fwd()
            return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        ours_both, sdpa_both = both(ours_fwd), both(sdpa_fwd)
        got, expected = ours_both(), sdpa_both()  # compiles (or loads) the kernels
        err = max((a - b_).abs().max().item() for a, b_ in zip(got, expected))
        ours_bwd, sdpa_bwd = backward_only(ours_fwd), backward_only(sdpa_fwd)
        times = {name: [] for name in ("ours_both", "sdpa_both", "ours_bwd", "sdpa_bwd")}
        for _ in range(repeats):  # interleaved, so both see the same machine state
            for name, fn in (("ours_both", ours_both), ("sdpa_both", sdpa_both), ("ours_bwd", ours_bwd),
                             ("sdpa_bwd", sdpa_bwd)):
                times[name].append(median_ms(fn, 1))
        t = {name: statistics.median(values) for name, values in times.items()}
        flops = 2.5 * 4.0 * b * hq * l * s * e / (2 if causal else 1)
        name = _problem_name(b, hq, hkv, l, s, e, dtype, causal)
        rate = flops / t["ours_bwd"] / 1e6
        print(f"{name:<44} {t['ours_both']:12.2f} {t['sdpa_both']:8.2f} {t['ours_both'] / t['sdpa_both']:6.2f} "
              f"{t['ours_bwd']:9.2f} {t['sdpa_bwd']:8.2f} {t['ours_bwd'] / t['sdpa_bwd']:6.2f} {rate:11.1f} "
              f"{rate / ceiling:7.2f} {err:20.2e}")
        rows.append({"problem": name, **{f"{k}_ms": round(x, 3) for k, x in t.items()},
                     "fwd_bwd_ratio": round(t["ours_both"] / t["sdpa_both"], 3),
                     "bwd_ratio": round(t["ours_bwd"] / t["sdpa_bwd"], 3), "bwd_gflops": round(rate, 1),
                     "ceiling_fraction": round(rate / ceiling, 3), "threads": torch.get_num_threads(),
                     "isa": isa})


_MEMORY_CHILD = """
import resource, sys, torch, torch_xegpu_attn
import torch.nn.functional as F
which, n = sys.argv[1], int(sys.argv[2])
fn = torch_xegpu_attn.attention if which == "ours" else F.scaled_dot_product_attention
def step(n):
    q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
    fn(q, k, v, is_causal=True).sum().backward()
    return q, k, v
step(256)  # loads the kernels of the "long" class (the caller filled the disk cache)
q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn(q, k, v, is_causal=True).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def bench_memory() -> None:
    """Peak resident memory a causal training step adds (B=1, H=8, E=64, f32), by length: the
    inputs and their gradients take 6 * 8 * 64 * 4 bytes per position; an L x S score matrix
    would add 8 * 4 * L * S."""
    import subprocess
    lengths = (1024, 2048, 4096, 8192)
    print("peak memory a causal training step adds (MiB; resident set growth of a fresh process; "
          "B=1 H=8 E=64 f32; inputs + gradients alone: 6 x 8 x 64 x 4 bytes per position)")
    print(f"{'L=S':>6} {'ours':>8} {'SDPA':>8} {'inputs+grads':>12} {'L x S scores':>12}")
    env = dict(os.environ)
    for n in lengths:
        got = {}
        for which in ("ours", "sdpa"):
            subprocess.run([sys.executable, "-c", _MEMORY_CHILD, which, str(n)], env=env, check=True,
                           capture_output=True)  # this length class's kernels into the disk cache
            done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, which, str(n)], env=env, check=True,
                                  capture_output=True, text=True)
            got[which] = int(done.stdout.split()[-1]) / 1024
        print(f"{n:>6} {got['ours']:8.1f} {got['sdpa']:8.1f} {6 * 8 * 64 * 4 * n / 2**20:12.1f} "
              f"{8 * 4 * n * n / 2**20:12.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--csv", default="")
    parser.add_argument("--schedule", default="", help="JSON: option fields to override")
    parser.add_argument("--isa", default="", choices=["", *TORCH_ISA_ENV],
                        help="build for (and restrict torch to) this ISA instead of the host's widest")
    parser.add_argument("--problems-only", action="store_true",
                        help="only the timed problems (no compile, cache-hit and length-loop costs)")
    parser.add_argument("--backward", action="store_true",
                        help="time training: forward + backward and the backward alone")
    parser.add_argument("--memory", action="store_true",
                        help="the peak memory a training step adds, by length")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.schedule:
        os.environ["XEGPU_ATTN_SCHEDULE"] = args.schedule
        print(f"schedule overrides: {args.schedule}")
    if args.memory:
        bench_memory()
        return 0
    rows: list = []
    if args.backward:
        bench_backward(args.repeats, rows)
    else:
        if not args.problems_only:
            bench_compile()
            bench_hits(args.repeats)
            bench_length_loops()
        bench_problems(args.repeats, rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
