"""PTX pieces of the nvvm kernels: tensor-core MMAs (mma.sync, wgmma, 3xTF32), ex2, shuffles,
packing.

NVVM dialect ops where they give the same instructions: mma.sync (nvvm.mma.sync), the f32 ->
bf16x2 / f16x2 and tf32 conversions, the async-proxy fence.  Inline PTX stays where the
dialect has no op for what the kernels need: ex2.approx.ftz.f32 (no NVVM op; math.exp2 goes to
libdevice's exp2f), and wgmma, whose statement here holds the fence, the MMAs of every m-tile
and their predicate in one asm block with each accumulator register tied to it, so that every
register it reads (accumulators, the A operand loaded or packed for the slice) is written
before its wgmma.fence and nothing reads an accumulator before the wait (nvvm.wgmma.mma_async
leaves that ordering to LLVM).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from mlir import ir
from mlir.dialects import arith, gpu, llvm, nvvm, vector



def i32_type() -> ir.Type:
    return ir.IntegerType.get_signless(32)


def i64_type() -> ir.Type:
    return ir.IntegerType.get_signless(64)


def _i32(value: int) -> ir.Value:
    return arith.constant(i32_type(), value)


def _ptx(results: Sequence[ir.Type], operands: Sequence[ir.Value], code: str):
    return nvvm.inline_ptx(list(results), list(operands), [], code)


def ex2(x: ir.Value) -> ir.Value:
    """2^x with one ex2.approx (inputs are scores in base-2 units; -inf gives 0)."""
    return _ptx([x.type], [x], "ex2.approx.ftz.f32 $0, $1;")


def shuffle_xor(value: ir.Value, offset: int) -> ir.Value:
    return gpu.shuffle(value, _i32(offset), _i32(32), gpu.ShuffleMode.XOR)[0]


def pack_pair(low: ir.Value, high: ir.Value, element: ir.Type) -> ir.Value:
    """Two f32 -> one i32 holding them as 16-bit floats (low half: the lower column):
    cvt.rn.{bf16x2,f16x2}.f32."""
    convert = nvvm.convert_f32x2_to_bf16x2 if isinstance(element, ir.BF16Type) else nvvm.convert_f32x2_to_f16x2
    pair = convert(ir.VectorType.get([2], element), high, low, rnd=ir.Attribute.parse("#nvvm.fp_rnd_mode<rn>"))
    return vector.extract(vector.bitcast(ir.VectorType.get([1], i32_type()), pair), [], [0])


def mma(a: Sequence[ir.Value], b: Sequence[ir.Value], c: Sequence[ir.Value], element: ir.Type) -> List[ir.Value]:
    """D = A . B + C, mma.sync m16n8k16 (A row-major, B column-major, f32 accumulate); A and B
    as 32-bit words of two 16-bit elements each."""
    if isinstance(element, ir.BF16Type):
        return _mma_sync(a, b, c, 16, "bf16")
    pair = ir.VectorType.get([2], ir.F16Type.get())  # the f16 form takes its words as f16 pairs
    return _mma_sync([llvm.bitcast(pair, w) for w in a], [llvm.bitcast(pair, w) for w in b], c, 16, "f16")


def _mma_sync(a, b, c, k: int, ptx_type: str) -> List[ir.Value]:
    """nvvm.mma.sync m16n8k`k` of `ptx_type` multiplicands (row-major A, column-major B) with
    four f32 accumulators a lane."""
    f32 = ir.F32Type.get()
    result = nvvm.mma_sync(ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
                           ir.Attribute.parse(f"#nvvm.shape<m = 16, n = 8, k = {k}>"),
                           ir.Attribute.parse("#nvvm.mma_layout<row>"), ir.Attribute.parse("#nvvm.mma_layout<col>"),
                           list(a), list(b), list(c),
                           multiplicand_a_ptx_type=ir.Attribute.parse(f"#nvvm.mma_type<{ptx_type}>"),
                           multiplicand_b_ptx_type=ir.Attribute.parse(f"#nvvm.mma_type<{ptx_type}>"))
    return [llvm.extractvalue(f32, result, [i]) for i in range(4)]


def tf32_split(x: ir.Value) -> Tuple[ir.Value, ir.Value]:
    """An f32 as the sum of two tf32s, (big, small) as 32-bit words: big = x rounded to tf32,
    small = the rest rounded to tf32 (together 21 of the 24 bits of x's significand)."""
    big = _to_tf32(x)
    rest = arith.subf(x, arith.bitcast(ir.F32Type.get(), big))
    return big, _to_tf32(rest)


def _to_tf32(x: ir.Value) -> ir.Value:
    """cvt.rna.tf32.f32: x rounded to tf32 (ties away from zero), as a 32-bit word."""
    return nvvm.convert_float_to_tf32(i32_type(), x, rnd=ir.Attribute.parse("#nvvm.fp_rnd_mode<rna>"))


def mma_tf32(a: Sequence[ir.Value], b: Sequence[ir.Value], c: Sequence[ir.Value]) -> List[ir.Value]:
    """D = A . B + C, mma.sync m16n8k8 on tf32 words (A row-major, B column-major, f32 accumulate)."""
    return _mma_sync(a, b, c, 8, "tf32")


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
                  n: int, element: ir.Type, transpose_b: bool, commit: bool = False) -> List[List[ir.Value]]:
    """D[m] = A[m] . B (+ D[m] unless `acc` is None: a zero accumulator) for each m-tile m of
    the warpgroup: one wgmma m64nNk16 each, A (4 words a lane) from registers, B (k16 x n)
    from shared memory through `descriptor` (transposed: stored n-major, the V tile).  One asm
    statement, so that every register it reads (the accumulators, and A: loaded or packed
    for this slice) is written before its wgmma.fence.  `commit`: the statement ends the
    chain's group (wgmma.commit_group).  The accumulators are in flight until `warpgroup_wait`."""
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
    if commit:
        lines.append("wgmma.commit_group.sync.aligned;")
    lines.append("}")
    values = _inline_asm(outputs, operands, constraints, "\n".join(lines))
    return [values[m * half:(m + 1) * half] for m in range(tiles)]


def warpgroup_wait(flat: List[ir.Value], newer: int) -> List[ir.Value]:
    """Wait for the warpgroup's committed wgmma groups but the `newer` most recent: `flat`, the
    accumulators of the groups that are then complete, readable after it (tied through the
    statement, so that no use of them moves above the wait)."""
    code = f"wgmma.wait_group.sync.aligned {newer};"
    return _inline_asm(len(flat), flat, [str(i) for i in range(len(flat))], code)


def fence_async_proxy() -> None:
    """Make this thread's shared-memory writes (cp.async: the generic proxy) visible to the
    async proxy that wgmma reads shared memory through (before the barrier that publishes them)."""
    nvvm.fence_proxy(ir.Attribute.parse("#nvvm.proxy_kind<async.shared>"),
                     space=ir.Attribute.parse("#nvvm.shared_space<cta>"))
