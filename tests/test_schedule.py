"""The shared stages driven with GPU-like ScheduleOptions, checked on the IR and through the cpu target.

The cpu target's own options (row tile 4, kv tile 64, ...) are only one point
of the space the shared stages must serve; a GPU target picks row tiles of
64 or 128, explicit or folded K transposes, P.V on rounded probabilities,
packed query heads, split keys.  For each option set of OPTION_SETS:

  * structure (IR after "bufferized", see ir_structure.py): one work-group
    loop, five dims, normalized, mapped as documented; the flash loops carry
    exactly m, l (vector<rows>) and acc (vector<rows x Ev>); no contraction
    has a shape other than the tile's (no odd-size tail tile in mask mode);
    Q is read once, before the key loop; no allocation inside a work-group;
  * numerics: the op, with XEGPU_ATTN_SCHEDULE set to the option set, runs
    the kernel compiled with those options on the cpu target, against the
    float64 reference (2x SDPA's error plus floor, outputs poisoned), on
    problems with row and key tails, causal, masks and GQA.
"""

import json
import re
from dataclasses import replace

import pytest
import torch
from mlir import ir as mlir_ir

from conftest import check
from ir_structure import describe
from torch_xegpu_attn import knobs
from torch_xegpu_attn.compiler import CompilationStopped, compile_spec
from torch_xegpu_attn.mlir_utils import mlir_context, walk
from torch_xegpu_attn.schedule.options import ScheduleOptions
from torch_xegpu_attn.schedule.tiling import WORK_GROUP_ROWS
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec

#: named option sets (fields of ScheduleOptions); the first few are what GPU targets pick.
OPTION_SETS = {
    "gpu-64x64-folded-lowp": dict(row_tile=64, kv_tile=64, k_layout="folded", pv_in_f32=False),
    "gpu-128x64-explicit-lowp": dict(row_tile=128, kv_tile=64, k_layout="explicit", pv_in_f32=False),
    "gpu-64x32-explicit-packed": dict(row_tile=16, kv_tile=32, k_layout="explicit", pack_gqa=True,
                                      pv_in_f32=False),
    "gpu-decode-split4-packed": dict(row_tile=1, kv_tile=32, pack_gqa=True, kv_splits=4, pv_in_f32=False),
    "16x16-peel": dict(row_tile=16, kv_tile=16, tail="peel"),
    "32x16-explicit-peel": dict(row_tile=32, kv_tile=16, k_layout="explicit", tail="peel"),
    "8x16-materialized-peel": dict(row_tile=8, kv_tile=16, k_layout="materialized", tail="peel"),
    "16x32-materialized": dict(row_tile=16, kv_tile=32, k_layout="materialized"),
    "8x16-split3": dict(row_tile=8, kv_tile=16, kv_splits=3),
    "16x16-split2-explicit-packed": dict(row_tile=16, kv_tile=16, k_layout="explicit", kv_splits=2,
                                         pack_gqa=True),
    # P chosen at run time (what nvvm's decode does): at most 8, 24 work-groups, 16+ keys each;
    # the combine in tiles of 16 value columns
    "gpu-decode-runtime-split-packed": dict(row_tile=1, kv_tile=16, pack_gqa=True, kv_splits=8, split_fill=24,
                                            split_min_keys=16, combine_cols=16, pv_in_f32=False),
    # lazy rescaling (what nvvm picks): the running maximum moves only by more than 2^8
    "gpu-128x64-folded-lowp-lazy8": dict(row_tile=128, kv_tile=64, pv_in_f32=False, rescale_threshold=8.0),
    "8x16-split3-lazy2": dict(row_tile=8, kv_tile=16, kv_splits=3, rescale_threshold=2.0),
}

#: specs the structure is checked on (lengths are run-time: one kernel serves every shape; the
#: cpu target's own options are those of its "short" class, the schedule the option set's).
SPECS = {
    "plain": AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float16", length_class="short"),
    "causal-gqa": AttentionSpec(group=4, head_dim=64, v_head_dim=32, dtype="bfloat16", causal=True,
                                length_class="short"),
    "mask-gqa": AttentionSpec(group=2, head_dim=32, v_head_dim=32, dtype="float32",
                              mask=MaskSpec("additive", ("b", "g", "l", "s"), "float32"), length_class="short"),
}


def options(name: str) -> ScheduleOptions:
    return ScheduleOptions(**OPTION_SETS[name])


def bufferized_ir(spec: AttentionSpec, opts: ScheduleOptions) -> str:
    with pytest.raises(CompilationStopped) as stopped:
        compile_spec(spec, stop_after="bufferized", dump_dir="", options=opts)
    return stopped.value.ir


MAPPING = [f"#gpu.block<linear_dim_{i}>" for i in (4, 3, 2, 1, 0)]


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_structure(option_set, spec_name):
    spec, opts = SPECS[spec_name], options(option_set)
    ir = describe(bufferized_ir(spec, opts))
    work_groups = [loop for loop in ir.loops if "attn.work_groups" in loop["attrs"]]
    assert len(work_groups) == 1, ir.loops
    (loop,) = work_groups
    assert loop["rank"] == 5 and loop["normalized"] and loop["mapping"] == MAPPING
    others = [loop for loop in ir.loops if "attn.work_groups" not in loop["attrs"]]
    expected_others = (["attn.k_transpose"] if opts.k_layout == "materialized" else []) + \
                      (["attn.combine"] if opts.kv_splits > 1 else [])
    assert sorted(a for loop in others for a in loop["attrs"]) == sorted(expected_others)
    assert all(loop["normalized"] and loop["mapping"] is not None for loop in others)

    rows = opts.row_tile * (spec.group if opts.pack_gqa else 1)
    ev, e = spec.v_head_dim, spec.head_dim
    carried = [f"vector<{rows}xf32>", f"vector<{rows}xf32>", f"vector<{rows}x{ev}xf32>"]
    assert ir.flash_loops == [carried] * (2 if opts.tail == "peel" else 1)

    # QK^T: (rows x E) . K tile -> rows x tile; P.V: (rows x tile) . (tile x Ev).  Full tiles
    # only, in both tail modes: no odd-size tail contraction.
    t = opts.kv_tile
    k = (e, t) if opts.k_layout in ("explicit", "materialized") else (t, e)
    assert set(ir.contractions) == {((rows, e), k, (rows, t)), ((rows, t), (t, ev), (rows, ev))}, ir.contractions
    assert ir.q_reads_outside_loops == 1 and ir.q_reads_inside_loops == 0
    assert ir.allocations_in_loops == 0
    assert (ir.transposes_in_flash_loops > 0) == (opts.k_layout == "explicit")


def test_no_odd_tile():
    # The shapes the review found: L=S=100 at row tile 64 gave 64x36 and 36x36 tiles.
    # With run-time lengths no shape is compiled in: only full tiles, in both tail modes.
    for name in ("gpu-64x64-folded-lowp", "16x16-peel"):
        ir = describe(bufferized_ir(SPECS["plain"], options(name)))
        t = OPTION_SETS[name]["row_tile"]
        assert {shape for c in ir.contractions for shape in c} <= {(t, 64), (t, t), (64, 64)}


def test_options_are_validated():
    with pytest.raises(ValueError, match="k_layout"):
        ScheduleOptions(row_tile=4, kv_tile=16, k_layout="sideways")
    with pytest.raises(ValueError, match="tail"):
        ScheduleOptions(row_tile=4, kv_tile=16, tail="ignore")
    with pytest.raises(TypeError):  # a target's knob is not the shared schedule's
        ScheduleOptions(row_tile=4, kv_tile=16, transpose_tile=(8, 16))
    with pytest.raises(ValueError, match="rescale_threshold"):
        ScheduleOptions(row_tile=4, kv_tile=16, rescale_threshold=16.0)
    with pytest.raises(Exception, match="split keys need tail='mask'"):
        compile_spec(SPECS["plain"], stop_after="flash", dump_dir="",
                     options=ScheduleOptions(row_tile=4, kv_tile=16, tail="peel", kv_splits=2))


def test_target_options_are_validated(monkeypatch):
    """Each target's own knobs live in its frozen options, validated there, and overrides reach
    them through XEGPU_ATTN_SCHEDULE like the schedule's."""
    from torch_xegpu_attn.targets import get_target
    from torch_xegpu_attn.targets.cpu import CpuOptions
    from torch_xegpu_attn.targets.nvvm import NvvmOptions
    materialized = ScheduleOptions(row_tile=4, kv_tile=16, k_layout="materialized")
    with pytest.raises(ValueError, match="transpose_tile"):
        CpuOptions(materialized, transpose_tile=(8, 12))
    with pytest.raises(ValueError, match="prefetch"):
        NvvmOptions(materialized, prefetch="sideways")
    with pytest.raises(ValueError, match="sm_90a"):
        NvvmOptions(materialized, arch="sm_80", warpgroup_mma=True)
    spec = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float16", length_class="prefill")
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps({"prefetch": "tiles", "kv_tile": 32}))
    options = get_target("nvvm").options_for(spec, "sm_80")
    assert (options.prefetch, options.schedule.kv_tile, options.arch) == ("tiles", 32, "sm_80")
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps({"prefetch": "tiles"}))
    with pytest.raises(knobs.KnobError, match="prefetch"):  # the cpu target has no such knob
        get_target("cpu").options_for(replace(spec, dtype="float32", length_class="short"))


# ----------------------------------------------------------------------------- numerics


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


#: problems with row tails (L not a multiple of any row tile), key tails, L != S.
def case_plain(dt):
    return (rand(2, 3, 37, 64, dtype=dt), rand(2, 3, 100, 64, dtype=dt), rand(2, 3, 100, 64, dtype=dt)), {}


def case_causal_gqa(dt):
    return ((rand(1, 8, 70, 64, dtype=dt), rand(1, 2, 70, 64, dtype=dt), rand(1, 2, 70, 32, dtype=dt)),
            dict(is_causal=True, enable_gqa=True))


def case_mask_gqa(dt):
    mask = torch.randn(2, 4, 19, 45).masked_fill(torch.rand(2, 4, 19, 45) > 0.7, float("-inf"))
    mask[1, :, 3] = float("-inf")  # a fully masked row gives 0
    return ((rand(2, 4, 19, 32, dtype=dt), rand(2, 2, 45, 32, dtype=dt), rand(2, 2, 45, 32, dtype=dt)),
            dict(attn_mask=mask.to(dt), enable_gqa=True))


def case_decode_gqa(dt):
    return (rand(3, 8, 1, 64, dtype=dt), rand(3, 2, 77, 64, dtype=dt), rand(3, 2, 77, 64, dtype=dt)), \
        dict(enable_gqa=True)


CASES = {"plain": case_plain, "causal-gqa": case_causal_gqa, "mask-gqa": case_mask_gqa,
         "decode-gqa": case_decode_gqa}

#: (option set, case, dtype) run numerically: every option set meets tails; each feature
#: meets the option sets that change how it is built.
NUMERICS = [
    ("gpu-64x64-folded-lowp", "plain", torch.float16),
    ("gpu-64x64-folded-lowp", "causal-gqa", torch.bfloat16),
    ("gpu-128x64-explicit-lowp", "causal-gqa", torch.float16),
    ("gpu-64x32-explicit-packed", "mask-gqa", torch.float16),
    ("gpu-64x32-explicit-packed", "causal-gqa", torch.float32),
    ("gpu-decode-split4-packed", "decode-gqa", torch.bfloat16),
    ("gpu-decode-split4-packed", "causal-gqa", torch.float32),
    ("16x16-peel", "plain", torch.float32),
    ("16x16-peel", "causal-gqa", torch.float32),
    ("32x16-explicit-peel", "mask-gqa", torch.float32),
    ("8x16-materialized-peel", "causal-gqa", torch.float16),
    ("16x32-materialized", "plain", torch.bfloat16),
    ("16x32-materialized", "mask-gqa", torch.float32),
    ("8x16-split3", "plain", torch.float32),
    ("8x16-split3", "causal-gqa", torch.float32),
    ("16x16-split2-explicit-packed", "mask-gqa", torch.float32),
    ("16x16-split2-explicit-packed", "decode-gqa", torch.float16),
    ("gpu-decode-runtime-split-packed", "decode-gqa", torch.bfloat16),
    ("gpu-decode-runtime-split-packed", "mask-gqa", torch.float32),
    ("gpu-128x64-folded-lowp-lazy8", "plain", torch.float16),
    ("gpu-128x64-folded-lowp-lazy8", "causal-gqa", torch.bfloat16),
    ("gpu-128x64-folded-lowp-lazy8", "mask-gqa", torch.float32),
    ("8x16-split3-lazy2", "decode-gqa", torch.float16),
    ("8x16-split3-lazy2", "causal-gqa", torch.float32),
]


@pytest.mark.parametrize("option_set,case,dtype", NUMERICS,
                         ids=[f"{o}-{c}-{str(d)[6:]}" for o, c, d in NUMERICS])
def test_numerics(option_set, case, dtype, monkeypatch, fresh_seed):
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(OPTION_SETS[option_set]))
    (q, k, v), kw = CASES[case](dtype)
    check(q, k, v, **kw)


def growing_scores(batch, heads, q_len, kv_len, dim, dtype):
    """q, k, v whose scores grow along the keys (key s scaled by up to 12x): the running
    maximum of a row moves by more than any threshold from tile to tile, and stays put
    on other rows (negated queries: their maximum is in the first tile)."""
    q, k, v = rand(batch, heads, q_len, dim), rand(batch, heads, kv_len, dim), rand(batch, heads, kv_len, dim)
    k = k.abs() * torch.linspace(0.1, 12.0, kv_len)[:, None] / dim ** 0.5
    q = q.abs()
    q[..., 1::2, :] *= -1
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 8.0])
@pytest.mark.parametrize("splits", [1, 3])
def test_lazy_rescale_is_exact(threshold, splits, monkeypatch, fresh_seed):
    # Rows whose maximum grows past the threshold rescale, the others keep a stale maximum
    # (exponentials up to 2^t); split partials carry their own stale maxima into the merge.
    # A fully masked row still gives 0.
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tile=8, kv_tile=16, kv_splits=splits,
                                                              rescale_threshold=threshold)))
    q, k, v = growing_scores(2, 2, 21, 150, 32, torch.float32)
    check(q, k, v)
    check(q, k, v, is_causal=True)
    mask = torch.rand(21, 150) > 0.3
    mask[5] = False
    check(q, k, v, attn_mask=mask)
    q, k, v = growing_scores(1, 2, 21, 150, 32, torch.bfloat16)
    check(q, k, v)


@pytest.mark.parametrize("splits", [2, 3, 4, 7])
@pytest.mark.parametrize("kv_len", [20, 100, 129])
def test_split_keys_merge_exactly(splits, kv_len, monkeypatch, fresh_seed):
    # P that does not divide the number of key tiles (7 at S=100, kv tile 16), and more
    # splits than tiles (S=20: 2 tiles, some splits empty); causal makes shares uneven.
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tile=8, kv_tile=16, kv_splits=splits)))
    check(rand(1, 2, 9, 32), rand(1, 2, kv_len, 32), rand(1, 2, kv_len, 32))
    check(rand(1, 2, kv_len, 32), rand(1, 2, kv_len, 32), rand(1, 2, kv_len, 32), is_causal=True)


@pytest.mark.parametrize("batch,kv_len", [(1, 5), (1, 40), (1, 100), (2, 129), (5, 300)])
def test_run_time_split_counts(batch, kv_len, monkeypatch, fresh_seed):
    # One kernel; P = max(1, min(8, ceil(12 / work-groups), ceil(S / 32))) differs per call:
    # 1 (S=5), 2 (S=40), 3/4 (S=100, 129: capped by the fill at B=2), 2 (B=5: 10 groups).
    from torch_xegpu_attn import COUNTERS
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tile=8, kv_tile=16, kv_splits=8, split_fill=12,
                                                              split_min_keys=32, combine_cols=8)))
    before = COUNTERS["compilations"]
    check(rand(batch, 2, 9, 32), rand(batch, 2, kv_len, 32), rand(batch, 2, kv_len, 32))
    check(rand(batch, 2, 9, 32), rand(batch, 2, kv_len, 32), rand(batch, 2, kv_len, 32), is_causal=True)
    assert COUNTERS["compilations"] - before <= 2


def test_options_change_the_kernel(monkeypatch, fresh_seed):
    # Same spec, other options: a new compilation, never the binary built with the first.
    from torch_xegpu_attn import COUNTERS
    q, k, v = rand(1, 2, 21, 16), rand(1, 2, 40, 16), rand(1, 2, 40, 16)
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tile=8, kv_tile=16)))
    check(q, k, v)
    before = COUNTERS["compilations"]
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tile=8, kv_tile=16, tail="peel")))
    check(q, k, v)
    assert COUNTERS["compilations"] == before + 1
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tile=8, kv_tile=16)))
    check(q, k, v)
    assert COUNTERS["compilations"] == before + 1  # back to the first: its kernel again


def test_bad_schedule_override(monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(dict(row_tiles=8)))
    with pytest.raises(ValueError, match="unknown option fields"):
        check(rand(1, 1, 5, 16), rand(1, 1, 5, 16), rand(1, 1, 5, 16))
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", "row_tile=8")
    with pytest.raises(ValueError, match="JSON object"):
        check(rand(1, 1, 5, 16), rand(1, 1, 5, 16), rand(1, 1, 5, 16))


def test_spec_holds_no_lengths():
    fields = set(AttentionSpec.__dataclass_fields__)
    assert not fields & {"batch", "kv_heads", "q_len", "kv_len"}
    spec = replace(SPECS["plain"], length_class="long")
    assert spec.operand_dims()["q"] == ("B", "H", 1, "L", 64)


# ------------------------------------------------------------------------------------ backward

#: option sets the backward is checked with: GPU-like tiles (and their k layouts) and the cpu's.
BACKWARD_OPTION_SETS = ["gpu-64x64-folded-lowp", "gpu-128x64-explicit-lowp", "16x32-materialized",
                        "8x16-split3", "gpu-64x32-explicit-packed"]
BACKWARD_SPECS = {
    "causal-gqa": AttentionSpec(group=4, head_dim=64, v_head_dim=32, dtype="bfloat16", causal=True,
                                length_class="long", kernel="backward"),
    "mask": AttentionSpec(group=1, head_dim=32, v_head_dim=32, dtype="float32",
                          mask=MaskSpec("bool", ("b", "l", "s"), "bool"), length_class="long", kernel="backward"),
    # gradients the frontend sums over broadcast dims, written in float32
    "wide": AttentionSpec(group=2, head_dim=32, v_head_dim=64, dtype="float16", length_class="long",
                          kernel="backward", wide_gradients=("dq", "dk", "dv")),
}


def test_wide_gradients_are_written_in_the_accumulator_type():
    spec = replace(BACKWARD_SPECS["causal-gqa"], wide_gradients=("dk",))
    assert {n: t for n, _, t in spec.operands() if n in ("dq", "dk", "dv")} == {
        "dq": "bfloat16", "dk": "float32", "dv": "bfloat16"}
    assert AttentionSpec.from_json(json.loads(spec.to_json())) == spec
    assert spec.short_name() != BACKWARD_SPECS["causal-gqa"].short_name()
    for fields, match in [({"wide_gradients": ("dv", "dk")}, "ordered subset"), ({"wide_gradients": ("dx",)}, "subset"),
                          ({"kernel": "forward_lse"}, "backward kernel"), ({"dtype": "float32"}, "accumulator")]:
        with pytest.raises(ValueError, match=match):
            replace(spec, **fields)


@pytest.mark.parametrize("backward_dq", ["second_pass", "per_head"])
@pytest.mark.parametrize("spec_name", list(BACKWARD_SPECS))
@pytest.mark.parametrize("option_set", BACKWARD_OPTION_SETS)
def test_backward_structure(option_set, spec_name, backward_dq):
    """The shared backward stages with every target's kind of options: normalized, mapped
    work-group loops only (delta, dq, dkv, and the K^T / V^T copies of the materialized layout),
    no allocation inside them, the gradients' accumulators carried by their loops in the
    accumulator type, every contraction on full static tiles."""
    spec = BACKWARD_SPECS[spec_name]
    opts = replace(options(option_set), backward_dq=backward_dq)
    ir = describe(bufferized_ir(spec, opts))
    expected = ["attn.backward_delta", "attn.backward_dkv", "attn.backward_dq"]
    if opts.k_layout == "materialized":
        expected += ["attn.k_transpose", "attn.v_transpose"]
    assert sorted(a for loop in ir.loops for a in loop["attrs"] if a != WORK_GROUP_ROWS) == sorted(expected)
    # the rows of a GPU work-group's tiles: the row tile's, the key tile's for a dK/dV loop, none
    # for the per-head loop (tiles of both kinds, a loop for CPU threads)
    rows_named = sorted(tuple(a for a in loop["attrs"] if a != WORK_GROUP_ROWS) for loop in ir.loops
                        if WORK_GROUP_ROWS in loop["attrs"])
    assert rows_named == sorted([("attn.backward_delta",), ("attn.backward_dq",)]
                                + ([("attn.backward_dkv",)] if backward_dq == "second_pass" else []))
    for loop in ir.loops:
        assert loop["normalized"] and loop["mapping"] is not None
        if "attn.k_transpose" not in loop["attrs"] and "attn.v_transpose" not in loop["attrs"]:
            assert loop["rank"] == 5 and loop["mapping"] == MAPPING
    assert ir.allocations_in_loops == 0
    carried = {tuple(a for a in loop["attrs"] if a != WORK_GROUP_ROWS): loop["carried"]
               for loop in ir.carried_by_loops}
    r, t, e, ev = opts.row_tile, opts.kv_tile, spec.head_dim, spec.v_head_dim
    assert f"vector<{t}x{e}xf32>" in carried[("attn.backward_dkv",)]  # dK
    assert f"vector<{t}x{ev}xf32>" in carried[("attn.backward_dkv",)]  # dV
    if backward_dq == "second_pass":
        assert carried[("attn.backward_dq",)] == [f"vector<{r}x{e}xf32>"]  # dQ
    shapes = {s for c in ir.contractions for s in c}
    assert all(len(s) == 2 and all(d in (r, t, e, ev) for d in s) for s in shapes), ir.contractions


@pytest.mark.parametrize("spec_name", list(BACKWARD_SPECS))
def test_backward_dkv_apart(spec_name):
    """backward_dkv="apart": dK and dV from two loops of their own over key tiles, each carrying
    one accumulator; dV's loop has no dP (two contractions per tile pair: S^T and dV), dK's
    three (S^T, dP^T, dK)."""
    spec = BACKWARD_SPECS[spec_name]
    opts = replace(options("gpu-64x64-folded-lowp"), backward_tiles="keys_by_rows", backward_dkv="apart")
    with mlir_context():
        module = mlir_ir.Module.parse(bufferized_ir(spec, opts))
        loops = walk(module, lambda op: op.name == "scf.forall" and "attn.backward_dkv" in op.attributes)
        assert len(loops) == 2
        counts = sorted(len(walk(loop, lambda op: op.name == "vector.contract")) for loop in loops)
        carried = sorted(len(list(walk(loop, lambda op: op.name == "scf.for")[-1].results)) for loop in loops)
    assert counts == [2, 3] and carried == [1, 1]


@pytest.mark.parametrize("backward_dq", ["second_pass", "per_head"])
@pytest.mark.parametrize("spec_name", list(BACKWARD_SPECS))
@pytest.mark.parametrize("option_set", ["gpu-64x64-folded-lowp", "gpu-128x64-explicit-lowp", "16x32-materialized"])
def test_backward_keys_by_rows(option_set, spec_name, backward_dq):
    """backward_tiles="keys_by_rows": the dK/dV loop's tiles are (keys x rows) and its dK, dV,
    S^T and dP^T contractions take their left operands as they are (m, k): P^T and dS^T are tiles of the
    work-group's rows, what a tensor core's register operands need; masks are read through a
    transposing map."""
    spec = BACKWARD_SPECS[spec_name]
    opts = replace(options(option_set), backward_dq=backward_dq, backward_tiles="keys_by_rows")
    text = bufferized_ir(spec, opts)
    r, t = opts.row_tile, opts.kv_tile
    with mlir_context():
        module = mlir_ir.Module.parse(text)
        (dkv,) = walk(module, lambda op: op.name == "scf.forall" and "attn.backward_dkv" in op.attributes)
        contracts = walk(dkv, lambda op: op.name == "vector.contract")
        lhs_maps = [str(mlir_ir.ArrayAttr(op.attributes["indexing_maps"])[0]) for op in contracts]
        lhs_shapes = [tuple(mlir_ir.VectorType(op.operands[0].type).shape) for op in contracts]
        reads = [str(op.attributes["permutation_map"]) for op in walk(dkv, lambda op: op.name == "vector.transfer_read")]
    # per_head accumulates dQ in the same loop: dQ += (dS^T)^T K is its one transposed left operand
    transposed_lhs = [m for m in lhs_maps if m != "affine_map<(d0, d1, d2) -> (d0, d2)>"]
    assert len(transposed_lhs) == (backward_dq == "per_head"), lhs_maps
    assert (t, r) in lhs_shapes  # P^T and dS^T
    transposing = [m for m in reads if re.search(r"-> \(d(\d+), d(\d+)\)>$", m) and
                   int(re.search(r"-> \(d(\d+), d(\d+)\)>$", m).group(1)) >
                   int(re.search(r"-> \(d(\d+), d(\d+)\)>$", m).group(2))]
    assert bool(transposing) == (spec.mask is not None), reads


BACKWARD_NUMERICS = [("gpu-64x64-folded-lowp", "second_pass"), ("gpu-128x64-explicit-lowp", "per_head"),
                     ("16x32-materialized", "second_pass"), ("8x16-split3", "per_head"),
                     ("gpu-64x64-folded-lowp-keys-by-rows", "second_pass"),
                     ("gpu-64x64-folded-lowp-keys-by-rows-apart", "second_pass"),
                     ("8x16-split3-keys-by-rows", "per_head")]


@pytest.mark.parametrize("option_set,backward_dq", BACKWARD_NUMERICS)
@pytest.mark.parametrize("case", ["causal-gqa", "mask"])
def test_backward_numerics(option_set, backward_dq, case, monkeypatch, fresh_seed):
    """Gradients through the cpu target with other targets' tiles, against SDPA and the fp64
    reference (tails of rows and keys, several tiles, GQA)."""
    from sdpa_cases import Case, check_gradients
    apart = option_set.endswith("-apart")  # dK and dV in loops of their own
    option_set = option_set.removesuffix("-apart")
    name, keys_by_rows = option_set.removesuffix("-keys-by-rows"), option_set.endswith("-keys-by-rows")
    fields = dict(OPTION_SETS[name], backward_dq=backward_dq)
    if keys_by_rows:
        fields["backward_tiles"] = "keys_by_rows"
    if apart:
        fields["backward_dkv"] = "apart"
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(fields))
    if case == "causal-gqa":
        q, k, v = rand(2, 8, 150, 64), rand(2, 2, 150, 64), rand(2, 2, 150, 32)
        kwargs = {"is_causal": True, "enable_gqa": True}
    else:
        q, k, v = rand(2, 3, 77, 32), rand(2, 3, 140, 32), rand(2, 3, 140, 32)
        mask = torch.rand(2, 1, 77, 140) > 0.4
        mask[:, :, 5] = False
        kwargs = {"attn_mask": mask}
    assert check_gradients(Case(q, k, v, kwargs)) is not None
