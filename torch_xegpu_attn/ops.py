"""The torch ops: `xegpu::attention` (SDPA's schema), its log-sum-exp form and its backward.

    torch.ops.xegpu.attention(query, key, value, attn_mask=None, dropout_p=0.0,
                              is_causal=False, *, scale=None, enable_gqa=False)
    torch.ops.xegpu.attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        -> (out, lse, seed)   the forward that also writes each query row's log-sum-exp (and
                              returns the dropout's seed); out in the accumulator's type
                              (float32 for 16-bit inputs), what the backward needs
    torch.ops.xegpu.attention_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed,
                                       dropout_p, is_causal, scale, enable_gqa) -> (dquery, dkey, dvalue)

The schemas, the device kernels and the autograd kernels are C++ (csrc/op.cpp, loaded with
`_C`): one kernel per op for CPU, CUDA and XPU tensors replays a call whose signature was
recorded, and otherwise calls the op's checked call here (`checked_call`, `checked_call_with_lse`,
`checked_backward`), which runs the frontend's checks, fetches (or compiles) the kernel of the
problem's spec, launches it and records the call.  The autograd kernel of `xegpu::attention`
sends calls that need a gradient to `attention_with_lse` and returns its output converted to
the inputs' dtype, and the rest straight to the inference kernel, which writes no log-sum-exp;
that of `attention_with_lse` saves the inputs, out and lse, and its backward calls
`attention_backward` (not differentiable itself).  Registered here: the fake (meta) kernels,
which run the same checks and return empty results of the right shapes, so torch.compile traces
the ops without a graph break.
"""

from __future__ import annotations

import torch

from . import _C, frontend
from .cache import CACHE


def _flags(dropout_p, is_causal, scale, enable_gqa) -> tuple:
    return float(dropout_p), bool(is_causal), None if scale is None else float(scale), bool(enable_gqa)


def _launch(spec, operands):
    """Run the kernel of `spec` (from the cache) on `operands`; the kernel, to record the call."""
    kernel = CACHE.get(spec)
    kernel(operands)
    if not kernel.counts_launches:
        _C.count_launch()
    return kernel


def checked_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """One inference call through the frontend: checks, kernel from the cache, launch, record."""
    plan = frontend.plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan.result is not None:
        _C.count_empty_result()
        return plan.result
    _launch(plan.spec, plan.operands).record("forward", (query, key, value, attn_mask),
                                             _flags(dropout_p, is_causal, scale, enable_gqa), plan.operands,
                                             plan.roles, (plan.output,))
    return plan.output


def checked_call_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """xegpu::attention_with_lse through the frontend: SDPA's output in the accumulator's type
    (float32, float64 for float64 inputs: the backward's delta needs it unrounded), each query
    row's log-sum-exp of its scaled, masked scores, (..., Hq, L), in the same type (-inf for a row
    that sees no key), and the dropout's seed (two int32 drawn from torch's default generator;
    empty without dropout), which the backward needs to regenerate the dropout mask."""
    plan = frontend.plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                         kernel="forward_lse")
    seed = plan.seed if plan.seed is not None else _no_seed(query)
    if plan.result is not None:
        _C.count_empty_result()
        return plan.result, plan.lse, seed
    results = (plan.output, plan.lse, seed)
    _launch(plan.spec, plan.operands).record("forward_lse", (query, key, value, attn_mask),
                                             _flags(dropout_p, is_causal, scale, enable_gqa), plan.operands,
                                             plan.roles, results)
    return results


def checked_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p, is_causal, scale,
                     enable_gqa):
    """xegpu::attention_backward through the frontend: the gradients of query, key and value of a
    forward call that returned (out, lse, seed), given the gradients of out and (optionally) of
    lse; contiguous, in the inputs' shapes and dtypes."""
    plan = frontend.backward_plan(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p,
                                  is_causal, scale, enable_gqa)
    if plan.result is not None:
        return tuple(t.contiguous() for t in plan.result)
    kernel = _launch(plan.spec, plan.operands)
    gradients = tuple(t.contiguous() for t in plan.gradients())
    kernel.record("backward", (query, key, value, attn_mask, grad_out, grad_lse, out, lse, seed),
                  _flags(dropout_p, is_causal, scale, enable_gqa), plan.operands, plan.roles, gradients)
    return gradients


_C.set_slow_paths(checked_call, checked_call_with_lse, checked_backward)


def _no_seed(query) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=query.device)


@torch.library.register_fake("xegpu::attention")
def _fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    frontend.check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    frontend.check_tensors(query, key, value, attn_mask, is_causal)
    layout = frontend.layout(query, key, value, enable_gqa)
    if attn_mask is not None:
        batch, h, g = layout
        frontend.check_mask_shape(attn_mask, (*batch, h * g, query.size(-2), key.size(-2)))
    return query.new_empty(frontend.output_shape(query, key, value, enable_gqa, layout))


# --------------------------------------------------------------------------- training


@torch.library.register_fake("xegpu::attention_with_lse")
def _fake_with_lse(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    out = _fake(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    seed = query.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int32)
    acc = frontend.accumulator_dtype(query.dtype)
    return out.to(acc), query.new_empty(frontend.lse_shape(out.shape), dtype=acc), seed


@torch.library.register_fake("xegpu::attention_backward")
def _fake_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p, is_causal, scale,
                   enable_gqa):
    # contiguous, as the real kernel's gradients (whatever the inputs' strides)
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape))
