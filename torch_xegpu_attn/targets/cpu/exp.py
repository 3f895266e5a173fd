"""CPU: math.exp and math.exp2 on f32 as polynomials that vectorize.

LLVM 22 lowers a vector math.exp to one libm call per lane; the flash loop
calls exp for every score, so that alone costs more than both matmuls.  This
rewrite emits the classic range reduction instead:

    n    = round(x / ln 2)
    r    = x - n ln 2                 (ln 2 split in two for precision: Cody-Waite)
    e^r  = 1 + r + r^2 P(r)           (degree-5 minimax P on |r| <= ln2/2,
                                       coefficients of Cephes' expf)
    e^x  = e^r * 2^n                  (2^n assembled in the exponent bits)

Relative error about 1 ulp.  Inputs are clamped to [-88, 88.7] first, so that
the exponent bits saturate: x <= -88 (including -inf, i.e. a masked score)
gives exactly 0, NaN stays NaN.

2^x (the flash loop works in base 2) reduces exactly instead: n = round(x),
r = x - n (exact), 2^r = e^(r ln 2) with the same polynomial (|r ln 2| <=
ln2/2); inputs clamped to [-127, 128].
"""

from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, math as mmath

from ...mlir_utils import walk

_LOG2E = 1.44269504088896341
_LN2 = 0.693147180559945309
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _splat(ty: ir.Type, value) -> ir.Value:
    if isinstance(ty, ir.VectorType):
        et = ty.element_type
        scalar = ir.IntegerAttr.get(et, value) if isinstance(et, ir.IntegerType) else ir.FloatAttr.get(et, value)
        return arith.constant(ty, ir.DenseElementsAttr.get_splat(ty, scalar))
    return arith.constant(ty, value)


def _int_type(ty: ir.Type) -> ir.Type:
    i32 = ir.IntegerType.get_signless(32)
    return ir.VectorType.get(ty.shape, i32) if isinstance(ty, ir.VectorType) else i32


def _exp_of_reduced(r: ir.Value) -> ir.Value:
    """e^r for |r| <= ln2 / 2: 1 + r + r^2 P(r)."""
    c = lambda v: _splat(r.type, v)
    p = c(_P[0])
    for coefficient in _P[1:]:
        p = mmath.fma(p, r, c(coefficient))
    return mmath.fma(p, arith.mulf(r, r), arith.addf(r, c(1.0)))


def _times_two_to(er: ir.Value, n: ir.Value) -> ir.Value:
    """er * 2^n for an integral float n, assembled in the exponent bits."""
    ty = er.type
    ity = _int_type(ty)
    c = lambda v: _splat(ty, v)
    ci = lambda v: _splat(ity, v)
    # fptosi of NaN is poison in LLVM: convert 0 instead (er is NaN already, so is the result).
    n = arith.select(arith.cmpf(arith.CmpFPredicate.UNO, n, n), c(0.0), n)
    biased = arith.addi(arith.fptosi(ity, n), ci(127))
    biased = arith.minsi(arith.maxsi(biased, ci(0)), ci(255))  # 0 -> +0.0, 255 -> inf
    two_n = arith.bitcast(ty, arith.shli(biased, ci(23)))
    return arith.mulf(er, two_n)


def emit_exp(x: ir.Value) -> ir.Value:
    """e^x for an f32 scalar or vector `x`, at the current insertion point."""
    c = lambda v: _splat(x.type, v)
    x = arith.minimumf(arith.maximumf(x, c(-88.0)), c(88.7))
    n = mmath.floor(mmath.fma(x, c(_LOG2E), c(0.5)))
    r = mmath.fma(n, c(-_LN2_HI), x)
    r = mmath.fma(n, c(-_LN2_LO), r)
    return _times_two_to(_exp_of_reduced(r), n)


def emit_exp2(x: ir.Value) -> ir.Value:
    """2^x for an f32 scalar or vector `x`, at the current insertion point."""
    c = lambda v: _splat(x.type, v)
    x = arith.minimumf(arith.maximumf(x, c(-127.0)), c(128.0))
    n = mmath.floor(arith.addf(x, c(0.5)))
    r = arith.subf(x, n)  # exact
    return _times_two_to(_exp_of_reduced(arith.mulf(r, c(_LN2))), n)


def _is_f32(ty: ir.Type) -> bool:
    et = ty.element_type if isinstance(ty, ir.VectorType) else ty
    return isinstance(et, ir.F32Type)


_EXPANSIONS = {"math.exp": emit_exp, "math.exp2": emit_exp2}


def expand_exp(module: ir.Module) -> int:
    """Replace every f32 math.exp and math.exp2 in `module`; returns how many."""
    targets = walk(module, lambda op: op.name in _EXPANSIONS and _is_f32(op.results[0].type))
    for op in targets:
        with ir.InsertionPoint(op), op.location:
            value = _EXPANSIONS[op.name](op.operands[0])
        op.results[0].replace_all_uses_with(value)
        op.erase()
    return len(targets)
