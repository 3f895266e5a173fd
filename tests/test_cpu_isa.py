"""The cpu target's vector ISA: chosen from the host, narrowed by XEGPU_ATTN_CPU_ISA, in the
cache key, and every ISA this host can run checked for numerics.

An AVX-512 host runs the AVX2 (and SSE) code here as well, so CI on either kind of machine
checks every path it can execute.  The kernels' instructions are read back from the binary
(llvm-objdump): code built for AVX2 must not touch a zmm register, code built for SSE no ymm.
"""

import json
import os
import re
import subprocess
from dataclasses import replace

import pytest
import torch

import torch_xegpu_attn
from conftest import check, reference_attention
from sdpa_cases import Case, check_gradients
from torch_xegpu_attn.cache import kernel_key
from torch_xegpu_attn.compiler import compile_spec
from torch_xegpu_attn.spec import AttentionSpec
from torch_xegpu_attn.targets.cpu import CPU, register_tile, toolchain

RUNNABLE = [isa.name for isa in toolchain.ISAS if isa.requires <= toolchain.host_flags()]
MISSING = [isa.name for isa in toolchain.ISAS if not isa.requires <= toolchain.host_flags()]
SPEC = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float32", length_class="long")
#: a register the code of each ISA must not use (None: anything goes).
FORBIDDEN = {"avx512": None, "avx2": re.compile(r"%zmm"), "sse": re.compile(r"%[yz]mm")}


@pytest.fixture(params=RUNNABLE)
def isa(request, monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", request.param)
    return request.param


def test_the_host_runs_at_least_one_isa():
    assert RUNNABLE, f"no ISA of {[i.name for i in toolchain.ISAS]} runs here"
    assert toolchain.host_isa().name == RUNNABLE[0]  # the widest one by default


def test_options_follow_the_isa(isa):
    options = CPU.options_for(SPEC)
    assert options.isa == isa
    assert (options.m_block, options.n_block) == register_tile(toolchain.isa_named(isa), 32)
    isa_info = toolchain.isa_named(isa)
    accumulators = options.m_block * options.n_block // isa_info.lanes(32)
    assert accumulators + options.n_block // isa_info.lanes(32) < isa_info.registers


def test_isa_is_part_of_the_cache_key(monkeypatch):
    keys = set()
    for name in RUNNABLE:
        monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", name)
        keys.add(kernel_key(SPEC))
    assert len(keys) == len(RUNNABLE)


@pytest.mark.parametrize("name", MISSING or ["-"])
def test_an_isa_the_host_lacks_is_refused(name, monkeypatch):
    if name == "-":
        pytest.skip("this host runs every ISA the cpu target knows")
    monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", name)
    with pytest.raises(NotImplementedError, match="lacks"):
        CPU.options_for(SPEC)


def test_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="unknown cpu ISA"):
        CPU.options_for(SPEC)


def test_binary_uses_only_its_isa(isa, tmp_path):
    forbidden = FORBIDDEN[isa]
    if forbidden is None:
        pytest.skip("the widest ISA may use every register")
    library = tmp_path / "kernel.so"
    library.write_bytes(compile_spec(SPEC).binary)
    disassembly = subprocess.run([toolchain.tool("llvm-objdump"), "-d", str(library)],
                                 capture_output=True, text=True, check=True).stdout
    assert "vfmadd" in disassembly or isa == "sse"
    assert not forbidden.search(disassembly), f"{isa} code uses registers of a wider ISA"


CASES = [  # (B, Hq, Hkv, L, S, E, Ev), dtype, causal
    ((2, 3, 3, 100, 257, 64, 64), torch.float32, False),   # K^T materialized, key tail
    ((1, 8, 2, 33, 70, 128, 96), torch.float32, True),     # GQA, Ev != E
    ((1, 2, 2, 7, 100, 80, 80), torch.float32, False),     # K read in place
    ((1, 4, 4, 130, 130, 64, 64), torch.bfloat16, True),
    ((1, 2, 2, 70, 70, 32, 32), torch.float64, False),
    ((1, 8, 2, 1, 300, 128, 128), torch.float32, False),   # decode, packed query heads
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_numerics_per_isa(isa, case, fresh_seed):
    (b, hq, hkv, l, s, e, ev), dtype, causal = CASES[case]
    q = torch.randn(b, hq, l, e, dtype=dtype)
    k = torch.randn(b, hkv, s, e, dtype=dtype)
    v = torch.randn(b, hkv, s, ev, dtype=dtype)
    check(q, k, v, is_causal=causal, enable_gqa=hq != hkv)


NAN_CASES = [  # (B, Hq, Hkv, L, S, E), causal: a NaN in one query row and in one key
    ((1, 2, 2, 200, 200, 64), True),    # K^T materialized ("long")
    ((2, 4, 2, 200, 130, 64), False),   # GQA, key tail
    ((1, 2, 2, 7, 100, 32), False),     # K read in place ("short")
    ((1, 8, 2, 1, 300, 128), False),    # decode
]


@pytest.mark.parametrize("case", range(len(NAN_CASES)))
def test_a_nan_reaches_exactly_its_rows(isa, case, fresh_seed):
    """A NaN score makes its row NaN, as in standard attention, whichever row maximum the
    kernel computes (its maxima need not carry NaN: the NaN's probability does)."""
    (b, hq, hkv, l, s, e), causal = NAN_CASES[case]
    q, k, v = torch.randn(b, hq, l, e), torch.randn(b, hkv, s, e), torch.randn(b, hkv, s, e)
    q[0, hq - 1, l // 2, 3] = float("nan")
    k[b - 1, 0, s // 3, 5] = float("nan")
    gqa = hq != hkv
    ours = torch_xegpu_attn.attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    ref = reference_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    nan = ref.isnan()
    assert nan.any() and not nan.all()
    assert torch.equal(ours.isnan(), nan)
    torch.testing.assert_close(ours.double()[~nan], ref[~nan], rtol=1e-4, atol=1e-5)


BF16_DOT = toolchain.runs_bf16_dot("avx512")
BF16_SPEC = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="bfloat16", length_class="long")


def test_bf16_dot_follows_the_host_and_the_dtype(isa):
    # AVX512-BF16's dot products for bf16 kernels of the avx512 ISA on a host that has them
    assert CPU.options_for(BF16_SPEC).bf16_dot == (isa == "avx512" and "avx512_bf16" in toolchain.host_flags())
    assert not CPU.options_for(SPEC).bf16_dot


def test_bf16_dot_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", '{"bf16_dot": true}')
    for name in [name for name in RUNNABLE if not toolchain.runs_bf16_dot(name)]:
        monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", name)
        with pytest.raises(ValueError, match="bf16_dot needs the avx512 ISA on a host with avx512_bf16"):
            CPU.options_for(BF16_SPEC)


@pytest.mark.skipif(not BF16_DOT, reason="the host has no AVX512-BF16")
@pytest.mark.parametrize("dot", [True, False])
def test_bf16_dot_in_the_binary(dot, monkeypatch, tmp_path):
    monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", "avx512")
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps({"bf16_dot": dot}))
    for kernel in ("forward", "backward"):
        library = tmp_path / f"{kernel}.so"
        library.write_bytes(compile_spec(replace(BF16_SPEC, kernel=kernel)).binary)
        disassembly = subprocess.run([toolchain.tool("llvm-objdump"), "-d", str(library)],
                                     capture_output=True, text=True, check=True).stdout
        assert ("vdpbf16ps" in disassembly) == dot, kernel


@pytest.mark.skipif(not BF16_DOT, reason="the host has no AVX512-BF16")
@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_dot_numerics(dot, causal, monkeypatch, fresh_seed):
    # both forms of the bf16 contractions against the float64 reference: the forward and the
    # gradients, whose recomputed scores and dP = dOut V^T go through the dot products too
    monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", "avx512")
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps({"bf16_dot": dot}))
    q = torch.randn(2, 4, 150, 64, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 190, 64, dtype=torch.bfloat16), torch.randn(2, 2, 190, 32, dtype=torch.bfloat16)
    check(q, k, v, is_causal=causal, enable_gqa=True)
    check_gradients(Case(q, k, v, {"is_causal": causal, "enable_gqa": True}))


@pytest.mark.skipif(not BF16_DOT, reason="the host has no AVX512-BF16")
def test_bf16_dot_next_to_masked_bf16_loads(monkeypatch, fresh_seed):
    # A head dim that no vector divides and a bf16 additive mask: the kernels load bf16 rows
    # under masks, which llc cannot do on bfloat vectors, next to the dot products of Q K^T.
    monkeypatch.setenv("XEGPU_ATTN_CPU_ISA", "avx512")
    q, k, v = (torch.randn(1, 2, n, 80, dtype=torch.bfloat16) for n in (37, 70, 70))
    mask = torch.randn(37, 70, dtype=torch.bfloat16)
    check(q, k, v, attn_mask=mask)
    check(q[..., :1, :17], k[..., :17], v[..., :1], attn_mask=mask[:1, :1], scale=1.0)
