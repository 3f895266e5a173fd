"""Bounded caches, IR dumps on cache hits, compile logging and temporary directories.

- disk: at most XEGPU_ATTN_CACHE_MAX_MB, least recently used entries evicted
  (a disk hit counts as a use), also with processes writing at the same time;
- memory: at most XEGPU_ATTN_MEMORY_CACHE kernels, least recently used
  evicted (replays of recorded calls count as uses), and an evicted kernel's
  recorded calls go with it, and its library (closed once nothing refers to
  the kernel): the bound bounds the loaded libraries too;
- XEGPU_ATTN_DUMP_IR writes the IR of a kernel that came from the memory or the
  disk cache, and says so;
- each compilation is logged (spec, target, seconds per stage) on the
  "torch_xegpu_attn" logger, silent by default, on stderr with XEGPU_ATTN_LOG=1;
- no xegpu_attn_* directory is left in the temp directory by a process, nor by
  a test session.
"""

import logging
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import torch_xegpu_attn
from torch_xegpu_attn import cache
from torch_xegpu_attn.cache import CACHE
from torch_xegpu_attn.compiler import COUNTERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(head_dim: int, scale=None):
    """One call of a spec of its own (head dim and scale pick it), checked against SDPA."""
    q, k, v = (torch.randn(1, 2, 16, head_dim) for _ in range(3))
    out = torch_xegpu_attn.attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale), rtol=1e-5, atol=1e-5)
    return q, k, v


def entry_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if cache.ENTRY_FILE.match(p.name))


def entries(folder):
    return {e["key"] for e in cache.disk_entries(str(folder))}


# ----------------------------------------------------------------------------- disk bound


def test_disk_cache_evicts_least_recently_used(cache_dir, monkeypatch, fresh_seed):
    # Three specs that differ only in their scale: entries of (nearly) the same size.
    keys = {}
    run(16, 0.1)
    entry = entry_bytes(cache_dir)
    monkeypatch.setenv("XEGPU_ATTN_CACHE_MAX_MB", str(2.5 * entry / 1024 / 1024))  # two entries fit
    keys[0.1] = entries(cache_dir).pop()
    time.sleep(0.02)
    run(16, 0.2)
    keys[0.2] = (entries(cache_dir) - {keys[0.1]}).pop()
    time.sleep(0.02)
    CACHE.clear_memory()
    before = cache.stats()
    run(16, 0.1)  # a disk hit: 0.1 is now more recently used than 0.2
    assert cache.stats()["disk_hits"] == before["disk_hits"] + 1
    time.sleep(0.02)
    run(16, 0.3)  # a third entry: the least recently used one (0.2) goes
    after = cache.stats()
    assert after["disk_evictions"] == before["disk_evictions"] + 1
    left = entries(cache_dir)
    assert keys[0.1] in left and keys[0.2] not in left and len(left) == 2
    assert entry_bytes(cache_dir) <= 2.5 * entry
    CACHE.clear_memory()
    compiled = COUNTERS["compilations"]
    run(16, 0.2)  # evicted: compiled again, and correct
    assert COUNTERS["compilations"] == compiled + 1


CHILD = r"""
import sys, torch, torch.nn.functional as F, torch_xegpu_attn
e = int(sys.argv[1])
q, k, v = (torch.randn(1, 2, 16, e) for _ in range(3))
out = torch_xegpu_attn.attention(q, k, v)
sys.exit(0 if torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5) else 1)
"""


def test_concurrent_writers_with_a_tiny_bound(tmp_path):
    folder = tmp_path / "cache"
    # A bound below one entry: every write evicts every other entry, while other processes
    # are between writing their entry and loading it.
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(folder), XEGPU_ATTN_CACHE_MAX_MB="0.001")
    env.pop("XEGPU_ATTN_DISK_CACHE", None)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(e)], env=env, stderr=subprocess.PIPE, text=True)
                for e in (16, 24, 32, 40)]
    for child in children:
        _, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
    names = [p.name for p in folder.iterdir()]
    assert not [n for n in names if n.startswith(".tmp-")], names
    left = cache.disk_entries(str(folder))
    assert len(left) == 1 and len(left[0]["files"]) == 2, names  # only the last write's entry
    record = cache.read_record(str(folder), left[0]["key"])
    assert record is not None and record["key"] == left[0]["key"]


@pytest.mark.parametrize("knob,value", [("XEGPU_ATTN_CACHE_MAX_MB", "-1"), ("XEGPU_ATTN_CACHE_MAX_MB", "lots"),
                                        ("XEGPU_ATTN_MEMORY_CACHE", "0")])
def test_bad_bound_is_rejected_before_compiling(knob, value, cache_dir, monkeypatch):
    monkeypatch.setenv(knob, value)
    compiled = COUNTERS["compilations"]
    with pytest.raises(ValueError, match=knob):
        run(56)
    assert COUNTERS["compilations"] == compiled


# ----------------------------------------------------------------------------- memory bound


def test_memory_cache_evicts_least_recently_used(cache_dir, monkeypatch, fresh_seed):
    monkeypatch.setenv("XEGPU_ATTN_MEMORY_CACHE", "2")
    a = run(16)
    b = run(24)
    for _ in range(3):
        torch_xegpu_attn.attention(*a)  # replays: 16 is the most recently used
    before = cache.stats()
    run(32)
    after = cache.stats()
    assert CACHE.memory_entries() == 2 and after["memory_evictions"] == before["memory_evictions"] + 1
    torch_xegpu_attn.attention(*a)  # still loaded and recorded: a replay
    assert cache.stats()["replays"] == after["replays"] + 1
    disk_hits = cache.stats()["disk_hits"]
    torch.testing.assert_close(torch_xegpu_attn.attention(*b), F.scaled_dot_product_attention(*b),
                               rtol=1e-5, atol=1e-5)
    assert cache.stats()["disk_hits"] == disk_hits + 1, "the evicted kernel's calls were still recorded"


def test_memory_bound_bounds_loaded_libraries(cache_dir, monkeypatch, fresh_seed):
    from torch_xegpu_attn.runtime import cpu
    monkeypatch.setenv("XEGPU_ATTN_MEMORY_CACHE", "2")
    base = cpu.loaded_modules()
    evictions = cache.stats()["memory_evictions"]
    for n, e in enumerate((16, 24, 32, 40), start=1):
        torch_xegpu_attn.attention(*run(e))  # replayed: a recorded call holds the kernel too
        assert cpu.loaded_modules() == base + min(n, 2), f"after {n} kernels"
    assert cache.stats()["memory_evictions"] == evictions + 2
    assert cache.stats()["loaded_modules"] >= base + 2

    kept = list(CACHE._memory.values())  # referred to from elsewhere: evicted, not closed
    run(48)
    run(56)
    assert cpu.loaded_modules() == base + 4
    del kept  # the last references: closed
    assert cpu.loaded_modules() == base + 2
    CACHE.clear_memory()
    assert cpu.loaded_modules() == base


# ----------------------------------------------------------------------------- dumps on hits


def _dumped(folder):
    (spec_folder,) = list(folder.iterdir())
    return sorted(p.name for p in spec_folder.glob("*.mlir"))


def test_dump_ir_on_memory_and_disk_hits(cache_dir, tmp_path, monkeypatch, caplog, fresh_seed):
    q, k, v = run(16)
    torch_xegpu_attn.attention(q, k, v)  # recorded: the next call would be a replay
    memory_dump, disk_dump = tmp_path / "memory", tmp_path / "disk"
    monkeypatch.setenv("XEGPU_ATTN_DUMP_IR", str(memory_dump))
    with caplog.at_level(logging.INFO, logger="torch_xegpu_attn"):
        out = torch_xegpu_attn.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    stages = [n for n in torch_xegpu_attn.stage_names("cpu") if n != "binary"]
    assert _dumped(memory_dump) == [f"{i:02d}-{n}.mlir" for i, n in enumerate(stages)]
    assert any("came from the cache" in r.getMessage() for r in caplog.records)

    CACHE.clear_memory()
    monkeypatch.setenv("XEGPU_ATTN_DUMP_IR", str(disk_dump))
    hits = cache.stats()["disk_hits"]
    torch_xegpu_attn.attention(q, k, v)
    assert cache.stats()["disk_hits"] == hits + 1
    assert _dumped(disk_dump) == _dumped(memory_dump)


# ----------------------------------------------------------------------------- logging


def test_each_compilation_is_logged(cache_dir, caplog, fresh_seed):
    with caplog.at_level(logging.INFO, logger="torch_xegpu_attn"):
        run(48)
        run(48)  # a hit: nothing compiled, nothing logged
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled ")]
    assert len(compiled) == 1, compiled
    message = compiled[0]
    assert "g1_e48v48_float32_short for cpu" in message
    for stage in torch_xegpu_attn.stage_names("cpu"):
        assert f"{stage} " in message and " ms" in message, message


LOG_CHILD = "import torch, torch_xegpu_attn; q = torch.randn(1, 1, 8, 40); torch_xegpu_attn.attention(q, q, q)"


@pytest.mark.parametrize("knob", ["", "1"])
def test_log_knob(knob, tmp_path):
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(tmp_path / "cache"), XEGPU_ATTN_LOG=knob)
    done = subprocess.run([sys.executable, "-c", LOG_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    logged = [line for line in done.stderr.splitlines() if line.startswith("torch_xegpu_attn: compiled ")]
    if knob:
        assert len(logged) == 1 and "for cpu" in logged[0] and "binary" in logged[0], done.stderr
    else:
        assert done.stderr == "", "silent by default"


# ----------------------------------------------------------------------------- temporary directories


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("xegpu_attn"))


def test_process_leaves_no_temporary_directory(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), XEGPU_ATTN_DISK_CACHE="0")  # kernels in a private dir
    done = subprocess.run([sys.executable, "-c", LOG_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _leftovers(temp) == []


def test_test_session_leaves_no_temporary_directory(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp))
    env.pop("XEGPU_ATTN_CACHE_DIR")  # the session makes its own, as a fresh `pytest` does
    test = "tests/test_compile_counts.py::test_batch_and_heads_are_run_time_too"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed" in done.stdout
    assert _leftovers(temp) == []
