"""Compilation targets.  Each registers itself; `get_target(name)` returns it."""

from .base import KernelArtifact, Target, get_target, register, registered, target_for_device
from . import cpu  # noqa: F401  (registers the cpu target)

__all__ = ["KernelArtifact", "Target", "get_target", "register", "registered", "target_for_device"]
