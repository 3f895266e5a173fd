"""The torch op `xegpu::attention`, with SDPA's schema.

    torch.ops.xegpu.attention(query, key, value, attn_mask=None, dropout_p=0.0,
                              is_causal=False, *, scale=None, enable_gqa=False)

Kernels: one implementation for every device dispatch key, which checks the
arguments, fetches (or compiles) the kernel of the problem's spec for the
device's target and launches it; a fake (meta) kernel that runs the same
checks and returns an empty output of the right shape, so torch.compile traces
the op without a graph break; an autograd registration whose backward raises
(the backward pass is not implemented).
"""

from __future__ import annotations

import torch

from . import frontend
from .cache import CACHE

SCHEMA = ("attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
          "float dropout_p=0.0, bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor")

_LIBRARY = torch.library.Library("xegpu", "DEF")
_LIBRARY.define(SCHEMA)


def run_kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    plan = frontend.plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan.result is not None:
        return plan.result
    CACHE.get(plan.spec)(plan.operands)
    return plan.output


for _key in ("CPU", "CUDA", "XPU"):
    _LIBRARY.impl("attention", run_kernel, _key)


@torch.library.register_fake("xegpu::attention")
def _fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    frontend.check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    frontend.check_tensors(query, key, value, attn_mask, is_causal)
    layout = frontend.layout(query, key, value, enable_gqa)
    if attn_mask is not None:
        batch, h, g = layout
        frontend.check_mask_shape(attn_mask, (*batch, h * g, query.size(-2), key.size(-2)))
    return query.new_empty(frontend.output_shape(query, key, value, enable_gqa, layout))


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    pass


def _backward(ctx, grad):
    raise NotImplementedError("xegpu::attention has no backward pass yet; use it for inference "
                              "(torch.no_grad / torch.inference_mode) or detach its inputs")


torch.library.register_autograd("xegpu::attention", _backward, setup_context=_setup_context)
