"""The JIT cache: compile once per spec and target, in memory and on disk.

Memory: spec -> loaded kernel, at most XEGPU_ATTN_MEMORY_CACHE kernels (least
recently used evicted; a kernel leaving it also leaves the C++ table of
recorded calls).  A hit costs one dict lookup and builds no IR; a recorded call
(csrc/op.cpp) does not even reach this cache.

Disk (XEGPU_ATTN_CACHE_DIR): one entry per key, two files

    <key><suffix>   the binary (a .so for the cpu target)
    <key>.json      what loading needs (launch metadata), plus the SHA-256 of the
                    binary and of that metadata

where key = <kernel>-<tools>: `kernel` is the SHA-256 of what the kernel is (spec,
the target's options: schedule, knobs and the machine it is for; the SHA-256 of
this package's own sources; the cache format), `tools` that of the target's
toolchain identity (Target.toolchain: the versions of the compilers that make
it).  A machine with the toolchain takes only entries its own tools made; one
without it (running precompiled kernels) takes the most recently used intact
entry of the kernel, whichever tools made it.
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
from typing import Dict, List, Optional

from . import _C, knobs
from .compiler import LOGGER, CompilationStopped, compile_spec, dump_folder_name, precompile_hint
from .errors import KernelNotAvailable
from .spec import AttentionSpec
from .targets import get_target, registered

CACHE_FORMAT = 4
#: where the digest of the toolchain's identity starts in a key ("<kernel>-<tools>").
KERNEL_DIGITS, TOOLS_DIGITS = 48, 16

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


def kernel_key(spec: AttentionSpec, arch: Optional[str] = None) -> str:
    """The first part of a spec's entry name: everything that makes the kernel what it is but
    the tools that compile it.  The target's options (schedule, knobs, the machine) are in it:
    a change of options never loads a binary built with others."""
    options = get_target(spec.target).options_for(spec, arch)
    material = {"format": CACHE_FORMAT, "spec": spec.to_json(), "options": options.to_json(),
                "sources": source_fingerprint()}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:KERNEL_DIGITS]


def tools_key(identity: Dict[str, str]) -> str:
    """The second part of an entry name: the digest of a toolchain's identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:TOOLS_DIGITS]


def entry_key(spec: AttentionSpec, arch: Optional[str] = None) -> str:
    """The name of the disk entry this machine's toolchain makes for `spec`; raises
    KernelNotAvailable where the target's toolchain is not here."""
    identity = get_target(spec.target).toolchain()
    if identity is None:
        raise KernelNotAvailable(f"the {spec.target} target's toolchain is not here: no entry of its own to "
                                 f"name ({precompile_hint(spec)})")
    return f"{kernel_key(spec, arch)}-{tools_key(identity)}"


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


#: the files of a cache entry ("<kernel>-<tools>" digests) and temporaries of writes in flight.
ENTRY_FILE = re.compile(rf"^([0-9a-f]{{{KERNEL_DIGITS}}}-[0-9a-f]{{{TOOLS_DIGITS}}})(\.[A-Za-z0-9]+)$")
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
        # The knobs that choose the kernel (XEGPU_ATTN_SCHEDULE, XEGPU_ATTN_CPU_ISA) and the
        # emulation (XEGPU_ATTN_EMULATE) may change between calls: they key too.
        key = (spec, knobs.kernel_choice(), knobs.emulate())
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
                self._bound_memory(limit, keep=key)
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
            for name in registered():
                get_target(name).clear_recorded()

    def memory_entries(self) -> int:
        return len(self._memory)

    def specs(self):
        """The specs of the kernels in the memory cache."""
        with self._lock:
            return [key[0] for key in self._memory]

    def _bound_memory(self, limit: int, keep) -> None:
        """Evict least recently used kernels beyond `limit` (XEGPU_ATTN_MEMORY_CACHE; lock held),
        never `keep`: the kernel just loaded, which has not run yet (its use time is the oldest)
        and which its caller is about to launch and record."""
        while len(self._memory) > max(limit, 1):
            # Replays bypass this dict: the kernels' own use times order them.
            victim = min((k for k in self._memory if k != keep), key=lambda k: self._memory[k].last_use())
            self._memory.pop(victim).forget()
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
        identity = target.toolchain()
        kernel_name = kernel_key(spec)
        use_disk = knobs.disk_cache_enabled()
        folder = knobs.cache_dir()
        max_bytes = knobs.cache_max_bytes() if use_disk else 0  # a bad bound fails before any work
        if use_disk:
            keys = [f"{kernel_name}-{tools_key(identity)}"] if identity is not None else \
                self._any_tools(folder, kernel_name)
            with _locked(folder, exclusive=False):
                for key in keys:
                    kernel = self._try_load(target, key, *self._paths(folder, key, target))
                    if kernel is not None:
                        STATS["disk_hits"] += 1
                        LOGGER.debug("disk cache hit for %s (%s)", spec.short_name(), key[:12])
                        return kernel, False
        artifact = compile_spec(spec)  # without the toolchain: raises KernelNotAvailable
        key = f"{kernel_name}-{tools_key(identity)}"
        dump = knobs.dump_ir_dir()
        if dump:
            self._dumped.add((spec, target.options_for(spec), dump))
        record = self._record(spec, key, artifact, identity, target.options_for(spec))
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
    def _any_tools(folder: str, kernel_name: str) -> List[str]:
        """The entries of a kernel made by any toolchain, most recently used first (a machine
        without the toolchain runs what a compiling machine made)."""
        found = [e for e in disk_entries(folder) if e["key"].startswith(kernel_name + "-")]
        return [e["key"] for e in reversed(found)]

    @staticmethod
    def _record(spec: AttentionSpec, key: str, artifact, identity: Dict[str, str], options) -> Dict:
        return {
            "key": key,
            "spec": json.loads(spec.to_json()),
            "options": json.loads(options.to_json()),
            "toolchain": identity,
            "binary_sha256": hashlib.sha256(artifact.binary).hexdigest(),
            "metadata_sha256": _metadata_digest(artifact.metadata),
            "metadata": artifact.metadata,
        }

    def precompile(self, spec: AttentionSpec, arch: Optional[str] = None) -> str:
        """Compile `spec` for the machine `arch` names (None: this one) into the disk cache
        without loading it (the machine that will run it may be another one: a GPU node without
        the compiler); returns the entry's key.  An intact entry already there is kept."""
        target = get_target(spec.target)
        key = entry_key(spec, arch)
        folder = knobs.cache_dir()
        binary_path, meta_path = self._paths(folder, key, target)
        if self._intact(key, binary_path, meta_path) is not None:
            return key
        options = target.options_for(spec, arch)
        artifact = compile_spec(spec, options=options)
        record = self._record(spec, key, artifact, target.toolchain(), options)
        os.makedirs(folder, exist_ok=True)
        with _locked(folder, exclusive=True):
            self._write_entry(folder, key, target, artifact.binary, record)
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
    targets = [get_target(name) for name in registered()]
    merged["recorded_signatures"] = native["recipes"] + sum(t.recorded_signatures() for t in targets)
    merged["loaded_modules"] = sum(t.loaded_modules() for t in targets)
    return merged


CACHE = KernelCache()
