"""Shared stage "flash": each work-group's materialized softmax becomes an online one over key tiles.

Input (the body of the work-group loop, from the "tiled" stage): the tiled
chain on tensors (1, 1, 1|G, rows, S), rows <= row_tile,

    X = mask/causal(scale * Q.K^T) ; m = max_s X ; E = exp(X - m) ; P = E / sum_s E ; O = P . V

Output: the same loop whose body works on full, static tiles held in vectors
(`vector_tiles`): rows = (1|G) * row_tile (past L: zeros, never stored) and
kv_tile keys per step:

    q         = Q tile, read once (rows past L read as 0)
    m, l, acc = -inf, 0, 0                           vector<rows>, vector<rows>, vector<rows x Ev>
    scf.for j over the key tiles (run-time bounds):  m, l, acc loop-carried
        s     = q . K[j : j + T]^T                   K read past S as 0
        s     = the score chain on s (scale, mask...), in base-2 units: log2(e)
                folds into the scale (FlashAttention's exp2 trick)
        s     = scf.if (tile holds keys >= S, or straddles the causal diagonal)
                  { select(key < S and key <= row, s, -inf) }       i32 index compare
                else { s }
        m'    = max(m, max_s s) ; base = m' == -inf ? 0 : m'
        alpha = exp2(m - base) ; p = exp2(s - base)
        l'    = l * alpha + sum_s p
        acc'  = acc * alpha + p . V[j : j + T]       (P.V in f32, or p rounded to V's
                                                     type: ScheduleOptions.pv_in_f32)

Scores, m, l and acc are f32 vectors (f64 for float64 inputs: everything then
stays in f64, and pv_in_f32 has no effect).
    out = acc * (l == 0 ? 0 : 1 / l)                 one reciprocal per row; rows
                                                     with no visible key give 0
    out rows < L written (transfer_write, rows past L not written)

Tail modes (ScheduleOptions.tail): "mask" visits ceil(S / T) full tiles as
above; "peel" visits the tiles wholly below S in one loop whose reads are in
bounds and that has no key check, then the tile holding key S - 1 (if S is
not a multiple of T) in a second loop of at most one step, masked.  Causal problems stop at
the last tile that holds a key visible to the work-group's last valid row, so
tiles wholly above the diagonal are never visited; tiles wholly below it take
the else branch.  Top-left alignment (row l sees keys <= l), as SDPA.

K layouts (ScheduleOptions.k_layout): "folded" contracts (m,k) x (n,k) on
the K tile as read; "explicit" transposes the K tile (vector.transpose) and
contracts row-major; "materialized" reads (E x T) tiles of K^T from a
workspace, tile by tile, that a loop of its own (tagged attn.k_transpose) fills once.

Split keys (ScheduleOptions.kv_splits = P > 1): work-group (b, h, g, p, r)
visits only its share of the row tile's key tiles (ceil(tiles / P) each) and
writes its (m, l, acc) to workspaces; a combine loop (tagged attn.combine)
over (b, h, g, r, c) merges the P partials exactly (log-sum-exp merge) and
normalizes, each of its work-groups one tile of ScheduleOptions.combine_cols
value columns (c); a forward_lse kernel's combine also writes each row's
log-sum-exp from the merged max and sum (from its c = 0 work-groups).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from mlir import ir
from mlir.dialects import arith, bufferization, math as mmath, scf, tensor, vector

from ..mlir_utils import (CompileError, accumulator_type, body_op_names, cleanup, const_index, defining_op,
                          insert_in_parallel, slice_of, tag_of, walk)
from ..spec import AttentionSpec
from .options import ScheduleOptions
from .tiling import WORK_GROUPS, block_mapping, forall_upper_bounds, rebuild_forall
from .vector_tiles import (BodyTranslator, broadcast_rows, expand_to, flatten_rows, i32, iota_i32,
                           read_tile, splat, to_i32, unflatten_rows, vector_type, write_tile)

_NEG_INF = float("-inf")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
#: loop dims of the score-shaped ops.
_G, _L, _S = 2, 3, 4
#: tags of the score ops that compare indices: applied only on tiles that need them.
INDEX_MASK_TAGS = ("causal",)
K_TRANSPOSE_LOOP = "attn.k_transpose"
V_TRANSPOSE_LOOP = "attn.v_transpose"
COMBINE_LOOP = "attn.combine"


def flash_rewrite(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> ir.Module:
    """Rewrite the work-group loop of `module` into the online-softmax form."""
    loops = walk(module, lambda op: op.name == "scf.forall" and WORK_GROUPS in op.attributes)
    if len(loops) != 1 and spec.kernel != "backward":
        raise CompileError(f"flash: expected one work-group loop (attn.work_groups), found {len(loops)}; "
                           "run the tiling stage first")
    if options.kv_splits > 1 and options.tail != "mask":
        raise CompileError("flash: split keys need tail='mask'")
    if spec.kernel == "backward":
        from .flash_backward import build_backward
        build_backward(module, spec, options)
        cleanup(module)
        return module
    work_group = _WorkGroup(loops[0], spec, options)
    work_group.build()
    cleanup(module)
    return module


# --------------------------------------------------------------------------- reading the tiled body


def _expect_generic(op, what: str, body: Tuple[str, ...]):
    if op is None or op.name != "linalg.generic" or not all(n in body_op_names(op) for n in body):
        found = "a block argument" if op is None else op.name
        raise CompileError(f"flash: expected the {what} (linalg.generic with {body}), found {found}")
    return op


def _softmax_scores(probabilities: ir.Value) -> ir.Value:
    """Walk from the probabilities back through the decomposed softmax to the scores X."""
    div = _expect_generic(defining_op(probabilities), "softmax normalization", ("arith.divf",))
    exp = _expect_generic(defining_op(div.operands[0]), "softmax exponential", ("arith.subf", "math.exp"))
    _expect_generic(defining_op(div.operands[1]), "softmax row sum", ("arith.addf",))
    rowmax = _expect_generic(defining_op(exp.operands[1]), "softmax row max", ("arith.maxnumf",))
    if rowmax.operands[0] != exp.operands[0]:
        raise CompileError("flash: the softmax row max and exponential read different scores")
    return exp.operands[0]


def _score_ops(scores: ir.Value) -> Tuple[ir.Operation, List[ir.Operation]]:
    """(the QK^T contraction, the elementwise score ops after it in order)."""
    ops = []
    op = defining_op(scores)
    while op is not None and tag_of(op) != "qk":
        if op.name != "linalg.generic" or any("reduction" in str(it) for it in
                                              ir.ArrayAttr(op.attributes["iterator_types"])):
            raise CompileError(f"flash: unexpected {op.name} (tag {tag_of(op)!r}) in the score chain")
        ops.append(op)
        op = defining_op(op.operands[0])
    if op is None:
        raise CompileError("flash: the score chain does not start with a QK^T contraction (tag 'qk')")
    return op, list(reversed(ops))


def _slice_source(value: ir.Value, what: str) -> ir.Operation:
    op = defining_op(value)
    if op is None or op.name != "tensor.extract_slice":
        raise CompileError(f"flash: the {what} operand is not a slice of the caller's tensor")
    return op


def _slice_offset(slice_op: ir.Operation, dim: int):
    """The slice's offset along `dim`: an int if static, else the index value."""
    static = list(ir.DenseI64ArrayAttr(slice_op.attributes["static_offsets"]))
    dynamic = iter(slice_op.opview.offsets)
    offsets = [next(dynamic) if s == ir.ShapedType.get_dynamic_size() else s for s in static]
    return offsets[dim]


def _slice_size(slice_op: ir.Operation, dim: int):
    """The slice's size along `dim`: an int if static, else the index value."""
    static = list(ir.DenseI64ArrayAttr(slice_op.attributes["static_sizes"]))
    dynamic = iter(slice_op.opview.sizes)
    sizes = [next(dynamic) if s == ir.ShapedType.get_dynamic_size() else s for s in static]
    return sizes[dim]


@dataclass
class _KeyRange:
    """One scf.for over key tiles: [start, end) by `tile` keys."""

    start: ir.Value
    end: ir.Value
    tile: int
    in_bounds: bool      # every tile lies below S
    key_bound: bool      # tiles may hold keys >= S (mask them)


# --------------------------------------------------------------------------- the work-group


class _WorkGroup:
    """One tiled work-group loop and the vector IR that replaces its body."""

    def __init__(self, loop: ir.Operation, spec: AttentionSpec, options: ScheduleOptions):
        self.loop, self.spec, self.options = loop, spec, options
        view = loop.opview
        self.body = view.body
        self.ivs = dict(zip("bhgpr", view.induction_variables))
        self.out_arg = view.inner_iter_args[0]
        self.terminator = self.body.operations[len(self.body.operations) - 1].operation
        inserts = list(self.terminator.regions[0].blocks[0].operations)
        if len(inserts) != 1:
            raise CompileError("flash: the work-group loop must insert exactly one result")
        self.insert = inserts[0].operation
        pvs = [op for op in walk(loop, lambda o: tag_of(o) == "pv")]
        if len(pvs) != 1:
            raise CompileError(f"flash: expected one P.V contraction (tag 'pv'), found {len(pvs)}")
        self.pv = pvs[0]
        probabilities = self.pv.operands[0]
        self.dropout = defining_op(probabilities)  # dropout (tag "dropout") between softmax and P.V
        if self.dropout is not None and tag_of(self.dropout) == "dropout":
            probabilities = self.dropout.operands[0]
        else:
            self.dropout = None
        self.qk, self.score_ops = _score_ops(_softmax_scores(probabilities))
        self.q = self.qk.operands[0]
        q_slice = _slice_source(self.q, "Q")
        k_transpose = defining_op(self.qk.operands[1])
        if k_transpose is None or tag_of(k_transpose) != "k_transpose":
            raise CompileError("flash: the K^T operand of QK^T is not the payload's transpose")
        self.k = k_transpose.operands[0]
        self.k_full = _slice_source(self.k, "K").operands[0]
        self.v = self.pv.operands[1]
        _slice_source(self.v, "V")
        self.row0 = _slice_offset(q_slice, 3)         # first query row of the work-group
        self.rows_valid = _slice_size(q_slice, 3)     # min(row_tile, L - row0)
        self.packed = options.pack_gqa
        self.groups = spec.group if self.packed else 1
        self.R = options.row_tile
        self.rows = self.groups * self.R
        self.T = options.kv_tile
        self.splits = forall_upper_bounds(loop)[3]   # P: an int, or a size computed at run time
        self.e, self.ev = spec.head_dim, spec.v_head_dim
        self.et = ir.RankedTensorType(self.q.type).element_type
        self.out_et = ir.RankedTensorType(self.out_arg.type).element_type  # the training forward's is acc
        self.acc = accumulator_type(spec.dtype)  # scores, m, l and acc: f64 for float64, else f32
        for op in self.score_ops:
            if tag_of(op) in INDEX_MASK_TAGS and any(tag_of(o) not in INDEX_MASK_TAGS
                                                     for o in self.score_ops[self.score_ops.index(op):]):
                raise CompileError("flash: index masks (causal) must come last in the score chain")

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        kt = None
        if self.options.k_layout == "materialized":
            with ir.InsertionPoint(self.loop), self.loop.location:
                kt = self._materialize_k_transpose()
        self.kt = kt
        with ir.InsertionPoint(self.terminator), self.loop.location:
            self.row0, self.rows_valid = _value(self.row0), _value(self.rows_valid)
            self.S = tensor.dim(self.k, const_index(2))
            self.q_tile = self._q_tile()
            m, l, acc = self._online_softmax()
            if self.options.kv_splits == 1:
                self.insert.operands[0] = self._write_output(self._normalized(acc, l))
                lse = self._log_sum_exp(m, l) if self.spec.kernel == "forward_lse" else None
        if self.options.kv_splits == 1:
            if lse is not None:
                self._write_log_sum_exp(lse)
            return
        self._split(m, l, acc)

    # ------------------------------------------------------------------ log-sum-exp

    def _log_sum_exp(self, m: ir.Value, l: ir.Value, base2: bool = False) -> ir.Value:
        """Each row's natural log-sum-exp from the running max and sum: m * factor * ln(2) +
        log(l), m in the exponent's units, or in base-2 units with `base2` (factor * ln(2)
        folded into one constant: m rounds once on its way to natural units, not twice); a
        row that saw no key gives -inf (log(0) = -inf)."""
        factor = _LN2 if base2 or self.exponent_factor is None else self.exponent_factor * _LN2
        natural = arith.mulf(m, splat([self.rows], self.acc, factor))
        return arith.addf(natural, mmath.log(l))

    def _payload_log_sum_exp(self) -> Tuple[ir.Operation, ir.Value]:
        """The payload's op tagged 'lse' (outside the work-group loop), which the flash
        kernel's own log-sum-exp output replaces, and its destination tensor (its last operand)."""
        chain = [op for op in walk(self.loop.parent, lambda o: tag_of(o) == "lse")]
        if len(chain) != 1:
            raise CompileError(f"flash: a forward_lse payload has one op tagged 'lse', found {len(chain)}")
        return chain[0], list(chain[0].operands)[-1]

    def _lse_tile(self, lse: ir.Value, lse_out: ir.Value, ivs: Dict, g0: ir.Value, row0: ir.Value,
                  rows: ir.Value) -> Tuple:
        """Rows [row0, row0 + rows) of a work-group's log-sum-exp written into its slice of the
        (B, H, G, L) shared out `lse_out`: (tile, lse_out, offsets, sizes), what
        insert_in_parallel takes."""
        offsets = [ivs["b"], ivs["h"], g0, row0]
        sizes = [1, 1, self.groups, rows]
        tile = unflatten_rows(lse, self.groups) if self.packed else lse
        dims = ([(2, True)] if self.packed else []) + [(3, False)]
        return write_tile(tile, slice_of(lse_out, offsets, sizes), dims, {}), lse_out, offsets, sizes

    def _write_log_sum_exp(self, lse: ir.Value) -> None:
        """Add the lse argument to the work-group loop's shared outs and write each work-group's
        rows (past L not written); the payload's log-sum-exp chain (outside the loop) goes."""
        payload_lse, destination = self._payload_log_sum_exp()
        loop = rebuild_forall(self.loop, forall_upper_bounds(self.loop), [0, 1, 2, 3, 4],
                              list(self.loop.opview.outputs) + [destination], block_mapping(5))
        self.loop = loop.operation
        ivs = dict(zip("bhgpr", loop.induction_variables))
        terminator = loop.body.operations[len(loop.body.operations) - 1].operation
        with ir.InsertionPoint(terminator), loop.location:
            g0 = const_index(0) if self.packed else ivs["g"]
            row0 = arith.muli(ivs["r"], const_index(self.R))  # (values of the old loop may be its ivs)
            length = tensor.dim(loop.inner_iter_args[1], const_index(3))
            valid = arith.minui(const_index(self.R), arith.subi(length, row0))
            written = self._lse_tile(lse, loop.inner_iter_args[1], ivs, g0, row0, valid)
        with ir.InsertionPoint(terminator.regions[0].blocks[0]):
            insert_in_parallel(*written)
        payload_lse.results[0].replace_all_uses_with(loop.results[1])
        payload_lse.erase()

    # ------------------------------------------------------------------ tiles

    def _row_dims(self, dim_g: int, dim_l: int) -> List[Tuple[int, int, bool]]:
        """Vector dims of a row-indexed read: (g if packed, l), rows past L out of bounds."""
        dims = [(dim_g, self.groups, True)] if self.packed else []
        return dims + [(dim_l, self.R, False)]

    def _q_tile(self) -> ir.Value:
        zero = arith.constant(self.et, 0.0)
        tile = read_tile(self.q, self._row_dims(2, 3) + [(4, self.e, True)], {}, zero)
        return flatten_rows(tile) if self.packed else tile

    def _k_operand(self, j: ir.Value, r: _KeyRange) -> Tuple[ir.Value, bool]:
        """The K side of QK^T for keys [j, j + tile): (vector, True if laid out (n, k))."""
        zero = arith.constant(self.et, 0.0)
        if self.kt is not None:  # the (E x T) tile j / T of the materialized K^T
            offsets = {0: self.ivs["b"], 1: self.ivs["h"], 2: arith.divui(j, const_index(self.T))}
            return read_tile(self.kt, [(3, self.e, True), (4, r.tile, True)], offsets, zero), False
        tile = read_tile(self.k, [(2, r.tile, r.in_bounds), (3, self.e, True)], {2: j}, zero)
        if self.options.k_layout == "explicit":
            return vector.transpose(vector_type([self.e, r.tile], self.et), tile, [1, 0]), False
        return tile, True

    def _operand_tile(self, generic: ir.Operation, index: int, j: ir.Value, r: _KeyRange) -> ir.Value:
        """Operand `index` of a score op (a mask) as a (rows x tile) vector, broadcast where it is."""
        value = generic.operands[index]
        amap = ir.AffineMapAttr(ir.ArrayAttr(generic.attributes["indexing_maps"])[index]).value
        loop_dims = [ir.AffineDimExpr(e).position for e in amap.results]
        sizes = {_G: (self.groups, True), _L: (self.R, False), _S: (r.tile, r.in_bounds)}
        wanted = [_G, _L, _S] if self.packed else [_L, _S]
        dims, offsets, present = [], {}, []
        for d in wanted:
            if d in loop_dims:
                dims.append((loop_dims.index(d), *sizes[d]))
            present.append(d in loop_dims)
        if _S in loop_dims:
            offsets[loop_dims.index(_S)] = j
        if not dims:  # varies along none of the tile's dims: read its one element
            dims = [(len(loop_dims) - 1, 1, True)]
        element = ir.RankedTensorType(value.type).element_type
        padding = arith.constant(element, 0 if isinstance(element, ir.IntegerType) else 0.0)
        tile = read_tile(value, dims, offsets, padding)
        full = ([self.groups] if self.packed else []) + [self.R, r.tile]
        tile = expand_to(tile, present, full)
        return flatten_rows(tile) if self.packed else tile

    def _index_vectors(self, j: ir.Value, tile: int):
        """linalg.index d of a score op inside the tile, as (rows x tile) i32 vectors."""
        cache: Dict[int, ir.Value] = {}

        def rows_of(per_row: ir.Value) -> ir.Value:
            return broadcast_rows(per_row, tile)

        def make(d: int) -> ir.Value:
            if d in cache:
                return cache[d]
            if d == _S:
                keys = arith.addi(iota_i32(tile), vector.broadcast(vector_type([tile], i32()), to_i32(j)))
                value = vector.broadcast(vector_type([self.rows, tile], i32()), keys)
            elif d == _L:
                rows = iota_i32(self.R)
                if self.packed:
                    rows = flatten_rows(expand_to(rows, [False, True], [self.groups, self.R]))
                value = rows_of(rows)
            elif d == _G and self.packed:
                groups = expand_to(iota_i32(self.groups), [True, False], [self.groups, self.R])
                value = rows_of(flatten_rows(groups))
            else:  # b, h, and g of an unpacked work-group: one value per tile
                value = splat([self.rows, tile], i32(), 0)
            cache[d] = value
            return value
        return make

    # ------------------------------------------------------------------ the key loop

    def _key_ranges(self) -> List[_KeyRange]:
        """The loops over key tiles of this work-group (run-time bounds)."""
        T, S = self.T, self.S
        tiles = arith.ceildivui(S, const_index(T))
        end = arith.muli(tiles, const_index(T))
        visible = None
        if self.spec.causal:
            # Valid rows [row0, row0 + rows_valid) see keys [0, row0 + rows_valid).
            visible = arith.minui(arith.addi(self.row0, self.rows_valid), S)
        if visible is not None:
            tiles = arith.ceildivui(visible, const_index(T))
            end = arith.muli(tiles, const_index(T))
        if self.options.tail == "peel":
            # Tiles wholly below S (reads in bounds, no key check), then the tile holding
            # S - 1 if S is not a multiple of T (a loop of at most one step).
            full_end = arith.muli(arith.divui(S, const_index(T)), const_index(T))
            return [_KeyRange(const_index(0), arith.minui(end, full_end), T, True, False),
                    _KeyRange(full_end, end, T, False, True)]
        start = const_index(0)
        if self.options.kv_splits > 1:
            share = arith.muli(arith.ceildivui(tiles, _value(self.splits)), const_index(T))
            start = arith.minui(arith.muli(self.ivs["p"], share), end)
            end = arith.minui(arith.addi(start, share), end)
        return [_KeyRange(start, end, T, False, True)]

    def _online_softmax(self):
        rows = self.rows
        carried = [splat([rows], self.acc, _NEG_INF), splat([rows], self.acc, 0.0),
                   splat([rows, self.ev], self.acc, 0.0)]
        for r in self._key_ranges():
            loop = scf.ForOp(r.start, r.end, const_index(r.tile), carried)
            loop.operation.attributes["attn.flash_loop"] = ir.UnitAttr.get()
            with ir.InsertionPoint(loop.body):
                scf.YieldOp(list(self._step(loop.induction_variable, r, *loop.inner_iter_args)))
            carried = list(loop.results)
        return carried

    def _scores(self, j: ir.Value, r: _KeyRange):
        """QK^T of the tile and the score chain on it: (scores, factor).

        The softmax runs in base 2: p = exp2((s - m) * log2(e)).  Where nothing
        additive follows the scale (no additive mask) and the scale is positive,
        the scores stay unscaled and `factor` = scale * log2(e) (the row max of
        unscaled scores is the same key's).  Otherwise the score chain runs as
        written and `factor` = log2(e), or, in the fast form (`_exact_exponent`
        false), log2(e) multiplies the scores right after the scale or the mask
        (folded into the scale's constant when nothing follows it) and `factor`
        is None: scores in base-2 units.
        """
        k, k_rows = self._k_operand(j, r)
        dims = ([0, 2], [1, 2] if k_rows else [2, 1], [0, 1])
        s = contract(self.q_tile, k, splat([self.rows, r.tile], self.acc, 0.0), dims)
        translator = BodyTranslator([self.rows, r.tile], self._index_vectors(j, r.tile))
        additive = self.spec.mask is not None and self.spec.mask.kind == "additive"
        fold_after = "mask" if additive else "scale"
        plain = [op for op in self.score_ops if tag_of(op) not in INDEX_MASK_TAGS]
        guarded = [op for op in self.score_ops if tag_of(op) in INDEX_MASK_TAGS]
        exact = self._exact_exponent()
        factor = _LOG2E if exact else None
        if not any(tag_of(op) == "scale" for op in plain):
            # The payload's multiply by the scale is gone: canonicalization erases a multiply
            # by one.  The scores are then the scaled ones already.
            if _rounded_to(self.spec.scale, self.acc) != 1.0:
                raise CompileError(f"flash: no score op tagged 'scale' in the score chain, but the spec's "
                                   f"scale is {self.spec.scale!r}, not 1")
            if not additive:
                factor = _LOG2E  # scale 1: log2(e) in the exponent
        for op in plain:
            if tag_of(op) == "scale" and not additive:
                constant = _scale_constant(op)
                if constant is not None and constant > 0:
                    factor = constant * _LOG2E
                    continue  # applied in the exponent
            extra = [self._operand_tile(op, i, j, r) for i in range(1, len(op.operands) - 1)]
            s = translator.translate(op, [s, *extra, None])
            if tag_of(op) == fold_after and not exact:
                s = _scaled(s, _LOG2E)
        if factor is None and not any(tag_of(op) == fold_after for op in plain):
            raise CompileError(f"flash: no score op tagged {fold_after!r} to fold log2(e) into")
        if guarded or r.key_bound:
            s = self._guarded_masks(s, j, r, guarded, translator)
        self.exponent_factor = factor
        return s, factor

    def _exact_exponent(self) -> bool:
        """Whether exponents are taken as exp2((s - m) * factor) rather than as one FMA,
        exp2(s * factor - m * factor): for f32 and f64 inputs (computed in their own type), whose
        outputs show the FMA form's error, the rounding of s * factor, about |s| ulps where the
        difference form errs by |s - m| ulps.  f16 and bf16 outputs round that away."""
        return self.et == self.acc

    def _guarded_masks(self, s, j, r: _KeyRange, guarded, translator) -> ir.Value:
        """Index masks (keys >= S; causal) only on the tiles that need them."""
        tile_end = arith.addi(j, const_index(r.tile))
        conditions = []
        if r.key_bound:
            conditions.append(arith.cmpi(arith.CmpIPredicate.ugt, tile_end, self.S))
        if guarded:  # the tile's last key lies past the work-group's first row
            conditions.append(arith.cmpi(arith.CmpIPredicate.ugt, tile_end,
                                         arith.addi(self.row0, const_index(1))))
        needed = conditions[0]
        for c in conditions[1:]:
            needed = arith.ori(needed, c)
        branch = scf.IfOp(needed, [s.type], has_else=True)
        with ir.InsertionPoint(branch.then_block):
            masked = s
            for op in guarded:
                masked = translator.translate(op, [masked, None])
            if r.key_bound:
                keys = translator._index_vector(_S)
                inside = arith.cmpi(arith.CmpIPredicate.slt, keys,
                                    vector.broadcast(vector_type([self.rows, r.tile], i32()), to_i32(self.S)))
                masked = arith.select(inside, masked, splat([self.rows, r.tile], self.acc, _NEG_INF))
            scf.YieldOp([masked])
        with ir.InsertionPoint(branch.else_block):
            scf.YieldOp([s])
        return branch.results[0]

    def _step(self, j, r: _KeyRange, m, l, acc):
        """One online-softmax step over the key tile [j, j + r.tile)."""
        rows, tile = self.rows, r.tile
        s, factor = self._scores(j, r)
        tile_max = vector.multi_reduction(ir.Attribute.parse("#vector.kind<maximumf>"), s,
                                          splat([rows], self.acc, _NEG_INF), [1])
        new_max = arith.maximumf(m, tile_max)
        grown = None
        if self.options.rescale_threshold > 0:
            # Lazy rescaling: a row keeps its stale maximum unless the tile's exceeds it by more
            # than the threshold (base-2 units), so p <= 2^threshold; the rows that keep it have
            # alpha = 1 exactly and their accumulator is left as it is (a select a target may
            # skip where no row of its share grew).
            limit = self.options.rescale_threshold / (1.0 if factor is None else factor)
            grown = arith.cmpf(arith.CmpFPredicate.OGT, arith.subf(tile_max, m), splat([rows], self.acc, limit))
            new_max = arith.select(grown, new_max, m)
        base = _exp_base(new_max)
        if factor is None:  # scores in base-2 units already
            alpha = mmath.exp2(arith.subf(m, base))
            p = mmath.exp2(arith.subf(s, broadcast_rows(base, tile)))
        elif self._exact_exponent():  # exp2((x - base) * factor)
            alpha = mmath.exp2(arith.mulf(arith.subf(m, base), splat([rows], self.acc, factor)))
            p = mmath.exp2(arith.mulf(arith.subf(s, broadcast_rows(base, tile)),
                                      splat([rows, tile], self.acc, factor)))
        else:               # m, s unscaled: exp2(x * factor - base * factor), FMAs
            base = arith.mulf(base, splat([rows], self.acc, factor))
            alpha = mmath.exp2(_fms(m, splat([rows], self.acc, factor), base))
            p = mmath.exp2(_fms(s, splat([rows, tile], self.acc, factor), broadcast_rows(base, tile)))
        if grown is not None:  # exactly 1 where the maximum was kept (the FMA above may round)
            alpha = arith.select(grown, alpha, splat([rows], self.acc, 1.0))
        tile_sum = vector.multi_reduction(ir.Attribute.parse("#vector.kind<add>"), p,
                                          splat([rows], self.acc, 0.0), [1])
        new_sum = arith.addf(arith.mulf(l, alpha, fastmath=_contract_flag()), tile_sum, fastmath=_contract_flag())
        v = read_tile(self.v, [(2, tile, r.in_bounds), (3, self.ev, True)], {2: j},
                      arith.constant(self.et, 0.0))
        if self.dropout is not None:  # the row sum keeps every key; P.V only the kept ones, scaled
            # (a translator of its own: the score chain's may hold index vectors of an scf.if)
            p = BodyTranslator([rows, tile], self._index_vectors(j, tile)).translate(self.dropout, [p, None])
        if self.options.pv_in_f32 or self.et == self.acc:
            v = _convert(v, self.acc)
        else:
            p = _convert(p, self.et)
        scaled = arith.mulf(acc, broadcast_rows(alpha, self.ev))
        if grown is not None:
            scaled = arith.select(broadcast_rows(grown, self.ev), scaled, acc)
        new_acc = contract(p, v, scaled, ([0, 2], [2, 1], [0, 1]))
        return new_max, new_sum, new_acc

    # ------------------------------------------------------------------ results

    def _normalized(self, acc: ir.Value, l: ir.Value) -> ir.Value:
        """acc / l per row as one reciprocal per row; rows with no visible key give 0."""
        return _normalize(acc, l, self.ev, self.out_et)

    def _out_dims(self):
        dims = [(2, True)] if self.packed else []
        return dims + [(3, False), (4, True)]

    def _write_output(self, out: ir.Value) -> ir.Value:
        dests = [op for op in self.body.operations if op.operation.name == "tensor.extract_slice"
                 and op.operation.operands[0] == self.out_arg]
        if len(dests) != 1:
            raise CompileError(f"flash: expected one slice of the output per work-group, found {len(dests)}")
        if self.packed:
            out = unflatten_rows(out, self.groups)
        return write_tile(out, dests[0].results[0], self._out_dims(), {})

    # ------------------------------------------------------------------ split keys

    def _split(self, m, l, acc) -> None:
        """Partials to workspaces; a combine loop merges them into the output."""
        options, spec = self.options, self.spec
        P, R, ev = self.splits, self.R, self.ev
        b_ub, h_ub, g_ub, _, r_ub = forall_upper_bounds(self.loop)
        out_init = self.loop.opview.outputs[0]
        payload_lse, lse_init = self._payload_log_sum_exp() if spec.kernel == "forward_lse" else (None, None)
        with ir.InsertionPoint(self.loop), self.loop.location:
            batch, heads = (tensor.dim(out_init, const_index(i)) for i in (0, 1))
            padded_rows = arith.muli(_value(r_ub), const_index(R))
            shape = [P, batch, heads, spec.group, padded_rows]
            # alloc_tensor, not tensor.empty: three distinct buffers (CSE would merge empties)
            workspaces = [_new_tensor(shape, self.acc), _new_tensor(shape, self.acc),
                          _new_tensor(shape + [ev], self.acc)]
        self.insert.erase()
        loop = rebuild_forall(self.loop, forall_upper_bounds(self.loop), [0, 1, 2, 3, 4],
                              [out_init] + workspaces, block_mapping(5))
        ivs = dict(zip("bhgpr", loop.induction_variables))
        terminator = loop.body.operations[len(loop.body.operations) - 1].operation
        writes = []
        with ir.InsertionPoint(terminator), loop.location:
            g0 = const_index(0) if self.packed else ivs["g"]
            row0 = arith.muli(ivs["r"], const_index(R))  # (values of the old loop may be its ivs)
            if self.exponent_factor is not None:  # partial maxima in base-2 units for the combine
                m = arith.mulf(m, splat([self.rows], self.acc, self.exponent_factor))
            for value, arg, has_ev in ((m, loop.inner_iter_args[1], False), (l, loop.inner_iter_args[2], False),
                                       (acc, loop.inner_iter_args[3], True)):
                offsets = [ivs["p"], ivs["b"], ivs["h"], g0, row0] + ([0] if has_ev else [])
                sizes = [1, 1, 1, self.groups, R] + ([ev] if has_ev else [])
                dest = slice_of(arg, offsets, sizes)
                tile = unflatten_rows(value, self.groups) if self.packed else value
                dims = [(3, True)] if self.packed else []
                dims += [(4, True)] + ([(5, True)] if has_ev else [])
                writes.append((write_tile(tile, dest, dims, {}), arg, offsets, sizes))
        with ir.InsertionPoint(terminator.regions[0].blocks[0]):
            for tile, arg, offsets, sizes in writes:
                insert_in_parallel(tile, arg, offsets, sizes)
        partials = list(loop.results)[1:]
        with ir.InsertionPoint.after(loop), loop.location:
            combine = self._combine(partials, out_init, [b_ub, h_ub, g_ub, r_ub], lse_init)
        loop.results[0].replace_all_uses_with(combine.results[0])
        if payload_lse is not None:
            payload_lse.results[0].replace_all_uses_with(combine.results[1])
            payload_lse.erase()

    def _combine(self, partials, out_init, upper_bounds, lse_init: Optional[ir.Value] = None):
        """forall (b, h, g, r, c): merge the P partials of each row tile's c-th tile of value
        columns (ScheduleOptions.combine_cols), normalize, write; with `lse_init` (forward_lse)
        also the rows' log-sum-exp from the merged max and sum, written by the c = 0
        work-groups (the others insert an empty slice)."""
        R, ev, P = self.R, self.ev, self.splits
        cols = self.options.combine_cols
        cols = cols if 0 < cols < ev and ev % cols == 0 else ev
        bounds = list(upper_bounds) + [ev // cols]
        outs = [out_init] + ([lse_init] if lse_init is not None else [])
        loop = scf.ForallOp([0] * 5, bounds, [1] * 5, outs, mapping=block_mapping(5))
        loop.attributes[COMBINE_LOOP] = ir.UnitAttr.get()
        ivs = dict(zip("bhgrc", loop.induction_variables))
        out_arg = loop.inner_iter_args[0]
        with ir.InsertionPoint(loop.body):
            g0 = const_index(0) if self.packed else ivs["g"]
            row0 = arith.muli(ivs["r"], const_index(R))
            col0 = arith.muli(ivs["c"], const_index(cols))
            length = tensor.dim(out_arg, const_index(3))
            valid = arith.minui(const_index(R), arith.subi(length, row0))
            rows = self.rows
            carried = [splat([rows], self.acc, _NEG_INF), splat([rows], self.acc, 0.0),
                       splat([rows, cols], self.acc, 0.0)]
            merge = scf.ForOp(const_index(0), _value(P), const_index(1), carried)
            with ir.InsertionPoint(merge.body):
                p = merge.induction_variable
                zero = arith.constant(self.acc, 0.0)

                def part(ws, has_ev):
                    dims = [(3, self.groups, True)] if self.packed else []
                    dims += [(4, R, True)] + ([(5, cols, True)] if has_ev else [])
                    offsets = {0: p, 1: ivs["b"], 2: ivs["h"], 3: g0, 4: row0}
                    if has_ev:
                        offsets[5] = col0
                    tile = read_tile(ws, dims, offsets, zero)
                    return flatten_rows(tile) if self.packed else tile
                m_p, l_p, acc_p = part(partials[0], False), part(partials[1], False), part(partials[2], True)
                m, l, acc = merge.inner_iter_args
                new_max = arith.maximumf(m, m_p)
                base = _exp_base(new_max)
                a, w = mmath.exp2(arith.subf(m, base)), mmath.exp2(arith.subf(m_p, base))
                new_sum = arith.addf(arith.mulf(l, a), arith.mulf(l_p, w))
                new_acc = arith.addf(arith.mulf(acc, broadcast_rows(a, cols)),
                                     arith.mulf(acc_p, broadcast_rows(w, cols)))
                scf.YieldOp([new_max, new_sum, new_acc])
            out = _normalize(merge.results[2], merge.results[1], cols, self.out_et)
            if self.packed:
                out = unflatten_rows(out, self.groups)
            offsets = [ivs["b"], ivs["h"], g0, row0, col0]
            sizes = [1, 1, self.groups, valid, cols]
            dest = slice_of(out_arg, offsets, sizes)
            written = write_tile(out, dest, self._out_dims(), {})
            lse_write = None
            if lse_init is not None:
                lse_write = self._combined_log_sum_exp(merge.results[0], merge.results[1], loop, ivs, g0, row0,
                                                       valid)
            in_parallel = scf.InParallelOp()
            with ir.InsertionPoint(in_parallel.block):
                insert_in_parallel(written, out_arg, offsets, sizes)
                if lse_write is not None:
                    insert_in_parallel(*lse_write)
        return loop

    def _combined_log_sum_exp(self, m, l, loop, ivs, g0, row0, valid):
        """The merged rows' log-sum-exp (m in base-2 units) as a tile written into the combine
        loop's second shared out: (tile, out, offsets, sizes), `valid` rows from the c = 0
        work-group and none from the others."""
        first = arith.cmpi(arith.CmpIPredicate.eq, ivs["c"], const_index(0))
        rows = arith.select(first, valid, const_index(0))
        lse = self._log_sum_exp(m, l, base2=True)
        return self._lse_tile(lse, loop.inner_iter_args[1], ivs, g0, row0, rows)

    # ------------------------------------------------------------------ K^T workspace

    def _materialize_k_transpose(self) -> ir.Value:
        return materialize_transposed(self.k_full, self.T, self.e, K_TRANSPOSE_LOOP)


def materialize_transposed(source: ir.Value, T: int, width: int, attribute: str) -> ir.Value:
    """forall (b, h, t): each (T x width) tile of `source` (a (B, H, S, width) K or V) -> the
    (width x T) tile t of a workspace laid out tile by tile, (B, H, tiles, width, T): a tile's
    rows are contiguous, so reading one walks width * T consecutive elements instead of width
    rows a whole key length apart (a power-of-two stride maps them all to one cache set).  One
    vector.transpose per tile: a target splits it into register-sized pieces if it wants them.
    The loop carries `attribute`."""
    element = ir.RankedTensorType(source.type).element_type
    B, H, S = (tensor.dim(source, const_index(i)) for i in range(3))
    tiles = arith.ceildivui(S, const_index(T))
    workspace = tensor.empty([B, H, tiles, width, T], element)
    loop = scf.ForallOp([0] * 3, [B, H, tiles], [1] * 3, [workspace], mapping=block_mapping(3))
    loop.attributes[attribute] = ir.UnitAttr.get()
    b, h, t = loop.induction_variables
    out = loop.inner_iter_args[0]
    with ir.InsertionPoint(loop.body):
        s0 = arith.muli(t, const_index(T))
        offsets, sizes = [b, h, t, 0, 0], [1, 1, 1, width, T]
        rows = read_tile(source, [(2, T, False), (3, width, True)], {0: b, 1: h, 2: s0},
                         arith.constant(element, 0.0))
        transposed = vector.transpose(vector_type([width, T], element), rows, [1, 0])
        tile = write_tile(transposed, slice_of(out, offsets, sizes), [(3, True), (4, True)], {})
        in_parallel = scf.InParallelOp()
        with ir.InsertionPoint(in_parallel.block):
            insert_in_parallel(tile, out, offsets, sizes)
    return loop.results[0]


# --------------------------------------------------------------------------- small pieces


def _rounded_to(value: float, element: ir.Type) -> float:
    """`value` as the float type `element` holds it (the payload's constants are in that type)."""
    if ir.FloatType(element).width == 32:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    return value


def _value(bound) -> ir.Value:
    return const_index(bound) if isinstance(bound, int) else bound


def _new_tensor(shape, element: ir.Type) -> ir.Value:
    """A fresh tensor (bufferization.alloc_tensor) of `shape` (ints and index values)."""
    static = [d if isinstance(d, int) else ir.ShapedType.get_dynamic_size() for d in shape]
    dynamic = [d for d in shape if not isinstance(d, int)]
    return bufferization.alloc_tensor(ir.RankedTensorType.get(static, element), dynamic)


def contract(lhs, rhs, acc, dims) -> ir.Value:
    """vector.contract over loop dims (m, n, k) = (0, 1, 2), k reduced; `dims` lists the loop
    dims of lhs, rhs and acc in their vector dims' order (([0, 2], [2, 1], [0, 1]): A . B)."""
    maps = [ir.AffineMap.get(3, 0, [ir.AffineExpr.get_dim(d) for d in ds]) for ds in dims]
    iterators = ir.ArrayAttr.get([ir.Attribute.parse(f"#vector.iterator_type<{k}>")
                                  for k in ("parallel", "parallel", "reduction")])
    return vector.contract(acc.type, lhs, rhs, acc, ir.ArrayAttr.get([ir.AffineMapAttr.get(m) for m in maps]),
                           iterators)


def _convert(value: ir.Value, element: ir.Type) -> ir.Value:
    vt = ir.VectorType(value.type)
    if vt.element_type == element:
        return value
    target = vector_type(vt.shape, element)
    widen = ir.FloatType(element).width > ir.FloatType(vt.element_type).width
    return (arith.extf if widen else arith.truncf)(target, value)


def _exp_base(row_max: ir.Value) -> ir.Value:
    """Rows with no visible key so far keep max -inf; shift them by 0 so that
    exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN."""
    vt = ir.VectorType(row_max.type)
    rows, element = vt.shape, vt.element_type
    empty = arith.cmpf(arith.CmpFPredicate.OEQ, row_max, splat(rows, element, _NEG_INF))
    return arith.select(empty, splat(rows, element, 0.0), row_max)


def _normalize(acc: ir.Value, total: ir.Value, ev: int, element: ir.Type) -> ir.Value:
    vt = ir.VectorType(total.type)
    rows, kind = vt.shape, vt.element_type
    zero = splat(rows, kind, 0.0)
    inverse = arith.select(arith.cmpf(arith.CmpFPredicate.OEQ, total, zero), zero,
                           arith.divf(splat(rows, kind, 1.0), total))
    return _convert(arith.mulf(acc, broadcast_rows(inverse, ev)), element)


def _contract_flag() -> ir.Attribute:
    """fastmath<contract>: a product feeding a sum may fuse into one FMA."""
    return ir.Attribute.parse("#arith.fastmath<contract>")


def _fms(x: ir.Value, factor: ir.Value, base: ir.Value) -> ir.Value:
    """x * factor - base, contractible into one FMA."""
    return arith.subf(arith.mulf(x, factor, fastmath=_contract_flag()), base, fastmath=_contract_flag())


def _scale_constant(op: ir.Operation) -> Optional[float]:
    """c of a score op whose body is `mulf(score, c)` with c a float constant, else None."""
    body = [o.operation for o in op.regions[0].blocks[0].operations]
    if len(body) != 2 or body[0].name != "arith.mulf":
        return None
    operands = list(body[0].operands)
    if operands[0] != op.regions[0].blocks[0].arguments[0]:
        return None
    constant = defining_op(operands[1])
    if constant is None or constant.name != "arith.constant":
        return None
    return ir.FloatAttr(constant.attributes["value"]).value


def _scaled(scores: ir.Value, factor: float) -> ir.Value:
    """scores * factor; folded into the constant when `scores` is itself a product by a constant."""
    op = defining_op(scores)
    vt = ir.VectorType(scores.type)
    if op is not None and op.name == "arith.mulf":
        for i in (0, 1):
            constant = _splat_constant(op.operands[i])
            if constant is not None:
                with ir.InsertionPoint(op), op.location:
                    op.operands[i] = splat(vt.shape, vt.element_type, constant * factor)
                return scores
    return arith.mulf(scores, splat(vt.shape, vt.element_type, factor))


def _splat_constant(value: ir.Value) -> Optional[float]:
    """The float of a splat constant or of a broadcast of a scalar constant, else None."""
    op = defining_op(value)
    if op is not None and op.name == "vector.broadcast":
        op = defining_op(op.operands[0])
        if op is not None and op.name == "arith.constant":
            return ir.FloatAttr(op.attributes["value"]).value
        return None
    if op is not None and op.name == "arith.constant":
        attr = op.attributes["value"]
        if isinstance(attr, ir.DenseElementsAttr) and attr.is_splat:
            return ir.FloatAttr(attr.get_splat_value()).value
    return None
