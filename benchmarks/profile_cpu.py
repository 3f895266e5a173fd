"""Where a cpu kernel's time goes: `perf record` of a loop of calls, split by the grid's loops.

    python benchmarks/profile_cpu.py [--shape 2,8,1024,64] [--causal] [--backward] [--isa avx2]
                                     [--seconds 8]

Runs the op on a B,H,L=S,E float32 problem for a few seconds under `perf record`
(with --backward: training steps, forward and backward, whose hottest grid is the backward's)
(Debian's `perf`; in a VM without counters it samples on the CPU clock), then
reads `perf annotate` of the hottest grid function and groups its samples by
the innermost loop they fall in (a backward jump spans a loop):

    micro-kernel  loops of broadcast-FMAs (vbroadcastss or {1toN} + vfmadd231ps): QK^T, P.V
    row loops     loops that evaluate the exp2 polynomial (vfmadd213ps): the softmax
                  of one row at a time (subtraction of the maximum, exp2, sums, P stores)
    rest          everything else: row maxima, rescales, K^T transposes, loop set-up

The split is by instruction pattern, so it is a reading aid, not an exact
attribution.  For a non-causal forward it also prints the micro-kernel loops'
rate per thread: the contractions' FLOPs (4 B H L S E per call) over the CPU
time their samples stand for (the process's CPU time times their share of all
samples), the figure to set next to a micro-kernel library's
(benchmarks/ukernel/run.sh).  --isa builds our kernels for a narrower ISA (XEGPU_ATTN_CPU_ISA).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

_LINE = re.compile(r"\s*([\d.]+)\s*:\s*([0-9a-f]+):\s*(\S+)\s*(.*)")


def _worker(shape, causal: bool, backward: bool, seconds: float) -> None:
    import torch
    import torch_xegpu_attn
    b, h, n, e = shape
    q, k, v = (torch.randn(b, h, n, e, requires_grad=backward) for _ in range(3))
    grad = torch.randn(b, h, n, e)

    def call():
        out = torch_xegpu_attn.attention(q, k, v, is_causal=causal)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    for _ in range(3):
        call()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    print(f"{(time.perf_counter() - start) / calls * 1e3:.2f} ms per call ({calls} calls)")
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print("WORKER " + json.dumps({"calls": calls + 3, "cpu_seconds": sum(u.ru_utime + u.ru_stime for u in usage)}))


def _hottest_grid(data: str):
    """(name, share of all samples) of the grid function with the most samples."""
    report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "sym"],
                            capture_output=True, text=True, check=True).stdout
    for line in report.splitlines():
        m = re.search(r"([\d.]+)%.*\[\.\] (attention_grid\d+)", line)
        if m:
            return m.group(2), float(m.group(1)) / 100
    raise SystemExit("no attention_grid function among the samples")


def split(annotated: str) -> dict:
    """{"micro-kernel", "row loops", "rest": share of the function's samples}."""
    rows = [(float(m.group(1)), int(m.group(2), 16), m.group(3), m.group(4))
            for m in map(_LINE.match, annotated.splitlines()) if m]
    loops = []
    for _, address, op, args in rows:
        target = re.match(r"([0-9a-f]+)", args) if op.startswith("j") else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))

    def innermost(address):
        inside = [loop for loop in loops if loop[0] <= address <= loop[1]]
        return min(inside, key=lambda loop: loop[1] - loop[0]) if inside else None

    kinds = {}
    for loop in set(loops):
        if any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in loops):
            continue  # only loops with no loop inside them are classified
        body = [(op, args) for _, a, op, args in rows if loop[0] <= a <= loop[1]]
        ops = collections.Counter(op[:-1] for op, _ in body)  # ps and pd alike
        broadcasts = ops["vbroadcasts"] + sum("{1to" in args for _, args in body)  # AVX-512 folds them
        if ops["vfmadd213p"]:
            kinds[loop] = "row loops"
        elif broadcasts and ops["vfmadd231p"]:
            kinds[loop] = "micro-kernel"
    shares = collections.Counter()
    for percent, address, _, _ in rows:
        loop = innermost(address)
        shares[kinds.get(loop, "rest")] += percent
    total = sum(shares.values()) or 1.0
    return {kind: shares[kind] / total for kind in ("micro-kernel", "row loops", "rest")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,8,1024,64", help="B,H,L=S,E")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backward", action="store_true", help="profile training steps' backward")
    parser.add_argument("--isa", default="", help="XEGPU_ATTN_CPU_ISA for our kernels")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.worker:
        _worker(shape, args.causal, args.backward, args.seconds)
        return 0
    env = dict(os.environ, **({"XEGPU_ATTN_CPU_ISA": args.isa} if args.isa else {}))
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "perf.data")
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", args.shape,
                   "--seconds", str(args.seconds)] + (["--causal"] if args.causal else []) \
            + (["--backward"] if args.backward else [])
        worker = subprocess.run(["perf", "record", "-q", "-o", data, "--"] + command, env=env, check=True,
                                stdout=subprocess.PIPE, text=True).stdout
        printed, record = worker.split("WORKER ", 1)
        print(printed.strip())
        grid, grid_share = _hottest_grid(data)
        annotated = subprocess.run(["perf", "annotate", "-i", data, "--stdio", "-s", grid],
                                   capture_output=True, text=True, check=True).stdout
    shares = split(annotated)
    print(f"{grid} of B,H,L=S,E = {args.shape}{' causal' if args.causal else ''}{' backward' if args.backward else ''}, ISA "
          f"{args.isa or 'the host widest'}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    if not (args.causal or args.backward):
        run = json.loads(record)
        b, h, n, e = shape
        seconds = run["cpu_seconds"] * grid_share * shares["micro-kernel"]
        print(f"micro-kernel loops: {4 * b * h * n * n * e * run['calls'] / seconds * 1e-9:.1f} GFLOP/s per thread "
              f"({grid_share:.0%} of the samples in {grid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
