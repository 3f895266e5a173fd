"""NVVM stages "nvvm-layouts" (each work-group loop's vector values get their layouts, written on
the ops: analysis.py) and "nvvm-kernels" (each work-group loop of the shared IR becomes a gpu.func,
targets/outline.py, whose body `distribute.WorkGroupKernel` distributes to warps and lanes by
those layouts)."""

from __future__ import annotations

from typing import Dict

from mlir import ir

from ...schedule.bufferize import host_function
from ..outline import KERNEL_MODULE, outline_work_groups
from .analysis import annotate_layouts
from .distribute import WorkGroupKernel
from .layout import Geometry

__all__ = ["KERNEL_MODULE", "assign_layouts", "build_kernels"]


def assign_layouts(module: ir.Module, geometry: Geometry) -> None:
    """Write the layouts of every work-group loop's vector values on its ops."""
    for loop in host_function(module, "nvvm-layouts").loops:
        annotate_layouts(loop.regions[0].blocks[0], geometry.rows)


def build_kernels(module: ir.Module, geometry: Geometry, causal: bool, head_chunk: int = 0) -> Dict:
    """Replace the host function by a gpu.module of one distributed kernel per work-group loop;
    return the launch metadata (kernel names, grids, threads, shared memory, workspaces)."""

    def distribute(loop, outer, ip, ivs):
        work_group = WorkGroupKernel(loop, geometry, outer, ip)
        work_group.emit(ivs)
        return {"shared_bytes": work_group.shared_bytes}

    return outline_work_groups(module, "nvvm", geometry.threads, distribute, causal, head_chunk)
