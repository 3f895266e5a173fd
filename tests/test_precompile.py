"""Kernels compiled on one machine, run on another without MLIR (a GPU node's workflow).

The package must import without MLIR, say which command precompiles a kernel it
cannot find, and run kernels that `precompile()` (or the `precompile` command)
put into a carried cache directory.  The cpu target stands in for the GPU: the
child processes block every `mlir` import.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_xegpu_attn
from torch_xegpu_attn.targets import get_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process in which `import mlir` fails, as on the GPU machine.
WITHOUT_MLIR = textwrap.dedent("""
    import importlib.abc, sys
    class NoMlir(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mlir" or name.startswith("mlir."):
                raise ImportError(f"no MLIR on this machine ({name})")
    sys.meta_path.insert(0, NoMlir())
    import torch, torch_xegpu_attn
    from conftest import reference_attention
    torch.manual_seed(int(sys.argv[1]))
    q, k, v = (torch.randn(2, 3, n, 32) for n in (40, 90, 90))
    try:
        out = torch_xegpu_attn.attention(q, k, v, is_causal=True)
    except torch_xegpu_attn.errors.KernelNotAvailable as error:
        print("NOT AVAILABLE:", error)
        sys.exit(3)
    assert "mlir" not in sys.modules
    err = (out.double() - reference_attention(q, k, v, is_causal=True)).abs().max().item()
    print("ERROR", err)
""")


def run_without_mlir(cache_dir, seed: int):
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", WITHOUT_MLIR, str(seed)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_without_mlir_a_missing_kernel_names_the_precompile_command(tmp_path, fresh_seed):
    done = run_without_mlir(tmp_path, fresh_seed)
    assert done.returncode == 3, done.stderr
    assert "python -m torch_xegpu_attn precompile --target cpu" in done.stdout
    assert "--causal" in done.stdout and "--head-dim 32" in done.stdout


def test_without_mlir_a_precompiled_kernel_runs(tmp_path, monkeypatch, fresh_seed):
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(tmp_path))
    q = torch.empty(7, 5, 40, 32, device="meta")  # other sizes than the child's: run-time dims
    k = torch.empty(7, 5, 90, 32, device="meta")
    key = torch_xegpu_attn.precompile(q, k, k, is_causal=True, target="cpu")
    assert any(name.startswith(key) for name in os.listdir(tmp_path))
    assert torch_xegpu_attn.precompile(q, k, k, is_causal=True, target="cpu") == key  # kept, not rebuilt
    done = run_without_mlir(tmp_path, fresh_seed)
    assert done.returncode == 0, done.stdout + done.stderr
    err = float(re.search(r"ERROR (\S+)", done.stdout).group(1))
    assert err < 1e-5


def test_precompile_command_fills_the_cache_for_a_length_class(tmp_path):
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "torch_xegpu_attn", "precompile", "--target", "cpu",
                           "--head-dim", "32", "--length-class", "short", "--dtype", "float32", "--causal"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "in the disk cache" in done.stdout
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".json")]) == 1


@pytest.mark.parametrize("args,message", [
    (["--target", "cpu", "--head-dim", "32", "--length-class", "short", "--arch", "sm_90a"], "compiles for this machine"),
    (["--target", "cpu", "--head-dim", "32"], "--length-class"),
    (["--target", "nvvm", "--head-dim", "64", "--length-class", "prefill", "--dtype", "float64"], "float64"),
    (["--target", "nvvm", "--head-dim", "72", "--length-class", "prefill"], "multiples of 16"),
])
def test_precompile_command_mistakes_are_one_line_errors(tmp_path, args, message):
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "torch_xegpu_attn", "precompile", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not os.listdir(tmp_path)


def test_precompile_function_checks_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(tmp_path))
    q = torch.empty(1, 2, 64, 64, device="meta")
    with pytest.raises(ValueError, match="compiles for this machine"):
        torch_xegpu_attn.precompile(q, q, q, target="cpu", arch="sm_90a")
    with pytest.raises(NotImplementedError, match="float64 is not implemented"):
        torch_xegpu_attn.precompile(*[q.double()] * 3, target="nvvm")
    with pytest.raises(NotImplementedError, match="does not exist"):
        torch_xegpu_attn.precompile(q, q, q, target="tpu")
    assert torch_xegpu_attn.precompile(q[:, :, :0], q, q, target="cpu") is None  # empty result: no kernel
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(not get_target("nvvm").available()[0], reason="no ptxas")
def test_precompile_for_a_gpu_from_meta_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(tmp_path))
    q = torch.empty(4, 16, 4096, 128, dtype=torch.bfloat16, device="meta")
    key = torch_xegpu_attn.precompile(q, q, q, is_causal=True, target="nvvm", arch="sm_90a")
    record = next(n for n in os.listdir(tmp_path) if n.startswith(key) and n.endswith(".json"))
    text = open(os.path.join(tmp_path, record)).read()
    assert '"arch": "sm_90a"' in text
    assert any(n.startswith(key) and n.endswith(".cubin") for n in os.listdir(tmp_path))


@pytest.mark.skipif(not get_target("nvvm").available()[0], reason="no ptxas")
def test_a_new_ptxas_names_a_new_entry(tmp_path, monkeypatch):
    """nvvm's toolchain identity includes ptxas' version: precompiling with another ptxas makes
    another entry (and its record names the version)."""
    from torch_xegpu_attn.targets.nvvm import toolchain
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(tmp_path))
    q = torch.empty(1, 2, 128, 64, dtype=torch.float16, device="meta")
    key = torch_xegpu_attn.precompile(q, q, q, target="nvvm", arch="sm_90a")
    monkeypatch.setattr(toolchain, "ptxas_version", lambda: "99.9")
    newer = torch_xegpu_attn.precompile(q, q, q, target="nvvm", arch="sm_90a")
    assert newer != key and newer.split("-")[0] == key.split("-")[0]
    record = open(os.path.join(tmp_path, newer + ".json")).read()
    assert '"ptxas": "99.9"' in record
