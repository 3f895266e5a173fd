"""Distribution of one work-group loop to a CUDA thread block: every vector op by its layout.

A work-group (one iteration of an scf.forall of the shared IR) becomes one
thread block of `Geometry.warps` warps.  Each vector value is distributed
by the Layout(s) `analysis.LayoutAnalysis` assigned it (one scalar per slot,
see layout.py); each op is re-emitted per slot by its rule:

    elementwise arith/math     one scalar op per slot (exp2 -> ex2.approx)
    broadcast / shape_cast     no code: a slot reads the slot it projects to
    vector.step                the slot's coordinate along the dim
    multi_reduction (rows)     per-lane reduction over the row's slots, then
                               shuffle-xor 1 and 2 across the lanes of a quad
    transfer_read / _write     per-slot loads and stores at the slot's
                               coordinates; out-of-bounds dims are predicated
                               (reads give the padding value, stores are skipped)
    select on row conditions   when its true operand is an elementwise op used
                               only by it (the lazily rescaled accumulator), that
                               op and the select run under a warp-uniform branch
                               taken only if a row of the warp selects it (vote.any)
    scf.for / scf.if           the same op on the flattened slot scalars
    contract                   tensor cores: mma.sync m16n8k16, operands from
                               registers (a tile packed into 16-bit pairs) or
                               from a tile staged in shared memory (ldmatrix,
                               .trans when the tile's rows are the reduced dim);
                               f32 operands as mma.sync m16n8k8 on their tf32
                               halves (three products: f32 accuracy);
                               or, with Geometry.warpgroup_mma (sm_90a), wgmma
                               m64nNk16: A from registers as above, B read by
                               the tensor cores from the staged tile (stored
                               for the 128-byte swizzle, see PANEL_COLS)
                               through a matrix descriptor, one statement per
                               k16 slice, waited for at the end of the chain

Reads whose value only feeds contractions (the Q, K and V tiles) are staged
in shared memory with cp.async, rows past the memref's extent zero-filled by
the copy's source size (a tile of one row dim is copied with strength-reduced
addresses, its rows past the end predicated); a staged read of a loop body is
double-buffered: its first tile is copied before the loop, and each
iteration copies the next K tile as soon as the current one is consumed and
its own V tile at its start (Geometry.prefetch "keys"), or the next K and V
tiles at its start ("tiles") or once the current K tile is consumed
("tiles-late"; both: one barrier a step, not two).
A staged tile consumed as the left operand of a contraction outside its loop
(Q) is loaded into registers once; its copy is waited for after the loop
that follows has issued its first tiles', so that they are in flight
together.
Scalar ops (indices, bounds) are uniform across the block and cloned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mlir import ir
from mlir.dialects import arith, gpu, llvm, memref, nvgpu, nvvm, scf, vector

from ...mlir_utils import CompileError, const_index, defining_op, index

from .analysis import ELEMENTWISE_PREFIXES, LayoutAnalysis, is_uniform, vector_shape
from .layout import (COL, ROW, ROW_DIV, ROW_MOD, Axis, Geometry, Layout, broadcast_source_layout,
                     project_slot, shape_cast_layout)

#: float ops whose products and sums may contract into FMAs (fastmath contract).
_CONTRACTIBLE = ("arith.addf", "arith.subf", "arith.mulf")
#: bytes added to each shared-memory row: the 8 rows an ldmatrix reads fall in distinct banks.
PITCH_PAD_BYTES = 16
#: a tile wgmma reads through a matrix descriptor is stored for the 128-byte swizzle: in panels
#: of PANEL_COLS columns (128 bytes of 16-bit elements) by its rows, the 16-byte chunk c of row r
#: at chunk c ^ (r % 8) of the row (the banks of 8 rows' chunks differ), each panel starting on
#: SWIZZLE_ALIGN bytes (the hardware swizzles by address bits 4-6 ^ 7-9).
PANEL_COLS = 64
SWIZZLE_ALIGN = 1024
_WORKGROUP = "#gpu.address_space<workgroup>"


def i32_type() -> ir.Type:
    return ir.IntegerType.get_signless(32)


def i64_type() -> ir.Type:
    return ir.IntegerType.get_signless(64)


def _i32(value: int) -> ir.Value:
    return arith.constant(i32_type(), value)


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


# --------------------------------------------------------------------------- PTX pieces


def _ptx(results: Sequence[ir.Type], operands: Sequence[ir.Value], code: str):
    return nvvm.inline_ptx(list(results), list(operands), [], code)


def ex2(x: ir.Value) -> ir.Value:
    """2^x with one ex2.approx (inputs are scores in base-2 units; -inf gives 0)."""
    return _ptx([x.type], [x], "ex2.approx.ftz.f32 $0, $1;")


def shuffle_xor(value: ir.Value, offset: int) -> ir.Value:
    return gpu.shuffle(value, _i32(offset), _i32(32), gpu.ShuffleMode.XOR)[0]


def pack_pair(low: ir.Value, high: ir.Value, element: ir.Type) -> ir.Value:
    """Two f32 -> one i32 holding them as 16-bit floats (low half: the lower column)."""
    kind = "bf16x2" if isinstance(element, ir.BF16Type) else "f16x2"
    return _ptx([i32_type()], [high, low], f"cvt.rn.{kind}.f32 $0, $1, $2;")


def mma(a: Sequence[ir.Value], b: Sequence[ir.Value], c: Sequence[ir.Value], element: ir.Type) -> List[ir.Value]:
    """D = A . B + C, mma.sync m16n8k16 (A row-major, B column-major, f32 accumulate)."""
    t = "bf16" if isinstance(element, ir.BF16Type) else "f16"
    code = (f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 "
            "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
    f32 = ir.F32Type.get()
    return list(_ptx([f32] * 4, [*a, *b, *c], code))


def tf32_split(x: ir.Value) -> Tuple[ir.Value, ir.Value]:
    """An f32 as the sum of two tf32s, (big, small) as 32-bit words: big = x rounded to tf32,
    small = the rest rounded to tf32 (together 21 of the 24 bits of x's significand)."""
    big = _ptx([i32_type()], [x], "cvt.rna.tf32.f32 $0, $1;")
    rest = arith.subf(x, arith.bitcast(ir.F32Type.get(), big))
    return big, _ptx([i32_type()], [rest], "cvt.rna.tf32.f32 $0, $1;")


def mma_tf32(a: Sequence[ir.Value], b: Sequence[ir.Value], c: Sequence[ir.Value]) -> List[ir.Value]:
    """D = A . B + C, mma.sync m16n8k8 on tf32 words (A row-major, B column-major, f32 accumulate)."""
    code = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
            "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
    return list(_ptx([ir.F32Type.get()] * 4, [*a, *b, *c], code))


def mma_3xtf32(a: Tuple[List[ir.Value], List[ir.Value]], b: Tuple[List[ir.Value], List[ir.Value]],
               c: Sequence[ir.Value]) -> List[ir.Value]:
    """D = A . B + C for f32 A and B, each given as (big, small) tf32 words (tf32_split): the
    products big.small, small.big and big.big (small.small, below f32's rounding, is left out),
    small terms first.  The error is that of f32 arithmetic, not tf32's: what cuBLAS and
    PyTorch's memory-efficient attention compute f32 on tensor cores with."""
    (a_big, a_small), (b_big, b_small) = a, b
    c = mma_tf32(a_big, b_small, c)
    c = mma_tf32(a_small, b_big, c)
    return mma_tf32(a_big, b_big, c)


def _split_all(values: Sequence[ir.Value]) -> Tuple[List[ir.Value], List[ir.Value]]:
    pairs = [tf32_split(v) for v in values]
    return [big for big, _ in pairs], [small for _, small in pairs]


def _as_words(fragment: ir.Value, count: int) -> List[ir.Value]:
    """vector<count x 2 x f16|bf16> (an ldmatrix result) -> count i32 words."""
    element = ir.VectorType(fragment.type).element_type
    words = []
    for r in range(count):
        pair = vector.extract(fragment, [], [r])
        word = vector.bitcast(ir.VectorType.get([1], i32_type()), pair)
        words.append(vector.extract(word, [], [0]))
    del element
    return words


def _inline_asm(results: int, operands: Sequence[ir.Value], constraints: Sequence[str], code: str) -> List[ir.Value]:
    """An asm statement with `results` f32 outputs ("=f", numbered first) and `operands` under
    `constraints` (a digit ties an operand to that output: wgmma's accumulators are read and
    written in place).  (nvvm.inline_ptx's read-write operands are dropped from its results.)"""
    f32 = ir.F32Type.get()
    struct = ir.Type.parse("!llvm.struct<(" + ", ".join(["f32"] * results) + ")>")
    asm = llvm.inline_asm(struct if results > 1 else f32, list(operands), code,
                          ",".join(["=f"] * results + list(constraints)), has_side_effects=True)
    if results == 1:
        return [asm]
    return [llvm.extractvalue(f32, asm, [i]) for i in range(results)]


def warpgroup_mma(acc: Optional[List[List[ir.Value]]], a: Sequence[Sequence[ir.Value]], descriptor: ir.Value,
                  n: int, element: ir.Type, transpose_b: bool) -> List[List[ir.Value]]:
    """D[m] = A[m] . B (+ D[m] unless `acc` is None: a zero accumulator) for each m-tile m of
    the warpgroup: one wgmma m64nNk16 each, A (4 words a lane) from registers, B (k16 x n)
    from shared memory through `descriptor` (transposed: stored n-major, the V tile).  One asm
    statement, so that every register it reads (the accumulators, and A: loaded or packed
    for this slice) is written before its wgmma.fence.  The accumulators are in flight until
    `warpgroup_wait`."""
    t = "bf16" if isinstance(element, ir.BF16Type) else "f16"
    tiles, half = len(a), n // 2
    outputs = tiles * half
    operands = [word for words in a for word in words] + [descriptor, _i32(0 if acc is None else 1)]
    constraints = ["r"] * (4 * tiles) + ["l", "r"]
    if acc is not None:
        operands += [value for values in acc for value in values]
        constraints += [str(i) for i in range(outputs)]
    first_a, desc, scale = outputs, outputs + 4 * tiles, outputs + 4 * tiles + 1
    lines = ["{", ".reg .pred p;", f"setp.ne.b32 p, ${scale}, 0;", "wgmma.fence.sync.aligned;"]
    for m in range(tiles):
        d = ", ".join(f"${m * half + i}" for i in range(half))
        words = ", ".join(f"${first_a + 4 * m + i}" for i in range(4))
        lines.append(f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{d}}}, {{{words}}}, ${desc}, p, "
                     f"1, 1, {int(transpose_b)};")
    lines.append("}")
    values = _inline_asm(outputs, operands, constraints, "\n".join(lines))
    return [values[m * half:(m + 1) * half] for m in range(tiles)]


def warpgroup_wait(acc: List[List[ir.Value]]) -> List[List[ir.Value]]:
    """Commit the warpgroup's wgmmas and wait for them: the accumulators, readable after it
    (tied through the statement, so that no use of them moves above the wait)."""
    flat = [value for values in acc for value in values]
    code = "wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;"
    values = _inline_asm(len(flat), flat, [str(i) for i in range(len(flat))], code)
    width = len(acc[0])
    return [values[m * width:(m + 1) * width] for m in range(len(acc))]


def fence_async_proxy() -> None:
    """Make this thread's shared-memory writes (cp.async: the generic proxy) visible to the
    async proxy that wgmma reads shared memory through (before the barrier that publishes them)."""
    _ptx([], [], "fence.proxy.async.shared::cta;")


@dataclass
class SharedTile:
    """A tile staged in shared memory: buffer[stage?][row][col], rows padded by PITCH_PAD_BYTES; or,
    `swizzled` (a wgmma operand), buffer[stage?][panel][row][col'] with col' the column's
    place in its panel under the 128-byte swizzle (see PANEL_COLS); `address`: the shared-
    memory address (i64) of its first stage."""

    buffer: Optional[ir.Value]
    rows: int
    cols: int
    stages: int = 1
    stage: Optional[ir.Value] = None
    swizzled: bool = False
    address: Optional[ir.Value] = None

    def at(self, stage: Optional[ir.Value]) -> "SharedTile":
        return replace(self, stage=stage)

    def indices(self, row: ir.Value, col: ir.Value) -> List[ir.Value]:
        lead = [self.stage] if self.stages > 1 else []
        if not self.swizzled:
            return lead + [row, col]
        within = arith.remui(col, const_index(PANEL_COLS))
        chunk = arith.xori(arith.divui(within, const_index(8)), arith.remui(row, const_index(8)))
        place = arith.addi(arith.muli(chunk, const_index(8)), arith.remui(within, const_index(8)))
        return lead + [arith.divui(col, const_index(PANEL_COLS)), row, place]

    @property
    def panel_bytes(self) -> int:
        return self.rows * PANEL_COLS * 2

    def descriptor(self, k_major: bool) -> ir.Value:
        """wgmma's matrix descriptor (i64) of this stage: the start address, the byte offsets
        between 8-row groups (SBO: 1024) and, n-major, between panels along n (LBO), and the
        128-byte swizzle mode.  K-major (the K tile: rows n, columns k) reads its k16 slices
        at 32-byte steps within a panel; n-major (V: rows k) at 16-row steps."""
        i64 = i64_type()
        address = self.address
        if self.stages > 1:
            stage = arith.index_cast(i64, self.stage)
            address = arith.addi(address, arith.muli(stage, arith.constant(i64, self.rows * self.cols * 2)))
        start = arith.andi(arith.shrui(address, arith.constant(i64, 4)), arith.constant(i64, 0x3FFF))
        lbo = 1 if k_major else self.panel_bytes >> 4
        fields = (lbo << 16) | ((8 * PANEL_COLS * 2 >> 4) << 32) | (1 << 62)
        return arith.ori(start, arith.constant(i64, fields))

    def slice_offset(self, kk: int, k_major: bool) -> int:
        """Bytes from the descriptor's start to k-slice kk (16 of the reduced dim)."""
        if k_major:
            return (16 * kk // PANEL_COLS) * self.panel_bytes + (16 * kk % PANEL_COLS) * 2
        return 16 * kk * PANEL_COLS * 2


#: iterations per emitted iteration of a loop without staged reads (the split-key combine): at
#: least UNROLL, more while their carried values take at most UNROLL_REGISTERS registers a lane.
UNROLL = 4
UNROLL_REGISTERS = 192


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


class WorkGroupKernel:
    """The distributed body of one work-group loop, emitted inside a gpu.func."""

    def __init__(self, loop: ir.Operation, geometry: Geometry, outer: Callable[[ir.Value], ir.Value],
                 entry: ir.InsertionPoint):
        self.loop = loop
        self.entry = entry  # the kernel's entry: loop-invariant constants go there
        self.geometry = geometry
        self.outer = outer  # a value of the old function -> the same value in the kernel
        self.body = loop.regions[0].blocks[0]
        self.analysis = LayoutAnalysis(self.body, geometry.rows)
        self.scalars: Dict[ir.Value, ir.Value] = {}
        self.dists: Dict[Tuple[ir.Value, Layout], Dict[tuple, ir.Value]] = {}
        self.uniforms: Dict[ir.Value, ir.Value] = {}
        self.tiles: Dict[ir.Value, SharedTile] = {}                 # staged value -> its tile
        self.a_fragments: Dict[ir.Value, Dict[Tuple[int, int], List[ir.Value]]] = {}
        self._buffers: Dict[ir.Operation, SharedTile] = {}          # staged read -> its buffer(s)
        self._after: Dict[ir.Operation, Callable[[], None]] = {}    # hooks run after an op
        self._before: Dict[ir.Operation, Callable[[], None]] = {}   # hooks run before an op
        self._coords: Dict[tuple, ir.Value] = {}
        self._landing: List[ir.Value] = []  # staged values outside loops whose copies are in flight
        self.shared_bytes = 0

    # ------------------------------------------------------------------ entry

    def emit(self, ivs: Sequence[ir.Value]) -> None:
        """Emit the distributed body at the current insertion point; `ivs` replace the loop's ivs."""
        tid = gpu.thread_id(gpu.Dimension.x)
        self.tid = tid
        self.lane = arith.remui(tid, const_index(32))
        self.warp = arith.divui(tid, const_index(32))
        self.quad = arith.divui(self.lane, const_index(4))                     # row within 8
        self.pair = arith.muli(arith.remui(self.lane, const_index(4)), const_index(2))  # first column
        self.row_base = arith.muli(self.warp, const_index(16 * self.geometry.m_tiles))
        self._allocate_shared_memory()
        for old, new in zip(list(self.body.arguments)[:len(ivs)], ivs):
            self.scalars[old] = new
        self._block(self.body)

    def _block(self, block: ir.Block) -> None:
        for op in block.operations:
            op = op.operation
            if op.name in ("scf.forall.in_parallel", "scf.yield"):
                continue
            if self._landing and not self._may_precede_landing(op):
                self._land_staged()
            if op in self._before:
                self._before.pop(op)()
            self.translate(op)
            if op in self._after:
                self._after.pop(op)()

    def _allocate_shared_memory(self) -> None:
        """One buffer per staged read (two stages inside a loop), views of the dynamic shared memory."""
        # Reads outside loops (Q) get their own buffers; the reads of each loop come after them, and
        # sibling loops (a peeled tail loop after the main one) run one after the other: they share.
        layout, offset = [], 0
        ordered = self._in_order(self.analysis.staged)
        outside = [op for op in ordered if op.parent.name != "scf.for"]
        by_loop: Dict[ir.Operation, List[ir.Operation]] = {}
        for op in ordered:
            if op.parent.name == "scf.for":
                by_loop.setdefault(op.parent.operation if hasattr(op.parent, "operation") else op.parent,
                                   []).append(op)

        def place(op, at, stages):
            rows, cols = self._staged_shape(op)
            element = _element(op.results[0])
            swizzled = self.geometry.warpgroup_mma and self._feeds_operand(op.results[0], 1)
            if swizzled:
                self._check_swizzled(rows, cols, element)
                shape = ([stages] if stages > 1 else []) + [cols // PANEL_COLS, rows, PANEL_COLS]
            else:
                shape = ([stages] if stages > 1 else []) + [rows, cols + PITCH_PAD_BYTES // _bytes(element)]
            size = _bytes(element)
            for d in shape:
                size *= d
            align = SWIZZLE_ALIGN if swizzled else 128
            at = -(-at // align) * align
            layout.append((op, shape, element, at, stages, rows, cols, swizzled))
            return at + size
        for op in outside:
            offset = place(op, offset, 1)
        loops_start, end = offset, offset
        for reads in by_loop.values():
            at = loops_start
            for op in reads:
                at = place(op, at, 2)
            end = max(end, at)
        offset = end
        any_swizzled = any(entry[-1] for entry in layout)
        # the dynamic shared memory's start is only known to be 16-byte aligned: the buffers start
        # at the first SWIZZLE_ALIGN boundary in it, which the size leaves room for
        self.shared_bytes = offset + (SWIZZLE_ALIGN if any_swizzled else 0)
        if not layout:
            return
        base = gpu.dynamic_shared_memory(ir.MemRefType.get(
            [ir.ShapedType.get_dynamic_size()], ir.IntegerType.get_signless(8),
            memory_space=ir.Attribute.parse(_WORKGROUP)))
        shift, address = const_index(0), None
        if any_swizzled:
            address = memref.extract_aligned_pointer_as_index(base)
            shift = arith.andi(arith.subi(const_index(0), address), const_index(SWIZZLE_ALIGN - 1))
        i64 = i64_type()
        for op, shape, element, at, stages, rows, cols, swizzled in layout:
            start = arith.addi(shift, const_index(at))
            view = memref.view(ir.MemRefType.get(shape, element, memory_space=ir.Attribute.parse(_WORKGROUP)),
                               base, start, [])
            tile_address = arith.index_cast(i64, arith.addi(address, start)) if swizzled else None
            self._buffers[op] = SharedTile(view, rows, cols, stages, swizzled=swizzled, address=tile_address)

    @staticmethod
    def _check_swizzled(rows: int, cols: int, element: ir.Type) -> None:
        """What a wgmma operand tile must be: 16-bit elements, whole panels, whole k16 slices
        along its rows, and at most 256 along n."""
        if _bytes(element) != 2 or cols % PANEL_COLS or rows % 16 or max(rows, cols) > 256:
            raise CompileError(f"nvvm: warpgroup MMA takes 16-bit tiles of a multiple of {PANEL_COLS} columns "
                               f"and 16 rows, at most 256 each; got {rows} x {cols} of {element} (use "
                               f"warpgroup_mma=False for this spec)")

    def _in_order(self, ops) -> List[ir.Operation]:
        order = []

        def visit(block):
            for op in block.operations:
                op = op.operation
                if op in ops:
                    order.append(op)
                for region in op.regions:
                    for inner in region.blocks:
                        visit(inner)
        visit(self.body)
        return order

    # ------------------------------------------------------------------ values

    def scalar(self, value: ir.Value) -> ir.Value:
        return self.scalars[value] if value in self.scalars else self.outer(value)

    @staticmethod
    def _as_i32(value: ir.Value) -> ir.Value:
        return arith.index_cast(i32_type(), value) if isinstance(value.type, ir.IndexType) else value

    def uniform(self, value: ir.Value) -> ir.Value:
        """The scalar of a uniform vector: a splat constant (created once, at the kernel's entry)
        or a broadcast scalar (created where it is used: it may be defined inside a loop)."""
        op = defining_op(value)
        if op.name == "arith.constant":
            if value not in self.uniforms:
                element = _scalar_type(_element(value))
                splat = op.attributes["value"].get_splat_value()
                with self.entry:
                    if isinstance(element, ir.FloatType):
                        self.uniforms[value] = arith.constant(element, ir.FloatAttr(splat).value)
                    else:
                        self.uniforms[value] = arith.constant(element, ir.IntegerAttr(splat).value)
            return self.uniforms[value]
        source = op.operands[0]  # vector.broadcast of a scalar or of a uniform vector
        return self.uniform(source) if vector_shape(source) is not None else self._as_i32(self.scalar(source))

    def dist(self, value: ir.Value, layout: Layout) -> Dict[tuple, ir.Value]:
        if is_uniform(value):
            scalar = self.uniform(value)
            return {slot: scalar for slot in self.geometry.slots(layout)}
        try:
            return self.dists[(value, layout)]
        except KeyError:
            owner = value.owner.name if hasattr(value.owner, "name") else "a block argument"
            raise CompileError(f"nvvm: a value of {owner} has no distributed form in {layout}") from None

    def slot_value(self, value: ir.Value, layout: Layout, slot: tuple) -> ir.Value:
        if vector_shape(value) is None:
            return self._as_i32(self.scalar(value))
        return self.dist(value, layout)[slot]

    def layouts_of(self, value: ir.Value) -> List[Layout]:
        return sorted(self.analysis.of(value), key=str)

    # ------------------------------------------------------------------ coordinates

    def row_of(self, slot: tuple, space: str) -> ir.Value:
        """The work-group row (i32) of a tile or rows slot."""
        m, h = (slot[0], slot[2] // 2) if space == "tile" else slot
        row = arith.addi(self.row_base, arith.addi(self.quad, const_index(16 * m + 8 * h)))
        return arith.index_cast(i32_type(), row)

    def col_of(self, slot: tuple, space: str) -> ir.Value:
        """The column (i32) of a tile or cols slot."""
        j, c = (slot[1], slot[2] % 2) if space == "tile" else slot
        col = arith.addi(self.pair, const_index(8 * j + c))
        return arith.index_cast(i32_type(), col)

    def coordinate(self, axis: Axis, slot: tuple, space: str) -> ir.Value:
        if axis.kind == ROW:
            return self.row_of(slot, space)
        if axis.kind == COL:
            return self.col_of(slot, space)
        if axis.kind == ROW_DIV:
            return arith.divui(self.row_of(slot, space), _i32(axis.arg))
        if axis.kind == ROW_MOD:
            return arith.remui(self.row_of(slot, space), _i32(axis.arg))
        return _i32(0)

    # ------------------------------------------------------------------ op rules

    def translate(self, op: ir.Operation) -> None:
        name = op.name
        rules = {"scf.for": self._for, "scf.if": self._if, "vector.transfer_read": self._read,
                 "vector.transfer_write": self._write, "vector.contract": self._contract,
                 "vector.multi_reduction": self._reduction, "vector.step": self._step,
                 "vector.broadcast": self._broadcast, "vector.shape_cast": self._shape_cast}
        if name in rules:
            return rules[name](op)
        if any(vector_shape(r) is not None for r in op.results):
            if name == "arith.constant":
                return  # uniform: materialized where used
            if self._guarded_select_of(op) is not None:
                return  # emitted under the select's branch
            arm = self._guarded_arm(op) if name == "arith.select" else None
            if arm is not None:
                return self._guarded_select(op, arm)
            if name.startswith(ELEMENTWISE_PREFIXES):
                return self._elementwise(op)
            raise CompileError(f"nvvm: no distribution rule for {name}")
        if any(vector_shape(v) is not None for v in op.operands):
            raise CompileError(f"nvvm: no distribution rule for {name} on vectors")
        copy = op.clone()
        for i, operand in enumerate(op.operands):
            copy.operands[i] = self.scalar(operand)
        for old, new in zip(op.results, copy.results):
            self.scalars[old] = new

    def _elementwise(self, op: ir.Operation) -> None:
        result = op.results[0]
        if op.name == "arith.index_cast":  # index vectors hold i32 slots already
            for layout in self.layouts_of(result):
                self.dists[(result, layout)] = self.dist(op.operands[0], layout)
            return
        element = _scalar_type(_element(result))
        attributes = {name: op.attributes[name] for name in op.attributes}
        if op.name in _CONTRACTIBLE:  # products and sums may fuse into FMAs
            attributes["fastmath"] = ir.Attribute.parse("#arith.fastmath<contract>")
        for layout in self.layouts_of(result):
            slots = {}
            for slot in self.geometry.slots(layout):
                operands = [self.slot_value(v, layout, slot) for v in op.operands]
                if op.name == "math.exp2":
                    slots[slot] = ex2(operands[0])
                else:
                    slots[slot] = ir.Operation.create(op.name, results=[element], operands=operands,
                                                      attributes=attributes).results[0]
            self.dists[(result, layout)] = slots

    def _guarded_arm(self, select: ir.Operation) -> Optional[ir.Operation]:
        """The op of `select`'s true operand when that can run under a warp-uniform branch: an
        elementwise op of the same block used only by the select, whose condition is constant
        along a tile's columns (a broadcast of a rows x 1 vector) and whose result has one
        layout.  Else None."""
        condition, true_value = select.operands[0], select.operands[1]
        arm, source = defining_op(true_value), defining_op(condition)
        if arm is None or source is None or source.name != "vector.broadcast" or is_uniform(condition):
            return None
        if not arm.name.startswith(ELEMENTWISE_PREFIXES) or arm.name == "arith.constant" or arm.regions:
            return None
        shape = vector_shape(source.operands[0])
        if shape is None or len(shape) != 2 or shape[1] != 1 or len(self.layouts_of(select.results[0])) != 1:
            return None
        users = _users(true_value)
        if len(users) != 1 or users[0] != select or arm.parent != select.parent:
            return None
        return arm

    def _guarded_select_of(self, op: ir.Operation) -> Optional[ir.Operation]:
        """The select `op` is the guarded true arm of, if any."""
        if len(op.results) != 1:
            return None
        users = _users(op.results[0])
        if len(users) == 1 and users[0].name == "arith.select":
            arm = self._guarded_arm(users[0])
            if arm is not None and arm == op:
                return users[0]
        return None

    def _guarded_select(self, select: ir.Operation, arm: ir.Operation) -> None:
        """select(c, arm, other) with c constant along rows: each lane ORs its rows' conditions, a
        vote.any makes the branch warp-uniform; the arm and the select run only if taken, else
        the result is `other` as is.  Exact: the select is still applied per slot."""
        result = select.results[0]
        (layout,) = self.layouts_of(result)
        # a lane's slots of one row share its condition: one OR per row, not per slot
        distinct = list(dict.fromkeys(self.dist(select.operands[0], layout).values()))
        any_row = distinct[0]
        for value in distinct[1:]:
            any_row = arith.ori(any_row, value)
        warp_any = nvvm.vote_sync(ir.IntegerType.get_signless(1), _i32(-1), any_row, nvvm.VoteSyncKind.any)
        slots = self.geometry.slots(layout)
        element = _scalar_type(_element(result))
        branch = scf.IfOp(warp_any, [element] * len(slots), has_else=True)
        with ir.InsertionPoint(branch.then_block):
            self._elementwise(arm)
            self._elementwise(select)
            scf.YieldOp([self.dists[(result, layout)][slot] for slot in slots])
        with ir.InsertionPoint(branch.else_block):
            other = self.dist(select.operands[2], layout)
            scf.YieldOp([other[slot] for slot in slots])
        self.dists[(result, layout)] = dict(zip(slots, branch.results))

    def _broadcast(self, op: ir.Operation) -> None:
        result, source = op.results[0], op.operands[0]
        if is_uniform(result):
            return
        for layout in self.layouts_of(result):
            source_layout = broadcast_source_layout(layout, vector_shape(result), vector_shape(source))
            source_slots = self.dist(source, source_layout)
            self.dists[(result, layout)] = {
                slot: source_slots[project_slot(slot, layout.space, source_layout.space)]
                for slot in self.geometry.slots(layout)}

    def _shape_cast(self, op: ir.Operation) -> None:
        result, source = op.results[0], op.operands[0]
        if is_uniform(result):
            return
        if source in self.tiles:  # a staged tile viewed with its leading dims merged
            self.tiles[result] = self.tiles[source]
            if source in self.a_fragments:
                self.a_fragments[result] = self.a_fragments[source]
            return
        for layout in self.layouts_of(result):
            source_layout = shape_cast_layout(layout, vector_shape(result), vector_shape(source))
            self.dists[(result, layout)] = self.dist(source, source_layout)

    def _step(self, op: ir.Operation) -> None:
        result = op.results[0]
        for layout in self.layouts_of(result):
            (axis,) = layout.axes
            self.dists[(result, layout)] = {slot: self.coordinate(axis, slot, layout.space)
                                            for slot in self.geometry.slots(layout)}

    def _reduction(self, op: ir.Operation) -> None:
        kind = str(op.attributes["kind"])
        combine = {"#vector.kind<maximumf>": arith.maximumf, "#vector.kind<add>": arith.addf,
                   "#vector.kind<maxnumf>": arith.maxnumf}.get(kind)
        if combine is None or list(ir.DenseI64ArrayAttr(op.attributes["reduction_dims"])) != [1]:
            raise CompileError(f"nvvm: only row reductions (over dim 1; max or add) are distributed, got {kind}")
        source, acc = op.operands
        (tile_layout,) = self.layouts_of(source)
        tile = self.dist(source, tile_layout)
        result = op.results[0]
        for layout in self.layouts_of(result):
            acc_slots = self.dist(acc, layout)
            slots = {}
            for m, h in self.geometry.slots(layout):
                parts = [tile[(m, j, i)] for j in range(tile_layout.columns // 8) for i in (2 * h, 2 * h + 1)]
                while len(parts) > 1:  # a tree: short dependence chains
                    parts = [combine(parts[k], parts[k + 1]) if k + 1 < len(parts) else parts[k]
                             for k in range(0, len(parts), 2)]
                value = parts[0]
                for offset in (1, 2):  # the other 3 lanes of the quad hold the row's other columns
                    value = combine(value, shuffle_xor(value, offset))
                slots[(m, h)] = combine(value, acc_slots[(m, h)])
            self.dists[(result, layout)] = slots

    # ------------------------------------------------------------------ memory

    def _element_address(self, base, indices, dims, in_bounds, layout: Layout, slot: tuple):
        """Indices of a slot's element, clamped into the memref along dims that may run out of
        bounds, and the i1 'inside' predicate (None when every dim is in bounds)."""
        at = list(indices)
        inside = None
        for vdim, (mdim, axis) in enumerate(zip(dims, layout.axes)):
            offset = arith.index_cast(index(), self.coordinate(axis, slot, layout.space))
            position = arith.addi(indices[mdim], offset)
            if not in_bounds[vdim]:
                extent = memref.dim(base, const_index(mdim))
                ok = arith.cmpi(arith.CmpIPredicate.ult, position, extent)
                inside = ok if inside is None else arith.andi(inside, ok)
                position = arith.minui(position, arith.subi(extent, const_index(1)))
            at[mdim] = position
        return at, inside

    def _read(self, op: ir.Operation) -> None:
        if op in self.analysis.staged:
            return self._stage(op)
        base = self.scalar(op.operands[0])
        indices = [self.scalar(i) for i in op.opview.indices]
        padding = self.scalar(op.opview.padding)
        dims, in_bounds = _permutation_dims(op), _in_bounds(op)
        result = op.results[0]
        element = _element(result)
        for layout in self.layouts_of(result):
            # Two adjacent columns in one load where the memref is one of ours (a workspace or
            # the output: identity layout, aligned); a user's tensor may start at any element.
            pairs = (layout.space == "tile" and layout.axes[-1].kind == COL and in_bounds[-1]
                     and dims[-1] == ir.MemRefType(base.type).rank - 1
                     and "strided" not in str(base.type))
            slots = {}
            for slot in self.geometry.slots(layout):
                if pairs and slot[2] % 2:
                    continue  # loaded with its left neighbour
                at, inside = self._element_address(base, indices, dims, in_bounds, layout, slot)
                if pairs:
                    both = vector.load(ir.VectorType.get([2], element), base, at, alignment=2 * _bytes(element))
                    loaded = [vector.extract(both, [], [i]) for i in (0, 1)]
                    targets = [slot, (slot[0], slot[1], slot[2] + 1)]
                else:
                    loaded, targets = [memref.load(base, at)], [slot]
                for target, value in zip(targets, loaded):
                    slots[target] = value if inside is None else arith.select(inside, value, padding)
            self.dists[(result, layout)] = slots

    def _write(self, op: ir.Operation) -> None:
        value = op.operands[0]
        base = self.scalar(op.operands[1])
        indices = [self.scalar(i) for i in op.opview.indices]
        dims = _permutation_dims(op)
        in_bounds = [ir.BoolAttr(b).value for b in ir.ArrayAttr(op.attributes["in_bounds"])] \
            if "in_bounds" in op.attributes else [False] * len(dims)
        layouts = self.layouts_of(value)
        if len(layouts) != 1:
            raise CompileError(f"nvvm: a written vector must have exactly one layout, has {layouts}")
        (layout,) = layouts
        slots = self.dist(value, layout)
        one_writer = None
        if layout.space == "rows":  # the 4 lanes of a quad hold the same row: one of them writes
            one_writer = arith.cmpi(arith.CmpIPredicate.eq, arith.remui(self.lane, const_index(4)),
                                    const_index(0))
        pairs = (layout.space == "tile" and layout.axes[-1].kind == COL and in_bounds[-1]
                 and dims[-1] == ir.MemRefType(base.type).rank - 1)
        for slot in self.geometry.slots(layout):
            if pairs and slot[2] % 2:
                continue  # stored with its left neighbour
            at, inside = self._element_address(base, indices, dims, in_bounds, layout, slot)
            guard = one_writer if inside is None else inside if one_writer is None \
                else arith.andi(inside, one_writer)
            with ir.InsertionPoint.current:
                branch = scf.IfOp(guard) if guard is not None else None
            with ir.InsertionPoint(branch.then_block) if branch else ir.InsertionPoint.current:
                if pairs:  # two adjacent columns: one 2-element store
                    neighbour = (slot[0], slot[1], slot[2] + 1)
                    element = _element(value)
                    both = vector.from_elements(ir.VectorType.get([2], element), [slots[slot], slots[neighbour]])
                    vector.store(both, base, at, alignment=2 * _bytes(element))
                else:
                    memref.store(slots[slot], base, at)
                if branch:
                    scf.YieldOp([])

    # ------------------------------------------------------------------ staging in shared memory

    @staticmethod
    def _staged_shape(op: ir.Operation) -> Tuple[int, int]:
        shape = vector_shape(op.results[0])
        rows = 1
        for s in shape[:-1]:
            rows *= s
        return rows, shape[-1]

    def _issue_copy(self, op: ir.Operation, tile: SharedTile, replace: Dict[ir.Value, ir.Value]) -> None:
        """cp.async of a staged read into `tile`, 16 bytes per copy over all threads; along a dim
        that may run out of bounds, rows past the memref's end are zero-filled (source size 0,
        the address one inside the memref).  (Copying the tiles wholly inside without checks,
        in a branch of their own, measured more spills at D = 128 than the checks cost.)"""
        base = self.scalar(op.operands[0])
        indices = [replace[i] if i in replace else self.scalar(i) for i in op.opview.indices]
        self._copies(op, tile, base, indices)

    def _copies(self, op: ir.Operation, tile: SharedTile, base, indices) -> None:
        shape = vector_shape(op.results[0])
        element = _element(op.results[0])
        chunk = 16 // _bytes(element)
        if shape[-1] % chunk:
            raise CompileError(f"nvvm: staged tiles need rows of a multiple of {chunk} elements, got {shape[-1]}")
        dims, in_bounds = _permutation_dims(op), _in_bounds(op)
        if not in_bounds[-1]:
            raise CompileError("nvvm: a staged tile must be in bounds along its rows")
        per_row = shape[-1] // chunk
        rows, _ = self._staged_shape(op)
        threads = self.geometry.threads
        lead = [vdim for vdim in range(len(shape) - 1) if shape[vdim] != 1] or [0]
        lanes = min(per_row, threads)  # threads per row (each copies per_row / lanes chunks of it)
        if len(lead) == 1 and threads % lanes == 0 and per_row % lanes == 0 and rows % (threads // lanes) == 0:
            # one dim of rows (others of extent 1): strength-reduced
            return self._strided_copies(tile, base, indices, (dims[lead[0]], dims[-1]), rows, per_row, chunk,
                                        not in_bounds[lead[0]])
        total = rows * per_row
        for it in range(-(-total // threads)):
            c = arith.addi(self.tid, const_index(it * threads))
            row = arith.divui(c, const_index(per_row))
            col = arith.muli(arith.remui(c, const_index(per_row)), const_index(chunk))
            at, valid, rest = list(indices), None, row
            for vdim in reversed(range(len(shape) - 1)):  # the flat tile row -> the read's leading dims
                coordinate = arith.remui(rest, const_index(shape[vdim])) if vdim else rest
                rest = arith.divui(rest, const_index(shape[vdim])) if vdim else rest
                mdim = dims[vdim]
                position = arith.addi(indices[mdim], coordinate)
                if not in_bounds[vdim]:
                    extent = memref.dim(base, const_index(mdim))
                    ok = arith.cmpi(arith.CmpIPredicate.ult, position, extent)
                    valid = ok if valid is None else arith.andi(valid, ok)
                    position = arith.minui(position, arith.subi(extent, const_index(1)))
                at[mdim] = position
            at[dims[-1]] = arith.addi(indices[dims[-1]], col)
            source_size = None if valid is None else arith.select(valid, const_index(chunk), const_index(0))

            def copy(at=at, row=row, col=col, source_size=source_size):
                nvgpu.device_async_copy(tile.buffer, tile.indices(row, col), base, at,
                                        ir.IntegerAttr.get(index(), chunk), src_elements=source_size,
                                        bypass_l1=True)
            if total % threads and it == total // threads:
                branch = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, c, const_index(total)))
                with ir.InsertionPoint(branch.then_block):
                    copy()
                    scf.YieldOp([])
            else:
                copy()

    def _strided_copies(self, tile: SharedTile, base, indices, dims, rows: int, per_row: int, chunk: int,
                        checked: bool) -> None:
        """The copies of a tile of `rows` rows along memref dim dims[0] (of columns along dims[1]),
        strength-reduced: each thread copies one column chunk (or, where a row has more chunks
        than the block threads, every threads-th chunk) of rows row0, row0 + step, ... (step =
        threads / per_row, at least 1), so its source offsets are one product and then one
        addition per copy, over a flat view of the memref's buffer (indexing the memref itself
        costs a 64-bit product per copy), and its shared-memory offsets differ by constants.
        `checked`: rows at or past the memref's extent are zero-filled, their copies reading
        (nothing from) the tile's first row, which is inside."""
        lanes = min(per_row, self.geometry.threads)
        step = self.geometry.threads // lanes
        row0 = arith.divui(self.tid, const_index(lanes))
        col = arith.muli(arith.remui(self.tid, const_index(lanes)), const_index(chunk))
        metadata = memref.ExtractStridedMetadataOp(base)
        rank = ir.MemRefType(base.type).rank
        offset, strides = metadata.results[1], list(metadata.results[2 + rank:2 + 2 * rank])

        def linear_at(first_row):
            at = list(indices)
            at[dims[0]] = arith.addi(indices[dims[0]], first_row)
            at[dims[1]] = arith.addi(indices[dims[1]], col)
            value = offset
            for d in range(rank):
                value = arith.addi(value, arith.muli(at[d], strides[d]))
            return value
        linear = linear_at(row0)
        flat_type = ir.MemRefType.get([ir.ShapedType.get_dynamic_size()], ir.MemRefType(base.type).element_type,
                                      memory_space=ir.MemRefType(base.type).memory_space)
        extent = arith.addi(linear, arith.muli(const_index(rows), strides[dims[0]]))  # (never read)
        flat = memref.reinterpret_cast(flat_type, metadata.results[0], [], [extent], [],
                                       [0], [ir.ShapedType.get_dynamic_size()], [1])
        advance = arith.muli(const_index(step), strides[dims[0]])
        if checked:  # rows this thread may copy: those below extent - (first row + row0)
            first = linear_at(const_index(0))
            left = arith.subi(memref.dim(base, const_index(dims[0])), arith.addi(indices[dims[0]], row0))
            # compared in 32 bits (one instruction a copy), clamped first: only left < rows matters
            left = arith.index_cast(ir.IntegerType.get_signless(32), arith.minsi(left, const_index(rows)))
        across = arith.muli(const_index(lanes * chunk), strides[dims[1]])  # to a thread's next chunk
        for k in range(rows // step):
            if k:
                linear = arith.addi(linear, advance)
            valid = arith.cmpi(arith.CmpIPredicate.slt, _i32(k * step), left) if checked else None
            at = linear
            for c in range(per_row // lanes):
                if c:
                    at = arith.addi(at, across)
                source, size = at, None
                if checked:
                    source = arith.select(valid, at, first)
                    size = arith.select(valid, const_index(chunk), const_index(0))
                nvgpu.device_async_copy(tile.buffer, tile.indices(arith.addi(row0, const_index(k * step)),
                                                                  arith.addi(col, const_index(c * lanes * chunk))),
                                        flat, [source], ir.IntegerAttr.get(index(), chunk), src_elements=size,
                                        bypass_l1=True)

    def _stage(self, op: ir.Operation) -> None:
        result = op.results[0]
        if op.parent.name == "scf.for":  # pipelined by the loop (see _for): this iteration's stage
            self.tiles[result] = self._current[op]
            return
        tile = self._buffers[op]
        self._issue_copy(op, tile, {})
        nvvm.cp_async_commit_group()
        self.tiles[result] = tile
        self._landing.append(result)

    def _land_staged(self, newer_groups: int = 0) -> None:
        """Wait for the staged reads outside loops (Q) whose copies are in flight, all but the
        `newer_groups` copy groups committed after them, and load the tiles that stay in
        registers.  Deferred from the read to the first op that may need them, so that the first
        tiles of the loop that follows (K) are copied while Q's are: one memory latency a
        work-group, not two, before its first step."""
        if not self._landing:
            return
        nvvm.cp_async_wait_group(newer_groups)
        if any(self.tiles[result].swizzled for result in self._landing):
            fence_async_proxy()
        gpu.barrier()
        for result in self._landing:
            if self._feeds_operand(result, 0) and self.geometry.q_in_registers:
                self.a_fragments[result] = self._load_a_fragments(self.tiles[result], vector_shape(result)[-1],
                                                                  _element(result))
        self._landing = []

    @staticmethod
    def _may_precede_landing(op: ir.Operation) -> bool:
        """Whether `op` may run while staged copies are in flight: scalar ops (indices, bounds) and
        reads outside loops (staged ones only issue copies, others load from global memory); a
        loop lands the copies itself, after issuing its first tiles'."""
        if op.name == "scf.for":
            return True
        if op.name == "vector.transfer_read" and op.parent.name != "scf.for":
            return True
        return not list(op.regions) and not any(vector_shape(v) is not None
                                                for v in list(op.operands) + list(op.results))

    @staticmethod
    def _feeds_operand(value: ir.Value, position: int) -> bool:
        """Whether `value` (through shape casts) is operand `position` of a contraction (0: the
        left, 1: the right)."""
        for user in _users(value):
            if user.name == "vector.shape_cast" and WorkGroupKernel._feeds_operand(user.results[0], position):
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

    # ------------------------------------------------------------------ tensor cores

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
        m-tiles of the warp in it); the A fragments of the next slice load while it runs.  A
        zero accumulator (S = Q K^T) is not read: the first slice overwrites it."""
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
        for kk in range(k // 16):
            at = arith.addi(descriptor, arith.constant(i64, tile.slice_offset(kk, k_major) >> 4))
            values = warpgroup_mma(values, [a_operand(m, kk) for m in range(tiles)], at, n, element,
                                   transpose_b=not k_major)
        values = warpgroup_wait(values)
        self.dists[(result, layout)] = {(m, j, i): values[m][4 * j + i]
                                        for m in range(tiles) for j in range(n // 8) for i in range(4)}

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

    # ------------------------------------------------------------------ control flow

    def _flatten(self, values: Sequence[ir.Value], layouts: Sequence[Optional[Layout]]) -> List[ir.Value]:
        flat = []
        for value, layout in zip(values, layouts):
            if layout is None:
                flat.append(self.scalar(value))
            else:
                slots = self.dist(value, layout)
                flat.extend(slots[s] for s in self.geometry.slots(layout))
        return flat

    def _unflatten(self, olds: Sequence[ir.Value], layouts, news: Sequence[ir.Value]) -> None:
        it = iter(news)
        for old, layout in zip(olds, layouts):
            if layout is None:
                self.scalars[old] = next(it)
            else:
                self.dists[(old, layout)] = {s: next(it) for s in self.geometry.slots(layout)}

    def _carried_layout(self, value: ir.Value) -> Optional[Layout]:
        if vector_shape(value) is None:
            return None
        layouts = self.layouts_of(value)
        if len(layouts) != 1:
            raise CompileError(f"nvvm: a loop-carried or yielded vector needs one layout, has {layouts}: "
                               f"{value.get_name() if hasattr(value, 'get_name') else value}")
        return layouts[0]

    def _for(self, op: ir.Operation) -> None:
        view = op.opview
        body = view.body
        layouts = [self._carried_layout(a) for a in view.inner_iter_args]
        staged = [o.operation for o in body.operations if o.operation in self.analysis.staged]
        iv_old = view.induction_variable
        if not staged:  # nothing to overlap Q's copy with
            self._land_staged()
        trips = _static_trip_count(view)
        constant_steps = _constant_int(view.lowerBound) is not None and _constant_int(view.step) is not None
        if not staged and constant_steps:
            factor = self._unroll_factor(layouts)
            if trips is None or trips > factor:
                return self._unrolled_for(op, layouts, factor, whole=trips is not None and trips % factor == 0)
        lower, upper, step = (self.scalar(v) for v in (view.lowerBound, view.upperBound, view.step))
        if staged:  # first stage of the pipeline: the staged reads of the first iteration it copies ahead
            ahead = staged if self.geometry.copies_every_tile_ahead else staged[:1]
            if len(ahead) > 1:
                gpu.barrier()  # a loop before this one (sharing the buffers) may still read them
            # Only if the loop runs: a peeled loop of full tiles has no step when S < kv_tile, and
            # its copy (without checks) would read past the memref and race with the tail loop's.
            runs = scf.IfOp(arith.cmpi(arith.CmpIPredicate.slt, lower, upper))
            with ir.InsertionPoint(runs.then_block):
                for read in ahead:
                    self._issue_copy(read, self._buffers[read].at(const_index(0)), {iv_old: lower})
                scf.YieldOp([])
            nvvm.cp_async_commit_group()
            self._land_staged(newer_groups=1)  # Q, while the first tiles are in flight
        pipeline = (lambda j: self._pipeline(staged, j, lower, upper, step, iv_old)) if staged else None
        results = self._plain_loop(view, layouts, lower, upper, step, self._flatten(view.initArgs, layouts), pipeline)
        self._unflatten(op.results, layouts, results)

    def _plain_loop(self, view, layouts, lower, upper, step, init, prologue=None) -> List[ir.Value]:
        """One iteration of `view`'s body per iteration of a new loop from `init` (flattened
        values), `prologue(iv)` emitted first in its body; its results, flattened."""
        loop = scf.ForOp(lower, upper, step, init)
        with ir.InsertionPoint(loop.body):
            self.scalars[view.induction_variable] = loop.induction_variable
            self._unflatten(view.inner_iter_args, layouts, list(loop.inner_iter_args))
            if prologue is not None:
                prologue(loop.induction_variable)
            self._block(view.body)
            scf.YieldOp(self._flatten(list(view.body.operations)[-1].operation.operands, layouts))
        return list(loop.results)

    def _unroll_factor(self, layouts) -> int:
        """UNROLL, or the largest power of two up to 16 whose iterations' carried values fit in
        UNROLL_REGISTERS registers a lane."""
        slots = sum(len(self.geometry.slots(layout)) for layout in layouts if layout is not None)
        factor = UNROLL
        while factor < 16 and 2 * factor * max(slots, 1) <= UNROLL_REGISTERS:
            factor *= 2
        return factor

    def _unrolled_for(self, op: ir.Operation, layouts, factor: int, whole: bool) -> None:
        """A loop of constant lower bound and step without staged reads (the split-key combine:
        one iteration per split) with `factor` iterations per emitted iteration: their loads do
        not depend on the carried values and can be in flight together, where the plain loop
        waits for each iteration's loads in turn (a full unroll keeps too many loads live:
        spills).  Unless the trip count is known to be a multiple of `factor` (`whole`), a
        plain loop does the remaining iterations."""
        view = op.opview
        lower, step = _constant_int(view.lowerBound), _constant_int(view.step)
        body = view.body
        upper = self.scalar(view.upperBound)
        end = upper
        if not whole:  # lower + the largest multiple of step * factor not past upper
            span = const_index(step * factor)
            count = arith.divui(arith.subi(arith.maxui(upper, const_index(lower)), const_index(lower)), span)
            end = arith.addi(const_index(lower), arith.muli(count, span))
        loop = scf.ForOp(const_index(lower), end, const_index(step * factor), self._flatten(view.initArgs, layouts))
        with ir.InsertionPoint(loop.body):
            carried = list(loop.inner_iter_args)
            for k in range(factor):
                self.scalars[view.induction_variable] = arith.addi(loop.induction_variable, const_index(k * step))
                self._unflatten(view.inner_iter_args, layouts, carried)
                self._block(body)
                carried = self._flatten(list(body.operations)[-1].operation.operands, layouts)
            scf.YieldOp(carried)
        results = list(loop.results)
        if not whole:
            results = self._plain_loop(view, layouts, end, upper, const_index(step), results)
        self._unflatten(op.results, layouts, results)

    def _pipeline(self, staged, j, lower, upper, step, iv_old) -> None:
        """Double buffering of the loop's staged reads (see the module docstring)."""
        stage = arith.remui(arith.divui(arith.subi(j, lower), step), const_index(2))
        other = arith.subi(const_index(1), stage)
        swizzled = any(self._buffers[read].swizzled for read in staged)
        nvvm.cp_async_wait_group(0)
        if swizzled:
            fence_async_proxy()
        gpu.barrier()  # this iteration's tiles copied ahead have landed; last iteration's reads are done
        self._current = {read: self._buffers[read].at(stage) for read in staged}
        following = arith.addi(j, step)

        def copy_next(reads):
            branch = scf.IfOp(arith.cmpi(arith.CmpIPredicate.slt, following, upper))
            with ir.InsertionPoint(branch.then_block):
                for read in reads:
                    self._issue_copy(read, self._buffers[read].at(other), {iv_old: following})
                scf.YieldOp([])
            nvvm.cp_async_commit_group()  # (an empty group in the last iteration keeps the count)
        if self.geometry.prefetch == "tiles":  # every tile of the next iteration, into the other stages
            copy_next(staged)
            return
        first = staged[0]
        consumer = next(u for u in _users(first.results[0]) if u.name == "vector.contract")
        if self.geometry.prefetch == "tiles-late":  # the same, once this K tile is consumed
            self._after[consumer] = lambda: copy_next(staged)
            return
        # (Copying the first step's V tile ahead with its K tile, and skipping it in the first
        # step, measured 0.5-2% slower: the branch costs every step more than the first saves.)
        for read in staged[1:]:  # this iteration's other tiles (V)
            self._issue_copy(read, self._current[read], {})
        nvvm.cp_async_commit_group()
        self._after[consumer] = lambda: copy_next([first])  # the next K, once this one is consumed
        for read in staged[1:]:
            def wait():
                nvvm.cp_async_wait_group(1)  # all but the newest group (the next K): V is here
                if swizzled:
                    fence_async_proxy()
                gpu.barrier()
            self._before[read] = wait

    def _if(self, op: ir.Operation) -> None:
        layouts = [self._carried_layout(r) for r in op.results]
        types = []
        for result, layout in zip(op.results, layouts):
            if layout is None:
                types.append(result.type)
            else:
                types.extend([_scalar_type(_element(result))] * len(self.geometry.slots(layout)))
        branch = scf.IfOp(self.scalar(op.operands[0]), types, has_else=len(op.regions[1].blocks) > 0)
        for old_region, new_block in ((op.regions[0], branch.then_block),
                                      (op.regions[1], branch.else_block if len(op.regions[1].blocks) else None)):
            if new_block is None:
                continue
            with ir.InsertionPoint(new_block):
                block = old_region.blocks[0]
                self._block(block)
                scf.YieldOp(self._flatten(list(block.operations)[-1].operation.operands, layouts))
        self._unflatten(op.results, layouts, list(branch.results))
