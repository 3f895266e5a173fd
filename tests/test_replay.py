"""Replays of recorded calls (csrc/op.cpp) compute what the checked path computes.

For each signature: a first call records it; later calls with fresh values
(same shapes, strides, dtypes, flags) must be replays, through both entry
points, and must meet the numerics bound of test_numerics (2x SDPA's error
against the float64 reference, plus a floor; outputs poisoned with NaN).
Signatures that must not replay (a different stride, lazily negated inputs,
a changed XEGPU_ATTN_SCHEDULE) must take the checked path and be right too.
Training calls (the forward that writes the log-sum-exp, and the backward) are
recorded and replayed the same way: a replayed training step must give bitwise
what the checked step that recorded it gave, over the whole input space.
"""

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import torch_xegpu_attn
from conftest import FLOOR, reference_attention
from sdpa_cases import CPU, budget, cases, reproducible

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
    torch_xegpu_attn.CACHE.clear_memory()  # no training call recorded yet
    torch_xegpu_attn.attention(q, k, v)
    grad_q = q.clone().requires_grad_()
    before = replays()
    out = fn(grad_q, k, v)
    assert replays() == before and out.requires_grad
    bounded(out.detach(), q, k, v)
    out.sum().backward()
    assert grad_q.grad is not None and not grad_q.grad.isnan().any()


# ------------------------------------------------------------------------------------ training


def training_step(q, k, v, kw, grad_kind="random", with_lse=False, seed=0):
    """Output (and log-sum-exp), and the gradients of q, k and v of one training step on copies of
    the given leaves; the output's gradient is random and contiguous, a sum's (expanded ones),
    random and transposed in memory, or random with its heads and rows permuted (dense, unit
    innermost stride: the gradient of an output transposed back to (B, L, H, E)); with_lse back-propagates a random log-sum-exp gradient too.
    `seed` is set before the call (its dropout draws from it)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    if with_lse:
        outputs = torch_xegpu_attn.attention(*leaves, **kw, return_lse=True)
    else:
        outputs = (torch_xegpu_attn.attention(*leaves, **kw),)
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for t in outputs:
        if grad_kind == "ones_expanded":
            grads.append(torch.ones((), dtype=t.dtype).expand(t.shape))
        elif grad_kind == "transposed" and t.dim() >= 2:
            grads.append(torch.randn(*t.shape[:-2], t.shape[-1], t.shape[-2], generator=generator)
                         .to(t.dtype).transpose(-1, -2))
        elif grad_kind == "heads_permuted" and t.dim() >= 3:  # an output transposed back to (B, L, H, E)
            grads.append(torch.randn(*t.shape[:-3], t.shape[-2], t.shape[-3], t.shape[-1], generator=generator)
                         .to(t.dtype).transpose(-3, -2))
        else:
            grads.append(torch.randn(t.shape, generator=generator).to(t.dtype))
    gradients = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return tuple(o.detach() for o in outputs) + tuple(gradients)


def assert_identical(first, second) -> None:
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grad_kind", ["random", "ones_expanded", "transposed", "heads_permuted"])
def test_training_replays(case, grad_kind, fresh_seed):
    """A repeated training step replays its forward and its backward (where the backward's results
    are the kernel's own outputs), and gives what the checked step gave: also for 16-bit inputs (whose output's gradient is converted for the backward) and
    output gradients that are expanded or transposed (copied to row-major)."""
    q, k, v, kw = split(case)
    first = training_step(q, k, v, kw, grad_kind)
    before = replays()
    second = training_step(q, k, v, kw, grad_kind)
    # a key or value broadcast over the batch gets its gradient summed after the kernel: that
    # backward takes the checked path each time
    expected = 1 if case == "broadcast_batch" else 2
    assert replays() == before + expected, "the training step was not replayed (forward and backward)"
    assert_identical(first, second)
    for g in first[1:]:
        assert not g.isnan().any()


def test_training_replays_with_dropout_and_lse(fresh_seed):
    """Dropout's seed is drawn in the replay as the checked call draws it (torch.manual_seed
    reproduces a replayed step); the log-sum-exp's gradient flows through a replay too."""
    q, k, v, kw = split("gqa_decode")
    kw = dict(kw, dropout_p=0.3)
    first = training_step(q, k, v, kw, with_lse=True, seed=fresh_seed)
    before = replays()
    second = training_step(q, k, v, kw, with_lse=True, seed=fresh_seed)
    assert replays() == before + 2
    assert_identical(first, second)
    third = training_step(q, k, v, kw, with_lse=True, seed=fresh_seed + 1)
    assert not torch.equal(first[0], third[0]), "a new seed draws a new dropout mask"


@reproducible(max_examples=budget(0.5))
@given(data=st.data())
def test_training_replays_reproduce_the_checked_path(data):
    """Over the whole input space (tests/sdpa_cases.py), with dropout, the log-sum-exp returned
    and differentiated, and output gradients of every kind: a training step repeated on the same
    tensors gives bitwise what the first gave, whether the op could replay it or not."""
    case = data.draw(cases(CPU), label="case")
    kw = dict(case.kwargs, dropout_p=data.draw(st.sampled_from([0.0, 0.0, 0.25]), label="dropout_p"))
    grad_kind = data.draw(st.sampled_from(["random", "ones_expanded", "transposed", "heads_permuted"]),
                          label="grad_kind")
    with_lse = data.draw(st.booleans(), label="with_lse")
    try:
        first = training_step(case.q, case.k, case.v, kw, grad_kind, with_lse)
    except (RuntimeError, ValueError, TypeError) as error:  # an invalid call raises alike twice
        with pytest.raises(type(error)):
            training_step(case.q, case.k, case.v, kw, grad_kind, with_lse)
        event("raises")
        return
    before = replays()
    second = training_step(case.q, case.k, case.v, kw, grad_kind, with_lse)
    event(f"replayed {replays() - before} of 2 calls")
    assert_identical(first, second)
