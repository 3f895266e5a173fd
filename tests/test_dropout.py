"""Dropout (cpu target): a counter-based generator (Philox4x32-10) keyed by a seed drawn from
torch's default generator and by each element's (batch, query head, row, key), regenerated in the
backward.  Checked: reproducibility under torch.manual_seed, the keep-mask (`dropout_mask`) with
which a float64 reference reproduces the output and the gradients, the keep rate, unbiasedness,
gradcheck in float64.
"""

import math

import pytest
import torch

import torch_xegpu_attn
from conftest import reference_attention, reference_keep_mask
from torch_xegpu_attn import frontend


def _inputs(shape_q, shape_kv, dtype=torch.float64, ev=None):
    q = torch.randn(*shape_q, dtype=dtype, requires_grad=True)
    k = torch.randn(*shape_kv, dtype=dtype, requires_grad=True)
    v_shape = list(shape_kv)
    if ev is not None:
        v_shape[-1] = ev
    v = torch.randn(*v_shape, dtype=dtype, requires_grad=True)
    return q, k, v


def test_same_seed_same_output_and_gradients(fresh_seed):
    q, k, v = _inputs((2, 3, 40, 16), (2, 3, 50, 16))
    results = []
    for _ in range(2):
        torch.manual_seed(fresh_seed)
        out = torch_xegpu_attn.attention(q, k, v, dropout_p=0.3, is_causal=True)
        results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    other = torch_xegpu_attn.attention(q, k, v, dropout_p=0.3, is_causal=True)
    assert not torch.equal(other, results[0][0])  # the next call draws a new seed
    with torch.no_grad():  # the inference kernel draws the same mask from the same seed (it may sum
        torch.manual_seed(fresh_seed)  # the scores in another order: equal to rounding)
        torch.testing.assert_close(torch_xegpu_attn.attention(q, k, v, dropout_p=0.3, is_causal=True),
                                   results[0][0], rtol=1e-12, atol=1e-12)


CASES = {
    "plain": ((2, 3, 37, 16), (2, 3, 70, 16), None, {}),
    "causal-ev": ((1, 2, 70, 8), (1, 2, 70, 8), 24, {"is_causal": True}),
    "gqa": ((2, 6, 33, 16), (2, 2, 65, 16), None, {"enable_gqa": True}),
    "mask": ((2, 2, 30, 16), (2, 2, 45, 16), None, {"attn_mask": "bool"}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_keep_mask_reproduces_output_and_gradients(case, p, dtype, fresh_seed):
    shape_q, shape_kv, ev, kwargs = CASES[case]
    q, k, v = _inputs(shape_q, shape_kv, dtype, ev)
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": torch.rand(shape_q[-2], shape_kv[-2]) > 0.3}
        kwargs["attn_mask"][3] = False  # a row with no key
    torch.manual_seed(fresh_seed)
    out = torch_xegpu_attn.attention(q, k, v, dropout_p=p, **kwargs)
    grad = torch.randn(out.shape, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    torch.manual_seed(fresh_seed)
    keep = torch_xegpu_attn.dropout_mask((*out.shape[:-1], shape_kv[-2]), p)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, dropout_p=p, keep=keep, **kwargs)
    expected = torch.autograd.grad(ref, leaves, grad)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_kernels_draw_the_generator_written_out(p, fresh_seed):
    """The mask the kernels apply (dropout_mask reads it from them) is Philox4x32-10 as
    reference_keep_mask writes it out in Python, element for element: the definition the GPU
    targets' tests check their kernels against."""
    shape = (2, 3, 5, 37, 70)
    torch.manual_seed(fresh_seed)
    keep = torch_xegpu_attn.dropout_mask(shape, p)
    torch.manual_seed(fresh_seed)
    seed = frontend.draw_seed(torch.device("cpu"))
    assert torch.equal(keep, reference_keep_mask(seed, shape, p))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_rate(p, fresh_seed):
    keep = torch_xegpu_attn.dropout_mask((2, 4, 128, 256), p)
    n = keep.numel()
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * sigma, (rate, 1 - p, sigma)
    # rows, keys and heads draw independently: no row or key is all kept or all dropped at p = 0.3
    if p == 0.3:
        assert keep.any(-1).all() and (~keep).any(-1).all()


def test_unbiased(fresh_seed):
    """The mean over many draws approaches the dropout-free output (the 1 / (1 - p) scaling)."""
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64) for _ in range(3))
    exact = torch_xegpu_attn.attention(q, k, v)
    draws = torch.stack([torch_xegpu_attn.attention(q, k, v, dropout_p=0.4) for _ in range(400)])
    mean, spread = draws.mean(0), draws.std(0) / math.sqrt(draws.size(0))
    assert ((mean - exact).abs() <= 6 * spread + 1e-12).all()


def test_gradcheck_with_dropout(fresh_seed):
    q, k, v = _inputs((1, 2, 6, 8), (1, 2, 9, 8))

    def fn(q, k, v):
        torch.manual_seed(fresh_seed)  # the same mask at every evaluation
        return torch_xegpu_attn.attention(q, k, v, dropout_p=0.3, is_causal=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_one_drops_everything():
    q, k, v = _inputs((1, 2, 5, 8), (1, 2, 7, 8))
    out = torch_xegpu_attn.attention(q, k, v, dropout_p=1.0)
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (v.grad == 0).all()


def test_dropout_calls_are_not_replayed(fresh_seed):
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    outs = {torch_xegpu_attn.attention(q, k, v, dropout_p=0.5).sum().item() for _ in range(4)}
    assert len(outs) == 4  # a new seed each call, also for a signature seen before
