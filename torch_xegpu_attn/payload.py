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

Other kernels of the spec (AttentionSpec.kernel):

  forward_lse  also lse[b,h,g,l] = log(sum_s exp(scores - max_s scores)) + max_s scores, the
               row's log-sum-exp (three generics tagged lse_max, lse_sum, lse), written to
               the lse argument; the flash stage takes it from its running max and sum.
  backward     standard attention's backward (`_backward`): the probabilities recomputed
               from the saved log-sum-exp, then the five contractions of dV, dP, dQ, dK
               and the row terms Delta = rowsum(dOut * Out) - dLSE:

    scores = the forward's score chain (QK^T, scale, mask | causal)
    P      = exp(scores - lse)                 probs
    dV     = P^T . dOut                        dv      (summed over g and l)
    dP     = dOut . V^T                        dp
    Delta  = rowsum(dOut * Out) - dLSE         delta
    dS     = P * (dP - Delta)                  ds
    dQ     = scale * dS . K                    dq
    dK     = scale * dS^T . Q                  dk      (summed over g and l)

  A row whose keys are all masked (lse = -inf) has gradient 0 (here exp(-inf + inf)
  would be NaN); the flash stage implements that.
"""

from __future__ import annotations

from typing import Dict

from mlir import ir
from mlir.dialects import arith, bufferization, func, linalg, math, tensor

from .mlir_utils import (accumulator_type, affine_map, contiguous_memref, element_type, linalg_generic,
                         set_tag, strided_memref)
from .spec import MASK_DIMS, AttentionSpec

FUNC_NAME = "attention"

# Loop dims of the score-shaped ops: (b, h, g, l, s); of the contractions: plus e.
_B, _H, _G, _L, _S, _E = range(6)


def build_attention_payload(spec: AttentionSpec) -> ir.Module:
    """Build the payload module for `spec` (in the current MLIR context)."""
    names = spec.operand_names()
    written = spec.writes()
    arg_types = [_argument_type(name, dims, dtype) for name, dims, dtype in spec.operands()]

    module = ir.Module.create()
    with ir.InsertionPoint(module.body):
        fn = func.FuncOp(FUNC_NAME, (arg_types, []))
        entry = fn.add_entry_block()
        with ir.InsertionPoint(entry):
            args = dict(zip(names, entry.arguments))
            t = {name: _as_tensor(arg, writable=name in written) for name, arg in args.items()}
            if spec.kernel == "backward":
                results = _backward(spec, t)
            else:
                results = {"out": _attention(spec, t["q"], t["k"], t["v"], t.get("mask"), t["out"], t.get("seed"))}
                if spec.kernel == "forward_lse":
                    results["lse"] = _log_sum_exp(spec, t["q"], t["k"], t.get("mask"), t["lse"])
            for name in written:
                bufferization.materialize_in_destination(None, results[name], args[name], restrict=True,
                                                         writable=True)
            func.ReturnOp([])
    return module


#: arguments read with the caller's strides (any layout with a contiguous last dim); the others
#: are buffers this package allocates, contiguous.
_STRIDED = ("q", "k", "v", "mask", "dout")


def _argument_type(name: str, dims, dtype: str) -> ir.Type:
    """The memref of one kernel argument (`spec.operands`: a bool mask as bytes, the seed as
    int32, log-sum-exps and the training kernels' output in the accumulator's type)."""
    if dtype in ("uint8", "int32"):
        et = ir.IntegerType.get_signless(8 if dtype == "uint8" else 32)
    else:
        et = element_type(dtype)
    return strided_memref(dims, et) if name in _STRIDED else contiguous_memref(dims, et)


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


def _scores(spec, q, k, mask, sym, tag_prefix=""):
    """The score chain: QK^T (accumulated in the accumulator type), scale, mask or causal; its ops'
    tags start with `tag_prefix`."""
    et = element_type(spec.dtype)
    acc = accumulator_type(spec.dtype)
    g, e = spec.group, spec.head_dim
    score_shape = ["B", "H", g, "L", "S"]
    zero = arith.constant(acc, 0.0)

    # K^T: (b, h, s, e) -> (b, h, e, s)
    kt = linalg.transpose(k, outs=[_empty(["B", "H", e, "S"], sym, et)], permutation=[0, 1, 3, 2])
    set_tag(kt, tag_prefix + "k_transpose")

    # scores[b,h,g,l,s] = sum_e q[b,h,g,l,e] * kt[b,h,e,s], accumulated in acc
    qk_init = linalg.fill(zero, outs=[_empty(score_shape, sym, acc)])
    set_tag(qk_init.owner, tag_prefix + "qk_init")
    scores = linalg.contract(q, kt.result, outs=[qk_init], indexing_maps=[
        affine_map(6, [_B, _H, _G, _L, _E]), affine_map(6, [_B, _H, _E, _S]),
        affine_map(6, [_B, _H, _G, _L, _S])])
    set_tag(scores.owner, tag_prefix + "qk")

    scores = _elementwise(scores, [], score_shape, sym, tag_prefix + "scale",
                          lambda x: arith.mulf(x, arith.constant(acc, spec.scale)))
    if spec.mask is not None:
        scores = _apply_mask(spec, scores, mask, score_shape, sym, tag_prefix)
    if spec.causal:
        scores = _elementwise(scores, [], score_shape, sym, tag_prefix + "causal", _causal_body)
    return scores


def _attention(spec, q, k, v, mask, out, seed=None):
    acc = accumulator_type(spec.dtype)
    g = spec.group
    sym = extents(q, k)
    score_shape = ["B", "H", g, "L", "S"]
    zero = arith.constant(acc, 0.0)
    scores = _scores(spec, q, k, mask, sym)

    probs = linalg.softmax([scores.type], scores, _empty(score_shape, sym, acc), 4)
    set_tag(probs.owner, "softmax")
    if spec.dropout_p > 0:
        probs = _dropout(spec, probs, seed, sym, "dropout")

    # out[b,h,g,l,ev] = sum_s P[b,h,g,l,s] * v[b,h,s,ev], accumulated in acc (the training
    # forward's out is in acc already: spec.operands)
    out_et = ir.RankedTensorType(out.type).element_type
    accumulate_in_out = out_et == acc
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
                                lambda x, _: arith.truncf(out_et, x), "out_cast")
    result.owner.attributes["attn.root"] = ir.UnitAttr.get()
    return result


def _log_sum_exp(spec, q, k, mask, lse_out):
    """lse = max_s X + log(sum_s exp(X - max_s X)) of the scores X.  X is stated again by its
    own chain (tags "lse_qk", "lse_scale", ...): the output's chain is fused into the work-group
    loop, and one shared with this reduction would make the loop hand out the whole score
    tensor.  The flash stage computes lse from its running max and sum instead."""
    acc = accumulator_type(spec.dtype)
    scores = _scores(spec, q, k, mask, extents(q, k), tag_prefix="lse_")
    rows, row = affine_map(5, range(5)), affine_map(5, range(4))
    neg_inf = arith.constant(acc, float("-inf"))
    init_max = linalg.fill(neg_inf, outs=[lse_out])
    row_max = linalg_generic([scores], [init_max], [rows, row], ["parallel"] * 4 + ["reduction"],
                             lambda x, m: arith.maximumf(x, m), "lse_max")
    init_sum = linalg.fill(arith.constant(acc, 0.0), outs=[lse_out])
    total = linalg_generic([scores, row_max], [init_sum], [rows, row, row], ["parallel"] * 4 + ["reduction"],
                           lambda x, m, t: arith.addf(t, math.exp(arith.subf(x, m))), "lse_sum")
    row4 = affine_map(4, range(4))
    return linalg_generic([row_max, total], [lse_out], [row4, row4, row4], ["parallel"] * 4,
                          lambda m, t, _: arith.addf(m, math.log(t)), "lse")


def _backward(spec, t):
    """dq, dk, dv of standard attention (the module docstring's equations), by name."""
    acc = accumulator_type(spec.dtype)
    g, e, ev = spec.group, spec.head_dim, spec.v_head_dim
    q, k, v, out, lse, dout, dlse = (t[n] for n in ("q", "k", "v", "out", "lse", "dout", "dlse"))
    sym = extents(q, k)
    score_shape = ["B", "H", g, "L", "S"]
    zero = arith.constant(acc, 0.0)
    scores = _scores(spec, q, k, t.get("mask"), sym)
    ident5, rows = affine_map(5, range(5)), affine_map(5, range(4))

    probs = linalg_generic([scores, lse], [_empty(score_shape, sym, acc)], [ident5, rows, ident5],
                           ["parallel"] * 5, lambda x, m, _: math.exp(arith.subf(x, m)), "probs")
    dropped = probs if spec.dropout_p == 0 else _dropout(spec, probs, t["seed"], sym, "dropout")

    # dV[b,h,s,ev] = sum_{g,l} Z * P[b,h,g,l,s] * dOut[b,h,g,l,ev]; loop dims (b, h, g, l, s, ev)
    dv = _contract_to(dropped, dout, ["B", "H", "S", ev], sym, acc, "dv",
                      [[_B, _H, _G, _L, _S], [_B, _H, _G, _L, _E], [_B, _H, _S, _E]])
    # dP[b,h,g,l,s] = Z * sum_ev dOut[b,h,g,l,ev] * V[b,h,s,ev]
    dp = _contract_to(dout, t["v"], score_shape, sym, acc, "dp",
                      [[_B, _H, _G, _L, _E], [_B, _H, _S, _E], [_B, _H, _G, _L, _S]])
    if spec.dropout_p > 0:
        dp = _dropout(spec, dp, t["seed"], sym, "dp_dropout")
    # Delta[b,h,g,l] = sum_ev dOut * Out - dLSE
    products = linalg_generic(
        [dout, out], [linalg.fill(zero, outs=[_empty(["B", "H", g, "L"], sym, acc)])], [ident5, ident5, rows],
        ["parallel"] * 4 + ["reduction"],
        lambda d, o, total: arith.addf(total, arith.mulf(_extended(acc, d), _extended(acc, o))), "delta_dot")
    row4 = affine_map(4, range(4))
    delta = linalg_generic([products, dlse], [_empty(["B", "H", g, "L"], sym, acc)], [row4, row4, row4],
                           ["parallel"] * 4, lambda x, d, _: arith.subf(x, d), "delta")
    ds = linalg_generic([probs, dp, delta], [_empty(score_shape, sym, acc)], [ident5, ident5, rows, ident5],
                        ["parallel"] * 5, lambda p, d, r, _: arith.mulf(p, arith.subf(d, r)), "ds")
    # dQ[b,h,g,l,e] = scale * sum_s dS * K[b,h,s,e];  dK[b,h,s,e] = scale * sum_{g,l} dS * Q
    dq = _contract_to(ds, k, ["B", "H", g, "L", e], sym, acc, "dq",
                      [[_B, _H, _G, _L, _S], [_B, _H, _S, _E], [_B, _H, _G, _L, _E]])
    dk = _contract_to(ds, q, ["B", "H", "S", e], sym, acc, "dk",
                      [[_B, _H, _G, _L, _S], [_B, _H, _G, _L, _E], [_B, _H, _S, _E]])
    scale = arith.constant(acc, spec.scale)
    results = {}
    for name, value, rank in (("dq", dq, 5), ("dk", dk, 4), ("dv", dv, 4)):
        ident = affine_map(rank, range(rank))
        factor = None if name == "dv" else scale
        written = ir.RankedTensorType(t[name].type).element_type  # the inputs' type or the accumulator's
        results[name] = linalg_generic(
            [value], [t[name]], [ident, ident], ["parallel"] * rank,
            lambda x, _, f=factor, w=written: _cast(w, x if f is None else arith.mulf(x, f)), f"{name}_out")
    return results


#: Philox4x32's round multipliers and key increments (Salmon et al., "Parallel random numbers:
#: as easy as 1, 2, 3", SC 2011), and its number of rounds.
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10


def _dropout(spec, x, seed, sym, tag):
    """x * Z with Z = keep / (1 - p): keep is whether the first 32-bit word of Philox4x32-10 at
    counter (s, l, b * Hq + h * G + g, 0) under the key (seed[0], seed[1]), shifted right by 8,
    is at least p * 2^24 (the element kept with probability 1 - p).  The same (batch, query
    head, row, key) element gets the same draw in every kernel: the backward regenerates the
    forward's mask instead of storing it."""
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    element = ir.RankedTensorType(x.type).element_type
    keys = [tensor.extract(seed, [_index(i)]) for i in (0, 1)]
    heads = arith.index_cast(i32, sym["H"])
    threshold = min(int(round(spec.dropout_p * 2 ** 24)), 2 ** 24)
    factor = 0.0 if spec.dropout_p >= 1.0 else 1.0 / (1.0 - spec.dropout_p)

    def body(value, _):
        index = [arith.index_cast(i32, linalg.IndexOp(d).result) for d in range(5)]
        group = arith.constant(i32, spec.group)
        head = arith.addi(arith.muli(arith.addi(arith.muli(index[_B], heads), index[_H]), group), index[_G])
        counter = [index[_S], index[_L], head, arith.constant(i32, 0)]
        word = _philox(counter, list(keys), i32, i64)
        draw = arith.shrui(word, arith.constant(i32, 8))
        keep = arith.cmpi(arith.CmpIPredicate.uge, draw, arith.constant(i32, threshold))
        return arith.select(keep, arith.mulf(value, arith.constant(element, factor)), arith.constant(element, 0.0))
    ident = affine_map(5, range(5))
    return linalg_generic([x], [_empty(["B", "H", spec.group, "L", "S"], sym, element)], [ident, ident],
                          ["parallel"] * 5, body, tag)


def _i32_constant(i32, value: int) -> ir.Value:
    """A 32-bit constant given as an unsigned value."""
    return arith.constant(i32, value - (1 << 32) if value >= 1 << 31 else value)


def _philox(counter, key, i32, i64) -> ir.Value:
    """The first output word of Philox4x32-10 of `counter` (four i32) under `key` (two i32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    shift = arith.constant(i64, 32)

    def mulhilo(a, m):
        product = arith.muli(arith.extui(i64, a), arith.constant(i64, m))
        return arith.trunci(i32, arith.shrui(product, shift)), arith.trunci(i32, product)

    for round_ in range(_PHILOX_ROUNDS):
        hi0, lo0 = mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = (arith.xori(arith.xori(hi1, c1), k0), lo1, arith.xori(arith.xori(hi0, c3), k1), lo0)
        if round_ + 1 < _PHILOX_ROUNDS:
            k0 = arith.addi(k0, _i32_constant(i32, _PHILOX_W[0]))
            k1 = arith.addi(k1, _i32_constant(i32, _PHILOX_W[1]))
    return c0


def _extended(acc, x):
    return x if x.type == acc else arith.extf(acc, x)


def _cast(et, x):
    return x if x.type == et else arith.truncf(et, x)


def _contract_to(lhs, rhs, shape, sym, acc, tag, dims):
    """linalg.contract of lhs and rhs into a zero-filled `shape` tensor of the accumulator type;
    dims: the loop dims of lhs, rhs and the result over (b, h, g, l, s, e)."""
    init = linalg.fill(arith.constant(acc, 0.0), outs=[_empty(shape, sym, acc)])
    result = linalg.contract(lhs, rhs, outs=[init], indexing_maps=[affine_map(6, d) for d in dims])
    set_tag(result.owner, tag)
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


def _apply_mask(spec, scores, mask, shape, sym, tag_prefix=""):
    # The mask operand has only the dims it varies along; broadcast the rest.
    mask_map = affine_map(5, [MASK_DIMS.index(d) for d in spec.mask.dims])
    if spec.mask.kind == "bool":
        def body(x, m):
            keep = arith.cmpi(arith.CmpIPredicate.ne, m, arith.constant(m.type, 0))
            return arith.select(keep, x, arith.constant(x.type, float("-inf")))
    else:
        def body(x, m):
            return arith.addf(x, m if m.type == x.type else arith.extf(x.type, m))
    return _elementwise(scores, [mask], shape, sym, tag_prefix + "mask", body, extra_maps=[mask_map])
