"""cpu target stages cpu-vector and cpu-llvm (they import MLIR; the target's module does not)."""

from __future__ import annotations

from mlir import ir, passmanager
from mlir.dialects import memref, scf

from ...mlir_utils import CompileError, const_index, ops_named
from ...schedule.options import ScheduleOptions
from ...spec import AttentionSpec
from . import N_BLOCK, N_BLOCK_F64, exp, microkernel

LLVM_PIPELINE = ",".join([
    "canonicalize", "cse",
    "lower-affine",
    "func.func(lower-vector-multi-reduction{lowering-strategy=inner-reduction})",
    "func.func(convert-vector-to-scf{full-unroll=true})",
    "convert-vector-to-llvm{vector-contract-lowering=outerproduct "
    "vector-transpose-lowering=shuffle1d reassociate-fp-reductions=true}",
    "lower-affine",
    "func.func(arith-expand{include-bf16=true})",
    "convert-math-to-llvm",
    "expand-strided-metadata", "lower-affine",
    "finalize-memref-to-llvm",
    "convert-scf-to-cf", "convert-arith-to-llvm", "convert-ub-to-llvm", "convert-func-to-llvm",
    "convert-cf-to-llvm", "convert-index-to-llvm", "reconcile-unrealized-casts",
])


def lower_vector_ops(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    """Stage cpu-vector: register-blocked contractions and a vectorizable exp."""
    microkernel.lower_contractions(module, N_BLOCK_F64 if spec.dtype == "float64" else N_BLOCK)
    exp.expand_exp(module)
    return module


def _copy_loops(source, target, shape, indices) -> None:
    if len(indices) == len(shape):
        memref.store(memref.load(source, indices), target, indices)
        return
    d = len(indices)
    size = memref.dim(source, const_index(d)) if shape[d] == ir.ShapedType.get_dynamic_size() else const_index(shape[d])
    loop = scf.ForOp(const_index(0), size, const_index(1))
    with ir.InsertionPoint(loop.body):
        _copy_loops(source, target, shape, indices + [loop.induction_variable])
        scf.YieldOp([])


def copies_to_loops(module: ir.Module) -> int:
    """memref.copy -> scf loops of loads and stores.

    A strided copy (the transpose of a one-key-wide tile when no tile width
    divides S) would otherwise become a call into MLIR's runtime library; the
    kernel libraries stay self-contained.
    """
    copies = ops_named(module, "memref.copy")
    for copy in copies:
        with ir.InsertionPoint(copy), copy.location:
            _copy_loops(copy.operands[0], copy.operands[1], ir.MemRefType(copy.operands[0].type).shape, [])
        copy.erase()
    return len(copies)


def lower_to_llvm(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    """Stage cpu-llvm: the standard conversions down to the LLVM dialect."""
    left = ops_named(module, "memref.alloc")
    if left:
        raise CompileError(f"cpu-llvm: {len(left)} heap allocation(s) left inside grids")
    copies_to_loops(module)
    passmanager.PassManager.parse(f"builtin.module({LLVM_PIPELINE})").run(module.operation)
    return module


