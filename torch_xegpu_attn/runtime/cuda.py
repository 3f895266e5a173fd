"""Host side of the nvvm target: cubins launched on torch's current CUDA stream.

The launcher is C++ (csrc/cuda_launcher.cpp, the CUDA driver API): a call
passes only the operand tensors; checks, descriptors, grids, workspaces and
the launches happen in C++ with the GIL released.  It is built against the
torch of the machine that runs it, at the first CUDA call, with
torch.utils.cpp_extension (into the package's cache directory, reused by
later processes): a CPU-only install never needs CUDA headers, and a GPU
machine needs only torch and the CUDA toolkit, not MLIR.
"""

from __future__ import annotations

import functools
import threading
from typing import Dict, List, Sequence

from .. import _C
from .._native import build_extension, existing_sources
from ..targets.base import Kernel

_SYMBOL_CODES = {"B": -1, "H": -2, "L": -3, "S": -4}
_ITEM_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "float64": 8, "int32": 4}
_WORKSPACE_DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "i8": 3, "f64": 4}
_OPCODES = {"add": 2, "sub": 3, "mul": 4, "ceildiv": 5, "div": 6, "min": 7, "max": 8}
_LOCK = threading.Lock()


def postfix(expression) -> List[int]:
    """A size expression of the kernel's metadata as the launcher's postfix program."""
    kind = expression[0]
    if kind == "const":
        return [0, expression[1]]
    if kind == "dim":
        return [1, expression[1], expression[2]]
    return postfix(expression[1]) + postfix(expression[2]) + [_OPCODES[kind]]


def launcher_sources() -> List[str]:
    """The CUDA launcher's source, then its headers (the package's csrc/)."""
    return existing_sources(["cuda_launcher.cpp", "size_program.h", "replay.h"], "the CUDA launcher")


@functools.lru_cache(maxsize=None)
def extension():
    """The C++ launcher, built (once per machine and torch) at first use; its replay of
    recorded calls is handed to the op's C++ kernel (`_C.set_device_replay`)."""
    source, *headers = launcher_sources()
    with _LOCK:
        module = build_extension("cuda_launcher", [source], headers, extra_ldflags=["-lcuda"], with_cuda=True)
    _C.set_device_replay("cuda", module.replay_capsule())
    return module


def clear_recipes() -> None:
    """Drop the recorded CUDA calls (nothing to do before the launcher was loaded)."""
    if extension.cache_info().currsize:
        extension().clear_recipes()


def loaded_modules() -> int:
    """CUDA modules loaded now (one per kernel and device it ran on; see csrc/cuda_launcher.cpp
    for when one is unloaded)."""
    return extension().loaded_modules() if extension.cache_info().currsize else 0


def recorded_signatures() -> int:
    return extension().recipes() if extension.cache_info().currsize else 0


class CudaKernel(Kernel):
    """A loaded nvvm kernel: call it with the canonical operand tensors (on one CUDA device)."""

    def __init__(self, binary_path: str, metadata: Dict):
        with open(binary_path, "rb") as f:
            cubin = f.read()
        self.metadata = metadata
        kernels = metadata["kernels"]
        operands = metadata["operands"]
        names = [o["name"] for o in operands]
        aligned = [names.index(n) for n in ("q", "k", "v", "dout") if n in names]  # staged with 16-byte copies
        self._kernel = extension().CudaKernel(
            cubin, [k["name"] for k in kernels], [int(k["threads"]) for k in kernels],
            [int(k["shared_bytes"]) for k in kernels], [postfix(k["grid"]) for k in kernels],
            [[d if isinstance(d, int) else _SYMBOL_CODES[d] for d in o["dims"]] for o in operands],
            [_ITEM_SIZES[o["dtype"]] for o in operands], aligned,
            [[postfix(d) for d in w["dims"]] for w in metadata["workspaces"]],
            [_WORKSPACE_DTYPES[w["dtype"]] for w in metadata["workspaces"]])

    def __call__(self, operands: Sequence) -> None:
        self._kernel(list(operands))

    def record(self, op, arguments, flags, operands, roles, results) -> bool:
        """Record a forward call for replay in C++ (see csrc/cuda_launcher.cpp); False for other
        ops, calls with dropout (a replay would reuse the seed), and calls whose operands are not
        plain views of their inputs (or need an alignment copy)."""
        if op != "forward" or ("seed", -1) in roles:
            return False
        query, key, value, attn_mask = arguments
        return self._kernel.record(query, key, value, attn_mask, *flags, list(operands), list(results[0].shape))

    def last_use(self) -> int:
        """When the kernel last ran (replays included), on the clock of every launcher."""
        return self._kernel.last_use()

    def forget(self) -> None:
        """Drop the recorded calls that use this kernel (it is leaving the memory cache)."""
        self._kernel.forget()

    def attributes(self, device_index: int = 0) -> List[Dict[str, int]]:
        """Registers, local memory and static shared memory of each kernel, from the driver."""
        found = []
        for k in range(len(self.metadata["kernels"])):
            registers, local, shared = self._kernel.attributes(device_index, k)
            found.append({"registers": registers, "local_bytes": local, "static_shared_bytes": shared})
        return found
