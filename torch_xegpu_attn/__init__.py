"""torch-xegpu-attn: scaled dot-product attention compiled by MLIR, as a torch op.

    import torch_xegpu_attn                      # registers torch.ops.xegpu.attention
    out = torch.ops.xegpu.attention(q, k, v, is_causal=True)
    out = torch_xegpu_attn.attention(q, k, v)    # same, as a plain function

    with torch_xegpu_attn.replace_sdpa():        # drop-in for F.scaled_dot_product_attention
        y = model(x)

    torch_xegpu_attn.register_transformers()     # Hugging Face: attn_implementation="xegpu"

    # On a machine with the compiler, for a GPU node without it (carry XEGPU_ATTN_CACHE_DIR):
    q = torch.empty(1, 16, 4096, 128, dtype=torch.float16, device="meta")
    torch_xegpu_attn.precompile(q, q, q, is_causal=True, target="nvvm", arch="sm_90a")
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from contextlib import contextmanager
from typing import List, Optional

import torch

from . import _native

_C = _native.load()  # the op's schema and CPU kernel (built from csrc/ here if not installed)
from . import frontend, knobs, ops  # noqa: E402,F401  (ops registers the other devices' kernels)
from .cache import CACHE, stats
from .compiler import COUNTERS, CompilationStopped, CompileReport, compile_spec, stage_names
from .spec import AttentionSpec, MaskSpec

__version__ = "0.1.0"

_LOGGER = logging.getLogger(__name__)
_LOGGER.addHandler(logging.NullHandler())
if knobs.log_compilations():
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    _LOGGER.addHandler(_handler)
    _LOGGER.setLevel(logging.INFO)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, return_lse=False):
    """Same signature and results as torch.nn.functional.scaled_dot_product_attention, and
    differentiable with respect to query, key and value.

    With `return_lse=True` it returns (out, lse): lse is each query row's log-sum-exp of its
    scaled, masked scores, shape (..., Hq, L), float32 (float64 for float64 inputs), -inf for a
    row that sees no key; it is differentiable too (`merge_attention` combines partial results
    over key chunks by it).

    Calls torch.ops.xegpu.attention (torch.ops.xegpu.attention_with_lse for return_lse).  A CPU
    call whose signature (shapes, strides, dtypes, flags) was checked before is replayed in C++
    straight away; in plain eager inference (CPU or CUDA tensors, no input needs a gradient, not
    tracing) other calls run the op's checked path directly, skipping the dispatcher's round
    trip (the same kernel either way).
    """
    if return_lse:
        if isinstance(scale, torch.Tensor) and scale.dim() == 0:
            scale = scale.item()
        out, lse, _ = torch.ops.xegpu.attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal,
                                                         scale, enable_gqa)
        return out.to(query.dtype), lse
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


_DIRECT_DEVICES = ("cpu", "cuda")


def _plain_eager(query, key, value, attn_mask, *flags) -> bool:
    """Plain CPU or CUDA tensors, nothing to differentiate, not tracing: the kernel can be called
    directly (on CUDA the dispatcher's round trip into the op's Python kernel is most of a
    call's host cost)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in (query, key, value, attn_mask):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            frontend.check_arguments(query, key, value, attn_mask, *flags)  # raises SDPA's TypeError
        if type(t) is not torch.Tensor or t.device.type not in _DIRECT_DEVICES or (grad and t.requires_grad):
            return False
    return True


def merge_attention(outputs, lses):
    """Merge attention over disjoint key chunks into attention over all of them.

    outputs[i], lses[i]: what `attention(q, k_i, v_i, ..., return_lse=True)` returned for the
    i-th chunk of the keys (the same queries).  The result is (out, lse) of attention over the
    concatenated keys: out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i(lse_i), the
    building block of ring and context-parallel attention.  Differentiable (torch ops); rows
    that see no key in any chunk give 0 and lse -inf, as attention itself does.
    """
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"merge_attention: one lse per output, at least one; got {len(outputs)} outputs "
                         f"and {len(lses)} lses")
    stacked = torch.stack([l.to(torch.float64 if l.dtype == torch.float64 else torch.float32) for l in lses])
    lse = torch.logsumexp(stacked, dim=0)
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.zeros_like(lse))
    weights = torch.where(finite, torch.exp(stacked - shift), torch.zeros_like(stacked))
    out = sum(w.unsqueeze(-1) * o.to(w.dtype) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), lse


def dropout_mask(shape, dropout_p: float) -> torch.Tensor:
    """The keep-mask the op's dropout draws next: a bool tensor of `shape` = (*batch, Hq, L, S),
    True where a probability is kept (then scaled by 1 / (1 - dropout_p)).

    A debugging aid: the mask depends only on the seed a call draws from torch's default
    generator and on each element's (batch, query head, row, key), so

        torch.manual_seed(n); out = attention(q, k, v, dropout_p=p, ...)
        torch.manual_seed(n); keep = dropout_mask((*batch, Hq, L, S), p)

    gives the mask that call applied (any mask, causal or GQA layout).  It is read from the
    kernels themselves: attention of zero queries and keys (uniform probabilities 1 / S) over
    the identity as values gives keep / (S (1 - p)).
    """
    *lead, length, keys = shape
    q = torch.zeros(*lead, length, 1, dtype=torch.float64)
    k = torch.zeros(*lead, keys, 1, dtype=torch.float64)
    v = torch.eye(keys, dtype=torch.float64).expand(*lead, keys, keys)
    with torch.no_grad():
        return attention(q, k, v, dropout_p=dropout_p) > 0


def precompile(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
               target: str, arch: Optional[str] = None, kernel: str = "forward",
               dropout_p: float = 0.0) -> Optional[str]:
    """Compile the kernel that `attention(query, key, value, ...)` needs on `target` into the
    disk cache (knobs: XEGPU_ATTN_CACHE_DIR) without loading it; returns the entry's key, or
    None when the call needs no kernel (an empty result).  `kernel`: "forward" (inference),
    or, for a training step, "forward_lse" (the forward that saves the log-sum-exp) and
    "backward" (the gradients); `dropout_p` that of the calls (a kernel per probability; the
    seed is drawn per call, at run time).

    The tensors may live anywhere (`meta` tensors cost nothing): only their shapes, strides
    and dtypes count, and the kernel takes any run-time batch, head count and lengths of the
    same length class.  `arch` names the GPU a GPU target compiles for (default: the GPU of
    this machine, or the target's default architecture when there is none)."""
    from .cache import CACHE as _cache
    spec = frontend.spec_for_target(query, key, value, attn_mask, is_causal, scale, enable_gqa, target=target,
                                    arch=arch, kernel=kernel, dropout_p=dropout_p)
    if spec is None:
        return None
    return _cache.precompile(spec, arch)


def register_transformers() -> str:
    """Register the op with Hugging Face transformers as attn_implementation="xegpu" (its
    attention and attention-mask registries); returns the name.  Imports transformers (an
    optional dependency: the package's `transformers` extra), which nothing else here does."""
    from . import hf
    return hf.register()


class SdpaSwap:
    """What `replace_sdpa()` yields: how many calls the op served while the block ran (`calls`)
    and how many MultiheadAttention calls it could not reach (`unreachable`, need_weights=True)."""

    def __init__(self) -> None:
        self._start = _calls_served()
        self._end: Optional[int] = None
        self.unreachable = 0

    @property
    def calls(self) -> int:
        return (self._end if self._end is not None else _calls_served()) - self._start


def _calls_served() -> int:
    """Every call the op answered in this process (kernel launches, replays included, and
    empty results)."""
    counters = _C.counters()
    return counters["launches"] + counters["empty_results"]


def _direct_references(original) -> List[str]:
    """Module globals bound to `original` (a name imported with `from torch.nn.functional import
    scaled_dot_product_attention` before the block), which the swap cannot reach."""
    found = []
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or name.startswith("torch._C") or name == "torch.nn.functional":
            continue
        found.extend(f"{name}.{attr}" for attr, value in list(namespace.items()) if value is original)
    return found


_UNREACHABLE = ("replace_sdpa() cannot reach: MultiheadAttention with need_weights=True (the default; it "
                "computes the weights itself), a name bound by `from torch.nn.functional import "
                "scaled_dot_product_attention` before the block, torch.ops.aten calls, and torch.compile'd "
                "graphs traced before the block")


@contextmanager
def replace_sdpa(warn_if_unused: bool = True):
    """Within the block, torch.nn.functional.scaled_dot_product_attention is `attention`.

    PyTorch's fast path of nn.MultiheadAttention and nn.TransformerEncoder(Layer)
    (native kernels that never call SDPA, taken in eval mode under no_grad) is
    disabled inside the block and restored after it, so those modules call the
    op.  Yields an `SdpaSwap` whose `calls` counts the calls the op served.
    What the swap cannot reach (_UNREACHABLE) is reported: a warning per block
    for MultiheadAttention calls with need_weights=True, and, with
    `warn_if_unused`, a warning at the end of a block in which the op served no
    call, naming the modules that hold the original function.  The swap is
    process-wide (not per thread).
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    original_mha = functional.multi_head_attention_forward
    mha_signature = inspect.signature(original_mha)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    swap = SdpaSwap()

    def multi_head_attention_forward(*args, **kwargs):
        if mha_signature.bind(*args, **kwargs).arguments.get("need_weights", True):
            swap.unreachable += 1
            if swap.unreachable == 1:
                warnings.warn("replace_sdpa(): nn.MultiheadAttention was called with need_weights=True, which "
                              "computes attention itself and never calls scaled_dot_product_attention; pass "
                              "need_weights=False for xegpu::attention to serve it", stacklevel=2)
        return original_mha(*args, **kwargs)

    functional.scaled_dot_product_attention = attention
    functional.multi_head_attention_forward = multi_head_attention_forward
    torch.backends.mha.set_fastpath_enabled(False)
    completed = False
    try:
        yield swap
        completed = True
    finally:
        functional.scaled_dot_product_attention = original
        functional.multi_head_attention_forward = original_mha
        torch.backends.mha.set_fastpath_enabled(fastpath)
        swap._end = _calls_served()
        _LOGGER.info("replace_sdpa(): xegpu::attention served %d calls in the block", swap.calls)
        if completed and warn_if_unused and swap.calls == 0:
            held = _direct_references(original)
            where = f"; modules holding the original function: {', '.join(held)}" if held else ""
            warnings.warn(f"replace_sdpa(): no call reached xegpu::attention in the block. {_UNREACHABLE}{where}",
                          stacklevel=3)


__all__ = ["attention", "merge_attention", "dropout_mask", "precompile", "replace_sdpa", "SdpaSwap", "register_transformers", "AttentionSpec", "MaskSpec", "compile_spec", "stage_names",
           "CompilationStopped", "CompileReport", "CACHE", "COUNTERS", "stats"]
