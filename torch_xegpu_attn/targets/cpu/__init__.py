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

from ...schedule.options import ScheduleOptions
from ...spec import AttentionSpec, ProblemSize
from ..base import Kernel, KernelArtifact, Stage, Target, TargetOptions, register
from . import toolchain

#: rows per work-group; with 64-column chunks the micro-kernel keeps
#: ROW_TILE * 64 / 16 = 16 accumulator registers (AVX-512 has 32).
ROW_TILE = 4
#: how key tails are handled: "mask" and "peel" measured within noise of each
#: other on every benchmark row, tails included (README); "mask" is one loop.
TAIL = "mask"
#: keys per flash step, and the column chunk of the micro-kernel (f64 lanes are twice as
#: wide: half the columns keep the same 16 accumulator registers).
KV_TILE = 64
N_BLOCK = 64
N_BLOCK_F64 = 32

#: query rows per key/value head (L * G) up to which K is read in place by
#: dot products instead of being transposed once into a workspace: with so few
#: rows the transpose pass costs more than it saves.
READ_K_IN_PLACE_ROWS = 128


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


@dataclass(frozen=True)
class CpuOptions(TargetOptions):
    """The cpu target's options.

    cpu, cpu_flags   the host CPU the code is tuned for (llc -mcpu=native): its model and a
                     hash of its feature flags (/proc/cpuinfo)
    transpose_tile   (e, s): a K^T workspace is filled by transposes of (s x e) tiles that
                     fit the registers (cpu-vector splits the schedule's whole-tile ones)
    """

    cpu: str = ""
    cpu_flags: str = ""
    transpose_tile: Tuple[int, int] = (16, 16)

    def __post_init__(self) -> None:
        te, ts = self.transpose_tile
        if te < 1 or ts < 1:
            raise ValueError(f"transpose_tile must be positive, got {self.transpose_tile}")
        if self.schedule.k_layout == "materialized" and self.schedule.kv_tile % ts:
            raise ValueError(f"transpose_tile {self.transpose_tile}: its key extent must divide kv_tile "
                             f"{self.schedule.kv_tile}")

    def own_name(self):
        return []  # the host is the machine, the transpose tile follows from the head dim


class CpuTarget(Target):
    name = "cpu"
    device_type = "cpu"
    binary_suffix = ".so"

    def length_class(self, size: ProblemSize, spec: AttentionSpec, arch: Optional[str] = None) -> str:
        """"decode" (one query row: rows are the packed query heads of a key/value head),
        "short" (at most READ_K_IN_PLACE_ROWS query rows per key/value head: K read in place)
        or "long" (K^T materialized once per key/value head)."""
        if size.q_len == 1:
            return "decode"
        return "short" if size.q_len * spec.group <= READ_K_IN_PLACE_ROWS else "long"

    def default_options(self, spec: AttentionSpec, arch: Optional[str]) -> CpuOptions:
        if arch is not None:
            raise ValueError(f"the cpu target compiles for this machine's CPU, not for {arch!r}")
        host = toolchain.host_cpu()
        return CpuOptions(schedule=self._schedule(spec), cpu=host["cpu"], cpu_flags=host["flags"],
                          transpose_tile=(_largest_divisor(spec.head_dim, 16), 16))

    @staticmethod
    def _schedule(spec: AttentionSpec) -> ScheduleOptions:
        if spec.length_class == "decode":
            return ScheduleOptions(row_tile=1, kv_tile=KV_TILE, pack_gqa=True, tail=TAIL)
        if spec.length_class == "short":
            return ScheduleOptions(row_tile=ROW_TILE, kv_tile=KV_TILE, tail=TAIL)
        if spec.length_class == "long":
            return ScheduleOptions(row_tile=ROW_TILE, kv_tile=KV_TILE, k_layout="materialized", tail=TAIL)
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
        binary = toolchain.llvm_dialect_to_shared_library(str(module), keep_dir=keep_dir)
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
