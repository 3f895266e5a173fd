"""Shared stage "bufferized": one-shot bufferization of the work-group IR.

The caller's buffers are read and written in place (the output tile of a
work-group becomes a transfer_write into a subview of the output, clipped at
L); tensors the flash stage created (the materialized K^T, the partials of
split keys) become function-level allocations, never allocations inside a
work-group.

The result is still work-group level: one scf.forall iteration per
work-group, vectors shaped like whole tiles.  Targets distribute from here.
"""

from __future__ import annotations

from mlir import ir
from mlir.dialects import transform
from mlir.dialects.bufferization import LayoutMapOption
from mlir.dialects.transform import bufferization as tbufferization

from ..mlir_utils import CompileError, TransformScript, any_op, apply_cleanup, is_inside, walk
from ..spec import AttentionSpec
from .options import ScheduleOptions


def bufferize(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    with TransformScript() as script:
        root = script.root
        root = transform.ApplyRegisteredPassOp(any_op(), root, "eliminate-empty-tensors").result
        root = tbufferization.OneShotBufferizeOp(
            root, allow_return_allocs_from_loops=True, bufferize_function_boundaries=True,
            function_boundary_type_conversion=LayoutMapOption.IdentityLayoutMap).result
        root = transform.ApplyRegisteredPassOp(any_op(), root, "fold-memref-alias-ops").result
        apply_cleanup(root)
    script.apply(module)
    _check_no_allocation_in_work_groups(module)
    return module


def _check_no_allocation_in_work_groups(module: ir.Module) -> None:
    loops = walk(module, lambda op: op.name == "scf.forall")
    allocs = walk(module, lambda op: op.name in ("memref.alloc", "memref.alloca")
                  and any(is_inside(op, loop) for loop in loops))
    if allocs:
        raise CompileError(f"bufferized: {len(allocs)} allocation(s) inside a work-group loop "
                           f"(a tensor the schedule did not place in the caller's buffers)")
