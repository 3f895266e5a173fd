"""NVVM stages "nvvm-layouts" (each work-group loop's vector values get their layouts, written on
the ops: analysis.py) and "nvvm-kernels" (each work-group loop of the shared IR becomes a gpu.func,
targets/outline.py, whose body `distribute.WorkGroupKernel` distributes to warps and lanes by
those layouts)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from mlir import ir

from ...mlir_utils import ops_named
from ...schedule.bufferize import host_function
from ...schedule.tiling import WORK_GROUP_ROWS
from ..outline import KERNEL_MODULE, outline_work_groups
from .analysis import annotate_layouts
from .distribute import WorkGroupKernel
from .layout import Geometry

__all__ = ["KERNEL_MODULE", "assign_layouts", "build_kernels"]

#: the thread block a work-group loop is distributed over, as the layouts dump shows it.
GEOMETRY_ATTR = "attn.geometry"
#: a work-group's Geometry from the rows of its tiles (None: the spec's row tile).
GeometryOf = Callable[[Optional[int]], Geometry]


def work_group_rows(loop: ir.Operation) -> Optional[int]:
    """The rows of a work-group loop's tiles where the schedule says they are not the row tile's
    (a backward's dK/dV loop: its keys), else None."""
    if WORK_GROUP_ROWS not in loop.attributes:
        return None
    return ir.IntegerAttr(loop.attributes[WORK_GROUP_ROWS]).value


def assign_layouts(module: ir.Module, geometry_of: GeometryOf) -> None:
    """Write the layouts of every work-group loop's vector values on its ops, and the thread block
    the loop gets on the loop."""
    for loop in host_function(module, "nvvm-layouts").loops:
        geometry = geometry_of(work_group_rows(loop))
        loop.attributes[GEOMETRY_ATTR] = ir.StringAttr.get(
            f"rows={geometry.rows} warps={geometry.warps} m_tiles={geometry.m_tiles}")
        annotate_layouts(loop.regions[0].blocks[0], geometry.rows)


def build_kernels(module: ir.Module, geometry_of: GeometryOf, causal: bool, head_chunk: int = 0,
                  min_blocks: int = 0) -> Dict:
    """Replace the host function by a gpu.module of one distributed kernel per work-group loop;
    return the launch metadata (kernel names, grids, threads, shared memory, workspaces).
    `min_blocks` > 0: each kernel whose loop holds a contraction asks for that many resident
    work-groups an SM (nvvm.minctasm, PTX .minnctapersm); a kernel without one is bound by
    memory, and ptxas' own register count keeps the most of its work-groups resident."""
    contracting = []

    def distribute(loop, outer, ip, ivs):
        if min_blocks and ops_named(loop, "vector.contract"):
            contracting.append(_enclosing_kernel(ip.block.owner))
        work_group = WorkGroupKernel(loop, geometry_of(work_group_rows(loop)), outer, ip)
        work_group.emit(ivs)
        return {"shared_bytes": work_group.shared_bytes}

    def threads(loop) -> int:
        return geometry_of(work_group_rows(loop)).threads

    metadata = outline_work_groups(module, "nvvm", threads, distribute, causal, head_chunk)
    for kernel in contracting:
        kernel.attributes["nvvm.minctasm"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), min_blocks)
    return metadata


def _enclosing_kernel(op: ir.Operation) -> ir.Operation:
    """The gpu.func that holds `op`."""
    op = op.operation
    while op.name != "gpu.func":
        op = op.parent.operation
    return op
