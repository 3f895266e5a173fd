"""The package's own exception types (importable without MLIR)."""

from __future__ import annotations


class CompileError(RuntimeError):
    """The compiler met IR it does not know how to handle (a bug, or an unsupported case)."""


class KernelNotAvailable(RuntimeError):
    """A call needs a kernel that is neither in the cache nor compilable here (no MLIR, no
    toolchain for the target).  The message names the spec and the command that precompiles it."""
