"""Replays of recorded calls (csrc/op.cpp) compute what the checked path computes.

For each signature: a first call records it; later calls with fresh values
(same shapes, strides, dtypes, flags) must be replays, through both entry
points, and must meet the numerics bound of test_numerics (2x SDPA's error
against the float64 reference, plus a floor; outputs poisoned with NaN).
Signatures that must not replay (a different stride, lazily negated inputs,
a changed XEGPU_ATTN_SCHEDULE) must take the checked path and be right too;
calls that need a gradient replay below the autograd kernel.
"""

import pytest
import torch

import torch_xegpu_attn
from conftest import FLOOR, reference_attention

OP = torch.ops.xegpu.attention


def replays() -> int:
    return torch_xegpu_attn.stats()["replays"]


def bounded(out, q, k, v, **kw):
    import torch.nn.functional as F
    assert not out.isnan().any()
    ref = reference_attention(q, k, v, **kw)
    err = (out.double() - ref).abs().max().item()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v, **kw).double() - ref).abs().max().item()
    assert err <= 2 * sdpa_err + FLOOR[q.dtype], f"error {err:.3e}, SDPA's {sdpa_err:.3e}"


def strided(*shape, dtype=torch.float32):
    """(B, L, H, E) memory viewed as (B, H, L, E), as projections produce it."""
    b, h, n, e = shape
    return torch.randn(b, n, h, e, dtype=dtype).transpose(1, 2)


CASES = {
    "plain": lambda: ((torch.randn(2, 3, 20, 32), torch.randn(2, 3, 40, 32), torch.randn(2, 3, 40, 32)), {}),
    "strided_causal": lambda: ((strided(2, 4, 40, 32), strided(2, 4, 40, 32), strided(2, 4, 40, 32)),
                               {"is_causal": True}),
    "bool_mask_key_padding": lambda: ((torch.randn(2, 2, 9, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16),
                                       torch.rand(2, 1, 1, 70) > 0.3), {}),
    "additive_mask_rows_keys": lambda: ((torch.randn(1, 2, 30, 16), torch.randn(1, 2, 50, 16),
                                         torch.randn(1, 2, 50, 16), torch.randn(30, 50)), {}),
    "gqa_decode": lambda: ((torch.randn(2, 8, 1, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)),
                           {"enable_gqa": True}),
    "long_k_transposed": lambda: ((torch.randn(1, 16, 33, 32), torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32)),
                                  {"enable_gqa": True, "is_causal": True}),
    "three_d": lambda: ((torch.randn(3, 20, 16), torch.randn(3, 40, 16), torch.randn(3, 40, 8)), {}),
    "broadcast_batch": lambda: ((torch.randn(2, 4, 20, 16), torch.randn(1, 4, 30, 16), torch.randn(1, 4, 30, 16)),
                                {"scale": 0.3}),
    "bfloat16": lambda: (tuple(torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3)),
                         {"is_causal": True}),
    "float64": lambda: ((torch.randn(1, 2, 50, 32, dtype=torch.float64), torch.randn(1, 2, 77, 32, dtype=torch.float64),
                         torch.randn(1, 2, 77, 32, dtype=torch.float64)), {}),
}


def split(case):
    tensors, kw = CASES[case]()
    q, k, v = tensors[:3]
    if len(tensors) == 4:
        kw = dict(kw, attn_mask=tensors[3])
    return q, k, v, kw


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("entry", ["attention", "op"])
def test_replay_matches_reference(case, entry, fresh_seed):
    fn = torch_xegpu_attn.attention if entry == "attention" else OP
    q, k, v, kw = split(case)
    bounded(fn(q, k, v, **kw), q, k, v, **kw)  # records
    for _ in range(3):
        q, k, v, kw = split(case)  # fresh values, same signature
        before = replays()
        out = fn(q, k, v, **kw)
        assert replays() == before + 1, "the call was not replayed"
        bounded(out, q, k, v, **kw)


def test_replays_see_new_memory(fresh_seed):
    # A replay reads the call's own tensors: an output computed from one set of inputs
    # must not change when another call replays on others.
    q, k, v, kw = split("plain")
    first = torch_xegpu_attn.attention(q, k, v)
    again = torch_xegpu_attn.attention(q, k, v)
    q2, k2, v2, _ = split("plain")
    other = torch_xegpu_attn.attention(q2, k2, v2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.data_ptr() != again.data_ptr(), "each call gets its own output"
    bounded(other, q2, k2, v2)


def test_what_must_not_replay(fresh_seed, monkeypatch):
    q, k, v, _ = split("plain")
    torch_xegpu_attn.attention(q, k, v)
    before = replays()
    other_strides = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    bounded(torch_xegpu_attn.attention(q, other_strides, v), q, other_strides, v)
    negated = torch._neg_view(q)
    bounded(torch_xegpu_attn.attention(negated, k, v), -q, k, v)
    monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", '{"row_tile": 8}')
    bounded(torch_xegpu_attn.attention(q, k, v), q, k, v)
    assert replays() == before, "a call that differs from the recorded one was replayed"


@pytest.mark.parametrize("entry", ["attention", "op"])
def test_gradient_calls_take_the_training_kernel(entry, fresh_seed):
    # A call that needs a gradient runs the forward that writes the log-sum-exp (the checked
    # path, not the recorded inference call), and its backward runs.
    fn = torch_xegpu_attn.attention if entry == "attention" else OP
    q, k, v, _ = split("plain")
    torch_xegpu_attn.attention(q, k, v)
    grad_q = q.clone().requires_grad_()
    before = replays()
    out = fn(grad_q, k, v)
    assert replays() == before and out.requires_grad
    bounded(out.detach(), q, k, v)
    out.sum().backward()
    assert grad_q.grad is not None and not grad_q.grad.isnan().any()
