"""Every environment variable the package reads, typed, in one place.

XEGPU_ATTN_CACHE_DIR    disk cache directory
                        (default: $XDG_CACHE_HOME/torch_xegpu_attn, else ~/.cache/torch_xegpu_attn)
XEGPU_ATTN_DISK_CACHE   "0" to neither read nor write the disk cache (default "1")
XEGPU_ATTN_CACHE_MAX_MB the disk cache's size bound in megabytes (default 512): after each write
                        the least recently used entries are removed until it fits
XEGPU_ATTN_MEMORY_CACHE the number of loaded kernels a process keeps (default 256; least recently
                        used evicted)
XEGPU_ATTN_DUMP_IR      directory: write the IR after every compiler stage there
XEGPU_ATTN_STOP_AFTER   stage name: stop compiling after it (raises CompilationStopped)
XEGPU_ATTN_POISON       "1": fill each output with NaN before the kernel runs, so that an
                        element the kernel fails to write shows (for tests; default "0")
XEGPU_ATTN_LOG          "1": log every compilation (spec, options, seconds per stage) to stderr
                        through the "torch_xegpu_attn" logger (default: silent)
XEGPU_ATTN_SCHEDULE     JSON object: fields of ScheduleOptions that override the target's
                        choice for every spec, e.g. '{"row_tile": 16, "tail": "peel"}'
                        (tuning and tests; the options are part of the cache key)
XEGPU_ATTN_EMULATE      "xpu": CPU tensors go through the xegpu target, whose SPIR-V runs on the
                        Intel OpenCL CPU runtime with the Intel-GPU-only builtins emulated
                        (proof of the Intel GPU kernels without one; default: unset).  Set it
                        before the process's first call: CPU calls already recorded for replay
                        keep running on the cpu target
XEGPU_ATTN_CPU_ISA      "avx512", "avx2" or "sse": the vector instruction set the cpu target
                        builds for, one the host runs (default: the widest the host has); the
                        register tiling follows it, and it is part of the cache key

They are read at each use, so tests and tools may set them at run time.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional


class KnobError(ValueError):
    """An environment variable of this package has a value it cannot take."""


def cache_dir() -> str:
    explicit = os.environ.get("XEGPU_ATTN_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "torch_xegpu_attn")


#: the values of a switch that turn it on.
_ON = ("1", "true", "on", "yes")


def _switch(name: str) -> bool:
    """Whether the switch `name` (off unless set) is on."""
    return os.environ.get(name, "0").strip() in _ON


def disk_cache_enabled() -> bool:
    value = os.environ.get("XEGPU_ATTN_DISK_CACHE", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise KnobError(f"XEGPU_ATTN_DISK_CACHE must be 0 or 1, got {value!r}")
    return value in _ON


#: defaults of the cache bounds: a cpu kernel is about 30-60 kB on disk, so 512 MB holds
#: thousands of specs; 256 loaded kernels are a few MB of mapped code.
DEFAULT_CACHE_MAX_MB = 512
DEFAULT_MEMORY_CACHE = 256


def _positive(name: str, default: float, kind=float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise KnobError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return number


def cache_max_bytes() -> int:
    """XEGPU_ATTN_CACHE_MAX_MB in bytes."""
    return int(_positive("XEGPU_ATTN_CACHE_MAX_MB", DEFAULT_CACHE_MAX_MB) * 1024 * 1024)


def memory_cache_entries() -> int:
    return int(_positive("XEGPU_ATTN_MEMORY_CACHE", DEFAULT_MEMORY_CACHE, kind=int))


def dump_ir_dir() -> Optional[str]:
    value = os.environ.get("XEGPU_ATTN_DUMP_IR")
    return os.path.abspath(value) if value else None


def stop_after() -> Optional[str]:
    return os.environ.get("XEGPU_ATTN_STOP_AFTER") or None


def poison_outputs() -> bool:
    return _switch("XEGPU_ATTN_POISON")


def schedule_overrides_text() -> str:
    return os.environ.get("XEGPU_ATTN_SCHEDULE", "")


def schedule_overrides() -> Dict:
    value = schedule_overrides_text().strip()
    if not value:
        return {}
    try:
        overrides = json.loads(value)
    except json.JSONDecodeError as error:
        raise KnobError(f"XEGPU_ATTN_SCHEDULE must be a JSON object, got {value!r} ({error})") from None
    if not isinstance(overrides, dict):
        raise KnobError(f"XEGPU_ATTN_SCHEDULE must be a JSON object, got {value!r}")
    if isinstance(overrides.get("transpose_tile"), list):
        overrides["transpose_tile"] = tuple(overrides["transpose_tile"])
    return overrides


def cpu_isa() -> str:
    """The vector ISA the cpu target is asked to build for (XEGPU_ATTN_CPU_ISA), "" for the host's."""
    return os.environ.get("XEGPU_ATTN_CPU_ISA", "").strip().lower()


def kernel_choice() -> str:
    """The knobs that choose which kernel a spec gets, as one string (csrc/replay.h's
    kernel_choice reads the same): a kernel or a recorded call made under other values is not
    reused."""
    return os.environ.get("XEGPU_ATTN_SCHEDULE", "") + "\n" + os.environ.get("XEGPU_ATTN_CPU_ISA", "")


def log_compilations() -> bool:
    return _switch("XEGPU_ATTN_LOG")


#: the values XEGPU_ATTN_EMULATE takes.
EMULATED_DEVICES = ("xpu",)


def emulate() -> Optional[str]:
    """The device whose kernels CPU tensors run under emulation (XEGPU_ATTN_EMULATE), or None."""
    value = os.environ.get("XEGPU_ATTN_EMULATE", "").strip()
    if not value:
        return None
    if value not in EMULATED_DEVICES:
        raise KnobError(f"XEGPU_ATTN_EMULATE={value!r}: the emulated devices are {EMULATED_DEVICES}")
    return value
