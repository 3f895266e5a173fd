"""The torch ops: `xegpu::attention` (SDPA's schema), its log-sum-exp form and its backward.

    torch.ops.xegpu.attention(query, key, value, attn_mask=None, dropout_p=0.0,
                              is_causal=False, *, scale=None, enable_gqa=False)

The schema, the device kernel and the autograd kernel are C++ (csrc/op.cpp,
loaded with `_C`): one kernel for CPU, CUDA and XPU tensors replays a call
whose signature was recorded (CPU calls by _C, CUDA calls by the CUDA
launcher), and otherwise calls `checked_call` here, which runs the frontend's
checks, fetches (or compiles) the kernel of the problem's spec, launches it and
records the call.  Registered here: a fake (meta) kernel that runs the same checks
and returns an empty output of the right shape, so torch.compile traces the
op without a graph break.

Training goes through two more ops, defined here with torch.library:

    xegpu::attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        -> (out, lse, seed)   the forward that also writes each query row's log-sum-exp (and
                              returns the dropout's seed); out in the accumulator's type
                              (float32 for 16-bit inputs), what the backward needs
    xegpu::attention_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed,
                              dropout_p, is_causal, scale, enable_gqa) -> (dquery, dkey, dvalue)

`attention_with_lse` has its autograd registered (`register_autograd`: the forward saves
the inputs, out and lse; the backward calls `attention_backward`).  The autograd kernel of
`xegpu::attention` (C++) sends calls that need a gradient to `attention_with_lse` and returns
its output converted to the inputs' dtype, and the rest straight to the inference kernel, which
writes no log-sum-exp.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C, frontend
from .cache import CACHE


def checked_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """One call through the frontend: checks, kernel from the cache, launch, and the
    call recorded for replay when its operands are plain views of the inputs."""
    plan = frontend.plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan.result is not None:
        _C.count_empty_result()
        return plan.result
    kernel = CACHE.get(plan.spec)
    if plan.seed is None:  # (a replay would reuse the recorded call's dropout seed)
        kernel.record(query, key, value, attn_mask, float(dropout_p), is_causal,
                      None if scale is None else float(scale), enable_gqa, plan.operands, plan.out_shape)
    kernel(plan.operands)
    if not kernel.counts_launches:
        _C.count_launch()
    return plan.output


_C.set_slow_path(checked_call)


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


def _launch(spec, operands) -> None:
    kernel = CACHE.get(spec)
    kernel(operands)
    if not kernel.counts_launches:
        _C.count_launch()


@torch.library.custom_op("xegpu::attention_with_lse", mutates_args=())
def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: Optional[float] = None, enable_gqa: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDPA's output in the accumulator's type (float32, float64 for float64 inputs: the
    backward's delta needs it unrounded), each query row's log-sum-exp of its scaled, masked
    scores, (..., Hq, L), in the same type (-inf for a row that sees no key), and the dropout's
    seed (two int32 drawn from torch's default generator; empty without dropout), which the
    backward needs to regenerate the dropout mask."""
    plan = frontend.plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                         kernel="forward_lse")
    seed = plan.seed if plan.seed is not None else _no_seed(query)
    if plan.result is not None:
        _C.count_empty_result()
        return plan.result, plan.lse, seed
    _launch(plan.spec, plan.operands)
    return plan.output, plan.lse, seed


def _no_seed(query) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=query.device)


@attention_with_lse.register_fake
def _fake_with_lse(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    out = _fake(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    seed = query.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int32)
    acc = frontend.accumulator_dtype(query.dtype)
    return out.to(acc), query.new_empty(frontend.lse_shape(out.shape), dtype=acc), seed


@torch.library.custom_op("xegpu::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], query: torch.Tensor,
                       key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                       out: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                       is_causal: bool, scale: Optional[float], enable_gqa: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of query, key and value of a forward call that returned (out, lse, seed),
    given the gradients of out and (optionally) of lse."""
    plan = frontend.backward_plan(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p,
                                  is_causal, scale, enable_gqa)
    if plan.result is not None:
        return tuple(t.contiguous() for t in plan.result)
    _launch(plan.spec, plan.operands)
    return tuple(t.contiguous() for t in plan.gradients())


@attention_backward.register_fake
def _fake_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p, is_causal, scale,
                   enable_gqa):
    # contiguous, as the real kernel's gradients (whatever the inputs' strides)
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape))


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs
    out, lse, seed = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, seed)
    ctx.mark_non_differentiable(seed)
    ctx.flags = (dropout_p, is_causal, scale, enable_gqa)


def _backward(ctx, grad_out, grad_lse, _grad_seed):
    query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
    # The dispatcher drops trailing arguments equal to their defaults: needs_input_grad covers
    # the arguments given, and the backward returns one gradient for each of them.
    needs = ctx.needs_input_grad
    if len(needs) > 3 and needs[3]:
        raise NotImplementedError("xegpu::attention: the gradient with respect to attn_mask is not implemented; "
                                  "detach the mask (attn_mask.detach()) or compute the masked attention with SDPA")
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dropout_p, is_causal, scale, enable_gqa = ctx.flags
    dq, dk, dv = attention_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p,
                                    is_causal, scale, enable_gqa)
    return (dq, dk, dv, None, None, None, None, None)[:len(needs)]


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("xegpu::attention: the backward pass is not differentiable (no double backward)")


torch.library.register_autograd("xegpu::attention_with_lse", _backward, setup_context=_setup_context)
torch.library.register_autograd("xegpu::attention_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
