"""nvvm: from the kernels' gpu.module to PTX and a cubin.

    gpu-lower-to-nvvm-pipeline{cubin-format=isa}   the pinned MLIR: NVVM, LLVM IR, PTX (NVPTX backend)
    ptxas -arch=<arch> -O3 -v                       the CUDA toolkit's assembler: the cubin, and its
                                                    report (registers, spills, stack) for the tests
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict

from ...mlir_utils import CompileError

#: PTX ISA 8.0 is what sm_90a needs; mma.sync, ldmatrix and cp.async are older than it.
PTX_FEATURES = "+ptx80"


def pipeline(arch: str) -> str:
    return (f"builtin.module(gpu-lower-to-nvvm-pipeline{{cubin-chip={arch} cubin-features={PTX_FEATURES} "
            f"opt-level=3 cubin-format=isa}})")


@functools.lru_cache(maxsize=None)
def ptxas() -> str:
    """Path of the CUDA toolkit's ptxas: PATH, then CUDA_HOME and the usual install folders,
    then the `nvidia-cuda-nvcc` wheel (requirements-test.txt pins it, so that CI checks the
    nvvm kernels' machine code)."""
    found = shutil.which("ptxas")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-12"):
        path = os.path.join(root, "bin", "ptxas")
        if root and os.path.exists(path):
            return path
    wheel = _wheel_ptxas()
    if wheel:
        return wheel
    raise CompileError("the nvvm target needs the CUDA toolkit's ptxas (on PATH, under CUDA_HOME, or from "
                       "the nvidia-cuda-nvcc wheel)")


def _wheel_ptxas() -> str:
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for cuda in ("cu13", "cuda_nvcc"):
            path = os.path.join(folder, cuda, "bin", "ptxas")
            if os.path.exists(path):
                return path
    return ""


@functools.lru_cache(maxsize=None)
def ptxas_version() -> str:
    done = subprocess.run([ptxas(), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\S+),", done.stdout)
    return match.group(1) if match else done.stdout.strip().splitlines()[-1]


def ptx_of(module_text: str) -> str:
    """The PTX in the gpu.binary the pipeline left (its #gpu.object's assembly)."""
    match = re.search(r'assembly = "((?:[^"\\]|\\.)*)"', module_text, re.S)
    if match is None:
        raise CompileError("nvvm: the lowered module holds no PTX")
    return re.sub(r"\\([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), match.group(1))


def assemble(ptx: str, arch: str, keep_dir: str = "") -> Dict:
    """ptxas: the cubin and the resource report, per kernel."""
    with tempfile.TemporaryDirectory(prefix="xegpu_attn_ptx_") as work:
        source, cubin = os.path.join(work, "kernel.ptx"), os.path.join(work, "kernel.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas(), f"-arch={arch}", "-O3", "-v", source, "-o", cubin],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"ptxas failed ({done.returncode}):\n{done.stderr[-4000:]}")
        with open(cubin, "rb") as f:
            binary = f.read()
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            shutil.copy(source, os.path.join(keep_dir, "kernel.ptx"))
            shutil.copy(cubin, os.path.join(keep_dir, "kernel.cubin"))
    return {"cubin": binary, "resources": resources(done.stderr)}


def resources(report: str) -> Dict[str, Dict[str, int]]:
    """Per kernel: registers, spill stores and loads (bytes), stack frame (bytes), and whether
    ptxas serialized its wgmma chains (`wgmma_serialized`), from ptxas -v."""
    found: Dict[str, Dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current = found.setdefault(entry.group(1), {})
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            current["registers"] = int(registers.group(1))
        if "wgmma.mma_async instructions are serialized" in line:
            # ptxas waits for each wgmma before the next (too few registers, say): correct, slow
            current["wgmma_serialized"] = 1
    return found
