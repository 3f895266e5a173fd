"""Staging and pipelining of a work-group's tensor-core operand tiles in shared memory.

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
together.  `Staging` is the part of distribute.WorkGroupKernel that does it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from mlir import ir
from mlir.dialects import arith, gpu, memref, nvgpu, nvvm, scf

from ...mlir_utils import CompileError, const_index, index

from .analysis import vector_shape
from .ptx import _i32, fence_async_proxy, i64_type
from .values import _bytes, _element, _in_bounds, _permutation_dims, _users, clamped

#: bytes added to each shared-memory row: the 8 rows an ldmatrix reads fall in distinct banks.
PITCH_PAD_BYTES = 16
#: a tile wgmma reads through a matrix descriptor is stored for the 128-byte swizzle: in panels
#: of PANEL_COLS columns (128 bytes of 16-bit elements) by its rows, the 16-byte chunk c of row r
#: at chunk c ^ (r % 8) of the row (the banks of 8 rows' chunks differ), each panel starting on
#: SWIZZLE_ALIGN bytes (the hardware swizzles by address bits 4-6 ^ 7-9).
PANEL_COLS = 64
SWIZZLE_ALIGN = 1024
_WORKGROUP = "#gpu.address_space<workgroup>"


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


class Staging:
    """Shared-memory buffers of the staged reads, their cp.async copies and the double-buffered
    pipeline of a loop's tiles (a part of distribute.WorkGroupKernel: it uses the kernel's
    geometry, thread ids, values and hooks)."""

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
                    position, valid = clamped(base, mdim, position, valid)
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
    def _by_first_use(reads: List[ir.Operation]) -> List[ir.Operation]:
        """A loop body's staged reads in the order the body first uses them: the first is the
        tile a step needs first (K of the forward's Q K^T), which the pipeline copies a step
        ahead; the others (V) are copied at the step's start."""
        if not reads:
            return reads
        position = {op.operation: i for i, op in enumerate(reads[0].parent.regions[0].blocks[0].operations)}

        def first_use(read: ir.Operation) -> int:
            return min((position[op] for op in _body_users(read.results[0], position)), default=len(position))
        return sorted(reads, key=lambda read: (first_use(read), position[read]))

    def _pipeline(self, staged, j, lower, upper, step, iv_old) -> None:
        """Double buffering of the loop's staged reads, ordered by first use (see the module
        docstring)."""
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
        first = staged[0]  # the tile needed first (the forward's K)
        consumer = _first_contraction(first)
        if self.geometry.prefetch == "tiles-late":  # the same, once this K tile is consumed
            self._after[consumer] = lambda: copy_next(staged)
            return
        # (Copying the first step's V tile ahead with its K tile, and skipping it in the first
        # step, measured 0.5-2% slower: the branch costs every step more than the first saves.)
        for read in staged[1:]:  # this iteration's other tiles (the forward's V)
            self._issue_copy(read, self._current[read], {})
        nvvm.cp_async_commit_group()
        next_issued = []  # whether the body emitted so far has committed the next K's copy

        def copy_next_first():
            copy_next([first])
            next_issued.append(True)
        self._after[consumer] = copy_next_first  # the next K, once this one is consumed
        def wait():
            # V's group is the newest but for the next K's, where that was committed before
            nvvm.cp_async_wait_group(1 if next_issued else 0)
            if swizzled:
                fence_async_proxy()
            gpu.barrier()
        # before the first op that uses one of them (not at their reads, which a body may hold
        # at its start: then the copy would be waited for as soon as it was issued)
        if staged[1:]:
            self._before[_first_user(staged[1:])] = wait


def _first_user(reads: List[ir.Operation], name: Optional[str] = None) -> ir.Operation:
    """The first op of the reads' loop body that uses one of their tiles (of those named `name`,
    if given)."""
    body = list(reads[0].parent.regions[0].blocks[0].operations)
    position = {op.operation: i for i, op in enumerate(body)}
    users = [user for read in reads for user in _body_users(read.results[0], position)
             if name is None or user.name == name]
    if not users:
        raise CompileError(f"nvvm: a staged tile of a loop is not used{f' by a {name}' if name else ''} in its body")
    return min(users, key=lambda op: position[op])


def _first_contraction(read: ir.Operation) -> ir.Operation:
    """The contraction of `read`'s loop body that consumes its tile first (a tile may feed
    several: the dQ loop's K tile is the right operand of Q K^T and of dS K)."""
    return _first_user([read], "vector.contract")


def _body_users(value: ir.Value, body_ops) -> List[ir.Operation]:
    """The ops of a loop body (`body_ops`) that use `value` or hold an op that does, looking
    through the shape casts it goes through."""
    found = []
    for user in _users(value):
        if user.name == "vector.shape_cast":
            found.extend(_body_users(user.results[0], body_ops))
            continue
        while user is not None and user not in body_ops:
            parent = user.parent
            user = parent.operation if parent is not None else None
        if user is not None:
            found.append(user)
    return found
