"""CPU stage piece: elementwise code on 2-D tiles as loops over their rows.

A work-group step computes on whole (rows x columns) tiles: the softmax's
subtraction of the row maximum, the exp2 polynomial, the row sums.  Lowered as
they are, each op becomes one op per row, and llc interleaves the whole tile's
worth of them: intermediate tiles
(rows x columns / lanes registers, far more than a register file holds) go to
the stack and back between ops.  This piece turns each such run of ops into a
loop whose body computes one row:

    segment = a run of elementwise ops on (R x N) vectors in one block, and the
              reductions over the columns of their results
    at the segment's first op:
        tiles and per-row values the segment reads from outside -> stack buffers
        for r in [0, R):                      scf.for
            for op in segment:                in their order
                op on row r (N-wide vectors); a reduction -> element r of a buffer
        reductions' results <- their buffers

so one row's values stay in registers from the segment's first op to its last.
A tile that the micro-kernel copies to the stack row by row (the probabilities,
P.V's left operand) is stored into that copy by the loop, row r at a time; its
other uses after the segment (the backward's dS = P * (dP - Delta) reads P
again) read that copy, and a later segment loads its rows from it directly.  A
segment with a result used otherwise and not copied (a tile written to the
output) is left as it is: reading the tile back whole would cost what the loop
saves.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from mlir import ir
from mlir.dialects import arith, memref, scf, vector

from ...mlir_utils import const_index, defining_op, walk
from .microkernel import stack_buffer

#: dialects whose ops on vectors are elementwise (all operands and results of one shape).
_ELEMENTWISE_DIALECTS = ("arith.", "math.")
_ELEMENTWISE_OPS = ("vector.fma",)


def _tile_shape(value: ir.Value) -> Optional[List[int]]:
    t = value.type
    if isinstance(t, ir.VectorType) and t.rank == 2 and not t.scalable:
        return list(t.shape)
    return None


def _is_elementwise(op: ir.Operation, shape: List[int]) -> bool:
    name = op.name
    if name == "arith.constant" or not (name.startswith(_ELEMENTWISE_DIALECTS) or name in _ELEMENTWISE_OPS):
        return False
    if len(op.results) != 1 or len(op.regions):
        return False
    values = list(op.operands) + list(op.results)
    return all(_tile_shape(v) == shape for v in values)


def _splat(value: ir.Value) -> Optional[ir.Attribute]:
    """The element of a splat arith.constant vector, else None (made again wherever needed)."""
    op = defining_op(value)
    if op is None or op.name != "arith.constant":
        return None
    attribute = op.attributes["value"]
    if not isinstance(attribute, ir.DenseElementsAttr) or not attribute.is_splat:
        return None
    return ir.DenseElementsAttr(attribute).get_splat_value()


def _is_row_reduction(op: ir.Operation) -> bool:
    return (op.name == "vector.multi_reduction"
            and list(ir.DenseI64ArrayAttr(op.attributes["reduction_dims"])) == [1]
            and _tile_shape(op.operands[0]) is not None)


class _Segment:
    """A run of elementwise tile ops of one shape in a block, and the row reductions of them."""

    def __init__(self, first: ir.Operation, shape: List[int], position: Dict):
        self.first = first
        self.shape = shape
        self.position = position  # op -> its index in the block
        self.ops: List[ir.Operation] = []
        self.values = set()

    def admits(self, op: ir.Operation) -> bool:
        """Whether `op` can join: every operand is a segment value or defined before the first op
        (so that all rows can be computed at the first op's place)."""
        if _is_row_reduction(op):
            return (_tile_shape(op.operands[0]) == self.shape and op.operands[0] in self.values
                    and self._before(op.operands[1]))
        if not _is_elementwise(op, self.shape):
            return False
        return all(v in self.values or self._before(v) for v in op.operands)

    def _before(self, value: ir.Value) -> bool:
        """Defined before the first op, or a splat constant (made again per row)."""
        if _splat(value) is not None:
            return True
        op = defining_op(value)
        return op is None or op not in self.position or self.position[op] < self.position[self.first]

    def add(self, op: ir.Operation) -> None:
        self.ops.append(op)
        if not _is_row_reduction(op):
            self.values.add(op.results[0])


def _starts_segment(op: ir.Operation) -> Optional[List[int]]:
    """The tile shape of an elementwise op on tiles of several rows, else None."""
    shape = _tile_shape(op.results[0]) if len(op.results) == 1 else None
    return shape if shape is not None and shape[0] > 1 and _is_elementwise(op, shape) else None


def _segments(block: ir.Block) -> List[_Segment]:
    """The block's segments of at least two ops, in block order."""
    ops = [view.operation for view in block.operations]
    position = {op: i for i, op in enumerate(ops)}
    found: List[_Segment] = []
    current: Optional[_Segment] = None
    for op in ops:
        if current is not None and current.admits(op):
            current.add(op)
            continue
        shape = _starts_segment(op)
        if shape is None:
            continue
        if current is not None and len(current.ops) >= 2:
            found.append(current)
        current = _Segment(op, shape, position)
        current.add(op)
    if current is not None and len(current.ops) >= 2:
        found.append(current)
    return found


def _zeros(n: int) -> List[ir.Value]:
    return [const_index(0)] * n


def _identity(rank: int) -> ir.AffineMapAttr:
    return ir.AffineMapAttr.get(ir.AffineMap.get_minor_identity(rank, rank))


def _write_whole(value: ir.Value, buffer: ir.Value) -> None:
    """value -> the buffer of its shape (a transfer: n-D vector.store has no LLVM lowering)."""
    rank = value.type.rank
    vector.transfer_write(None, value, buffer, _zeros(rank), _identity(rank), in_bounds=[True] * rank)


def _read_whole(vector_type: ir.VectorType, buffer: ir.Value) -> ir.Value:
    rank = vector_type.rank
    padding = arith.constant(vector_type.element_type, _zero(vector_type.element_type))
    return vector.transfer_read(vector_type, buffer, _zeros(rank), _identity(rank), padding,
                                in_bounds=[True] * rank)


def _zero(element: ir.Type) -> ir.Attribute:
    if isinstance(element, ir.IntegerType):
        return ir.IntegerAttr.get(element, 0)
    return ir.FloatAttr.get(element, 0.0)


class _Loop:
    """The loop over a segment's rows: row r of the values it reads, made inside the loop body
    (tiles and per-row vectors from outside go through stack buffers written before it)."""

    def __init__(self, segment: _Segment, r: ir.Value, before: ir.InsertionPoint):
        self.segment = segment
        self.r = r
        self.before = before
        self.rows: Dict = {}
        self.cache: Dict = {}

    def row(self, value: ir.Value) -> ir.Value:
        if value in self.rows:
            return self.rows[value]
        if value not in self.cache:
            self.cache[value] = self._outside_row(value)
        return self.cache[value]

    def _outside_row(self, value: ir.Value) -> ir.Value:
        shape = _tile_shape(value)
        row_type = ir.VectorType.get(shape[1:], value.type.element_type)
        splat = _splat(value)
        if splat is not None:
            return arith.constant(row_type, ir.DenseElementsAttr.get_splat(row_type, splat))
        op = defining_op(value)
        if op is not None and op.name == "vector.broadcast":
            source = op.operands[0]
            if not isinstance(source.type, ir.VectorType):              # a scalar
                return vector.broadcast(row_type, source)
            if source.type.rank == 1:                                   # one row, repeated
                return source
            if list(source.type.shape) == [shape[0], 1]:                # one value per row
                return vector.broadcast(row_type, self.element(source))
        return vector.load(row_type, self._buffered(value), [self.r, const_index(0)])

    def element(self, value: ir.Value) -> ir.Value:
        """Element r of a per-row vector (shape [R] or [R, 1]) from outside the loop."""
        splat = _splat(value)
        if splat is not None:
            return arith.constant(value.type.element_type, splat)
        buffer = self._buffered(value)
        return memref.load(buffer, [self.r] + _zeros(ir.VectorType(value.type).rank - 1))

    def _buffered(self, value: ir.Value) -> ir.Value:
        key = ("buffer", value)
        if key not in self.cache:
            copy = _stack_copy(value, self.segment)
            if copy is not None:
                self.cache[key] = copy
                return copy
            buffer = stack_buffer(self.segment.first, value.type)
            with self.before:
                _write_whole(value, buffer)
            self.cache[key] = buffer
        return self.cache[key]


def _stack_copy(value: ir.Value, segment: _Segment) -> Optional[ir.Value]:
    """The stack buffer `value` is a whole read of (an earlier segment's copy), when nothing in
    the segment's block writes that buffer between the read and the segment; else None."""
    read = defining_op(value)
    if read is None or read.name != "vector.transfer_read" or read not in segment.position:
        return None
    base = read.operands[0]
    if _stack_place(base, read.opview.indices) != [0, 0] or ir.MemRefType(base.type).shape != _tile_shape(value):
        return None
    start, end = segment.position[read], segment.position[segment.first]
    for use in base.uses:
        if use.owner.name in ("vector.store", "vector.transfer_write", "memref.store"):
            top = _ancestor_in(use.owner, read.parent.operation)
            if top is None or start < segment.position.get(top, -1) < end:
                return None
    return base


def _ancestor_in(op: ir.Operation, parent: ir.Operation) -> Optional[ir.Operation]:
    """`op` or its ancestor whose parent op is `parent`, else None."""
    while op.parent is not None:
        if op.parent.operation == parent:
            return op
        op = op.parent.operation
    return None


def _row_op(op: ir.Operation, operands: List[ir.Value], columns: int) -> ir.Value:
    result = ir.VectorType(op.results[0].type)
    row_type = ir.VectorType.get([columns], result.element_type)
    attributes = {name: op.attributes[name] for name in op.attributes}
    return ir.Operation.create(op.name, results=[row_type], operands=operands, attributes=attributes).results[0]


def _emit(segment: _Segment) -> bool:
    """The segment as one scf.for over its rows, at its first op; False (untouched) where a
    result is used after the segment other than by row stores into stack buffers and has no
    such copy for its other uses to read: reading a whole tile back from a buffer made for it
    would cost the copies the loop saves."""
    rows_count, columns = segment.shape
    inside = set(segment.ops)
    stores, read_back = {}, []
    for op in segment.ops:
        if not _is_row_reduction(op):
            copies = _row_stores(op.results[0], rows_count, inside)
            if copies is None:
                return False
            stores[op], others = copies
            if others:
                if not stores[op]:
                    return False
                read_back.append((op.results[0], next(iter(stores[op]))))
    with segment.first.location:
        with ir.InsertionPoint(segment.first):
            loop = scf.ForOp(const_index(0), const_index(rows_count), const_index(1))
        rows = _Loop(segment, loop.induction_variable, ir.InsertionPoint(loop.operation))
        reduced = []  # (reduction result, buffer of its elements)
        with ir.InsertionPoint(loop.body):
            for op in segment.ops:
                if _is_row_reduction(op):
                    element = ir.VectorType(op.operands[0].type).element_type
                    value = vector.ReductionOp(element, op.attributes["kind"], rows.row(op.operands[0]),
                                               acc=rows.element(op.operands[1])).result
                    buffer = stack_buffer(segment.first, op.results[0].type)
                    memref.store(value, buffer, [rows.r])
                    reduced.append((op.results[0], buffer))
                    continue
                value = _row_op(op, [rows.row(v) for v in op.operands], columns)
                rows.rows[op.results[0]] = value
                for buffer in stores[op]:
                    vector.store(value, buffer, [rows.r, const_index(0)])
            scf.YieldOp([])
        with ir.InsertionPoint(segment.first):
            for value, buffer in reduced:
                value.replace_all_uses_with(_read_whole(value.type, buffer))
    for row_stores in stores.values():
        for _, extract, store in (entry for entries in row_stores.values() for entry in entries):
            store.erase()
            extract.erase()
    with segment.first.location, ir.InsertionPoint(segment.first):
        for value, buffer in read_back:
            value.replace_all_uses_with(_read_whole(value.type, buffer))
    for op in reversed(segment.ops):
        op.erase()
    return True


def _row_stores(value: ir.Value, rows_count: int, inside: set) -> Optional[Tuple[Dict, bool]]:
    """({stack buffer: [(row, extract, store)]}, whether `value` has other uses) over the uses
    of `value` outside the segment's ops (`inside`): the stores of one of its rows into the
    same row of a stack buffer (the micro-kernel's copies of an operand), and the rest; None
    when a buffer does not get every row."""
    found: Dict = {}
    others = False
    for use in value.uses:
        extract = use.owner
        if extract in inside:
            continue
        store = _row_store_of(extract)
        if store is None:
            others = True
            continue
        row = ir.DenseI64ArrayAttr(extract.attributes["static_position"])[0]
        found.setdefault(store.operands[1], []).append((row, extract, store))
    if any(sorted(row for row, _, _ in entries) != list(range(rows_count)) for entries in found.values()):
        return None
    return found, others


def _row_store_of(extract: ir.Operation) -> Optional[ir.Operation]:
    """The one user of a static row extract when it stores that row at the same row of a stack
    buffer, else None."""
    if extract.name != "vector.extract" or len(extract.operands) != 1:
        return None
    position = list(ir.DenseI64ArrayAttr(extract.attributes["static_position"]))
    users = [u.owner for u in extract.results[0].uses]
    if len(position) != 1 or len(users) != 1:
        return None
    store = users[0]
    return store if store.name == "vector.store" and _row_store(store, position[0]) else None


def _row_store(store: ir.Operation, r: int) -> bool:
    """A store of row r at [r, 0] of a 2-D stack buffer."""
    return _stack_place(store.operands[1], store.operands[2:]) == [r, 0]


def _stack_place(base: ir.Value, indices) -> Optional[List[int]]:
    """The constant indices of an access to a stack buffer (memref.alloca), else None."""
    alloca = defining_op(base)
    ops = [defining_op(i) for i in indices]
    if alloca is None or alloca.name != "memref.alloca" or any(i is None or i.name != "arith.constant" for i in ops):
        return None
    return [ir.IntegerAttr(i.attributes["value"]).value for i in ops]


def emit_row_by_row(module: ir.Module) -> int:
    """Rewrite every segment of elementwise tile code as a loop over rows; returns how many."""
    blocks = [block for op in walk(module, lambda op: len(op.regions) > 0)
              for region in op.regions for block in region.blocks]
    done = 0
    for block in blocks:
        tried = set()
        while True:
            # found again after each rewrite: a later segment reads the copies an earlier one made
            segment = next((s for s in _segments(block) if s.first not in tried), None)
            if segment is None:
                break
            if _emit(segment):
                done += 1
            else:
                tried.add(segment.first)  # untouched (an emitted segment's ops are gone)
    return done
