"""cpu target stages cpu-vector and cpu-llvm (they import MLIR; the target's module does not)."""

from __future__ import annotations

from mlir import ir, passmanager
from mlir.dialects import arith, memref, scf, vector

from ...mlir_utils import CompileError, const_index, ops_named
from ...spec import AttentionSpec
from . import exp, microkernel, rows, toolchain

LLVM_PIPELINE = ",".join([
    "canonicalize", "cse",
    "lower-affine",
    "func.func(lower-vector-multi-reduction{lowering-strategy=inner-reduction})",
    "func.func(convert-vector-to-scf{full-unroll=true})",
    "convert-vector-to-llvm{vector-contract-lowering=outerproduct "
    "vector-transpose-lowering=shuffle1d reassociate-fp-reductions=true}",
    "lower-affine",
    "func.func(arith-expand{include-bf16=true})",
    "convert-math-to-llvm",
    "expand-strided-metadata", "lower-affine",
    "finalize-memref-to-llvm",
    "convert-scf-to-cf", "convert-arith-to-llvm", "convert-ub-to-llvm", "convert-func-to-llvm",
    "convert-cf-to-llvm", "convert-index-to-llvm", "reconcile-unrealized-casts",
])


def lower_vector_ops(module: ir.Module, spec: AttentionSpec, options) -> ir.Module:
    """Stage cpu-vector: register-blocked contractions, transposes in register-sized pieces and a
    vectorizable exp (options: the target's CpuOptions)."""
    split_transposes(module, options.transpose_tile)
    microkernel.lower_contractions(module, microkernel.RegisterBlock(
        options.m_block, options.n_block, toolchain.isa_named(options.isa).vector_bits, options.k_unroll,
        bf16_dot=options.bf16_dot))
    exp.expand_exp(module)
    lower_row_maxima(module, toolchain.isa_named(options.isa).vector_bits)
    rows.emit_row_by_row(module)
    return module


_MAX_KINDS = ("#vector.kind<maximumf>", "#vector.kind<maxnumf>")


def _greater(a: ir.Value, b: ir.Value) -> ir.Value:
    """a > b ? a : b, the semantics of x86's max instructions (b where either is NaN)."""
    return arith.select(arith.cmpf(arith.CmpFPredicate.OGT, a, b), a, b)


def _register_maximum(row: ir.Value, lanes: int) -> ir.Value:
    """The maximum of a 1-D vector: a balanced tree of elementwise maxima over its register-wide
    pieces, then halves of the last register down to one element (a scalar)."""
    width = ir.VectorType(row.type).shape[0]
    element = ir.VectorType(row.type).element_type
    lanes = min(lanes, width & -width)  # a power of two that divides the row
    pieces = [vector.extract_strided_slice(ir.VectorType.get([lanes], element), row, [c], [lanes], [1])
              for c in range(0, width, lanes)]
    while len(pieces) > 1:
        pieces = [_greater(pieces[i], pieces[i + 1]) if i + 1 < len(pieces) else pieces[i]
                  for i in range(0, len(pieces), 2)]
    v = pieces[0]
    while lanes > 1:
        lanes //= 2
        half = ir.VectorType.get([lanes], element)
        v = _greater(vector.extract_strided_slice(half, v, [0], [lanes], [1]),
                     vector.extract_strided_slice(half, v, [lanes], [lanes], [1]))
    return vector.extract(v, [], [0])


def lower_row_maxima(module: ir.Module, vector_bits: int) -> int:
    """Each row maximum of a 2-D tile (vector.multi_reduction <maximumf> or <maxnumf> over its
    last dim: the online softmax's) -> trees of x86-style maxima (`_greater`), register by
    register.  LLVM expands a NaN-propagating reduction (llvm.vector.reduce.fmaximum) into
    compare-and-blend chains, element by element; the tree is one max instruction per register.

    Where a row holds a NaN, its maximum may come out as another of its values (or NaN): the
    probability of the NaN score, exp2(NaN - m), is NaN whatever m is, and carries it into the
    row's sum and output, as the NaN-propagating maximum would.  Returns the reductions
    rewritten."""
    rewritten = 0
    for op in ops_named(module, "vector.multi_reduction"):
        source = ir.VectorType(op.operands[0].type)
        if (str(op.attributes["kind"]) not in _MAX_KINDS or source.rank != 2
                or list(ir.DenseI64ArrayAttr(op.attributes["reduction_dims"])) != [1]):
            continue
        lanes = vector_bits // ir.FloatType(source.element_type).width
        with ir.InsertionPoint(op), op.location:
            rows = [_greater(vector.extract(op.operands[1], [], [r]),
                             _register_maximum(vector.extract(op.operands[0], [], [r]), lanes))
                    for r in range(source.shape[0])]
            result = vector.from_elements(op.results[0].type, rows)
        op.results[0].replace_all_uses_with(result)
        op.erase()
        rewritten += 1
    return rewritten


def split_transposes(module: ir.Module, tile) -> int:
    """Each copy that transposes a 2-D tile (transfer_read -> vector.transpose -> transfer_write,
    the K^T and V^T workspaces' fills) larger than `tile` = (te, ts) -> loops over pieces of it
    of at most (te x ts), the largest that divide it: an (S x E) tile unrolled whole is far more
    than the registers hold.  Returns the copies split."""
    te, ts = tile
    split = 0
    for transpose in ops_named(module, "vector.transpose"):
        read = transpose.operands[0].owner
        users = list(transpose.results[0].uses)
        shape = ir.VectorType(transpose.results[0].type).shape
        if (len(shape) != 2 or list(ir.DenseI64ArrayAttr(transpose.attributes["permutation"])) != [1, 0]
                or isinstance(read, ir.Block) or read.name != "vector.transfer_read" or len(users) != 1
                or users[0].owner.name != "vector.transfer_write" or (shape[0] <= te and shape[1] <= ts)):
            continue
        # pieces of at most (te x ts) that divide this copy (K^T's rows are E, V^T's Ev)
        piece_e = max(d for d in range(1, min(te, shape[0]) + 1) if shape[0] % d == 0)
        piece_s = max(d for d in range(1, min(ts, shape[1]) + 1) if shape[1] % d == 0)
        _split_transpose(read, transpose, users[0].owner, piece_e, piece_s)
        split += 1
    return split


def _vector_dims(transfer) -> list:
    """The memref dim each vector dim of a transfer op runs along."""
    amap = ir.AffineMapAttr(transfer.attributes["permutation_map"]).value
    return [ir.AffineDimExpr(e).position for e in amap.results]


def _split_transpose(read, transpose, write, te: int, ts: int) -> None:
    rows, cols = ir.VectorType(transpose.results[0].type).shape  # the result: rows = the read's cols
    element = ir.VectorType(transpose.results[0].type).element_type
    read_dims, write_dims = _vector_dims(read), _vector_dims(write)
    source, read_indices, padding = read.operands[0], list(read.operands[1:-1]), read.operands[-1]
    target, write_indices = write.operands[1], list(write.operands[2:])
    with ir.InsertionPoint(write), write.location:
        outer = scf.ForOp(const_index(0), const_index(rows), const_index(te))
        with ir.InsertionPoint(outer.body):
            inner = scf.ForOp(const_index(0), const_index(cols), const_index(ts))
            with ir.InsertionPoint(inner.body):
                r0, c0 = outer.induction_variable, inner.induction_variable
                at = list(read_indices)
                at[read_dims[0]] = arith.addi(at[read_dims[0]], c0)
                at[read_dims[1]] = arith.addi(at[read_dims[1]], r0)
                piece = vector.transfer_read(ir.VectorType.get([ts, te], element), source, at,
                                             read.attributes["permutation_map"], padding,
                                             in_bounds=read.attributes["in_bounds"])
                flipped = vector.transpose(ir.VectorType.get([te, ts], element), piece, [1, 0])
                to = list(write_indices)
                to[write_dims[0]] = arith.addi(to[write_dims[0]], r0)
                to[write_dims[1]] = arith.addi(to[write_dims[1]], c0)
                vector.transfer_write(None, flipped, target, to, write.attributes["permutation_map"],
                                      in_bounds=write.attributes["in_bounds"])
                scf.YieldOp([])
            scf.YieldOp([])
    write.erase()
    transpose.erase()
    read.erase()


def _copy_loops(source, target, shape, indices) -> None:
    if len(indices) == len(shape):
        memref.store(memref.load(source, indices), target, indices)
        return
    d = len(indices)
    size = memref.dim(source, const_index(d)) if shape[d] == ir.ShapedType.get_dynamic_size() else const_index(shape[d])
    loop = scf.ForOp(const_index(0), size, const_index(1))
    with ir.InsertionPoint(loop.body):
        _copy_loops(source, target, shape, indices + [loop.induction_variable])
        scf.YieldOp([])


def copies_to_loops(module: ir.Module) -> int:
    """memref.copy -> scf loops of loads and stores.

    A strided copy (the transpose of a one-key-wide tile when no tile width
    divides S) would otherwise become a call into MLIR's runtime library; the
    kernel libraries stay self-contained.
    """
    copies = ops_named(module, "memref.copy")
    for copy in copies:
        with ir.InsertionPoint(copy), copy.location:
            _copy_loops(copy.operands[0], copy.operands[1], ir.MemRefType(copy.operands[0].type).shape, [])
        copy.erase()
    return len(copies)


def lower_to_llvm(module: ir.Module, spec: AttentionSpec, options) -> ir.Module:
    """Stage cpu-llvm: the standard conversions down to the LLVM dialect."""
    left = ops_named(module, "memref.alloc")
    if left:
        raise CompileError(f"cpu-llvm: {len(left)} heap allocation(s) left inside grids")
    copies_to_loops(module)
    passmanager.PassManager.parse(f"builtin.module({LLVM_PIPELINE})").run(module.operation)
    return module


