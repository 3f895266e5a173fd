"""The interface every target implements.  Targets are peers; the compiler only sees this."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

from mlir import ir

from ..schedule.options import ScheduleOptions
from ..spec import AttentionSpec

#: A stage maps IR to IR: fn(module, spec, options) -> module (usually the same object).
Stage = Tuple[str, Callable[[ir.Module, AttentionSpec, ScheduleOptions], ir.Module]]


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

    @abc.abstractmethod
    def schedule_options(self, spec: AttentionSpec) -> ScheduleOptions:
        """Tile sizes and choices of the shared schedule for `spec` on this target."""

    @abc.abstractmethod
    def stages(self) -> Sequence[Stage]:
        """The target's IR stages, run after the shared ones."""

    @abc.abstractmethod
    def emit(self, module: ir.Module, spec: AttentionSpec, options: ScheduleOptions,
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

    def available(self) -> Tuple[bool, str]:
        """Whether this target can compile here, and why not."""
        return True, ""


_REGISTRY: Dict[str, Target] = {}

#: targets designed but not implemented yet: torch device type -> target name.
PLANNED = {"cuda": "nvvm", "xpu": "xegpu"}


def register(target: Target) -> Target:
    _REGISTRY[target.name] = target
    return target


def get_target(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        planned = [device for device, target in PLANNED.items() if target == name]
        why = f"is not implemented yet ({planned[0]} tensors)" if planned else "does not exist"
        raise NotImplementedError(f"the {name!r} target {why}; available: {sorted(_REGISTRY)}") from None


def target_for_device(device_type: str) -> str:
    """Name of the target that serves tensors of `device_type`."""
    for target in _REGISTRY.values():
        if target.device_type == device_type:
            return target.name
    if device_type in PLANNED:
        return PLANNED[device_type]
    served = sorted({t.device_type for t in _REGISTRY.values()} | set(PLANNED))
    raise NotImplementedError(f"xegpu::attention has no target for {device_type} tensors (devices: {served})")


def registered() -> List[str]:
    return sorted(_REGISTRY)
