"""The torch op `xegpu::attention`, with SDPA's schema.

    torch.ops.xegpu.attention(query, key, value, attn_mask=None, dropout_p=0.0,
                              is_causal=False, *, scale=None, enable_gqa=False)

The schema, the device kernel and the autograd kernel are C++ (csrc/op.cpp,
loaded with `_C`): one kernel for CPU, CUDA and XPU tensors replays a call
whose signature was recorded (CPU calls by _C, CUDA calls by the CUDA
launcher), and otherwise calls `checked_call` here, which runs the frontend's
checks, fetches (or compiles) the kernel of the problem's spec, launches it and
records the call.  The autograd kernel lets calls that need no gradient through
and gives the others a backward that raises (the backward pass is not
implemented).  Registered here: a fake (meta) kernel that runs the same checks
and returns an empty output of the right shape, so torch.compile traces the
op without a graph break.
"""

from __future__ import annotations

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
