"""The package's C++ extension `_C` (the op's schema, its CPU and autograd kernels, the replay
fast path): the one `pip install` / setup.sh built, or else one built now from its sources.

The C++ sources are package data (torch_xegpu_attn/csrc/: a wheel or an install carries them):
the CUDA and XPU launchers are always built from them at their first use, on the machine
that has the device, and so is `_C` where the installed one does not load.

A wheel or editable install builds `_C` against the torch of its environment.  A machine that
runs the package from a copied source tree (a GPU node that gets the package and a cache of
precompiled kernels, without MLIR or a build step) has no `_C` for its own Python and torch, or
one built for another: there it is compiled once with torch.utils.cpp_extension into the cache
directory (keyed by the sources and the torch version) and reused by later processes.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

from . import knobs

_SOURCES = ("cpu_launcher.cpp", "op.cpp")
_HEADERS = ("kernel.h", "replay.h")


def csrc_paths(names) -> list:
    """Paths of files in the package's csrc/ (installed with it as package data)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    return [os.path.join(folder, name) for name in names]


def existing_sources(names, what: str) -> list:
    """csrc_paths(names), all of which must exist: `what` (e.g. "the CUDA launcher") cannot be
    built otherwise."""
    paths = csrc_paths(names)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"torch_xegpu_attn: the sources of {what} are missing ({', '.join(missing)}); "
                           f"reinstall the package")
    return paths


def build_extension(prefix: str, sources, headers=(), **load_options):
    """Compile `sources` with torch.utils.cpp_extension for this Python and torch, once per
    machine: the build folder in the cache directory is named by a hash of the sources, the
    headers, Python's and torch's versions, so a later process (or a changed source) finds
    or rebuilds it."""
    import torch
    from torch.utils import cpp_extension
    digest = hashlib.sha256(torch.__version__.encode() + sys.version.encode())
    for path in list(sources) + list(headers):
        with open(path, "rb") as f:
            digest.update(f.read())
    tag = digest.hexdigest()[:16]
    build = os.path.join(knobs.cache_dir(), f"{prefix}_{tag}")
    os.makedirs(build, exist_ok=True)
    return cpp_extension.load(name=f"torch_xegpu_attn_{prefix}_{tag}", sources=list(sources),
                              build_directory=build, verbose=knobs.log_compilations(), **load_options)


def _build_from_source(reason: Exception):
    """Compile csrc/ into an extension for this Python and torch (once per machine)."""
    try:
        sources, headers = existing_sources(_SOURCES, "_C"), existing_sources(_HEADERS, "_C")
    except RuntimeError as missing:
        raise ImportError(f"torch_xegpu_attn: the C++ extension _C does not load ({reason}) and cannot be "
                          f"built here: {missing}") from reason
    return build_extension("C", sources, headers, extra_cflags=["-O2", "-fopenmp"], extra_ldflags=["-fopenmp"])


def load():
    """`torch_xegpu_attn._C`, installed as that module name whichever way it was obtained."""
    name = __package__ + "._C"
    if name in sys.modules:
        return sys.modules[name]
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # absent, or built for another Python / torch (undefined symbols)
        module = _build_from_source(error)
        sys.modules[name] = module
    return module
