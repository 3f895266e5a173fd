"""Compilation targets.  Each registers itself; `get_target(name)` returns it."""

from .base import KernelArtifact, Target, get_target, register, registered, target_for_device
from . import cpu, nvvm  # noqa: F401  (register the cpu and nvvm targets)

__all__ = ["KernelArtifact", "Target", "get_target", "register", "registered", "target_for_device"]
