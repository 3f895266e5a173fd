"""The compiler's named stages, checked on their IR text with LLVM's FileCheck.

One small function per IR case, in the style of MLIR's Python tests: compile a
spec with `compile_spec(spec, stop_after=<stage>)`, take the stage's IR from
the CompilationStopped it raises, and run FileCheck on it with the CHECK lines
written next to the case.  A spec holds no lengths (they are run-time sizes
of the kernel's arguments); numbers are picked so that each means one thing:
group 2, head_dim 16, v_head_dim 8, the cpu target's "short" class (kv tile 64,
K read in place), with the row tile pinned to 4 (`small_row_tile`) so that
the tiles stay readable.
"""

import contextlib
import functools
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import replace

import pytest

from torch_xegpu_attn import compiler
from torch_xegpu_attn.compiler import CompilationStopped, compile_spec, dump_folder_name, stage_names
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec
from torch_xegpu_attn.targets import get_target

SPEC = AttentionSpec(group=2, head_dim=16, v_head_dim=8, dtype="float32", length_class="short")
CAUSAL = replace(SPEC, causal=True)
MASKED = replace(SPEC, mask=MaskSpec("bool", ("b", "l", "s"), "bool"))
ADDITIVE = replace(SPEC, mask=MaskSpec("additive", ("l", "s"), "float32"))
# Many query rows per key/value head: the cpu target materializes K^T once.
LONG = replace(SPEC, length_class="long")
DECODE = replace(SPEC, length_class="decode")


@contextlib.contextmanager
def small_row_tile(spec: AttentionSpec):
    """Prefill specs compile with 4-row work-groups (XEGPU_ATTN_SCHEDULE) so that the tiles stay
    readable; decode keeps its one-row ones."""
    before = os.environ.get("XEGPU_ATTN_SCHEDULE")
    if spec.length_class != "decode":
        os.environ["XEGPU_ATTN_SCHEDULE"] = '{"row_tile": 4}'
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("XEGPU_ATTN_SCHEDULE", None)
        else:
            os.environ["XEGPU_ATTN_SCHEDULE"] = before


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
    """The IR after `stage`; prefill classes compiled with 4-row work-groups (small_row_tile)."""
    with pytest.raises(CompilationStopped) as stopped, small_row_tile(spec):
        compile_spec(spec, stop_after=stage, dump_dir="")
    assert stopped.value.stage == stage
    return stopped.value.ir


def test_filecheck_can_fail():
    with pytest.raises(AssertionError, match="FileCheck failed"):
        filecheck("func.func @f()", "CHECK: linalg.softmax")



def test_payload():
    # Run-time B, H, L, S: dynamic sizes of the arguments; G, E, Ev compiled in.
    filecheck(stage_ir(SPEC, "payload"), r"""
CHECK-LABEL: func.func @attention(
CHECK-SAME: memref<?x?x2x?x16xf32, strided<[?, ?, ?, ?, 1], offset: ?>>
CHECK-SAME: memref<?x?x?x16xf32, strided<[?, ?, ?, 1], offset: ?>>
CHECK-SAME: memref<?x?x?x8xf32, strided<[?, ?, ?, 1], offset: ?>>
CHECK-SAME: memref<?x?x2x?x8xf32>
CHECK: linalg.transpose {{.*}}permutation = [0, 1, 3, 2] {{.*}}attn.tag = "k_transpose"
CHECK: linalg.fill {{.*}}attn.tag = "qk_init"
CHECK: linalg.contract {{.*}}attn.tag = "qk"{{.*}}-> tensor<?x?x2x?x?xf32>
CHECK: linalg.generic {{.*}}attn.tag = "scale"
CHECK:   arith.mulf
CHECK: linalg.softmax {{.*}}attn.tag = "softmax"{{.*}} dimension(4)
CHECK: linalg.contract {{.*}}attn.root, attn.tag = "pv"{{.*}}-> tensor<?x?x2x?x8xf32>
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
CHECK-SAME: memref<?x?x?xi8, strided<[?, ?, 1], offset: ?>>
CHECK: linalg.contract {{.*}}attn.tag = "qk"
CHECK: linalg.generic {{.*}}attn.tag = "scale"
CHECK: linalg.generic {{.*}}ins({{.*}}tensor<?x?x2x?x?xf32>, tensor<?x?x?xi8>){{.*}}attn.tag = "mask"
CHECK:   arith.cmpi ne
CHECK:   arith.select
CHECK: linalg.softmax
""")


def test_payload_causal_compares_i32():
    filecheck(stage_ir(CAUSAL, "payload"), r"""
CHECK: linalg.generic {{.*}}attn.tag = "scale"
CHECK: linalg.generic {{.*}}attn.tag = "causal"
CHECK:   %[[ROW:.*]] = linalg.index 3
CHECK:   %[[ROW32:.*]] = arith.index_cast %[[ROW]] : index to i32
CHECK:   %[[KEY:.*]] = linalg.index 4
CHECK:   %[[KEY32:.*]] = arith.index_cast %[[KEY]] : index to i32
CHECK:   arith.cmpi sle, %[[KEY32]], %[[ROW32]] : i32
CHECK:   arith.select
CHECK: linalg.softmax
""")


# The work-group loop: five normalized dims (b, h, g, p, r), mapped at creation.
WORK_GROUP_LOOP = r"""
CHECK: %[[ROWS:.*]] = affine.apply #{{.*}}()[%{{.*}}]
CHECK: scf.forall (%[[B:.*]], %[[H:.*]], %[[G:.*]], %[[P:.*]], %[[R:.*]]) in (%{{.*}}, %{{.*}}, 2, 1, %[[ROWS]])
"""
MAPPING = r"""
CHECK: {attn.work_groups, mapping = [#gpu.block<linear_dim_4>, #gpu.block<linear_dim_3>, #gpu.block<linear_dim_2>, #gpu.block<linear_dim_1>, #gpu.block<linear_dim_0>]}
"""


def test_tiled_work_group_loop():
    ir = stage_ir(SPEC, "tiled")
    filecheck(ir, WORK_GROUP_LOOP + r"""
CHECK:   tensor.extract_slice %{{.*}}[%[[B]], %[[H]], %[[G]], %{{.*}}, 0] [1, 1, 1, %{{.*}}, 16]
CHECK:   linalg.contract {{.*}}attn.tag = "qk"{{.*}}-> tensor<1x1x1x?x?xf32>
CHECK:   linalg.generic
CHECK:     math.exp
CHECK:   linalg.contract {{.*}}attn.tag = "pv"
CHECK:   scf.forall.in_parallel
""" + MAPPING)
    filecheck(ir, r"""
CHECK-NOT: linalg.softmax
CHECK-COUNT-1: scf.forall (
CHECK-NOT: scf.forall (
""")


def test_tiled_packed_heads():
    # GQA packing: the g dim has extent 1, each work-group's tile holds both query heads.
    filecheck(stage_ir(DECODE, "tiled"), r"""
CHECK: scf.forall (%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}) in (%{{.*}}, %{{.*}}, 1, 1, %{{.*}})
CHECK:   linalg.contract {{.*}}attn.tag = "qk"{{.*}}-> tensor<1x1x2x1x?xf32>
""")


def test_flash_online_softmax_loop():
    # One loop over ceil(S / 64) full tiles: m, l and acc are loop-carried vectors;
    # Q is read once, before it, rows past L read as zeros.
    filecheck(stage_ir(SPEC, "flash"), WORK_GROUP_LOOP + r"""
CHECK:   %[[Q:.*]] = vector.transfer_read {{.*}} {in_bounds = [false, true]} : tensor<1x1x1x?x16xf32>, vector<4x16xf32>
CHECK:   %[[TILES:.*]] = arith.ceildivui %[[S:.*]], %c64
CHECK:   %[[END:.*]] = arith.muli %[[TILES]], %c64
CHECK:   scf.for %[[J:arg[0-9]+]] = %c0 to %[[END]] step %c64 iter_args(%[[M:.*]] = %{{.*}}, %[[L:.*]] = %{{.*}}, %[[ACC:.*]] = %{{.*}}) -> (vector<4xf32>, vector<4xf32>, vector<4x8xf32>)
CHECK:     %[[K:.*]] = vector.transfer_read {{.*}}[%c0, %c0, %[[J]], %c0]{{.*}} {in_bounds = [false, true]} : tensor<1x1x?x16xf32>, vector<64x16xf32>
CHECK:     %[[QK:.*]] = vector.contract {{.*}} %[[Q]], %[[K]], %{{.*}} : vector<4x16xf32>, vector<64x16xf32> into vector<4x64xf32>
CHECK:     %[[LAST:.*]] = arith.cmpi ugt, %{{.*}}, %[[S]] : index
CHECK:     %[[SC:.*]] = scf.if %[[LAST]] -> (vector<4x64xf32>)
CHECK:       arith.cmpi slt, %{{.*}}, %{{.*}} : vector<4x64xi32>
CHECK:     vector.multi_reduction <maximumf>, %[[SC]], %{{.*}} [1] : vector<4x64xf32> to vector<4xf32>
CHECK:     arith.maximumf %[[M]]
CHECK:     math.exp2 {{.*}} : vector<4xf32>
CHECK:     vector.shape_cast {{.*}} : vector<4xf32> to vector<4x1xf32>
CHECK:     %[[BASE:.*]] = vector.broadcast {{.*}} : vector<4x1xf32> to vector<4x64xf32>
CHECK:     %[[X:.*]] = arith.subf %[[SC]], %[[BASE]] : vector<4x64xf32>
CHECK:     %[[ARG:.*]] = arith.mulf %[[X]], %{{.*}} : vector<4x64xf32>
CHECK:     math.exp2 %[[ARG]] : vector<4x64xf32>
CHECK:     vector.multi_reduction <add>
CHECK:     vector.transfer_read {{.*}}[%c0, %c0, %[[J]], %c0]{{.*}} : tensor<1x1x?x8xf32>, vector<64x8xf32>
CHECK:     vector.contract {{.*}} : vector<4x64xf32>, vector<64x8xf32> into vector<4x8xf32>
CHECK:     scf.yield
CHECK:   } {attn.flash_loop}
CHECK:   arith.divf %{{.*}}, %{{.*}} : vector<4xf32>
CHECK:   vector.transfer_write {{.*}} {in_bounds = [false, true]} : vector<4x8xf32>, tensor<1x1x1x?x8xf32>
CHECK:   scf.forall.in_parallel
""" + MAPPING)


def test_flash_scores_in_base_two():
    # The scale times log2(e) (0.25 * 1.4427 = 0.3607) multiplies in the exponent, which is
    # exp2((s - m) * c) for f32 inputs (the difference first: exact where it matters) and
    # exp2(s * c - m * c) for f16 and bf16 (one FMA per score); the normalization is one
    # reciprocal per row.
    filecheck(stage_ir(replace(SPEC, dtype="float16"), "flash"), r"""
CHECK:     %[[BASE:.*]] = vector.broadcast {{.*}} : vector<4x1xf32> to vector<4x64xf32>
CHECK:     %[[X:.*]] = arith.mulf %{{.*}}, %{{.*}} fastmath<contract> : vector<4x64xf32>
CHECK:     %[[ARG:.*]] = arith.subf %[[X]], %[[BASE]] fastmath<contract> : vector<4x64xf32>
CHECK:     math.exp2 %[[ARG]] : vector<4x64xf32>
""")
    ir = stage_ir(SPEC, "flash")
    filecheck(ir, r"""
CHECK-DAG: arith.constant dense<0.360673755> : vector<4x64xf32>
CHECK-DAG: arith.constant dense<0.360673755> : vector<4xf32>
CHECK-DAG: arith.constant dense<1.000000e+00> : vector<4xf32>
""")
    filecheck(ir, r"""
CHECK-NOT: math.exp {{.*}}
CHECK-NOT: arith.divf {{.*}} : vector<4x8xf32>
CHECK-NOT: vector.transpose
""")
    # An additive mask is added in natural units: log2(e) follows it, unfolded (f16: on the
    # scores; f32: in the exponent, after the difference).
    filecheck(stage_ir(replace(ADDITIVE, dtype="float16"), "flash"), r"""
CHECK: %[[SCALED:.*]] = arith.mulf %{{.*}}, %{{.*}} : vector<4x64xf32>
CHECK: %[[MASKED:.*]] = arith.addf %[[SCALED]], %{{.*}} : vector<4x64xf32>
CHECK: arith.mulf %[[MASKED]], %{{.*}} : vector<4x64xf32>
""")
    filecheck(stage_ir(ADDITIVE, "flash"), r"""
CHECK: %[[SCALED:.*]] = arith.mulf %{{.*}}, %{{.*}} : vector<4x64xf32>
CHECK: %[[MASKED:.*]] = arith.addf %[[SCALED]], %{{.*}} : vector<4x64xf32>
CHECK: %[[X:.*]] = arith.subf %{{.*}}, %{{.*}} : vector<4x64xf32>
CHECK: arith.mulf %[[X]], %{{.*}} : vector<4x64xf32>
""")


def test_flash_causal_masks_only_straddling_tiles():
    # Tiles wholly above the diagonal: the loop stops at the last tile the rows see.
    # Tiles below it: the else branch (no index compare).  Straddling or last tiles: i32 compares.
    filecheck(stage_ir(CAUSAL, "flash"), r"""
CHECK: scf.forall
CHECK: %[[ROW0:.*]] = affine.apply
CHECK: %[[VALID:.*]] = affine.min
CHECK: %[[SEEN:.*]] = arith.addi %[[ROW0]], %[[VALID]]
CHECK: %[[VIS:.*]] = arith.minui %[[SEEN]], %[[S:.*]] : index
CHECK: %[[TILES:.*]] = arith.ceildivui %[[VIS]], %c64
CHECK: %[[END:.*]] = arith.muli %[[TILES]], %c64
CHECK: scf.for %[[J:arg[0-9]+]] = %c0 to %[[END]] step %c64
CHECK:   %[[NEXT:.*]] = arith.addi %[[J]], %c64
CHECK:   %[[LAST:.*]] = arith.cmpi ugt, %[[NEXT]], %[[S]]
CHECK:   %[[FIRST:.*]] = arith.addi %[[ROW0]], %c1
CHECK:   %[[STRADDLE:.*]] = arith.cmpi ugt, %[[NEXT]], %[[FIRST]]
CHECK:   %[[NEED:.*]] = arith.ori %[[LAST]], %[[STRADDLE]]
CHECK:   scf.if %[[NEED]] -> (vector<4x64xf32>) {
CHECK:     vector.step : vector<4xindex>
CHECK:     arith.cmpi sle, %{{.*}}, %{{.*}} : vector<4x64xi32>
CHECK:     arith.cmpi slt, %{{.*}}, %{{.*}} : vector<4x64xi32>
CHECK:   } else {
CHECK-NEXT: scf.yield
""")
    filecheck(stage_ir(CAUSAL, "flash"), r"""
CHECK-NOT: xindex>, vector<{{.*}}xi32>
CHECK-NOT: vector<4x64xindex>
""")


def test_flash_mask_tile_broadcast():
    # A mask varying along (b, l, s): an (rows x keys) tile read per step, padded with
    # 0 (= masked) past L and S.
    filecheck(stage_ir(MASKED, "flash"), r"""
CHECK: scf.for %[[J:arg[0-9]+]] =
CHECK:   vector.transfer_read %{{.*}}[%c0, %c0, %[[J]]], %{{.*}} : tensor<1x?x?xi8>, vector<4x64xi8>
CHECK:   arith.cmpi ne, %{{.*}}, %{{.*}} : vector<4x64xi8>
""")


def test_flash_decode_packs_query_heads():
    # Decode: the 2 query heads of a key/value head are the work-group's rows (2 x 1 row);
    # one-row tiles are static, so their reads and writes are in bounds.
    filecheck(stage_ir(DECODE, "flash"), r"""
CHECK: scf.forall (%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}) in (%{{.*}}, %{{.*}}, 1, 1, %{{.*}})
CHECK: vector.transfer_read {{.*}} {in_bounds = [true, true, true]} : tensor<1x1x2x1x16xf32>, vector<2x1x16xf32>
CHECK: vector.shape_cast {{.*}} : vector<2x1x16xf32> to vector<2x16xf32>
CHECK: scf.for {{.*}} -> (vector<2xf32>, vector<2xf32>, vector<2x8xf32>)
CHECK: vector.shape_cast {{.*}} : vector<2x8xf32> to vector<2x1x8xf32>
CHECK: vector.transfer_write {{.*}} {in_bounds = [true, true, true]} : vector<2x1x8xf32>, tensor<1x1x2x1x8xf32>
""")


def test_flash_materialized_k_transpose():
    # "long": a loop of its own writes K^T tiles into a workspace laid out tile by tile
    # (B, H, tiles, E, T), one transpose per (64 x 16) K tile; the flash loop reads the
    # (16 x 64) tile j / 64 of it, in bounds.
    filecheck(stage_ir(LONG, "flash"), r"""
CHECK: %[[TILES:.*]] = arith.ceildivui
CHECK: tensor.empty(%{{.*}}, %{{.*}}, %[[TILES]]) : tensor<?x?x?x16x64xf32>
CHECK: scf.forall (%{{.*}}, %{{.*}}, %{{.*}}) in (%{{.*}}, %{{.*}}, %[[TILES]])
CHECK:   vector.transpose {{.*}} [1, 0] : vector<64x16xf32> to vector<16x64xf32>
CHECK: {attn.k_transpose, mapping = [#gpu.block<linear_dim_2>, #gpu.block<linear_dim_1>, #gpu.block<linear_dim_0>]}
CHECK: scf.forall
CHECK:   scf.for %[[J:.*]] = %c0
CHECK:     %[[TILE:.*]] = arith.divui %[[J]], %c64
CHECK:     vector.transfer_read {{.*}}[%{{.*}}, %{{.*}}, %[[TILE]], %c0, %c0]{{.*}} {in_bounds = [true, true]} : tensor<?x?x?x16x64xf32>, vector<16x64xf32>
CHECK:     vector.contract {{.*}} : vector<4x16xf32>, vector<16x64xf32> into vector<4x64xf32>
""")


def test_bufferized():
    ir = stage_ir(SPEC, "bufferized")
    filecheck(ir, WORK_GROUP_LOOP + r"""
CHECK:   memref.subview
CHECK:   vector.transfer_read {{.*}} : memref<1x1x1x?x16xf32, strided<{{.*}}>>, vector<4x16xf32>
CHECK:   scf.for
CHECK:     vector.contract
CHECK:   vector.transfer_write {{.*}} : vector<4x8xf32>, memref<1x1x1x?x8xf32, strided<{{.*}}>>
""" + MAPPING)
    filecheck(ir, r"""
CHECK-NOT: tensor<
CHECK-NOT: tensor.
CHECK-NOT: bufferization.
CHECK-NOT: linalg.
CHECK-NOT: memref.alloc
""")


def test_cpu_grid():
    # K read in place: one grid (the work-group loop) and the plan of its task count.
    ir = stage_ir(SPEC, "cpu-grid")
    filecheck(ir, r"""
CHECK: module attributes {attn.kernel = {grids = ["attention_grid0"], plan = "attention_plan", plan_length = 1 : i64, workspaces = []}}
CHECK: func.func @attention_grid0(%{{.*}}: index, %{{.*}}: index, {{.*}}) attributes {llvm.emit_c_interface}
CHECK:   scf.for
CHECK:     scf.for
CHECK:       vector.contract
CHECK: func.func @attention_plan({{.*}}, %[[PLAN:.*]]: memref<1xi64>) attributes {llvm.emit_c_interface}
CHECK:   memref.store %{{.*}}, %[[PLAN]][%{{.*}}] : memref<1xi64>
CHECK-NOT: func.func
""")
    filecheck(ir, r"""
CHECK-NOT: func.func @attention(
CHECK-NOT: scf.forall
""")
    # K^T materialized: its transpose grid runs first, into a workspace whose three dynamic
    # sizes (B, H, padded S) the plan computes after the two task counts.
    filecheck(stage_ir(LONG, "cpu-grid"), r"""
CHECK: module attributes {attn.kernel = {grids = ["attention_grid0", "attention_grid1"], plan = "attention_plan", plan_length = 5 : i64, workspaces = [{dtype = "f32", shape = array<i64: -9223372036854775808, -9223372036854775808, -9223372036854775808, 16, 64>}]}}
CHECK: func.func @attention_grid0(
CHECK:   vector.transpose
CHECK: func.func @attention_grid1(
CHECK: func.func @attention_plan(
""")
    # cpu-vector splits the tile's transpose into (16 x 16) pieces (CpuOptions.transpose_tile),
    # keys (the read's rows, past S read as zeros) in the inner loop
    filecheck(stage_ir(LONG, "cpu-vector"), r"""
CHECK: func.func @attention_grid0(
CHECK:   scf.for %{{.*}} = %{{.*}} to %c16{{.*}} step %c16
CHECK:     scf.for %{{.*}} = %{{.*}} to %c64{{.*}} step %c16
CHECK:       vector.transfer_read {{.*}} {in_bounds = [false, true]} {{.*}}, vector<16x16xf32>
CHECK:       vector.transpose {{.*}} [1, 0] : vector<16x16xf32> to vector<16x16xf32>
CHECK:       vector.transfer_write {{.*}} : vector<16x16xf32>
CHECK: func.func @attention_grid1(
""")


def test_cpu_vector_softmax_row_by_row():
    # The step's elementwise tile code (scores minus the row maximum, exp2, the row sums) is one
    # loop over the 4 rows: the score tile through a stack buffer, one row of it per iteration,
    # each probability row stored into the micro-kernel's copy of P (its left operand).
    filecheck(stage_ir(LONG, "cpu-vector"), r"""
CHECK: func.func @attention_grid1(
CHECK:   vector.transfer_write %{{.*}}, %[[S:[a-z_0-9]+]][%{{.*}}] {in_bounds = [true, true]} : vector<4x64xf32>, memref<4x64xf32>
CHECK:   scf.for %[[R:[a-z_0-9]+]] = %{{.*}} to %c4{{.*}} step %c1
CHECK:     vector.load %[[S]][%[[R]], %{{.*}}] : memref<4x64xf32>, vector<64xf32>
CHECK:     math.fma %{{.*}} : vector<64xf32>
CHECK:     vector.store %{{.*}}, %[[P:[a-z_0-9]+]][%[[R]], %{{.*}}] : memref<4x64xf32>, vector<64xf32>
CHECK:     vector.reduction <add>, %{{.*}} : vector<64xf32> into f32
CHECK:   }
CHECK:   memref.load %[[P]]
""")
    filecheck(stage_ir(LONG, "cpu-vector"), r"""
CHECK: func.func @attention_grid1(
CHECK-NOT: math.fma {{.*}} : vector<4x64xf32>
CHECK-NOT: vector.multi_reduction {{.*}} : vector<4x64xf32>
CHECK: func.func @attention_plan(
""")


def test_dump_dir_one_file_per_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("XEGPU_ATTN_STOP_AFTER", raising=False)
    spec = replace(SPEC, head_dim=32)
    compile_spec(spec, dump_dir=str(tmp_path))
    folders = list(tmp_path.iterdir())
    assert [f.name for f in folders] == [dump_folder_name(spec, get_target("cpu").options_for(spec))]
    folder = folders[0]
    ir_stages = [n for n in stage_names("cpu") if n != "binary"]
    assert sorted(p.name for p in folder.glob("*.mlir")) == [f"{i:02d}-{n}.mlir" for i, n in enumerate(ir_stages)]
    assert all(p.stat().st_size > 0 for p in folder.glob("*.mlir"))
    filecheck((folder / "00-payload.mlir").read_text(), "CHECK: linalg.softmax")
    filecheck((folder / f"{len(ir_stages) - 1:02d}-cpu-llvm.mlir").read_text(),
              "CHECK: llvm.func @_mlir_ciface_attention_grid0")


def test_dump_env_var_with_stop_after(tmp_path, monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_DUMP_IR", str(tmp_path))
    monkeypatch.setenv("XEGPU_ATTN_STOP_AFTER", "flash")
    spec = replace(SPEC, head_dim=24)
    with pytest.raises(CompilationStopped) as stopped:
        compile_spec(spec)
    assert stopped.value.stage == "flash"
    folder = tmp_path / dump_folder_name(spec, get_target("cpu").options_for(spec))
    assert sorted(p.name for p in folder.iterdir()) == ["00-payload.mlir", "01-tiled.mlir", "02-flash.mlir"]
    assert (folder / "02-flash.mlir").read_text() == stopped.value.ir


def test_stop_after_unknown_stage():
    before = dict(compiler.COUNTERS)
    with pytest.raises(ValueError, match="no-such-stage") as raised:
        compile_spec(SPEC, stop_after="no-such-stage")
    for name in stage_names("cpu"):
        assert name in str(raised.value)
    assert compiler.COUNTERS == before, "an invalid stop_after must fail before compiling"


def test_only_documented_markers_reach_the_shared_ir():
    # After the flash stage no op tag or fusion marker is left: only the loop markers
    # targets rely on (attn.work_groups, attn.flash_loop, attn.k_transpose, attn.combine);
    # the final IR has only the kernel's launch metadata.
    import re
    for spec in (SPEC, CAUSAL, MASKED, LONG, DECODE):
        shared = set(re.findall(r"attn\.[a-z_]+", stage_ir(spec, "bufferized")))
        assert shared <= {"attn.work_groups", "attn.flash_loop", "attn.k_transpose", "attn.combine"}, shared
        assert set(re.findall(r"attn\.[a-z_]+", stage_ir(spec, "cpu-llvm"))) == {"attn.kernel"}


def test_cpu_rows_constant_tiles():
    # A splat constant is made again per row; a constant of differing elements, defined before
    # the segment, is read row by row from a stack buffer like any other tile.
    from mlir import ir

    from torch_xegpu_attn.mlir_utils import mlir_context
    from torch_xegpu_attn.targets.cpu.rows import emit_row_by_row

    with mlir_context():
        module = ir.Module.parse("""
func.func @f(%x: vector<2x8xf32>) -> vector<2xf32> {
  %table = arith.constant dense<[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
                                 [8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]]> : vector<2x8xf32>
  %two = arith.constant dense<2.0> : vector<2x8xf32>
  %zero = arith.constant dense<0.0> : vector<2xf32>
  %a = arith.addf %x, %table : vector<2x8xf32>
  %b = arith.mulf %a, %two : vector<2x8xf32>
  %s = vector.multi_reduction <add>, %b, %zero [1] : vector<2x8xf32> to vector<2xf32>
  return %s : vector<2xf32>
}
""")
        assert emit_row_by_row(module) == 1
        assert module.operation.verify()
        text = str(module)
    filecheck(text, r"""
CHECK: func.func @f(
CHECK:   %[[T:[a-z_0-9]+]] = memref.alloca() {alignment = 64 : i64} : memref<2x8xf32>
CHECK:   vector.transfer_write %{{.*}}, %[[T]]
CHECK:   scf.for %[[R:[a-z_0-9]+]] =
CHECK:     %[[ROW:[a-z_0-9]+]] = vector.load %[[T]][%[[R]], %{{.*}}] : memref<2x8xf32>, vector<8xf32>
CHECK:     arith.addf %{{.*}}, %[[ROW]] : vector<8xf32>
CHECK:     arith.constant dense<2.000000e+00> : vector<8xf32>
CHECK:     vector.reduction <add>
""")


_COPIED_THEN_REUSED = """
func.func @f(%x: vector<2x8xf32>, %m: memref<2x8xf32>, %z: vector<8xf32>) -> vector<2xf32> {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %pad = arith.constant 0.0 : f32
  %zero = arith.constant dense<0.0> : vector<2xf32>
  %copy = memref.alloca() {alignment = 64 : i64} : memref<2x8xf32>
  %a = arith.mulf %x, %x : vector<2x8xf32>
  %p = arith.addf %a, %x : vector<2x8xf32>
  %p0 = vector.extract %p[0] : vector<8xf32> from vector<2x8xf32>
  vector.store %p0, %copy[%c0, %c0] : memref<2x8xf32>, vector<8xf32>
  %p1 = vector.extract %p[1] : vector<8xf32> from vector<2x8xf32>
  vector.store %p1, %copy[%c1, %c0] : memref<2x8xf32>, vector<8xf32>
  OVERWRITE
  %y = vector.transfer_read %m[%c0, %c0], %pad {in_bounds = [true, true]} : memref<2x8xf32>, vector<2x8xf32>
  %d = arith.subf %y, %p : vector<2x8xf32>
  %e = arith.mulf %d, %p : vector<2x8xf32>
  %s = vector.multi_reduction <add>, %e, %zero [1] : vector<2x8xf32> to vector<2xf32>
  return %s : vector<2xf32>
}
"""


def _rows_rewritten(source: str) -> str:
    from mlir import ir

    from torch_xegpu_attn.mlir_utils import mlir_context
    from torch_xegpu_attn.targets.cpu.rows import emit_row_by_row

    with mlir_context():
        module = ir.Module.parse(source)
        assert emit_row_by_row(module) == 2
        assert module.operation.verify()
        return str(module)


def test_cpu_rows_copy_read_by_a_later_segment():
    # A tile stored row by row into a stack copy (the micro-kernel's operand) and used again by
    # a later segment (the backward's P in dS = P * (dP - Delta)): both segments become row
    # loops, the first stores its rows into the copy, the second loads its rows from it.
    text = _rows_rewritten(_COPIED_THEN_REUSED.replace("OVERWRITE", ""))
    filecheck(text, r"""
CHECK: func.func @f(
CHECK:   scf.for %[[R:[a-z_0-9]+]] =
CHECK:     arith.addf
CHECK:     vector.store %{{.*}}, %[[COPY:[a-z_0-9]+]][%[[R]], %{{.*}}] : memref<2x8xf32>, vector<8xf32>
CHECK:   }
CHECK:   %[[WHOLE:[0-9]+]] = vector.transfer_read %[[COPY]]
CHECK-NOT: vector.transfer_write %[[WHOLE]]
CHECK:   scf.for %[[R2:[a-z_0-9]+]] =
CHECK:     %[[P:[0-9]+]] = vector.load %[[COPY]][%[[R2]], %{{.*}}] : memref<2x8xf32>, vector<8xf32>
CHECK:     arith.subf %{{.*}}, %[[P]] : vector<8xf32>
CHECK:     arith.mulf %{{.*}}, %[[P]] : vector<8xf32>
CHECK:     vector.reduction <add>
""")
    # A write into the copy between the two segments: the second reads a tile of its own.
    text = _rows_rewritten(_COPIED_THEN_REUSED.replace(
        "OVERWRITE", "vector.store %z, %copy[%c1, %c0] : memref<2x8xf32>, vector<8xf32>"))
    filecheck(text, r"""
CHECK:   scf.for
CHECK:     vector.store %{{.*}}, %[[COPY:[a-z_0-9]+]][
CHECK:   %[[P:[0-9]+]] = vector.transfer_read %[[COPY]]
CHECK:   vector.store %arg2, %[[COPY]]
CHECK:   vector.transfer_write %[[P]], %[[OWN:[a-z_0-9]+]][
CHECK:   scf.for %[[R2:[a-z_0-9]+]] =
CHECK:     vector.load %[[OWN]][%[[R2]],
""")
