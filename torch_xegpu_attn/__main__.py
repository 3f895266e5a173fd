"""Command line: compile one problem and look at its IR, list stages, inspect the cache.

    python -m torch_xegpu_attn stages
    python -m torch_xegpu_attn compile --shape 2,8,1024,1024,64 --causal --dump-ir ir/ [--stop-after flash] [--print]
    python -m torch_xegpu_attn cache [--clear]

--shape is B,H,L,S,E[,Ev] (H = key/value heads); --group G gives H*G query heads
(GQA); --mask KIND:DIMS gives a mask, e.g. bool:bls (varies along batch, query
rows and keys) or additive:ls.  A kernel serves every B, H, L and S of its
length class; the shape picks the class.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from . import knobs
from .compiler import CompilationStopped, CompileReport, compile_spec, dump_folder_name, stage_names
from .spec import DTYPES, AttentionSpec, MaskSpec, ProblemSize
from .targets import get_target


def _spec(args) -> AttentionSpec:
    dims = [int(x) for x in args.shape.split(",")]
    if len(dims) not in (5, 6):
        raise SystemExit("--shape takes B,H,L,S,E or B,H,L,S,E,Ev")
    b, h, l, s, e = dims[:5]
    ev = dims[5] if len(dims) == 6 else e
    mask = None
    if args.mask:
        kind, _, where = args.mask.partition(":")
        mask = MaskSpec(kind, tuple(where), "bool" if kind == "bool" else args.dtype)
    length_class = get_target(args.target).length_class(ProblemSize(b, h, l, s), args.group)
    return AttentionSpec(group=args.group, head_dim=e, v_head_dim=ev, dtype=args.dtype, causal=args.causal,
                         scale=args.scale, mask=mask, target=args.target, length_class=length_class)


def _compile(args) -> int:
    spec = _spec(args)
    report = CompileReport()
    start = time.perf_counter()
    try:
        artifact = compile_spec(spec, dump_dir=args.dump_ir, stop_after=args.stop_after, report=report)
    except CompilationStopped as stopped:
        if args.print:
            print(stopped.ir)
        print(f"stopped after {stopped.stage} ({time.perf_counter() - start:.2f} s)", file=sys.stderr)
        return 0
    stages = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in report.stage_seconds.items())
    print(f"{spec.short_name()}: {len(artifact.binary)} bytes, {report.total:.2f} s ({stages})")
    for grid in artifact.metadata.get("grids", []):
        print(f"  {grid}")
    if args.dump_ir:
        options = get_target(spec.target).options_for(spec)
        print(f"IR per stage in {os.path.join(args.dump_ir, dump_folder_name(spec, options))}")
    return 0


#: the files of a cache entry (64 hex digits of its key) and temporaries of writes in flight.
_ENTRY_FILE = re.compile(r"^([0-9a-f]{64}\.[A-Za-z0-9]+|\.tmp-.*)$")


def _cache(args) -> int:
    folder = knobs.cache_dir()
    files = [f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if _ENTRY_FILE.match(f)]
    entries = [f for f in files if f.endswith(".json") and not f.startswith(".tmp-")]
    print(f"cache directory: {folder} ({len(entries)} entries)")
    if args.clear:
        for name in files:  # only this package's files: the directory may be shared
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.unlink(path)
        print(f"removed {len(files)} files")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xegpu_attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    stages = commands.add_parser("stages", help="list the compiler stages of a target")
    stages.add_argument("--target", default="cpu")
    comp = commands.add_parser("compile", help="compile one problem")
    comp.add_argument("--shape", required=True, help="B,H,L,S,E[,Ev]")
    comp.add_argument("--group", type=int, default=1, help="query heads per key/value head")
    comp.add_argument("--dtype", default="float32", choices=DTYPES)
    comp.add_argument("--causal", action="store_true")
    comp.add_argument("--mask", default="", help="KIND:DIMS, e.g. bool:bls")
    comp.add_argument("--scale", type=float, default=None)
    comp.add_argument("--target", default="cpu")
    comp.add_argument("--dump-ir", default=None, help="write the IR after every stage to this directory")
    comp.add_argument("--stop-after", default=None, help="stop after this stage")
    comp.add_argument("--print", action="store_true", help="print the IR of the stop-after stage")
    cache = commands.add_parser("cache", help="show (or clear) the disk cache")
    cache.add_argument("--clear", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "stages":
        print("\n".join(stage_names(args.target)))
        return 0
    if args.command == "compile":
        return _compile(args)
    return _cache(args)


if __name__ == "__main__":
    sys.exit(main())
