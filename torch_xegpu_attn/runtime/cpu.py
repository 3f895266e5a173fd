"""Host side of the cpu target: load a kernel library, run it on torch tensors."""

from __future__ import annotations

import ctypes
from typing import Dict, Sequence

import torch

from .. import _C

#: element sizes of workspaces (MLIR element types) and of operands (dtype names of
#: AttentionSpec.operands).
_WORKSPACE_ITEM_SIZES = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1}
_OPERAND_ITEM_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
#: run-time extents as the launcher numbers them.
_SYMBOL_CODES = {"B": -1, "H": -2, "L": -3, "S": -4}


def release_workspaces() -> None:
    """Free the calling thread's workspace arena (the next call allocates a new one)."""
    _C.release_workspaces()


class CpuKernel:
    """A loaded kernel library: call it with the canonical operand tensors."""

    def __init__(self, library_path: str, metadata: Dict):
        # RTLD_LOCAL: kernels of different specs export the same symbol names.
        self._library = ctypes.CDLL(library_path, mode=ctypes.RTLD_LOCAL)
        self.metadata = metadata
        self._fns = [self._address(name) for name in metadata["grids"]]
        self._plan = self._address(metadata["plan"])
        self._plan_length = int(metadata["plan_length"])
        operands = metadata["operands"]
        self._dims = [[d if isinstance(d, int) else _SYMBOL_CODES[d] for d in o["dims"]] for o in operands]
        self._item_sizes = [_OPERAND_ITEM_SIZES[o["dtype"]] for o in operands]
        self._ws_shapes = [list(w["shape"]) for w in metadata["workspaces"]]
        self._ws_item_sizes = [_WORKSPACE_ITEM_SIZES[w["dtype"]] for w in metadata["workspaces"]]

    def _address(self, name: str) -> int:
        return ctypes.cast(getattr(self._library, f"_mlir_ciface_{name}"), ctypes.c_void_p).value

    def __call__(self, operands: Sequence[torch.Tensor]) -> None:
        """Run on q, k, v, [mask], out (canonical shapes; out is written)."""
        _C.launch_cpu(self._fns, self._plan, self._plan_length, list(operands), self._dims, self._item_sizes,
                      self._ws_shapes, self._ws_item_sizes)
