"""CPU stage piece: vector.contract -> broadcast-FMA micro-kernel (the CPU's "layout").

A work-group contraction C[M, N] += A[M, K] . B[K, N] (A: the Q tile or the
probabilities, B: a K^T or V tile) is lowered to

    for k in [0, K):                       scf.for, not unrolled in MLIR
        b = B[k, n0 : n0 + NB]             one row, contiguous: NB/16 zmm loads
        for m in [0, M):                   unrolled
            C[m, n0 : n0 + NB] += broadcast(A[m, k]) * b

with the C rows as loop-carried vectors (M * NB/16 registers) and A[m, k]
broadcast straight from memory.  This is the register blocking that the
generic outer-product lowering lacks: it keeps A transposed in registers and
spills.  A operand that is not already in memory (the probabilities, computed
in registers) is first stored to a stack buffer; an operand read from memory
is re-read in place (the transfer_read it came from is left to DCE).

N is processed in chunks of `n_block` columns so that M * n_block / 16 stays
within the register file; the target picks M (the row tile) and n_block.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from mlir import ir
from mlir.dialects import arith, memref, scf, vector

from ...mlir_utils import const_index, defining_op, walk


def _dims_are_matmul(contract) -> bool:
    """True for C[m, n] += A[m, k] B[k, n] with a single reduction dim k."""
    maps = [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(contract.attributes["indexing_maps"])]
    kinds = [str(a) for a in ir.ArrayAttr(contract.attributes["iterator_types"])]
    if any(len(m.results) != 2 for m in maps):
        return False
    lhs, rhs, acc = ([ir.AffineDimExpr(e).position for e in m.results] for m in maps)
    reductions = [i for i, kind in enumerate(kinds) if "reduction" in kind]
    if len(reductions) != 1:
        return False
    k = reductions[0]
    m, n = acc
    return lhs == [m, k] and rhs == [k, n]


def _memory_source(value: ir.Value) -> Optional[Tuple[ir.Value, List[ir.Value]]]:
    """(memref, indices of element [0, 0]) when `value` is an in-bounds 2-D read of memory.

    An arith.extf on top is looked through: the micro-kernel extends per element.
    """
    op = defining_op(value)
    if op is not None and op.name == "arith.extf":
        value = op.operands[0]
        op = defining_op(value)
    if op is None or op.name != "vector.transfer_read":
        return None
    read = op.opview
    rank = ir.MemRefType(read.base.type).rank
    minor_identity = ir.AffineMap.get_minor_identity(rank, 2)
    if ir.AffineMapAttr(read.permutation_map).value != minor_identity or read.mask is not None:
        return None
    if not all(ir.BoolAttr(b).value for b in ir.ArrayAttr(read.in_bounds)):
        return None
    return read.base, list(read.indices)


def _function_entry(op: ir.Operation) -> ir.Block:
    while op.parent is not None and op.parent.name != "func.func":
        op = op.parent.operation
    return op.parent.regions[0].blocks[0]


def _spill_to_stack(value: ir.Value, anchor: ir.Operation):
    """Store a 2-D vector row by row into a stack buffer allocated at function entry."""
    vt = ir.VectorType(value.type)
    with ir.InsertionPoint.at_block_begin(_function_entry(anchor)):
        buffer = memref.alloca(ir.MemRefType.get(vt.shape, vt.element_type), [], [], alignment=64)
    for r in range(vt.shape[0]):
        vector.store(vector.extract(value, [], [r]), buffer, [const_index(r), const_index(0)])
    return buffer, [const_index(0), const_index(0)]


def _offset(indices: List[ir.Value], row, col) -> List[ir.Value]:
    return indices[:-2] + [arith.addi(indices[-2], row), arith.addi(indices[-1], col)]


def lower_contraction(contract, n_block: int) -> bool:
    """Lower one vector.contract in place; False (untouched) when it is not a plain matmul."""
    if not _dims_are_matmul(contract):
        return False
    lhs, rhs, acc = contract.operands[0], contract.operands[1], contract.operands[2]
    m_size, k_size = ir.VectorType(lhs.type).shape
    n_size = ir.VectorType(rhs.type).shape[1]
    acc_type = ir.VectorType(acc.type).element_type
    with ir.InsertionPoint(contract), contract.location:
        a_mem, a_idx = _memory_source(lhs) or _spill_to_stack(lhs, contract)
        b_mem, b_idx = _memory_source(rhs) or _spill_to_stack(rhs, contract)
        a_type = ir.MemRefType(a_mem.type).element_type
        b_type = ir.MemRefType(b_mem.type).element_type
        rows = [vector.extract(acc, [], [m]) for m in range(m_size)]
        result_rows = list(rows)
        for n0 in range(0, n_size, n_block):
            width = min(n_block, n_size - n0)
            chunk_type = ir.VectorType.get([width], acc_type)
            whole = width == n_size
            chunk = [rows[m] if whole else vector.extract_strided_slice(chunk_type, rows[m], [n0], [width], [1])
                     for m in range(m_size)]
            loop = scf.ForOp(const_index(0), const_index(k_size), const_index(1), chunk)
            with ir.InsertionPoint(loop.body):
                k = loop.induction_variable
                b = vector.load(ir.VectorType.get([width], b_type), b_mem, _offset(b_idx, k, const_index(n0)))
                if b_type != acc_type:
                    b = arith.extf(chunk_type, b)
                updated = []
                for m in range(m_size):
                    a = memref.load(a_mem, _offset(a_idx, const_index(m), k))
                    if a_type != acc_type:
                        a = arith.extf(acc_type, a)
                    updated.append(vector.fma(vector.broadcast(chunk_type, a), b, loop.inner_iter_args[m]))
                scf.YieldOp(updated)
            for m in range(m_size):
                part = loop.results[m]
                result_rows[m] = part if whole else vector.insert_strided_slice(part, result_rows[m], [n0], [1])
        result = acc
        for m in range(m_size):
            result = vector.insert(result_rows[m], result, [], [m])
    contract.results[0].replace_all_uses_with(result)
    contract.erase()
    return True


def _widen_operands(contract) -> None:
    """Give a contraction left to the default lowering operands of its accumulator's type
    (that lowering does not handle f16/bf16 operands with an f32 accumulator)."""
    acc_type = contract.results[0].type
    acc_element = acc_type.element_type if isinstance(acc_type, ir.VectorType) else acc_type
    for i in (0, 1):
        operand = contract.operands[i]
        vt = ir.VectorType(operand.type)
        if vt.element_type != acc_element:
            with ir.InsertionPoint(contract), contract.location:
                contract.operands[i] = arith.extf(ir.VectorType.get(vt.shape, acc_element), operand)


def lower_contractions(module: ir.Module, n_block: int) -> Tuple[int, int]:
    """Lower every plain-matmul vector.contract; returns (lowered, left to the default lowering).

    The ones left (matrix-vector and dot products of one-row or one-key tiles)
    get operands of the accumulator type for the default lowering.
    """
    contracts = walk(module, lambda op: op.name == "vector.contract")
    left = [c for c in contracts if not lower_contraction(c, n_block)]
    for contract in left:
        _widen_operands(contract)
    return len(contracts) - len(left), len(left)
