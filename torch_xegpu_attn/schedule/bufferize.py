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

from typing import List, NamedTuple

from mlir import ir
from mlir.dialects import transform
from mlir.dialects.bufferization import LayoutMapOption
from mlir.dialects.transform import bufferization as tbufferization

from ..mlir_utils import CompileError, TransformScript, any_op, apply_cleanup, is_inside, walk
from ..payload import FUNC_NAME
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


#: top-level ops that write memory: none may stand outside the work-group loops
_WRITES = ("vector.transfer_write", "vector.store", "memref.store", "memref.copy", "vector.maskedstore")


class HostFunction(NamedTuple):
    """The bufferized function as a target reads it: its op, arguments, the function-level
    workspace allocations and the work-group loops (in order)."""
    op: ir.Operation
    args: List[ir.Value]
    allocs: List[ir.Operation]
    loops: List[ir.Operation]


def is_value_op(op: ir.Operation) -> bool:
    """A top-level op that only computes or reads a value (constants, sizes of the arguments,
    loop bounds): a kernel that uses it gets its own copy."""
    return (len(op.results) > 0 and not op.regions and op.name not in _WRITES
            and op.name != "memref.alloc")


def host_function(module: ir.Module, where: str) -> HostFunction:
    """Split the bufferized attention function; anything at its top level but allocations,
    work-group loops and value ops is an error (`where` names the target stage)."""
    func = next((op.operation for op in module.body.operations
                 if op.operation.name == "func.func"
                 and ir.StringAttr(op.operation.attributes["sym_name"]).value == FUNC_NAME), None)
    if func is None:
        raise CompileError(f"{where}: no function @{FUNC_NAME}")
    body = func.regions[0].blocks[0]
    top_level = [op.operation for op in body.operations]
    for op in top_level:
        if op.name not in ("memref.alloc", "scf.forall", "func.return") and not is_value_op(op):
            raise CompileError(f"{where}: {op.name} outside the work-group loops")
    loops = [op for op in top_level if op.name == "scf.forall"]
    if not loops:
        raise CompileError(f"{where}: the kernel has no work-group loop")
    return HostFunction(func, list(body.arguments), [op for op in top_level if op.name == "memref.alloc"], loops)
