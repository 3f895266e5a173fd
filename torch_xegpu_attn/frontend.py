"""SDPA's contract: check the arguments, then map them to a spec and canonical views.

Checks run before any compilation and raise what
torch.nn.functional.scaled_dot_product_attention raises (RuntimeError for
shape, dtype and device mismatches; TypeError for wrong argument types),
or TypeError / ValueError / NotImplementedError for what this package does
not support, each with a message that says what to change.

Mapping (no data is copied unless a layout cannot be expressed as a view):

    query (*batch_q, Hq, L, E)   key (*batch_k, Hk, S, E)   value (*batch_v, Hk, S, Ev)
      -> batch = broadcast of the three batch shapes, B = prod(batch)
      -> GQA (enable_gqa, Hq = G * Hk) or broadcast key/value heads (Hk = 1): H = Hk, G = Hq / H
         otherwise the heads broadcast like batch dims: H = heads, G = 1
      -> q (B, H, G, L, E), k (B, H, S, E), v (B, H, S, Ev), out (B, H, G, L, Ev)
    attn_mask broadcastable to (*batch, Hq, L, S): the dims it really varies
    along (size > 1 and stride != 0) are kept, the others dropped.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import knobs
from .spec import DTYPES, KERNELS, AttentionSpec, MaskSpec, ProblemSize
from .targets import get_target, target_for_device

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


class UnsupportedDtypeError(TypeError, RuntimeError):
    """A dtype the kernels do not take.  Both a TypeError and a RuntimeError: SDPA
    itself raises RuntimeError for integer inputs."""


@dataclass
class Plan:
    """What the op will do: either run `spec` on `operands`, or return `result` directly."""

    out_shape: Tuple[int, ...]
    spec: Optional[AttentionSpec] = None
    operands: Optional[List[torch.Tensor]] = None   # the kernel's operands (spec.operand_names()) in
                                                    # canonical shapes
    output: Optional[torch.Tensor] = None           # the user-facing view of `out`
    result: Optional[torch.Tensor] = None           # set for empty problems
    lse: Optional[torch.Tensor] = None              # forward_lse: the user-facing view of `lse`
    seed: Optional[torch.Tensor] = None             # dropout: the generator's key (two int32)
    roles: Optional[List[Tuple[str, int]]] = None   # per operand, where a replay gets it (_C.record)


#: The numbering of the ops' tensor arguments in operand roles (csrc/op.cpp, `record`): the forward's
#: q, k, v, mask, then the backward's grad_out, grad_lse, out, lse, seed.
ARGUMENTS = ("query", "key", "value", "attn_mask", "grad_out", "grad_lse", "out", "lse", "seed")
_ARG = {name: i for i, name in enumerate(ARGUMENTS)}


def _view(name: str) -> Tuple[str, int]:
    """The role of an operand that is a view of argument `name` (else the call is not replayed)."""
    return ("view", _ARG[name])


def _copy(name: str) -> Tuple[str, int]:
    """The role of an operand that is a view of argument `name` or its row-major copy in the
    operand's dtype."""
    return ("copy", _ARG[name])


_NEW, _ZEROS, _SEED = ("new", -1), ("zeros", -1), ("seed", -1)


def check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    """Type and value checks that need no shapes."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attention(): argument 'attn_mask' must be Tensor or None, not {type(attn_mask).__name__}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"attention(): argument 'dropout_p' must be float, not {type(dropout_p).__name__}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"attention(): argument 'is_causal' must be bool, not {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"attention(): argument 'enable_gqa' must be bool, not {type(enable_gqa).__name__}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise TypeError(f"attention(): argument 'scale' must be float or None, not {type(scale).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


def check_tensors(query, key, value, attn_mask, is_causal) -> None:
    """Rank, dtype and device checks (SDPA's messages)."""
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError("Expected query, key, and value to all be at least 2 dimensional, but got "
                           f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("Expected query, key, and value to have the same dtype, but got "
                           f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if query.dtype not in _DTYPE_NAMES:
        raise UnsupportedDtypeError(f"xegpu::attention supports float32, float16, bfloat16 and float64 "
                                    f"tensors, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError("Expected query, key, and value to have the same device type, but got "
                           f"query.device: {query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if attn_mask is not None:
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
        if attn_mask.device != query.device:
            raise RuntimeError(f"Expected attn_mask on {query.device} like query, but got attn_mask.device: {attn_mask.device}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError("Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and  query.dtype: {query.dtype} instead.")
    if query.size(-1) != key.size(-1):
        raise RuntimeError(f"Expected query and key to have the same head dimension (last dim), but got "
                           f"query.size(-1): {query.size(-1)} and key.size(-1): {key.size(-1)}")
    if key.size(-2) != value.size(-2):
        raise RuntimeError(f"Expected key and value to have the same sequence length (dim -2), but got "
                           f"key.size(-2): {key.size(-2)} and value.size(-2): {value.size(-2)}")


def _broadcast(shapes: Sequence[Sequence[int]], what: str) -> Tuple[int, ...]:
    """NumPy-style broadcast of shapes (torch.broadcast_shapes costs a heavy first import)."""
    rank = max((len(s) for s in shapes), default=0)
    result = []
    for i in range(-rank, 0):
        size = 1
        for shape in shapes:  # no sets: sizes may be SymInts (fake tensors, dynamic shapes)
            if len(shape) >= -i and shape[i] != 1:
                if size != 1 and shape[i] != size:
                    raise RuntimeError(f"the {what} of query, key and value do not broadcast: "
                                       f"{[tuple(s) for s in shapes]} (sizes {size} and {shape[i]} at dim {i})")
                size = shape[i]
        result.append(size)
    return tuple(result)


def _heads(t: torch.Tensor) -> int:
    return t.size(-3) if t.dim() >= 3 else 1


def _batch(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape[:-3])


def layout(query, key, value, enable_gqa) -> Tuple[Tuple[int, ...], int, int]:
    """(batch shape, H, G) of the canonical problem; raises on heads/batch mismatch."""
    hq, hk, hv = _heads(query), _heads(key), _heads(value)
    if enable_gqa and query.dim() >= 3 and (hq != hk or hq != hv):
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError("Number of heads in key and value must divide the number of heads in query, "
                               f"but got query heads {hq}, key heads {hk} and value heads {hv}")
        batch = _broadcast([_batch(query), _batch(key), _batch(value)], "batch dims")
        h = math.lcm(hk, hv)  # divides hq; key or value heads are repeated up to it
        return batch, h, hq // h
    lead = _broadcast([query.shape[:-2], key.shape[:-2], value.shape[:-2]], "batch and head dims")
    heads = lead[-1] if lead else 1
    batch = lead[:-1]
    if heads > 1 and hk == 1 and hv == 1 and hq == heads:
        return batch, 1, heads  # key/value broadcast over heads: multi-query attention
    return batch, heads, 1


def _canonical(t: torch.Tensor, batch, heads: int, split: Tuple[int, int] = None) -> torch.Tensor:
    """Expand t (*, heads, n, d) to (*batch, heads, n, d) and view it as (B, heads, n, d) [or (B, H, G, n, d)]."""
    n, d = t.shape[-2], t.shape[-1]
    if t.dim() == 2:
        t = t.reshape(1, n, d)
    t = t.expand(*batch, heads, n, d).reshape(math.prod(batch), heads, n, d)
    if split is not None:
        t = t.unflatten(1, split)
    if t.stride(-1) != 1 and t.size(-1) > 1:
        t = t.contiguous()  # the kernels read rows with unit stride
    return t


def _kv_heads(t: torch.Tensor, batch, h: int) -> torch.Tensor:
    """Key/value with exactly h heads: GQA with unequal key and value heads repeats the smaller."""
    have = _heads(t)
    if have not in (1, h):
        t = t.repeat_interleave(h // have, dim=-3)
    return _canonical(t, batch, h)


def check_mask_shape(mask: torch.Tensor, scores_shape: Tuple[int, ...]) -> None:
    """attn_mask must broadcast to the scores' shape (batch..., heads, L, S)."""
    fits = mask.dim() <= len(scores_shape) and all(
        m in (1, f) for m, f in zip(reversed(mask.shape), reversed(scores_shape)))
    if not fits:
        raise RuntimeError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the scores' "
                           f"shape {tuple(scores_shape)} (batch..., heads, L, S)")


def _compact_mask(mask: torch.Tensor, batch, h: int, g: int, l: int, s: int) -> Tuple[torch.Tensor, Tuple[str, ...]]:
    """The mask as a view over only the (b, h, g, l, s) dims it varies along."""
    full = (*batch, h * g, l, s)
    m = mask.expand(full)
    n_batch = len(batch)
    if any(m.size(i) > 1 and m.stride(i) != 0 for i in range(n_batch)):
        m = m.reshape(math.prod(batch), h * g, l, s)  # a view unless batch dims vary unevenly
    else:
        m = m[(0,) * n_batch].unsqueeze(0)
    m = m.unflatten(1, (h, g))
    keep = [m.size(i) > 1 and m.stride(i) != 0 for i in range(5)]
    if not any(keep):
        keep[4] = True  # a constant mask: keep one dim (s) so the operand is not rank 0
    index = tuple(slice(None) if k else 0 for k in keep)
    compact = m[index]
    if compact.stride(-1) != 1 and compact.size(-1) > 1:
        compact = compact.contiguous()
    dims = tuple(d for d, k in zip("bhgls", keep) if k)
    if compact.dtype == torch.bool:
        compact = compact.view(torch.uint8)
    return compact, dims


def output_shape(query, key, value, enable_gqa, layout_=None) -> Tuple[int, ...]:
    batch, h, g = layout_ or layout(query, key, value, enable_gqa)
    heads = () if query.dim() == 2 and key.dim() == 2 and value.dim() == 2 else (h * g,)
    return (*batch, *heads, query.size(-2), value.size(-1))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulator type (float64 for float64 inputs, else float32): that of the
    log-sum-exps and of the output the training forward saves for the backward
    (AttentionSpec.operands says why)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_shape(out_shape: Sequence[int]) -> Tuple[int, ...]:
    """The user-facing log-sum-exp's shape: the output's without its last dim, (..., Hq, L)."""
    return tuple(out_shape[:-1])


def _full_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
               target: Optional[str] = None, arch: Optional[str] = None, kernel: str = "forward") -> Plan:
    """Check everything, then build the spec and the canonical operands (output allocated).

    `target` overrides the target of the tensors' device and `arch` the machine it compiles for
    (precompiling for another device, from meta tensors for instance); `kernel` is "forward" or
    "forward_lse" (the log-sum-exp allocated and written too)."""
    check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_tensors(query, key, value, attn_mask, is_causal)
    batch, h, g = layout(query, key, value, enable_gqa)
    out_shape = output_shape(query, key, value, enable_gqa, (batch, h, g))
    l, s, e, ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if attn_mask is not None:
        check_mask_shape(attn_mask, (*batch, h * g, l, s))  # even when the result is empty
    with_lse = kernel == "forward_lse"
    out_dtype = accumulator_dtype(query.dtype) if with_lse else query.dtype
    if math.prod(out_shape) == 0:
        lse = query.new_empty(lse_shape(out_shape), dtype=accumulator_dtype(query.dtype)) if with_lse else None
        return Plan(out_shape, result=query.new_empty(out_shape, dtype=out_dtype), lse=lse)
    if s == 0:  # no keys: SDPA gives zeros; no key seen, so the log-sum-exp is -inf
        lse = (query.new_full(lse_shape(out_shape), float("-inf"), dtype=accumulator_dtype(query.dtype))
               if with_lse else None)
        return Plan(out_shape, result=query.new_zeros(out_shape, dtype=out_dtype), lse=lse)
    if e == 0:
        raise NotImplementedError("xegpu::attention does not support a query/key head dimension of 0")
    # A lazily negated view (torch._neg_view) holds the un-negated data: materialize it.
    query, key, value = query.resolve_neg(), key.resolve_neg(), value.resolve_neg()
    if attn_mask is not None:
        attn_mask = attn_mask.resolve_neg()
    target = target or _target_for(query.device.type)

    mask_spec, operands = None, []
    q = _canonical(query, batch, h * g, split=(h, g))
    k, v = _kv_heads(key, batch, h), _kv_heads(value, batch, h)
    operands += [q, k, v]
    roles = [_view("query"), _view("key"), _view("value")]
    if attn_mask is not None:
        compact, dims = _compact_mask(attn_mask, batch, h, g, l, s)
        kind = "bool" if attn_mask.dtype == torch.bool else "additive"
        mask_spec = MaskSpec(kind, dims, "bool" if kind == "bool" else _DTYPE_NAMES[attn_mask.dtype])
        operands.append(compact)
        roles.append(_view("attn_mask"))
    seed = None
    if dropout_p > 0:
        seed = draw_seed(query.device)
        operands.append(seed)
        roles.append(_SEED)
    size = ProblemSize(batch=math.prod(batch), kv_heads=h, q_len=l, kv_len=s)
    chosen = get_target(target)  # an unknown target raises here
    out = _new_output(out_shape, query, out_dtype)
    operands.append(out.view(math.prod(batch), h, g, l, ev))
    roles.append(_NEW)
    lse = None
    if with_lse:
        lse = _new_output(lse_shape(out_shape), query, accumulator_dtype(query.dtype))
        operands.append(lse.view(math.prod(batch), h, g, l))
        roles.append(_NEW)
    spec = AttentionSpec(group=g, head_dim=e, v_head_dim=ev, dtype=_DTYPE_NAMES[query.dtype], causal=is_causal,
                         scale=scale, mask=mask_spec, target=target, kernel=kernel, dropout_p=float(dropout_p))
    spec = chosen.classified(spec, size, arch)
    chosen.check(spec)  # what the target does not take raises before any work
    return Plan(out_shape, spec=spec, operands=operands, output=out, lse=lse, seed=seed, roles=roles)


def draw_seed(device) -> torch.Tensor:
    """The dropout generator's key for one call: two int32 drawn from torch's default CPU generator
    (torch.manual_seed reproduces a run), on `device`.  A CUDA graph would replay one seed at every
    replay (the same mask each step): capture raises instead."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise NotImplementedError("xegpu::attention with dropout_p > 0 cannot be captured in a CUDA graph: the "
                                  "seed is drawn per call on the host, and a replay would reuse one mask")
    return torch.randint(-2**31, 2**31 - 1, (2,), dtype=torch.int32, device="cpu").to(device)


def _target_for(device_type: str) -> str:
    """The target of a call's tensors: by their device, except that CPU tensors go through the
    xegpu target under XEGPU_ATTN_EMULATE=xpu (its SPIR-V emulated on the CPU)."""
    if device_type == "cpu" and knobs.emulate() == "xpu":
        return "xegpu"
    return target_for_device(device_type)


def spec_for_target(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                    target: str, arch: Optional[str] = None, kernel: str = "forward",
                    dropout_p: float = 0.0) -> Optional[AttentionSpec]:
    """The spec of `kernel` (forward, forward_lse or backward) that a call with these arguments
    needs on `target` for the machine `arch` names (the tensors may be on any device, `meta`
    included); None when the call needs no kernel (an empty result).  An `arch` the target does
    not compile for raises ValueError.  No dropout seed is drawn: `dropout_p` is part of the
    spec, the seed a run-time operand."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    plan = _full_plan(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, target=target, arch=arch,
                      kernel="forward" if kernel == "forward" else "forward_lse")
    spec = plan.spec
    if spec is None:
        return None
    chosen = get_target(target)
    if kernel == "backward" or dropout_p > 0:  # the backward of that call: the same spec, classified as one
        batch, h, _ = layout(query, key, value, enable_gqa)
        size = ProblemSize(batch=math.prod(batch), kv_heads=h, q_len=query.size(-2), kv_len=key.size(-2))
        wide = summed_gradients(query, key, value, batch, h, spec.group) if kernel == "backward" else ()
        spec = chosen.classified(dataclasses.replace(spec, kernel=kernel, dropout_p=float(dropout_p),
                                                     wide_gradients=wide), size, arch)
        chosen.check(spec)
    if arch is not None:
        chosen.options_for(spec, arch)  # the cpu target raises: it compiles for this machine
    return spec


def _new_output(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if knobs.poison_outputs():
        out.fill_(float("nan"))
    return out


def plan(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False, kernel: str = "forward") -> Plan:
    """The plan of one call: every check, then the spec and the canonical operands.

    A call whose canonical operands are plain views of its inputs is recorded
    by the caller (ops.checked_call) and replayed in C++ while its signature
    (shapes, strides, dtypes, flags) repeats: the checks and the mapping depend
    on nothing else.
    """
    return _full_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kernel=kernel)


# --------------------------------------------------------------------------- the backward


@dataclass
class BackwardPlan:
    """What a backward call does: run `spec` on `operands` (q, k, v, [mask], [seed], out, lse,
    dout, dlse, dq, dk, dv in canonical shapes) and return `gradients()`, or return `result`."""

    spec: Optional[AttentionSpec] = None
    operands: Optional[List[torch.Tensor]] = None
    roles: Optional[List[Tuple[str, int]]] = None     # per operand, where a replay gets it (_C.record)
    gradients: Optional[callable] = None              # () -> (dquery, dkey, dvalue) after the run
    result: Optional[Tuple[torch.Tensor, ...]] = None  # set when no kernel is needed


def backward_plan(grad_out, grad_lse, query, key, value, attn_mask, out, lse, seed, dropout_p, is_causal, scale,
                  enable_gqa) -> BackwardPlan:
    """The backward of one forward call: the same checks and mapping as the forward (`out` and
    `lse` are what it returned), the gradients allocated in canonical shapes and mapped back to
    the inputs' shapes afterwards (summed over what the forward broadcast: batch dims, shared
    key/value heads, heads GQA repeated)."""
    check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_tensors(query, key, value, attn_mask, is_causal)
    batch, h, g = layout(query, key, value, enable_gqa)
    out_shape = output_shape(query, key, value, enable_gqa, (batch, h, g))
    if tuple(grad_out.shape) != tuple(out_shape) or tuple(out.shape) != tuple(out_shape):
        raise RuntimeError(f"attention backward: the output and its gradient have shape {tuple(out_shape)}, "
                           f"got {tuple(out.shape)} and {tuple(grad_out.shape)}")
    if grad_lse is not None and tuple(grad_lse.shape) != lse_shape(out_shape):
        raise RuntimeError(f"attention backward: the log-sum-exp's gradient has shape {lse_shape(out_shape)}, "
                           f"got {tuple(grad_lse.shape)}")
    l, s, e, ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if math.prod(out_shape) == 0 or s == 0:  # nothing depends on the inputs
        return BackwardPlan(result=(query.new_zeros(query.shape), key.new_zeros(key.shape), value.new_zeros(value.shape)))
    query, key, value = query.resolve_neg(), key.resolve_neg(), value.resolve_neg()
    target = _target_for(query.device.type)
    B = math.prod(batch)
    q = _canonical(query, batch, h * g, split=(h, g))
    k, v = _kv_heads(key, batch, h), _kv_heads(value, batch, h)
    operands = [q, k, v]
    roles = [_view("query"), _view("key"), _view("value")]
    mask_spec = None
    if attn_mask is not None:
        check_mask_shape(attn_mask, (*batch, h * g, l, s))
        compact, dims = _compact_mask(attn_mask.resolve_neg(), batch, h, g, l, s)
        kind = "bool" if attn_mask.dtype == torch.bool else "additive"
        mask_spec = MaskSpec(kind, dims, "bool" if kind == "bool" else _DTYPE_NAMES[attn_mask.dtype])
        operands.append(compact)
        roles.append(_view("attn_mask"))
    if dropout_p > 0:
        if seed is None or seed.shape != (2,) or seed.dtype != torch.int32:
            raise RuntimeError("attention backward: dropout needs the forward's seed (two int32)")
        operands.append(seed.to(query.device))
        roles.append(_view("seed"))
    rows, acc = (B, h, g, l), accumulator_dtype(query.dtype)
    operands.append(out.to(acc).reshape(B, h, g, l, ev).contiguous())
    operands.append(lse.to(acc).reshape(rows).contiguous())
    # a converted gradient is made row-major (what a replay's copy of it is: csrc/op.cpp), whatever
    # the strides of the one autograd gives (a permuted one where the output was transposed back)
    dout = grad_out if grad_out.dtype == query.dtype else grad_out.to(query.dtype,
                                                                       memory_format=torch.contiguous_format)
    dout = dout.reshape(B, h, g, l, ev)
    operands.append(dout if dout.stride(-1) == 1 else dout.contiguous())
    roles += [_copy("out"), _copy("lse"), _copy("grad_out")]
    operands.append(torch.zeros(rows, dtype=acc, device=query.device) if grad_lse is None
                    else grad_lse.to(acc).reshape(rows).contiguous())
    roles.append(_ZEROS if grad_lse is None else _copy("grad_lse"))
    wide = summed_gradients(query, key, value, batch, h, g)
    grads = [_new_output(t.shape, like, acc if name in wide else None)
             for name, t, like in (("dq", q, query), ("dk", k, key), ("dv", v, value))]
    operands += grads
    roles += [_NEW] * 3
    size = ProblemSize(batch=B, kv_heads=h, q_len=l, kv_len=s)
    chosen = get_target(target)
    spec = AttentionSpec(group=g, head_dim=e, v_head_dim=ev, dtype=_DTYPE_NAMES[query.dtype], causal=is_causal,
                         scale=scale, mask=mask_spec, target=target, kernel="backward", dropout_p=float(dropout_p),
                         wide_gradients=wide)
    spec = chosen.classified(spec, size)
    chosen.check(spec)

    def gradients():
        dq = _reduce_to(grads[0].reshape(*batch, h * g, l, e), query)
        dk, dv = _kv_gradient(grads[1], key, batch, h), _kv_gradient(grads[2], value, batch, h)
        return tuple(grad.to(like.dtype) for grad, like in ((dq, query), (dk, key), (dv, value)))
    return BackwardPlan(spec=spec, operands=operands, roles=roles, gradients=gradients)


def summed_gradients(query, key, value, batch, h: int, g: int) -> Tuple[str, ...]:
    """The backward's gradients (of "dq", "dk", "dv") that the frontend sums over dims the forward
    broadcast (batch dims, key/value heads shared by all), where the inputs are 16-bit: the
    kernel writes those in float32 (`AttentionSpec.wide_gradients`), so that their sum rounds
    once, as SDPA's does, not once per term."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return ()
    rows, keys = math.prod(batch) * h, math.prod(batch) * h * key.size(-2)
    canonical = {"dq": (rows * g * query.size(-2) * query.size(-1), query), "dk": (keys * key.size(-1), key),
                 "dv": (keys * value.size(-1), value)}
    return tuple(name for name, (numel, like) in canonical.items() if numel > like.numel())


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`grad` (the input expanded to (*batch, heads, n, d)) summed back to `like`'s shape."""
    if like.dim() == 2:
        return grad.sum_to_size(1, *like.shape).reshape(like.shape)
    return grad.sum_to_size(like.shape)


def _kv_gradient(grad: torch.Tensor, like: torch.Tensor, batch, h: int) -> torch.Tensor:
    """The canonical (B, H, S, d) gradient of a key or value summed back to its input's shape
    (its heads repeated up to H by GQA are summed first)."""
    n, d = grad.shape[-2], grad.shape[-1]
    grad = grad.reshape(*batch, h, n, d)
    have = _heads(like)
    if have not in (1, h):
        grad = grad.unflatten(-3, (have, h // have)).sum(-3)
    return _reduce_to(grad, like)


assert set(_DTYPE_NAMES.values()) == set(DTYPES)
