"""Tensor-core contractions of a work-group: vector.contract as mma.sync m16n8k16 (operands from
registers, packed 16-bit pairs, or from a tile staged in shared memory through ldmatrix, .trans
when the tile's rows are the reduced dim), f32 operands as mma.sync m16n8k8 on their tf32 halves
(three products: f32 accuracy), or, with Geometry.warpgroup_mma (sm_90a), wgmma m64nNk16: A from
registers as above, B read by the tensor cores from the staged tile (stored for the 128-byte
swizzle, see staging.PANEL_COLS) through a matrix descriptor, one statement per k16 slice,
waited for at the end of the chain.  `TensorCoreContractions` is the part of
distribute.WorkGroupKernel that emits them."""

from __future__ import annotations

from typing import Callable, List

from mlir import ir
from mlir.dialects import arith, memref, nvgpu, vector

from ...mlir_utils import CompileError, const_index, defining_op

from .analysis import vector_shape
from .ptx import _as_words, _split_all, i64_type, mma, mma_3xtf32, pack_pair, warpgroup_mma, warpgroup_wait
from .staging import SharedTile
from .values import _element, _is_zero, _users


class TensorCoreContractions:
    """The rule of vector.contract (a part of distribute.WorkGroupKernel: it reads the kernel's
    geometry, distributed values and staged tiles)."""

    @staticmethod
    def _feeds_operand(value: ir.Value, position: int) -> bool:
        """Whether `value` (through shape casts) is operand `position` of a contraction (0: the
        left, 1: the right)."""
        for user in _users(value):
            if user.name == "vector.shape_cast" and TensorCoreContractions._feeds_operand(user.results[0], position):
                return True
            if user.name == "vector.contract" and user.operands[position] == value:
                return True
        return False

    def _load_a_fragment(self, tile: SharedTile, m: int, kk: int, element: ir.Type) -> List[ir.Value]:
        """The A fragment (m, kk) of the warp's rows from a staged (rows x k) tile: ldmatrix x4
        (lane l gives the address of row l % 16, column 8 (l / 16) of the 16 x 16 block)."""
        row = arith.addi(self.row_base, arith.addi(arith.remui(self.lane, const_index(16)),
                                                   const_index(16 * m)))
        col = arith.addi(arith.muli(arith.divui(self.lane, const_index(16)), const_index(8)),
                         const_index(16 * kk))
        loaded = nvgpu.ldmatrix(ir.VectorType.get([4, 2], element), tile.buffer, tile.indices(row, col), False, 4)
        return _as_words(loaded, 4)

    def _load_a_fragments(self, tile: SharedTile, k: int, element: ir.Type):
        return {(m, kk): self._load_a_fragment(tile, m, kk, element)
                for m in range(self.geometry.m_tiles) for kk in range(k // 16)}

    def _contract(self, op: ir.Operation) -> None:
        maps = [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(op.attributes["indexing_maps"])]
        dims = [[e.maybe_downcast().position for e in m.results] for m in maps]
        if dims[0] != [0, 2] or dims[2] != [0, 1] or dims[1] not in ([1, 2], [2, 1]):
            raise CompileError(f"nvvm: contraction maps {dims} are not (m,k) x (n,k | k,n) -> (m,n)")
        lhs, rhs, acc = op.operands
        result = op.results[0]
        (layout,) = self.layouts_of(result)
        k = vector_shape(lhs)[1]
        n = vector_shape(result)[1]
        if k % 16 or n % 16:
            raise CompileError(f"nvvm: contraction extents must be multiples of 16, got k={k} n={n}")
        element = _element(rhs)
        if not isinstance(element, (ir.F16Type, ir.BF16Type, ir.F32Type)) or _element(lhs) != element:
            raise CompileError(f"nvvm: tensor-core contractions take f16, bf16 or f32 operands of one type, got "
                               f"{_element(lhs)} x {element} (P.V of 16-bit inputs in f32 has no tensor-core "
                               f"path: use pv_in_f32=False)")
        if rhs not in self.tiles:
            raise CompileError("nvvm: the right operand of a contraction must be a tile read from memory")
        b_rows_are_n = dims[1] == [1, 2]
        if isinstance(element, ir.F32Type):
            return self._f32_contract(result, layout, lhs, self.tiles[rhs], acc, k, n, b_rows_are_n)
        a_operand = self._a_operand(lhs, k)
        if self.tiles[rhs].swizzled:
            return self._warpgroup_contract(result, layout, a_operand, self.tiles[rhs], acc, k, n, element,
                                            b_rows_are_n)
        acc_slots = self.dist(acc, layout)
        c = {(m, j): [acc_slots[(m, j, i)] for i in range(4)]
             for m in range(self.geometry.m_tiles) for j in range(n // 8)}
        # kk outermost, then pairs of n-tiles: an A fragment and two B fragments are live at a time.
        for kk in range(k // 16):
            a = [a_operand(m, kk) for m in range(self.geometry.m_tiles)]
            for j in range(0, n // 8, 2):
                b_pair = self._b_fragments(self.tiles[rhs], kk, j, b_rows_are_n, element)
                for m in range(self.geometry.m_tiles):
                    for jj in (0, 1):
                        c[(m, j + jj)] = mma(a[m], b_pair[jj], c[(m, j + jj)], element)
        out = {}
        for (m, j), values in c.items():
            for i in range(4):
                out[(m, j, i)] = values[i]
        self.dists[(result, layout)] = out

    def _warpgroup_contract(self, result, layout, a_operand, tile: SharedTile, acc, k: int, n: int,
                            element: ir.Type, k_major: bool) -> None:
        """The contraction as a chain of wgmma, one k16 slice of the tile a statement (all
        m-tiles of the warp in it), committed as one group; the A fragments of the next slice
        load while it runs.  A zero accumulator (S = Q K^T) is not read: the first slice
        overwrites it.  With Geometry.mma_overlap the result stays in flight (see `_await`) until
        an op reads it, so that the ops in between (the next contraction's issue, elementwise
        work on other tiles) run while the tensor cores do; else it is waited for here."""
        tiles = self.geometry.m_tiles
        if (tile.rows if k_major else tile.cols) != n:
            raise CompileError(f"nvvm: a wgmma operand tile of {tile.rows} x {tile.cols} does not give n = {n}")
        if _is_zero(acc):
            values = None
        else:
            slots = self.dist(acc, layout)
            values = [[slots[(m, j, i)] for j in range(n // 8) for i in range(4)] for m in range(tiles)]
        descriptor = tile.descriptor(k_major)
        i64 = i64_type()
        slices = k // 16
        for kk in range(slices):
            at = arith.addi(descriptor, arith.constant(i64, tile.slice_offset(kk, k_major) >> 4))
            values = warpgroup_mma(values, [a_operand(m, kk) for m in range(tiles)], at, n, element,
                                   transpose_b=not k_major, commit=kk == slices - 1)
        slots = {(m, j, i): values[m][4 * j + i] for m in range(tiles) for j in range(n // 8) for i in range(4)}
        self._in_flight.append(((result, layout), slots))
        if not self.geometry.mma_overlap:
            self._await((result, layout))

    def _await(self, key=None) -> None:
        """Wait for the in-flight wgmma group of `key` (a (value, layout) pair; None: every
        group): wgmma.wait_group with the count of groups committed after it, which leaves those
        in flight; the results of every group then complete become readable."""
        if not self._in_flight:
            return
        keys = [entry[0] for entry in self._in_flight]
        last = len(keys) - 1 if key is None else keys.index(key)
        done = self._in_flight[:last + 1]
        self._in_flight = self._in_flight[last + 1:]
        flat = [value for _, slots in done for value in slots.values()]
        waited = iter(warpgroup_wait(flat, newer=len(self._in_flight)))
        for done_key, slots in done:
            self.dists[done_key] = {slot: next(waited) for slot in slots}

    def _f32_contract(self, result, layout, lhs, tile: SharedTile, acc, k: int, n: int, rows_are_n: bool) -> None:
        """An f32 contraction as mma.sync m16n8k8 on tf32 halves (mma_3xtf32): f32 accuracy on the
        tensor cores.  The A operand is staged (ldmatrix of 32-bit words) or a register tile in the
        accumulator layout (P), whose lane holds columns 2t and 2t + 1 where a k8 fragment wants t
        and t + 4: there the k order is permuted (fragment column t is column 2t, t + 4 is 2t + 1),
        and B's rows follow it."""
        a_operand, permuted = self._f32_a_operand(lhs)
        tiles = [(m, j) for m in range(self.geometry.m_tiles) for j in range(n // 8)]
        # A contraction from zero (S = Q K^T: the whole reduction over a head dim) sums each k8
        # slice on its own and adds the sums in f32: the tensor cores' accumulation truncates,
        # and along a chain of D / 8 slices that error grows one way, where f32 additions round
        # to nearest.  One into a running value (P.V) chains its few slices.
        apart = _is_zero(acc)
        if apart:
            c = {tile_at: None for tile_at in tiles}
            with self.entry:
                zero = [arith.constant(ir.F32Type.get(), 0.0)] * 4
        else:
            slots = self.dist(acc, layout)
            c = {(m, j): [slots[(m, j, i)] for i in range(4)] for m, j in tiles}
        for kk in range(k // 8):
            a = [a_operand(m, kk) for m in range(self.geometry.m_tiles)]
            for j in range(0, n // 8, 2):
                b_pair = self._f32_b_fragments(tile, kk, j, rows_are_n, permuted)
                for m in range(self.geometry.m_tiles):
                    for jj in (0, 1):
                        old = c[(m, j + jj)]
                        if not apart:
                            c[(m, j + jj)] = mma_3xtf32(a[m], b_pair[jj], old)
                            continue
                        part = mma_3xtf32(a[m], b_pair[jj], zero)
                        c[(m, j + jj)] = part if old is None else [arith.addf(x, y) for x, y in zip(old, part)]
        self.dists[(result, layout)] = {(m, j, i): values[i] for (m, j), values in c.items() for i in range(4)}

    def _f32_a_operand(self, lhs: ir.Value):
        """(A fragment (m, kk8) of an f32 left operand as tf32 halves, whether its k order is
        permuted)."""
        if lhs in self.tiles:  # staged (Q): ldmatrix x4 of 32-bit words gives a k8 fragment as is
            tile = self.tiles[lhs]

            def staged(m, kk):
                row = arith.addi(self.row_base, arith.addi(arith.remui(self.lane, const_index(16)),
                                                           const_index(16 * m)))
                col = arith.addi(arith.muli(arith.divui(self.lane, const_index(16)), const_index(4)),
                                 const_index(8 * kk))
                loaded = nvgpu.ldmatrix(ir.VectorType.get([4, 1], ir.F32Type.get()), tile.buffer,
                                        tile.indices(row, col), False, 4)
                return _split_all([vector.extract(loaded, [], [r, 0]) for r in range(4)])
            return staged, False
        (layout,) = self.layouts_of(lhs)  # a register tile in the accumulator layout (P)
        values = self.dist(lhs, layout)

        def registers(m, kk):
            return _split_all([values[(m, kk, i)] for i in (0, 2, 1, 3)])
        return registers, True

    def _f32_b_fragments(self, tile: SharedTile, kk: int, j: int, rows_are_n: bool, permuted: bool):
        """B fragments (tf32 halves) of n-tiles j and j + 1 for k8 slice kk: fragment rows t and
        t + 4 (or 2t and 2t + 1, permuted) of column g.  A tile whose rows are n (K) gives them by
        one ldmatrix x4 of 32-bit words; a tile whose rows are k (V) by a load each (ldmatrix
        transposes only 16-bit elements)."""
        if rows_are_n and not permuted:
            lane = self.lane
            row = arith.addi(arith.muli(arith.addi(arith.divui(lane, const_index(16)), const_index(j)),
                                        const_index(8)), arith.remui(lane, const_index(8)))
            col = arith.addi(arith.muli(arith.remui(arith.divui(lane, const_index(8)), const_index(2)),
                                        const_index(4)), const_index(8 * kk))
            loaded = nvgpu.ldmatrix(ir.VectorType.get([4, 1], ir.F32Type.get()), tile.buffer,
                                    tile.indices(row, col), False, 4)
            words = [vector.extract(loaded, [], [r, 0]) for r in range(4)]
            return _split_all(words[0:2]), _split_all(words[2:4])
        t = arith.remui(self.lane, const_index(4))
        k_first = arith.muli(t, const_index(2)) if permuted else t
        k_second = arith.addi(k_first, const_index(1 if permuted else 4))
        pairs = []
        for jj in (0, 1):
            n_at = arith.addi(self.quad, const_index(8 * (j + jj)))
            loads = []
            for k_at in (k_first, k_second):
                k_at = arith.addi(k_at, const_index(8 * kk))
                row, col = (n_at, k_at) if rows_are_n else (k_at, n_at)
                loads.append(memref.load(tile.buffer, tile.indices(row, col)))
            pairs.append(_split_all(loads))
        return pairs[0], pairs[1]

    def _a_operand(self, lhs: ir.Value, k: int) -> Callable[[int, int], List[ir.Value]]:
        """A fragment (m, kk) of a contraction's left operand, produced where it is asked for."""
        if lhs in self.a_fragments:
            frags = self.a_fragments[lhs]
            return lambda m, kk: frags[(m, kk)]
        element = _element(lhs)
        if lhs in self.tiles:  # a staged tile read at each use (Geometry.q_in_registers=False)
            tile = self.tiles[lhs]
            return lambda m, kk: self._load_a_fragment(tile, m, kk, element)
        producer = defining_op(lhs)
        if producer is not None and producer.name == "arith.truncf":  # P: pack the f32 tile in pairs
            source = producer.operands[0]
            (layout,) = self.layouts_of(source)
            tile = self.dist(source, layout)

            def packed(m, kk):
                return [pack_pair(tile[(m, j, i)], tile[(m, j, i + 1)], element)
                        for j, i in ((2 * kk, 0), (2 * kk, 2), (2 * kk + 1, 0), (2 * kk + 1, 2))]
            return packed
        raise CompileError("nvvm: the left operand of a contraction must be a staged tile or a "
                           "rounded register tile")

    def _b_fragments(self, tile: SharedTile, kk: int, j: int, rows_are_n: bool, element: ir.Type):
        """B fragments of n-tiles j and j + 1 for k-tile kk: one ldmatrix x4 (.trans when the
        tile's rows are the reduced dim)."""
        lane = self.lane
        within = arith.remui(lane, const_index(8))
        half = arith.muli(arith.remui(arith.divui(lane, const_index(8)), const_index(2)), const_index(8))
        second = arith.divui(lane, const_index(16))
        if rows_are_n:  # K tile (keys x E): rows n, contiguous along k
            row = arith.addi(arith.muli(arith.addi(second, const_index(j)), const_index(8)), within)
            col = arith.addi(half, const_index(16 * kk))
        else:           # V tile (keys x Ev): rows k, contiguous along n
            row = arith.addi(arith.addi(half, within), const_index(16 * kk))
            col = arith.muli(arith.addi(second, const_index(j)), const_index(8))
        loaded = nvgpu.ldmatrix(ir.VectorType.get([4, 2], element), tile.buffer, tile.indices(row, col),
                                not rows_are_n, 4)
        words = _as_words(loaded, 4)
        return words[0:2], words[2:4]
