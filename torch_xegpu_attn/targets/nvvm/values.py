"""What the distribution reads off the shared IR's values and ops: element types and sizes,
users, the dims and bounds of transfer ops, constants and trip counts."""

from __future__ import annotations

from typing import List, Optional, Tuple

from mlir import ir
from mlir.dialects import arith, memref

from ...mlir_utils import CompileError, const_index, defining_op

from .analysis import vector_shape
from .ptx import i32_type


def _element(value: ir.Value) -> ir.Type:
    t = value.type
    return ir.VectorType(t).element_type if isinstance(t, ir.VectorType) else t


def _scalar_type(element: ir.Type) -> ir.Type:
    return i32_type() if isinstance(element, ir.IndexType) else element


def _bytes(element: ir.Type) -> int:
    return ir.FloatType(element).width // 8 if isinstance(element, ir.FloatType) else 4


def _users(value: ir.Value) -> List[ir.Operation]:
    return [u.owner.operation if hasattr(u.owner, "operation") else u.owner for u in value.uses]


def _permutation_dims(op: ir.Operation) -> List[int]:
    """The memref dim of each vector dim of a transfer op (a projected permutation map)."""
    amap = ir.AffineMapAttr(op.attributes["permutation_map"]).value
    dims = []
    for expr in amap.results:
        expr = expr.maybe_downcast()
        if not isinstance(expr, ir.AffineDimExpr):
            raise CompileError("nvvm: transfer ops with broadcast dims are not distributed")
        dims.append(expr.position)
    return dims


def _in_bounds(op: ir.Operation) -> List[bool]:
    return [ir.BoolAttr(b).value for b in ir.ArrayAttr(op.attributes["in_bounds"])] \
        if "in_bounds" in op.attributes else [False] * len(vector_shape(op.results[0] if op.results
                                                                       else op.operands[0]))


def _constant_int(value: ir.Value) -> Optional[int]:
    op = defining_op(value)
    if op is None or op.name != "arith.constant":
        return None
    return ir.IntegerAttr(op.attributes["value"]).value


def _is_zero(value: ir.Value) -> bool:
    """A splat constant 0 (the accumulator of S = Q K^T)."""
    op = defining_op(value)
    if op is None or op.name != "arith.constant":
        return False
    attr = op.attributes["value"]
    return isinstance(attr, ir.DenseElementsAttr) and attr.is_splat and \
        ir.FloatAttr(attr.get_splat_value()).value == 0.0


def _static_trip_count(view) -> Optional[int]:
    bounds = [_constant_int(v) for v in (view.lowerBound, view.upperBound, view.step)]
    if None in bounds or bounds[2] <= 0:
        return None
    lower, upper, step = bounds
    return max(0, -(-(upper - lower) // step))


def clamped(base: ir.Value, mdim: int, position: ir.Value, inside: Optional[ir.Value]) -> Tuple[ir.Value, ir.Value]:
    """An index along memref dim `mdim` of `base` that may run past its extent: the index clamped
    to the last element (an address that is safe to form) and `inside` and-ed with whether it was
    within the extent (None: no condition yet)."""
    extent = memref.dim(base, const_index(mdim))
    ok = arith.cmpi(arith.CmpIPredicate.ult, position, extent)
    inside = ok if inside is None else arith.andi(inside, ok)
    return arith.minui(position, arith.subi(extent, const_index(1))), inside
