"""Small helpers over the upstream MLIR Python bindings, shared by every stage.

Tags: the payload and later stages mark ops with a string attribute
``attn.tag`` so that schedules find them by name, never by position.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional, Sequence

from mlir import ir, passmanager
from mlir.dialects import arith, linalg, tensor, transform
from mlir.dialects.transform import interpreter, structured

TAG = "attn.tag"


from .errors import CompileError  # noqa: E402,F401  (re-exported: the stages raise it)


# --------------------------------------------------------------------------- types


def element_type(name: str) -> ir.Type:
    """MLIR element type for a dtype name used in specs."""
    table = {
        "float64": ir.F64Type.get,
        "float32": ir.F32Type.get,
        "float16": ir.F16Type.get,
        "bfloat16": ir.BF16Type.get,
        "bool": lambda: ir.IntegerType.get_signless(8),  # torch bools are bytes
    }
    return table[name]()


def f32() -> ir.Type:
    return ir.F32Type.get()


def accumulator_type(dtype: str) -> ir.Type:
    """The type scores, softmax statistics and accumulators are computed in: f64 for
    float64 inputs (SDPA computes float64 in float64), f32 for every other dtype."""
    return ir.F64Type.get() if dtype == "float64" else f32()


def index() -> ir.Type:
    return ir.IndexType.get()


def const_index(value: int) -> ir.Value:
    return arith.constant(index(), value)


def _dim_text(d) -> str:
    return "?" if isinstance(d, str) or d is None else str(d)


def strided_memref(shape: Sequence, elt: ir.Type) -> ir.Type:
    """A memref with dynamic outer strides and offset, unit inner stride.

    This is how the kernels see caller tensors: any layout whose last dim is
    contiguous is read in place.  A size given as a str (a run-time extent
    symbol such as "L") or None is dynamic.
    """
    strides = ", ".join(["?"] * (len(shape) - 1) + ["1"])
    dims = "x".join(_dim_text(d) for d in shape)
    return ir.Type.parse(f"memref<{dims}x{elt}, strided<[{strides}], offset: ?>>")


def contiguous_memref(shape: Sequence, elt: ir.Type) -> ir.Type:
    """A row-major contiguous memref (identity layout); str/None sizes are dynamic."""
    dims = "x".join(_dim_text(d) for d in shape)
    return ir.Type.parse(f"memref<{dims}x{elt}>")


def affine_map(n_dims: int, results: Iterable[int]) -> ir.AffineMap:
    return ir.AffineMap.get(n_dims, 0, [ir.AffineExpr.get_dim(d) for d in results])


# --------------------------------------------------------------------------- ops


def _mixed(values: Sequence) -> tuple:
    """(dynamic values, static attribute list) of a mixed list of ints and index values."""
    dynamic = [v for v in values if not isinstance(v, int)]
    static = [v if isinstance(v, int) else ir.ShapedType.get_dynamic_size() for v in values]
    return dynamic, static


def slice_of(source: ir.Value, offsets: Sequence, sizes: Sequence) -> ir.Value:
    """tensor.extract_slice with unit strides; offsets and sizes are ints or index values."""
    element = ir.RankedTensorType(source.type).element_type
    dyn_offsets, static_offsets = _mixed(offsets)
    dyn_sizes, static_sizes = _mixed(sizes)
    result = ir.RankedTensorType.get(static_sizes, element)
    return tensor.extract_slice(result, source, dyn_offsets, dyn_sizes, [], static_offsets, static_sizes,
                                [1] * len(sizes))


def insert_in_parallel(source: ir.Value, dest: ir.Value, offsets: Sequence, sizes: Sequence) -> None:
    """tensor.parallel_insert_slice (at the current insertion point: an scf.forall.in_parallel)."""
    dyn_offsets, static_offsets = _mixed(offsets)
    dyn_sizes, static_sizes = _mixed(sizes)
    tensor.parallel_insert_slice(source, dest, dyn_offsets, dyn_sizes, [], static_offsets, static_sizes,
                                 [1] * len(sizes))



def defining_op(value: ir.Value) -> Optional[ir.Operation]:
    """The operation that defines `value`, or None for a block argument."""
    owner = value.owner
    return None if isinstance(owner, ir.Block) else owner.operation


def op_of(user) -> ir.Operation:
    return user.operation if hasattr(user, "operation") else user


def tag_of(op: ir.Operation) -> Optional[str]:
    attrs = op.attributes
    return ir.StringAttr(attrs[TAG]).value if TAG in attrs else None


def set_tag(op, tag: str) -> None:
    op_of(op).attributes[TAG] = ir.StringAttr.get(tag)


def walk(root, predicate: Callable[[ir.Operation], bool]) -> List[ir.Operation]:
    """All ops under `root` (pre-order) for which `predicate` holds."""
    found: List[ir.Operation] = []

    def visit(op: ir.Operation):
        if predicate(op):
            found.append(op)
        return ir.WalkResult.ADVANCE

    op_of(root).walk(visit, ir.WalkOrder.PRE_ORDER)
    return found


def ops_named(root, name: str) -> List[ir.Operation]:
    return walk(root, lambda op: op.name == name)


def ops_tagged(root, tag: str) -> List[ir.Operation]:
    return walk(root, lambda op: tag_of(op) == tag)


def is_inside(op: Optional[ir.Operation], container: ir.Operation) -> bool:
    """True when `op` is `container` or nested in one of its regions."""
    while op is not None:
        if op == container:
            return True
        parent = op.parent
        op = parent.operation if parent is not None else None
    return False


def redirect_uses_inside(old: ir.Value, new: ir.Value, container: ir.Operation) -> None:
    """Replace the uses of `old` that sit inside `container` with `new`."""
    for use in list(old.uses):
        owner = op_of(use.owner)
        if is_inside(owner, container):
            owner.operands[use.operand_number] = new


def body_op_names(op: ir.Operation) -> List[str]:
    return [o.operation.name for o in op.regions[0].blocks[0].operations]


def linalg_generic(inputs: Sequence[ir.Value], outputs: Sequence[ir.Value],
                   maps: Sequence[ir.AffineMap], iterators: Sequence[str],
                   body: Callable[..., ir.Value], tag: str) -> ir.Value:
    """Build a tagged single-result linalg.generic whose region is `body(*block args)`."""
    result_types = [o.type for o in outputs if isinstance(o.type, ir.RankedTensorType)]
    op = linalg.GenericOp(
        result_types, list(inputs), list(outputs),
        ir.ArrayAttr.get([ir.AffineMapAttr.get(m) for m in maps]),
        ir.ArrayAttr.get([ir.Attribute.parse(f"#linalg.iterator_type<{it}>") for it in iterators]))
    block = op.regions[0].blocks.append(
        *[ir.ShapedType(v.type).element_type for v in list(inputs) + list(outputs)])
    with ir.InsertionPoint(block):
        linalg.YieldOp([body(*block.arguments)])
    set_tag(op, tag)
    return op.results[0]


# --------------------------------------------------------------------------- transform scripts


def any_op() -> ir.Type:
    return transform.AnyOpType.get()


class TransformScript:
    """A transform-dialect module with one named sequence `__transform_main`.

    Use it as a context manager: inside, `script.root` is the handle of the
    payload root and builders insert into the sequence; `script.apply(module)`
    runs it with the transform interpreter.
    """

    def __init__(self) -> None:
        self.module = ir.Module.create()
        self.module.operation.attributes["transform.with_named_sequence"] = ir.UnitAttr.get()
        with ir.InsertionPoint(self.module.body):
            self.sequence = transform.NamedSequenceOp(
                "__transform_main", [any_op()], [],
                arg_attrs=[{"transform.readonly": ir.UnitAttr.get()}])
        self._ip: Optional[ir.InsertionPoint] = None

    @property
    def root(self) -> ir.Value:
        return self.sequence.bodyTarget

    def __enter__(self) -> "TransformScript":
        self._ip = ir.InsertionPoint(self.sequence.body)
        self._ip.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            transform.YieldOp([])
        self._ip.__exit__(*exc)

    def apply(self, payload: ir.Module) -> None:
        try:
            interpreter.apply_named_sequence(payload, self.sequence, self.module)
        except Exception as error:  # the interpreter reports through ValueError/RuntimeError
            raise CompileError(f"transform script failed: {error}") from error


def match_tag(root: ir.Value, tag: str) -> ir.Value:
    return structured.MatchOp(any_op(), root, op_attrs={TAG: ir.StringAttr.get(tag)}).result


def match_attr(root: ir.Value, name: str, value: Optional[str] = None) -> ir.Value:
    attr = ir.UnitAttr.get() if value is None else ir.StringAttr.get(value)
    return structured.MatchOp(any_op(), root, op_attrs={name: attr}).result


def match_ops(root: ir.Value, names: Sequence[str]) -> ir.Value:
    return structured.MatchOp.match_op_names(root, list(names)).result


def apply_cleanup(handle: ir.Value) -> None:
    """CSE then canonicalize the ops under `handle`."""
    transform.ApplyCommonSubexpressionEliminationOp(handle)
    with ir.InsertionPoint(transform.ApplyPatternsOp(handle).patterns):
        transform.ApplyCanonicalizationPatternsOp()


def cleanup(module: ir.Module) -> None:
    """CSE, canonicalize, CSE on the whole module (pass manager; CSE merges the copies of an op
    with regions that fusion leaves, which one transform-dialect CSE does not always do)."""
    passmanager.PassManager.parse("builtin.module(cse,canonicalize,cse)").run(module.operation)


@contextmanager
def mlir_context():
    """A fresh context with every upstream dialect available; one per compilation."""
    with ir.Context() as ctx, ir.Location.unknown():
        yield ctx


_AFFINE_BINARY = ((ir.AffineAddExpr, "add"), (ir.AffineMulExpr, "mul"), (ir.AffineCeilDivExpr, "ceildiv"),
                  (ir.AffineFloorDivExpr, "div"), (ir.AffineModExpr, "mod"))


def fold_affine(expr: ir.AffineExpr, dims: Sequence, symbols: Sequence, constant: Callable,
                combine: Callable, where: str):
    """An affine expression rebuilt bottom-up in another form: dims and symbols are the values
    given, a constant becomes constant(value), a binary node combine(kind, lhs, rhs) with kind
    one of add, mul, ceildiv, div, mod (combine returns None for a kind it cannot express:
    CompileError, naming `where`)."""
    expr = expr.maybe_downcast()
    if isinstance(expr, ir.AffineDimExpr):
        return dims[expr.position]
    if isinstance(expr, ir.AffineSymbolExpr):
        return symbols[expr.position]
    if isinstance(expr, ir.AffineConstantExpr):
        return constant(expr.value)
    for kind, name in _AFFINE_BINARY:
        if isinstance(expr, kind):
            result = combine(name, fold_affine(expr.lhs, dims, symbols, constant, combine, where),
                             fold_affine(expr.rhs, dims, symbols, constant, combine, where))
            if result is not None:
                return result
    raise CompileError(f"{where}: cannot express the affine expression {expr}")
