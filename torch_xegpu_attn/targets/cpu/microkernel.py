"""CPU stage piece: vector.contract -> broadcast-FMA micro-kernel (the CPU's "layout").

A work-group contraction C[M, N] += A[M, K] . B[K, N] (A: the Q tile or the
probabilities, B: a K^T or V tile; or A[K, M], the backward's P^T and dS^T, whose
elements are broadcast from their transposed places) is lowered to

    for each block of MB rows m0 and NB columns n0:      unrolled
        for k in [0, K) step U:                          scf.for, its body unrolled U times
            b = B[k, n0 : n0 + NB]                       one row, contiguous: NB/lanes loads
            for m in [m0, m0 + MB):                      unrolled
                C[m, n0 : n0 + NB] += broadcast(A[m, k]) * b

with the block's C rows as loop-carried vectors (MB * NB/lanes registers) and
A[m, k] broadcast straight from memory.  This is the register blocking that the
generic outer-product lowering lacks: it keeps A transposed in registers and
spills.  An operand that is not already in memory (the probabilities, computed
in registers) is first stored to a stack buffer; an operand read from memory
is re-read in place (the transfer_read it came from is left to DCE).

The target picks the register block (MB, NB) and U for its vector ISA, so that
the accumulators, the B vectors and a broadcast fit the register file.  Where K
is not a multiple of U, or the k loop stops early at the end of the keys (a
run-time bound), a second loop does the remaining k steps one by one.

Unit dims were folded away before vectorization, so a one-row work-group
gives C[N] += A[K] . B[K, N] (M absent), a one-key tail C[M] += A[M, K] . B[K]
(N absent), and both together a dot product; these are the same loop with M
or N taken as 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from mlir import ir
from mlir.dialects import arith, llvm, memref, scf, vector

from ...mlir_utils import const_index, defining_op, walk


@dataclass
class _Form:
    """Which of the m and n dims a contraction has (k always), and B's layout."""

    has_m: bool
    has_n: bool
    b_rows_along_k: bool = False  # B[n, k] (K read in place) instead of B[k, n]
    a_rows_along_k: bool = False  # A[k, m] (P^T, dS^T of the backward) instead of A[m, k]


def _matmul_form(contract) -> Optional[_Form]:
    """The form of C[m?, n?] += A[m?, k] B[k, n?] (or B[n?, k]) with one reduction dim k, else None."""
    maps = [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(contract.attributes["indexing_maps"])]
    kinds = [str(a) for a in ir.ArrayAttr(contract.attributes["iterator_types"])]
    lhs, rhs, acc = ([ir.AffineDimExpr(e).position for e in m.results] for m in maps)
    reductions = [i for i, kind in enumerate(kinds) if "reduction" in kind]
    if len(reductions) != 1 or len(kinds) > 3:
        return None
    k = reductions[0]
    m = [d for d in lhs if d != k]
    n = [d for d in rhs if d != k]
    if len(m) > 1 or len(n) > 1 or acc != m + n or lhs not in (m + [k], [k] + m) or rhs not in ([k] + n, n + [k]):
        return None
    a_rows_along_k = bool(m) and lhs == [k] + m
    b_rows_along_k = bool(n) and rhs == n + [k]
    if a_rows_along_k and b_rows_along_k:
        return None  # (A^T B^T: no such contraction in the kernels)
    return _Form(has_m=bool(m), has_n=bool(n), b_rows_along_k=b_rows_along_k, a_rows_along_k=a_rows_along_k)


def _memory_source(value: ir.Value, allow_short_rows: bool = False
                   ) -> Optional[Tuple[ir.Value, List[ir.Value], Optional[ir.Value]]]:
    """(memref, indices of the first element, valid rows) when `value` is a read of memory.

    The read must be in bounds, except, with `allow_short_rows`, along its
    first (outermost) vector dim: a tile that may run past the end of the keys.
    Then `valid rows` is how many of its rows lie inside the memref (the loop
    over those rows stops there; the rest of the vector would be padding),
    else None.  An arith.extf on top is looked through: the micro-kernel
    extends per element.
    """
    value = _unextended(value)
    op = defining_op(value)
    if op is None or op.name != "vector.transfer_read":
        return None
    read = op.opview
    rank = ir.MemRefType(read.base.type).rank
    vector_shape = ir.VectorType(value.type).shape
    minor_identity = ir.AffineMap.get_minor_identity(rank, len(vector_shape))
    if ir.AffineMapAttr(read.permutation_map).value != minor_identity or read.mask is not None:
        return None
    in_bounds = [ir.BoolAttr(b).value for b in ir.ArrayAttr(read.in_bounds)]
    if not all(in_bounds[1:]) or not (in_bounds[0] or allow_short_rows):
        return None
    indices = list(read.indices)
    rows = None
    if not in_bounds[0]:
        d = rank - len(vector_shape)
        left = arith.subi(memref.dim(read.base, const_index(d)), indices[d])
        rows = arith.minsi(left, const_index(vector_shape[0]))
    return read.base, indices, rows


def _function_entry(op: ir.Operation) -> ir.Block:
    while op.parent is not None and op.parent.name != "func.func":
        op = op.parent.operation
    return op.parent.regions[0].blocks[0]


def stack_buffer(anchor: ir.Operation, vector_type: ir.VectorType) -> ir.Value:
    """A 64-byte aligned stack buffer of `vector_type`'s shape and element type, allocated at the
    entry of `anchor`'s function (once per call, not per loop iteration)."""
    with ir.InsertionPoint.at_block_begin(_function_entry(anchor)), anchor.location:
        return memref.alloca(ir.MemRefType.get(vector_type.shape, vector_type.element_type), [], [],
                             alignment=64)


def _spill_to_stack(value: ir.Value, anchor: ir.Operation, at_definition: bool = True):
    """Store a 1-D or 2-D vector (row by row) into a stack buffer allocated at function entry.

    With `at_definition` the stores follow the value's definition, so a
    loop-invariant operand (the Q tile) is stored once, before the loop, not at
    every use; else (a buffer the caller then updates) right before `anchor`.
    """
    vt = ir.VectorType(value.type)
    buffer = stack_buffer(anchor, vt)
    producer = defining_op(value)
    if not at_definition:
        where = ir.InsertionPoint(anchor)
    elif producer is not None:
        where = ir.InsertionPoint.after(producer)
    else:
        where = ir.InsertionPoint.at_block_begin(value.owner)
    with where:
        if vt.rank == 1:
            vector.store(value, buffer, [const_index(0)])
        else:
            for r in range(vt.shape[0]):
                vector.store(vector.extract(value, [], [r]), buffer, [const_index(r), const_index(0)])
    return buffer, [const_index(0)] * vt.rank, None


def _operand_to_stack(value: ir.Value, anchor: ir.Operation):
    """A contraction's operand that is not a read of memory, on the stack: an extended f16/bf16
    tile (the backward's Q and dOut tiles, rows past L padded) in its own type, so the copy is
    half the bytes and a bf16 operand can feed AVX512-BF16 dot products; the loads extend it."""
    return _spill_to_stack(_unextended(value), anchor)


def _unextended(value: ir.Value) -> ir.Value:
    """`value`, or the narrower tile an arith.extf widened into it (the micro-kernel extends
    per element as it loads)."""
    op = defining_op(value)
    return op.operands[0] if op is not None and op.name == "arith.extf" else value


def _at(indices: List[ir.Value], offsets) -> List[ir.Value]:
    """indices of the element at `offsets` from the first one (offsets cover the trailing dims)."""
    lead = indices[:len(indices) - len(offsets)]
    return lead + [arith.addi(i, o) for i, o in zip(indices[len(lead):], offsets)]


def _extended(value: ir.Value, element: ir.Type) -> ir.Value:
    vt = value.type
    source = vt.element_type if isinstance(vt, ir.VectorType) else vt
    if source == element:
        return value
    target = ir.VectorType.get(vt.shape, element) if isinstance(vt, ir.VectorType) else element
    return arith.extf(target, value)


@dataclass(frozen=True)
class RegisterBlock:
    """The accumulator block kept in registers (m rows, n columns) and the vector width."""

    m: int
    n: int
    vector_bits: int
    k_unroll: int = 1  # k steps per iteration of the k loop (where it divides a static K)
    bf16_dot: bool = False  # bf16 A and B: two k steps per AVX512-BF16 dot product (vdpbf16ps)

    def lanes(self, element: ir.Type) -> int:
        """Elements of type `element` in one vector register."""
        return self.vector_bits // ir.FloatType(element).width

    def columns(self, rows: int, element: ir.Type) -> int:
        """Columns per block for a contraction of `rows` rows (fewer than m: decode's one row or a
        few packed query heads): the accumulator registers the block has (m * n / lanes) go to
        more columns, so that enough independent FMA chains hide the FMA latency.  A power of
        two of vectors: other widths split into slow shuffles."""
        lanes = self.lanes(element)
        budget = self.m * self.n // lanes
        vectors = max(1, self.n // lanes)
        while vectors * 2 * max(1, rows) <= budget:
            vectors *= 2
        return vectors * lanes


def lower_contraction(contract, block: RegisterBlock) -> bool:
    """Lower one vector.contract in place; False (untouched) when it is not of a matmul form."""
    form = _matmul_form(contract)
    if form is None:
        return False
    if form.b_rows_along_k:
        return _lower_dot_products(contract, form, block)
    lhs, rhs, acc = contract.operands[0], contract.operands[1], contract.operands[2]
    lhs_shape = ir.VectorType(lhs.type).shape
    k_size = lhs_shape[0] if form.a_rows_along_k else lhs_shape[-1]
    m_size = (lhs_shape[-1] if form.a_rows_along_k else lhs_shape[0]) if form.has_m else 1
    n_size = ir.VectorType(rhs.type).shape[-1] if form.has_n else 1
    acc_type = acc.type.element_type if isinstance(acc.type, ir.VectorType) else acc.type
    with ir.InsertionPoint(contract), contract.location:
        a_mem, a_idx, _ = _memory_source(lhs) or _operand_to_stack(lhs, contract)
        # B's rows run along k: a tile past the end of the keys stops the k loop early
        # (the missing keys would contribute zeros).
        b_mem, b_idx, b_rows = _memory_source(rhs, allow_short_rows=True) or _operand_to_stack(rhs, contract)
        k_end = b_rows if b_rows is not None else const_index(k_size)
        rows = _acc_rows(acc, form, m_size, acc_type)
        result_rows = list(rows)
        n_block = block.columns(min(m_size, block.m), acc_type)
        pairs = _takes_pairs(block, form, a_mem, b_mem, b_rows, k_size, n_size, n_block, acc_type)
        unroll = min(block.k_unroll, k_size)
        if pairs:
            unroll = min(unroll + unroll % 2, k_size)
        # k steps [0, unrolled_end) in iterations of `unroll` steps, the rest one by one
        if b_rows is None:
            unrolled_end = const_index(k_size - k_size % unroll)
            rest = k_size % unroll != 0
        else:
            unrolled_end = arith.muli(arith.divui(k_end, const_index(unroll)), const_index(unroll))
            rest = unroll > 1

        def k_steps(k0: ir.Value, count: int, acc_rows: List[ir.Value], n0: int, width: int, block_rows):
            """`count` k steps from k0: each loads a row of B and does one FMA per block row."""
            if pairs:
                return _k_pairs(k0, count, acc_rows, n0, width, block_rows, (a_mem, a_idx), (b_mem, b_idx))
            chunk_type = ir.VectorType.get([width], acc_type)
            acc_rows = list(acc_rows)
            for u in range(count):
                k = k0 if u == 0 else arith.addi(k0, const_index(u))
                if form.has_n:
                    b_type = ir.VectorType.get([width], ir.MemRefType(b_mem.type).element_type)
                    b = _extended(vector.load(b_type, b_mem, _at(b_idx, [k, const_index(n0)])), acc_type)
                else:
                    b = vector.broadcast(chunk_type, _extended(memref.load(b_mem, _at(b_idx, [k])), acc_type))
                for i, m in enumerate(block_rows):
                    at = [k] if not form.has_m else (
                        [k, const_index(m)] if form.a_rows_along_k else [const_index(m), k])
                    a = vector.broadcast(chunk_type, _extended(memref.load(a_mem, _at(a_idx, at)), acc_type))
                    acc_rows[i] = vector.fma(a, b, acc_rows[i])
            return acc_rows

        for n0 in range(0, n_size, n_block):
            width = min(n_block, n_size - n0)
            chunk_type = ir.VectorType.get([width], acc_type)
            whole = width == n_size
            for m0 in range(0, m_size, block.m):
                block_rows = range(m0, min(m0 + block.m, m_size))
                chunk = [rows[m] if whole else vector.extract_strided_slice(chunk_type, rows[m], [n0], [width], [1])
                         for m in block_rows]
                loops = [(const_index(0), unrolled_end, unroll)] + ([(unrolled_end, k_end, 2 if pairs else 1)]
                                                                     if rest else [])
                for start, end, step in loops:
                    loop = scf.ForOp(start, end, const_index(step), chunk)
                    with ir.InsertionPoint(loop.body):
                        scf.YieldOp(k_steps(loop.induction_variable, step, list(loop.inner_iter_args),
                                            n0, width, block_rows))
                    chunk = list(loop.results)
                for i, m in enumerate(block_rows):
                    part = chunk[i]
                    result_rows[m] = part if whole else vector.insert_strided_slice(part, result_rows[m], [n0], [1])
        result = _assemble(acc, form, result_rows)
    contract.results[0].replace_all_uses_with(result)
    contract.erase()
    return True


#: lanes of one AVX512-BF16 dot product: 16 f32 accumulators, each fed by two bf16 pairs.
_DOT_LANES = 16


def _is_bf16(memref_value: ir.Value) -> bool:
    return isinstance(ir.MemRefType(memref_value.type).element_type, ir.BF16Type)


def _takes_pairs(block: RegisterBlock, form: _Form, a_mem, b_mem, b_rows, k_size: int, n_size: int,
                 n_block: int, acc_type: ir.Type) -> bool:
    """Whether a contraction goes two k steps at a time through vdpbf16ps: bf16 A[m, k] and
    B[k, n] in memory, an f32 accumulator, a static even K, N in whole dot products."""
    return (block.bf16_dot and form.has_m and form.has_n and not form.a_rows_along_k and b_rows is None
            and k_size % 2 == 0 and n_size % _DOT_LANES == 0 and n_block % _DOT_LANES == 0
            and isinstance(acc_type, ir.F32Type) and _is_bf16(a_mem) and _is_bf16(b_mem))


def _k_pairs(k0: ir.Value, count: int, acc_rows: List[ir.Value], n0: int, width: int, block_rows, a, b):
    """`count` (even) k steps from k0 by AVX512-BF16 dot products, two steps each:

        b = B[k, n..n+16) and B[k+1, n..n+16) interleaved    (32 bf16: one pair per f32 lane)
        a = the pair A[m, k], A[m, k+1] in every lane        (one 32-bit broadcast per row)
        C[m, n..n+16) += a . b pairwise                      (vdpbf16ps)

    The products of two bf16 are exact in f32; each lane adds its two in turn, as two FMAs
    would (denormal inputs read as zero, as the instruction defines)."""
    (a_mem, a_idx), (b_mem, b_idx) = a, b
    half = ir.VectorType.get([_DOT_LANES], ir.BF16Type.get())
    pair_type = ir.VectorType.get([2 * _DOT_LANES], ir.BF16Type.get())
    words = ir.VectorType.get([_DOT_LANES], ir.IntegerType.get_signless(32))
    lane_type = ir.VectorType.get([_DOT_LANES], ir.F32Type.get())
    interleave = [i // 2 + (_DOT_LANES if i % 2 else 0) for i in range(2 * _DOT_LANES)]
    whole = width == _DOT_LANES
    acc_rows = list(acc_rows)
    for u in range(0, count, 2):
        k = k0 if u == 0 else arith.addi(k0, const_index(u))
        k1 = arith.addi(k, const_index(1))
        # the block's B pairs first, then row by row one broadcast A pair against them (the
        # registers of the FMA form: accumulators, width / 16 B vectors and one A)
        b_pairs = [vector.shuffle(vector.load(half, b_mem, _at(b_idx, [k, const_index(n0 + c)])),
                                  vector.load(half, b_mem, _at(b_idx, [k1, const_index(n0 + c)])), interleave)
                   for c in range(0, width, _DOT_LANES)]
        for i, m in enumerate(block_rows):
            two = vector.load(ir.VectorType.get([2], ir.BF16Type.get()), a_mem, _at(a_idx, [const_index(m), k]))
            word = vector.extract(vector.bitcast(ir.VectorType.get([1], words.element_type), two), [], [0])
            a_pair = vector.bitcast(pair_type, vector.broadcast(words, word))
            for piece, b_pair in enumerate(b_pairs):
                c = piece * _DOT_LANES
                lanes = acc_rows[i] if whole else vector.extract_strided_slice(lane_type, acc_rows[i], [c],
                                                                             [_DOT_LANES], [1])
                lanes = llvm.call_intrinsic(lane_type, "llvm.x86.avx512bf16.dpbf16ps.512",
                                            [lanes, a_pair, b_pair], [], [])
                acc_rows[i] = lanes if whole else vector.insert_strided_slice(lanes, acc_rows[i], [c], [1])
    return acc_rows


def _lower_dot_products(contract, form: _Form, block: RegisterBlock) -> bool:
    """C[m, n] += sum_k A[m, k] B[n, k], B's rows contiguous along k (K read in place).

        for n in [0, N):                      scf.for
            b = B[n, :]                       K/lanes loads, shared by all m
            for m in [0, M):                  unrolled
                C[m, n] += reduce_add(sum_c A[m, c] * b[c])     c: one register's lanes

    Used when the work-group has few rows (decode-like problems): reading K
    in place costs less than materializing K^T for them.  Results go through
    a small stack buffer, one scalar per (m, n).
    """
    lhs, rhs, acc = contract.operands[0], contract.operands[1], contract.operands[2]
    k_size = ir.VectorType(lhs.type).shape[-1]
    m_size = ir.VectorType(lhs.type).shape[0] if form.has_m else 1
    n_size = ir.VectorType(rhs.type).shape[0]
    acc_type = acc.type.element_type if isinstance(acc.type, ir.VectorType) else acc.type
    lanes = block.lanes(acc_type)
    chunks = [(c, min(lanes, k_size - c)) for c in range(0, k_size, lanes)]
    with ir.InsertionPoint(contract), contract.location:
        a_mem, a_idx, _ = _memory_source(lhs) or _operand_to_stack(lhs, contract)
        # A K tile past the end of the keys: its scores past S keep the accumulator's value
        # (the schedule masks those keys to -inf).
        b_mem, b_idx, b_rows = _memory_source(rhs, allow_short_rows=True) or _operand_to_stack(rhs, contract)
        n_end = b_rows if b_rows is not None else const_index(n_size)
        sums, sums_idx, _ = _spill_to_stack(acc if form.has_m else vector.shape_cast(
            ir.VectorType.get([1, n_size], acc_type), acc), contract, at_definition=False)
        a_type = ir.MemRefType(a_mem.type).element_type
        b_type = ir.MemRefType(b_mem.type).element_type
        loop = scf.ForOp(const_index(0), n_end, const_index(1))
        with ir.InsertionPoint(loop.body):
            n = loop.induction_variable
            b = [_extended(vector.load(ir.VectorType.get([w], b_type), b_mem, _at(b_idx, [n, const_index(c)])),
                           acc_type) for c, w in chunks]
            for m in range(m_size):
                partial = None
                for (c, w), b_chunk in zip(chunks, b):
                    at = [const_index(m), const_index(c)] if form.has_m else [const_index(c)]
                    a = _extended(vector.load(ir.VectorType.get([w], a_type), a_mem, _at(a_idx, at)), acc_type)
                    if w < lanes:  # pad a short last chunk with zeros to a full one
                        full = ir.VectorType.get([lanes], acc_type)
                        zeros = arith.constant(full, ir.DenseElementsAttr.get_splat(full, ir.FloatAttr.get(acc_type, 0.0)))
                        a = vector.insert_strided_slice(a, zeros, [0], [1])
                        b_chunk = vector.insert_strided_slice(b_chunk, zeros, [0], [1])
                    partial = arith.mulf(a, b_chunk) if partial is None else vector.fma(a, b_chunk, partial)
                slot = [const_index(m), n]
                reduced = vector.ReductionOp(acc_type, ir.Attribute.parse("#vector.kind<add>"), partial).result
                memref.store(arith.addf(reduced, memref.load(sums, slot)), sums, slot)
            scf.YieldOp([])
        rows = [vector.load(ir.VectorType.get([n_size], acc_type), sums, [const_index(m), const_index(0)])
                for m in range(m_size)]
        result = _assemble(acc, _Form(form.has_m, True), rows)
    contract.results[0].replace_all_uses_with(result)
    contract.erase()
    return True


def _acc_rows(acc: ir.Value, form: _Form, m_size: int, acc_type: ir.Type) -> List[ir.Value]:
    """The accumulator as M row vectors (of N lanes, or of one lane when n is absent)."""
    if form.has_m and form.has_n:
        return [vector.extract(acc, [], [m]) for m in range(m_size)]
    if form.has_n:
        return [acc]
    one = ir.VectorType.get([1], acc_type)
    if form.has_m:
        return [vector.broadcast(one, vector.extract(acc, [], [m])) for m in range(m_size)]
    return [vector.broadcast(one, acc)]


def _assemble(acc: ir.Value, form: _Form, rows: List[ir.Value]) -> ir.Value:
    """Inverse of `_acc_rows`."""
    if form.has_n and not form.has_m:
        return rows[0]
    if not form.has_n:
        scalars = [vector.extract(r, [], [0]) for r in rows]
        if not form.has_m:
            return scalars[0]
        rows = scalars
    result = acc
    for m, row in enumerate(rows):
        result = vector.insert(row, result, [], [m])
    return result


def _widen_operands(contract) -> None:
    """Give a contraction left to the default lowering operands of its accumulator's type
    (that lowering does not handle f16/bf16 operands with an f32 accumulator)."""
    acc_type = contract.results[0].type
    acc_element = acc_type.element_type if isinstance(acc_type, ir.VectorType) else acc_type
    for i in (0, 1):
        operand = contract.operands[i]
        if ir.VectorType(operand.type).element_type != acc_element:
            with ir.InsertionPoint(contract), contract.location:
                contract.operands[i] = _extended(operand, acc_element)


def lower_contractions(module: ir.Module, block: RegisterBlock) -> Tuple[int, int]:
    """Lower every matmul-form vector.contract; returns (lowered, left to the default lowering).

    The ones left (none expected) get operands of the accumulator type for the
    default lowering.
    """
    contracts = walk(module, lambda op: op.name == "vector.contract")
    left = [c for c in contracts if not lower_contraction(c, block)]
    for contract in left:
        _widen_operands(contract)
    return len(contracts) - len(left), len(left)
