"""Host side of the cpu target: load a kernel library, run it on torch tensors."""

from __future__ import annotations

import ctypes
import math
import threading
from typing import Dict, List, Sequence

import torch

from .. import _C

#: MLIR element types of workspaces, and dtype names of operands (AttentionSpec.operands).
_WORKSPACE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i8": torch.int8}
_OPERAND_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "uint8": torch.uint8}

#: work per parallel chunk below which a grid runs on the calling thread only
#: (waking the pool costs more than it saves on tiny problems).
_MIN_PARALLEL_FLOPS = 2e6


_ALIGN = 64
_arenas = threading.local()


def _arena(nbytes: int) -> torch.Tensor:
    """This thread's workspace arena, grown to at least `nbytes`.

    Workspaces (the materialized K^T) are reused across calls: a fresh
    allocation of tens of MB costs more in page faults than the transpose
    that fills it.  One arena per thread, so concurrent calls never share.
    """
    arena = getattr(_arenas, "buffer", None)
    if arena is None or arena.numel() < nbytes:
        arena = torch.empty(nbytes, dtype=torch.uint8)
        _arenas.buffer = arena
    return arena


def release_workspaces() -> None:
    """Free the calling thread's workspace arena (the next call allocates a new one)."""
    _arenas.buffer = None


class CpuKernel:
    """A loaded kernel library: call it with the canonical operand tensors."""

    def __init__(self, library_path: str, metadata: Dict):
        # RTLD_LOCAL: kernels of different specs export the same symbol names.
        self._library = ctypes.CDLL(library_path, mode=ctypes.RTLD_LOCAL)
        self.metadata = metadata
        grids = metadata["grids"]
        self._fns = [ctypes.cast(getattr(self._library, f"_mlir_ciface_{g['name']}"), ctypes.c_void_p).value
                     for g in grids]
        self._tasks = [int(g["tasks"]) for g in grids]
        # Workspaces: (shape, dtype, byte offset in the arena, bytes).
        self._workspaces, offset = [], 0
        for w in metadata["workspaces"]:
            shape, dtype = tuple(w["shape"]), _WORKSPACE_DTYPES[w["dtype"]]
            nbytes = math.prod(shape) * dtype.itemsize
            self._workspaces.append((shape, dtype, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._arena_bytes = offset
        # What the launcher checks every buffer against (operands, then workspaces).
        operands = metadata["operands"]
        self._shapes = [list(o["shape"]) for o in operands] + [list(w[0]) for w in self._workspaces]
        self._item_sizes = ([_OPERAND_DTYPES[o["dtype"]].itemsize for o in operands]
                            + [w[1].itemsize for w in self._workspaces])
        self._grains = self._tasks  # serial until `set_work` says the problem is large enough

    def set_work(self, flops: float) -> None:
        """Choose per-grid parallel grains from the problem's total work."""
        threads = max(1, torch.get_num_threads())
        parallel = flops / threads >= _MIN_PARALLEL_FLOPS
        self._grains = [1 if parallel else max(1, n) for n in self._tasks]

    def __call__(self, operands: Sequence[torch.Tensor]) -> None:
        """Run on q, k, v, [mask], out (canonical shapes; out is written)."""
        buffers: List[torch.Tensor] = list(operands)
        if self._workspaces:
            arena = _arena(self._arena_bytes)
            for shape, dtype, offset, nbytes in self._workspaces:
                buffers.append(arena[offset:offset + nbytes].view(dtype).view(shape))
        _C.launch_cpu(self._fns, self._tasks, self._grains, buffers, self._shapes, self._item_sizes)
