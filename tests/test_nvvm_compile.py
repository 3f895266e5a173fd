"""The nvvm stages without a GPU: the distributed kernels, their PTX and what ptxas makes of them.

For a set of specs (prefill and decode classes, head dims, causal, masks, GQA,
Ev != E), compile for sm_90a and check: every work-group loop became one
kernel; the PTX has the tensor-core path (wgmma from swizzled shared memory
for prefills of head dims 64 and 128, else mma.sync m16n8k16 with ldmatrix,
.trans for V; cp.async copies into shared memory, ex2.approx, shuffles); the
staged tiles fit the 227 KB of shared memory; ptxas' registers and spills stay
within bounds (spills are what the reported speed was measured with).  A few
specs also for sm_80 (the same code for A100s).
"""

import json
import os
import re
from dataclasses import replace

import pytest

from torch_xegpu_attn.compiler import CompilationStopped, compile_spec
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec
from torch_xegpu_attn.targets import get_target

nvvm = get_target("nvvm")
# CI installs ptxas (requirements-test.txt): there these tests must run, not skip.
if os.environ.get("CI") and not nvvm.available()[0]:
    raise RuntimeError(f"CI must check the nvvm kernels, but: {nvvm.available()[1]}")
pytestmark = pytest.mark.skipif(not nvvm.available()[0], reason=f"no ptxas: {nvvm.available()[1]}")

PREFILL = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float16", target="nvvm", length_class="prefill")
SPECS = {
    "prefill-e64": PREFILL,
    "prefill-e64-causal": replace(PREFILL, causal=True),
    "prefill-e128-bf16": replace(PREFILL, head_dim=128, v_head_dim=128, dtype="bfloat16"),
    "prefill-e128-causal": replace(PREFILL, head_dim=128, v_head_dim=128, causal=True),
    "prefill-e256": replace(PREFILL, head_dim=256, v_head_dim=256),
    "prefill-e32-ev64": replace(PREFILL, head_dim=32, v_head_dim=64),
    "prefill-bool-mask": replace(PREFILL, mask=MaskSpec("bool", ("b", "l", "s"), "bool")),
    "prefill-additive-mask": replace(PREFILL, mask=MaskSpec("additive", ("s",), "float16")),
    "prefill-gqa": replace(PREFILL, group=4, causal=True),
    "long-e64-causal": replace(PREFILL, causal=True, length_class="long"),
    "long-e128-bf16": replace(PREFILL, head_dim=128, v_head_dim=128, dtype="bfloat16", length_class="long"),
    "long-e128-causal-bf16": replace(PREFILL, head_dim=128, v_head_dim=128, causal=True, dtype="bfloat16",
                                     length_class="long"),
    "decode-gqa": replace(PREFILL, group=4, head_dim=128, v_head_dim=128, dtype="bfloat16", length_class="decode"),
    "decode-mha": replace(PREFILL, length_class="decode"),
    "prefill-f32-causal": replace(PREFILL, dtype="float32", causal=True),
    "prefill-f32-e128-mask": replace(PREFILL, dtype="float32", head_dim=128, v_head_dim=128,
                                     mask=MaskSpec("additive", ("l", "s"), "float32")),
    "decode-f32-gqa": replace(PREFILL, dtype="float32", group=4, head_dim=256, v_head_dim=256,
                              length_class="decode"),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    found = {}
    for name, spec in SPECS.items():
        folder = tmp_path_factory.mktemp(name)
        artifact = compile_spec(spec, dump_dir=str(folder))
        ptx = next(folder.rglob("kernel.ptx")).read_text()
        found[name] = (spec, artifact, ptx)
    return found


@pytest.mark.parametrize("name", list(SPECS))
def test_kernels_and_ptx(compiled, name):
    spec, artifact, ptx = compiled[name]
    options = nvvm.options_for(spec)
    kernels = artifact.metadata["kernels"]
    assert len(kernels) == (2 if options.schedule.kv_splits > 1 else 1)  # work-group loop (+ combine)
    main = kernels[0]
    entries = re.findall(r"\.visible \.entry (\w+)\(", ptx)
    assert entries == [k["name"] for k in kernels]
    assert main["threads"] % 32 == 0 and main["shared_bytes"] <= 227 * 1024
    body = ptx.split(".entry " + main["name"])[1].split(".entry")[0]
    kind = "bf16" if spec.dtype == "bfloat16" else "f16"
    if spec.dtype == "float32":  # tf32 halves of each operand, three products (f32 accuracy)
        tensor_cores = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "cvt.rna.tf32.f32",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16")
        assert "m16n8k16" not in body and ".trans." not in body and "wgmma" not in body
        products = body.count("mma.sync.aligned.m16n8k8")
        assert products and products % 3 == 0, products
    elif options.warpgroup_mma:  # K and V read by wgmma from swizzled shared memory, Q by ldmatrix
        tensor_cores = (f"wgmma.mma_async.sync.aligned.m64n{options.schedule.kv_tile}k16.f32.{kind}.{kind}",
                        f"wgmma.mma_async.sync.aligned.m64n{spec.v_head_dim}k16.f32.{kind}.{kind}",
                        "wgmma.fence.sync.aligned", "wgmma.wait_group.sync.aligned 0",
                        "fence.proxy.async.shared::cta", "ldmatrix.sync.aligned.m8n8.x4.shared.b16")
        assert "mma.sync.aligned.m16n8k16" not in body and ".trans." not in body
        # QK^T: E / 16 slices, P.V: kv_tile / 16, one wgmma each per 16 rows of a warp; in each
        # key loop (two with a peeled tail)
        loops = 2 if options.schedule.tail == "peel" else 1
        assert body.count("wgmma.mma_async") == loops * (spec.head_dim + options.schedule.kv_tile) // 16
    else:
        tensor_cores = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
        assert "wgmma" not in body
    for needle in tensor_cores + ("cp.async.cg.shared.global", "cp.async.wait_group", "ex2.approx.ftz.f32",
                                  "shfl.sync.bfly.b32", "bar.sync"):
        assert needle in body, f"{needle} missing from {main['name']}"


def test_warpgroup_mma_where_it_applies():
    """sm_90a prefills of head dims 64 and 128 multiply with wgmma; other head dims, decode and
    sm_80 keep mma.sync."""
    for name, spec in SPECS.items():
        wgmma = (spec.length_class != "decode" and spec.dtype != "float32" and spec.head_dim in (64, 128)
                 and spec.v_head_dim in (64, 128))
        assert nvvm.options_for(spec, "sm_90a").warpgroup_mma == wgmma, name
        assert not nvvm.options_for(spec, "sm_80").warpgroup_mma, name


@pytest.mark.parametrize("name", list(SPECS))
def test_registers_and_spills(compiled, name):
    spec, artifact, _ = compiled[name]
    for kernel, report in artifact.metadata["resources"].items():
        assert report["registers"] <= 255
        # The measured kernels spill at most a few words (README); much more is a regression.
        assert report["spill_stores"] <= 128, f"{kernel}: {report}"
        assert not report.get("wgmma_serialized"), f"{kernel}: ptxas serialized its wgmma chains"


@pytest.mark.parametrize("name,rows", [("prefill-e64", 128), ("prefill-e64-causal", 128), ("prefill-e128-bf16", 128),
                                       ("long-e128-bf16", 128), ("prefill-e128-causal", 128),
                                       ("long-e64-causal", 128), ("long-e128-causal-bf16", 128),
                                       ("prefill-bool-mask", 128)])
def test_work_group_rows(compiled, name, rows):
    """128-row work-groups; with wgmma 8 warps of 16 rows (2 warpgroups), with mma.sync 4 warps
    of 32 rows.  (256-row ones, 8 warps of 32 rows, for long mma.sync prefills at D 65..128.)"""
    spec, artifact, _ = compiled[name]
    options = nvvm.options_for(spec)
    assert options.schedule.row_tile == rows
    per_warp = 16 if options.warpgroup_mma else 32
    assert artifact.metadata["kernels"][0]["threads"] == 32 * rows // per_warp
    wide = spec.length_class == "long" and spec.head_dim == 128
    assert nvvm.options_for(spec, "sm_80").schedule.row_tile == (256 if wide else 128)


@pytest.mark.parametrize("name", list(SPECS))
def test_copies_are_strength_reduced(compiled, name):
    """A K or V tile's copies advance one 64-bit offset by a row stride each, without a 64-bit
    product (nor a clamp) per copy: those made about a tenth of a step's instructions.  (A few
    products per tile remain: its first offset; the kernels had more products than copies.)"""
    _, artifact, ptx = compiled[name]
    main = artifact.metadata["kernels"][0]["name"]
    body = ptx.split(".entry " + main)[1].split(".entry")[0]
    copies, products = body.count("cp.async.cg.shared.global"), body.count("mul.lo.s64")
    assert copies and products <= copies // 3 + 8, (copies, products)


@pytest.mark.parametrize("name", list(SPECS))
def test_rescale_is_skipped_by_warps(compiled, name):
    """Lazy rescaling (128-row mma.sync prefill work-groups but unmasked non-causal D = 64: where
    the H200 measured it faster): each key loop's accumulator rescale (one mul.f32 per accumulator
    element of a lane) sits behind a vote.sync.any branch, once per flash loop (two with peeled
    tails).  Elsewhere no vote."""
    spec, artifact, ptx = compiled[name]
    options = nvvm.options_for(spec)
    plain_e64 = spec.mask is None and max(spec.head_dim, spec.v_head_dim) == 64 and not spec.causal
    lazy = spec.length_class != "decode" and options.schedule.row_tile == 128 and not plain_e64 and not options.warpgroup_mma
    assert options.schedule.rescale_threshold == (8.0 if lazy else 0.0)
    main = artifact.metadata["kernels"][0]["name"]
    body = ptx.split(".entry " + main)[1].split(".entry")[0]
    votes = re.findall(r"vote\.sync\.any\.pred\s+(%p\d+),", body)
    assert len(votes) == (0 if not lazy else 2 if options.schedule.tail == "peel" else 1), votes
    for vote in votes:  # the branch on the vote: skip when no row of the warp grew
        assert re.search(rf"not\.pred\s+(%p\d+), {vote};\s*@\1 bra|@!?{vote} bra", body), vote


@pytest.mark.parametrize("q_len,causal,e,mask,length_class,ampere", [
    (2048, False, 128, None, "prefill", "prefill"), (4096, False, 128, None, "prefill", "long"),
    (4096, False, 96, None, "long", "long"), (8192, True, 128, None, "prefill", "prefill"),
    (16384, True, 128, None, "prefill", "long"), (16384, True, 96, None, "long", "long"),
    (10 ** 5, False, 64, None, "prefill", "prefill"), (10 ** 5, True, 256, None, "prefill", "prefill"),
    (10 ** 5, False, 128, MaskSpec("bool", ("s",), "bool"), "prefill", "prefill")])
def test_long_class_only_where_tiles_change(q_len, causal, e, mask, length_class, ampere):
    """Only unmasked D 65..128 mma.sync prefills split into "prefill" and "long" (128- and
    256-row work-groups; on sm_90a D = 128 takes wgmma, with 128 rows at every length): any
    other spec has one class, so no two cache entries hold the same kernel."""
    from torch_xegpu_attn.spec import ProblemSize
    spec = replace(PREFILL, head_dim=e, v_head_dim=e, causal=causal, mask=mask, length_class="any")
    assert nvvm.length_class(ProblemSize(1, 4, q_len, q_len), spec) == length_class
    assert nvvm.length_class(ProblemSize(1, 4, q_len, q_len), spec, "sm_80") == ampere
    if length_class == "prefill":  # one class: the other would build the same kernel
        assert nvvm.options_for(replace(spec, length_class="long")) == nvvm.options_for(replace(spec, length_class="prefill"))


def test_causal_grids_go_in_head_chunks():
    for name, spec in SPECS.items():
        options = nvvm.options_for(spec)
        assert options.causal_head_chunk == (16 if spec.causal and spec.length_class != "decode" else 0), name


def test_eager_rescale_has_no_vote(tmp_path):
    spec = SPECS["prefill-e128-causal"]
    options = nvvm.options_for(spec).with_fields(rescale_threshold=0.0, warpgroup_mma=False, kv_tile=64)
    compile_spec(spec, dump_dir=str(tmp_path), options=options)
    ptx = next(tmp_path.rglob("kernel.ptx")).read_text()
    assert "vote.sync" not in ptx and "mma.sync.aligned.m16n8k16" in ptx


@pytest.mark.parametrize("name", ["prefill-e128-bf16", "prefill-e64"])
def test_prefetching_every_tile_builds(tmp_path, name):
    """prefetch="tiles" and "tiles-late" (the next step's K and V copied at the start of a step,
    or once its K tile is consumed): one wait for copies and one barrier per step of the key
    loop where "keys" has two of each."""
    waits = {}
    for mode in ("keys", "tiles", "tiles-late"):
        spec = SPECS[name]
        options = nvvm.options_for(spec).with_fields(prefetch=mode)
        folder = tmp_path / mode
        artifact = compile_spec(spec, dump_dir=str(folder), options=options)
        ptx = next(folder.rglob("kernel.ptx")).read_text()
        assert "cp.async.cg.shared.global" in ptx and ("wgmma.mma_async" if options.warpgroup_mma else
                                                       "mma.sync.aligned.m16n8k16") in ptx
        waits[mode] = ptx.count("cp.async.wait_group")
        for report in artifact.metadata["resources"].values():
            assert report["registers"] <= 255 and report["spill_stores"] <= 128
    assert waits["tiles"] < waits["keys"] and waits["tiles-late"] < waits["keys"], waits


def test_plain_e64_copies_tiles_late():
    """With mma.sync, unmasked non-causal D = 64 copies the next K and V tiles after QK^T
    (measured faster); causal, masked and D = 128 keep "keys".  With wgmma, D = 64 copies them
    at the start of a step, D = 128 keeps "keys"."""
    assert nvvm.options_for(SPECS["prefill-e64"], "sm_80").prefetch == "tiles-late"
    for name in ("prefill-e64-causal", "prefill-bool-mask", "prefill-e128-bf16", "long-e128-bf16", "decode-mha"):
        assert nvvm.options_for(SPECS[name], "sm_80").prefetch == "keys", name
    for name in ("prefill-e64", "prefill-e64-causal", "prefill-bool-mask"):
        assert nvvm.options_for(SPECS[name]).prefetch == "tiles", name
    for name in ("prefill-e128-bf16", "long-e128-bf16", "decode-mha", "prefill-e256"):
        assert nvvm.options_for(SPECS[name]).prefetch == "keys", name


def test_decode_packs_heads_and_splits_keys(compiled):
    spec, artifact, _ = compiled["decode-gqa"]
    options = nvvm.options_for(spec)
    assert options.schedule.pack_gqa and options.schedule.kv_splits > 1 and options.schedule.row_tile * spec.group == 16
    assert len(artifact.metadata["workspaces"]) == 3  # partial max, sum, accumulator
    # the split count is computed at run time from the sizes (the grid's expression holds it)
    split, combine = artifact.metadata["kernels"]
    assert options.schedule.split_fill and '"max"' in json.dumps(split["grid"])  # max(1, min(...))
    assert '"max"' not in json.dumps(combine["grid"])  # (b, h, g, r, value-column tile)
    assert combine["grid"][2] == ["const", spec.v_head_dim // options.schedule.combine_cols]


def test_decode_class_needs_enough_keys():
    from torch_xegpu_attn.spec import ProblemSize
    from torch_xegpu_attn.targets.nvvm import DECODE_MIN_KEYS
    gqa4 = replace(PREFILL, group=4)
    assert nvvm.length_class(ProblemSize(1, 8, 1, DECODE_MIN_KEYS), gqa4) == "decode"
    assert nvvm.length_class(ProblemSize(1, 8, 1, DECODE_MIN_KEYS - 1), gqa4) == "prefill"  # one launch
    assert nvvm.length_class(ProblemSize(1, 8, 5, 10 ** 5), gqa4) == "prefill"  # 20 rows > 16


def test_unsupported_specs_raise_before_compiling():
    with pytest.raises(NotImplementedError, match="float64"):
        nvvm.check(replace(PREFILL, dtype="float64"))
    nvvm.check(replace(PREFILL, dtype="float32"))  # f32 on tf32 halves
    with pytest.raises(NotImplementedError, match="multiples of 16"):
        nvvm.check(replace(PREFILL, head_dim=72, v_head_dim=72))


@pytest.mark.parametrize("name", ["prefill-e64-causal", "prefill-e128-bf16", "decode-gqa"])
def test_ampere_cubins(tmp_path, name):
    """The same mma.sync / ldmatrix / cp.async kernels for sm_80 (A100): PTX for that target,
    within Ampere's 164 KB of shared memory per block, bounded spills (not run: no A100 here)."""
    spec = SPECS[name]
    artifact = compile_spec(spec, dump_dir=str(tmp_path), options=nvvm.options_for(spec, "sm_80"))
    ptx = next(tmp_path.rglob("kernel.ptx")).read_text()
    assert artifact.metadata["arch"] == "sm_80" and re.search(r"^\.target sm_80\b", ptx, re.M)
    assert "mma.sync.aligned.m16n8k16" in ptx and "cp.async.cg.shared.global" in ptx
    for kernel in artifact.metadata["kernels"]:
        assert kernel["shared_bytes"] <= 164 * 1024
    for report in artifact.metadata["resources"].values():
        assert report["registers"] <= 255 and report["spill_stores"] <= 128


# ------------------------------------------------------------------------------------ layouts


def _layouts_dump(spec, folder) -> str:
    with pytest.raises(CompilationStopped):
        compile_spec(spec, dump_dir=str(folder), stop_after="nvvm-layouts")
    return next(folder.rglob("*-nvvm-layouts.mlir")).read_text()


def _annotated(dump: str, op_name: str):
    """The attn.layouts strings of each `op_name` op in a dump (generic or pretty form)."""
    found = []
    for line in dump.splitlines():
        if re.search(rf"\b{re.escape(op_name)}\b", line) and "attn.layouts" in line:
            found.append(re.search(r'attn\.layouts = \[((?:"[^"]*"(?:, )?)*)\]', line).group(1))
    return found


@pytest.mark.parametrize("name", ["prefill-e64-causal", "decode-gqa", "prefill-f32-e128-mask"])
def test_layouts_stage_shows_the_assignment(name, tmp_path):
    """The nvvm-layouts stage writes each vector value's layouts on its op: contractions give
    tiles, row reductions row vectors, the tiles read only for contractions are staged in shared
    memory; packed query heads (decode) split the row into (row/R, row%R)."""
    dump = _layouts_dump(SPECS[name], tmp_path)
    contracts = _annotated(dump, "vector.contract")
    assert contracts and all(c.startswith('"tile[row, col] cols=') for c in contracts), contracts
    reductions = _annotated(dump, "vector.multi_reduction")
    assert reductions and all(r.startswith('"rows[') for r in reductions), reductions
    assert _annotated(dump, "vector.transfer_read").count('"staged"') >= 2
    assert ("row/" in dump and "row%" in dump) == (name == "decode-gqa")


def test_kernels_are_built_from_the_written_layouts(tmp_path, monkeypatch):
    """nvvm-kernels distributes by what nvvm-layouts wrote: without it, it says so."""
    from torch_xegpu_attn.mlir_utils import CompileError
    from torch_xegpu_attn.targets.nvvm import analysis
    monkeypatch.setattr(analysis.LayoutAnalysis, "annotate", lambda self: None)
    with pytest.raises(CompileError, match="attn.layouts"):
        compile_spec(SPECS["prefill-e64"], dump_dir=str(tmp_path))


def test_layout_text_round_trips():
    from torch_xegpu_attn.targets.nvvm.layout import (COL, ROW, ROW_DIV, ROW_MOD, UNIT, Axis, Layout,
                                                      parse_layout)
    layouts = [Layout((Axis(ROW),)), Layout((Axis(ROW), Axis(COL)), 64), Layout((Axis(COL),), 128),
               Layout((Axis(ROW_DIV, 16), Axis(ROW_MOD, 16), Axis(COL)), 32), Layout((Axis(UNIT), Axis(ROW))),
               Layout(())]
    for layout in layouts:
        assert parse_layout(layout.text()) == layout, layout.text()
    for bad in ("tile[row]", "rows[row, colx]", "cols[col] cols=", "grid[row]"):
        with pytest.raises(ValueError):
            parse_layout(bad)


# ----------------------------------------------------------------------------------- backward

BACKWARD = replace(PREFILL, kernel="backward")
BACKWARD_SPECS = {
    "backward-e64": BACKWARD,
    "backward-e128-causal-bf16": replace(BACKWARD, head_dim=128, v_head_dim=128, causal=True, dtype="bfloat16"),
    "backward-gqa-bool-mask": replace(BACKWARD, group=4, mask=MaskSpec("bool", ("b", "l", "s"), "bool")),
    "backward-e32-ev64-additive": replace(BACKWARD, head_dim=32, v_head_dim=64,
                                          mask=MaskSpec("additive", ("s",), "float16")),
    "backward-f32-causal": replace(BACKWARD, dtype="float32", causal=True),
    "backward-e256-bf16": replace(BACKWARD, head_dim=256, v_head_dim=256, dtype="bfloat16"),
    "backward-dropout-gqa-causal": replace(BACKWARD, group=2, causal=True, dropout_p=0.2),
}


@pytest.fixture(scope="module")
def compiled_backward(tmp_path_factory):
    found = {}
    for name, spec in BACKWARD_SPECS.items():
        folder = tmp_path_factory.mktemp(name)
        artifact = compile_spec(spec, dump_dir=str(folder))
        found[name] = (spec, artifact, next(folder.rglob("kernel.ptx")).read_text(),
                       next(folder.rglob("*-nvvm-layouts.mlir")).read_text(),
                       next(folder.rglob("*-nvvm-kernels.mlir")).read_text())
    return found


def _contractions_per_step(spec, options):
    """mma.sync m16n8k16 of one step of the dQ loop (S = Q K^T, dP = dOut V^T, dQ += dS K) and of
    the dK/dV loop (S^T = K Q^T, dP^T = V dOut^T, dV += P^T dOut, dK += dS^T Q), or, with
    backward_dkv "apart", of the dK loop (S^T, dP^T, dK) and the dV loop (S^T, dV); per 16
    rows of a warp: (n / 8) * (k / 16) each; with wgmma one instruction a k16 slice (n = 8)."""
    r, t, e, ev = options.schedule.row_tile, options.schedule.kv_tile, spec.head_dim, spec.v_head_dim
    if options.warpgroup_mma:  # k / 16 each: dQ's k is the key tile, dK's and dV's the row tile
        dq, scores, dp, dkv = e // 16 + ev // 16 + t // 16, e // 16, ev // 16, r // 16
        return [dq, scores + dp + 2 * dkv]
    dq = (t // 8) * (e // 16) + (t // 8) * (ev // 16) + (e // 8) * (t // 16)
    scores, dp, dv, dk = (r // 8) * (e // 16), (r // 8) * (ev // 16), (ev // 8) * (r // 16), (e // 8) * (r // 16)
    if options.schedule.backward_dkv == "apart":
        return [dq, scores + dp + dk, scores + dv]
    return [dq, scores + dp + dv + dk]


@pytest.mark.parametrize("name", list(BACKWARD_SPECS))
def test_backward_kernels(compiled_backward, name):
    """The backward's three work-group loops as three kernels (Delta, dQ, dK/dV), launched in that
    order; the five contractions on the tensor cores (mma.sync: 16-bit operands, P and dS
    rounded; f32 on tf32 halves), B operands read from staged tiles in both orientations (ldmatrix
    and ldmatrix.trans: Q and dOut are n of S^T and dP^T and k of dK and dV), registers within
    bounds and few spills."""
    spec, artifact, ptx, _, _ = compiled_backward[name]
    options = nvvm.options_for(spec)
    assert options.schedule.backward_tiles == "keys_by_rows" and options.schedule.backward_dq == "second_pass"
    wgmma = spec.dtype != "float32" and spec.head_dim in (64, 128) and spec.v_head_dim in (64, 128)
    assert options.schedule.backward_delta == "reduction" and options.warpgroup_mma == wgmma
    assert options.schedule.backward_dkv == ("apart" if max(spec.head_dim, spec.v_head_dim) > 128 else "together")
    delta, *loops = artifact.metadata["kernels"]  # Delta, dQ, then dK/dV (or dK and dV)
    entries = re.findall(r"\.visible \.entry (\w+)\(", ptx)
    assert entries == [k["name"] for k in artifact.metadata["kernels"]]
    bodies = {k["name"]: ptx.split(".entry " + k["name"])[1].split(".entry")[0] for k in artifact.metadata["kernels"]}
    assert "mma.sync" not in bodies[delta["name"]] and "shfl.sync.bfly.b32" in bodies[delta["name"]]
    per_step = _contractions_per_step(spec, options)
    assert len(loops) == len(per_step)
    per_step = dict(zip((k["name"] for k in loops), per_step))
    for kernel in loops:
        body = bodies[kernel["name"]]
        assert kernel["shared_bytes"] <= 227 * 1024 and "cp.async.cg.shared.global" in body
        if spec.dtype == "float32":
            assert body.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == 3 * 2 * per_step[kernel["name"]]
            continue
        kind = "bf16" if spec.dtype == "bfloat16" else "f16"
        if wgmma:  # one wgmma a k16 slice of each contraction (every m-tile of the warpgroup)
            assert "mma.sync" not in body and body.count("wgmma.mma_async") == per_step[kernel["name"]]
            # one group a contraction; with mma_overlap a chain is waited for at its result's
            # first use, S's while dP's is in flight (unless dropout reads dP at once), else at once
            waits = re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+);", body)
            assert body.count("wgmma.commit_group") == len(waits) or options.mma_overlap
            assert ("1" in waits) == (options.mma_overlap and not spec.dropout_p) and set(waits) <= {"0", "1"}
            continue
        assert body.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32") == per_step[kernel["name"]]
        assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in body
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body
    for kernel, report in artifact.metadata["resources"].items():
        assert report["registers"] <= 255 and report["spill_stores"] <= 128, (kernel, report)


def test_backward_layouts_follow_the_data_flow(compiled_backward):
    """In the dK/dV kernel's dump (keys x rows tiles) the per-row terms (lse, Delta) are column
    vectors ("cols[col]"), read where they broadcast along columns; K and V are staged outside the
    loop (left operands held in registers), Q and dOut inside it (right operands of both
    orientations); P^T and dS^T are register tiles rounded for their contractions."""
    _, _, _, dump, _ = compiled_backward["backward-e64"]
    dkv = dump.split("attn.backward_dq")[-1]  # the last loop, after the dQ loop's attribute
    loop_start = dkv.index("scf.for ")
    outside, inside = dkv[:loop_start], dkv[loop_start:dkv.index("scf.yield", loop_start)]
    assert _annotated(outside, "vector.transfer_read") == ['"staged"', '"staged"']
    reads = _annotated(inside, "vector.transfer_read")
    assert reads.count('"staged"') == 2 and reads.count('"cols[col] cols=64"') == 2, reads
    assert _annotated(inside, "arith.truncf") == ['"tile[row, col] cols=64"'] * 2


@pytest.mark.parametrize("tiles", [{"kv_tile": 128}, {"kv_tile": 32, "warpgroup_mma": False}])
def test_backward_loops_get_a_thread_block_each(tiles, tmp_path):
    """With key tiles unlike the row tiles, the dK/dV loop's work-group holds kv_tile keys (the
    schedule's attn.rows): its kernel gets its own thread block (16 keys a warp), the Delta and dQ
    kernels the row tile's, and the layouts dump names each loop's."""
    spec = BACKWARD_SPECS["backward-e64"]
    options = nvvm.options_for(spec).with_fields(**tiles)
    artifact = compile_spec(spec, dump_dir=str(tmp_path), options=options)
    threads = [k["threads"] for k in artifact.metadata["kernels"]]
    rows, keys = options.schedule.row_tile, options.schedule.kv_tile
    assert threads == [2 * rows, 2 * rows, 2 * keys]
    dump = next(tmp_path.rglob("*-nvvm-layouts.mlir")).read_text()
    geometries = re.findall(r'attn.geometry = "rows=(\d+) warps=(\d+) m_tiles=1"', dump)
    assert geometries == [(str(rows), str(rows // 16))] * 2 + [(str(keys), str(keys // 16))]
    for report in artifact.metadata["resources"].values():
        assert report["registers"] <= 255 and report["spill_stores"] <= 128, report


def test_min_blocks_bounds_the_contracting_kernels(tmp_path):
    """min_blocks=3: the backward's kernels that contract (dQ, dK/dV) declare .minnctapersm 3 and
    fit three work-groups' registers into the register file; the Delta kernel (no contraction,
    bound by memory) declares nothing."""
    spec = BACKWARD_SPECS["backward-e64"]
    artifact = compile_spec(spec, dump_dir=str(tmp_path), options=nvvm.options_for(spec).with_fields(min_blocks=3))
    ptx = next(tmp_path.rglob("kernel.ptx")).read_text()
    entries = dict(re.findall(r"\.visible \.entry (\w+)\((.*?)(?=\.visible \.entry|\Z)", ptx, re.S))
    assert len(entries) == len(artifact.metadata["kernels"]) == 3
    for kernel in artifact.metadata["kernels"]:
        body = entries[kernel["name"]]
        contracts = "wgmma.mma_async" in body or "mma.sync.aligned" in body
        assert (".minnctapersm 3" in body) == contracts, kernel["name"]
        if contracts:
            assert artifact.metadata["resources"][kernel["name"]]["registers"] * kernel["threads"] * 3 <= 65536
    assert sum(".minnctapersm" in body for body in entries.values()) == 2
    with pytest.raises(ValueError, match="min_blocks"):
        nvvm.options_for(spec).with_fields(min_blocks=-1)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_wide_gradients_are_stored_in_float32(arch, tmp_path):
    """Gradients the frontend sums over broadcast dims (the spec's wide_gradients): the dK/dV
    kernel stores dK and dV as pairs of float32 (st.global.v2.b32), the dQ kernel dQ as pairs of
    halves (st.global.b32) as before."""
    spec = replace(BACKWARD, group=2, wide_gradients=("dk", "dv"))
    artifact = compile_spec(spec, dump_dir=str(tmp_path), options=nvvm.options_for(spec, arch))
    ptx = next(tmp_path.rglob("kernel.ptx")).read_text()
    _, dq, dkv = (ptx.split(".entry " + k["name"])[1].split(".entry")[0] for k in artifact.metadata["kernels"])
    assert set(re.findall(r"st\.global[.\w]*", dq)) == {"st.global.b32"}
    assert set(re.findall(r"st\.global[.\w]*", dkv)) == {"st.global.v2.b32"}


def test_backward_on_ampere(tmp_path):
    spec = BACKWARD_SPECS["backward-e128-causal-bf16"]
    artifact = compile_spec(spec, dump_dir=str(tmp_path), options=nvvm.options_for(spec, "sm_80"))
    ptx = next(tmp_path.rglob("kernel.ptx")).read_text()
    assert re.search(r"^\.target sm_80\b", ptx, re.M) and "mma.sync.aligned.m16n8k16" in ptx
    assert all(k["shared_bytes"] <= 164 * 1024 for k in artifact.metadata["kernels"])


@pytest.mark.parametrize("kernel", ["forward", "forward_lse"])
def test_dropout_draws_in_the_forward_kernels(kernel, tmp_path):
    """Dropout's generator (Philox4x32-10 on each score's coordinates, shared payload) distributes
    like any elementwise op on the score tile: the forward keeps its tensor cores (wgmma on
    sm_90a at E = 64), the seed is a kernel operand, and the 32x32-bit products of the rounds are
    in the PTX, without spills."""
    spec = replace(PREFILL, kernel=kernel, dropout_p=0.3)
    artifact = compile_spec(spec, dump_dir=str(tmp_path))
    ptx = next(tmp_path.rglob("kernel.ptx")).read_text()
    assert [o["name"] for o in artifact.metadata["operands"]][3] == "seed"
    assert ("wgmma.mma_async" in ptx) == nvvm.options_for(spec).warpgroup_mma
    assert "mma" in ptx and ptx.count("mul.hi.u32") + ptx.count("mul.wide.u32") >= 10
    for report in artifact.metadata["resources"].values():
        assert report["spill_stores"] == 0, report


# ------------------------------------------------------------------------- the copy pipeline


def _pipeline_violations(kernels_dump: str):
    """Reads of a shared-memory tile in a key loop's body that may run before the cp.async copy
    into that tile (this step's stage) is complete: the body's copies, commits and waits replayed
    in program order (copies in scf.if branches counted as issued; `wait_group N` completes all
    but the N newest committed groups).  At the body's start whatever a step before committed is
    pending until a wait completes it.  Reads: ldmatrix and loads of a staged (stage, row, col)
    view; a copy and a read touch the same tile when they name the same view and stage value."""
    from mlir import ir as mlir_ir
    from torch_xegpu_attn.mlir_utils import mlir_context

    found = []
    with mlir_context():
        module = mlir_ir.Module.parse(kernels_dump)

        def ops_in(block):
            for op in block.operations:
                op = op.operation
                yield op
                if op.name == "scf.if":
                    for region in op.regions:
                        for inner in region.blocks:
                            yield from ops_in(inner)

        def walk_loops(op):
            for region in op.regions:
                for block in region.blocks:
                    for inner in block.operations:
                        inner = inner.operation
                        if inner.name == "scf.for":
                            yield inner
                        yield from walk_loops(inner)

        for loop in walk_loops(module.operation):
            body = list(ops_in(loop.regions[0].blocks[0]))
            if not any(op.name == "nvgpu.device_async_copy" for op in body):
                continue
            committed, current = [[("any", None)]], []   # groups of (view, stage); the step before
            for op in body:
                if op.name == "nvgpu.device_async_copy":
                    view = op.opview.dst
                    stage = list(op.opview.dstIndices)[0] if len(list(op.opview.dstIndices)) == 3 else None
                    current.append((view, stage))
                elif op.name == "nvvm.cp.async.commit.group":
                    committed.append(current)
                    current = []
                elif op.name == "nvvm.cp.async.wait.group":
                    keep = mlir_ir.IntegerAttr(op.attributes["n"]).value
                    committed = committed[len(committed) - keep:] if keep else []
                elif op.name in ("nvgpu.ldmatrix", "memref.load"):
                    view = op.operands[0]
                    indices = list(op.operands[1:])
                    if "workgroup" not in str(view.type) or len(indices) != 3:
                        continue
                    for group in committed + [current]:
                        for copied, stage in group:
                            if copied == "any" or (copied == view and stage == indices[0]):
                                found.append(f"{op.name} of {view.get_name()} before its copy completed")
    return found


@pytest.mark.parametrize("name", list(BACKWARD_SPECS))
def test_backward_reads_wait_for_their_copies(compiled_backward, name):
    """No read of a staged tile in a loop of the backward's kernels races with its copy (a K tile
    of the dQ loop feeds two contractions; the copy of the next one once came after V's wait,
    which then let V's copy run on)."""
    assert _pipeline_violations(compiled_backward[name][4]) == []


@pytest.mark.parametrize("name", ["prefill-e128-causal", "prefill-bool-mask", "decode-gqa", "prefill-f32-causal",
                                  "prefill-e64"])
@pytest.mark.parametrize("prefetch", ["keys", "tiles", "tiles-late"])
def test_forward_reads_wait_for_their_copies(name, prefetch, tmp_path):
    """The same for the forward's key loops under every prefetch mode (mma.sync: sm_80, whose reads
    are ldmatrix, where sm_90a's wgmma reads through descriptors)."""
    spec = SPECS[name]
    options = nvvm.options_for(spec, "sm_80").with_fields(prefetch=prefetch)
    compile_spec(spec, dump_dir=str(tmp_path), options=options)
    dump = next(tmp_path.rglob("*-nvvm-kernels.mlir")).read_text()
    assert _pipeline_violations(dump) == []
