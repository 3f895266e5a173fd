"""The xegpu target: the shared work-group IR on Intel GPUs, through XeGPU to SPIR-V.

Stages after the shared schedule:

    xegpu-kernels  outline.outline_work_groups   each work-group loop -> a gpu.func holding the
                                                 work-group body unchanged (MLIR 22.1.8)
    xegpu-wg       layouts.assign_layouts        in torch-mlir's upstream MLIR (LLVM 24git):
                                                 convert-vector-to-xegpu (2D block loads/stores
                                                 on run-time shapes, dpas), K/V prefetches,
                                                 sg_layout / sg_data / inst_data on the anchors
    xegpu-lowered  upstream's gpu-lower-to-xevm-pipeline{xegpu-op-level=workgroup}, without
                   its last step: layout propagation, work-group -> sub-group -> lane
                   distribution, XeVM, the LLVM dialect

then `emit` writes LLVM IR and makes SPIR-V with Debian's llvm-22
(toolchain.py).  Under XEGPU_ATTN_EMULATE=xpu the same kernel's LLVM IR is
linked with emulation.cl (the Intel-GPU-only builtins in portable OpenCL C)
and runs on the Intel OpenCL CPU runtime (runtime/xpu.py).

How a work-group is distributed: decode-like problems (at most 8 query rows
per head) take one sub-group of 8 rows per work-group; otherwise 128 query
rows (one row tile) over sub-groups of 16 lanes; for head dims up to 64, 8 sub-groups of 16 rows and
64-key steps (the tile sizes of lighthouse's tuned fused attention: Max 1100,
101.9 TFLOPS); above, 16 sub-groups of 8 rows and 32-key steps up to head dim
128, 16-key steps above (with Q re-read at every step where its rows are read
in 32-column messages): what keeps the kernels free of spills, checked with
ocloc for pvc and bmg (kv_tile, reload_q).  Head dims are multiples of 16 from
16 to 256 (Ev != E too): a row of 16 f16 is the narrowest a 2D block message
reads (32 bytes), and tiles whose width is not a multiple of 32 columns are
read in 16-column messages.
Each step reads a K tile (transposed 32-bit block reads) and a V tile
(VNNI-transformed reads) that every sub-group uses whole; S = Q K^T and
O += P V are 8x16x16 DPAS chains; the row max and sum are sub-group shuffles.
float32 inputs run on bf16 DPAS, each f32 operand split into three bf16 parts
(f32.py; no tf32 anywhere), in the forward and, up to head dim 64, the
backward.  The kernels are built for the large register file (256 registers
a thread) unless they fit the default 128 (large_grf).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from ... import knobs
from ...schedule.options import ScheduleOptions
from ...errors import CompileError
from ...spec import AttentionSpec, ProblemSize
from ..base import Kernel, KernelArtifact, Stage, Target, TargetOptions, register, require_matrix_engine_dtype

SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 16))
#: the input dtypes the kernels take: f16 and bf16 on DPAS as they are, f32 as three bf16 parts
#: of each operand (f32.py: f32 accuracy, never tf32's).
XEGPU_DTYPES = ("float16", "bfloat16", "float32")
ROW_TILE = 128
KV_TILE = 64
#: query rows per head up to which a problem is decode-like: one 8-row DPAS tile, one sub-group.
DECODE_ROWS = 8
#: where the pipeline's expanded pass list is cut: its last pass needs a SPIR-V target.
BINARY_PASS = ",gpu-module-to-binary"
METADATA = "attn.xegpu"
CHIP = "pvc"
#: the devices whose native code an IR dump holds (ocloc names).
NATIVE_DEVICES = ("pvc", "bmg")


@dataclass(frozen=True)
class XegpuOptions(TargetOptions):
    """The xegpu target's options.

    chip        the Intel GPU the kernels are lowered for (XeVM's target chip)
    emulated    the kernel runs on the Intel OpenCL CPU runtime with the GPU-only builtins
                emulated (XEGPU_ATTN_EMULATE=xpu): SPIR-V linked with emulation.cl, no
                native code
    """

    chip: str = CHIP
    emulated: bool = False
    large_grf: bool = True

    def own_name(self):
        return [self.chip] + (["emulated"] if self.emulated else []) + ([] if self.large_grf else ["grf128"])


class XegpuTarget(Target):
    name = "xegpu"
    device_type = "xpu"
    binary_suffix = ".spv"

    def check(self, spec: AttentionSpec) -> None:
        """What the target does not take raises here, before any compile, saying so."""
        require_matrix_engine_dtype(spec, self.name, "DPAS", XEGPU_DTYPES)
        widest = max(spec.head_dim, spec.v_head_dim)
        if spec.kernel == "backward" and spec.dtype == "float32" and widest > FLOAT32_BACKWARD_UP_TO:
            raise NotImplementedError(
                f"the xegpu target's float32 backward takes head dims up to {FLOAT32_BACKWARD_UP_TO} so far "
                f"(wider ones spill 13-27 KB a kernel: every B tile held with its three bf16 parts); got "
                f"{widest}; train float32 with wider heads on CPU tensors or in float16/bfloat16")
        for name, dim in (("query/key", spec.head_dim), ("value", spec.v_head_dim)):
            if dim not in SUPPORTED_HEAD_DIMS:
                raise NotImplementedError(
                    f"the xegpu target supports {name} head dims that are multiples of 16 from 16 to 256 "
                    f"(2D block messages read rows of at least 32 bytes; DPAS works on 16 columns); got {dim}")

    def default_options(self, spec: AttentionSpec, arch: Optional[str]) -> XegpuOptions:
        self.check(spec)
        # K read as loaded and transposed explicitly: convert-vector-to-xegpu makes a dpas of the
        # contraction only in that form (and layouts turn the transpose into a transposed read).
        if spec.length_class not in ("decode", "prefill"):
            raise ValueError(f"the xegpu target has no length class {spec.length_class!r}")
        if spec.kernel == "backward":
            return XegpuOptions(backward_schedule(spec), chip=arch or CHIP, emulated=knobs.emulate() == "xpu")
        row_tile = DECODE_ROWS if spec.length_class == "decode" else ROW_TILE
        schedule = ScheduleOptions(row_tile=row_tile, kv_tile=kv_tile(spec), k_layout="explicit", pv_in_f32=False)
        return XegpuOptions(schedule, chip=arch or CHIP, emulated=knobs.emulate() == "xpu",
                            large_grf=large_grf(spec))

    def length_class(self, size: ProblemSize, spec: AttentionSpec, arch: Optional[str] = None) -> str:
        """"decode" (at most DECODE_ROWS query rows per head: one sub-group's 8-row DPAS tile per
        work-group, so a decode step is not 16 sub-groups of padding) or "prefill"."""
        if spec.kernel == "backward":  # one backward schedule for every length
            return "prefill"
        return "decode" if size.q_len <= DECODE_ROWS else "prefill"

    def stage_names(self) -> Sequence[str]:
        return ("xegpu-kernels", "xegpu-wg", "xegpu-lowered")

    def stages(self) -> Sequence[Stage]:
        return (("xegpu-kernels", _outline), ("xegpu-wg", _to_xegpu), ("xegpu-lowered", _lower))

    def emit(self, module, spec: AttentionSpec, options: XegpuOptions, keep_dir: str = "") -> KernelArtifact:
        import base64
        import os
        from . import toolchain
        metadata = json.loads(_metadata_text(module))
        llvm_ir = toolchain.bridge_llvm_ir(_llvm_ir_of(module), [k["name"] for k in metadata["kernels"]])
        hardware = toolchain.spirv_from_llvm_ir(llvm_ir, keep_dir=keep_dir)
        if keep_dir:
            with open(os.path.join(keep_dir, "kernel.spv"), "wb") as f:
                f.write(hardware)
        native = _native_code(hardware, options.large_grf, keep_dir) if keep_dir or not options.emulated else {}
        metadata["imports"] = toolchain.imported_functions(hardware)
        metadata["operands"] = [{"name": name, "dims": list(dims), "dtype": dtype}
                                for name, dims, dtype in spec.operands()]
        metadata["writes"] = spec.writes()
        metadata["subgroup_size"] = toolchain.SUBGROUP_SIZE
        metadata["large_grf"] = options.large_grf
        metadata["emulated"] = options.emulated
        metadata["build_options"] = toolchain.build_options(options.large_grf, options.emulated)
        metadata["native"] = {} if metadata["emulated"] else {
            device: base64.b64encode(code["binary"]).decode() for device, code in native.items()}
        binary = hardware
        if metadata["emulated"]:
            binary = toolchain.without_cache_controls(toolchain.spirv_from_llvm_ir(llvm_ir, emulated=True))
            if keep_dir:
                with open(os.path.join(keep_dir, "kernel.emulated.spv"), "wb") as f:
                    f.write(binary)
        return KernelArtifact(binary=binary, metadata=metadata)

    def load(self, binary_path: str, metadata: Dict) -> Kernel:
        from ...runtime.xpu import XpuKernel
        return XpuKernel(binary_path, metadata)

    def toolchain(self) -> Optional[Dict[str, str]]:
        from . import toolchain
        return toolchain.identity(emulated=knobs.emulate() == "xpu")

    def loaded_modules(self) -> int:
        from ...runtime import xpu
        return xpu.loaded_modules()

    def available(self):
        try:
            from . import toolchain
            toolchain.upstream()
            toolchain.llvm_tool("llc")
            if knobs.emulate() == "xpu":
                toolchain.clang()
        except Exception as error:  # noqa: BLE001 (the reason is the message)
            return False, str(error)
        return True, ""


def _native_code(spirv: bytes, large: bool, keep_dir: str) -> Dict[str, Dict]:
    """Intel's native code of the SPIR-V for NATIVE_DEVICES in the kernel's register-file mode
    (`large`: 256 registers), compiled once per device when ocloc is installed
    (scripts/setup_xegpu.sh); {} otherwise.  The launcher offers the binaries to the
    driver first (it refuses one made for another device) and falls back to the SPIR-V; with an IR
    dump directory they are written there too (kernel.<device>.bin and .asm, and a summary in
    native.json)."""
    import logging
    import os
    from . import toolchain
    why = toolchain.ocloc_available()
    if why:
        logging.getLogger("torch_xegpu_attn").info("xegpu: no native code (%s)", why)
        return {}
    found = {device: toolchain.native(spirv, device, large_grf=large, keep_dir=keep_dir) for device in NATIVE_DEVICES}
    if keep_dir:
        summary = {device: {k: v for k, v in code.items() if k not in ("binary", "asm", "zeinfo")}
                   for device, code in found.items()}
        with open(os.path.join(keep_dir, "native.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return found


def _metadata_text(module) -> str:
    from torch_mlir import ir
    return ir.StringAttr(module.operation.attributes[METADATA]).value


def _outline(module, spec: AttentionSpec, options: XegpuOptions):
    """Stage xegpu-kernels: the work-group loops become gpu.funcs with their bodies as they are."""
    from mlir import ir
    from ..outline import move_body_into, outline_work_groups
    from ...schedule.tiling import WORK_GROUP_ROWS
    from .layouts import LANES, ROWS, STEP
    geometry = _geometry(spec, options.schedule)
    schedule = options.schedule

    def rows(loop):
        """The rows of a loop's work-group tiles (the backward's dK/dV loop owns keys), and of the
        tiles its steps take; None for the forward's one loop (the Geometry's)."""
        if WORK_GROUP_ROWS not in loop.attributes:
            return None
        own = ir.IntegerAttr(loop.attributes[WORK_GROUP_ROWS]).value
        return own, schedule.row_tile + schedule.kv_tile - own

    def threads(loop):
        own = rows(loop)
        return geometry.threads if own is None else own[0] // geometry.sg_rows * LANES

    def move(loop, outer, ip, ivs):
        move_body_into(loop, outer, ivs)
        own = rows(loop)
        if own is not None:
            kernel = ip.block.owner
            kernel = getattr(kernel, "operation", kernel)
            i64 = ir.IntegerType.get_signless(64)
            kernel.attributes[ROWS] = ir.IntegerAttr.get(i64, own[0])
            kernel.attributes[STEP] = ir.IntegerAttr.get(i64, own[1])
        return {}

    metadata = outline_work_groups(module, "xegpu", threads, move, causal=False)
    module.operation.attributes[METADATA] = ir.StringAttr.get(json.dumps(metadata))
    if spec.mask is not None and tuple(spec.mask.dims[-2:]) == ("l", "s"):
        _mask_tiles_span_the_mask(module, [name for name, _, _ in spec.operands()].index("mask"))
    return module


def _mask_tiles_span_the_mask(module, position: int) -> None:
    """Mask tiles read from a view as wide as the mask itself, not S keys: the view's extent is
    the 2D descriptor's width, which block messages need to be at least 32 bytes and a multiple of
    4, so the launcher may pass a mask widened past S (runtime/xpu.conform).  Keys >= S are
    masked by the keys' count either way."""
    from mlir import ir
    from mlir.dialects import memref
    from ...mlir_utils import const_index, ops_named
    for kernel in ops_named(module, "gpu.func"):
        mask = kernel.regions[0].blocks[0].arguments[position]
        rank = ir.MemRefType(mask.type).rank
        for use in list(mask.uses):
            view = use.owner
            if view.name != "memref.subview":
                continue
            sizes = list(view.opview.sizes)
            if ir.DenseI64ArrayAttr(view.attributes["static_sizes"])[rank - 1] != ir.ShapedType.get_dynamic_size():
                continue
            with ir.InsertionPoint(view), view.location:
                extent = memref.dim(mask, const_index(rank - 1))
            slot = 1 + len(list(view.opview.offsets)) + len(sizes) - 1
            view.operands[slot] = extent


def _gather_vector_reads(module) -> None:
    """1-D reads (masks broadcast along rows or keys) as vector.gather: convert-vector-to-xegpu
    takes a 1-D transfer that may run past the end only in that form (a scattered load whose
    lanes past the end are masked off); 2D block messages cannot serve them (a mask row of a few
    bytes breaks their width and alignment minimums).  Runs in upstream MLIR right before the
    conversion: a canonicalization would fold a gather of contiguous lanes into a maskedload,
    which the conversion does not take."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith, memref, vector
    from .layouts import _walk
    reads = [op for op in _walk(module.operation, "vector.transfer_read")
             if ir.VectorType(op.results[0].type).rank == 1]
    index = ir.IndexType.get()
    for read in reads:
        vtype = ir.VectorType(read.results[0].type)
        source, pad = read.operands[0], read.operands[-1]
        indices = list(read.operands[1:-1])
        mtype = ir.MemRefType(source.type)
        amap = ir.AffineMapAttr(read.attributes["permutation_map"]).value
        if len(amap.results) != 1 or str(amap.results[0]) != f"d{mtype.rank - 1}" or len(indices) != mtype.rank:
            raise CompileError(f"xegpu: a 1-D read along another dim than the innermost ({amap})")
        n = vtype.shape[0]
        if n == 1 and all(ir.BoolAttr(b).value for b in ir.ArrayAttr(read.attributes["in_bounds"])):
            _scalar_read(read, indices)
            continue
        with ir.InsertionPoint(read), read.location:
            index_vector = ir.VectorType.get([n], index)
            last = indices[-1]
            lanes = arith.addi(vector.step(index_vector), vector.broadcast(index_vector, last))
            rest = arith.subi(memref.dim(source, arith.constant(index, mtype.rank - 1)), last)
            mask = vector.create_mask(ir.VectorType.get([n], ir.IntegerType.get_signless(1)), [rest])
            gathered = vector.gather(vtype, source, indices[:-1] + [arith.constant(index, 0)], lanes, mask,
                                     vector.broadcast(vtype, pad))
        read.results[0].replace_all_uses_with(gathered)
        read.erase()


def _gather_transposed_reads(module) -> None:
    """2-D reads through a transposing map (the backward's mask tiles in the keys-first dK/dV loop:
    (keys x rows) read from a (rows x keys) mask) as 2-D vector.gathers: each lane reads its
    elements of the transposed tile where they lie.  2D block messages transpose 32-bit elements
    only (a bool mask is one byte an element), and a tile read as it lies and transposed in
    registers goes through shared local memory (the transpose crosses sub-groups)."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith, memref, vector
    reads = []

    def visit(op):
        if op.name == "vector.transfer_read" and ir.VectorType(op.results[0].type).rank == 2:
            rank = ir.MemRefType(op.operands[0].type).rank
            amap = ir.AffineMapAttr(op.attributes["permutation_map"]).value
            if [str(e) for e in amap.results] == [f"d{rank - 1}", f"d{rank - 2}"]:
                reads.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    index = ir.IndexType.get()
    for read in reads:
        vtype = ir.VectorType(read.results[0].type)
        source, pad = read.operands[0], read.operands[-1]
        indices = list(read.operands[1:-1])
        rank = ir.MemRefType(source.type).rank
        keys, rows = vtype.shape
        with ir.InsertionPoint(read), read.location:
            # (base, offset, sizes..., strides...): the stride of the mask's rows
            row_stride = list(memref.extract_strided_metadata(source))[2 + rank + rank - 2]
            tile = ir.VectorType.get([keys, rows], index)
            key_column = vector.shape_cast(ir.VectorType.get([keys, 1], index),
                                           vector.step(ir.VectorType.get([keys], index)))
            row_of = vector.broadcast(tile, vector.step(ir.VectorType.get([rows], index)))
            # element (key k, row r) lies r rows and k keys past the tile's first element
            offsets = arith.addi(arith.muli(row_of, vector.broadcast(tile, row_stride)),
                                 vector.broadcast(tile, key_column))
            keys_left = arith.subi(memref.dim(source, arith.constant(index, rank - 1)), indices[rank - 1])
            rows_left = arith.subi(memref.dim(source, arith.constant(index, rank - 2)), indices[rank - 2])
            mask = vector.create_mask(ir.VectorType.get([keys, rows], ir.IntegerType.get_signless(1)),
                                      [keys_left, rows_left])
            gathered = vector.gather(vtype, source, indices, offsets, mask, vector.broadcast(vtype, pad))
        read.results[0].replace_all_uses_with(gathered)
        read.erase()


def _scatter_vector_writes(module) -> None:
    """1-D writes (the training kernels' row vectors: lse, Delta) as vector.scatter, the form in
    which convert-vector-to-xegpu takes a 1-D transfer that may run past the end (a scattered
    store whose lanes past the end are masked off), as _gather_vector_reads does for reads."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith, memref, vector
    from .layouts import _walk
    writes = [op for op in _walk(module.operation, "vector.transfer_write")
              if ir.VectorType(op.operands[0].type).rank == 1]
    index = ir.IndexType.get()
    for write in writes:
        value, dest = write.operands[0], write.operands[1]
        indices = list(write.operands[2:])
        vtype = ir.VectorType(value.type)
        mtype = ir.MemRefType(dest.type)
        amap = ir.AffineMapAttr(write.attributes["permutation_map"]).value
        if len(amap.results) != 1 or str(amap.results[0]) != f"d{mtype.rank - 1}" or len(indices) != mtype.rank:
            raise CompileError(f"xegpu: a 1-D write along another dim than the innermost ({amap})")
        n = vtype.shape[0]
        with ir.InsertionPoint(write), write.location:
            index_vector = ir.VectorType.get([n], index)
            last = indices[-1]
            lanes = arith.addi(vector.step(index_vector), vector.broadcast(index_vector, last))
            rest = arith.subi(memref.dim(dest, arith.constant(index, mtype.rank - 1)), last)
            mask = vector.create_mask(ir.VectorType.get([n], ir.IntegerType.get_signless(1)), [rest])
            vector.scatter(None, dest, indices[:-1] + [arith.constant(index, 0)], lanes, mask, value)
        write.erase()


def _loop_results_stored_as_copies(module) -> None:
    """A 2D store of a loop's result (an accumulator written as the loop left it: the float32
    dV of a float32 backward, or of a 16-bit one whose dV the frontend sums) stores a copy made
    after the loop, x + 0.0 (which no pass folds: it differs from x only on -0.0, which it makes
    +0.0).  Given the loop's result itself, IGC kept that accumulator in scratch memory through
    the whole loop (the dK/dV kernel at head dim 128: docs/xegpu.md); a copy leaves it in
    registers."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith
    from .layouts import _walk
    for store in _walk(module.operation, "xegpu.store_nd"):
        value = store.operands[0]
        if not isinstance(value.owner, ir.OpView) or value.owner.name != "scf.for":
            continue
        vtype = ir.VectorType(value.type)
        with ir.InsertionPoint(store), store.location:
            zero = ir.DenseElementsAttr.get_splat(vtype, ir.FloatAttr.get(vtype.element_type, 0.0))
            store.operands[0] = arith.addf(value, arith.constant(vtype, zero))


#: the pure ops an index vector is made of (vector.step, its casts, sums and broadcast scalars)
_INDEX_OPS = ("vector.step", "vector.broadcast", "vector.create_mask", "arith.index_cast", "arith.addi",
              "arith.subi", "arith.muli", "arith.constant")
#: an attribute telling the copies of an index vector apart, so that CSE does not merge them again.
COPY = "attn.xegpu_copy"


def _index_vectors_per_use(module) -> None:
    """Give every use of a 1-D index vector (vector.step and what is computed from it: the key and
    row indices of a score tile, the lanes of a scattered read) a copy of its own, down to the
    vector.step.  Where the row and key tiles are equally long (the backward's 32 x 32 tiles) CSE
    merges the step of the keys with that of the rows, and each needs its own layout: a slice
    along the columns where it is broadcast over them, along the rows where over those.  Upstream's
    layout propagation resolves such a conflict by copying the user with the second layout but
    not its operands (then the work-group -> sub-group distribution fails: "arith.index_cast op
    requires the same shape", an index_cast of a 32-lane vector to an 8-lane one).  The copies
    carry distinct COPY tags, so that the pipeline's CSE keeps them apart."""
    from torch_mlir import ir
    order = []

    def is_index_vector(op) -> bool:
        if op.name not in _INDEX_OPS or len(op.results) != 1:
            return False
        vtype = op.results[0].type
        if not isinstance(vtype, ir.VectorType) or vtype.rank != 1:
            return False
        return isinstance(vtype.element_type, (ir.IndexType, ir.IntegerType))

    def visit(op):
        if is_index_vector(op):
            order.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)  # in program order: a producer before its users
    counter = 0
    for op in reversed(order):  # users first: a copy's operands then get a use each in their turn
        uses = [(use.owner, use.operand_number) for use in op.results[0].uses]
        for owner, number in uses[1:]:
            with ir.InsertionPoint.after(op):
                copy = op.clone()
            counter += 1
            copy.attributes[COPY] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), counter)
            owner.operands[number] = copy.results[0]


#: columns of one chunk of a wide row dot (_row_dots_in_chunks).
ROW_DOT_CHUNK = 64


def _row_dots_in_chunks(module) -> None:
    """A row dot of two loaded tiles (the backward's Delta = rowsum(dOut * Out)) over rows wider
    than 128 columns in ROW_DOT_CHUNK-column chunks, each read, multiplied and added to the
    previous chunks' products before the next is read, and the sum reduced across once: the tiles whole in registers (8 rows of an f32 Out and of dOut in
    f32, at head dim 256 8 KB each a sub-group) spilled 4-8 KB (bf16, ocloc pvc and bmg); in
    chunks, none."""
    from torch_mlir import ir
    from torch_mlir.dialects import arith, vector
    found = []

    def visit(op):
        if op.name == "vector.multi_reduction" and list(ir.DenseI64ArrayAttr(op.attributes["reduction_dims"])) == [1]:
            product = op.operands[0].owner
            if not hasattr(product, "arguments") and product.name == "arith.mulf":
                found.append(op)
        return ir.WalkResult.ADVANCE

    def loaded(value):
        """(the load_nd, whether it is extended) a factor comes from, or None."""
        op = value.owner
        extended = not hasattr(op, "arguments") and op.name == "arith.extf"
        if extended:
            op = op.operands[0].owner
        if hasattr(op, "arguments") or op.name != "xegpu.load_nd" or len(op.operands) != 2:
            return None
        return op, extended

    module.operation.walk(visit)
    for reduction in found:
        product = reduction.operands[0].owner
        rows, width = ir.VectorType(product.results[0].type).shape
        factors = [loaded(v) for v in product.operands]
        if width <= 2 * ROW_DOT_CHUNK or width % ROW_DOT_CHUNK or None in factors:  # fits up to 128
            continue
        with ir.InsertionPoint(reduction), reduction.location:
            summed = None  # the chunks' products summed column by column, reduced across once
            for start in range(0, width, ROW_DOT_CHUNK):
                parts = []
                for load, extended in factors:
                    desc = load.operands[0].owner
                    element = ir.VectorType(load.results[0].type).element_type
                    desc_type = ir.Type.parse(f"!xegpu.tensor_desc<{rows}x{ROW_DOT_CHUNK}x{element}>")
                    chunk_desc = ir.Operation.create(desc.name, results=[desc_type], operands=list(desc.operands),
                                                     attributes={a: desc.attributes[a] for a in desc.attributes})
                    offsets = list(ir.DenseI64ArrayAttr(load.attributes["const_offsets"]))
                    attributes = {a: load.attributes[a] for a in load.attributes}
                    attributes["const_offsets"] = ir.DenseI64ArrayAttr.get(offsets[:-1] + [offsets[-1] + start])
                    part = ir.Operation.create(load.name, results=[ir.VectorType.get([rows, ROW_DOT_CHUNK], element)],
                                               operands=[chunk_desc.results[0], load.operands[1]],
                                               attributes=attributes).results[0]
                    if extended:
                        part = arith.extf(ir.VectorType.get([rows, ROW_DOT_CHUNK], ir.F32Type.get()), part)
                    parts.append(part)
                chunk = arith.mulf(*parts)
                summed = chunk if summed is None else arith.addf(summed, chunk)
            total = vector.multi_reduction(reduction.attributes["kind"], summed, reduction.operands[1], [1])
        reduction.results[0].replace_all_uses_with(total)
        reduction.erase()
        dead = [product] + [v.owner for v in product.operands]
        for op in dead:
            if op.name == "arith.extf" and not list(op.results[0].uses):
                dead.append(op.operands[0].owner)
        for op in dead:
            if not list(op.results[0].uses):
                desc = op.operands[0].owner if op.name == "xegpu.load_nd" else None
                op.erase()
                if desc is not None and not list(desc.results[0].uses):
                    desc.erase()


def _scalar_read(read, indices) -> None:
    """A one-element read (a mask that varies along neither rows nor keys) as a scalar load whose
    value its users broadcast themselves: a one-lane vector broadcast to a tile cannot be laid
    out over sub-groups (upstream's layout propagation finds no even distribution of it)."""
    from torch_mlir import ir
    from torch_mlir.dialects import memref, vector
    with ir.InsertionPoint(read), read.location:
        scalar = memref.load(read.operands[0], indices)
        as_vector = None
        for use in list(read.results[0].uses):
            user = use.owner
            if user.name == "vector.broadcast":
                with ir.InsertionPoint(user), user.location:
                    direct = vector.broadcast(user.results[0].type, scalar)
                user.results[0].replace_all_uses_with(direct)
                user.erase()
            else:
                if as_vector is None:
                    as_vector = vector.broadcast(read.results[0].type, scalar)
                user.operands[use.operand_number] = as_vector
    read.erase()


def _geometry(spec: AttentionSpec, options: ScheduleOptions):
    from .layouts import Geometry
    if options.kv_splits > 1 or options.pack_gqa:
        raise CompileError("xegpu: split keys (kv_splits > 1) and packed query heads (pack_gqa) are not "
                           "supported by the xegpu target yet (XEGPU_ATTN_SCHEDULE asked for them)")
    rows = options.row_tile * (spec.group if options.pack_gqa else 1)
    return Geometry(rows=rows, kv_tile=options.kv_tile, head_dim=spec.head_dim, v_head_dim=spec.v_head_dim,
                    sg_rows=subgroup_rows(spec), reload_q=reload_q(spec),
                    element_bytes=4 if spec.dtype == "float32" else 2)


#: the backward's tiles: 32 query rows by 32 keys in every loop (the dK/dV loop's work-group owns
#: keys, the dQ and Delta loops' query rows) for head dims up to 64, 16 by 16 above
#: (backward_tile); at 64 x 64 ocloc spilled 1 KB (dK/dV) and 128 B (dQ) at E = 64 on pvc.
BACKWARD_TILE = 32
#: the widest head dim (E or Ev) whose backward takes BACKWARD_TILE, not half of it.
BACKWARD_WIDE_TILE_UP_TO = 64
#: above this head dim (E or Ev) the backward's loops re-read their dpas A operands at every step
#: and read each tile right before its use (reload_q).
BACKWARD_RELOAD_ABOVE = 128
#: the widest head dim (E or Ev) the float32 backward takes: above it, every kernel of the
#: backward spilled 13-27 KB (E = 128, ocloc pvc and bmg).
FLOAT32_BACKWARD_UP_TO = 64
#: above this head dim the float32 backward computes dK and dV in loops of their own.
FLOAT32_BACKWARD_APART_ABOVE = 32
#: with dropout (the generator's four words a score live during its rounds), the head dim above
#: which the backward's loops re-read their dpas A operands, and above which dK and dV take loops
#: of their own: at 112 and 128 together the dK/dV kernel spilled 1-2 KB (ocloc, pvc), apart none.
DROPOUT_BACKWARD_RELOAD_ABOVE = 64
DROPOUT_BACKWARD_APART_ABOVE = 96
#: rows of a backward tile per sub-group: the dK/dV loop carries two accumulators (dK and dV).
BACKWARD_SG_ROWS = 8


def backward_schedule(spec: AttentionSpec) -> ScheduleOptions:
    """The backward's schedule: every contraction a dpas of 16-bit operands (P and dS rounded,
    pv_in_f32 off; for float32 inputs P and dS stay f32 and every operand is split into bf16
    parts, f32.py) accumulating in f32; the dK/dV loop keys first (S^T = K Q^T: P^T and dS^T are
    dpas A operands in the layout their dpas produced them in), Q and dOut transposed explicitly
    where they are right operands (k_layout "explicit", as K in Q K^T); dQ from a loop of its own
    (no float atomics).  Above head dims of 128, dK and dV in loops of their own (their two
    accumulators in registers together would not fit); for float32 above 32 (each B tile is
    held with its three bf16 parts, f32.py: at E = 48 together the dK/dV kernel spilled 2.8-3
    KB, apart none); with dropout above DROPOUT_BACKWARD_APART_ABOVE."""
    apart_above = (FLOAT32_BACKWARD_APART_ABOVE if spec.dtype == "float32" else
                   DROPOUT_BACKWARD_APART_ABOVE if spec.dropout_p > 0 else 128)
    dkv = "apart" if max(spec.head_dim, spec.v_head_dim) > apart_above else "together"
    tile = backward_tile(spec)
    return ScheduleOptions(row_tile=tile, kv_tile=tile, k_layout="explicit", pv_in_f32=False,
                           backward_tiles="keys_by_rows", backward_dq="second_pass", backward_dkv=dkv)


def backward_tile(spec: AttentionSpec) -> int:
    """Query rows and keys of the backward's tiles: 32 up to head dims of 64, else 16.  Every
    sub-group holds the whole B tiles of a step (the dQ loop's K and V, the dK/dV loop's Q and
    dOut), as wide as the head dims: at 32 rows (or keys) the native code (ocloc, pvc and bmg)
    spilled from head dim 96 up (E = 96: 64 B-1 KB, 128: 4-8 KB a kernel; at 80 with a bool mask
    256 B), at 16 not up to 128 (f16, bf16, causal, masks, GQA, Ev != E).  float32 takes 16 at
    every head dim, as its forward takes 16-key steps: an f32 tile and its bf16 parts are 10
    bytes an element (and a 32-row transposed f32 read is a message the emulation lacks)."""
    if spec.dtype == "float32":
        return BACKWARD_TILE // 2
    return BACKWARD_TILE if max(spec.head_dim, spec.v_head_dim) <= BACKWARD_WIDE_TILE_UP_TO else BACKWARD_TILE // 2


def subgroup_rows(spec: AttentionSpec) -> int:
    """Query rows per sub-group: 16 for head dims up to 64 without a mask or dropout (lighthouse's
    tuned choice), else 8: 16 rows of a 128-wide f32 accumulator, Q and the scores, or of a
    64-wide one plus the mask tile or dropout's generator (four 32-bit words a score while its
    rounds run) spill out of 256 registers (ocloc, pvc and bmg: 16 KB at E = 64 with dropout)."""
    if spec.kernel == "backward":
        return BACKWARD_SG_ROWS
    if spec.length_class == "decode":
        return DECODE_ROWS
    if spec.dtype == "float32" or spec.dropout_p > 0:
        return 8
    return 16 if max(spec.head_dim, spec.v_head_dim) <= 64 and spec.mask is None else 8


#: keys per step where ocloc's register allocation (pvc and bmg) disagrees with the rule of
#: kv_tile, for E = Ev: at 208, 16-key steps spilled 64-256 bytes (bmg; decode on pvc too), 32-key
#: steps none (with Ev != E, 32-key steps at 208 spilled 0.25-2 KB where 16-key ones mostly did not).
KV_TILE_EXCEPTIONS = {208: 32}


#: with dropout, keys per step: DROPOUT_KV_TILE below head dim (E or Ev) DROPOUT_NARROW_FROM, 16
#: from it: the generator's four words of each score are live during its rounds, and 64-key steps
#: spilled 1 KB (decode, E = 64), 32-key ones 2-4 KB at 128 (ocloc, pvc and bmg).
DROPOUT_KV_TILE = 32
DROPOUT_NARROW_FROM = 128


def kv_tile(spec: AttentionSpec) -> int:
    """Keys per step: 64 for head dims up to 64 (lighthouse's tuned tile), 32 up to 128, 16
    above (one DPAS wide: a 32-key K tile of 256 columns alone is all 256 registers; with 32 keys
    head dims 144-256 spilled 0.25-8 KB), 16 for float32 (an f32 element is 4 bytes plus 6 of
    bf16 parts, f32.py); with dropout DROPOUT_KV_TILE, 16 from DROPOUT_NARROW_FROM."""
    widest = max(spec.head_dim, spec.v_head_dim)
    if spec.dtype == "float32":
        return KV_TILE // 4
    if spec.dropout_p > 0:
        return KV_TILE // 4 if widest >= DROPOUT_NARROW_FROM else DROPOUT_KV_TILE
    if spec.head_dim == spec.v_head_dim and widest in KV_TILE_EXCEPTIONS:
        return KV_TILE_EXCEPTIONS[widest]
    return KV_TILE if widest <= 64 else KV_TILE // 2 if widest <= 128 else KV_TILE // 4


def reload_q(spec: AttentionSpec) -> bool:
    """Whether the kernel reads its Q tile at every step (an L1 hit) instead of holding it in
    registers across the key loop: for head dims above 128 when Q's rows are read in 32-column
    messages (E a multiple of 32).  ocloc (pvc and bmg) spilled 128-256 bytes at E = 192 and 256
    holding Q, none re-reading it; with 16-column messages (E = 176, 208, 240) re-reading spilled
    0.5-4 KB where holding Q spilled at most 256 bytes.  The backward's loops above head dim 128
    re-read every dpas A operand they hold (Q and dOut, or K and V): without it they spilled
    0.25-16 KB a kernel at 144-256, with it none but at 176, 208 and 240 (16-column messages).
    The float32 backward re-reads them at every head dim: at E = 64 holding them spilled 7-14 KB
    a kernel, re-reading them 0-5 KB; with dropout above 64 (at 128 the dQ kernel spilled 8 KB
    holding them, none re-reading)."""
    if spec.kernel == "backward":
        if spec.dtype == "float32":
            return True
        reload_above = DROPOUT_BACKWARD_RELOAD_ABOVE if spec.dropout_p > 0 else BACKWARD_RELOAD_ABOVE
        return max(spec.head_dim, spec.v_head_dim) > reload_above
    if spec.dtype == "float32":  # an f32 Q tile and its bf16 parts: 10 bytes an element
        return max(spec.head_dim, spec.v_head_dim) > 64
    return max(spec.head_dim, spec.v_head_dim) > 128 and spec.head_dim % 32 == 0


def large_grf(spec: AttentionSpec) -> bool:
    """The register file the kernel is built for: the large one (256 registers a thread, half the
    threads per XVE) unless the kernel fits the default 128 without spills, as the one-sub-group
    decode kernels and the 8-row masked kernels of head dims up to 32 do (ocloc, pvc and bmg):
    twice the threads resident to hide the memory latency.  Every other kernel spills in 128
    registers (16 rows of a 64-key tile spill 1-4 KB even at head dim 16)."""
    small = spec.length_class == "decode" or spec.mask is not None
    return not (small and max(spec.head_dim, spec.v_head_dim) <= 32 and spec.dtype != "float32")


def _to_xegpu(module, spec: AttentionSpec, options: XegpuOptions):
    """Stage xegpu-wg: into upstream MLIR; XeGPU ops with their anchor layouts."""
    from . import toolchain
    from .layouts import assign_layouts
    upstream = toolchain.upstream()
    context = upstream.ir.Context()
    with context, upstream.ir.Location.unknown():
        moved = upstream.ir.Module.parse(str(module))
        upstream.passmanager.PassManager.parse(
            f"builtin.module(lower-affine, canonicalize, cse, xevm-attach-target{{chip={options.chip} O=3}})"
        ).run(moved.operation)
        _gather_vector_reads(moved)
        if spec.kernel == "backward":
            _gather_transposed_reads(moved)
        _scatter_vector_writes(moved)
        upstream.passmanager.PassManager.parse(
            "builtin.module(gpu.module(gpu.func(convert-vector-to-xegpu, cse, loop-invariant-code-motion, "
            "canonicalize)))").run(moved.operation)
        if spec.kernel == "backward":
            _index_vectors_per_use(moved)
            _row_dots_in_chunks(moved)
        _loop_results_stored_as_copies(moved)
        assign_layouts(moved, _geometry(spec, options.schedule))
    return moved


def lowering_pipeline(chip: str = CHIP) -> str:
    """upstream's gpu-lower-to-xevm-pipeline (work-group level) as its expanded pass list, without
    gpu-module-to-binary."""
    from . import toolchain
    upstream = toolchain.upstream()
    with upstream.ir.Context():
        full = str(upstream.passmanager.PassManager.parse(
            f"builtin.module(gpu-lower-to-xevm-pipeline{{xegpu-op-level=workgroup zebin-chip={chip}}})"))
    if BINARY_PASS not in full:
        raise RuntimeError(f"xegpu: unexpected XeVM pipeline {full[-200:]}")
    return full[:full.rindex(BINARY_PASS)] + ")"


def _lower(module, spec: AttentionSpec, options: XegpuOptions):
    """Stage xegpu-lowered: distribution by layout and lowering to the LLVM dialect."""
    from . import toolchain
    upstream = toolchain.upstream()
    with module.context:
        upstream.passmanager.PassManager.parse(lowering_pipeline(options.chip)).run(module.operation)
    return module


def _llvm_ir_of(module) -> str:
    """The kernels' gpu.module as LLVM IR text (upstream's translation)."""
    from . import toolchain
    upstream = toolchain.upstream()
    from torch_mlir.dialects import llvm as upstream_llvm
    with module.context:
        gpu_module = next(op for op in module.body.operations if op.operation.name == "gpu.module")
        body = "\n".join(str(op) for op in gpu_module.regions[0].blocks[0].operations)
        llvm_module = upstream.ir.Module.parse("module {\n" + body + "\n}")
        return str(upstream_llvm.translate_module_to_llvmir(llvm_module.operation))


XEGPU = register(XegpuTarget())
