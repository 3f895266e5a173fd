"""Shared stage "flash": replace each work-group's materialized softmax by an online one.

Input (per scf.forall body, from the "tiled" stage):

    X   = mask/causal(scale * Q.K^T)          (1, 1, 1, R, S) f32, the score chain
    m   = max_s X ; E = exp(X - m) ; l = sum_s E ; P = E / l
    O   = P . V

Output: an scf.for over tiles of `kv_tile` keys carrying the running row max
m, row sum l and accumulator O (FlashAttention's online softmax):

    x      = X[:, j:j+n]                     (the score chain, fused into the loop)
    m'     = max(m, max_s x)
    base   = m' == -inf ? 0 : m'             (rows with no visible key yet)
    alpha  = exp(m - base)
    p      = exp(x - base)
    l'     = l * alpha + sum_s p
    O'     = O * alpha + p . V[j:j+n]       (in f32, or with p rounded to V's type:
                                             ScheduleOptions.pv_in_f32)
    ...after the loop:  out = l == 0 ? 0 : O / l   (fully masked rows give 0, as SDPA)

The score chain is not rewritten by hand: the loop takes slices of X and the
transform dialect's fuse_into_containing_op tiles the chain's linalg ops (QK^T,
scale, mask, causal - whatever the payload had) into the loop along S.

Key tails: keys [0, S_full) are visited in full tiles by the loop; the last
S - S_full keys (if any) by a second, single-iteration loop with a static
tile of that size.  With causal, both loops stop at the last tile that holds a
key visible to the work-group's last row: tiles wholly above the diagonal are
never computed.
"""

from __future__ import annotations

from typing import List, Tuple

from mlir import ir
from mlir.dialects import arith, linalg, math as mmath, scf, tensor
from mlir.dialects import transform
from mlir.dialects.transform import structured
from mlir.dialects.transform import tensor as ttensor

from ..mlir_utils import (TAG, CompileError, TransformScript, affine_map, any_op, apply_cleanup,
                          body_op_names, const_index, defining_op, f32, linalg_generic,
                          match_attr, match_ops, ops_tagged, redirect_uses_inside, tag_of, walk)
from ..spec import AttentionSpec
from .options import ScheduleOptions

_DYNAMIC = ir.ShapedType.get_dynamic_size()
_NEG_INF = float("-inf")


def flash_rewrite(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    """Rewrite every work-group of `module` into the online-softmax loop."""
    groups: List[str] = []
    for n, pv in enumerate(ops_tagged(module, "pv")):
        groups += _rewrite_work_group(pv, options.kv_tile, options.pv_in_f32, f"wg{n}")
    if not groups:
        raise CompileError("flash: no P.V contraction (tag 'pv') found; run the tiling stage first")
    # The zero fill that started the P.V accumulation is dead: every tile of the
    # output is now written whole by its work-group's normalization.
    for fill in ops_tagged(module, "pv_init"):
        fill.results[0].replace_all_uses_with(fill.operands[1])
        fill.erase()
    _fuse_score_chains(module, groups)
    _check_no_full_rows(module, spec, options)
    return module


# --------------------------------------------------------------------------- matching


def _expect_generic(op, what: str, body: Tuple[str, ...]):
    if op is None or op.name != "linalg.generic" or not all(n in body_op_names(op) for n in body):
        found = "a block argument" if op is None else op.name
        raise CompileError(f"flash: expected the {what} (linalg.generic with {body}), found {found}")
    return op


def _softmax_parts(pv):
    """Walk from P.V's P operand back through the decomposed softmax to the scores X."""
    div = _expect_generic(defining_op(pv.operands[0]), "softmax normalization", ("arith.divf",))
    exp = _expect_generic(defining_op(div.operands[0]), "softmax exponential", ("arith.subf", "math.exp"))
    total = _expect_generic(defining_op(div.operands[1]), "softmax row sum", ("arith.addf",))
    rowmax = _expect_generic(defining_op(exp.operands[1]), "softmax row max", ("arith.maxnumf",))
    scores = exp.operands[0]
    if rowmax.operands[0] != scores:
        raise CompileError("flash: the softmax row max and exponential read different scores")
    return scores, [div, total, exp, rowmax]


def _score_chain(scores: ir.Value, block: ir.Block) -> List[ir.Operation]:
    """The linalg ops of the work-group body that the scores depend on, in block order."""
    seen, stack = set(), [scores]
    while stack:
        op = defining_op(stack.pop())
        if op is None or op in seen or op.block != block or not op.name.startswith("linalg."):
            continue
        seen.add(op)
        stack.extend(op.operands)
    return [o.operation for o in block.operations if o.operation in seen]


def _row_offset(qk) -> ir.Value:
    """Global index of the work-group's first query row: the offset of its Q slice."""
    source = defining_op(qk.operands[0])
    if source is not None and source.name == "bufferization.to_tensor":
        return const_index(0)  # the work-group reads all rows
    if source is None or source.name != "tensor.extract_slice":
        raise CompileError("flash: the Q operand of the QK^T contraction is not a slice of Q")
    static = list(ir.DenseI64ArrayAttr(source.attributes["static_offsets"]))
    dynamic = iter(list(source.operands)[1:])
    offsets = [next(dynamic) if s == _DYNAMIC else s for s in static]
    row = offsets[3]
    return const_index(row) if isinstance(row, int) else row


# --------------------------------------------------------------------------- building


def _full(shape, value: float) -> ir.Value:
    return linalg.fill(arith.constant(f32(), value), outs=[tensor.empty(list(shape), f32())])


def _slice(source: ir.Value, dim: int, offset: ir.Value, size: int) -> ir.Value:
    t = ir.RankedTensorType(source.type)
    shape = list(t.shape)
    shape[dim] = size
    offsets = [0] * t.rank
    offsets[dim] = _DYNAMIC
    return tensor.extract_slice(ir.RankedTensorType.get(shape, t.element_type), source,
                                [offset], [], [], offsets, shape, [1] * t.rank)


def _convert(value: ir.Value, element: ir.Type, tag: str) -> ir.Value:
    """Elementwise float conversion of a tensor (extf or truncf), as a tagged generic."""
    t = ir.RankedTensorType(value.type)
    if t.element_type == element:
        return value
    widen = ir.FloatType(element).width > ir.FloatType(t.element_type).width
    ident = affine_map(t.rank, range(t.rank))
    return linalg_generic([value], [tensor.empty(t.shape, element)], [ident, ident], ["parallel"] * t.rank,
                          lambda a, _: (arith.extf if widen else arith.truncf)(element, a), tag)


def _online_step(pv, x, v, m, l, acc, pv_in_f32: bool):
    """One flash step over a tile x (.., R, n) of scores and v (.., n, Ev) of values."""
    shape = ir.RankedTensorType(x.type).shape
    rows = shape[:-1]
    r = len(shape)
    full, row = affine_map(r, range(r)), affine_map(r, range(r - 1))
    vec = affine_map(r - 1, range(r - 1))
    par_x, red_x = ["parallel"] * r, ["parallel"] * (r - 1) + ["reduction"]
    par_row = ["parallel"] * (r - 1)

    tile_max = linalg_generic([x], [_full(rows, _NEG_INF)], [full, row], red_x,
                              lambda a, b: arith.maximumf(a, b), "tile_max")
    new_max = linalg_generic([m, tile_max], [m], [vec] * 3, par_row,
                             lambda a, b, _: arith.maximumf(a, b), "running_max")

    def exp_base(a, _):
        # Rows with no visible key so far keep max -inf; shift them by 0 so
        # that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
        empty = arith.cmpf(arith.CmpFPredicate.OEQ, a, arith.constant(f32(), _NEG_INF))
        return arith.select(empty, arith.constant(f32(), 0.0), a)

    base = linalg_generic([new_max], [tensor.empty(rows, f32())], [vec] * 2, par_row, exp_base, "exp_base")
    alpha = linalg_generic([m, base], [tensor.empty(rows, f32())], [vec] * 3, par_row,
                           lambda a, b, _: mmath.exp(arith.subf(a, b)), "rescale")
    probs = linalg_generic([x, base], [tensor.empty(shape, f32())], [full, row, full], par_x,
                           lambda a, b, _: mmath.exp(arith.subf(a, b)), "probs")
    tile_sum = linalg_generic([probs], [_full(rows, 0.0)], [full, row], red_x,
                              lambda a, b: arith.addf(a, b), "tile_sum")
    new_sum = linalg_generic([l, alpha, tile_sum], [l], [vec] * 4, par_row,
                             lambda a, b, c, _: arith.addf(arith.mulf(a, b), c), "running_sum")
    ra = ir.RankedTensorType(acc.type).rank
    scaled = linalg_generic([acc, alpha], [acc],
                            [affine_map(ra, range(ra)), affine_map(ra, range(ra - 1)), affine_map(ra, range(ra))],
                            ["parallel"] * ra, lambda a, b, _: arith.mulf(a, b), "acc_rescale")
    v_type = ir.RankedTensorType(v.type).element_type
    if pv_in_f32:
        v = _convert(v, f32(), "v_upcast")
    else:
        probs = _convert(probs, v_type, "p_downcast")
    # The payload's P.V contraction (same maps and tag) on this tile's operands.
    maps = [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(pv.attributes["indexing_maps"])]
    new_acc = linalg.contract(probs, v, outs=[scaled], indexing_maps=maps)
    new_acc.owner.attributes[TAG] = pv.attributes[TAG]
    return new_max, new_sum, new_acc


def _normalize(acc, total, dest):
    ra = ir.RankedTensorType(acc.type).rank

    def body(a, s, _):
        zero = arith.constant(f32(), 0.0)
        return arith.select(arith.cmpf(arith.CmpFPredicate.OEQ, s, zero), zero, arith.divf(a, s))

    return linalg_generic([acc, total], [dest],
                          [affine_map(ra, range(ra)), affine_map(ra, range(ra - 1)), affine_map(ra, range(ra))],
                          ["parallel"] * ra, body, "normalize")


def _rewrite_work_group(pv, kv_tile: int, pv_in_f32: bool, group: str) -> List[str]:
    scores, softmax_ops = _softmax_parts(pv)
    block = pv.block
    score_shape = ir.RankedTensorType(scores.type).shape
    kv_len, rows = score_shape[-1], score_shape[:-1]
    tile = min(kv_tile, kv_len)
    full_end, tail = (kv_len // tile) * tile, kv_len % tile
    chain = _score_chain(scores, block)
    qk = [op for op in chain if tag_of(op) == "qk"]
    if len(qk) != 1:
        raise CompileError(f"flash: expected one QK^T contraction in the score chain, found {len(qk)}")
    causal = any(tag_of(op) == "causal" for op in chain)
    values = pv.operands[1]
    out_type = ir.RankedTensorType(pv.results[0].type)

    with ir.InsertionPoint(pv), pv.location:
        carried = [_full(rows, _NEG_INF), _full(rows, 0.0), _full(out_type.shape, 0.0)]
        if causal:
            # Rows [r0, r0 + R) see keys [0, r0 + R): stop after the tile holding key r0 + R - 1.
            visible_end = arith.addi(_row_offset(qk[0]), const_index(rows[-1]))
            whole_tiles = arith.muli(arith.ceildivui(visible_end, const_index(tile)), const_index(tile))
            main_end = arith.minui(whole_tiles, const_index(full_end))
            needs_tail = arith.cmpi(arith.CmpIPredicate.ugt, visible_end, const_index(full_end))
            tail_end = arith.select(needs_tail, const_index(kv_len), const_index(full_end))
        else:
            main_end, tail_end = const_index(full_end), const_index(kv_len)
        loops = []
        for start, end, size in ((const_index(0), main_end, tile), (const_index(full_end), tail_end, tail)):
            if size == 0:
                continue
            loop = scf.ForOp(start, end, const_index(tile), carried)
            with ir.InsertionPoint(loop.body):
                j = loop.induction_variable
                step = _online_step(pv, _slice(scores, len(rows), j, size),
                                    _slice(values, 2, j, size), *loop.inner_iter_args, pv_in_f32)
                scf.YieldOp(list(step))
            loops.append(loop)
            carried = list(loop.results)
        out = _normalize(carried[2], carried[1], pv.operands[2])

    pv.results[0].replace_all_uses_with(out)
    pv.erase()
    for op in softmax_ops:
        init = defining_op(op.operands[-1])
        op.erase()
        if init is not None and init.name == "linalg.fill" and not list(init.results[0].uses):
            init.erase()
    return _mark_fusion_groups(loops, chain, scores, group)


def _mark_fusion_groups(loops, chain, scores, group: str) -> List[str]:
    """Tag each loop and the chain it must receive; a later loop gets its own copy of the chain."""
    names = []
    for i, loop in enumerate(loops):
        name = f"{group}_{i}"
        ops = chain
        if i > 0:
            ops = _clone_before(chain, loop.operation)
            own_scores = ops[chain.index(defining_op(scores))].results[0]
            redirect_uses_inside(scores, own_scores, loop.operation)
        for op in ops:
            op.attributes["attn.fuse_group"] = ir.StringAttr.get(name)
        loop.operation.attributes["attn.fuse_into"] = ir.StringAttr.get(name)
        names.append(name)
    return names


def _clone_before(chain: List[ir.Operation], anchor: ir.Operation) -> List[ir.Operation]:
    clones = {}
    for op in chain:
        copy = op.clone(ip=ir.InsertionPoint(anchor))
        for i, operand in enumerate(op.operands):
            producer = defining_op(operand)
            if producer in clones:
                copy.operands[i] = clones[producer].results[list(producer.results).index(operand)]
        clones[op] = copy.operation
    return [clones[op] for op in chain]


def _fuse_score_chains(module: ir.Module, groups: List[str]) -> None:
    with TransformScript() as script:
        root = script.root
        for name in groups:
            chain = match_attr(root, "attn.fuse_group", name)
            loop = match_attr(root, "attn.fuse_into", name)
            structured.FuseIntoContainingOp(any_op(), any_op(), chain, loop)
        func = match_ops(root, ["func.func"])
        # Slices of the payload's whole-row empty tensors (destinations of the
        # fused fills) become tile-sized empties; the whole-row ones die.
        with ir.InsertionPoint(transform.ApplyPatternsOp(func).patterns):
            ttensor.ApplyFoldTensorEmptyPatternsOp()
        apply_cleanup(func)
    script.apply(module)


#: tags of the ops whose results are score-shaped (.., rows, keys).
SCORE_TAGS = ("qk_init", "qk", "scale", "mask", "causal", "tile_max", "probs", "tile_sum")


def _check_no_full_rows(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> None:
    """After the rewrite no op may produce a whole row of scores (unless S fits one tile)."""
    if spec.kv_len <= options.kv_tile:
        return

    def whole_rows(op) -> bool:
        if not op.name.startswith("linalg."):
            return False
        if tag_of(op) is None and op.name == "linalg.generic":
            return True  # a leftover of the decomposed softmax
        return tag_of(op) in SCORE_TAGS and any(
            ir.RankedTensorType(r.type).shape[-1] == spec.kv_len for r in op.results)

    offenders = walk(module, whole_rows)
    if offenders:
        raise CompileError(f"flash: {len(offenders)} op(s) still produce whole score rows, e.g. "
                           f"{offenders[0].name} tagged {tag_of(offenders[0])!r}")
