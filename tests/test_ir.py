"""The compiler's named stages, checked on their IR text with LLVM's FileCheck.

One small function per IR case, in the style of MLIR's Python tests: compile a
spec with `compile_spec(spec, stop_after=<stage>)`, take the stage's IR from
the CompilationStopped it raises, and run FileCheck on it with the CHECK lines
written next to the case.  Shapes are picked so that every number in a check
means one thing: q_len=10 (not a multiple of the cpu row tile 4: a main and a
tail forall), kv_len=200 (> the kv tile 64, not a multiple of it), head_dim=16.
"""

import functools
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import replace

import pytest

from torch_xegpu_attn import compiler
from torch_xegpu_attn.compiler import CompilationStopped, compile_spec, stage_names
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec

SPEC = AttentionSpec(batch=1, kv_heads=2, group=1, q_len=10, kv_len=200, head_dim=16, v_head_dim=16,
                     dtype="float32")
CAUSAL = replace(SPEC, causal=True)
MASKED = replace(SPEC, mask=MaskSpec("bool", ("l", "s"), "bool"))
# Every parallel dim > 1 and q_len a multiple of the row tile: one forall over (b, h, g, rows).
WIDE = replace(SPEC, batch=2, kv_heads=3, group=2, q_len=8)


def _filecheck_binary() -> str:
    for path in (os.path.join(sysconfig.get_paths()["purelib"], "llvm", "bin", "FileCheck"),
                 shutil.which("FileCheck")):
        if path and os.path.exists(path):
            return path
    raise RuntimeError("LLVM FileCheck not found (expected in site-packages/llvm/bin)")


def filecheck(ir_text: str, checks: str) -> None:
    """Assert that `ir_text` satisfies the FileCheck directives in `checks`."""
    with tempfile.NamedTemporaryFile("w", suffix=".checks", delete=False) as f:
        f.write(checks)
    try:
        done = subprocess.run([_filecheck_binary(), f.name, "--dump-input-filter=error", "--dump-input-context=4"],
                              input=ir_text, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    report = done.stderr if len(done.stderr) < 8000 else done.stderr[:4000] + "\n...\n" + done.stderr[-4000:]
    assert done.returncode == 0, f"FileCheck failed:\n{report}"


@functools.lru_cache(maxsize=None)
def stage_ir(spec: AttentionSpec, stage: str) -> str:
    with pytest.raises(CompilationStopped) as stopped:
        compile_spec(spec, stop_after=stage, dump_dir="")
    assert stopped.value.stage == stage
    return stopped.value.ir


def test_filecheck_can_fail():
    with pytest.raises(AssertionError, match="FileCheck failed"):
        filecheck("func.func @f()", "CHECK: linalg.softmax")



def test_payload():
    filecheck(stage_ir(SPEC, "payload"), r"""
CHECK-LABEL: func.func @attention(
CHECK: linalg.transpose {{.*}}permutation = [0, 1, 3, 2] {{.*}}attn.tag = "k_transpose"
CHECK: linalg.fill {{.*}}attn.tag = "qk_init"
CHECK: linalg.contract {{.*}}attn.tag = "qk"{{.*}}-> tensor<1x2x1x10x200xf32>
CHECK: linalg.generic {{.*}}attn.tag = "scale"
CHECK:   arith.mulf
CHECK: linalg.softmax {{.*}}attn.tag = "softmax"{{.*}} dimension(4)
CHECK: linalg.contract {{.*}}attn.root, attn.tag = "pv"{{.*}}-> tensor<1x2x1x10x16xf32>
CHECK: bufferization.materialize_in_destination
CHECK: return
""")
    filecheck(stage_ir(SPEC, "payload"), r"""
CHECK-COUNT-2: linalg.contract
CHECK-NOT: linalg.contract
CHECK-NOT: attn.tag = "mask"
CHECK-NOT: attn.tag = "causal"
""")


def test_payload_mask():
    filecheck(stage_ir(MASKED, "payload"), r"""
CHECK-LABEL: func.func @attention(
CHECK-SAME: memref<10x200xi8, strided<[?, 1], offset: ?>>
CHECK: linalg.contract {{.*}}attn.tag = "qk"
CHECK: linalg.generic {{.*}}attn.tag = "scale"
CHECK: linalg.generic {{.*}}ins({{.*}}tensor<1x2x1x10x200xf32>, tensor<10x200xi8>){{.*}}attn.tag = "mask"
CHECK:   arith.cmpi ne
CHECK:   arith.select
CHECK: linalg.softmax
CHECK: linalg.contract {{.*}}attn.tag = "pv"
CHECK: bufferization.materialize_in_destination
""")


def test_payload_causal():
    filecheck(stage_ir(CAUSAL, "payload"), r"""
CHECK: linalg.generic {{.*}}attn.tag = "scale"
CHECK: linalg.generic {{.*}}attn.tag = "causal"
CHECK:   %[[ROW:.*]] = linalg.index 3
CHECK:   %[[KEY:.*]] = linalg.index 4
CHECK:   arith.cmpi ule, %[[KEY]], %[[ROW]]
CHECK:   arith.select
CHECK: linalg.softmax
""")



def test_tiled_parallel_dims():
    ir = stage_ir(WIDE, "tiled")
    filecheck(ir, r"""
CHECK: scf.forall (%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}) = (0, 0, 0, 0) to (2, 3, 2, 8) step (1, 1, 1, 4)
CHECK: linalg.contract {{.*}}attn.tag = "qk"{{.*}}tensor<1x1x1x4x16xf32>{{.*}}-> tensor<1x1x1x4x200xf32>
CHECK: linalg.contract {{.*}}attn.tag = "pv"
CHECK: scf.forall.in_parallel
CHECK-NOT: attn.tag = "qk"
""")
    filecheck(ir, 'CHECK-NOT: linalg.softmax')


def test_tiled_row_tail():
    ir = stage_ir(SPEC, "tiled")
    filecheck(ir, r"""
CHECK: scf.forall (%[[BH:.*]], %[[ROW:.*]]) = (0, 0) to (2, 8) step (1, 4)
CHECK:   tensor.extract_slice %{{.*}}[0, %[[BH]], 0, %[[ROW]], 0] [1, 1, 1, 4, 16]
CHECK:   linalg.contract {{.*}}attn.tag = "qk"{{.*}}-> tensor<1x1x1x4x200xf32>
CHECK:   linalg.generic
CHECK:     math.exp
CHECK:   linalg.contract {{.*}}attn.tag = "pv"
CHECK: scf.forall.in_parallel
CHECK: scf.forall (%{{.*}}) in (2)
CHECK:   linalg.contract {{.*}}attn.tag = "qk"{{.*}}-> tensor<1x1x1x2x200xf32>
CHECK:   linalg.contract {{.*}}attn.tag = "pv"
CHECK: scf.forall.in_parallel
CHECK-NOT: attn.tag = "qk"
""")
    # The softmax is decomposed: max, exp, sum, divide as generics; no linalg.softmax.
    filecheck(ir, r"""
CHECK-NOT: linalg.softmax
CHECK: arith.maxnumf
CHECK: math.exp
CHECK: arith.addf
CHECK: arith.divf
""")



def test_flash_online_softmax_loop():
    filecheck(stage_ir(SPEC, "flash"), r"""
CHECK: scf.forall (%{{.*}}, %{{.*}}) = (0, 0) to (2, 8) step (1, 4)
CHECK: %{{.*}}:3 = scf.for %[[J:.*]] = %c0 to %c192 step %c64 iter_args(%[[M:.*]] = %{{.*}}, %[[L:.*]] = %{{.*}}, %[[ACC:.*]] = %{{.*}}) -> (tensor<1x1x1x4xf32>, tensor<1x1x1x4xf32>, tensor<1x1x1x4x16xf32>)
CHECK-NOT: scf.yield
CHECK:   linalg.contract {{.*}}attn.tag = "qk"{{.*}}tensor<1x1x16x64xf32>{{.*}}-> tensor<1x1x1x4x64xf32>
CHECK-NOT: scf.yield
CHECK:   linalg.generic {{.*}}ins(%[[M]], %{{.*}}) {{.*}}attn.tag = "running_max"
CHECK-NOT: scf.yield
CHECK:   linalg.generic {{.*}}ins(%[[L]], %{{.*}}, %{{.*}}) {{.*}}attn.tag = "running_sum"
CHECK-NOT: scf.yield
CHECK:   linalg.generic {{.*}}ins(%[[ACC]], %{{.*}}) {{.*}}attn.tag = "acc_rescale"
CHECK-NOT: scf.yield
CHECK:   linalg.contract {{.*}}attn.tag = "pv"{{.*}}tensor<1x1x1x4x64xf32>, tensor<1x1x64x16xf32>
CHECK:   scf.yield
CHECK: attn.tag = "normalize"
CHECK: scf.forall.in_parallel
""")


# Scores of a whole row: the payload's (1, 2, 1, 10, 200) or a work-group's
# (1, 1, 1, rows, 200).  K^T slices (1x1x16x200) keep S as their last dim
# legitimately and do not match.
WHOLE_ROWS = r"""
CHECK-NOT: 1x1x1x{{[0-9]+}}x200xf32
CHECK-NOT: x10x200xf32
"""


def test_flash_no_whole_score_rows():
    # No value of a whole-row score type is left anywhere after the flash stage.
    filecheck(stage_ir(SPEC, "flash"), WHOLE_ROWS)
    filecheck(stage_ir(CAUSAL, "flash"), WHOLE_ROWS)
    # The check is meaningful: the tiled stage (before the rewrite) fails it.
    with pytest.raises(AssertionError):
        filecheck(stage_ir(SPEC, "tiled"), WHOLE_ROWS)


def test_flash_causal_skips_tiles_above_diagonal():
    filecheck(stage_ir(CAUSAL, "flash"), r"""
CHECK: scf.forall (%{{.*}}, %[[ROW:.*]]) = (0, 0) to (2, 8) step (1, 4)
CHECK:   %[[END:.*]] = arith.addi %[[ROW]], %c4
CHECK:   %[[TILES:.*]] = arith.ceildivui %[[END]], %c64
CHECK:   %[[WHOLE:.*]] = arith.muli %[[TILES]], %c64
CHECK:   %[[UB:.*]] = arith.minui %[[WHOLE]], %c192
CHECK:   scf.for %{{.*}} = %c0 to %[[UB]] step %c64 iter_args(
CHECK:     attn.tag = "qk"
CHECK:     attn.tag = "causal"
""")
    # Without causal the bound is the constant end of the full tiles.
    filecheck(stage_ir(SPEC, "flash"), r"""
CHECK-NOT: arith.minui
CHECK-NOT: arith.ceildivui
CHECK: scf.for %{{.*}} = %c0 to %c192 step %c64 iter_args(
""")



# Many query rows per key/value head: the cpu target materializes K^T once.
MANY_ROWS = replace(SPEC, q_len=300)


def test_vectorized():
    # Few rows per key/value head (10): the QK^T contraction reads K tiles (64 keys x 16) in place.
    ir = stage_ir(SPEC, "vectorized")
    filecheck(ir, r"""
CHECK: scf.for %{{.*}} = %c0 to %c192 step %c64 iter_args({{.*}}) -> (vector<4xf32>, vector<4xf32>, vector<4x16xf32>)
CHECK:   vector.contract {{.*}} : vector<4x16xf32>, vector<64x16xf32> into vector<4x64xf32>
CHECK:   vector.contract {{.*}} : vector<4x64xf32>, vector<64x16xf32> into vector<4x16xf32>
CHECK:   scf.yield
""")
    # Many rows: it reads tiles (16 x 64 keys) of the materialized K^T.
    filecheck(stage_ir(MANY_ROWS, "vectorized"), r"""
CHECK: scf.for %{{.*}} = %c0 to %c192 step %c64 iter_args({{.*}}) -> (vector<4xf32>, vector<4xf32>, vector<4x16xf32>)
CHECK:   vector.contract {{.*}} : vector<4x16xf32>, vector<16x64xf32> into vector<4x64xf32>
CHECK:   vector.contract {{.*}} : vector<4x64xf32>, vector<64x16xf32> into vector<4x16xf32>
CHECK:   scf.yield
""")
    filecheck(ir, r"""
CHECK-NOT: linalg.
CHECK-NOT: 1x1x1x{{[0-9]+}}x200xf32
CHECK-NOT: x10x200xf32
CHECK-NOT: vector<{{[0-9]+}}x200xf32>
""")


def test_bufferized():
    ir = stage_ir(SPEC, "bufferized")
    filecheck(ir, r"""
CHECK-LABEL: func.func @attention(
CHECK: vector.contract
""")
    filecheck(ir, r"""
CHECK-NOT: tensor<
CHECK-NOT: tensor.
CHECK-NOT: bufferization.
CHECK-NOT: linalg.
""")



def test_cpu_grid():
    # K read in place: the main rows (2 heads x 2 row tiles) and the row tail (2 heads), no workspace.
    ir = stage_ir(SPEC, "cpu-grid")
    filecheck(ir, r"""
CHECK: module attributes {attn.kernel = {grids = [{name = "attention_grid0", tasks = 4 : i64}, {name = "attention_grid1", tasks = 2 : i64}], workspaces = []}}
CHECK: func.func @attention_grid0(%{{.*}}: index, %{{.*}}: index, {{.*}}) attributes {llvm.emit_c_interface}
CHECK:   scf.for
CHECK:     vector.contract
CHECK: func.func @attention_grid1(%{{.*}}: index, %{{.*}}: index, {{.*}}) attributes {llvm.emit_c_interface}
CHECK-NOT: func.func
""")
    filecheck(ir, r"""
CHECK-NOT: func.func @attention(
CHECK-NOT: scf.forall
""")
    # K^T materialized: its transpose grid (one task per head) runs first, into the workspace.
    filecheck(stage_ir(MANY_ROWS, "cpu-grid"), r"""
CHECK: module attributes {attn.kernel = {grids = [{name = "attention_grid0", tasks = 2 : i64}, {name = "attention_grid1", tasks = 150 : i64}], workspaces = [{dtype = "f32", shape = array<i64: 1, 2, 16, 200>}]}}
CHECK: func.func @attention_grid0(
CHECK:   vector.transpose
CHECK: func.func @attention_grid1(
CHECK-NOT: func.func
""")



def test_dump_dir_one_file_per_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("XEGPU_ATTN_STOP_AFTER", raising=False)
    spec = replace(SPEC, q_len=5, kv_len=70)
    compile_spec(spec, dump_dir=str(tmp_path))
    folder = tmp_path / spec.short_name()
    ir_stages = [n for n in stage_names("cpu") if n != "binary"]
    assert sorted(p.name for p in folder.glob("*.mlir")) == [f"{i:02d}-{n}.mlir" for i, n in enumerate(ir_stages)]
    assert all(p.stat().st_size > 0 for p in folder.glob("*.mlir"))
    filecheck((folder / "00-payload.mlir").read_text(), "CHECK: linalg.softmax")
    filecheck((folder / "07-cpu-llvm.mlir").read_text(), "CHECK: llvm.func @_mlir_ciface_attention_grid0")


def test_dump_env_var_with_stop_after(tmp_path, monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_DUMP_IR", str(tmp_path))
    monkeypatch.setenv("XEGPU_ATTN_STOP_AFTER", "flash")
    spec = replace(SPEC, q_len=6, kv_len=90)
    with pytest.raises(CompilationStopped) as stopped:
        compile_spec(spec)
    assert stopped.value.stage == "flash"
    folder = tmp_path / spec.short_name()
    assert sorted(p.name for p in folder.iterdir()) == ["00-payload.mlir", "01-tiled.mlir", "02-flash.mlir"]
    assert (folder / "02-flash.mlir").read_text() == stopped.value.ir


def test_stop_after_unknown_stage():
    before = dict(compiler.COUNTERS)
    with pytest.raises(ValueError, match="no-such-stage") as raised:
        compile_spec(SPEC, stop_after="no-such-stage")
    for name in stage_names("cpu"):
        assert name in str(raised.value)
    assert compiler.COUNTERS == before, "an invalid stop_after must fail before compiling"
