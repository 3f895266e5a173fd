"""Shared stage "flash" of a backward kernel: standard attention's backward -> three work-group loops.

Input: the backward payload (payload.py `_backward`): the score chain, P = exp(scores - lse),
and the contractions of dV, dP, dQ, dK with the row terms Delta, each tagged.  Output: three
normalized, mapped work-group loops on vectors of full static tiles, none of which holds an
L x S tensor:

    delta   forall (b, h, g, 0, r)      Delta[rows] = rowsum(dOut * Out) - dLSE  -> a workspace
    dq      forall (b, h, g, 0, r)      row_tile query rows, an scf.for over key tiles:
                                            s = score chain (q . K^T) ; P = exp2((s - lse) log2 e)
                                            dS = P * (dOut . V^T - Delta) ; dQ += dS . K
                                        dQ * scale written once
    dkv     forall (b, h, 0, 0, t)      kv_tile keys, scf.for over the G query heads and over the
                                        row tiles that see the keys:
                                            s, P, dS as above (the same tile, transposed roles)
                                            dV += P^T . dOut ; dK += dS^T . Q
                                        dK * scale and dV written once

dQ is computed by a second pass over the key tiles instead of being accumulated atomically
from the dK/dV loop: every output element is written by one work-group, so results are
deterministic and no target needs float atomics.  The cost is the recomputation of the score
tile and dP in both loops (the backward's 2.5 forward matmuls become 3.5).

With dropout, the payload's dropout ops (tags "dropout" on P, "dp_dropout" on dP) are re-emitted
per tile: dV takes Z * P, dS = P * (Z * dP - Delta), Z regenerated from the seed.

Conventions of the fused kernel that the payload does not show: rows past L read lse as +inf
(P = 0: they contribute nothing), a row that saw no key has lse = -inf and gradient 0 (its lse
is taken as +inf), keys at or past S are masked to -inf in the dQ loop and never written in
the dK/dV loop; causal loops visit only the tiles that hold a visible (row, key) pair.
Accumulation is in the accumulator type (f32, f64 for float64).  The contractions' operands are
in the accumulator type too (tiles of f16/bf16 inputs extended), or, with
ScheduleOptions.pv_in_f32 False, in the inputs' type: Q, K, V and dOut tiles as read, P and dS
rounded to it (what f16/bf16 matrix engines take, as FlashAttention does).  Delta is a row
reduction or an FMA chain (ScheduleOptions.backward_delta).  K and V enter Q . K^T and dOut . V^T as
ScheduleOptions.k_layout says: as read ("folded"), transposed per tile ("explicit"), or from
transposed copies made once by loops of their own (attn.k_transpose, attn.v_transpose:
"materialized").  With ScheduleOptions.backward_tiles "keys_by_rows" the dK/dV loops' tiles are
(keys x rows) instead: S^T = K Q^T, P^T, dP^T = V dOut^T, dS^T, with lse and Delta broadcast
along columns and masks read through transposing maps, so that dV += P^T dOut and dK += dS^T Q
take P^T and dS^T as plain left operands (a GPU's tensor cores need them so: an accumulator tile
is a register operand only in its own orientation).  The backward reads row_tile, kv_tile,
k_layout, pv_in_f32 and the backward_* fields of the schedule options.  With
ScheduleOptions.backward_dkv "apart" dK and dV come from two loops of their own (each recomputing
S and P; dV's without dP): half the accumulators a work-group holds, for wide heads.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from mlir import ir
from mlir.dialects import arith, math as mmath, scf, tensor, vector

from ..mlir_utils import (CompileError, accumulator_type, const_index, insert_in_parallel, slice_of, tag_of,
                          walk)
from ..payload import FUNC_NAME
from ..spec import AttentionSpec
from .flash import (K_TRANSPOSE_LOOP, V_TRANSPOSE_LOOP, contract, _convert, _new_tensor, _score_ops,
                    materialize_transposed)
from .options import ScheduleOptions
from .tiling import WORK_GROUP_ROWS, block_mapping
from .vector_tiles import (BodyTranslator, broadcast_rows, expand_to, i32, iota_i32, read_tile, splat, to_i32,
                           vector_type, write_tile)

_LOG2E = 1.4426950408889634
#: tags the backward payload must hold, one op each.
BACKWARD_TAGS = ("qk", "probs", "dv", "dp", "delta_dot", "delta", "ds", "dq", "dk", "dq_out", "dk_out",
                 "dv_out")
#: unit attributes of the three loops.
DELTA_LOOP, DQ_LOOP, DKV_LOOP = "attn.backward_delta", "attn.backward_dq", "attn.backward_dkv"
#: loop dims of the score-shaped ops.
_B, _H, _G, _L, _S = range(5)


def check_backward_payload(module: ir.Module) -> None:
    """The backward payload holds each tagged op the flash stage builds on, once."""
    for tag in BACKWARD_TAGS:
        found = walk(module, lambda o, t=tag: tag_of(o) == t)
        if len(found) != 1:
            raise CompileError(f"backward: expected one op tagged {tag!r} in the payload, found {len(found)}")


def build_backward(module: ir.Module, spec: AttentionSpec, options: ScheduleOptions) -> None:
    """Replace the backward payload's ops by the delta, dq and dkv work-group loops."""
    check_backward_payload(module)
    _Backward(module, spec, options).build()


def _score_chain(probs: ir.Operation) -> List[ir.Operation]:
    """The elementwise score ops between QK^T and P, in order."""
    _, ops = _score_ops(probs.operands[0])
    return ops


#: C[m, n] += A[m, k] B[n, k] (B's rows along k: a K or V tile as read)
_FOLDED = ([0, 2], [1, 2], [0, 1])
#: C[m, n] += A[m, k] B[k, n]
_ROW_MAJOR = ([0, 2], [2, 1], [0, 1])
#: C[m, n] += A[k, m] B[k, n] (A transposed: P^T . dOut, dS^T . Q)
_A_TRANSPOSED = ([2, 0], [2, 1], [0, 1])


def _row_dot(a: ir.Value, b: ir.Value, rows: int, width: int, element: ir.Type, form: str) -> ir.Value:
    """sum_e a[r, e] * b[r, e] of two (rows x width) tiles: a row reduction of their product
    (`form` "reduction"), or one FMA chain over e from zero ("chain").

    The chain sums e in order from zero, as a contraction lowered to one FMA per k step (the
    cpu target's micro-kernel) sums dOut . V^T: there, where Out is one key's V (a row with
    one visible key), Delta equals dP bit for bit and the score gradient P * (dP - Delta) is
    exactly 0, as the softmax's own backward gives.  A target that sums dP in another order
    (tensor-core MMAs) gets that 0 to within rounding, and takes the reduction."""
    if form == "reduction":
        return vector.multi_reduction(ir.Attribute.parse("#vector.kind<add>"), arith.mulf(a, b),
                                      splat([rows], element, 0.0), [1])
    columns = vector_type([width, rows], element)
    a_columns = vector.transpose(columns, a, [1, 0])
    b_columns = vector.transpose(columns, b, [1, 0])
    total = splat([rows], element, 0.0)
    for e in range(width):
        total = vector.fma(vector.extract(a_columns, [], [e]), vector.extract(b_columns, [], [e]), total)
    return total


class _Backward:
    """The backward payload of one function and the loops that replace it."""

    def __init__(self, module: ir.Module, spec: AttentionSpec, options: ScheduleOptions):
        self.spec, self.options = spec, options
        fn = next(op.operation for op in module.body.operations if op.operation.name == "func.func"
                  and ir.StringAttr(op.operation.attributes["sym_name"]).value == FUNC_NAME)
        self.block = fn.regions[0].blocks[0]
        self.args = dict(zip(spec.operand_names(), self.block.arguments))
        self.tensors: Dict[str, ir.Value] = {}
        self.materialize: Dict[str, ir.Operation] = {}
        for op in self.block.operations:
            op = op.operation
            if op.name == "bufferization.to_tensor":
                name = next(n for n, a in self.args.items() if a == op.operands[0])
                self.tensors[name] = op.results[0]
            elif op.name == "bufferization.materialize_in_destination":
                name = next(n for n, a in self.args.items() if a == op.operands[1])
                self.materialize[name] = op
        self.probs = walk(module, lambda o: tag_of(o) == "probs")[0]
        dropout = {tag: walk(module, lambda o, t=tag: tag_of(o) == t) for tag in ("dropout", "dp_dropout")}
        self.dropout = {tag: ops[0] if ops else None for tag, ops in dropout.items()}
        self.score_ops = _score_chain(self.probs)
        self.R, self.T = options.row_tile, options.kv_tile
        self.G, self.E, self.EV = spec.group, spec.head_dim, spec.v_head_dim
        self.et = element_type_of(self.tensors["q"])
        self.acc = accumulator_type(spec.dtype)
        #: the contractions' operand type: the inputs' (16-bit matrix engines) or the accumulator's
        self.operand_type = self.acc if options.pv_in_f32 else self.et

    def build(self) -> None:
        anchor = self.materialize["dq"]
        with ir.InsertionPoint(anchor), anchor.location:
            q, k = self.tensors["q"], self.tensors["k"]
            self.B, self.H = tensor.dim(q, const_index(0)), tensor.dim(q, const_index(1))
            self.L, self.S = tensor.dim(q, const_index(3)), tensor.dim(k, const_index(2))
            self.row_tiles = arith.ceildivui(self.L, const_index(self.R))
            self.transposed = {}
            if self.options.k_layout == "materialized":
                self.transposed = {"k": materialize_transposed(k, self.T, self.E, K_TRANSPOSE_LOOP),
                                   "v": materialize_transposed(self.tensors["v"], self.T, self.EV, V_TRANSPOSE_LOOP)}
            delta = self._delta_loop()
            if self.options.backward_dq == "per_head":
                dq, dk, dv = self._head_loop(delta)
            else:
                dq = self._dq_loop(delta)
                if self.options.backward_dkv == "apart":
                    (dk,), (dv,) = self._dkv_loop(delta, ("dk",)), self._dkv_loop(delta, ("dv",))
                else:
                    dk, dv = self._dkv_loop(delta)
        for name, value in (("dq", dq), ("dk", dk), ("dv", dv)):
            self.materialize[name].operands[0] = value

    # ------------------------------------------------------------------ pieces

    def _loop(self, bounds, outs, attribute: str, rows: Optional[int] = None):
        """A work-group forall over `bounds` marked `attribute`, whose tiles have `rows` rows (None:
        tiles of several shapes, a loop for CPU threads)."""
        loop = scf.ForallOp([0] * 5, list(bounds), [1] * 5, list(outs), mapping=block_mapping(5))
        loop.attributes[attribute] = ir.UnitAttr.get()
        if rows is not None:
            loop.attributes[WORK_GROUP_ROWS] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), rows)
        return loop, dict(zip("bhgpr", loop.induction_variables))

    def _rows(self, name: str, width: Optional[int], b, h, g, row0, padding: float,
              element: Optional[ir.Type] = None) -> ir.Value:
        """R rows of a (B, H, G, L[, width]) operand from row0, in `element` (the accumulator
        type unless given); rows past L read `padding`."""
        source = self.tensors[name] if isinstance(name, str) else name
        dims = [(3, self.R, False)] + ([(4, width, True)] if width is not None else [])
        tile = read_tile(source, dims, {0: b, 1: h, 2: g, 3: row0}, arith.constant(element_type_of(source), padding))
        return _convert(tile, element or self.acc)

    def _operand_rows(self, name: str, width: int, b, h, g, row0) -> ir.Value:
        """R rows of Q or dOut as a contraction operand (rows past L: zeros)."""
        return self._rows(name, width, b, h, g, row0, 0.0, self.operand_type)

    def _keys(self, name: str, width: int, b, h, j) -> ir.Value:
        """T rows of K or V from key j as a contraction operand (past S: zeros)."""
        source = self.tensors[name]
        tile = read_tile(source, [(2, self.T, False), (3, width, True)], {0: b, 1: h, 2: j},
                         arith.constant(self.et, 0.0))
        return _convert(tile, self.operand_type)

    def _operand(self, tile: ir.Value) -> ir.Value:
        """A computed tile (P, dS) as a contraction's left operand: rounded to the operand type."""
        return _convert(tile, self.operand_type)

    def _lse_base(self, b, h, g, row0) -> ir.Value:
        """lse of the rows, with +inf for rows past L and for rows that saw no key (lse = -inf):
        exp(s - base) is then 0 for them."""
        lse = self._rows("lse", None, b, h, g, row0, float("inf"))
        empty = arith.cmpf(arith.CmpFPredicate.OEQ, lse, splat([self.R], self.acc, float("-inf")))
        return arith.select(empty, splat([self.R], self.acc, float("inf")), lse)

    def _index_vectors(self, b, h, g, row0, j, keys_first: bool = False):
        """linalg.index d of a score op, as i32 vectors of the global indices over the tile:
        (R x T), or (T x R) with `keys_first`."""
        R, T = self.R, self.T
        shape = vector_type(self._tile_shape(keys_first), i32())

        def make(d: int) -> ir.Value:
            if d == _S:
                keys = arith.addi(iota_i32(T), vector.broadcast(vector_type([T], i32()), to_i32(j)))
                return broadcast_rows(keys, R) if keys_first else vector.broadcast(shape, keys)
            if d == _L:
                rows = arith.addi(iota_i32(R), vector.broadcast(vector_type([R], i32()), to_i32(row0)))
                return vector.broadcast(shape, rows) if keys_first else broadcast_rows(rows, T)
            return vector.broadcast(shape, to_i32({_B: b, _H: h, _G: g}[d]))
        return make

    def _mask_tile(self, generic: ir.Operation, index: int, b, h, g, row0, j, keys_first: bool = False) -> ir.Value:
        """Operand `index` of a score op (a mask) as an (R x T) vector, broadcast where it is; with
        `keys_first` a (T x R) vector, read through a transposing map."""
        value = generic.operands[index]
        amap = ir.AffineMapAttr(ir.ArrayAttr(generic.attributes["indexing_maps"])[index]).value
        loop_dims = [ir.AffineDimExpr(e).position for e in amap.results]
        starts = {_B: b, _H: h, _G: g, _L: row0, _S: j}
        offsets = {i: starts[d] for i, d in enumerate(loop_dims)}
        sizes = {_L: self.R, _S: self.T}
        order = (_S, _L) if keys_first else (_L, _S)
        dims = [(loop_dims.index(d), sizes[d], False) for d in order if d in loop_dims]
        present = [d in loop_dims for d in order]
        if not dims:  # varies along neither rows nor keys: read its one element
            dims = [(len(loop_dims) - 1, 1, True)]
        element = element_type_of(value)
        padding = arith.constant(element, 0 if isinstance(element, ir.IntegerType) else 0.0)
        return expand_to(read_tile(value, dims, offsets, padding), present, [sizes[d] for d in order])

    def _transposed_operand(self, name: str, width: int, b, h, j):
        """K or V as the right operand of Q . K^T or dOut . V^T for keys j..: (the tile, the
        contraction's maps), by ScheduleOptions.k_layout: the (T x width) tile as read
        ("folded"), transposed in registers ("explicit"), or the (width x T) tile of the
        transposed copy ("materialized")."""
        if self.options.k_layout == "materialized":
            tile = read_tile(self.transposed[name], [(3, width, True), (4, self.T, True)],
                             {0: b, 1: h, 2: arith.divui(j, const_index(self.T))}, arith.constant(self.et, 0.0))
            return _convert(tile, self.operand_type), _ROW_MAJOR
        tile = self._keys(name, width, b, h, j)
        if self.options.k_layout == "explicit":
            return vector.transpose(vector_type([width, self.T], self.operand_type), tile, [1, 0]), _ROW_MAJOR
        return tile, _FOLDED

    def _rows_as_right(self, tile: ir.Value, width: int):
        """An (R x width) tile of Q or dOut as the right operand of K Q^T or V dOut^T (keys
        first): (the operand, the contraction's maps).  As read (folded maps), or with k_layout
        "explicit" transposed in registers for a row-major contraction, as the K and V tiles of
        Q K^T and dOut V^T are (what XeGPU's vector-to-xegpu conversion makes a dpas of)."""
        if self.options.k_layout == "explicit":
            return vector.transpose(vector_type([width, self.R], self.operand_type), tile, [1, 0]), _ROW_MAJOR
        return tile, _FOLDED

    def _scores(self, q_tile, k_operand, b, h, g, row0, j, mask_keys: bool, keys_first: bool = False,
                dp_of=None):
        """The score chain on the (R x T) tile of rows row0.. and keys j.. (`k_operand`: the K
        tile and the contraction's maps); with `keys_first` on the (T x R) tile S^T = K Q^T
        (`k_operand`: the K tile as read).  With `mask_keys`, keys at or past S are -inf.
        Returns (s, dp_of()): `dp_of` (the tile's other product, dP) is emitted between the
        product Q K^T and the chain that reads it, which does not need it: a GPU's tensor
        cores compute the two products back to back while the chain and P wait for the first."""
        shape = self._tile_shape(keys_first)
        if keys_first:
            q_operand, maps = self._rows_as_right(q_tile, self.E)
            s = contract(k_operand, q_operand, splat(shape, self.acc, 0.0), maps)
        else:
            s = contract(q_tile, k_operand[0], splat(shape, self.acc, 0.0), k_operand[1])
        index_vectors = self._index_vectors(b, h, g, row0, j, keys_first)
        translator = BodyTranslator(shape, index_vectors)
        self.translator = translator  # the tile's: the dropout's body runs on it too
        dp = dp_of() if dp_of is not None else None
        for op in self.score_ops:
            extra = [self._mask_tile(op, i, b, h, g, row0, j, keys_first) for i in range(1, len(op.operands) - 1)]
            s = translator.translate(op, [s, *extra, None])
        if mask_keys:
            inside = arith.cmpi(arith.CmpIPredicate.slt, index_vectors(_S),
                                vector.broadcast(vector_type(shape, i32()), to_i32(self.S)))
            s = arith.select(inside, s, splat(shape, self.acc, float("-inf")))
        return s, dp

    def _tile_shape(self, keys_first: bool) -> List[int]:
        """The score tile's shape: (R x T), or (T x R) keys first."""
        return [self.T, self.R] if keys_first else [self.R, self.T]

    def _per_row(self, rows: ir.Value, keys_first: bool) -> ir.Value:
        """A per-query-row vector (R) over the score tile: constant along each row of an (R x T)
        tile, along each column of a (T x R) one."""
        if keys_first:
            return vector.broadcast(vector_type(self._tile_shape(True), self.acc), rows)
        return broadcast_rows(rows, self.T)

    def _probabilities(self, s, lse_base, keys_first: bool = False) -> ir.Value:
        """P = exp2((s - lse) * log2(e)) (P^T with `keys_first`)."""
        shifted = arith.subf(s, self._per_row(lse_base, keys_first))
        return mmath.exp2(arith.mulf(shifted, splat(self._tile_shape(keys_first), self.acc, _LOG2E)))

    def _dropped(self, value: ir.Value, tag: str) -> ir.Value:
        """value * Z on the current tile (the payload's dropout op `tag`), or value without dropout."""
        op = self.dropout[tag]
        return value if op is None else self.translator.translate(op, [value, None])

    def _dp(self, do_tile, v_operand, keys_first: bool = False) -> ir.Value:
        """Z * dP = Z * dOut . V^T (`v_operand`: the V tile and the contraction's maps); with
        `keys_first` Z * dP^T = Z * V . dOut^T (`v_operand`: the V tile as read)."""
        zero = splat(self._tile_shape(keys_first), self.acc, 0.0)
        if keys_first:
            do_operand, maps = self._rows_as_right(do_tile, self.EV)
            dp = contract(v_operand, do_operand, zero, maps)
        else:
            dp = contract(do_tile, v_operand[0], zero, v_operand[1])
        return self._dropped(dp, "dp_dropout")

    def _score_gradient(self, p, dp, delta, keys_first: bool = False) -> ir.Value:
        """dS = P * (Z * dP - Delta) (dS^T with `keys_first`)."""
        return arith.mulf(p, arith.subf(dp, self._per_row(delta, keys_first)))

    def _gradient_out(self, name: str, value: ir.Value) -> ir.Value:
        """An accumulated tile of gradient `name` as written: dQ and dK times the scale, in its
        tensor's type (the inputs', or the accumulator's for a spec's wide gradients)."""
        if name != "dv":
            value = arith.mulf(value, splat(ir.VectorType(value.type).shape, self.acc, self.spec.scale))
        return _convert(value, element_type_of(self.tensors[name]))

    # ------------------------------------------------------------------ the loops

    def _delta_loop(self) -> ir.Value:
        """Delta = rowsum(dOut * Out) - dLSE per query row, into a (B, H, G, L) workspace."""
        workspace = _new_tensor([self.B, self.H, self.G, self.L], self.acc)
        loop, iv = self._loop([self.B, self.H, self.G, 1, self.row_tiles], [workspace], DELTA_LOOP, self.R)
        with ir.InsertionPoint(loop.body):
            b, h, g = iv["b"], iv["h"], iv["g"]
            row0 = arith.muli(iv["r"], const_index(self.R))
            out = self._rows("out", self.EV, b, h, g, row0, 0.0)
            dout = self._rows("dout", self.EV, b, h, g, row0, 0.0)
            dlse = self._rows("dlse", None, b, h, g, row0, 0.0)
            delta = arith.subf(_row_dot(dout, out, self.R, self.EV, self.acc, self.options.backward_delta), dlse)
            self._write_rows(loop, delta, [b, h, g, row0], None)
        return loop.results[0]

    def _write_rows(self, loop, value, offsets, width: Optional[int], out_index: int = 0) -> None:
        """Write R rows (past L clipped) of `value` into shared out `out_index` at offsets."""
        arg = loop.inner_iter_args[out_index]
        valid = arith.minui(const_index(self.R), arith.subi(self.L, offsets[3]))
        sizes = [1, 1, 1, valid] + ([width] if width is not None else [])
        offsets = list(offsets) + ([0] if width is not None else [])
        dest = slice_of(arg, offsets, sizes)
        dims = [(3, False)] + ([(4, True)] if width is not None else [])
        written = write_tile(value, dest, dims, {})
        in_parallel = scf.InParallelOp()
        with ir.InsertionPoint(in_parallel.block):
            insert_in_parallel(written, arg, offsets, sizes)

    def _dq_loop(self, delta_ws: ir.Value) -> ir.Value:
        R, T, E = self.R, self.T, self.E
        loop, iv = self._loop([self.B, self.H, self.G, 1, self.row_tiles], [self.tensors["dq"]], DQ_LOOP, self.R)
        with ir.InsertionPoint(loop.body):
            b, h, g = iv["b"], iv["h"], iv["g"]
            row0 = arith.muli(iv["r"], const_index(R))
            q = self._operand_rows("q", E, b, h, g, row0)
            dout = self._operand_rows("dout", self.EV, b, h, g, row0)
            base = self._lse_base(b, h, g, row0)
            delta = self._rows(delta_ws, None, b, h, g, row0, 0.0)
            end = self.S
            if self.spec.causal:  # the last valid row sees keys up to it
                last = arith.minui(arith.addi(row0, const_index(R)), self.L)
                end = arith.minui(end, last)
            end = arith.muli(arith.ceildivui(end, const_index(T)), const_index(T))
            steps = scf.ForOp(const_index(0), end, const_index(T), [splat([R, E], self.acc, 0.0)])
            with ir.InsertionPoint(steps.body):
                j = steps.induction_variable
                k = self._keys("k", E, b, h, j)
                v = self._transposed_operand("v", self.EV, b, h, j)
                s, dp = self._scores(q, self._transposed_operand("k", E, b, h, j), b, h, g, row0, j, mask_keys=True,
                                     dp_of=lambda: self._dp(dout, v))
                ds = self._score_gradient(self._probabilities(s, base), dp, delta)
                scf.YieldOp([contract(self._operand(ds), k, steps.inner_iter_args[0], _ROW_MAJOR)])
            dq = self._gradient_out("dq", steps.results[0])
            self._write_rows(loop, dq, [b, h, g, row0], E)
        return loop.results[0]

    def _dkv_loop(self, delta_ws: ir.Value, gradients=("dk", "dv")):
        """forall (b, h, 0, 0, key tile): the gradients named (dk, dv or both) of the tile's keys,
        accumulated over the G query heads' row tiles that see them; their results in order."""
        T = self.T
        widths = {"dk": self.E, "dv": self.EV}
        key_tiles = arith.ceildivui(self.S, const_index(T))
        loop, iv = self._loop([self.B, self.H, 1, 1, key_tiles], [self.tensors[n] for n in gradients], DKV_LOOP, T)
        with ir.InsertionPoint(loop.body):
            b, h = iv["b"], iv["h"]
            j = arith.muli(iv["r"], const_index(T))
            k, v = self._key_operands(b, h, j)
            carried = [splat([T, widths[n]], self.acc, 0.0) for n in gradients]

            def step(state, g, row0):
                held = dict(zip(gradients, state))
                dk, dv, _ = self._key_tile_step((held.get("dk"), held.get("dv")), b, h, g, row0, j, k, v, delta_ws,
                                                mask_keys=False, gradients=gradients)
                return [{"dk": dk, "dv": dv}[n] for n in gradients]

            accumulated = self._over_rows(carried, self._first_row(j), step)
            valid = arith.minui(const_index(T), arith.subi(self.S, j))
            writes = []
            for index, (name, acc) in enumerate(zip(gradients, accumulated)):
                value = self._gradient_out(name, acc)
                arg = loop.inner_iter_args[index]
                offsets, sizes = [b, h, j, 0], [1, 1, valid, widths[name]]
                written = write_tile(value, slice_of(arg, offsets, sizes), [(2, False), (3, True)], {})
                writes.append((written, arg, offsets, sizes))
            in_parallel = scf.InParallelOp()
            with ir.InsertionPoint(in_parallel.block):
                for written, arg, offsets, sizes in writes:
                    insert_in_parallel(written, arg, offsets, sizes)
        return list(loop.results)

    def _head_loop(self, delta_ws: ir.Value):
        """backward_dq = "per_head": forall (b, h): the key tiles in turn, for each the G heads'
        row tiles that see them; dK and dV of the tile in registers, dQ accumulated into an f32
        (B, H, G, L, E) workspace, which a last loop scales into dQ."""
        R, T, E, EV, G = self.R, self.T, self.E, self.EV, self.G
        workspace = _new_tensor([self.B, self.H, G, self.L, E], self.acc)
        outs = [workspace, self.tensors["dk"], self.tensors["dv"]]
        loop, iv = self._loop([self.B, self.H, 1, 1, 1], outs, DKV_LOOP)
        with ir.InsertionPoint(loop.body):
            b, h = iv["b"], iv["h"]
            ws_arg, dk_arg, dv_arg = loop.inner_iter_args
            head = ([b, h, 0, 0, 0], [1, 1, G, self.L, E])
            keys = ([b, h, 0, 0], [1, 1, self.S, E]), ([b, h, 0, 0], [1, 1, self.S, EV])
            ws = slice_of(ws_arg, *head)
            dk_head, dv_head = slice_of(dk_arg, *keys[0]), slice_of(dv_arg, *keys[1])
            zero = splat([R, E], self.acc, 0.0)
            ws = self._over_rows(ws, const_index(0), lambda ws, g, row0: _write_rows_at(zero, ws, g, row0))

            steps = scf.ForOp(const_index(0), self.S, const_index(T), [ws, dk_head, dv_head])
            with ir.InsertionPoint(steps.body):
                j = steps.induction_variable
                ws, dk_head, dv_head = steps.inner_iter_args
                k_op, v_op = self._key_operands(b, h, j)
                k = self._keys("k", E, b, h, j)
                carried = [splat([T, E], self.acc, 0.0), splat([T, EV], self.acc, 0.0), ws]

                def step(state, g, row0):
                    dk_acc, dv_acc, ds = self._key_tile_step(state[:2], b, h, g, row0, j, k_op, v_op, delta_ws,
                                                             mask_keys=True)
                    ws = state[2]
                    rows = read_tile(ws, [(3, R, False), (4, E, True)], {2: g, 3: row0}, arith.constant(self.acc, 0.0))
                    dq_maps = _A_TRANSPOSED if self._keys_first else _ROW_MAJOR  # dS^T: dQ += (dS^T)^T K
                    return [dk_acc, dv_acc, _write_rows_at(contract(self._operand(ds), k, rows, dq_maps), ws, g, row0)]

                dk_acc, dv_acc, ws = self._over_rows(carried, self._first_row(j), step)
                dk_tile, dv_tile = self._gradient_out("dk", dk_acc), self._gradient_out("dv", dv_acc)
                dk_head = write_tile(dk_tile, dk_head, [(2, False), (3, True)], {2: j})
                dv_head = write_tile(dv_tile, dv_head, [(2, False), (3, True)], {2: j})
                scf.YieldOp([ws, dk_head, dv_head])
            ws, dk_head, dv_head = steps.results

            in_parallel = scf.InParallelOp()
            with ir.InsertionPoint(in_parallel.block):
                for value, arg, (offsets, sizes) in ((ws, ws_arg, head), (dk_head, dk_arg, keys[0]),
                                                     (dv_head, dv_arg, keys[1])):
                    insert_in_parallel(value, arg, offsets, sizes)
        return self._dq_from_workspace(loop.results[0]), loop.results[1], loop.results[2]

    def _dq_from_workspace(self, workspace: ir.Value) -> ir.Value:
        """forall (b, h, g, 0, r): dQ = scale * the accumulated workspace rows, in dQ's type."""
        R, E = self.R, self.E
        loop, iv = self._loop([self.B, self.H, self.G, 1, self.row_tiles], [self.tensors["dq"]], DQ_LOOP, self.R)
        with ir.InsertionPoint(loop.body):
            b, h, g = iv["b"], iv["h"], iv["g"]
            row0 = arith.muli(iv["r"], const_index(R))
            rows = self._rows(workspace, E, b, h, g, row0, 0.0)
            self._write_rows(loop, self._gradient_out("dq", rows), [b, h, g, row0], E)
        return loop.results[0]

    @property
    def _keys_first(self) -> bool:
        return self.options.backward_tiles == "keys_by_rows"

    def _key_operands(self, b, h, j):
        """K and V of keys j.. as the dK/dV loops' tile steps take them: as right operands of
        Q K^T and dOut V^T (`_transposed_operand`), or, keys first, the (T x width) tiles as read,
        left operands of K Q^T and V dOut^T."""
        if self._keys_first:
            return self._keys("k", self.E, b, h, j), self._keys("v", self.EV, b, h, j)
        return self._transposed_operand("k", self.E, b, h, j), self._transposed_operand("v", self.EV, b, h, j)

    def _key_tile_step(self, accumulators, b, h, g, row0, j, k_operand, v_operand, delta_ws, mask_keys: bool,
                       gradients=("dk", "dv")):
        """One (rows, keys) tile pair of the dK/dV loops: (dK + dS^T Q, dV + (Z P)^T dOut, dS), dS
        as its transpose with ScheduleOptions.backward_tiles "keys_by_rows" (then P^T and dS^T
        are computed as such, from S^T = K Q^T, and multiplied as plain left operands).  Only
        the `gradients` named are computed (None for the others, and for dS without dK)."""
        dk_acc, dv_acc = accumulators
        first = self._keys_first
        q = self._operand_rows("q", self.E, b, h, g, row0)
        dout = self._operand_rows("dout", self.EV, b, h, g, row0)
        base = self._lse_base(b, h, g, row0)
        delta = self._rows(delta_ws, None, b, h, g, row0, 0.0) if "dk" in gradients else None
        dp_of = (lambda: self._dp(dout, v_operand, first)) if "dk" in gradients else None
        s, dp = self._scores(q, k_operand, b, h, g, row0, j, mask_keys=mask_keys, keys_first=first, dp_of=dp_of)
        p = self._probabilities(s, base, first)
        maps = _ROW_MAJOR if first else _A_TRANSPOSED
        if "dv" in gradients:
            dv_acc = contract(self._operand(self._dropped(p, "dropout")), dout, dv_acc, maps)
        if "dk" not in gradients:
            return None, dv_acc, None
        ds = self._score_gradient(p, dp, delta, first)
        return contract(self._operand(ds), q, dk_acc, maps), dv_acc, ds

    def _first_row(self, j) -> ir.Value:
        """The first row tile that sees key j: 0, or with causal the tile holding row j."""
        if not self.spec.causal:
            return const_index(0)
        return arith.muli(arith.divui(j, const_index(self.R)), const_index(self.R))

    def _over_rows(self, state, first, body):
        """scf.for g in [0, G), scf.for row0 in [first, L) by row_tile, carrying `state` (a value
        or a list): state = body(state, g, row0)."""
        single = not isinstance(state, list)
        carried = [state] if single else list(state)
        heads = scf.ForOp(const_index(0), const_index(self.G), const_index(1), carried)
        with ir.InsertionPoint(heads.body):
            rows = scf.ForOp(first, self.L, const_index(self.R), list(heads.inner_iter_args))
            with ir.InsertionPoint(rows.body):
                inner = list(rows.inner_iter_args)
                result = body(inner[0] if single else inner, heads.induction_variable, rows.induction_variable)
                scf.YieldOp([result] if single else list(result))
            scf.YieldOp(list(rows.results))
        return heads.results[0] if single else list(heads.results)


def _write_rows_at(value: ir.Value, dest: ir.Value, g, row0) -> ir.Value:
    """Write an (R x width) tile into rows row0.. of head g of a (1, 1, G, L, width) tensor (rows
    past L not written)."""
    return write_tile(value, dest, [(3, False), (4, True)], {2: g, 3: row0})


def element_type_of(value: ir.Value) -> ir.Type:
    return ir.ShapedType(value.type).element_type
