"""The payload: standard (unfused) attention for one spec, as linalg on tensors.

    scores = Q . K^T                      linalg.transpose + linalg.contract, accumulated in A
    scores = scores * scale               linalg.generic
    scores = scores + mask  | causal      linalg.generic (bool mask: select -inf where False)
    P      = softmax(scores, dim = s)     linalg.softmax
    out    = P . V                        linalg.contract, accumulated in A (then truncf)

A, the accumulator type, is f64 for float64 inputs and f32 for the others
(mlir_utils.accumulator_type).

Every op carries an ``attn.tag``; the op that produces the result also carries
``attn.root``.  The function takes the caller's buffers directly:
``attention(q, k, v, [mask], out)`` with q/k/v/mask as memrefs with dynamic
outer strides (see `strided_memref`) and out as a contiguous memref.  The
batch B, the key/value heads H and the lengths L and S are dynamic sizes of
those memrefs: one payload serves every length.

The payload states SDPA's mathematics; two conventions of the fused kernel are
not visible here: a row whose keys are all masked gives 0 (linalg.softmax
would give NaN), and masked keys never contribute (not just exp(-inf) = 0).
The flash stage implements both.
"""

from __future__ import annotations

from typing import Dict

from mlir import ir
from mlir.dialects import arith, bufferization, func, linalg, tensor

from .mlir_utils import (accumulator_type, affine_map, contiguous_memref, element_type, linalg_generic,
                         set_tag, strided_memref)
from .spec import MASK_DIMS, AttentionSpec

FUNC_NAME = "attention"

# Loop dims of the score-shaped ops: (b, h, g, l, s); of the contractions: plus e.
_B, _H, _G, _L, _S, _E = range(6)


def build_attention_payload(spec: AttentionSpec) -> ir.Module:
    """Build the payload module for `spec` (in the current MLIR context)."""
    et = element_type(spec.dtype)
    dims = spec.operand_dims()
    arg_types = [strided_memref(dims["q"], et), strided_memref(dims["k"], et),
                 strided_memref(dims["v"], et)]
    if spec.mask is not None:
        arg_types.append(strided_memref(dims["mask"], element_type(spec.mask.dtype)))
    arg_types.append(contiguous_memref(dims["out"], et))

    module = ir.Module.create()
    with ir.InsertionPoint(module.body):
        fn = func.FuncOp(FUNC_NAME, (arg_types, []))
        entry = fn.add_entry_block()
        with ir.InsertionPoint(entry):
            args = list(entry.arguments)
            tensors = [_as_tensor(a, writable=(i == len(args) - 1)) for i, a in enumerate(args)]
            q, k, v = tensors[:3]
            mask = tensors[3] if spec.mask is not None else None
            out = tensors[-1]
            result = _attention(spec, q, k, v, mask, out)
            bufferization.materialize_in_destination(None, result, args[-1], restrict=True, writable=True)
            func.ReturnOp([])
    return module


def _as_tensor(buffer: ir.Value, writable: bool) -> ir.Value:
    mt = ir.MemRefType(buffer.type)
    return bufferization.to_tensor(ir.RankedTensorType.get(mt.shape, mt.element_type), buffer,
                                   restrict=True, writable=writable or None)


def extents(q: ir.Value, k: ir.Value) -> Dict[str, ir.Value]:
    """The run-time extents B, H, L, S as index values (tensor.dim of q and k)."""
    return {"B": tensor.dim(q, _index(0)), "H": tensor.dim(q, _index(1)),
            "L": tensor.dim(q, _index(3)), "S": tensor.dim(k, _index(2))}


def _index(i: int) -> ir.Value:
    return arith.constant(ir.IndexType.get(), i)


def _empty(shape, symbols: Dict[str, ir.Value], et: ir.Type) -> ir.Value:
    """tensor.empty of `shape` whose str entries are the run-time extents in `symbols`."""
    return tensor.empty([symbols[d] if isinstance(d, str) else d for d in shape], et)


def _attention(spec, q, k, v, mask, out):
    et = element_type(spec.dtype)
    acc = accumulator_type(spec.dtype)
    g, e = spec.group, spec.head_dim
    sym = extents(q, k)
    score_shape = ["B", "H", g, "L", "S"]
    zero = arith.constant(acc, 0.0)

    # K^T: (b, h, s, e) -> (b, h, e, s)
    kt = linalg.transpose(k, outs=[_empty(["B", "H", e, "S"], sym, et)], permutation=[0, 1, 3, 2])
    set_tag(kt, "k_transpose")

    # scores[b,h,g,l,s] = sum_e q[b,h,g,l,e] * kt[b,h,e,s], accumulated in acc
    qk_init = linalg.fill(zero, outs=[_empty(score_shape, sym, acc)])
    set_tag(qk_init.owner, "qk_init")
    scores = linalg.contract(q, kt.result, outs=[qk_init], indexing_maps=[
        affine_map(6, [_B, _H, _G, _L, _E]), affine_map(6, [_B, _H, _E, _S]),
        affine_map(6, [_B, _H, _G, _L, _S])])
    set_tag(scores.owner, "qk")

    scores = _elementwise(scores, [], score_shape, sym, "scale",
                          lambda x: arith.mulf(x, arith.constant(acc, spec.scale)))
    if spec.mask is not None:
        scores = _apply_mask(spec, scores, mask, score_shape, sym)
    if spec.causal:
        scores = _elementwise(scores, [], score_shape, sym, "causal", _causal_body)

    probs = linalg.softmax([scores.type], scores, _empty(score_shape, sym, acc), 4)
    set_tag(probs.owner, "softmax")

    # out[b,h,g,l,ev] = sum_s P[b,h,g,l,s] * v[b,h,s,ev], accumulated in acc
    accumulate_in_out = et == acc
    out_shape = ["B", "H", g, "L", spec.v_head_dim]
    pv_init = linalg.fill(zero, outs=[out if accumulate_in_out else _empty(out_shape, sym, acc)])
    set_tag(pv_init.owner, "pv_init")
    result = linalg.contract(probs, v, outs=[pv_init], indexing_maps=[
        affine_map(6, [_B, _H, _G, _L, _S]), affine_map(6, [_B, _H, _S, _E]),
        affine_map(6, [_B, _H, _G, _L, _E])])
    set_tag(result.owner, "pv")
    if not accumulate_in_out:
        ident = affine_map(5, range(5))
        result = linalg_generic([result], [out], [ident, ident], ["parallel"] * 5,
                                lambda x, _: arith.truncf(et, x), "out_cast")
    result.owner.attributes["attn.root"] = ir.UnitAttr.get()
    return result


def _elementwise(x, extra_inputs, shape, sym, tag, fn, extra_maps=()):
    """scores-shaped elementwise op: fn(score, *extra scalars) -> score (in the scores' type)."""
    ident = affine_map(5, range(5))
    return linalg_generic([x, *extra_inputs], [_empty(shape, sym, ir.RankedTensorType(x.type).element_type)],
                          [ident, *extra_maps, ident], ["parallel"] * 5,
                          lambda *a: fn(*a[:-1]), tag)


def _causal_body(x):
    # Top-left aligned causal mask (SDPA): query row l sees keys s <= l.
    # Compared as i32: index vectors are 64-bit on every target and need not be.
    i32 = ir.IntegerType.get_signless(32)
    row = arith.index_cast(i32, linalg.IndexOp(_L).result)
    key = arith.index_cast(i32, linalg.IndexOp(_S).result)
    visible = arith.cmpi(arith.CmpIPredicate.sle, key, row)
    return arith.select(visible, x, arith.constant(x.type, float("-inf")))


def _apply_mask(spec, scores, mask, shape, sym):
    # The mask operand has only the dims it varies along; broadcast the rest.
    mask_map = affine_map(5, [MASK_DIMS.index(d) for d in spec.mask.dims])
    if spec.mask.kind == "bool":
        def body(x, m):
            keep = arith.cmpi(arith.CmpIPredicate.ne, m, arith.constant(m.type, 0))
            return arith.select(keep, x, arith.constant(x.type, float("-inf")))
    else:
        def body(x, m):
            return arith.addf(x, m if m.type == x.type else arith.extf(x.type, m))
    return _elementwise(scores, [mask], shape, sym, "mask", body, extra_maps=[mask_map])
