"""float32 attention on DPAS: each f32 operand of a matmul as the sum of three bf16 parts.

DPAS has no f32 inputs.  A float32 x is split exactly into bf16 parts
(round to nearest each time, the residuals computed in f32 without error):

    hi = bf16(x),  mid = bf16(x - hi),  lo = bf16(x - hi - mid)

hi + mid + lo holds x to about 2^-27 of |x| (8 significant bits per part;
the residual of each rounding is exact in f32).  A product x * y becomes six
bf16 DPAS products accumulated in f32:

    lo*hi' + hi*lo' + mid*mid' + mid*hi' + hi*mid' + hi*hi'

(the terms dropped, mid*lo', lo*mid' and lo*lo', are below 2^-26 of |x y|):
the products are as accurate as f32 multiplications, where one tf32 DPAS
(10-bit mantissas) would lose about 3 decimal digits.  This is the split
cutlass and PyTorch use for f32 on tensor cores ("3xTF32", two tf32 parts
and three products) done with bf16 parts: the same number of DPAS
instructions per product (6 bf16 k16 against 3 tf32 k8), and bf16 DPAS is
what upstream's XeGPU pipeline distributes (its layout propagation gives a
tf32 A operand lanes [1, 16], which cannot hold the 8 x 8 tf32 A tile of
Intel's tf32 DPAS: "'xegpu.convert_layout' op invalid target layout, data
cannot be evenly distributed").

Runs at the work-group level in upstream MLIR (stage xegpu-wg), after
convert-vector-to-xegpu made each contraction an f32 xegpu.dpas and after
the anchors were tagged: the six DPAS of a product carry the original's role,
so the layout script sets the same layouts on all of them, and the split
ops (truncf, extf, subf) get theirs from layout propagation.  The backward's
five contractions (S, dP, dV, dK, dQ; P and dS kept in f32) are split the
same way.
"""

from __future__ import annotations

from typing import List

from ...errors import CompileError

#: (A part, B part) of each DPAS of one f32 product (0 = hi, 1 = mid, 2 = lo), smallest terms
#: first.  (Grouping them by the B part instead, its lo part first, halved ocloc's spill at head
#: dim 128 but spilled 1 KB at 64, where this order spills none.)
TERMS = ((2, 0), (0, 2), (1, 1), (1, 0), (0, 1), (0, 0))


def _parts(value) -> List:
    """[hi, mid, lo]: bf16 vectors whose sum is the f32 vector `value` (to 2^-27 relatively)."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith
    shape = ir.VectorType(value.type).shape
    bf16 = ir.VectorType.get(shape, ir.BF16Type.get())
    f32 = value.type
    parts, rest = [], value
    for i in range(3):
        part = arith.truncf(bf16, rest)
        parts.append(part)
        if i < 2:
            rest = arith.subf(rest, arith.extf(f32, part))  # exact: rest and part share their top bits
    return parts


def split_f32_dpas(kernel) -> int:
    """Replace every xegpu.dpas of f32 operands in `kernel` by six bf16 DPAS chained on its
    accumulator; return how many were split."""
    from torch_mlir import ir
    from .layouts import _walk
    split = 0
    for dpas in _walk(kernel, "xegpu.dpas"):
        lhs, rhs = dpas.operands[0], dpas.operands[1]
        if not isinstance(ir.VectorType(lhs.type).element_type, ir.F32Type):
            continue
        if len(dpas.operands) != 3:
            raise CompileError("xegpu: an f32 dpas without an accumulator operand")
        with ir.InsertionPoint(dpas), dpas.location:
            a, b = _parts(lhs), _parts(rhs)
            acc = dpas.operands[2]
            for i, j in TERMS:
                term = dpas.clone()
                term.operands[0] = a[i]
                term.operands[1] = b[j]
                term.operands[2] = acc
                acc = term.results[0]
        dpas.results[0].replace_all_uses_with(acc)
        dpas.erase()
        split += 1
    return split
