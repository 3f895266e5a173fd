"""CPU: math.exp and math.exp2 on f32 and f64 as polynomials that vectorize.

LLVM 22 lowers a vector math.exp to one libm call per lane; the flash loop
calls exp for every score, so that alone costs more than both matmuls.  This
rewrite emits the classic range reduction instead:

    n    = round(x / ln 2)
    r    = x - n ln 2                 (ln 2 split in two for precision: Cody-Waite)
    e^r  = 1 + r + r^2 P(r)           (polynomial P on |r| <= ln2/2)
    e^x  = e^r * 2^n                  (2^n assembled in the exponent bits)

f32: P of degree 5, minimax (coefficients of Cephes' expf), relative error
about 1 ulp.  f64: P the Taylor polynomial of (e^r - 1 - r) / r^2 up to r^11
(terms up to r^13 / 13!): the first term left out, r^14 / 14!, is below
5e-18 on |r| <= ln2/2, far under f64's half ulp (1.1e-16), so the error is
that of the Horner evaluation, about 1 ulp; ln 2 is split as in Cephes' exp.

Inputs are clamped first, so that n stays in [-bias, bias + 1]: x at or below
the lower bound (including -inf, i.e. a masked score) gives exactly 0 (results
that would be denormal flush to 0), NaN stays NaN.  f32: [-88, 88.7]; f64:
[-709.08, 709.78].  n is rounded by adding 1.5 * 2^mantissa_bits, which leaves
n in the low bits of the sum: the exponent bits of 2^n are those bits plus the
bias, shifted; no float-to-int conversion (poison for NaN in LLVM), no
clamping of integers.  At the top, 2^n is assembled only for n <= bias: a result
above 2^(bias + 0.5) (x above 127.5 in base 2 for f32, 1023.5 for f64) is inf,
although the format reaches a little further; the flash loop only
exponentiates scores minus their running maximum (<= 0).

2^x (the flash loop works in base 2) reduces exactly instead: n = round(x),
r = x - n (exact); f32 takes 2^r from a degree-6 polynomial in r (least squares
of the relative error on |r| <= 1/2, Horner in f32: 0.66 ulp at most, checked
in f64 on 200001 points), f64 as e^(r ln2) with the exp polynomial; inputs
clamped to [-127, 128] (f32), [-1023, 1024] (f64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from mlir import ir
from mlir.dialects import arith, math as mmath

from ...mlir_utils import walk

_LOG2E = 1.44269504088896341
_LN2 = 0.693147180559945309


@dataclass(frozen=True)
class _Format:
    """What the expansion needs to know of a float format."""

    int_bits: int          # width of the same-size integer
    bias: int              # exponent bias
    mantissa_bits: int     # the exponent field starts here
    ln2_hi: float          # ln 2 = ln2_hi + ln2_lo, ln2_hi with trailing zero bits (n * ln2_hi is exact)
    ln2_lo: float
    p: Tuple[float, ...]   # P's coefficients, highest degree first
    exp_range: Tuple[float, float]
    exp2_range: Tuple[float, float]
    p2: Tuple[float, ...] = ()  # 2^r on |r| <= 1/2 directly, highest degree first (() -> e^(r ln 2))


_F32 = _Format(int_bits=32, bias=127, mantissa_bits=23, ln2_hi=0.693359375, ln2_lo=-2.12194440e-4,
               p=(1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1),
               exp_range=(-88.0, 88.7), exp2_range=(-127.0, 128.0),
               p2=(1.5370704932138324e-4, 1.3399848248809576e-3, 9.618373587727547e-3, 5.550329014658928e-2,
                   2.4022647738456726e-1, 6.931471824645996e-1, 1.0))
_F64 = _Format(int_bits=64, bias=1023, mantissa_bits=52, ln2_hi=6.93145751953125e-1,
               ln2_lo=1.42860682030941723212e-6,
               p=tuple(1.0 / math.factorial(k) for k in range(13, 1, -1)),
               exp_range=(-709.08, 709.78), exp2_range=(-1023.0, 1024.0))


def _element(ty: ir.Type) -> ir.Type:
    return ty.element_type if isinstance(ty, ir.VectorType) else ty


def _format(ty: ir.Type) -> _Format:
    et = _element(ty)
    if isinstance(et, ir.F32Type):
        return _F32
    if isinstance(et, ir.F64Type):
        return _F64
    raise ValueError(f"exp expansion: no polynomial for {et}")


def _splat(ty: ir.Type, value) -> ir.Value:
    if isinstance(ty, ir.VectorType):
        et = ty.element_type
        scalar = ir.IntegerAttr.get(et, value) if isinstance(et, ir.IntegerType) else ir.FloatAttr.get(et, value)
        return arith.constant(ty, ir.DenseElementsAttr.get_splat(ty, scalar))
    return arith.constant(ty, value)


def _int_type(ty: ir.Type) -> ir.Type:
    it = ir.IntegerType.get_signless(_format(ty).int_bits)
    return ir.VectorType.get(ty.shape, it) if isinstance(ty, ir.VectorType) else it


def _exp_of_reduced(r: ir.Value) -> ir.Value:
    """e^r for |r| <= ln2 / 2: 1 + r + r^2 P(r)."""
    c = lambda v: _splat(r.type, v)
    coefficients = _format(r.type).p
    p = c(coefficients[0])
    for coefficient in coefficients[1:]:
        p = mmath.fma(p, r, c(coefficient))
    return mmath.fma(p, arith.mulf(r, r), arith.addf(r, c(1.0)))


def _clamp(x: ir.Value, low: float, high: float) -> ir.Value:
    """x limited to [low, high]; NaN stays NaN."""
    c = lambda v: _splat(x.type, v)
    return arith.minimumf(arith.maximumf(x, c(low)), c(high))


def _rounded(x: ir.Value) -> Tuple[ir.Value, ir.Value]:
    """(t, n): t = x + 1.5 * 2^mantissa_bits, whose low bits hold n = round(x) as an integer
    (round to nearest even; |x| < 2^(mantissa_bits - 1)), and n as a float (t - the same
    constant, exact).  No float-to-int conversion, which LLVM makes poison for NaN."""
    fmt = _format(x.type)
    magic = _splat(x.type, 1.5 * 2.0 ** fmt.mantissa_bits)
    t = arith.addf(x, magic)
    return t, arith.subf(t, magic)


def _times_two_to(er: ir.Value, t: ir.Value) -> ir.Value:
    """er * 2^n, 2^n assembled in the exponent bits from t of `_rounded` (n in [-bias, bias + 1]:
    -bias gives +0.0, bias + 1 inf).  The shift keeps the low bits of t's integer, where the
    constant added has zeros: n + bias exactly."""
    fmt = _format(er.type)
    ity = _int_type(er.type)
    biased = arith.addi(arith.bitcast(ity, t), _splat(ity, fmt.bias))
    two_n = arith.bitcast(er.type, arith.shli(biased, _splat(ity, fmt.mantissa_bits)))
    return arith.mulf(er, two_n)


def emit_exp(x: ir.Value) -> ir.Value:
    """e^x for an f32 or f64 scalar or vector `x`, at the current insertion point."""
    fmt = _format(x.type)
    c = lambda v: _splat(x.type, v)
    x = _clamp(x, *fmt.exp_range)
    t, n = _rounded(arith.mulf(x, c(_LOG2E)))
    r = mmath.fma(n, c(-fmt.ln2_hi), x)
    r = mmath.fma(n, c(-fmt.ln2_lo), r)
    return _times_two_to(_exp_of_reduced(r), t)


def emit_exp2(x: ir.Value) -> ir.Value:
    """2^x for an f32 or f64 scalar or vector `x`, at the current insertion point."""
    fmt = _format(x.type)
    c = lambda v: _splat(x.type, v)
    x = _clamp(x, *fmt.exp2_range)
    t, n = _rounded(x)
    r = arith.subf(x, n)  # exact
    if not fmt.p2:
        return _times_two_to(_exp_of_reduced(arith.mulf(r, c(_LN2))), t)
    two_r = c(fmt.p2[0])
    for coefficient in fmt.p2[1:]:
        two_r = mmath.fma(two_r, r, c(coefficient))
    return _times_two_to(two_r, t)


def _expandable(ty: ir.Type) -> bool:
    return isinstance(_element(ty), (ir.F32Type, ir.F64Type))


_EXPANSIONS = {"math.exp": emit_exp, "math.exp2": emit_exp2}


def expand_exp(module: ir.Module) -> int:
    """Replace every f32 and f64 math.exp and math.exp2 in `module`; returns how many."""
    targets = walk(module, lambda op: op.name in _EXPANSIONS and _expandable(op.results[0].type))
    for op in targets:
        with ir.InsertionPoint(op), op.location:
            value = _EXPANSIONS[op.name](op.operands[0])
        op.results[0].replace_all_uses_with(value)
        op.erase()
    return len(targets)
