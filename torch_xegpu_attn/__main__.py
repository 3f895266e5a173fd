"""Command line: compile one problem and look at its IR, list stages, inspect the cache.

    python -m torch_xegpu_attn stages [--target cpu]
    python -m torch_xegpu_attn compile --shape 2,8,1024,1024,64 --causal --dump-ir ir/ [--stop-after flash] [--print]
    python -m torch_xegpu_attn compile --shape 1,8,1,300,64 --fill-cache
    python -m torch_xegpu_attn cache [--clear]
    python -m torch_xegpu_attn precompile --target nvvm --arch sm_90a --shape 4,16,4096,4096,128 --dtype float16 --causal
    python -m torch_xegpu_attn precompile --target nvvm --head-dim 128 --length-class decode --group 4 --dtype bfloat16
    python -m torch_xegpu_attn compile --shape 2,8,1024,1024,64 --kernel backward      (a training step's kernels:
                                                                                     forward_lse, backward)

--shape is B,H,L,S,E[,Ev] (H = key/value heads); --group G gives H*G query heads
(GQA); --mask KIND:DIMS gives a mask, e.g. bool:bls (varies along batch, query
rows and keys) or additive:ls.  A kernel serves every B, H, L and S of its
length class; the shape picks the class.  --print prints the IR of the
--stop-after stage (of the last IR stage without --stop-after).  `compile`
compiles afresh and neither reads nor writes the disk cache, unless
--fill-cache: then the kernel comes from the cache, or is compiled into it.

`precompile` puts the kernel into the disk cache without loading it: for a
machine that will run it without the compiler (a GPU node: carry the cache
directory there, XEGPU_ATTN_CACHE_DIR).  A length class (--length-class) can
stand for --shape; --scale takes a float or its hex form (float.hex).

Mistakes in the arguments are reported in one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from . import knobs
from .compiler import CompilationStopped, CompileReport, compile_spec, dump_folder_name, stage_names
from .spec import DTYPES, KERNELS, MASK_DIMS, AttentionSpec, MaskSpec, ProblemSize
from .targets import get_target

PROG = "python -m torch_xegpu_attn"


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


def _target(name: str):
    try:
        return get_target(name)
    except NotImplementedError as error:
        raise UsageError(str(error)) from None


def _shape(text: str):
    try:
        dims = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--shape takes B,H,L,S,E or B,H,L,S,E,Ev (integers), got {text!r}") from None
    if len(dims) not in (5, 6) or min(dims) < 1:
        raise UsageError(f"--shape takes B,H,L,S,E or B,H,L,S,E,Ev (positive), got {text!r}")
    b, h, l, s, e = dims[:5]
    return ProblemSize(b, h, l, s), e, dims[5] if len(dims) == 6 else e


def _mask(text: str, dtype: str):
    kind, sep, dims = text.partition(":")
    if not sep or kind not in ("bool", "additive") or not dims:
        raise UsageError(f"--mask takes KIND:DIMS with KIND bool or additive and DIMS from "
                         f"{''.join(MASK_DIMS)} in that order (e.g. bool:bls), got {text!r}")
    try:
        return MaskSpec(kind, tuple(dims), "bool" if kind == "bool" else dtype)
    except ValueError as error:
        raise UsageError(f"--mask {text}: {error}") from None


def _scale(text):
    if text is None:
        return None
    try:
        return float.fromhex(text) if "0x" in text.lower() else float(text)
    except ValueError:
        raise UsageError(f"--scale takes a float (or its hex form), got {text!r}") from None


def _spec(args) -> AttentionSpec:
    target = _target(args.target)
    length_class = getattr(args, "length_class", None)
    if args.shape:
        size, e, ev = _shape(args.shape)
    elif length_class and getattr(args, "head_dim", None):
        size, e = None, args.head_dim
        ev = args.v_head_dim or e
    else:
        raise UsageError("give --shape B,H,L,S,E[,Ev], or --head-dim with --length-class")
    if args.group < 1:
        raise UsageError(f"--group must be positive, got {args.group}")
    if args.mask and args.causal:
        raise UsageError("--mask and --causal exclude each other (as attn_mask and is_causal do)")
    mask = _mask(args.mask, args.dtype) if args.mask else None
    try:
        spec = AttentionSpec(group=args.group, head_dim=e, v_head_dim=ev, dtype=args.dtype, causal=args.causal,
                             scale=_scale(args.scale), mask=mask, target=args.target, kernel=args.kernel,
                             dropout_p=args.dropout_p)
        spec = target.classified(spec, size, args.arch) if size is not None else \
            dataclasses.replace(spec, length_class=length_class)
        target.check(spec)
    except (ValueError, NotImplementedError) as error:
        raise UsageError(str(error)) from None
    return spec


def _precompile(args) -> int:
    from .cache import CACHE
    spec = _spec(args)
    _options(spec, args.arch)
    start = time.perf_counter()
    key = CACHE.precompile(spec, args.arch)
    arch = f" for {args.arch}" if args.arch else ""
    print(f"{spec.short_name()}{arch}: in the disk cache ({key[:12]}, {knobs.cache_dir()}), "
          f"{time.perf_counter() - start:.2f} s")
    return 0


def _options(spec: AttentionSpec, arch):
    """The target's options for `spec` on `arch` (a usage error where the target compiles only
    for this machine)."""
    try:
        return get_target(spec.target).options_for(spec, arch)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _stop_after(args) -> str:
    """The stage to stop after: --stop-after, or with --print alone the last IR stage."""
    names = stage_names(args.target)
    ir_stages = names[:-1]  # "binary" is no IR
    if args.stop_after is not None and args.stop_after not in names:
        raise UsageError(f"unknown stage {args.stop_after!r}; stages are: {', '.join(names)}")
    if args.print and args.stop_after == "binary":
        raise UsageError(f"--print shows an IR stage ({', '.join(ir_stages)}); the binary is not IR "
                         f"(--dump-ir writes its LLVM IR and assembly)")
    if args.print and args.stop_after is None:
        return ir_stages[-1]
    return args.stop_after


def _compile(args) -> int:
    spec = _spec(args)
    stop_after = _stop_after(args)
    if args.fill_cache:
        if stop_after is not None or args.dump_ir or args.arch:
            raise UsageError("--fill-cache builds the whole kernel for this machine: it takes no --stop-after, "
                             "--print, --dump-ir or --arch (precompile --arch fills the cache for another GPU)")
        return _fill_cache(spec)
    report = CompileReport()
    start = time.perf_counter()
    try:
        artifact = compile_spec(spec, dump_dir=args.dump_ir or "", stop_after=stop_after, report=report,
                                options=_options(spec, args.arch))
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
        options = _options(spec, args.arch)
        print(f"IR per stage in {os.path.join(args.dump_ir, dump_folder_name(spec, options))}")
    print("compiled afresh: the disk cache was neither read nor written (--fill-cache uses it)")
    return 0


def _fill_cache(spec: AttentionSpec) -> int:
    from .cache import CACHE, STATS, entry_key
    before = dict(STATS)
    start = time.perf_counter()
    CACHE.get(spec)
    took = time.perf_counter() - start
    key = entry_key(spec)[:12]
    if STATS["disk_hits"] > before["disk_hits"]:
        print(f"{spec.short_name()}: already in the disk cache ({key}, {knobs.cache_dir()})")
    elif STATS["disk_writes"] > before["disk_writes"]:
        print(f"{spec.short_name()}: compiled in {took:.2f} s and written to the disk cache ({key}, "
              f"{knobs.cache_dir()})")
    else:
        print(f"{spec.short_name()}: compiled in {took:.2f} s; the disk cache is off or not writable "
              f"(XEGPU_ATTN_DISK_CACHE, {knobs.cache_dir()})")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} kB"


def _describe(record) -> tuple:
    """(spec name, target) of an entry's record, or what is wrong with it."""
    if record is None:
        return "(unreadable record: rebuilt on next use)", "?"
    try:
        spec = AttentionSpec.from_json(record["spec"])
    except (KeyError, TypeError, ValueError):
        return "(damaged record: rebuilt on next use)", "?"
    return spec.short_name(), spec.target


def _cache(args) -> int:
    from .cache import TEMP_FILE, _locked, disk_entries, read_record, remove_entry
    folder = knobs.cache_dir()
    entries = disk_entries(folder)
    total = sum(e["bytes"] for e in entries)
    print(f"cache directory: {folder} ({len(entries)} entries, {_size(total)}; "
          f"bound {_size(knobs.cache_max_bytes())}, XEGPU_ATTN_CACHE_MAX_MB)")
    if args.clear:
        files = 0
        with _locked(folder, exclusive=True):
            for entry in entries:  # only this package's files: the directory may be shared
                remove_entry(folder, entry)
                files += len(entry["files"])
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if TEMP_FILE.match(name):
                    os.unlink(os.path.join(folder, name))
                    files += 1
        print(f"removed {len(entries)} entries ({files} files)")
        return 0
    if entries:
        now = time.time()
        print(f"{'key':<13} {'spec':<44} {'target':<7} {'size':>8}  last used")
        for entry in reversed(entries):  # most recently used first
            name, target = _describe(read_record(folder, entry["key"]))
            used = _age(now - entry["last_use"]) if entry["last_use"] else "?"
            print(f"{entry['key'][:12]:<13} {name:<44} {target:<7} {_size(entry['bytes']):>8}  {used}")
    return 0


def _add_spec_arguments(parser, dtype: str, target: str) -> None:
    """The spec's arguments other than the shape, shared by compile and precompile."""
    parser.add_argument("--group", type=int, default=1, help="query heads per key/value head")
    parser.add_argument("--dtype", default=dtype, choices=DTYPES)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--mask", default="", help="KIND:DIMS, e.g. bool:bls")
    parser.add_argument("--scale", default=None, help="a float, or its hex form")
    parser.add_argument("--target", default=target)
    parser.add_argument("--dropout-p", type=float, default=0.0, help="the dropout probability (a kernel per value)")
    parser.add_argument("--kernel", default="forward", choices=KERNELS,
                        help="inference (forward), or a training step's forward_lse and backward")
    parser.add_argument("--arch", default=None,
                        help="the GPU architecture a GPU target compiles for, e.g. sm_80 (default: this machine's "
                             "GPU, else the target's default)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    stages = commands.add_parser("stages", help="list the compiler stages of a target")
    stages.add_argument("--target", default="cpu")
    comp = commands.add_parser("compile", help="compile one problem (afresh, unless --fill-cache)")
    comp.add_argument("--shape", required=True, help="B,H,L,S,E[,Ev]")
    _add_spec_arguments(comp, dtype="float32", target="cpu")
    comp.add_argument("--dump-ir", default=None, help="write the IR after every stage to this directory")
    comp.add_argument("--stop-after", default=None, help="stop after this stage")
    comp.add_argument("--print", action="store_true",
                      help="print the IR of the --stop-after stage (default: the last IR stage)")
    comp.add_argument("--fill-cache", action="store_true",
                      help="take the kernel from the disk cache, or compile it into the cache")
    pre = commands.add_parser("precompile", help="compile a kernel into the disk cache (for another machine)")
    pre.add_argument("--shape", default="", help="B,H,L,S,E[,Ev] (or --head-dim and --length-class)")
    pre.add_argument("--head-dim", type=int, default=0)
    pre.add_argument("--v-head-dim", type=int, default=0)
    pre.add_argument("--length-class", default="")
    _add_spec_arguments(pre, dtype="float16", target="nvvm")
    cache = commands.add_parser("cache", help="list (or clear) the disk cache's entries")
    cache.add_argument("--clear", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "stages":
            _target(args.target)
            print("\n".join(stage_names(args.target)))
            return 0
        if args.command == "compile":
            return _compile(args)
        if args.command == "precompile":
            return _precompile(args)
        return _cache(args)
    except (UsageError, knobs.KnobError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
