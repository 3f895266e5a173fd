"""torch-xegpu-attn: scaled dot-product attention compiled by MLIR, as a torch op.

    import torch_xegpu_attn                      # registers torch.ops.xegpu.attention
    out = torch.ops.xegpu.attention(q, k, v, is_causal=True)
    out = torch_xegpu_attn.attention(q, k, v)    # same, as a plain function

    with torch_xegpu_attn.replace_sdpa():        # drop-in for F.scaled_dot_product_attention
        y = model(x)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from . import _C, frontend, knobs, ops  # noqa: F401  (_C defines the op, ops registers the rest)
from .cache import CACHE
from .compiler import COUNTERS, CompilationStopped, CompileReport, compile_spec, stage_names
from .spec import AttentionSpec, MaskSpec

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
if knobs.log_compilations():
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger(__name__).addHandler(_handler)
    logging.getLogger(__name__).setLevel(logging.INFO)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """Same signature and results as torch.nn.functional.scaled_dot_product_attention.

    Calls torch.ops.xegpu.attention.  A call whose signature (shapes, strides,
    dtypes, flags) was checked before is replayed in C++ straight away; in plain
    eager inference (no input needs a gradient, not tracing) other calls run the
    op's checked path directly, skipping the dispatcher's round trip (the same
    kernel either way).
    """
    if not torch.compiler.is_compiling():
        out = _C.replay(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    if isinstance(scale, torch.Tensor) and scale.dim() == 0:
        scale = scale.item()  # SDPA's argument parser takes a 0-d tensor as a float too
    if _plain_eager(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return ops.checked_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return torch.ops.xegpu.attention(query, key, value, attn_mask, dropout_p, is_causal,
                                     scale=scale, enable_gqa=enable_gqa)


def _plain_eager(query, key, value, attn_mask, *flags) -> bool:
    """Plain CPU tensors, nothing to differentiate, not tracing: the kernel can be called directly."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in (query, key, value, attn_mask):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            frontend.check_arguments(query, key, value, attn_mask, *flags)  # raises SDPA's TypeError
        if type(t) is not torch.Tensor or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True


@contextmanager
def replace_sdpa():
    """Within the block, torch.nn.functional.scaled_dot_product_attention is `attention`."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


__all__ = ["attention", "replace_sdpa", "AttentionSpec", "MaskSpec", "compile_spec", "stage_names",
           "CompilationStopped", "CompileReport", "CACHE", "COUNTERS"]
