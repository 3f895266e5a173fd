"""Compilation targets.  Each registers itself; `get_target(name)` returns it."""

from .base import KernelArtifact, Target, get_target, register, registered, target_for_device
from . import cpu, nvvm, xegpu  # noqa: F401  (register the targets)

__all__ = ["KernelArtifact", "Target", "get_target", "register", "registered", "target_for_device"]
