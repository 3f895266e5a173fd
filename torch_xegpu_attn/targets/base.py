"""The interface every target implements.  Targets are peers; the compiler only sees this.

A target module imports MLIR only inside its stages and `emit`: the registry,
length classes, options, fingerprints and loaders serve a machine that runs
precompiled kernels without the compiler.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .. import knobs
from ..schedule.options import ScheduleOptions
from ..spec import TARGET_DEVICES, AttentionSpec, ProblemSize

#: A stage maps IR to IR: fn(module, spec, options) -> module (an mlir.ir.Module, usually the same object).
Stage = Tuple[str, Callable[[Any, AttentionSpec, ScheduleOptions], Any]]


@dataclass
class KernelArtifact:
    """What compiling one spec for one target yields: a binary and what launching it needs."""

    binary: bytes
    metadata: Dict = field(default_factory=dict)


class Target(abc.ABC):
    """A compilation target: its stages after the shared schedule, its binary, its launcher."""

    #: target name used in specs ("cpu", "nvvm", "xegpu").
    name: str = ""
    #: torch device type whose tensors this target serves.
    device_type: str = ""
    #: file suffix of the binary in the disk cache.
    binary_suffix: str = ".bin"

    def length_class(self, size: ProblemSize, spec: AttentionSpec) -> str:
        """The coarse length class of a problem (AttentionSpec.length_class) whose spec, but for
        its class, is `spec`: a target that wants different tiles for short and long problems
        says so here (only for the specs whose tiles do change, so that no two classes build the
        same kernel); one class by default."""
        return "any"

    def classified(self, spec: AttentionSpec, size: ProblemSize) -> AttentionSpec:
        """`spec` in the length class this target gives a problem of `size`: the spec of the
        kernel that problem runs."""
        return dataclasses.replace(spec, length_class=self.length_class(size, spec))

    @abc.abstractmethod
    def schedule_options(self, spec: AttentionSpec) -> ScheduleOptions:
        """Tile sizes and choices of the shared schedule for `spec` on this target."""

    def options_for(self, spec: AttentionSpec) -> ScheduleOptions:
        """The ScheduleOptions a kernel of `spec` is built with: the target's choice, with the
        fields of XEGPU_ATTN_SCHEDULE (if set) overriding it."""
        options = self.schedule_options(spec)
        overrides = knobs.schedule_overrides()
        if overrides:
            unknown = set(overrides) - {f.name for f in dataclasses.fields(ScheduleOptions)}
            if unknown:
                raise knobs.KnobError(f"XEGPU_ATTN_SCHEDULE: unknown ScheduleOptions fields {sorted(unknown)}")
            try:
                options = dataclasses.replace(options, **overrides)
            except (TypeError, ValueError) as error:
                raise knobs.KnobError(f"XEGPU_ATTN_SCHEDULE: {error}") from None
        return options

    def check(self, spec: AttentionSpec) -> None:
        """Raise NotImplementedError (saying what to change) for a spec the target does not take;
        the frontend calls it before any compile."""

    @abc.abstractmethod
    def stage_names(self) -> Sequence[str]:
        """The names of the target's IR stages (without importing them)."""

    @abc.abstractmethod
    def stages(self) -> Sequence[Stage]:
        """The target's IR stages, run after the shared ones (imports the compiler)."""

    @abc.abstractmethod
    def emit(self, module, spec: AttentionSpec, options: ScheduleOptions,
             keep_dir: str = "") -> KernelArtifact:
        """Turn the last stage's IR into a binary plus launch metadata.

        `keep_dir`, when set, receives the target's intermediate files (the IR dump directory).
        """

    @abc.abstractmethod
    def load(self, binary_path: str, metadata: Dict):
        """Load a binary written to disk; return a callable launcher."""

    @abc.abstractmethod
    def fingerprint(self) -> Dict[str, str]:
        """What about the machine and toolchain changes this target's binaries (for the cache key)."""

    def prepare(self) -> None:
        """Make the launcher usable (called before the first kernel of the target is loaded)."""

    def available(self) -> Tuple[bool, str]:
        """Whether this target can compile here, and why not."""
        return True, ""


#: the input dtypes of the GPU targets' matrix engines (f32 accumulation).
MATRIX_ENGINE_DTYPES = ("float16", "bfloat16")


def require_matrix_engine_dtype(spec: AttentionSpec, target: str, engine: str) -> None:
    """Raise NotImplementedError for a spec whose inputs a GPU target's matrix engine (`engine`:
    tensor cores, DPAS) does not take, saying what to do instead."""
    if spec.dtype not in MATRIX_ENGINE_DTYPES:
        raise NotImplementedError(
            f"the {target} target computes on {engine} with float16 and bfloat16 inputs; {spec.dtype} would need "
            f"tf32 (less accurate than float32) or math without the {engine}, neither is implemented: cast the "
            f"inputs to float16 or bfloat16")


_REGISTRY: Dict[str, Target] = {}


def register(target: Target) -> Target:
    if TARGET_DEVICES.get(target.name) != target.device_type:
        raise ValueError(f"target {target.name!r} for {target.device_type} tensors is not in spec.TARGET_DEVICES")
    _REGISTRY[target.name] = target
    return target


def get_target(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in TARGET_DEVICES:
            why = f"is not implemented yet ({TARGET_DEVICES[name]} tensors)"
        else:
            why = "does not exist"
        raise NotImplementedError(f"the {name!r} target {why}; available: {sorted(_REGISTRY)}") from None


def target_for_device(device_type: str) -> str:
    """Name of the target that serves tensors of `device_type` (implemented or planned)."""
    for name, device in TARGET_DEVICES.items():
        if device == device_type:
            return name
    served = sorted(TARGET_DEVICES.values())
    raise NotImplementedError(f"xegpu::attention has no target for {device_type} tensors (devices: {served})")


def registered() -> List[str]:
    return sorted(_REGISTRY)
