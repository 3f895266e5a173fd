"""Building blocks of the flash stage: a work-group's tiles as vectors.

Within a work-group every score-shaped value is one 2-D vector (rows, keys)
and every row-shaped value (running max, sum, reciprocal) one 1-D vector of
rows.  Rows are (g, l) flattened: G * row_tile rows when the G query heads
of a key/value head are packed into one work-group, row_tile otherwise.

The forms are chosen for the targets that distribute this IR:
  * a row vector is broadcast over keys as shape_cast R -> R x 1, then
    broadcast R x 1 -> R x C (a layout assigned to a row reduction reaches its
    consumers unchanged; broadcast + transpose would not);
  * index vectors are i32, built from vector.step (a non-splat constant iota
    is not distributable);
  * reads and writes are vector.transfer ops whose out-of-bounds dims read
    the padding value or are not written: tails cost no padding of the
    caller's tensors.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mlir import ir
from mlir.dialects import arith, vector

from ..mlir_utils import CompileError, const_index, fold_affine


def i32() -> ir.Type:
    return ir.IntegerType.get_signless(32)


def vector_type(shape: Sequence[int], element: ir.Type) -> ir.VectorType:
    return ir.VectorType.get(list(shape), element)


def splat(shape: Sequence[int], element: ir.Type, value) -> ir.Value:
    """A constant vector with every element `value`."""
    vt = vector_type(shape, element)
    scalar = (ir.IntegerAttr.get(element, int(value)) if isinstance(element, ir.IntegerType)
              else ir.FloatAttr.get(element, float(value)))
    return arith.constant(vt, ir.DenseElementsAttr.get_splat(vt, scalar))


def broadcast_scalar(value: ir.Value, shape: Sequence[int]) -> ir.Value:
    return vector.broadcast(vector_type(shape, value.type), value)


def to_i32(value: ir.Value) -> ir.Value:
    """An index scalar as i32 (work-group indices and lengths fit)."""
    return arith.index_cast(i32(), value) if isinstance(value.type, ir.IndexType) else value


def iota_i32(n: int) -> ir.Value:
    """vector<n x i32> holding 0, 1, ..., n-1."""
    return arith.index_cast(vector_type([n], i32()), vector.step(vector_type([n], ir.IndexType.get())))


def broadcast_rows(rows: ir.Value, columns: int) -> ir.Value:
    """vector<R> -> vector<R x columns>, each row constant: shape_cast to R x 1, then broadcast."""
    vt = ir.VectorType(rows.type)
    (r,) = vt.shape
    column = vector.shape_cast(vector_type([r, 1], vt.element_type), rows)
    return vector.broadcast(vector_type([r, columns], vt.element_type), column)


def expand_to(value: ir.Value, present: Sequence[bool], full: Sequence[int]) -> ir.Value:
    """A vector over some of the dims of `full` (present[i] says which) -> a vector of shape
    `full`: the missing dims are inserted as unit dims (shape_cast), then broadcast."""
    vt = ir.VectorType(value.type)
    with_units = [size if here else 1 for size, here in zip(full, present)]
    if list(vt.shape) != with_units:
        value = vector.shape_cast(vector_type(with_units, vt.element_type), value)
    if with_units != list(full):
        value = vector.broadcast(vector_type(full, vt.element_type), value)
    return value


def flatten_rows(value: ir.Value) -> ir.Value:
    """(G, R, ...) -> (G * R, ...): packed heads become one row dim."""
    vt = ir.VectorType(value.type)
    shape = list(vt.shape)
    return vector.shape_cast(vector_type([shape[0] * shape[1]] + shape[2:], vt.element_type), value)


def unflatten_rows(value: ir.Value, groups: int) -> ir.Value:
    """(G * R, ...) -> (G, R, ...)."""
    vt = ir.VectorType(value.type)
    shape = list(vt.shape)
    return vector.shape_cast(vector_type([groups, shape[0] // groups] + shape[1:], vt.element_type), value)


def _bool_array(values: Sequence[bool]) -> ir.ArrayAttr:
    return ir.ArrayAttr.get([ir.BoolAttr.get(bool(v)) for v in values])


def _projection(rank: int, dims: Sequence[int]) -> ir.AffineMapAttr:
    return ir.AffineMapAttr.get(ir.AffineMap.get(rank, 0, [ir.AffineExpr.get_dim(d) for d in dims]))


def _indices(rank: int, offsets: Dict[int, ir.Value]) -> List[ir.Value]:
    zero = None
    indices = []
    for d in range(rank):
        if d in offsets:
            indices.append(offsets[d])
        else:
            zero = zero if zero is not None else const_index(0)
            indices.append(zero)
    return indices


def read_tile(source: ir.Value, dims: Sequence[Tuple[int, int, bool]], offsets: Dict[int, ir.Value],
              padding: ir.Value) -> ir.Value:
    """vector.transfer_read of a tile of `source` (a tensor or memref).

    dims     (source dim, vector size, in bounds) for each vector dim, in
             source-dim order; every other source dim is read at its offset.
    offsets  source dim -> start index (0 where absent).
    padding  the value read out of bounds.
    """
    shaped = ir.ShapedType(source.type)
    vt = vector_type([size for _, size, _ in dims], shaped.element_type)
    return vector.transfer_read(vt, source, _indices(shaped.rank, offsets),
                                _projection(shaped.rank, [d for d, _, _ in dims]), padding,
                                _bool_array([b for _, _, b in dims]))


def write_tile(value: ir.Value, dest: ir.Value, dims: Sequence[Tuple[int, bool]],
               offsets: Dict[int, ir.Value]) -> ir.Value:
    """vector.transfer_write of `value` into a tile of the tensor `dest`; returns the new tensor.

    dims: (dest dim, in bounds) for each vector dim; out-of-bounds elements are not written.
    """
    shaped = ir.ShapedType(dest.type)
    return vector.transfer_write(dest.type, value, dest, _indices(shaped.rank, offsets),
                                 _projection(shaped.rank, [d for d, _ in dims]),
                                 _bool_array([b for _, b in dims]))


# --------------------------------------------------------------------------- generic bodies


class BodyTranslator:
    """Re-emits the body of an elementwise linalg.generic on vectors of one tile shape.

    Every block argument is bound to a vector of the tile shape; each body op
    is re-created with vector operands and results (arith and math ops are
    elementwise on vectors), scalars captured from outside the body are
    broadcast, and index computations are done on i32 vectors:

        linalg.index d          -> index_vectors(d)  (tile-local, as in the tiled body)
        affine.apply            -> the same sum of products on i32 vectors
        arith.index_cast        -> nothing (already i32)
    """

    def __init__(self, shape: Sequence[int], index_vector: Callable[[int], ir.Value]):
        self.shape = list(shape)
        self._index_vector = index_vector

    def translate(self, generic: ir.Operation, arguments: Sequence[Optional[ir.Value]]) -> ir.Value:
        """The generic's result as a vector; arguments[i] binds block argument i (None: unused)."""
        block = generic.regions[0].blocks[0]
        values: Dict[ir.Value, ir.Value] = {}
        for arg, vec in zip(block.arguments, arguments):
            if vec is not None:
                values[arg] = vec
        for op in block.operations:
            op = op.operation
            if op.name == "linalg.yield":
                return self._get(values, op.operands[0], block)
            values[op.results[0]] = self._translate_op(op, values, block)
        raise CompileError(f"flash: {generic.name} body has no linalg.yield")

    def _get(self, values, value: ir.Value, block: ir.Block) -> ir.Value:
        if value in values:
            return values[value]
        owner = value.owner
        inside = not isinstance(owner, ir.Block) and owner.operation.block == block
        if inside or (isinstance(owner, ir.Block) and owner == block):
            raise CompileError(f"flash: body value {value} is used before it is translated")
        return broadcast_scalar(to_i32(value), self.shape)  # captured from outside the body

    def _translate_op(self, op: ir.Operation, values, block) -> ir.Value:
        name = op.name
        if len(op.results) != 1:
            raise CompileError(f"flash: cannot vectorize {name} (one result expected)")
        if name == "linalg.index":
            return self._index_vector(ir.IntegerAttr(op.attributes["dim"]).value)
        if name == "arith.index_cast":
            operand = self._get(values, op.operands[0], block)
            if op.results[0].type != i32():
                raise CompileError("flash: index values in a score op must be cast to i32")
            return operand
        if name == "affine.apply":
            return self._affine_apply(op, values, block)
        if name == "arith.constant":
            return broadcast_scalar(arith.constant(op.results[0].type, op.attributes["value"]), self.shape)
        operands = [self._get(values, v, block) for v in op.operands]
        result = op.results[0].type
        if isinstance(result, ir.IndexType):
            result = i32()
        attributes = {name: op.attributes[name] for name in op.attributes}
        new = ir.Operation.create(name, results=[vector_type(self.shape, result)], operands=operands,
                                  attributes=attributes)
        return new.results[0]

    def _affine_apply(self, op, values, block) -> ir.Value:
        amap = ir.AffineMapAttr(op.attributes["map"]).value
        if len(amap.results) != 1:
            raise CompileError("flash: affine.apply with several results in a score op")
        operands = [self._get(values, v, block) for v in op.operands]
        dims, symbols = operands[:amap.n_dims], operands[amap.n_dims:]
        return self._expr(amap.results[0], dims, symbols)

    def _expr(self, expr: ir.AffineExpr, dims, symbols) -> ir.Value:
        ops = {"add": arith.addi, "mul": arith.muli}
        return fold_affine(expr, dims, symbols, lambda value: splat(self.shape, i32(), value),
                           lambda kind, a, b: ops[kind](a, b) if kind in ops else None,
                           "flash: an index expression of a score op")
