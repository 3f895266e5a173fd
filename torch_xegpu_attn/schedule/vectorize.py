"""Shared stages "vectorized" and "bufferized".

vectorized  every linalg op becomes vector ops on its static tile shape
            (contractions become vector.contract, reductions
            vector.multi_reduction); the flash loops then carry vectors instead
            of tensors (hoisting their read/write pairs) and loop-invariant reads
            (the work-group's Q tile) leave the loops.
bufferized  one-shot bufferization; the caller's buffers are written in place,
            the materialized K^T (if any) becomes a function-level allocation.

The result is still work-group level: one scf.forall iteration per
work-group, vectors shaped like whole tiles.  Targets distribute from here.
"""

from __future__ import annotations

from mlir import ir
from mlir.dialects import transform
from mlir.dialects.bufferization import LayoutMapOption
from mlir.dialects.transform import bufferization as tbufferization
from mlir.dialects.transform import loop as tloop
from mlir.dialects.transform import structured
from mlir.dialects.transform import vector as tvector

from mlir.dialects import vector

from ..mlir_utils import TransformScript, any_op, apply_cleanup, defining_op, match_ops, walk
from ..spec import AttentionSpec
from .options import ScheduleOptions

LINALG_OPS = ("linalg.generic", "linalg.contract", "linalg.fill", "linalg.transpose")


def vectorize(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    _vectorize_linalg(module)
    _hoist_loop_carried_vectors(module)
    if _fold_scalar_round_trips(module):
        _cleanup(module)  # the folded writes are dead now
    return module


def _cleanup(module: ir.Module) -> None:
    with TransformScript() as script:
        apply_cleanup(match_ops(script.root, ["func.func"]))
    script.apply(module)


def _fold_scalar_round_trips(module: ir.Module) -> int:
    """tensor.extract %t[] of %t = vector.transfer_write %v, %d[] -> the scalar in %v.

    With one-row work-groups the row statistics are 0-d: the vectorizer writes
    each into a tensor<f32> and extracts it back.  Upstream does not fold the
    round trip, and bufferization then gives every such write a heap buffer.
    """
    extracts = walk(module, lambda op: op.name == "tensor.extract" and len(op.operands) == 1)
    folded = 0
    for extract in extracts:
        write = defining_op(extract.operands[0])
        if write is None or write.name != "vector.transfer_write" or len(write.operands) != 2:
            continue
        value = write.operands[0]
        source = defining_op(value)
        with ir.InsertionPoint(extract), extract.location:
            if source is not None and source.name == "vector.broadcast" and \
                    not isinstance(source.operands[0].type, ir.VectorType):
                scalar = source.operands[0]
            else:
                scalar = vector.extract(value, [], [])
        extract.results[0].replace_all_uses_with(scalar)
        extract.erase()
        folded += 1
    return folded


def _vectorize_linalg(module: ir.Module) -> None:
    with TransformScript() as script:
        root = script.root
        func = match_ops(root, ["func.func"])
        # Unit dims (the work-group's b, h, g; a one-key tail; one-row problems)
        # are folded away on linalg ops, so that every contraction vectorizes
        # into a plain vector.contract instead of a broadcast-and-reduce form.
        structured.GeneralizeOp(match_ops(root, LINALG_OPS))
        with ir.InsertionPoint(transform.ApplyPatternsOp(func).patterns):
            structured.ApplyFoldUnitExtentDimsViaSlicesPatternsOp()
            transform.ApplyCanonicalizationPatternsOp()
        # Only linalg ops: tensor.insert_slice (from the row split) must stay a
        # slice so that bufferization makes it a no-op.
        structured.VectorizeOp(match_ops(root, ["linalg.generic"]))
        with ir.InsertionPoint(transform.ApplyPatternsOp(func).patterns):
            tvector.ApplyVectorReductionToContractPatternsOp()
            tvector.ApplyFoldArithExtensionPatternsOp()
            tvector.ApplyTransferPermutationPatternsOp()
            transform.ApplyCanonicalizationPatternsOp()
        apply_cleanup(func)
    script.apply(module)


def _hoist_loop_carried_vectors(module: ir.Module) -> None:
    """Flash loops carry m, l and the accumulator as vectors; loop-invariant reads (Q) leave."""
    with TransformScript() as script:
        root = script.root
        func = match_ops(root, ["func.func"])
        each = transform.ForeachOp([], [match_ops(root, ["scf.for"])])
        with ir.InsertionPoint(each.body):
            loop = each.bodyTargets[0]
            tloop.HoistLoopInvariantSubsetsOp(loop)
            transform.ApplyLoopInvariantCodeMotionOp(loop)
            transform.YieldOp([])
        apply_cleanup(func)
    script.apply(module)
    return module


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
    return module
