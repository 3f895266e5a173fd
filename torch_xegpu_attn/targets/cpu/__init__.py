"""The cpu target: the shared work-group IR lowered to a host shared library.

Stages after the shared schedule (targets/cpu/lowering.py):

    cpu-grid     grid.outline_grids           each scf.forall -> attention_grid<i>(begin, end, ...)
    cpu-vector   microkernel + exp            contractions -> broadcast-FMA loops, exp -> polynomial
    cpu-llvm     LLVM_PIPELINE                everything -> LLVM dialect

then `emit` runs mlir-translate / opt / llc / cc.  Work-groups run on torch's
intra-op thread pool (see runtime/cpu.py and csrc/cpu_launcher.cpp).  This
module imports no MLIR: the stages do, when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from ... import knobs
from ...schedule.options import ScheduleOptions
from ...spec import AttentionSpec, ProblemSize
from ..base import Kernel, KernelArtifact, Stage, Target, TargetOptions, register
from . import toolchain

#: rows per work-group of the "long" class: each K and V element read from the caches feeds
#: that many rows' FMAs, which large head dims need (their K and V tiles no longer stay in L1);
#: a multiple of the register blocks' 6 rows.
ROW_TILE = 24
#: rows per work-group of the "short" class, whose QK^T reads K in place by dot products
#: (one horizontal sum per row and key: few rows only).
SHORT_ROW_TILE = 4
#: k steps per iteration of the micro-kernel's k loop, per ISA: fewer loop branches and more
#: freedom to schedule the loads, against code size.
K_UNROLL = {"avx512": 4, "avx2": 4, "sse": 2}
#: how key tails are handled: "mask" and "peel" measured within noise of each
#: other on every benchmark row, tails included (README); "mask" is one loop.
TAIL = "mask"
#: keys per flash step.
KV_TILE = 64
#: how a backward kernel gets dQ (ScheduleOptions.backward_dq).
BACKWARD_DQ = "per_head"
#: (row tile, key tile) of a backward kernel of the "short" class: with few rows per key/value
#: head the long class's 24 x 64 tiles cover mostly padding (at L = S = 100, causal, 2.4x the
#: visible pairs).
SHORT_BACKWARD_TILES = (12, 32)

#: query rows per key/value head (L * G) up to which K is read in place by
#: dot products instead of being transposed once into a workspace: with so few
#: rows the transpose pass costs more than it saves.
READ_K_IN_PLACE_ROWS = 128


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def register_tile(isa: toolchain.Isa, element_bits: int) -> Tuple[int, int]:
    """(rows, columns) of the accumulator block the micro-kernel keeps in registers for `isa`.

    One step of its k loop loads columns / lanes vectors of B and broadcasts each of the rows'
    A elements: rows * columns / lanes accumulators, plus the B vectors and a broadcast, must
    fit the register file, and the FMAs per load grow with both sides of the block."""
    b_vectors = 4 if isa.registers >= 32 else 2
    rows = (isa.registers - b_vectors - 2) // b_vectors
    return rows, b_vectors * isa.lanes(element_bits)


@dataclass(frozen=True)
class CpuOptions(TargetOptions):
    """The cpu target's options.

    cpu, cpu_flags   the host CPU the code is tuned for (llc -mcpu=native): its model and a
                     hash of its feature flags (/proc/cpuinfo)
    isa              the vector instruction set (toolchain.ISAS) the code may use, the host's
                     widest unless XEGPU_ATTN_CPU_ISA asks for a narrower one
    m_block, n_block the micro-kernel's register block: rows and columns of a contraction's
                     accumulator kept in registers through its k loop (register_tile)
    k_unroll         k steps per iteration of the micro-kernel's k loop
    bf16_dot         contractions of bf16 operands (Q K^T, dOut V^T) by AVX512-BF16 dot products,
                     two k steps per instruction (hosts with avx512_bf16, the avx512 ISA)
    transpose_tile   (e, s): a K^T workspace is filled by transposes of (s x e) tiles that
                     fit the registers (cpu-vector splits the schedule's whole-tile ones)
    """

    cpu: str = ""
    cpu_flags: str = ""
    isa: str = "avx2"
    m_block: int = 6
    n_block: int = 16
    k_unroll: int = 1
    bf16_dot: bool = False
    transpose_tile: Tuple[int, int] = (16, 16)

    def __post_init__(self) -> None:
        toolchain.isa_named(self.isa)
        if min(self.m_block, self.n_block, self.k_unroll) < 1:
            raise ValueError(f"m_block, n_block and k_unroll must be positive, got {self.m_block}, "
                             f"{self.n_block}, {self.k_unroll}")
        if self.bf16_dot and not toolchain.runs_bf16_dot(self.isa):
            raise ValueError(f"bf16_dot needs the avx512 ISA on a host with avx512_bf16, got isa {self.isa!r}"
                             f" on a CPU with{'' if 'avx512_bf16' in toolchain.host_flags() else 'out'} "
                             "avx512_bf16")
        te, ts = self.transpose_tile
        if te < 1 or ts < 1:
            raise ValueError(f"transpose_tile must be positive, got {self.transpose_tile}")
        if self.schedule.k_layout == "materialized" and self.schedule.kv_tile % ts:
            raise ValueError(f"transpose_tile {self.transpose_tile}: its key extent must divide kv_tile "
                             f"{self.schedule.kv_tile}")

    def own_name(self):
        # the host is the machine, the transpose tile follows from the head dim
        return [self.isa + ("bf16" if self.bf16_dot else ""), f"m{self.m_block}n{self.n_block}"]


class CpuTarget(Target):
    name = "cpu"
    device_type = "cpu"
    binary_suffix = ".so"

    def length_class(self, size: ProblemSize, spec: AttentionSpec, arch: Optional[str] = None) -> str:
        """"decode" (one query row: rows are the packed query heads of a key/value head),
        "short" (at most READ_K_IN_PLACE_ROWS query rows per key/value head: K read in place;
        a backward's smaller tiles, one query row included) or "long" (K^T materialized once
        per key/value head; every training forward)."""
        if spec.kernel == "forward_lse":
            return "long"  # one schedule for every length (see _schedule): one kernel, not three
        if size.q_len == 1 and spec.kernel != "backward":
            return "decode"
        return "short" if size.q_len * spec.group <= READ_K_IN_PLACE_ROWS else "long"

    def default_options(self, spec: AttentionSpec, arch: Optional[str]) -> CpuOptions:
        if arch is not None:
            raise ValueError(f"the cpu target compiles for this machine's CPU, not for {arch!r}")
        host = toolchain.host_cpu()
        isa = toolchain.host_isa(knobs.cpu_isa())
        m_block, n_block = register_tile(isa, 64 if spec.dtype == "float64" else 32)
        return CpuOptions(schedule=self._schedule(spec), cpu=host["cpu"], cpu_flags=host["flags"],
                          isa=isa.name, m_block=m_block, n_block=n_block, k_unroll=K_UNROLL[isa.name],
                          bf16_dot=spec.dtype == "bfloat16" and toolchain.runs_bf16_dot(isa.name),
                          transpose_tile=(_largest_divisor(spec.head_dim, 16), 16))

    @staticmethod
    def _schedule(spec: AttentionSpec) -> ScheduleOptions:
        if spec.kernel == "backward":
            # K^T and V^T made once, and work-groups of a whole key/value head: the scores and dP
            # of each tile pair computed once (B * H work-groups fill a CPU's threads)
            rows, keys = SHORT_BACKWARD_TILES if spec.length_class == "short" else (ROW_TILE, KV_TILE)
            # Delta as one FMA chain over the value columns, the order in which the micro-kernel
            # sums dP: exact 0 in dS where a row sees one key
            return ScheduleOptions(row_tile=rows, kv_tile=keys, k_layout="materialized", tail=TAIL,
                                   backward_dq=BACKWARD_DQ, backward_delta="chain")
        if spec.kernel == "forward_lse" or spec.length_class == "long":
            # The training forward computes its scores as the backward recomputes them (K^T
            # materialized: each score one FMA chain over the head dim, in the same order), so
            # the backward's probabilities are the forward's to the bit where a row peaks.
            return ScheduleOptions(row_tile=ROW_TILE, kv_tile=KV_TILE, k_layout="materialized", tail=TAIL)
        if spec.length_class == "decode":
            return ScheduleOptions(row_tile=1, kv_tile=KV_TILE, pack_gqa=True, tail=TAIL)
        if spec.length_class == "short":
            return ScheduleOptions(row_tile=SHORT_ROW_TILE, kv_tile=KV_TILE, tail=TAIL)
        raise ValueError(f"the cpu target has no length class {spec.length_class!r}")

    def stage_names(self) -> Sequence[str]:
        return ("cpu-grid", "cpu-vector", "cpu-llvm")

    def stages(self) -> Sequence[Stage]:
        from . import grid, lowering
        return (("cpu-grid", grid.outline_grids),
                ("cpu-vector", lowering.lower_vector_ops),
                ("cpu-llvm", lowering.lower_to_llvm))

    def emit(self, module, spec: AttentionSpec, options: CpuOptions,
             keep_dir: str = "") -> KernelArtifact:
        from . import grid
        metadata = grid.kernel_metadata(module)
        metadata["operands"] = [{"name": name, "dims": list(dims), "dtype": dtype}
                                for name, dims, dtype in spec.operands()]
        binary = toolchain.llvm_dialect_to_shared_library(str(module), toolchain.isa_named(options.isa),
                                                          keep_dir=keep_dir)
        return KernelArtifact(binary=binary, metadata=metadata)

    def load(self, binary_path: str, metadata: Dict) -> Kernel:
        from ...runtime.cpu import CpuKernel
        return CpuKernel(binary_path, metadata)

    def toolchain(self) -> Optional[Dict[str, str]]:
        return toolchain.identity()

    def loaded_modules(self) -> int:
        from ...runtime.cpu import loaded_modules
        return loaded_modules()


CPU = register(CpuTarget())
