"""Host side of the cpu target: load a kernel library, run it on torch tensors.

The library is opened, and its functions looked up, by the C++ launcher
(`_C.Kernel`, csrc/cpu_launcher.cpp), which also keeps the calls the frontend
records for replay (csrc/op.cpp): the library stays open while a recorded call
or this object refers to it.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from .. import _C
from ..targets.base import Kernel

#: element sizes of workspaces (MLIR element types) and of operands (dtype names of
#: AttentionSpec.operands).
_WORKSPACE_ITEM_SIZES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i8": 1}
_OPERAND_ITEM_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int32": 4}
#: run-time extents as the launcher numbers them.
_SYMBOL_CODES = {"B": -1, "H": -2, "L": -3, "S": -4}


def loaded_modules() -> int:
    """Kernel libraries open now: one per loaded kernel, closed when the memory cache evicts it and
    no recorded call uses it any more."""
    return _C.counters()["loaded_libraries"]


def release_workspaces() -> None:
    """Free the calling thread's workspace arena (the next call allocates a new one)."""
    _C.release_workspaces()


class CpuKernel(Kernel):
    """A loaded kernel library: call it with the canonical operand tensors."""

    counts_launches = True  # the C++ launcher counts every launch (_C.counters)

    def __init__(self, library_path: str, metadata: Dict):
        self.metadata = metadata
        operands = metadata["operands"]
        dims = [[d if isinstance(d, int) else _SYMBOL_CODES[d] for d in o["dims"]] for o in operands]
        self.native = _C.Kernel(
            library_path, list(metadata["grids"]), metadata["plan"], int(metadata["plan_length"]), dims,
            [_OPERAND_ITEM_SIZES[o["dtype"]] for o in operands],
            [list(w["shape"]) for w in metadata["workspaces"]],
            [_WORKSPACE_ITEM_SIZES[w["dtype"]] for w in metadata["workspaces"]])

    def __call__(self, operands: Sequence[torch.Tensor]) -> None:
        """Run on the kernel's canonical operands (spec.operand_names(); the outputs are written)."""
        self.native.run(list(operands))

    def record(self, op, arguments, flags, operands, roles, results) -> bool:
        """Record a call of `op` for replay in C++ (csrc/op.cpp); False when it cannot be replayed
        (an operand that is no view, copy or new tensor of the arguments)."""
        return _C.record(op, list(arguments), *flags, self.native, list(operands), list(roles), list(results))

    def last_use(self) -> int:
        """When the kernel last ran (replays included), on the clock of every launcher: larger is
        more recent."""
        return self.native.last_use()

    def forget(self) -> None:
        """Drop the recorded calls that use this kernel (it is leaving the memory cache)."""
        _C.forget_kernel(self.native)
