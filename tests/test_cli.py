"""The command line: one-line errors for user mistakes (exit 2), --print alone, compile and the
disk cache, the cache listing and --clear.

Each case runs `python -m torch_xegpu_attn` in a child process with its own
cache directory.
"""

import json
import os
import subprocess
import sys

import pytest

SHAPE = "1,2,10,200,16"


def cli(*args, cache=None, env=None, timeout=300):
    environment = dict(os.environ, **(env or {}))
    if cache is not None:
        environment["XEGPU_ATTN_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "torch_xegpu_attn", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout)


MISTAKES = {
    "mistyped stage": (["compile", "--shape", SHAPE, "--stop-after", "flsh"], "unknown stage 'flsh'"),
    "unknown target": (["compile", "--shape", SHAPE, "--target", "gpu"], "'gpu' target does not exist"),
    "dtype the target does not take": (["compile", "--shape", SHAPE, "--target", "xegpu", "--dtype", "float64"],
                                       "float64 is not implemented"),
    "stages of unknown target": (["stages", "--target", "tpu"], "'tpu' target does not exist"),
    "mask without dims": (["compile", "--shape", SHAPE, "--mask", "bool"], "--mask takes KIND:DIMS"),
    "mask kind": (["compile", "--shape", SHAPE, "--mask", "boolean:ls"], "--mask takes KIND:DIMS"),
    "mask dims out of order": (["compile", "--shape", SHAPE, "--mask", "bool:sl"], "ordered subset"),
    "mask and causal": (["compile", "--shape", SHAPE, "--mask", "bool:ls", "--causal"], "exclude each other"),
    "short shape": (["compile", "--shape", "1,2,10,200"], "--shape takes"),
    "shape not integers": (["compile", "--shape", "1,2,x,200,16"], "--shape takes"),
    "zero in shape": (["compile", "--shape", "1,2,0,200,16"], "positive"),
    "print the binary": (["compile", "--shape", SHAPE, "--print", "--stop-after", "binary"], "not IR"),
    "fill cache and stop": (["compile", "--shape", SHAPE, "--fill-cache", "--stop-after", "flash"],
                            "--fill-cache builds the whole kernel"),
    "dropout out of range": (["compile", "--shape", SHAPE, "--dropout-p", "1.5"], "dropout_p must be in [0, 1]"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_user_mistakes_are_one_line_errors(case, tmp_path):
    args, message = MISTAKES[case]
    done = cli(*args, cache=tmp_path / "cache")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("python -m torch_xegpu_attn: error:") and message in lines[0], lines[0]
    assert not (tmp_path / "cache").exists(), "a rejected command touched the cache"


def test_bad_knob_is_a_one_line_error(tmp_path):
    done = cli("compile", "--shape", SHAPE, cache=tmp_path, env={"XEGPU_ATTN_SCHEDULE": '{"row_tle": 2}'})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "XEGPU_ATTN_SCHEDULE" in done.stderr and "row_tle" in done.stderr


def test_print_alone_prints_the_last_ir_stage(tmp_path):
    done = cli("compile", "--shape", SHAPE, "--print", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "llvm.func @_mlir_ciface_attention_grid0" in done.stdout  # the cpu-llvm stage
    assert "stopped after cpu-llvm" in done.stderr
    explicit = cli("compile", "--shape", SHAPE, "--print", "--stop-after", "flash", cache=tmp_path / "cache")
    assert explicit.returncode == 0 and "attn.flash_loop" in explicit.stdout and "llvm.func" not in explicit.stdout


def test_training_kernels_compile(tmp_path):
    """--kernel backward: the backward's work-group loops (Delta, dQ, dK/dV and the K^T, V^T copies
    on the cpu target), each a function of the kernel."""
    done = cli("compile", "--shape", SHAPE, "--kernel", "backward", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "_backward:" in done.stdout and "attention_grid4" in done.stdout


def test_dropout_kernel_compiles(tmp_path):
    """--dropout-p: the seed operand and the keep threshold p * 2^24 in the flash stage (a kernel
    per probability)."""
    done = cli("compile", "--shape", SHAPE, "--dropout-p", "0.25", "--print", "--stop-after", "flash",
               cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "memref<2xi32>" in done.stdout and f"{2 ** 22}" in done.stdout


def test_compile_bypasses_the_cache_and_says_so(tmp_path):
    cache = tmp_path / "cache"
    done = cli("compile", "--shape", SHAPE, cache=cache)
    assert done.returncode == 0, done.stderr
    assert "neither read nor written" in done.stdout and "--fill-cache" in done.stdout
    assert not cache.exists() or not any(cache.iterdir())


def test_fill_cache_then_list_then_clear(tmp_path):
    cache = tmp_path / "cache"
    first = cli("compile", "--shape", SHAPE, "--fill-cache", cache=cache)
    assert first.returncode == 0 and "written to the disk cache" in first.stdout, first.stderr
    again = cli("compile", "--shape", SHAPE, "--fill-cache", cache=cache)
    assert again.returncode == 0 and "already in the disk cache" in again.stdout, again.stderr
    decode = cli("compile", "--shape", "1,8,1,300,64", "--group", "4", "--mask", "bool:bs", "--fill-cache",
                 cache=cache)
    assert decode.returncode == 0, decode.stderr
    (cache / "notes.txt").write_text("not ours")

    listing = cli("cache", cache=cache)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert "(2 entries" in lines[0] and str(cache) in lines[0]
    assert lines[1].split() == ["key", "spec", "target", "size", "last", "used"]
    rows = [line.split() for line in lines[2:]]
    names = {row[1] for row in rows}
    assert names == {"g1_e16v16_float32_short", "g4_e64v64_float32_boolbs_decode"}, lines
    assert all(row[2] == "cpu" and row[4] == "kB" and row[-1] == "ago" for row in rows), lines
    keys = {p.stem for p in cache.glob("*.json")}
    assert {row[0] for row in rows} == {key[:12] for key in keys}
    for key in keys:  # the listing's names are the records' specs
        record = json.loads((cache / f"{key}.json").read_text())
        assert record["spec"]["target"] == "cpu"

    cleared = cli("cache", "--clear", cache=cache)
    assert cleared.returncode == 0 and "removed 2 entries (4 files)" in cleared.stdout, cleared.stdout
    assert [p.name for p in cache.iterdir()] == ["notes.txt"]
    empty = cli("cache", cache=cache)
    assert "(0 entries" in empty.stdout and len(empty.stdout.splitlines()) == 1


def test_listing_marks_a_damaged_record(tmp_path):
    cache = tmp_path / "cache"
    assert cli("compile", "--shape", SHAPE, "--fill-cache", cache=cache).returncode == 0
    (record,) = cache.glob("*.json")
    record.write_text("{not json")
    listing = cli("cache", cache=cache)
    assert listing.returncode == 0 and "unreadable record" in listing.stdout, listing.stdout
