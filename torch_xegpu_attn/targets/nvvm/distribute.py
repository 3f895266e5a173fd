"""Distribution of one work-group loop to a CUDA thread block: every vector op by its layout.

A work-group (one iteration of an scf.forall of the shared IR) becomes one
thread block of `Geometry.warps` warps.  Each vector value is distributed
by the Layout(s) the nvvm-layouts stage wrote on its op (analysis.py; one
scalar per slot, see layout.py); each op is re-emitted per slot by its rule:

    elementwise arith/math     one scalar op per slot (exp2 -> ex2.approx)
    broadcast / shape_cast     no code: a slot reads the slot it projects to
    vector.step                the slot's coordinate along the dim
    multi_reduction (rows)     per-lane reduction over the row's slots, then
                               shuffle-xor 1 and 2 across the lanes of a quad
    transfer_read / _write     per-slot loads and stores at the slot's
                               coordinates; out-of-bounds dims are predicated
                               (reads give the padding value, stores are skipped);
                               reads that only feed contractions are staged in
                               shared memory instead (staging.py)
    select on row conditions   when its true operand is an elementwise op used
                               only by it (the lazily rescaled accumulator), that
                               op and the select run under a warp-uniform branch
                               taken only if a row of the warp selects it (vote.any)
    scf.for / scf.if           the same op on the flattened slot scalars (a loop
                               with staged reads double-buffers them: staging.py)
    contract                   tensor cores (tensor_cores.py)

Scalar ops (indices, bounds) are uniform across the block and cloned.

The parts: `WorkGroupKernel` here (the values' distributed forms, the slots'
coordinates, the per-op rules, control flow), `staging.Staging` (shared-memory
buffers, cp.async copies, the pipeline of a loop's tiles),
`tensor_cores.TensorCoreContractions` (the contraction rule) and ptx.py (the
PTX pieces they emit).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mlir import ir
from mlir.dialects import arith, gpu, memref, nvvm, scf, vector

from ...mlir_utils import CompileError, const_index, defining_op, index

from .analysis import ELEMENTWISE_PREFIXES, LayoutAnalysis, is_uniform, vector_shape
from .layout import (COL, ROW, ROW_DIV, ROW_MOD, Axis, Geometry, Layout, broadcast_source_layout,
                     project_slot, shape_cast_layout)
from .ptx import _i32, ex2, i32_type, shuffle_xor
from .staging import SharedTile, Staging
from .tensor_cores import TensorCoreContractions
from .values import (_bytes, _constant_int, _element, _in_bounds, _permutation_dims, _scalar_type,
                     _static_trip_count, _users, clamped)

#: float ops whose products and sums may contract into FMAs (fastmath contract).
_CONTRACTIBLE = ("arith.addf", "arith.subf", "arith.mulf")


#: iterations per emitted iteration of a loop without staged reads (the split-key combine): at
#: least UNROLL, more while their carried values take at most UNROLL_REGISTERS registers a lane.
UNROLL = 4
UNROLL_REGISTERS = 192
#: a read in a loop that may run out of bounds with at least this many slots a lane checks once
#: whether the tile is wholly inside (then loads without a check per slot).
WHOLE_TILE_MIN_SLOTS = 8


class WorkGroupKernel(Staging, TensorCoreContractions):
    """The distributed body of one work-group loop, emitted inside a gpu.func: the values'
    distributed forms and the per-op rules here; staging in shared memory and the contraction
    rule from its parts (Staging, TensorCoreContractions)."""

    def __init__(self, loop: ir.Operation, geometry: Geometry, outer: Callable[[ir.Value], ir.Value],
                 entry: ir.InsertionPoint):
        self.loop = loop
        self.entry = entry  # the kernel's entry: loop-invariant constants go there
        self.geometry = geometry
        self.outer = outer  # a value of the old function -> the same value in the kernel
        self.body = loop.regions[0].blocks[0]
        self.analysis = LayoutAnalysis.from_annotations(self.body, geometry.rows)
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
        #: committed wgmma groups not yet waited for, oldest first: ((value, layout), their slots)
        self._in_flight: List[Tuple[Tuple[ir.Value, Layout], Dict[tuple, ir.Value]]] = []
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
        self._await()

    def _block(self, block: ir.Block) -> None:
        for op in block.operations:
            op = op.operation
            if op.name in ("scf.forall.in_parallel", "scf.yield"):
                continue
            if self._landing and not self._may_precede_landing(op):
                self._land_staged()
            if op.regions:  # a loop or branch reads its values in other blocks: nothing stays in flight
                self._await()
            if op in self._before:
                self._before.pop(op)()
            self.translate(op)
            if op in self._after:
                self._after.pop(op)()


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
        if any(key == (value, layout) for key, _ in self._in_flight):
            self._await((value, layout))
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
        self._await()  # the branch's arms read values in their own blocks
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
                position, inside = clamped(base, mdim, position, inside)
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
        for layout in self.layouts_of(result):
            slots = self.geometry.slots(layout)
            if all(in_bounds) or len(slots) < WHOLE_TILE_MIN_SLOTS or op.parent.name != "scf.for":
                self.dists[(result, layout)] = self._loads(base, indices, dims, in_bounds, padding, layout)
                continue
            # In a loop, a tile wholly inside the memref (every tile but a tail) loads without a
            # check per slot: a warp-uniform branch, whose loads take constant offsets from one
            # address.  (Outside loops a read runs once: there the branch's join, which keeps
            # every slot live at once, would cost registers for nothing.)
            element = _scalar_type(_element(result))
            branch = scf.IfOp(self._wholly_inside(base, indices, dims, in_bounds, vector_shape(result)),
                              [element] * len(slots), has_else=True)
            with ir.InsertionPoint(branch.then_block):
                inside = self._loads(base, indices, dims, [True] * len(dims), padding, layout)
                scf.YieldOp([inside[slot] for slot in slots])
            with ir.InsertionPoint(branch.else_block):
                checked = self._loads(base, indices, dims, in_bounds, padding, layout)
                scf.YieldOp([checked[slot] for slot in slots])
            self.dists[(result, layout)] = dict(zip(slots, branch.results))

    @staticmethod
    def _wholly_inside(base, indices, dims, in_bounds, shape) -> ir.Value:
        """Whether a read of `shape` at `indices` stays inside the memref along every dim that
        may run out of bounds (i1, uniform)."""
        whole = None
        for vdim, mdim in enumerate(dims):
            if in_bounds[vdim]:
                continue
            end = arith.addi(indices[mdim], const_index(shape[vdim]))
            ok = arith.cmpi(arith.CmpIPredicate.ule, end, memref.dim(base, const_index(mdim)))
            whole = ok if whole is None else arith.andi(whole, ok)
        return whole

    def _loads(self, base, indices, dims, in_bounds, padding, layout: Layout) -> Dict[tuple, ir.Value]:
        """Each slot of `layout` loaded from `base` at `indices` (+ its coordinates); along dims
        not in bounds, clamped and the padding where outside."""
        element = ir.MemRefType(base.type).element_type
        # Two adjacent columns in one load where the memref is one of ours (a workspace or the
        # output: identity layout, aligned); a user's tensor may start at any element.
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
        return slots

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
        staged = self._by_first_use([o.operation for o in body.operations if o.operation in self.analysis.staged])
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
            self._await()
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
                self._await()
                carried = self._flatten(list(body.operations)[-1].operation.operands, layouts)
            scf.YieldOp(carried)
        results = list(loop.results)
        if not whole:
            results = self._plain_loop(view, layouts, end, upper, const_index(step), results)
        self._unflatten(op.results, layouts, results)


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
                self._await()
                scf.YieldOp(self._flatten(list(block.operations)[-1].operation.operands, layouts))
        self._unflatten(op.results, layouts, list(branch.results))
