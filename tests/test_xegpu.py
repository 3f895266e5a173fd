"""The xegpu target without an Intel GPU: its IR, its SPIR-V, Intel's native code of it, and
its kernels run through the op on the CPU OpenCL runtime with the Intel builtins emulated.

Per spec of SPECS: after the xegpu-wg stage the kernel holds the XeGPU ops
with their layouts; the SPIR-V imports only builtins the emulation implements,
and spirv-val accepts it; ocloc compiles it for pvc and bmg in the launcher's
GRF mode without spills, with DPAS for both matmuls and 2D block messages for
the Q/K/V loads and the output stores.  Then XEGPU_ATTN_EMULATE=xpu routes CPU
tensors through the xegpu target and the numerics are held to the cpu
target's bound (2x SDPA's error plus a floor, poisoned outputs).
"""

import base64
import os
import re
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_xegpu_attn import _C
from torch_xegpu_attn import cache as cache_module
from torch_xegpu_attn.cache import CACHE
from torch_xegpu_attn.compiler import compile_spec
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec, ProblemSize
from torch_xegpu_attn.targets import get_target
from torch_xegpu_attn.targets import xegpu as xegpu_target
from torch_xegpu_attn.targets.xegpu import toolchain

from conftest import check
from sdpa_cases import (GPU_HEAD_DIMS, MASKINGS, Case, Target, budget, cases, check_case, check_dropout,
                        check_gradients, reproducible)

xegpu = get_target("xegpu")
_OK, _WHY = xegpu.available()
if _OK:
    try:
        toolchain.clang()
        import dpctl  # noqa: F401
    except Exception as error:  # noqa: BLE001
        _OK, _WHY = False, str(error)
# CI installs the toolchain (scripts/setup.sh --test): there these tests must run, not skip.
if os.environ.get("CI") and not _OK:
    raise RuntimeError(f"CI must check the xegpu target, but: {_WHY}")
pytestmark = pytest.mark.skipif(not _OK, reason=f"no xegpu toolchain: {_WHY}")

BASE = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float16", target="xegpu", length_class="prefill")
SPECS = {
    "e64": BASE,
    "e64-causal": replace(BASE, causal=True),
    "e128-bf16": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16"),
    "e128-causal": replace(BASE, head_dim=128, v_head_dim=128, causal=True),
    "e32": replace(BASE, head_dim=32, v_head_dim=32),
    "e64-gqa4": replace(BASE, group=4),
    "e64-ev128": replace(BASE, v_head_dim=128, causal=True),
    "bool-mask-ls": replace(BASE, mask=MaskSpec("bool", ("l", "s"), "bool")),
    "additive-f32-mask-bhls": replace(BASE, mask=MaskSpec("additive", ("b", "h", "l", "s"), "float32")),
    "bool-mask-bs": replace(BASE, mask=MaskSpec("bool", ("b", "s"), "bool")),
    "additive-mask-l-e128": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16",
                                    mask=MaskSpec("additive", ("l",), "bfloat16")),
    "decode-gqa4": replace(BASE, group=4, length_class="decode"),
    "e96-bf16-causal": replace(BASE, head_dim=96, v_head_dim=96, dtype="bfloat16", causal=True),
    "decode-e128-bf16-padding-mask": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16",
                                             length_class="decode", mask=MaskSpec("bool", ("b", "s"), "bool")),
    # head dims that are not multiples of 32 (16-column messages), above 128 (16-key steps,
    # Q re-read per step at 192 and 256), Ev != E across the 128 boundary
    "e16-gqa2": replace(BASE, head_dim=16, v_head_dim=16, group=2),
    "e48-bf16-causal": replace(BASE, head_dim=48, v_head_dim=48, dtype="bfloat16", causal=True),
    "e80-ev48-bool-mask-ls": replace(BASE, head_dim=80, v_head_dim=48, mask=MaskSpec("bool", ("l", "s"), "bool")),
    "e176-ev144-causal": replace(BASE, head_dim=176, v_head_dim=144, causal=True),
    "e192": replace(BASE, head_dim=192, v_head_dim=192),
    "e256-bf16-causal": replace(BASE, head_dim=256, v_head_dim=256, dtype="bfloat16", causal=True),
    "decode-e256-bf16-gqa2": replace(BASE, head_dim=256, v_head_dim=256, dtype="bfloat16", group=2,
                                     length_class="decode"),
    # the default 128-register mode: one-sub-group decode kernels of head dims up to 32
    "decode-e32": replace(BASE, head_dim=32, v_head_dim=32, length_class="decode"),
    # float32 through bf16-part DPAS (targets/xegpu/f32.py)
    "f32-e64": replace(BASE, dtype="float32"),
    "f32-e32-bool-mask-ls": replace(BASE, head_dim=32, v_head_dim=32, dtype="float32",
                                    mask=MaskSpec("bool", ("l", "s"), "bool")),
    # the training forward: out in f32 and the rows' log-sum-exp (a scattered store of a row vector)
    "lse-e64": replace(BASE, kernel="forward_lse"),
    "lse-e128-bf16-causal": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16", causal=True,
                                    kernel="forward_lse"),
    # dropout: the generator's rounds on every score (8-row sub-groups; 16-key steps from 128)
    "e64-dropout": replace(BASE, dropout_p=0.2),
    "lse-e128-bf16-causal-dropout": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16", causal=True,
                                            kernel="forward_lse", dropout_p=0.1),
    "decode-gqa4-dropout": replace(BASE, group=4, length_class="decode", dropout_p=0.5),
    "e256-dropout": replace(BASE, head_dim=256, v_head_dim=256, dropout_p=0.2),
}
#: specs whose native code spills, and the scratch space (bytes, pvc and bmg) it may take: with
#: dropout, head dims from 176 up hold the generator's words next to the 16-key step's tiles.
FORWARD_SPILLS = {"e256-dropout": 8192}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Hardware (not emulated) builds of SPECS with their IR dumps."""
    os.environ.pop("XEGPU_ATTN_EMULATE", None)
    found = {}
    for name, spec in SPECS.items():
        folder = tmp_path_factory.mktemp(name)
        artifact = compile_spec(spec, dump_dir=str(folder))
        found[name] = (spec, artifact, folder)
    return found


def _stage(folder, stage):
    return next(folder.rglob(f"*-{stage}.mlir")).read_text()


@pytest.mark.parametrize("name", list(SPECS))
def test_xegpu_ops_with_layouts(compiled, name):
    spec, artifact, folder = compiled[name]
    wg = _stage(folder, "xegpu-wg")
    for op in ("xegpu.create_nd_tdesc", "xegpu.load_nd", "xegpu.dpas", "xegpu.store_nd"):
        assert op in wg, f"{op} missing after xegpu-wg"
    if spec.mask is not None and {"l", "s"} <= set(spec.mask.dims):
        assert re.search(r'load_nd[^\n]*attn.xegpu_role = "mask"', wg)  # the mask tile: a 2D block load
        # its messages fixed by its anchor (left to the propagation, they varied between runs)
        assert re.search(rf'load_nd[^\n]*inst_data = \[{xegpu_target.subgroup_rows(spec)}, 16\][^\n]*'
                         rf'attn.xegpu_role = "mask"', wg)
    elif spec.mask is not None:
        assert "xegpu.load " in wg  # a 1-D mask: a scattered load, lanes past the end masked off
    f32 = spec.dtype == "float32"
    # Q.K^T and P.V as work-group ops; in f32 each as six DPAS of bf16 parts, no f32 (tf32) operands
    dpas = re.findall(r"xegpu\.dpas [^\n]*", wg)
    assert len(dpas) == (12 if f32 else 2)
    if f32:
        assert all(re.search(r": vector<\d+x\d+xbf16>, vector<\d+x\d+xbf16>", d) for d in dpas), dpas
    geometry = xegpu_target._geometry(spec, xegpu.options_for(spec).schedule)
    n, rows, kv = geometry.subgroups, geometry.sg_rows, geometry.kv_tile
    e, ev = spec.head_dim, spec.v_head_dim
    width = 16 if f32 or e % 32 else 32  # columns of one Q message
    # the anchors' layouts in XeGPU's terms
    assert re.search(rf"xegpu\.store_nd[^\n]*sg_layout = \[{n}, 1\], sg_data = \[{rows}, {ev}\]", wg)
    assert re.search(rf"xegpu\.load_nd[^\n]*sg_layout = \[{n}, 1\], sg_data = \[{rows}, {e}\], inst_data = \[{rows}, {width}\]", wg)
    assert re.search(rf"xegpu\.load_nd[^\n]*sg_layout = \[1, 1\], sg_data = \[{kv}, {e}\], order = \[0, 1\]", wg)
    if geometry.reload_q:  # the Q tile is read inside the key loop
        loop = wg[wg.index("scf.for"):]
        assert re.search(r'xegpu\.load_nd[^\n]*attn.xegpu_role = "q"', loop)
    if geometry.prefetch:
        grid, data, _ = geometry.prefetch_layout(e)
        assert grid[0] * grid[1] <= n and data[0] * grid[0] == kv and data[1] * grid[1] == e
        assert re.search(rf"xegpu\.prefetch_nd[^\n]*sg_layout = \[{grid[0]}, {grid[1]}\]", wg)
    # the 2D descriptors take their shape at run time: tails are bounds, not padding
    assert re.search(r"create_nd_tdesc %\w+, shape : \[%", wg)
    if spec.kernel == "forward_lse":  # lse: the row reduction's layout, a slice along the keys
        assert re.search(rf'xegpu\.store [^\n]*layout = #xegpu\.slice<#xegpu\.layout<sg_layout = \[{n}, 1\], '
                         rf'sg_data = \[{rows}, {kv}\], inst_data = \[1, 16\], lane_layout = \[1, 16\], '
                         rf'lane_data = \[1, 1\]>, dims = \[1\]>[^\n]*attn.xegpu_role = "rows"', wg)
    lowered = _stage(folder, "xegpu-lowered")
    assert "xegpu." not in lowered and "llvm.func" in lowered


@pytest.mark.parametrize("q_len,length_class", [(1, "decode"), (8, "decode"), (9, "prefill"), (4096, "prefill")])
def test_decode_class_is_one_subgroup_per_work_group(compiled, q_len, length_class):
    """At most 8 query rows per head: work-groups of one sub-group (16 lanes) and 8 rows, not 16
    sub-groups of which 15 would compute padding."""
    spec = compiled["decode-gqa4"][0]
    assert xegpu.length_class(ProblemSize(batch=1, kv_heads=8, q_len=q_len, kv_len=300), spec) == length_class
    for name in ("decode-gqa4", "decode-e128-bf16-padding-mask"):
        spec, artifact, _ = compiled[name]
        assert xegpu.options_for(spec).schedule.row_tile == 8
        assert [k["threads"] for k in artifact.metadata["kernels"]] == [16]


def test_kernels_are_the_same_in_every_process(tmp_path):
    """Compiling a spec gives one SPIR-V whatever the process: upstream's layout propagation once
    chose a mask tile's messages differently from one run to the next (pointer order), so
    processes compiled different kernels for one spec."""
    import subprocess
    import sys
    script = ("import hashlib, sys; from torch_xegpu_attn.compiler import compile_spec; "
              "from torch_xegpu_attn.spec import AttentionSpec, MaskSpec; "
              "spec = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype='float16', target='xegpu', "
              "length_class='prefill', mask=MaskSpec('bool', ('l', 's'), 'bool')); "
              "print(hashlib.sha256(compile_spec(spec).binary).hexdigest())")
    env = {k: v for k, v in os.environ.items() if k != "XEGPU_ATTN_EMULATE"}
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env=env).stdout.strip() for _ in range(4)}
    assert len(digests) == 1, digests


def _emulated_exports():
    """The functions emulation.cl defines (names as the kernels import them)."""
    import subprocess
    nm = toolchain.llvm_tool("llvm-nm")
    out = subprocess.run([nm, "--defined-only", "-j", toolchain.emulation_bitcode()], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("name", list(SPECS))
def test_spirv_imports_only_emulated_builtins_and_validates(compiled, name):
    spec, artifact, folder = compiled[name]
    spirv = (next(folder.rglob("kernel.spv"))).read_bytes()
    assert spirv == artifact.binary and spirv[:4] == b"\x03\x02\x23\x07"
    imports = toolchain.imported_functions(spirv)
    assert imports == artifact.metadata["imports"]
    assert any("matrix_mad_k16" in i for i in imports) and any("2d_block_read" in i for i in imports)
    assert any("2d_block_write" in i for i in imports)
    assert not any("tf32" in i for i in imports)  # float32 is not rounded to tf32 anywhere
    missing = set(imports) - _emulated_exports()
    assert not missing, f"builtins the emulation does not implement: {sorted(missing)}"
    toolchain.validate(spirv)


_NATIVE_REPORT = []


@pytest.mark.skipif(toolchain.ocloc_available() is not None and not os.environ.get("CI"),
                    reason=f"no ocloc: {toolchain.ocloc_available()}")
@pytest.mark.parametrize("device", ["pvc", "bmg"])
@pytest.mark.parametrize("name", list(SPECS))
def test_native_code(compiled, name, device):
    """ocloc's code in the register-file mode the launcher asks for (the kernel's metadata): no
    spills, DPAS in both matmuls, 2D block loads and stores."""
    spec, artifact, folder = compiled[name]
    large = artifact.metadata["large_grf"]
    assert large == xegpu_target.large_grf(spec)
    found = toolchain.native(artifact.binary, device, large_grf=large)
    assert artifact.metadata["native"][device]  # the entry offers the driver this binary first
    # ... made in the same mode
    zeinfo = toolchain.elf_section(base64.b64decode(artifact.metadata["native"][device]), ".ze_info").decode()
    assert re.findall(r"grf_count:\s*(\d+)", zeinfo) == [str(256 if large else 128)] * len(artifact.metadata["kernels"])
    geometry = xegpu_target._geometry(spec, xegpu.options_for(spec).schedule)
    # 8x16x16 DPAS per sub-group and step: Q.K^T (rows/8 x kv/16 x E/16) and P.V (rows/8 x Ev/16 x
    # kv/16); six per product in float32 (bf16 parts)
    per_step = geometry.sg_rows // 8 * geometry.kv_tile // 16 * (spec.head_dim // 16 + spec.v_head_dim // 16)
    per_step *= 6 if spec.dtype == "float32" else 1
    report = {k: v for k, v in found.items() if k not in ("binary", "asm", "zeinfo")}
    _NATIVE_REPORT.append((name, device, report))
    print(f"\n{name} {device}: {report} (DPAS per step expected {per_step})")
    assert found["grf"] == (256 if large else 128)
    assert found["spill_bytes"] <= FORWARD_SPILLS.get(name, 0)
    assert found["scratch_messages"] == 0 or name in FORWARD_SPILLS
    assert found["dpas"] >= per_step and found["dpas"] % per_step == 0
    assert found["block_loads"] >= 3 and found["block_stores"] >= 1
    if xegpu_target._geometry(spec, xegpu.options_for(spec).schedule).prefetch:
        assert found["block_prefetches"] >= 1


@pytest.mark.skipif(toolchain.ocloc_available() is not None and not os.environ.get("CI"),
                    reason=f"no ocloc: {toolchain.ocloc_available()}")
def test_kernels_are_built_with_mad(compiled, monkeypatch):
    """-cl-mad-enable in the build options ocloc and the driver (and the emulation) get: the
    softmax's multiply-subtract before exp2 becomes one mad, fewer instructions a step."""
    spec, artifact, folder = compiled["e64"]
    assert artifact.metadata["build_options"] == toolchain.build_options(artifact.metadata["large_grf"])
    assert toolchain.MAD_OPTIONS in artifact.metadata["build_options"].split()
    with_mad = toolchain.native(artifact.binary, "pvc")
    monkeypatch.setattr(toolchain, "MAD_OPTIONS", "")
    without = toolchain.native(artifact.binary, "pvc")
    assert with_mad["loop_step_instructions"] < without["loop_step_instructions"], (with_mad, without)


# --- the op on CPU tensors, emulated ----------------------------------------------------------

@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_EMULATE", "xpu")
    _C.clear_recipes()  # calls recorded for the cpu target must not replay here
    yield
    _C.clear_recipes()


CASES = [
    # (dtype, E, causal, (batch..., H, Hkv), L, S)
    (torch.float16, 48, False, (2, 2, 2), 7, 33),        # planes of 7 x 96 bytes: the output padded
    (torch.float16, 64, False, (1, 2, 2), 200, 200),
    (torch.float16, 64, False, (2, 3, 3), 1, 77),        # decode-like, one query row
    (torch.bfloat16, 128, True, (2, 4, 4), 5, 200),      # decode-like, 5 query rows, causal
    (torch.float16, 64, False, (1, 8, 2), 1, 300),       # decode, GQA
    (torch.float16, 64, False, (1, 1, 1), 128, 64),      # whole tiles
    (torch.float16, 64, False, (2, 2, 2, 2), 300, 129),  # leading dims, L > S, tails
    (torch.float16, 64, True, (1, 2, 2), 200, 200),
    (torch.float16, 64, True, (1, 2, 2), 100, 250),      # causal, L < S (top-left aligned)
    (torch.float16, 64, True, (1, 1, 1), 250, 100),      # causal, L > S
    (torch.bfloat16, 128, False, (1, 2, 2), 130, 130),
    (torch.bfloat16, 128, False, (1, 2, 2), 1, 300),
    (torch.float16, 32, False, (1, 2, 2), 100, 100),
    (torch.float16, 64, False, (1, 8, 2), 150, 180),     # GQA, 4 query heads per key/value head
    (torch.bfloat16, 64, True, (1, 4, 2), 160, 160),     # GQA, causal
    (torch.float16, (64, 128), True, (1, 2, 2), 150, 170),  # Ev != E
    (torch.float16, (128, 64), False, (2, 2, 2), 90, 200),
    (torch.bfloat16, 96, True, (1, 2, 2), 140, 150),
    (torch.float16, (96, 32), False, (1, 2, 2), 70, 100),
    # head dims that are not multiples of 32 (16-column block messages), 16 (32-byte rows), 256
    # (16-key steps, Q re-read at every step), Ev != E
    (torch.float16, 16, False, (1, 4, 2), 150, 90),      # GQA, tails
    (torch.bfloat16, 48, True, (1, 2, 2), 140, 150),
    (torch.float16, (80, 48), False, (1, 2, 2), 100, 130),
    (torch.bfloat16, 256, True, (1, 2, 2), 40, 70),
    (torch.bfloat16, 256, False, (1, 4, 2), 1, 90),      # decode, GQA (Gemma-like)
]


def _ran_on_xegpu(e):
    """The call ran on an xegpu kernel (emulated), not on the cpu one."""
    return any(key[0].target == "xegpu" and key[0].head_dim == e and key[2] == "xpu" for key in CACHE._memory)


@pytest.mark.parametrize("dtype,e,causal,heads,l,s", CASES)
def test_emulated_numerics(emulated, fresh_seed, dtype, e, causal, heads, l, s):
    *batch, h, hkv = heads
    e, ev = e if isinstance(e, tuple) else (e, e)
    q = torch.randn(*batch, h, l, e, dtype=dtype)
    k = torch.randn(*batch, hkv, s, e, dtype=dtype)
    v = torch.randn(*batch, hkv, s, ev, dtype=dtype)
    check(q, k, v, is_causal=causal, enable_gqa=h != hkv)
    assert _ran_on_xegpu(e)


BACKWARD_SPECS = {
    "bwd-e64": replace(BASE, kernel="backward"),
    "bwd-e128-bf16": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16", kernel="backward"),
    "bwd-e16-gqa2": replace(BASE, head_dim=16, v_head_dim=16, group=2, kernel="backward"),
    # causal: the dK/dV loop starts at a run-time row tile (no prefetch there), keys-first index
    # vectors
    "bwd-e64-causal": replace(BASE, causal=True, kernel="backward"),
    "bwd-e32-bf16-causal-gqa2": replace(BASE, head_dim=32, v_head_dim=32, dtype="bfloat16", group=2, causal=True,
                                        kernel="backward"),
    # 16 x 16 tiles above head dim 64
    "bwd-e96-bf16-causal": replace(BASE, head_dim=96, v_head_dim=96, dtype="bfloat16", causal=True,
                                   kernel="backward"),
    "bwd-e128-f16-bool-mask-ls-gqa2": replace(BASE, head_dim=128, v_head_dim=128, group=2,
                                              mask=MaskSpec("bool", ("l", "s"), "bool"), kernel="backward"),
    "bwd-e64-ev128": replace(BASE, v_head_dim=128, kernel="backward"),
    # above 128: dK and dV apart, the A operands re-read at every step, each tile read next to its
    # use
    "bwd-e256": replace(BASE, head_dim=256, v_head_dim=256, kernel="backward"),
    "bwd-e192-bf16-f32-mask-bhls-gqa2": replace(BASE, head_dim=192, v_head_dim=192, dtype="bfloat16", group=2,
                                                mask=MaskSpec("additive", ("b", "h", "l", "s"), "float32"),
                                                kernel="backward"),
    "bwd-e256-bf16-causal": replace(BASE, head_dim=256, v_head_dim=256, dtype="bfloat16", causal=True,
                                    kernel="backward"),
    # masks: the dK/dV loop reads a 2-D mask tile keys first (a 2-D scattered load), a 1-D one as
    # for the forward
    "bwd-bool-mask-ls": replace(BASE, mask=MaskSpec("bool", ("l", "s"), "bool"), kernel="backward"),
    "bwd-additive-f32-mask-bhls": replace(BASE, mask=MaskSpec("additive", ("b", "h", "l", "s"), "float32"),
                                          kernel="backward"),
    "bwd-e32-bf16-gqa2-bool-mask-bs": replace(BASE, head_dim=32, v_head_dim=32, dtype="bfloat16", group=2,
                                              mask=MaskSpec("bool", ("b", "s"), "bool"), kernel="backward"),
    # float32: six bf16 DPAS a product (f32.py), 16 x 16 tiles, A operands re-read per step; dK and
    # dV apart above head dim 32
    "bwd-f32-e32-causal-gqa2": replace(BASE, head_dim=32, v_head_dim=32, dtype="float32", group=2, causal=True,
                                       kernel="backward"),
    "bwd-f32-e48-bool-mask-ls": replace(BASE, head_dim=48, v_head_dim=48, dtype="float32",
                                        mask=MaskSpec("bool", ("l", "s"), "bool"), kernel="backward"),
    "bwd-f32-e64": replace(BASE, dtype="float32", kernel="backward"),
    # dropout: the generator in the dQ and dK/dV loops; A operands re-read above 64, dK and dV
    # apart above 96
    "bwd-e64-dropout-causal-gqa2": replace(BASE, group=2, causal=True, dropout_p=0.2, kernel="backward"),
    "bwd-e128-bf16-dropout": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16", dropout_p=0.1,
                                     kernel="backward"),
    "bwd-e256-dropout": replace(BASE, head_dim=256, v_head_dim=256, dropout_p=0.2, kernel="backward"),
    # gradients summed over broadcast dims: written in float32 (f32 2D block stores)
    "bwd-e128-bf16-wide": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16", kernel="backward",
                                  wide_gradients=("dq", "dk", "dv")),
}
#: the kernels of a backward (Delta, dQ, dK/dV) whose native code spills, and how much it may
#: (pvc, bmg; the scratch space ocloc reserves, a power of two at least the spill): none of the
#: 16-bit ones (16 x 16 tiles above head dim 64, backward_tile; A operands re-read per step above
#: 128, reload_q; Delta over wide rows in chunks, _row_dots_in_chunks).  float32 holds each B
#: tile with its three bf16 parts: at 48 with a bool mask the dQ and dK kernels spill 256 B-1 KB,
#: at 64 the dQ and dK kernels 4.7-5.2 KB (spill_size; 8 KB of scratch).  With dropout at 256 (the
#: generator's words next to 16 x 16 tiles): 1-4 KB a loop kernel.
BACKWARD_SPILLS = {
    ("bwd-e256-dropout", "attention_k1"): 4096,
    ("bwd-e256-dropout", "attention_k2"): 4096,
    ("bwd-e256-dropout", "attention_k3"): 1024,
    ("bwd-f32-e48-bool-mask-ls", "attention_k1"): 256,
    ("bwd-f32-e48-bool-mask-ls", "attention_k2"): 1024,
    ("bwd-f32-e64", "attention_k1"): 8192,
    ("bwd-f32-e64", "attention_k2"): 8192,
}


@pytest.fixture(scope="module")
def compiled_backward(tmp_path_factory):
    os.environ.pop("XEGPU_ATTN_EMULATE", None)
    return {name: (spec, compile_spec(spec, dump_dir=str(tmp_path_factory.mktemp(name))))
            for name, spec in BACKWARD_SPECS.items()}


def _per_kernel_native(spirv: bytes, device: str):
    """ocloc's counts for each kernel of a module: {kernel name: machine_code_counts}."""
    import tempfile
    found = {}
    toolchain._ensure_proc()
    with tempfile.TemporaryDirectory(prefix="xegpu_attn_test_", dir=os.path.join(toolchain.SID_ROOT, "tmp")) as tmp:
        inside = "/tmp/" + os.path.basename(tmp)
        with open(os.path.join(tmp, "kernel.spv"), "wb") as f:
            f.write(spirv)
        toolchain._run(["chroot", toolchain.SID_ROOT, "ocloc", "compile", "-spirv_input", "-file",
                        f"{inside}/kernel.spv", "-device", device, "-output", f"{inside}/kernel", "-output_no_suffix",
                        "-options", toolchain.build_options(large_grf=True)], "ocloc")
        toolchain._run(["chroot", toolchain.SID_ROOT, "ocloc", "disasm", "-file", f"{inside}/kernel.bin", "-device",
                        device, "-dump", f"{inside}/disasm"], "ocloc disasm")
        with open(os.path.join(tmp, "kernel.bin"), "rb") as f:
            zeinfo = toolchain.elf_section(f.read(), ".ze_info").decode()
        entries = re.split(r"\n\s*-\s*name:\s*", zeinfo)
        for name in os.listdir(os.path.join(tmp, "disasm")):
            if name.startswith(".text.") and name.endswith(".asm"):
                kernel = name[len(".text."):-len(".asm")]
                with open(os.path.join(tmp, "disasm", name)) as f:
                    found[kernel] = toolchain.machine_code_counts(
                        f.read(), next((e for e in entries if e.startswith(kernel + "\n")), ""))
    return found


@pytest.mark.parametrize("name", list(BACKWARD_SPECS))
def test_backward_kernels(compiled_backward, name):
    """The backward's loops (Delta, dQ, dK/dV; above head dim 128 dK and dV apart) as XeGPU
    kernels: roles from the data flow, valid SPIR-V of emulated builtins only; ocloc's code for
    pvc and bmg with the DPAS of every contraction, 2D block messages and no spills (but the known
    ones)."""
    spec, artifact = compiled_backward[name]
    kernels = [k["name"] for k in artifact.metadata["kernels"]]
    options = xegpu.options_for(spec)
    apart = options.schedule.backward_dkv == "apart"  # dK and dV: a loop each
    assert kernels == ["attention_k0", "attention_k1", "attention_k2"] + (["attention_k3"] if apart else [])
    assert [w["dtype"] for w in artifact.metadata["workspaces"]] == ["f32"]  # Delta
    t, e, ev = options.schedule.kv_tile, spec.head_dim, spec.v_head_dim
    assert options.schedule.row_tile == t == xegpu_target.backward_tile(spec)  # one work-group shape
    rows = xegpu_target.subgroup_rows(spec)
    assert [k["threads"] for k in artifact.metadata["kernels"]] == [t // rows * 16] * len(kernels)
    imports = toolchain.imported_functions(artifact.binary)
    assert not set(imports) - _emulated_exports()
    toolchain.validate(artifact.binary)
    if toolchain.ocloc_available() is not None and not os.environ.get("CI"):
        pytest.skip(f"no ocloc: {toolchain.ocloc_available()}")
    # 8x16x16 DPAS per sub-group (its `rows` rows) and step: dQ: S, dP, dQ; dK/dV: S^T, dP^T, dV, dK
    # (apart: dK: S^T, dP^T, dK; dV: S^T, dV)
    s_, dp, dq, dv = (t // 16 * e // 16, t // 16 * ev // 16, e // 16 * t // 16, ev // 16 * t // 16)
    per_step = {"attention_k0": 0, "attention_k1": rows // 8 * (s_ + dp + dq)}
    parts = 6 if spec.dtype == "float32" else 1  # bf16 DPAS per f32 product (f32.py)
    if apart:
        per_step.update(attention_k2=rows // 8 * (s_ + dp + dq), attention_k3=rows // 8 * (s_ + dv))
    else:
        per_step.update(attention_k2=rows // 8 * (s_ + dp + dv + dq))
    for device in ("pvc", "bmg"):
        for kernel, counts in _per_kernel_native(artifact.binary, device).items():
            print(f"\n{name} {device} {kernel}: {counts}")
            assert counts["spill_bytes"] <= BACKWARD_SPILLS.get((name, kernel), 0), (kernel, counts)
            # (a multiple where a loop is unrolled: the G query heads of GQA in the dK/dV loop)
            step = per_step[kernel] * parts
            assert counts["dpas"] == step == 0 or (step and counts["dpas"] % step == 0 and counts["dpas"]), (kernel, counts)
            assert counts["block_loads"] >= 2
            assert counts["block_stores"] >= (0 if kernel == "attention_k0" else 1)


GRADIENT_CASES = [
    # (dtype, E, causal, (batch..., H, Hkv), L, S)
    (torch.float16, 64, False, (1, 2, 2), 100, 120),
    (torch.bfloat16, 128, False, (2, 2, 2), 70, 45),         # L > S, tails
    (torch.float16, 32, False, (1, 3, 3), 1, 77),            # one query row
    (torch.float16, 16, False, (1, 2, 1), 129, 200),         # GQA, 32-byte rows
    # causal (top-left aligned): the dK/dV loop starts at the first row tile that sees its keys
    (torch.float16, 64, True, (1, 2, 2), 100, 120),          # L < S
    (torch.bfloat16, 64, True, (1, 2, 2), 130, 77),          # L > S: rows that see no key
    (torch.float16, 32, True, (1, 4, 2), 96, 96),            # GQA, whole tiles
    (torch.bfloat16, 128, True, (1, 1, 1), 70, 70),
    # 16 x 16 tiles above head dim 64
    (torch.bfloat16, 96, True, (1, 4, 2), 50, 60),           # GQA
    (torch.float16, (64, 128), False, (1, 2, 2), 40, 50),    # Ev != E
    (torch.float16, (128, 80), True, (1, 2, 2), 33, 47),
    # above 128: dK and dV apart, A operands re-read at every step
    (torch.bfloat16, 256, True, (1, 2, 2), 40, 50),
    (torch.float16, (192, 160), False, (1, 4, 2), 30, 45),   # GQA, Ev != E
]


def _reference_gradients(q, k, v, dout, h, hkv, causal=False, mask=None):
    """dq, dk, dv of SDPA on the inputs and of float64 autograd of the definition."""
    import math
    kw = dict(is_causal=causal, attn_mask=mask, enable_gqa=h != hkv)
    sdpa = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*sdpa, **kw).backward(dout)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    kk, vv = (x.repeat_interleave(h // hkv, -3) for x in ref[1:])
    scores = ref[0] @ kk.transpose(-1, -2) / math.sqrt(q.size(-1))
    l, s = q.size(-2), k.size(-2)
    if causal:
        scores = scores.masked_fill(torch.ones(l, s, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.double())
    (torch.softmax(scores, -1).nan_to_num() @ vv).backward(dout.double())
    return [x.grad for x in sdpa], [x.grad for x in ref]


def _check_gradients(ours, sdpa, ref, dtype):
    from conftest import FLOOR
    for name, a, b, r in zip(("dq", "dk", "dv"), ours, sdpa, ref):
        err = (a.double() - r).abs().max().item()
        sdpa_err = (b.double() - r).abs().max().item()
        print(f"{name}: {err:.3e} (SDPA {sdpa_err:.3e})")
        assert err <= 2 * sdpa_err + FLOOR[dtype], (name, err, sdpa_err)


def _train_and_check(q, k, v, dout, h, hkv, dtype, built, causal=False, mask=None):
    """One training step through the op on copies of q, k, v; `built(key)` must hold for a
    compiled xegpu backward kernel's cache key; dq, dk, dv within 2x SDPA's error."""
    import torch_xegpu_attn
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    torch_xegpu_attn.attention(*ours, attn_mask=mask, is_causal=causal, enable_gqa=h != hkv).backward(dout)
    assert any(key[0].target == "xegpu" and key[0].kernel == "backward" and built(key[0])
               for key in CACHE._memory)
    sdpa, ref = _reference_gradients(q, k, v, dout, h, hkv, causal=causal, mask=mask)
    if mask is not None and mask.dtype == torch.bool:
        # SDPA's gradients of a row that sees no key are NaN; ours are 0
        sdpa = [g.nan_to_num() for g in sdpa]
    _check_gradients([x.grad for x in ours], sdpa, ref, dtype)


@pytest.mark.parametrize("dtype,e,causal,heads,l,s", GRADIENT_CASES)
def test_emulated_gradients(emulated, fresh_seed, dtype, e, causal, heads, l, s):
    """A training step through the xegpu target's forward_lse and backward kernels: dq, dk, dv
    within 2x SDPA's error (+ the dtype's floor) against float64 autograd."""
    *batch, h, hkv = heads
    e, ev = e if isinstance(e, tuple) else (e, e)
    q = torch.randn(*batch, h, l, e, dtype=dtype)
    k = torch.randn(*batch, hkv, s, e, dtype=dtype)
    v = torch.randn(*batch, hkv, s, ev, dtype=dtype)
    dout = torch.randn(*batch, h, l, ev, dtype=dtype)
    _train_and_check(q, k, v, dout, h, hkv, dtype, lambda key: key.causal == causal, causal=causal)


#: the backward's mask patterns: (mask shape for q (B=2, H=2, L=70, E) against S keys (the mask's
#: last dim, else 90), dtype[, E: 64 unless given]);
#: the dK/dV loop reads them keys first, through a transposing map.
MASK_GRADIENT_CASES = [
    ((2, 2, 70, 90), torch.bool),
    ((70, 90), torch.bool),
    ((2, 1, 1, 90), torch.bool),       # a padding mask (b, s)
    ((1, 90), torch.bool),             # (s)
    ((70, 1), torch.bool),             # (l)
    ((2, 2, 70, 90), torch.float32),
    ((1, 2, 70, 90), torch.float16),
    ((2, 1, 1, 90), torch.float16),
    ((70, 1), torch.float32),
    ((2, 1, 1, 1), torch.float32),     # (b): one value a batch
    ((1, 2, 1, 1), torch.bool),        # (h): a head with every key masked
    ((70, 20), torch.bool),            # S = 20: mask rows narrower than a block message
    ((2, 1, 70, 45), torch.float16),   # S = 45: rows of 90 bytes, copied for the block messages
    ((2, 2, 70, 90), torch.bool, 192),  # E = 192: dK and dV apart, A operands re-read per step
]


@pytest.mark.parametrize("case", MASK_GRADIENT_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}" + "".join(f"-e{e}" for e in c[2:])
                              for c in MASK_GRADIENT_CASES])
def test_emulated_mask_gradients(emulated, fresh_seed, case):
    """The backward under bool and additive masks of every broadcast pattern: dq, dk, dv within 2x
    SDPA's error against float64 autograd (rows that see no key: zero gradients)."""
    shape, dtype, e = (*case, 64)[:3]
    s = shape[-1] if shape[-1] > 1 else 90
    q = torch.randn(2, 2, 70, e, dtype=torch.float16)
    k, v = (torch.randn(2, 2, s, e, dtype=torch.float16) for _ in "kv")
    dout = torch.randn(2, 2, 70, e, dtype=torch.float16)
    mask = torch.rand(shape) > 0.3 if dtype == torch.bool else torch.randn(shape).to(dtype)
    _train_and_check(q, k, v, dout, 2, 2, torch.float16, lambda key: key.mask is not None, mask=mask)


FLOAT32_GRADIENT_CASES = [
    # (E, causal, (batch..., H, Hkv), L, S, bool mask shape or None): every contraction of the
    # backward as six bf16 DPAS (f32.py)
    (64, False, (1, 2, 2), 70, 90, None),       # tails
    (64, True, (1, 4, 2), 50, 60, None),        # causal, GQA
    (16, False, (1, 2, 1), 33, 40, None),       # GQA, 64-byte rows
    (32, False, (1, 2, 2), 40, 60, (40, 60)),   # a bool mask (l, s)
    (48, False, (2, 2, 2), 30, 45, (2, 1, 1, 45)),  # dK and dV apart; a padding mask (b, s)
]


@pytest.mark.parametrize("e,causal,heads,l,s,mask", FLOAT32_GRADIENT_CASES)
def test_emulated_float32_gradients(emulated, fresh_seed, e, causal, heads, l, s, mask):
    """float32 training through the xegpu kernels: dq, dk, dv within 2x SDPA's float32 error
    (+ 2e-6) against float64 autograd (bf16 parts, no tf32 rounding)."""
    *batch, h, hkv = heads
    q = torch.randn(*batch, h, l, e)
    k, v = (torch.randn(*batch, hkv, s, e) for _ in "kv")
    dout = torch.randn(*batch, h, l, e)
    attn_mask = torch.rand(mask) > 0.3 if mask else None
    _train_and_check(q, k, v, dout, h, hkv, torch.float32, lambda key: key.dtype == "float32",
                     causal=causal, mask=attn_mask)


#: dropout calls: (q shape, k and v shape, keyword arguments, dtype, dropout_p)
DROPOUT_CASES = [
    ((2, 3, 100, 64), (2, 3, 130, 64), {}, torch.float16, 0.2),
    ((1, 2, 77, 128), (1, 2, 90, 128), {"is_causal": True}, torch.bfloat16, 0.5),  # causal, tails
    ((1, 4, 60, 64), (1, 2, 70, 64), {"enable_gqa": True}, torch.float16, 0.1),    # GQA
    ((2, 2, 1, 64), (2, 2, 300, 64), {}, torch.float16, 0.1),                      # decode: one row a head
    ((1, 2, 40, 32), (1, 2, 50, 32), {}, torch.float32, 0.3),                      # float32
    ((1, 2, 20, 32), (1, 2, 40, 32), {}, torch.float16, 1.0),                      # every element dropped
]


@pytest.mark.parametrize("q_shape,kv_shape,kwargs,dtype,p", DROPOUT_CASES,
                         ids=["plain", "causal-e128-bf16", "gqa", "one-row", "float32", "p1"])
def test_emulated_dropout(emulated, fresh_seed, q_shape, kv_shape, kwargs, dtype, p):
    """Dropout through the xegpu kernels (forward; forward_lse and backward): output and gradients
    under the keep-mask written out from the generator's definition, within 2x SDPA's error."""
    q, k, v = torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)
    check_dropout(q, k, v, p, **kwargs)
    built = {key[0].kernel for key in CACHE._memory if key[0].target == "xegpu" and key[0].dropout_p == p}
    assert built == {"forward", "forward_lse", "backward"}, built


def test_emulated_dropout_with_a_mask(emulated, fresh_seed):
    mask = torch.rand(2, 1, 37, 70) > 0.3
    mask[:, :, 3] = False  # a row with no key
    q, k, v = (torch.randn(2, 3, n, 64, dtype=torch.float16) for n in (37, 70, 70))
    check_dropout(q, k, v, 0.2, attn_mask=mask)


def test_emulated_dropout_draws_a_new_mask_each_call(emulated, fresh_seed):
    """A repeated dropout call is not replayed with its first seed: each call draws its own mask."""
    import torch_xegpu_attn
    q, k, v = (torch.randn(1, 2, 9, 32, dtype=torch.float16) for _ in range(3))
    outs = {torch_xegpu_attn.attention(q, k, v, dropout_p=0.5).float().sum().item() for _ in range(4)}
    assert len(outs) == 4


@pytest.mark.parametrize("q_shape,kv_shape,summed", [((8, 2, 20, 64), (1, 2, 40, 64), "kv"),
                                                      ((1, 2, 20, 64), (8, 2, 40, 64), "q")], ids=["kv", "q"])
def test_emulated_summed_gradients(emulated, fresh_seed, q_shape, kv_shape, summed):
    """Gradients summed over broadcast batch dims: the xegpu backward writes them in float32
    (2D block stores of the accumulator's type), the frontend sums and rounds them once; within
    2x SDPA's error.  (Its DPAS operands are 16-bit, so the rounding of the sum is not the only
    error left, as it is on the cpu target: test_gradients.test_summed_gradients_round_once.)"""
    q, k, v = (torch.randn(shape, dtype=torch.float16) for shape in (q_shape, kv_shape, kv_shape))
    assert check_gradients(Case(q, k, v, {})) is not None
    wide = ("dk", "dv") if summed == "kv" else ("dq",)
    assert any(key[0].target == "xegpu" and key[0].wide_gradients == wide for key in CACHE._memory)


def test_emulated_float32_backward_above_64_raises(emulated, fresh_seed):
    """float32 trains on the xegpu kernels up to head dim 64: wider heads spill every backward
    kernel, and the target says so rather than run them."""
    import torch_xegpu_attn
    q, k, v = (torch.randn(1, 2, 40, 80, requires_grad=True) for _ in "qkv")
    with pytest.raises(NotImplementedError, match="float32 backward takes head dims up to 64"):
        torch_xegpu_attn.attention(q, k, v).sum().backward()


LSE_CASES = [
    # (dtype, E, causal, (batch..., H, Hkv), L, S)
    (torch.float16, 64, False, (1, 2, 2), 200, 200),
    (torch.float16, 64, True, (1, 2, 2), 100, 250),       # causal, L < S
    (torch.bfloat16, 128, True, (2, 2, 2), 130, 77),      # causal, L > S: rows that see no key
    (torch.float16, 32, False, (1, 1, 1), 7, 33),         # decode-like
    (torch.float16, 64, False, (1, 4, 2), 90, 120),       # GQA
]


@pytest.mark.parametrize("dtype,e,causal,heads,l,s", LSE_CASES)
def test_emulated_forward_lse(emulated, fresh_seed, dtype, e, causal, heads, l, s):
    """The training forward (attention_with_lse): out, written in float32, within 2x SDPA's
    error (SDPA's 16-bit output; ours rounds P to the input type as the inference kernel does)
    and the log-sum-exp to float32 rounding, against float64 (a row that sees no key: -inf)."""
    import math
    *batch, h, hkv = heads
    q = torch.randn(*batch, h, l, e, dtype=dtype)
    k = torch.randn(*batch, hkv, s, e, dtype=dtype)
    v = torch.randn(*batch, hkv, s, e, dtype=dtype)
    out, lse, _ = torch.ops.xegpu.attention_with_lse(q, k, v, None, 0.0, causal, None, h != hkv)
    assert _ran_on_xegpu(e) and out.dtype == torch.float32 and lse.shape == (*batch, h, l)
    kk, vv = (t.double().repeat_interleave(h // hkv, -3) for t in (k, v))
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(e)
    if causal:
        scores = scores.masked_fill(torch.ones(l, s, dtype=torch.bool).triu(1), float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref = torch.softmax(scores, -1).nan_to_num() @ vv
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != hkv)
    err, sdpa_err = (out.double() - ref).abs().max().item(), (sdpa.double() - ref).abs().max().item()
    assert err <= 2 * sdpa_err + 1e-3, (err, sdpa_err)
    seen = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), seen) and (lse[~seen] == float("-inf")).all()
    assert (lse.double() - ref_lse)[seen].abs().max().item() <= 4e-6


MASKS = [
    # (mask shape for q (B=2, H=2, L, E=64), dtype): every broadcast pattern class
    ((2, 2, 150, 170), torch.bool),
    ((150, 170), torch.bool),
    ((2, 1, 1, 170), torch.bool),      # a padding mask (b, s)
    ((1, 170), torch.bool),            # (s)
    ((150, 1), torch.bool),            # (l)
    ((2, 2, 150, 170), torch.float32),
    ((1, 2, 150, 170), torch.float16),
    ((2, 1, 1, 170), torch.float16),
    ((150, 1), torch.float32),
    ((2, 1, 1, 1), torch.float32),     # (b): one value a batch, read as a scalar
    ((1, 2, 1, 1), torch.bool),        # (h): a head with every key masked
]


@pytest.mark.parametrize("shape,dtype", MASKS, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in MASKS])
def test_emulated_masks(emulated, fresh_seed, shape, dtype):
    q = torch.randn(2, 2, 150, 64, dtype=torch.float16)
    k = torch.randn(2, 2, 170, 64, dtype=torch.float16)
    v = torch.randn(2, 2, 170, 64, dtype=torch.float16)
    mask = torch.rand(shape) > 0.3 if dtype == torch.bool else torch.randn(shape).to(dtype)
    check(q, k, v, attn_mask=mask)
    assert _ran_on_xegpu(64)


def test_emulated_fully_masked_rows_give_zero(emulated, fresh_seed):
    q = torch.randn(1, 2, 140, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 100, 128, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 100, 128, dtype=torch.bfloat16)
    mask = torch.rand(1, 2, 140, 100) > 0.5
    mask[:, :, ::7] = False  # every 7th query row sees no key
    import torch_xegpu_attn
    out = torch_xegpu_attn.attention(q, k, v, attn_mask=mask)
    assert (out[:, :, ::7] == 0).all()
    check(q, k, v, attn_mask=mask)


def test_emulated_scale_and_strided_inputs(emulated, fresh_seed):
    q = torch.randn(1, 100, 2, 64, dtype=torch.float16).transpose(1, 2)  # (B, H, L, E) with L-major storage
    k = torch.randn(1, 2, 90, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 90, 64, dtype=torch.float16)
    check(q, k, v, scale=0.3)


def test_emulated_copies_what_a_gpu_would_fault_on(emulated, fresh_seed):
    base = torch.randn(2 * 100 * 64 + 1, dtype=torch.float16)
    q = base[1:].view(1, 2, 100, 64)  # every head 2 bytes past a 64-byte boundary
    k = torch.randn(1, 2, 100, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 100, 72, dtype=torch.float16)[..., :64]  # rows 144 bytes apart
    mask = torch.rand(1, 2, 100, 100) > 0.3  # rows of 100 bytes: not a multiple of 16
    check(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("s", [5, 20, 33])
def test_emulated_masks_too_narrow_for_block_messages(emulated, fresh_seed, s):
    """Mask rows of fewer than 32 bytes or not a multiple of 4: widened copies, same results."""
    q = torch.randn(1, 2, 40, 64, dtype=torch.float16)
    k = torch.randn(1, 2, s, 64, dtype=torch.float16)
    v = torch.randn(1, 2, s, 64, dtype=torch.float16)
    check(q, k, v, attn_mask=torch.rand(40, s) > 0.3)


FLOAT32 = [
    # (E, causal, (batch..., H, Hkv), L, S, mask shape or None): float32 on DPAS through bf16 parts
    (64, True, (1, 4, 2), 70, 90, None),        # causal, GQA, tails
    (64, True, (2, 4, 2), 130, 20, None),       # L > S, fewer keys than one step (the kernel above)
    (64, False, (1, 2, 2), 1, 50, None),        # one query row
    (32, False, (1, 2, 2), 40, 60, (40, 60)),   # a bool mask (l, s), tails
    (80, False, (1, 2, 2), 50, 70, None),       # Q re-read at every step
]


@pytest.mark.parametrize("e,causal,heads,l,s,mask", FLOAT32)
def test_emulated_float32(emulated, fresh_seed, e, causal, heads, l, s, mask):
    """float32 inputs within 2x SDPA's float32 error (+ 2e-6): the products are as accurate as
    f32 multiplications, with no tf32 rounding anywhere."""
    *batch, h, hkv = heads
    q = torch.randn(*batch, h, l, e)
    k = torch.randn(*batch, hkv, s, e)
    v = torch.randn(*batch, hkv, s, e)
    kwargs = {"attn_mask": torch.rand(mask) > 0.3} if mask else {}
    check(q, k, v, is_causal=causal, enable_gqa=h != hkv, **kwargs)
    assert _ran_on_xegpu(e)


@pytest.mark.parametrize("what,kwargs,match", [
    ("float64", {"dtype": torch.float64}, "float64 is not implemented"),
    ("head dim 8", {"e": 8}, "multiples of 16"),
    ("head dim 24", {"e": 24}, "multiples of 16"),
    ("head dim 272", {"e": 272}, "multiples of 16"),
])
def test_unsupported_raise_before_any_work(emulated, what, kwargs, match):
    import torch_xegpu_attn
    from torch_xegpu_attn.compiler import COUNTERS
    dtype, e = kwargs.get("dtype", torch.float16), kwargs.get("e", 64)
    q = k = v = torch.randn(1, 2, 10, e, dtype=dtype)
    before = COUNTERS["compilations"]
    with pytest.raises(NotImplementedError, match=match):
        torch_xegpu_attn.attention(q, k, v)
    assert COUNTERS["compilations"] == before


def test_emulate_knob_rejects_unknown_devices(monkeypatch):
    import torch_xegpu_attn
    from torch_xegpu_attn.knobs import KnobError
    monkeypatch.setenv("XEGPU_ATTN_EMULATE", "gpu")
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    _C.clear_recipes()
    with pytest.raises(KnobError, match="XEGPU_ATTN_EMULATE"):
        torch_xegpu_attn.attention(q, q, q)


def test_emulated_launcher_reports_broken_block_messages(emulated, fresh_seed):
    """Past the launcher's checks (called directly), a misaligned head base reaches the kernel:
    the emulation records the broken block message, as the GPU would fault on it."""
    import torch_xegpu_attn
    from torch_xegpu_attn.runtime.xpu import emulation_queue
    q = torch.randn(1, 2, 100, 64, dtype=torch.float16)
    torch_xegpu_attn.attention(q, q, q)
    kernel = next(k for key, k in CACHE._memory.items() if key[0].target == "xegpu" and key[2] == "xpu"
                  and key[0].kernel == "forward" and key[0].head_dim == 64 and key[0].mask is None
                  and not key[0].causal and key[0].group == 1 and not key[0].dropout_p)
    base = torch.randn(2 * 100 * 64 + 8, dtype=torch.float16)
    shifted = base[8:].view(1, 2, 1, 100, 64)  # 16 bytes past a 64-byte boundary
    good = torch.randn(1, 2, 100, 64, dtype=torch.float16)
    out = torch.empty(1, 2, 1, 100, 64, dtype=torch.float16)
    status = kernel._native.run(emulation_queue(), [shifted, good, good, out], [3])
    assert status & 1  # base address not 64-byte aligned
    assert kernel.properties(emulation_queue())["format"] == "spirv"


def test_launcher_refuses_a_wrong_operand_count(emulated, fresh_seed):
    """A kernel called with fewer or more operands than its metadata names raises, before any
    launch (the native launcher would read past the list)."""
    import torch_xegpu_attn
    q = torch.randn(1, 2, 40, 64, dtype=torch.float16)
    torch_xegpu_attn.attention(q, q, q)
    kernel = next(k for key, k in CACHE._memory.items() if key[0].target == "xegpu" and key[2] == "xpu"
                  and key[0].kernel == "forward" and key[0].head_dim == 64 and key[0].mask is None
                  and not key[0].dropout_p)
    out = torch.empty(1, 2, 1, 40, 64, dtype=torch.float16)
    q5 = q.view(1, 2, 1, 40, 64)
    for operands in ([q5, q, q], [q5, q, q, out, out]):
        with pytest.raises(ValueError, match="takes 4 operands"):
            kernel(operands)


def test_emulated_memory_bound_releases_programs(emulated, cache_dir, monkeypatch, fresh_seed):
    """Three small kernels through a memory cache of one: each evicted kernel's program is
    released with it, so one stays built (the bound bounds the loaded programs too)."""
    from torch_xegpu_attn.runtime import xpu
    monkeypatch.setenv("XEGPU_ATTN_MEMORY_CACHE", "1")
    base = xpu.loaded_modules()
    evictions = cache_module.stats()["memory_evictions"]
    for e, causal in ((32, False), (64, False), (32, True)):
        q = torch.randn(1, 1, 40, e, dtype=torch.float16)
        check(q, q, q, is_causal=causal)
        assert xpu.loaded_modules() == base + 1, (e, causal)
    assert cache_module.stats()["memory_evictions"] == evictions + 2
    CACHE.clear_memory()
    assert xpu.loaded_modules() == base


def test_emulated_launch_that_raises_frees_its_staging(emulated, cache_dir, fresh_seed):
    """A launch that fails after staging its operands (here: a malformed grid program, evaluated
    once the operands are staged) frees the staging buffers all the same."""
    import torch_xegpu_attn
    from torch_xegpu_attn.runtime import xpu
    q = torch.randn(1, 1, 40, 32, dtype=torch.float16)
    torch_xegpu_attn.attention(q, q, q)
    assert xpu.staged_buffers() == 0
    kernel = next(k for key, k in CACHE._memory.items() if key[0].target == "xegpu" and key[0].kernel == "forward")
    (entry,) = cache_module.disk_entries(str(cache_dir))
    (binary,) = [n for n in entry["files"] if not n.endswith(".json")]
    kernels = kernel.metadata["kernels"]
    broken = xpu.extension().XpuKernel(
        (cache_dir / binary).read_bytes(), [], "", [k["name"] for k in kernels],
        [int(k["threads"]) for k in kernels], [[2]] * len(kernels), True)
    out = torch.empty(1, 1, 1, 40, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="malformed size program"):
        broken.run(xpu.emulation_queue(), [q.view(1, 1, 1, 40, 32), q, q, out], [3])
    assert xpu.staged_buffers() == 0


def test_cli_dump_holds_the_spirv_native_binaries_and_disassembly(tmp_path):
    import json
    import subprocess
    import sys
    dump = tmp_path / "ir"
    done = subprocess.run([sys.executable, "-m", "torch_xegpu_attn", "compile", "--target", "xegpu", "--shape",
                           "1,8,300,300,64", "--dtype", "float16", "--causal", "--dump-ir", str(dump)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr
    (folder,) = dump.iterdir()
    names = {p.name for p in folder.iterdir()}
    assert {"05-xegpu-wg.mlir", "06-xegpu-lowered.mlir", "kernel.ll", "kernel.spv"} <= names
    toolchain.validate((folder / "kernel.spv").read_bytes())
    if toolchain.ocloc_available() is None:
        assert {"kernel.pvc.bin", "kernel.pvc.asm", "kernel.bmg.bin", "kernel.bmg.asm", "native.json"} <= names
        native = json.loads((folder / "native.json").read_text())
        assert native["pvc"]["spill_bytes"] == 0 and native["bmg"]["dpas"] > 0
        assert "dpas" in (folder / "kernel.pvc.asm").read_text()


def test_precompile_for_xegpu_on_meta_tensors(cache_dir):
    import torch_xegpu_attn
    q = torch.empty(2, 8, 1000, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 1000, 64, device="meta", dtype=torch.bfloat16)
    key = torch_xegpu_attn.precompile(q, k, k, is_causal=True, enable_gqa=True, target="xegpu")
    assert (cache_dir / f"{key}.spv").exists()
    assert torch_xegpu_attn.precompile(q, k, k, is_causal=True, enable_gqa=True, target="xegpu") == key


# ----------------------------------------------------------------------------- drawn calls

#: what the emulated xegpu target takes; calls kept small (the emulation runs DPAS as shuffles).
XEGPU_CALLS = Target(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=GPU_HEAD_DIMS,
                     max_work=400_000)


@contextmanager
def _emulating():
    """XEGPU_ATTN_EMULATE=xpu for the block (hypothesis takes no function-scoped fixture)."""
    previous = os.environ.get("XEGPU_ATTN_EMULATE")
    os.environ["XEGPU_ATTN_EMULATE"] = "xpu"
    _C.clear_recipes()  # calls recorded for the cpu target must not replay here
    try:
        yield
    finally:
        _C.clear_recipes()
        if previous is None:
            os.environ.pop("XEGPU_ATTN_EMULATE")
        else:
            os.environ["XEGPU_ATTN_EMULATE"] = previous


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible(max_examples=budget(0.1))
@given(data=st.data())
def test_emulated_matches_sdpa_on_drawn_calls(masking, data):
    """Calls drawn from SDPA's whole input space (tests/sdpa_cases.py) with what the xegpu target
    takes, run emulated against SDPA on the CPU (a smaller budget than the cpu target's: every
    new spec is a kernel the OpenCL runtime builds)."""
    case = data.draw(cases(XEGPU_CALLS, masking), label="case")
    with _emulating():
        check_case(case)
        assert case.q.numel() == 0 or case.k.size(-2) == 0 or _ran_on_xegpu(case.q.size(-1))


#: what the emulated xegpu backward takes: 16-bit inputs at every head dim, float32 up to head dim
#: 64 (FLOAT32_BACKWARD_UP_TO); smaller calls (a training step is three kernels and a forward_lse one).
XEGPU_TRAINING_CALLS = Target(dtypes=(torch.float16, torch.bfloat16), head_dims=GPU_HEAD_DIMS, max_work=150_000)
XEGPU_F32_TRAINING_CALLS = Target(dtypes=(torch.float32,), head_dims=tuple(
    e for e in GPU_HEAD_DIMS if e <= xegpu_target.FLOAT32_BACKWARD_UP_TO), max_work=150_000)


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible(max_examples=budget(0.1))
@given(data=st.data())
def test_emulated_gradients_match_sdpa_on_drawn_calls(masking, data):
    """Training calls drawn from SDPA's whole input space (causal, bool and additive masks of every
    broadcast pattern, strided and broadcast inputs, GQA, any lengths and scales) through the
    xegpu target's forward_lse and backward kernels, emulated: the gradients within the cpu
    target's bound (sdpa_cases.check_gradients)."""
    case = data.draw(cases(XEGPU_TRAINING_CALLS, masking), label="case")
    with _emulating():
        check_gradients(case)


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible(max_examples=budget(0.1))
@given(data=st.data())
def test_emulated_float32_gradients_match_sdpa_on_drawn_calls(masking, data):
    """float32 training calls drawn as above (head dims up to 64) through the xegpu kernels'
    bf16-part DPAS, emulated: the gradients within the cpu target's bound."""
    case = data.draw(cases(XEGPU_F32_TRAINING_CALLS, masking), label="case")
    with _emulating():
        check_gradients(case)
