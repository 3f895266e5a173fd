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
from conftest import reference_attention, reference_scores, uncached_compile
import sdpa_cases
from sdpa_cases import GPU_HEAD_DIMS, MASKINGS, Case, Target, budget, cases, check_case, check_gradients, reproducible

PRECOMPILE_ARCH = os.environ.get("XEGPU_ATTN_TEST_PRECOMPILE", "")
DEVICE = "meta" if PRECOMPILE_ARCH else "cuda"
pytestmark = pytest.mark.skipif(not (PRECOMPILE_ARCH or torch.cuda.is_available()), reason="needs a CUDA GPU")
only_on_gpu = pytest.mark.skipif(bool(PRECOMPILE_ARCH), reason="precompiling: the kernels only")
GPU_TARGET = Target(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=GPU_HEAD_DIMS, device=DEVICE)
#: backward cases cost about three forwards (and a float64 reference on the CPU): smaller problems.
GRADIENT_TARGET = Target(dtypes=GPU_TARGET.dtypes, head_dims=GPU_HEAD_DIMS, device=DEVICE, max_work=600_000)

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


# --------------------------------------------------------------------------- training


def check_training(q, k, v, **kw):
    """The gradients of q, k and v through the op (its forward_lse and backward kernels) within
    2x SDPA's gradient error on the GPU of the float64 reference's (sdpa_cases.check_gradients:
    one random output gradient, gradients poisoned before the backward)."""
    if PRECOMPILE_ARCH:
        for kernel in ("forward_lse", "backward"):
            torch_xegpu_attn.precompile(q, k, v, **kw, target="nvvm", arch=PRECOMPILE_ARCH, kernel=kernel)
        return
    errors = check_gradients(Case(q, k, v, kw), sdpa=sdpa_on_gpu)
    torch.cuda.synchronize()
    assert errors is not None, "SDPA and the op both raised"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_training_head_dims(dtype, head_dim, causal, fresh_seed):
    check_training(rand(2, 3, 200, head_dim, dtype=dtype), rand(2, 3, 200, head_dim, dtype=dtype),
                   rand(2, 3, 200, head_dim, dtype=dtype), is_causal=causal)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 700), (100, 300), (300, 100), (129, 257), (64, 64), (1000, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_training_lengths(L, S, causal, fresh_seed):
    """Row and key tails, one row, decode-like forwards (split keys: the log-sum-exp from the
    combine), causal with L != S (rows that see no key have gradient 0)."""
    check_training(rand(2, 4, L, 64), rand(2, 4, S, 64), rand(2, 4, S, 64), is_causal=causal)


@pytest.mark.parametrize("pattern", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 3, 1, 1), (2, 3, 37, 70), (1, 1, 37, 1),
                                     (1, 1, 1, 70)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_training_masks(pattern, kind, fresh_seed):
    """Masks in every broadcast pattern (read transposed by the dK/dV kernel), with a row that
    sees no key where the mask is bool."""
    full = torch.rand(2, 3, 37, 70, device=DEVICE) > 0.4
    if kind == "bool":
        mask = full[tuple(slice(0, n) for n in pattern)].clone()
        if pattern[2] == 37 and pattern[3] == 70:
            mask[:, :, 5] = False
    else:
        mask = rand(*pattern)
    check_training(rand(2, 3, 37, 64), rand(2, 3, 70, 64), rand(2, 3, 70, 64), attn_mask=mask)


@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_training_gqa(hq, hk, causal, fresh_seed):
    """dK and dV summed over the query heads of a group (the dK/dV kernel loops over them)."""
    check_training(rand(2, hq, 150, 64, dtype=torch.bfloat16), rand(2, hk, 150, 64, dtype=torch.bfloat16),
                   rand(2, hk, 150, 64, dtype=torch.bfloat16), is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("q_batch,kv_batch", [(8, 1), (1, 8)])
def test_training_summed_gradients(q_batch, kv_batch, fresh_seed):
    """Inputs broadcast over the batch: their gradients written in float32 by the kernel (the
    spec's wide_gradients), summed and rounded once by the frontend."""
    check_training(rand(q_batch, 2, 100, 64), rand(kv_batch, 2, 150, 64), rand(kv_batch, 2, 150, 64), is_causal=True)


@pytest.mark.parametrize("e,ev", [(32, 64), (128, 64), (64, 128)])
def test_training_value_head_dim_differs(e, ev, fresh_seed):
    check_training(rand(2, 2, 133, e), rand(2, 2, 200, e), rand(2, 2, 200, ev), is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("L,S", [(300, 300), (1, 3000)])
def test_return_lse(dtype, L, S, fresh_seed):
    """return_lse=True: the output and the float32 log-sum-exp per query row against the float64
    reference's (the prefill kernel's and the split-key decode's combine)."""
    q, k, v = rand(2, 8, L, 64, dtype=dtype), rand(2, 2, S, 64, dtype=dtype), rand(2, 2, S, 64, dtype=dtype)
    if PRECOMPILE_ARCH:
        torch_xegpu_attn.precompile(q, k, v, enable_gqa=True, target="nvvm", arch=PRECOMPILE_ARCH,
                                    kernel="forward_lse")
        return
    out, lse = torch_xegpu_attn.attention(q, k, v, enable_gqa=True, return_lse=True)
    assert lse.shape == (2, 8, L) and lse.dtype == torch.float32 and out.dtype == dtype
    expected = torch.logsumexp(reference_scores(q, k, enable_gqa=True), -1)
    torch.testing.assert_close(lse.double().cpu(), expected.cpu(), rtol=1e-4, atol=1e-4)
    ref = reference_attention(q, k, v, enable_gqa=True)
    sdpa_err = (sdpa_on_gpu(q, k, v, enable_gqa=True).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * sdpa_err + FLOOR[dtype]


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible(max_examples=budget(0.25))
@given(data=st.data())
def test_gradients_on_drawn_calls(masking, data):
    """Gradients of calls drawn from SDPA's whole input space (as test_matches_sdpa_on_drawn_calls)
    against SDPA's on the GPU."""
    case = data.draw(cases(GRADIENT_TARGET, masking), label="case")
    check_training(case.q, case.k, case.v, **case.kwargs)


def check_dropout(q, k, v, p, **kw):
    """sdpa_cases.check_dropout on the GPU (with XEGPU_ATTN_TEST_PRECOMPILE: the three kernels
    compiled into the disk cache instead)."""
    if PRECOMPILE_ARCH:
        for kernel in ("forward", "forward_lse", "backward"):
            torch_xegpu_attn.precompile(q, k, v, **kw, target="nvvm", arch=PRECOMPILE_ARCH, kernel=kernel,
                                        dropout_p=p)
        return
    sdpa_cases.check_dropout(q, k, v, p, **kw)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape,kw", [
    (((2, 3, 200, 64), (2, 3, 300, 64)), {}),
    (((1, 4, 257, 128), (1, 4, 257, 128)), {"is_causal": True}),
    (((2, 6, 100, 64), (2, 2, 130, 64)), {"enable_gqa": True}),
    (((2, 2, 1, 64), (2, 2, 2000, 64)), {}),  # decode-like: one row per head
], ids=["plain", "causal-e128", "gqa", "one-row"])
def test_dropout(shape, kw, p, dtype, fresh_seed):
    (shape_q, shape_kv) = shape
    check_dropout(rand(*shape_q, dtype=dtype), rand(*shape_kv, dtype=dtype), rand(*shape_kv, dtype=dtype), p, **kw)


def test_dropout_with_a_mask(fresh_seed):
    mask = torch.rand(2, 1, 37, 70, device=DEVICE) > 0.3
    if not PRECOMPILE_ARCH:
        mask[:, :, 3] = False  # a row with no key
    check_dropout(rand(2, 3, 37, 64), rand(2, 3, 70, 64), rand(2, 3, 70, 64), 0.2, attn_mask=mask)


@only_on_gpu
def test_dropout_refuses_graph_capture():
    """A captured call would replay one seed, so one mask, at every replay: capture raises."""
    q = rand(1, 2, 64, 64)
    torch_xegpu_attn.attention(q, q, q)  # loads the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(NotImplementedError, match="CUDA graph"):
        with torch.cuda.graph(graph):
            torch_xegpu_attn.attention(q, q, q, dropout_p=0.1)


def _training_step_inputs():
    q, k, v = (rand(2, 4, 256, 64) for _ in range(3))
    return q, k, v, rand(2, 4, 256, 64)


@pytest.mark.parametrize("op", ["ours", "sdpa"])
def test_cuda_graph_captures_a_training_step(op, fresh_seed):
    """The forward and backward of a training step captured into a CUDA graph and replayed on new
    inputs: the gradients of eager calls on those inputs (SDPA the same, as the control)."""
    q, k, v, dout = _training_step_inputs()
    if PRECOMPILE_ARCH:
        if op == "ours":
            check_training(q, k, v, is_causal=True)
        return
    attention = torch_xegpu_attn.attention if op == "ours" else F.scaled_dot_product_attention
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = attention(*leaves, is_causal=True)
        return torch.autograd.grad(out, leaves, dout)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles, loads and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    fresh = [rand(2, 4, 256, 64) for _ in range(3)]
    with torch.no_grad():
        for leaf, new in zip(leaves, fresh):
            leaf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernels on the same inputs


class _LlamaBlock(torch.nn.Module):
    """A Llama-style decoder layer: RMSNorm, rotary positions, grouped-query causal attention
    (8 query heads over 2 key/value heads), SwiGLU MLP; `attention` is the op or SDPA."""

    def __init__(self, dim=256, heads=8, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)
        self.gate, self.up = torch.nn.Linear(dim, 2 * dim, bias=False), torch.nn.Linear(dim, 2 * dim, bias=False)
        self.down = torch.nn.Linear(2 * dim, dim, bias=False)

    def _rotary(self, x):
        n, d = x.size(-2), x.size(-1)
        freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
        angle = torch.arange(n, device=x.device, dtype=torch.float64)[:, None] * freq
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)

    def forward(self, x, attention):
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = attention(self._rotary(q), self._rotary(k), v, is_causal=True, enable_gqa=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, n, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _precompile_llama_block():
    """The training kernels _LlamaBlock calls (bf16, 8 query heads over 2, head dim 32, causal)."""
    check_training(rand(2, 8, 200, 32, dtype=torch.bfloat16), rand(2, 2, 200, 32, dtype=torch.bfloat16),
                   rand(2, 2, 200, 32, dtype=torch.bfloat16), is_causal=True, enable_gqa=True)


def test_llama_style_gqa_training_step(fresh_seed):
    """A training step of a two-layer Llama-style GQA model in bfloat16 with the op and with SDPA:
    the loss and every parameter's gradient within 2x SDPA's error of the float64 step, plus a
    floor."""
    if PRECOMPILE_ARCH:
        return _precompile_llama_block()
    torch.manual_seed(fresh_seed)
    layers = torch.nn.ModuleList(_LlamaBlock() for _ in range(2)).cuda()
    x = torch.randn(2, 200, 256, device="cuda")
    target = torch.randn(2, 200, 256, device="cuda")

    def step(attention, dtype):
        model = layers.to(dtype)
        model.zero_grad()
        y = x.to(dtype)
        for layer in model:
            y = layer(y, attention)
        loss = (y.double() - target.double()).square().mean()
        loss.backward()
        return loss.item(), {name: p.grad.double().clone() for name, p in model.named_parameters()}
    ours_loss, ours = step(torch_xegpu_attn.attention, torch.bfloat16)
    sdpa_loss, sdpa = step(F.scaled_dot_product_attention, torch.bfloat16)
    ref_loss, ref = step(F.scaled_dot_product_attention, torch.float64)
    assert abs(ours_loss - ref_loss) <= 2 * abs(sdpa_loss - ref_loss) + 1e-3 * abs(ref_loss)
    for name in ref:
        scale = ref[name].abs().max().item()
        err, sdpa_err = (ours[name] - ref[name]).abs().max().item(), (sdpa[name] - ref[name]).abs().max().item()
        assert err <= 2 * sdpa_err + 1e-2 * scale, f"{name}: error {err:.3e}, SDPA's {sdpa_err:.3e}"


def test_torch_compile_training_step(fresh_seed):
    """torch.compile(fullgraph=True) of a training step on CUDA tensors: no graph break, eager's
    gradients."""
    from torch._dynamo.utils import counters
    if PRECOMPILE_ARCH:
        return _precompile_llama_block()
    torch.manual_seed(fresh_seed)
    layer = _LlamaBlock().cuda().to(torch.bfloat16)
    x = torch.randn(2, 200, 256, device="cuda", dtype=torch.bfloat16)

    def step(x):
        return layer(x, torch_xegpu_attn.attention).float().square().mean()
    torch._dynamo.reset()
    counters.clear()
    with uncached_compile():
        loss = torch.compile(step, fullgraph=True)(x)
        loss.backward()
    compiled = {name: p.grad.clone() for name, p in layer.named_parameters()}
    assert not counters["graph_break"], dict(counters["graph_break"])
    layer.zero_grad()
    expected = step(x)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-3)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(compiled[name].float(), p.grad.float(), rtol=5e-2, atol=5e-3)
