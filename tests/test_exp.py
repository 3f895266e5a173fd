"""The cpu target's exp and exp2 polynomials (targets/cpu/exp.py), f32 and f64, against NumPy.

A small function applies math.exp or math.exp2 to a vector read from a
memref; the rewrite replaces the op, the cpu target's LLVM pipeline lowers it,
and MLIR's execution engine runs it on inputs across the whole range: the
reduced interval, large arguments, the clamped ends (-inf, i.e. a masked score,
must give exactly 0), NaN.  Bounds: a few ulp of relative error where the
result is a normal number up to 2^(bias + 0.5), inf above (documented in
exp.py); results below the smallest normal flush to 0.
"""

import ctypes

import numpy as np
import pytest
from mlir import ir, passmanager
from mlir.execution_engine import ExecutionEngine
from mlir.runtime import get_ranked_memref_descriptor

from torch_xegpu_attn.mlir_utils import mlir_context
from torch_xegpu_attn.targets.cpu.lowering import LLVM_PIPELINE
from torch_xegpu_attn.targets.cpu.exp import expand_exp

N = 512
TYPES = {"f32": np.float32, "f64": np.float64}
#: relative error bound where the result is normal: about 2 ulp of each format.
BOUND = {"f32": 4e-7, "f64": 5e-16}


def run_expansion(op: str, dtype: str, x: np.ndarray) -> np.ndarray:
    text = f"""
    func.func @run(%x: memref<{N}x{dtype}>, %y: memref<{N}x{dtype}>) attributes {{llvm.emit_c_interface}} {{
      %c0 = arith.constant 0 : index
      %pad = arith.constant 0.0 : {dtype}
      %v = vector.transfer_read %x[%c0], %pad {{in_bounds = [true]}} : memref<{N}x{dtype}>, vector<{N}x{dtype}>
      %e = {op} %v : vector<{N}x{dtype}>
      vector.transfer_write %e, %y[%c0] {{in_bounds = [true]}} : vector<{N}x{dtype}>, memref<{N}x{dtype}>
      return
    }}"""
    with mlir_context():
        module = ir.Module.parse(text)
        assert expand_exp(module) == 1
        assert op not in str(module), "the op was not rewritten"
        passmanager.PassManager.parse(f"builtin.module({LLVM_PIPELINE})").run(module.operation)
        engine = ExecutionEngine(module, opt_level=2)
        y = np.zeros_like(x)
        args = [ctypes.pointer(ctypes.pointer(get_ranked_memref_descriptor(a))) for a in (x, y)]
        engine.invoke("run", *args)
    return y


def inputs(dtype: str, low: float, high: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, low, high, -np.inf, np.nan, low - 10, 1e-30, -1e-30]
    x = np.concatenate([special, rng.uniform(-1, 1, 150), rng.uniform(low, high, N - 150 - len(special))])
    return x.astype(TYPES[dtype])


@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("op", ["math.exp", "math.exp2"])
def test_exp_polynomials(op, dtype):
    finfo = np.finfo(TYPES[dtype])
    top = finfo.maxexp - 0.5  # 2^top: the largest result assembled (exp.py)
    if op == "math.exp":
        low, high, reference = np.log(finfo.tiny), top * np.log(2), np.exp
    else:
        low, high, reference = np.log2(finfo.tiny), top, np.exp2
    x = inputs(dtype, low - 5, high * 0.9999)
    got = run_expansion(op, dtype, x)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        want = reference(x.astype(np.float64))
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all(), "NaN must stay NaN"
    assert (got[x == -np.inf] == 0).all(), "a masked score (-inf) must give exactly 0"
    normal = ~nan & (want >= finfo.tiny) & (want <= finfo.max)
    relative = np.abs(got[normal].astype(np.float64) - want[normal]) / want[normal]
    assert relative.max() <= BOUND[dtype], f"max relative error {relative.max():.3e} at x={x[normal][relative.argmax()]}"
    above = run_expansion(op, dtype, np.full(N, high * 1.001 + 0.01, dtype=TYPES[dtype]))
    assert np.isinf(above).all() and (above > 0).all()
    tiny = ~nan & (want < finfo.tiny)
    assert tiny.sum() > 0 and (got[tiny] <= finfo.tiny).all() and (got[tiny] >= 0).all()
