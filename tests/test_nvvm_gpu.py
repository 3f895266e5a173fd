"""The nvvm target on a CUDA GPU: numerics against a float64 reference, bounded by SDPA's error.

Skipped without a CUDA device (CI has none); run on a lent H100 or H200 (see
docs/testing.md).  Every case: fresh random inputs, outputs poisoned with NaN
(XEGPU_ATTN_POISON, conftest), the op's max abs error against the float64
reference at most 2x SDPA's on the same inputs plus a floor; float16,
bfloat16 and float32 (computed at f32 accuracy whatever allow_tf32 says), and
calls drawn from SDPA's whole input space (tests/sdpa_cases.py).  Also: a CUDA
graph captures the op, torch.compile(fullgraph=True) traces it, misaligned
inputs are copied rather than read wrongly, float64 and odd head dims raise,
evicted kernels unload their modules (but kernels a graph captured).

A GPU machine without MLIR runs these from precompiled kernels.  With
XEGPU_ATTN_TEST_PRECOMPILE=<arch> (e.g. sm_90a) the same tests run here, on
`meta` tensors, and put every kernel they call into the disk cache instead of
running it (XEGPU_ATTN_CACHE_DIR names the cache to carry to the GPU machine):

    XEGPU_ATTN_TEST_PRECOMPILE=sm_90a XEGPU_ATTN_CACHE_DIR=gpu-cache pytest tests/test_nvvm_gpu.py
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import torch_xegpu_attn
from conftest import reference_attention
from sdpa_cases import GPU_HEAD_DIMS, MASKINGS, Target, budget, cases, check_case, reproducible

PRECOMPILE_ARCH = os.environ.get("XEGPU_ATTN_TEST_PRECOMPILE", "")
DEVICE = "meta" if PRECOMPILE_ARCH else "cuda"
pytestmark = pytest.mark.skipif(not (PRECOMPILE_ARCH or torch.cuda.is_available()), reason="needs a CUDA GPU")
only_on_gpu = pytest.mark.skipif(bool(PRECOMPILE_ARCH), reason="precompiling: the kernels only")
GPU_TARGET = Target(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=GPU_HEAD_DIMS, device=DEVICE)

FLOOR = {torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float32: 2e-6}


def check(q, k, v, *, tf32_allowed: bool = False, **kw):
    """The op on (q, k, v, **kw) within 2x SDPA's error of the float64 reference, plus the floor
    (SDPA with torch's defaults; the op, with `tf32_allowed`, under allow_tf32 = True)."""
    if PRECOMPILE_ARCH:
        torch_xegpu_attn.precompile(q, k, v, **kw, target="nvvm", arch=PRECOMPILE_ARCH)
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32_allowed or previous
    try:
        ours = torch_xegpu_attn.attention(q, k, v, **kw)
        torch.cuda.synchronize()  # a fault of our kernel shows here, not in SDPA's call
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    sdpa = sdpa_on_gpu(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert ours.shape == sdpa.shape and ours.dtype == q.dtype and ours.device == q.device
    assert not ours.isnan().any(), "unwritten or NaN output elements"
    err = (ours.double() - ref).abs().max().item()
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    bound = 2 * sdpa_err + FLOOR[q.dtype]
    assert err <= bound, f"error {err:.3e} > bound {bound:.3e} (SDPA error {sdpa_err:.3e})"


def sdpa_on_gpu(q, k, v, **kw):
    """SDPA on the same inputs, around two bugs of torch 2.11's cuDNN backend (_aligned,
    _sdpa_safe) that are no part of what is compared."""
    return F.scaled_dot_product_attention(*_aligned(q, k, v), **_sdpa_safe(q, k, kw))


def _sdpa_safe(q, k, kw):
    """SDPA's arguments with a broadcast mask materialized: torch 2.11's cuDNN backend faults
    (misaligned address) on a (L, 1) mask, a bug of SDPA that is no part of what is compared."""
    mask = kw.get("attn_mask")
    if mask is None:
        return kw
    full = (*q.shape[:-1], k.size(-2))
    return {**kw, "attn_mask": mask.expand(full).contiguous()}


def _aligned(*tensors):
    """Inputs for SDPA, copied where a base is off the 16-byte grid: torch 2.11's cuDNN backend
    faults (misaligned address) on such a query (same values, so the same reference error)."""
    return [t if t.data_ptr() % 16 == 0 else t.clone() for t in tensors]


def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dtype, head_dim, causal, fresh_seed):
    check(rand(2, 3, 300, head_dim, dtype=dtype), rand(2, 3, 300, head_dim, dtype=dtype),
          rand(2, 3, 300, head_dim, dtype=dtype), is_causal=causal)


@pytest.mark.parametrize("L,S", [(1, 1), (7, 7), (64, 64), (100, 257), (257, 100), (1000, 1000), (1, 4097),
                                 (129, 3000), (3000, 129), (100, 30)])  # (100, 30): no full key tile
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(L, S, causal, fresh_seed):
    check(rand(1, 2, L, 64), rand(1, 2, S, 64), rand(1, 2, S, 64), is_causal=causal)


B, H, L, S = 2, 3, 37, 70
MASK_SHAPES = {"full": (B, H, L, S), "per_batch": (B, 1, L, S), "per_head": (1, H, L, S),
               "per_query_row": (L, 1), "rows_and_keys": (L, S), "key_padding": (B, 1, 1, S)}


@pytest.mark.parametrize("pattern", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(pattern, kind, fresh_seed):
    shape = MASK_SHAPES[pattern]
    if kind == "bool":
        mask = torch.rand(shape, device=DEVICE) > 0.4
    else:
        mask = torch.randn(shape, device=DEVICE, dtype=torch.float16)
        mask = mask.masked_fill(torch.rand(shape, device=DEVICE) > 0.8, float("-inf"))
    check(rand(B, H, L, 64), rand(B, H, S, 64), rand(B, H, S, 64), attn_mask=mask)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_long_prompts(head_dim, causal, fresh_seed):
    # Long prompts, with row and key tails: at D = 128 the "long" length class (256-row
    # work-groups; causal from L = 16384).
    check(rand(1, 1, 16400, head_dim), rand(1, 1, 16450, head_dim), rand(1, 1, 16450, head_dim), is_causal=causal)


def test_fully_masked_rows_give_zero(fresh_seed):
    mask = torch.rand(2, 1, 9, 70, device=DEVICE) > 0.5
    mask[:, :, 3] = False
    check(rand(2, 2, 9, 64), rand(2, 2, 70, 64), rand(2, 2, 70, 64), attn_mask=mask)
    if PRECOMPILE_ARCH:
        return
    out = torch_xegpu_attn.attention(rand(2, 2, 9, 64), rand(2, 2, 70, 64), rand(2, 2, 70, 64), attn_mask=mask)
    assert (out[:, :, 3] == 0).all()


@pytest.mark.parametrize("B,H", [(1, 1), (3, 7), (2, 16), (5, 8)])
def test_causal_grid_order(B, H, fresh_seed):
    # Causal grids go in chunks of 16 heads (b, h), costliest row tiles first: head counts
    # below, at and past a chunk, and a last chunk of fewer heads (21 = 16 + 5, 40 = 2 * 16 + 8);
    # an unvisited (head, row tile) shows as poisoned rows.
    check(rand(B, H, 300, 64), rand(B, H, 300, 64), rand(B, H, 300, 64), is_causal=True)
    check(rand(B, H, 300, 128), rand(B, H, 333, 128), rand(B, H, 333, 128), is_causal=True)


@pytest.mark.parametrize("L,S,causal,decode", [(300, 1000, False, False), (300, 1000, True, False),
                                               (1, 3000, False, True)])
def test_lazy_rescale_with_growing_scores(L, S, causal, decode, fresh_seed):
    # Scores that grow along the keys (key s scaled by up to 40x): the running maximum of
    # the odd rows passes the 2^8 threshold several times, so their warps take the rescale
    # branch, while the even rows (negated queries) keep the first tile's maximum; every
    # warp holds both kinds (decode: the packed query heads are the rows; the split
    # partials carry stale maxima into the combine).
    hq, hk = (32, 8) if decode else (4, 4)
    q = rand(2, hq, L, 128, dtype=torch.float32).abs()
    if decode:
        q[:, 0::2] *= -1
    else:
        q[..., 0::2, :] *= -1
    k = rand(2, hk, S, 128, dtype=torch.float32).abs()
    k = k * torch.linspace(0.1, 40.0, S, device=DEVICE)[:, None] / 128 ** 0.5
    v = rand(2, hk, S, 128, dtype=torch.float32)
    check(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), is_causal=causal, enable_gqa=decode)


@pytest.mark.parametrize("hq,hk,L,causal", [(8, 2, 50, False), (8, 2, 200, True), (32, 8, 1, False),
                                             (32, 8, 2, False), (6, 3, 1, False), (4, 1, 33, True)])
def test_gqa(hq, hk, L, causal, fresh_seed):
    check(rand(2, hq, L, 128, dtype=torch.bfloat16), rand(2, hk, 777, 128, dtype=torch.bfloat16),
          rand(2, hk, 777, 128, dtype=torch.bfloat16), is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("S", [1, 63, 255, 256, 1000, 2500, 8191, 20000])
def test_decode_split_keys(S, fresh_seed):
    # below 256 keys the prefill kernel; from 256 split keys, P = min(64, ceil(256 / 24),
    # ceil(S / 128)): 2, 8, 11 (the combine merges 8 splits a step, then a remainder loop)
    check(rand(3, 32, 1, 128, dtype=torch.bfloat16), rand(3, 8, S, 128, dtype=torch.bfloat16),
          rand(3, 8, S, 128, dtype=torch.bfloat16), enable_gqa=True)


@pytest.mark.parametrize("e,ev", [(64, 32), (32, 128), (128, 64)])
def test_value_head_dim_differs(e, ev, fresh_seed):
    check(rand(2, 2, 133, e), rand(2, 2, 65, e), rand(2, 2, 65, ev), is_causal=e == 32)


def test_leading_dims_and_strided_inputs(fresh_seed):
    check(rand(2, 3, 4, 20, 64), rand(2, 3, 4, 40, 64), rand(2, 3, 4, 40, 64))
    q = rand(2, 40, 4, 64).transpose(1, 2)  # (B, L, H, E) memory as (B, H, L, E)
    k = rand(2, 60, 4, 64).transpose(1, 2)
    v = rand(2, 60, 4, 64).transpose(1, 2)
    check(q, k, v, is_causal=True)


def test_misaligned_inputs_are_copied(fresh_seed):
    # A view starting one element in: its rows are not on the 16-byte grid the copies use.
    base = rand(2 * 3 * 100 * 64 + 1)
    q = base[1:].view(2, 3, 100, 64)
    check(q, rand(2, 3, 100, 64), rand(2, 3, 100, 64))


REPLAY_CASES = {
    "plain": lambda: ((2, 4, 100, 64), (2, 4, 100, 64), {}),
    "causal-128": lambda: ((1, 3, 77, 128), (1, 3, 140, 128), {"is_causal": True}),
    "bool-mask": lambda: ((2, 2, 50, 64), (2, 2, 70, 64), {"attn_mask": torch.rand(50, 70, device=DEVICE) > 0.3}),
    "decode-gqa": lambda: ((1, 8, 1, 128), (1, 2, 3000, 128), {"enable_gqa": True}),  # split keys: workspaces
}


@pytest.mark.parametrize("case", sorted(REPLAY_CASES))
def test_replayed_calls_match_the_reference(case, fresh_seed):
    """The second call of a signature is replayed by the CUDA launcher (no Python): new data,
    new output, through both entry points; an input whose base breaks the 16-byte alignment is
    sent to the checked path (which copies it)."""
    from torch_xegpu_attn import cache
    q_shape, kv_shape, kw = REPLAY_CASES[case]()
    if PRECOMPILE_ARCH:
        check(rand(*q_shape), rand(*kv_shape), rand(*kv_shape), **kw)
        return
    check(rand(*q_shape), rand(*kv_shape), rand(*kv_shape), **kw)  # checked and recorded
    before = cache.stats()["replays"]
    check(rand(*q_shape), rand(*kv_shape), rand(*kv_shape), **kw)
    q, k, v = rand(*q_shape), rand(*kv_shape), rand(*kv_shape)
    out = torch.ops.xegpu.attention(q, k, v, **kw)
    torch.testing.assert_close(out, torch_xegpu_attn.attention(q, k, v, **kw), atol=0, rtol=0)
    assert cache.stats()["replays"] == before + 3
    base = rand(q.numel() + 1)
    check(base[1:].view(q_shape), k, v, **kw)  # same signature, misaligned base: not replayed
    assert cache.stats()["replays"] == before + 3


@only_on_gpu
def test_cuda_graph_capture(fresh_seed):
    q, k, v = rand(2, 4, 256, 64), rand(2, 4, 256, 64), rand(2, 4, 256, 64)
    expected = torch_xegpu_attn.attention(q, k, v, is_causal=True)  # compiles and warms up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch_xegpu_attn.attention(q, k, v, is_causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.xegpu.attention(q, k, v, is_causal=True)
    q.copy_(rand(2, 4, 256, 64))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-3, rtol=2e-3)
    assert not torch.equal(out, expected)


@only_on_gpu
def test_memory_bound_unloads_evicted_modules(monkeypatch, fresh_seed):
    """N > K kernels through a memory cache of K: an evicted kernel's CUmodule is unloaded once
    its recorded calls are gone too (replays hold the kernel), so exactly K stay loaded; a kernel
    still referenced elsewhere keeps its module until it is let go.  (Its kernels, the head dims
    of test_head_dims, are precompiled with them.)"""
    from torch_xegpu_attn import cache
    from torch_xegpu_attn.cache import CACHE
    from torch_xegpu_attn.runtime import cuda
    CACHE.clear_memory()
    monkeypatch.setenv("XEGPU_ATTN_MEMORY_CACHE", "2")
    try:
        base = cuda.loaded_modules()
        evictions = cache.stats()["memory_evictions"]
        for n, e in enumerate((16, 32, 64, 80), start=1):
            q, k, v = rand(1, 2, 64, e), rand(1, 2, 64, e), rand(1, 2, 64, e)
            check(q, k, v)
            replays = cache.stats()["replays"]
            check(q, k, v)  # replayed: the recorded call holds the kernel too
            assert cache.stats()["replays"] == replays + 1
            assert cuda.loaded_modules() == base + min(n, 2), f"after {n} kernels"
        assert cache.stats()["memory_evictions"] == evictions + 2

        kept = list(CACHE._memory.values())  # referred to from elsewhere: evicted, not unloaded
        for e in (96, 128):
            check(rand(1, 2, 64, e), rand(1, 2, 64, e), rand(1, 2, 64, e))
        assert cuda.loaded_modules() == base + 4
        del kept  # the last references: unloaded
        assert cuda.loaded_modules() == base + 2
    finally:
        CACHE.clear_memory()
    assert cuda.loaded_modules() == base


@only_on_gpu
def test_a_kernel_captured_into_a_graph_keeps_its_module(monkeypatch, fresh_seed):
    """A kernel whose functions a CUDA graph captured keeps its module when the memory cache
    evicts it: the graph still replays, correctly."""
    from torch_xegpu_attn.cache import CACHE
    from torch_xegpu_attn.runtime import cuda
    CACHE.clear_memory()
    monkeypatch.setenv("XEGPU_ATTN_MEMORY_CACHE", "1")
    try:
        q, k, v = rand(1, 2, 128, 64), rand(1, 2, 128, 64), rand(1, 2, 128, 64)
        torch_xegpu_attn.attention(q, k, v)  # compiles, loads and records
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch_xegpu_attn.attention(q, k, v)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.xegpu.attention(q, k, v)
        base = cuda.loaded_modules()
        check(rand(1, 2, 128, 32), rand(1, 2, 128, 32), rand(1, 2, 128, 32))  # evicts the captured kernel
        assert cuda.loaded_modules() == base + 1, "the captured kernel's module was unloaded"
        q.copy_(rand(1, 2, 128, 64))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-3, rtol=2e-3)
    finally:
        CACHE.clear_memory()


@only_on_gpu
def test_torch_compile_fullgraph(fresh_seed):
    def block(q, k, v):
        return torch.ops.xegpu.attention(q, k, v, is_causal=True) * 2
    compiled = torch.compile(block, fullgraph=True)
    q, k, v = rand(1, 2, 128, 64), rand(1, 2, 128, 64), rand(1, 2, 128, 64)
    torch.testing.assert_close(compiled(q, k, v), 2 * F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible(max_examples=budget(0.5))
@given(data=st.data())
def test_matches_sdpa_on_drawn_calls(masking, data):
    """Calls drawn from SDPA's whole input space (tests/sdpa_cases.py) with what the nvvm target
    takes (f16, bf16, f32; head dims multiples of 16), against SDPA on the GPU.  Precompiling,
    the same seed draws the same calls (meta tensors) and puts their kernels in the cache."""
    case = data.draw(cases(GPU_TARGET, masking), label="case")
    if PRECOMPILE_ARCH:
        torch_xegpu_attn.precompile(case.q, case.k, case.v, **case.kwargs, target="nvvm", arch=PRECOMPILE_ARCH)
        return
    check_case(case, sdpa=sdpa_on_gpu)


F32_CASES = {
    "tails": lambda: ((rand(2, 3, 100, 64, dtype=F32), rand(2, 3, 257, 64, dtype=F32), rand(2, 3, 257, 64, dtype=F32)),
                      {}),
    "causal-long": lambda: ((rand(1, 2, 1500, 128, dtype=F32), rand(1, 2, 1600, 128, dtype=F32),
                             rand(1, 2, 1600, 128, dtype=F32)), {"is_causal": True}),
    "bool-mask": lambda: ((rand(2, 2, 37, 96, dtype=F32), rand(2, 2, 70, 96, dtype=F32), rand(2, 2, 70, 96, dtype=F32)),
                          {"attn_mask": torch.rand(2, 1, 37, 70, device=DEVICE) > 0.4}),
    "additive-mask": lambda: ((rand(2, 2, 37, 64, dtype=F32), rand(2, 2, 70, 64, dtype=F32),
                               rand(2, 2, 70, 64, dtype=F32)), {"attn_mask": rand(37, 70, dtype=F32)}),
    "gqa-decode": lambda: ((rand(2, 8, 1, 128, dtype=F32), rand(2, 2, 3000, 128, dtype=F32),
                            rand(2, 2, 3000, 128, dtype=F32)), {"enable_gqa": True}),
    "decode-e256": lambda: ((rand(1, 4, 1, 256, dtype=F32), rand(1, 4, 1000, 256, dtype=F32),
                             rand(1, 4, 1000, 256, dtype=F32)), {}),
    "ev-differs": lambda: ((rand(2, 2, 133, 64, dtype=F32), rand(2, 2, 65, 64, dtype=F32),
                            rand(2, 2, 65, 32, dtype=F32)), {"is_causal": True}),
    "large-scores": lambda: ((3 * rand(1, 2, 200, 64, dtype=F32), 3 * rand(1, 2, 300, 64, dtype=F32),
                              rand(1, 2, 300, 64, dtype=F32)), {"scale": 1.0}),
}
F32 = torch.float32


@pytest.mark.parametrize("case", sorted(F32_CASES))
def test_float32(case, fresh_seed):
    """float32 computes in f32 (tf32 halves on the tensor cores, three products each): within 2x
    SDPA's own f32 error, whatever torch.backends.cuda.matmul.allow_tf32 says."""
    (q, k, v), kw = F32_CASES[case]()
    check(q, k, v, tf32_allowed=True, **kw)


@only_on_gpu
def test_float64_raises_clearly():
    with pytest.raises(NotImplementedError, match="float64"):
        torch_xegpu_attn.attention(rand(1, 1, 8, 64, dtype=torch.float64), rand(1, 1, 8, 64, dtype=torch.float64),
                                   rand(1, 1, 8, 64, dtype=torch.float64))


@only_on_gpu
def test_odd_head_dim_raises_clearly():
    with pytest.raises(NotImplementedError, match="multiples of 16"):
        torch_xegpu_attn.attention(rand(1, 1, 8, 72), rand(1, 1, 8, 72), rand(1, 1, 8, 72))
