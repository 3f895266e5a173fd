"""Shared test setup: a private disk cache per test session, and reference attention."""

import atexit
import contextlib
import os
import shutil
import tempfile
import zlib

import pytest
import torch

# Every test session starts with an empty, private disk cache (set before the package is used),
# removed when the session's process exits (xdist workers inherit the variable and leave it alone).
if not os.environ.get("XEGPU_ATTN_CACHE_DIR"):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="xegpu_attn_test_cache_")
    os.environ["XEGPU_ATTN_CACHE_DIR"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
# Outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ["XEGPU_ATTN_POISON"] = "1"

import torch_xegpu_attn  # noqa: E402,F401  (registers torch.ops.xegpu.attention)


def repeat_heads(t: torch.Tensor, q: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """A key or value with its heads repeated up to the query's (GQA: query head i reads
    key/value head i // group), as SDPA's enable_gqa does."""
    if enable_gqa and q.dim() >= 3 and t.size(-3) != q.size(-3):
        return t.repeat_interleave(q.size(-3) // t.size(-3), dim=-3)
    return t


def reference_scores(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dtype=torch.float64):
    """The scaled, masked scores of standard attention in float64 (or `dtype`; -inf where masked)."""
    q, k = q.to(dtype), repeat_heads(k.to(dtype), q, enable_gqa)
    scale = 1.0 / q.size(-1) ** 0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    L, S = scores.shape[-2:]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(dtype)
    return scores


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                        dropout_p=0.0, keep=None):
    """Standard attention in float64, written out (not SDPA): the ground truth of the tests.

    Fully masked rows give 0, as SDPA does.  With dropout, `keep` is the boolean keep-mask of
    the probabilities (`torch_xegpu_attn.dropout_mask` draws the op's); kept ones are scaled by
    1 / (1 - dropout_p).
    """
    if dropout_p > 0 and keep is None:
        raise ValueError("the reference of a dropout call needs its keep-mask")
    scores = reference_scores(q, k, attn_mask, is_causal, scale, enable_gqa)
    v = repeat_heads(v.double(), q, enable_gqa)
    if scores.size(-1) == 0:  # no keys: every row is fully masked
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.amax(-1, keepdim=True)
    dead = torch.isneginf(row_max)
    weights = torch.exp(scores - torch.where(dead, torch.zeros_like(row_max), row_max))
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total == 0, torch.ones_like(total), total)
    if dropout_p >= 1:
        probs = torch.zeros_like(probs)
    elif dropout_p > 0:
        probs = probs * keep / (1 - dropout_p)
    out = probs @ v
    return torch.where(dead, torch.zeros_like(out), out)


#: Philox4x32's round multipliers and key increments (Salmon et al., SC 2011).
_PHILOX_M, _PHILOX_W = (0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85)
_WORD = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int):
    """The high and low 32-bit words of a * m (a: int64 tensor of 32-bit words), exact in int64
    by 16-bit halves of a."""
    low_part, high_part = (a & 0xFFFF) * m, (a >> 16) * m  # each below 2^48
    return (high_part + (low_part >> 16)) >> 16, ((high_part << 16) + low_part) & _WORD


def reference_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The keep-mask of the op's dropout, written out from its definition (independent of the
    kernels): for the element (b, h, l, s) of `shape` = (*batch, Hq, L, S) (batch flattened to
    b), the first word of Philox4x32-10 at counter (s, l, b * Hq + h, 0) under the key `seed`
    (two int32, as the op draws it), shifted right by 8, at least round(p * 2^24)."""
    *batch, heads, length, keys = shape
    n = 1
    for size in batch:
        n *= size
    grid = torch.meshgrid(torch.arange(n), torch.arange(heads), torch.arange(length), torch.arange(keys),
                          indexing="ij")
    c0, c1, c2, c3 = grid[3], grid[2], grid[0] * heads + grid[1], torch.zeros_like(grid[0])
    k0, k1 = (int(x) & _WORD for x in seed.cpu().tolist())
    for round_ in range(10):
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _WORD, (k1 + _PHILOX_W[1]) & _WORD
    threshold = min(round(dropout_p * 2 ** 24), 2 ** 24)
    return ((c0 >> 8) >= threshold).reshape(shape)


FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float64: 1e-12}


def uncached_compile():
    """torch.compile without its on-disk caches while the block runs: they (across processes) do
    not key on a custom op's schema, so an entry compiled against an older schema of the
    training ops would be replayed."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def check(q, k, v, **kw):
    """Run ours, SDPA and the reference; assert our error is within 2x SDPA's + floor.

    Outputs start as NaN (XEGPU_ATTN_POISON), so an unwritten element fails.
    """
    import torch.nn.functional as F
    ours = torch_xegpu_attn.attention(q, k, v, **kw)
    sdpa = F.scaled_dot_product_attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert ours.shape == sdpa.shape and ours.dtype == q.dtype
    assert not ours.isnan().any(), "unwritten or NaN output elements"
    err = (ours.double() - ref).abs().max().item()
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    bound = 2 * sdpa_err + FLOOR[q.dtype]
    assert err <= bound, f"error {err:.3e} > bound {bound:.3e} (SDPA error {sdpa_err:.3e})"
    return err, sdpa_err


@pytest.fixture
def fresh_seed(request):
    """A different but reproducible random stream per test: the seed is a CRC of the test's
    id, the same in every process (str hashes are salted per process)."""
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, empty disk cache (the folder, not created yet) and an empty memory cache."""
    from torch_xegpu_attn.cache import CACHE
    folder = tmp_path / "cache"
    monkeypatch.setenv("XEGPU_ATTN_CACHE_DIR", str(folder))
    monkeypatch.delenv("XEGPU_ATTN_DISK_CACHE", raising=False)
    CACHE.clear_memory()
    yield folder
    CACHE.clear_memory()
