"""Property-based differential testing of the op against SDPA: strategies over SDPA's whole input
space and the comparison every drawn case goes through.

A case is what a user may pass to torch.nn.functional.scaled_dot_product_attention:

    dtype        every dtype the target takes
    rank         2-D to 5-D inputs (0 to 2 batch dims besides the heads), batch dims broadcast
                 between query, key and value
    heads        equal, broadcast key/value heads (1), or grouped (enable_gqa, every ratio;
                 key and value heads may differ)
    lengths      L and S drawn independently: 0, 1, below, at and past a tile, several tiles
    head dims    E and Ev drawn independently from what the target takes
    layouts      contiguous, heads and lengths transposed in memory, rows with a pitch, every
                 other row, the last dim strided (not unit stride), expanded (stride 0) dims
    masks        none, bool or additive (float32 or the query's dtype), every broadcast pattern
                 of (batch..., Hq, L, S) and fewer leading dims, expanded views, rows with every
                 key masked, -inf entries
    is_causal    with L != S too (no mask)
    scale        None, 1.0, 0.0, negative, tiny, large, and any float in between

`check_case` runs the op (outputs poisoned: conftest sets XEGPU_ATTN_POISON), SDPA and a
float64 reference on the same inputs and bounds the op's error by twice SDPA's plus a floor
(where SDPA raises, the op must raise the same exception type).  The tests that use these
strategies (tests/test_properties.py, the emulated xegpu and the nvvm GPU tests) draw from a
fixed seed and keep a failure database (tests/hypothesis-db) whose shrunk failures are
replayed first; the example budget is the profile's (XEGPU_ATTN_HYPOTHESIS_PROFILE: "ci" by
default, "deep" for a longer search).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

import torch_xegpu_attn
from conftest import FLOOR, reference_attention, reference_keep_mask, reference_scores, repeat_heads

#: the seed every property test draws from (reproducible runs; XEGPU_ATTN_HYPOTHESIS_SEED overrides).
SEED = int(os.environ.get("XEGPU_ATTN_HYPOTHESIS_SEED", "20261206"))


class KeepingDatabase(DirectoryBasedExampleDatabase):
    """A failure database that saves new shrunk failures and never deletes one: hypothesis drops
    an entry that passes on replay, but a fixed failure is a regression case to replay on every
    run (the files are committed)."""

    def delete(self, key: bytes, value: bytes) -> None:
        pass

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.save(dest, value)


#: shrunk failures are kept here and replayed before new examples are drawn.
DATABASE = KeepingDatabase(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hypothesis-db"))

_COMMON = dict(deadline=None, database=DATABASE, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
#: examples per test: "ci", the default run's budget; "deep", a longer search (before a change
#: lands).
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("deep", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("XEGPU_ATTN_HYPOTHESIS_PROFILE", "ci"))


def reproducible(**overrides):
    """A property test drawn from SEED whose failures go to the database (hypothesis' @seed alone
    turns the database off; the settings outside it turn it back on) and are replayed first;
    `overrides` are settings of the profile's to change (max_examples=budget(...))."""
    def decorate(test):
        return settings(database=DATABASE, **overrides)(seed(SEED)(test))
    return decorate


def budget(fraction: float) -> int:
    """A test's example budget: `fraction` of the profile's (the emulated and GPU targets take a
    share of the cpu's)."""
    return max(1, int(settings.default.max_examples * fraction))


@dataclass(frozen=True)
class Target:
    """What a target takes: the strategies draw only valid inputs for it."""

    dtypes: Tuple[torch.dtype, ...]
    head_dims: Tuple[int, ...]
    device: str = "cpu"
    #: the largest L * S * (E + Ev) * B * Hq drawn (a case's cost).
    max_work: int = 2_000_000


CPU = Target(dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
             head_dims=(1, 3, 8, 16, 17, 32, 48, 64, 80, 96, 128, 160, 256))
#: every multiple of 16 up to 256, as the GPU targets take them.
GPU_HEAD_DIMS = tuple(range(16, 257, 16))

#: lengths (0 last: an empty result, no kernel to check).
LENGTHS = (1, 2, 7, 8, 9, 16, 31, 63, 64, 65, 100, 127, 128, 129, 200, 257, 0)
SCALES = (1.0, None, 0.0, -1.0, -0.125, 1e-30, 1e-6, 2.0, 30.0, 1e3)
LAYOUTS = ("contiguous", "transposed", "pitched", "every_other_row", "last_dim_strided", "expanded")


@dataclass
class Case:
    """One call: the tensors, the keyword arguments, and how they were made (for the report)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: Dict = field(default_factory=dict)
    how: Dict = field(default_factory=dict)

    def __repr__(self) -> str:
        shapes = {n: (tuple(t.shape), tuple(t.stride()), str(t.dtype)) for n, t in
                  (("q", self.q), ("k", self.k), ("v", self.v))}
        mask = self.kwargs.get("attn_mask")
        kw = {**self.kwargs, "attn_mask": None if mask is None else (tuple(mask.shape), tuple(mask.stride()),
                                                                      str(mask.dtype))}
        return f"Case({shapes}, {kw}, {self.how})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' report: shapes, not values
        printer.text(repr(self))


def _make(shape: Sequence[int], dtype, layout: str, generator, device: str, magnitude: float) -> torch.Tensor:
    """A tensor of `shape` laid out as `layout` (values from `generator`)."""
    shape = tuple(shape)

    def fresh(s):
        t = torch.randn(*s, generator=generator, dtype=torch.float64) * magnitude
        return t.to(dtype=dtype, device=device)

    n = len(shape)
    if layout == "transposed" and n >= 3:  # (..., L, H, D) in memory, heads and rows swapped
        swapped = list(shape)
        swapped[-3], swapped[-2] = swapped[-2], swapped[-3]
        return fresh(swapped).transpose(-3, -2)
    if layout == "pitched":  # rows padded: a row pitch larger than the row
        return fresh((*shape[:-1], shape[-1] + 5))[..., :shape[-1]]
    if layout == "every_other_row" and n >= 2:
        return fresh((*shape[:-2], 2 * shape[-2], shape[-1]))[..., ::2, :]
    if layout == "last_dim_strided" and n >= 2:
        return fresh((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "expanded" and n >= 3:  # every leading dim of size > 1 stored once (stride 0)
        stored = [1 if i < n - 2 else s for i, s in enumerate(shape)]
        return fresh(stored).expand(shape)
    return fresh(shape)


@st.composite
def _heads(draw, rank: int):
    """(Hq, Hk, Hv, enable_gqa); heads are 1 without a head dim (2-D inputs)."""
    if rank < 3:  # (SDPA raises IndexError for 2-D inputs with enable_gqa=True)
        return 1, 1, 1, False
    kind = draw(st.sampled_from(["equal", "broadcast", "grouped"]))
    if kind == "equal":
        h = draw(st.integers(1, 4))
        return h, h, h, draw(st.booleans())
    if kind == "broadcast":  # key/value with one head, broadcast over the query's (no GQA flag)
        return draw(st.integers(2, 4)), 1, 1, False
    hk = draw(st.integers(1, 3))
    hq = hk * draw(st.integers(1, 6))  # every ratio
    divisors = [d for d in range(1, hq + 1) if hq % d == 0 and d <= 6]
    hv = draw(st.sampled_from(divisors)) if draw(st.booleans()) else hk
    return hq, hk, hv, True


@st.composite
def _mask(draw, kind: str, full: Tuple[int, ...], dtype, generator, device: str):
    """A mask of `kind` ("bool" or "additive") broadcastable to `full` = (batch..., Hq, L, S) in
    any pattern."""
    rank = draw(st.integers(2, len(full)))  # (SDPA raises IndexError for a 1-D mask)
    shape = [s if draw(st.booleans()) else 1 for s in full[len(full) - rank:]]
    expanded = draw(st.booleans()) and any(s > 1 for s in shape[:-2])
    stored = [1 if expanded and i < len(shape) - 2 else s for i, s in enumerate(shape)]
    dead_rows = draw(st.booleans())
    if kind == "bool":
        keep = draw(st.sampled_from([0.1, 0.5, 0.9]))
        mask = torch.rand(*stored, generator=generator) < keep
        if dead_rows and len(stored) >= 2 and stored[-2] > 1:
            mask[..., ::3, :] = False  # rows with every key masked
        mask_dtype = "bool"
    else:
        mask_dtype = draw(st.sampled_from([torch.float32, dtype]))
        mask = torch.randn(*stored, generator=generator, dtype=torch.float64) * 2
        mask = mask.masked_fill(torch.rand(*stored, generator=generator) < 0.2, float("-inf"))
        if dead_rows and len(stored) >= 2 and stored[-2] > 1:
            mask[..., ::3, :] = float("-inf")
        mask = mask.to(mask_dtype)
        mask_dtype = str(mask_dtype)
    mask = mask.to(device)
    if expanded:
        mask = mask.expand(shape)
    return mask, {"mask_shape": tuple(shape), "mask_dtype": mask_dtype, "expanded": expanded,
                  "dead_rows": dead_rows}


#: how scores are masked: a test per kind keeps each one's share of the budget.
MASKINGS = ("none", "causal", "bool", "additive")


@st.composite
def cases(draw, target: Target = CPU, masking: Optional[str] = None):
    """Valid SDPA calls for `target` (see the module docstring), masked as `masking` says (one of
    MASKINGS; drawn when None)."""
    dtype = draw(st.sampled_from(target.dtypes))
    rank = draw(st.integers(2, 5))
    hq, hk, hv, gqa = draw(_heads(rank))
    batch = [draw(st.integers(1, 3)) for _ in range(max(0, rank - 3))]
    L, S = draw(st.sampled_from(LENGTHS)), draw(st.sampled_from(LENGTHS))
    E, Ev = draw(st.sampled_from(target.head_dims)), draw(st.sampled_from(target.head_dims))
    work = max(1, math.prod(batch)) * hq * max(L, 1) * max(S, 1) * (E + Ev)
    if work > target.max_work:  # too costly for a test: shorten the keys, then the queries
        S = min(S, max(1, target.max_work // (work // max(S, 1))))
        work = max(1, math.prod(batch)) * hq * max(L, 1) * max(S, 1) * (E + Ev)
        L = min(L, max(1, target.max_work * max(L, 1) // work))

    def batch_of(name):  # key and value may broadcast batch dims of the query
        return [b if name == "q" or draw(st.booleans()) else 1 for b in batch]

    heads = {"q": hq, "k": hk, "v": hv}
    rows = {"q": L, "k": S, "v": S}
    cols = {"q": E, "k": E, "v": Ev}
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1.0, 3.0]))
    tensors, layouts = {}, {}
    for name in ("q", "k", "v"):
        shape = (batch_of(name) + [heads[name]] if rank >= 3 else []) + [rows[name], cols[name]]
        layouts[name] = draw(st.sampled_from(LAYOUTS))
        tensors[name] = _make(shape, dtype, layouts[name], generator, target.device, magnitude)
    scale = draw(st.sampled_from(SCALES + ("any",)))
    kwargs = {"scale": draw(st.floats(-4.0, 4.0, allow_nan=False)) if scale == "any" else scale}
    if gqa:
        kwargs["enable_gqa"] = True
    scores = (*torch.broadcast_shapes(*(t.shape[:-3] for t in tensors.values())),
              *((hq,) if rank >= 3 else ()), L, S)
    masking = masking or draw(st.sampled_from(MASKINGS))
    how = {"masking": masking}
    if masking == "causal":
        kwargs["is_causal"] = True
    elif masking != "none":
        kwargs["attn_mask"], drawn = draw(_mask(masking, scores, dtype, generator, target.device))
        how.update(drawn)
    how.update(layouts=layouts, magnitude=magnitude)
    return Case(tensors["q"], tensors["k"], tensors["v"], kwargs, how)


def _sdpa(case: Case, sdpa):
    """SDPA's output on the case, or the exception it raises."""
    try:
        return sdpa(case.q, case.k, case.v, **case.kwargs)
    except Exception as error:  # noqa: BLE001 (the op must raise the same type)
        return error


def _dropout_p(case: Case, keep) -> float:
    """The case's dropout probability; a dropout case is compared under its keep-mask `keep`."""
    p = case.kwargs.get("dropout_p", 0.0)
    if p > 0 and keep is None:
        raise ValueError("a dropout case is compared under the op's keep-mask: pass keep")
    return p


def sdpa_with_keep(keep: torch.Tensor):
    """SDPA's math backend applying the keep-mask `keep` to its dropout (its testing entry)."""
    def sdpa(q, k, v, **kwargs):
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, dropout_mask=keep, **kwargs)[0]
    return sdpa


def _on_cpu(kwargs: Dict) -> Dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def _score_kwargs(case: Case) -> Dict:
    """The case's keyword arguments that shape the scores (no dropout), on the CPU."""
    return {k: v for k, v in _on_cpu(case.kwargs).items() if k != "dropout_p"}


def _reference(case: Case, keep):
    """The float64 reference of the case (dropout applied by `keep`), a function of (q, k, v, **kwargs)."""
    def reference(q, k, v, **kwargs):
        return reference_attention(q, k, v, keep=None if keep is None else keep.cpu(), **_on_cpu(kwargs))
    return reference


def check_case(case: Case, run=None, sdpa=None, keep=None) -> Optional[float]:
    """The op (`run`, default torch_xegpu_attn.attention) against SDPA (`sdpa`, default
    F.scaled_dot_product_attention) and the float64 reference:
    the op's max abs error at most 2x SDPA's plus the dtype's floor; where SDPA raises, the op
    raises the same type.  Elements SDPA leaves NaN (its math backend on rows with every key
    masked; its f16 CPU kernel with scale=0 and is_causal) do not count toward SDPA's error:
    there the op must give the reference correctly rounded.  A case with dropout is compared
    under the keep-mask `keep` the op draws (`run` must draw it: reseed before each call): the
    reference and SDPA's math backend (the default `sdpa` then) apply it.  Returns the op's
    error (None where both raised)."""
    run = run or torch_xegpu_attn.attention
    p = _dropout_p(case, keep)
    expected = _sdpa(case, sdpa or (sdpa_with_keep(keep) if p > 0 else F.scaled_dot_product_attention))
    if isinstance(expected, Exception):
        try:
            run(case.q, case.k, case.v, **case.kwargs)
        except type(expected):
            return None
        raise AssertionError(f"SDPA raises {type(expected).__name__} ({expected}), the op does not")
    ours = run(case.q, case.k, case.v, **case.kwargs)
    if ours.device.type == "cuda":
        torch.cuda.synchronize()
    ref = _reference(case, keep)(case.q.cpu(), case.k.cpu(), case.v.cpu(), **case.kwargs)
    assert ours.shape == expected.shape == ref.shape, (ours.shape, expected.shape, ref.shape)
    assert ours.dtype == case.q.dtype and ours.device == case.q.device
    ours = ours.cpu().double()
    assert not ours.isnan().any(), "unwritten or NaN output elements"
    if ours.numel() == 0:
        return 0.0
    errors = (ours - ref).abs()
    sdpa_errors = (expected.cpu().double() - ref).abs()
    failed = sdpa_errors.isnan()
    sdpa_err = torch.nan_to_num(sdpa_errors, nan=0.0).max().item()
    rounding = score_rounding(case) / (1 - p if p < 1 else 1)
    bound = 2 * sdpa_err + FLOOR[case.q.dtype] + rounding
    err = errors[~failed].max().item() if (~failed).any() else 0.0
    assert err <= bound, (f"error {err:.3e} > bound {bound:.3e} (SDPA error {sdpa_err:.3e}, score rounding "
                          f"{rounding:.3e})")
    if failed.any():  # where SDPA gives NaN, the op must round the reference correctly
        nan_bound = 0.5 * torch.finfo(case.q.dtype).eps * ref.abs() + FLOOR[case.q.dtype] + rounding
        worst = (errors - nan_bound)[failed].max().item()
        assert worst <= 0, (f"error {worst:.3e} past a correctly rounded output where SDPA gives NaN "
                            f"({int(failed.sum())} elements)")
    return max(err, errors.max().item())


def _unit_roundoff(case: Case) -> float:
    """The unit roundoff of the accumulator: f64 for float64 inputs, f32 otherwise."""
    return 2.0 ** -53 if case.q.dtype == torch.float64 else 2.0 ** -24


def score_roundoff(case: Case) -> float:
    """The relative change of a probability when its score is rounded in the accumulator's
    precision: u * max |s| (u: the unit roundoff of f32, of f64 for float64 inputs)."""
    scores = reference_scores(case.q.cpu(), case.k.cpu(), **_score_kwargs(case))
    finite = scores[torch.isfinite(scores)]
    return 0.0 if finite.numel() == 0 else _unit_roundoff(case) * finite.abs().max().item()


def score_rounding(case: Case) -> float:
    """What rounding the scores alone may move the output by: a score s computed in the
    accumulator's precision (unit roundoff u: f32, f64 for float64 inputs) is off by about
    u |s|, which moves an output by up to twice that times max |v|.  Where scores are large
    (large inputs or scale) this is the error of any implementation, SDPA's included, but
    which of two implementations rounds a given score worse is chance: the floor keeps a
    2x comparison of two such draws from failing at random."""
    if case.v.numel() == 0:
        return 0.0
    return 2 * score_roundoff(case) * case.v.double().abs().max().item()


def delta_cancellation(case: Case, grad_out: torch.Tensor) -> Dict[str, float]:
    """What rounding dP and delta moves dq and dk by, per input: each is a dot product of a row
    of dO with a row of v (or of the output) computed in the accumulator's precision (unit
    roundoff u), so off by about u * |dO row| * max |v row| (2-norms), and dS = P (dP - delta)
    keeps that error where the two cancel (a row whose probability peaks on one key has a true
    dS of 0 there, whatever dP's size).
    dq and dk carry it times |scale| and the size of k and q, summed over the probabilities
    of the rows and heads that reduce onto one input row; dv has no such term."""
    kwargs = _score_kwargs(case)
    q, k, v = case.q.cpu().double(), case.k.cpu().double(), case.v.cpu().double()
    if min(q.numel(), k.numel(), v.numel()) == 0:
        return {"q": 0.0, "k": 0.0, "v": 0.0}
    scale = kwargs.get("scale")
    scale = abs(1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
    p = case.kwargs.get("dropout_p", 0.0)
    factor = 1.0 / (1.0 - p) if 0 < p < 1 else 1.0
    probs = torch.softmax(reference_scores(q, k, **kwargs), -1).nan_to_num()
    rounding = _unit_roundoff(case) * factor * grad_out.cpu().double().norm(dim=-1) * v.norm(dim=-1).max()
    weights = probs * rounding[..., None]
    # gradients of ones broadcast as q's rows and k's rows are: sums over what reduces onto them
    q_rows = torch.ones(q.shape[:-1], dtype=torch.float64, requires_grad=True)
    k_rows = torch.ones(k.shape[:-1], dtype=torch.float64, requires_grad=True)
    k_spread = repeat_heads(k_rows[..., None], q, kwargs.get("enable_gqa", False))[..., 0]
    total = (weights.sum(-1) * q_rows).sum() + (weights.sum(-2) * k_spread).sum()
    q_sums, k_sums = torch.autograd.grad(total, (q_rows, k_rows))
    return {"q": scale * k.abs().max().item() * q_sums.max().item(),
            "k": scale * q.abs().max().item() * k_sums.max().item(), "v": 0.0}


class _FlashBackward(torch.autograd.Function):
    """Attention whose backward is a flash backward's arithmetic, in torch ops: P recomputed
    from the saved log-sum-exp, delta = rowsum(dO * O) from the saved output, dS = P (dP -
    delta).  On (batch, heads, n, d) operands of one shape, in the accumulator's type."""

    @staticmethod
    def forward(ctx, q, k, v, factor, kwargs):
        scores = reference_scores(q, k, dtype=q.dtype, **kwargs)
        lse = torch.logsumexp(scores, -1, keepdim=True)
        probs = _probabilities(scores, lse)
        out = (probs * factor) @ v
        ctx.save_for_backward(q, k, v, factor, out, lse)
        ctx.kwargs = kwargs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, factor, out, lse = ctx.saved_tensors
        scale = ctx.kwargs.get("scale")
        scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
        probs = _probabilities(reference_scores(q, k, dtype=q.dtype, **ctx.kwargs), lse)
        dv = (probs * factor).transpose(-1, -2) @ grad_out
        dp = (grad_out @ v.transpose(-1, -2)) * factor
        delta = (grad_out * out).sum(-1, keepdim=True)
        ds = probs * (dp - delta)
        return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv, None, None


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse); 0 on rows that see no key (lse = -inf)."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(scores), torch.exp(scores - lse))


def flash_algorithm(keep=None):
    """A function like SDPA's (q, k, v, **kwargs) that computes attention's gradients as a flash
    backward does, in torch ops in the accumulator's type (f32; f64 for float64 inputs): the
    error of that algorithm on a case, whichever backend SDPA picks for it.  Dropout by the
    keep-mask `keep`."""
    def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dropout_p=0.0):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        k, v = repeat_heads(k, q, enable_gqa), repeat_heads(v, q, enable_gqa)
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
        factor = torch.ones((), dtype=acc)
        if dropout_p >= 1:
            factor = torch.zeros((), dtype=acc)
        elif dropout_p > 0:
            factor = keep.to(acc) / (1 - dropout_p)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(acc)
        kwargs = {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale}
        return _FlashBackward.apply(q, k, v, factor, kwargs)
    return attention


def _gradients(fn, case: Case, grad_out: torch.Tensor, dtype=None):
    """(output, (dq, dk, dv)) of fn on the case's tensors (as given, or converted to `dtype`),
    back-propagating `grad_out` (ones where None)."""
    leaves = [(t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_() for t in (case.q, case.k, case.v)]
    kwargs = dict(case.kwargs)
    if isinstance(kwargs.get("attn_mask"), torch.Tensor):
        kwargs["attn_mask"] = kwargs["attn_mask"].detach()
    out = fn(*leaves, **kwargs)
    grad_out = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out, tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


def check_gradients(case: Case, run=None, sdpa=None, keep=None) -> Optional[Dict[str, float]]:
    """The op's gradients of query, key and value (`run`, default torch_xegpu_attn.attention)
    against the float64 reference's: each within 2x SDPA's error (`sdpa`) plus the dtype's
    floor plus what the rounding of the scores moves it by; where SDPA raises, the op raises
    the same type.  SDPA's error is its backend's: on the CPU a flash backward (P from the
    log-sum-exp, delta = rowsum(dO * O)) for 4-D inputs, the math backend's autograd (P kept,
    delta from P and dP) for the rest, which is more accurate where a row's probabilities
    peak (dP and delta cancel there).  So the flash algorithm's own error on the case
    (`flash_algorithm`, torch ops in the accumulator's type) counts as SDPA's too, whichever
    backend SDPA picked.  Gradient elements SDPA leaves NaN do not count toward its error.
    Dropout as in `check_case` (`keep`).  Returns the op's error per input (None where both
    raised)."""
    run = run or torch_xegpu_attn.attention
    p = _dropout_p(case, keep)
    sdpa = sdpa or (sdpa_with_keep(keep) if p > 0 else F.scaled_dot_product_attention)
    try:
        with torch.no_grad():
            out_shape = sdpa(case.q, case.k, case.v, **case.kwargs).shape
        generator = torch.Generator().manual_seed(out_shape.numel())
        grad_out = torch.randn(out_shape, generator=generator, dtype=torch.float64).to(case.q.device)
        _, expected_grads = _gradients(sdpa, case, grad_out)
    except Exception as error:  # noqa: BLE001
        try:
            _gradients(run, case, None)
        except type(error):
            return None
        raise AssertionError(f"SDPA raises {type(error).__name__} ({error}), the op does not")
    _, ours_grads = _gradients(run, case, grad_out)
    cpu_case = Case(case.q.cpu(), case.k.cpu(), case.v.cpu(), _on_cpu(case.kwargs))
    _, ref_grads = _gradients(_reference(case, keep), cpu_case, grad_out.cpu(), dtype=torch.float64)
    # the flash algorithm sees the op's inputs and output gradient: rounded to the dtype
    _, flash_grads = _gradients(flash_algorithm(None if keep is None else keep.cpu()), cpu_case,
                                grad_out.cpu().to(case.q.dtype))
    relative = score_roundoff(case)
    cancellation = delta_cancellation(case, grad_out)
    errors = {}
    for name, ours, sdpa_grad, flash_grad, ref, leaf in zip("qkv", ours_grads, expected_grads, flash_grads,
                                                             ref_grads, (case.q, case.k, case.v)):
        assert ours.shape == leaf.shape and ours.dtype == leaf.dtype, (name, ours.shape, ours.dtype)
        ours = ours.cpu().double()
        assert not ours.isnan().any(), f"NaN in the gradient of {name}"
        if ours.numel() == 0:
            errors[name] = 0.0
            continue
        ref_abs = torch.nan_to_num(ref, nan=0.0).abs().max().item()
        diff = (ours - ref).abs()
        sdpa_diff = (sdpa_grad.cpu().double() - ref).abs()
        failed = sdpa_diff.isnan() | ref.isnan()
        sdpa_err = torch.nan_to_num(sdpa_diff, nan=0.0).max().item()
        flash_err = torch.nan_to_num((flash_grad.double() - ref).abs(), nan=0.0).max().item()
        # rounding a score by u|s| moves a probability, and so every gradient, by that relative
        # amount times a few terms of the gradient's size
        bound = (2 * max(sdpa_err, flash_err) + FLOOR[case.q.dtype] * max(1.0, ref_abs) + 8 * relative * ref_abs
                 + cancellation[name])
        err = diff[~failed].max().item() if (~failed).any() else 0.0
        assert err <= bound, (f"gradient of {name}: error {err:.3e} > bound {bound:.3e} (SDPA error {sdpa_err:.3e}, "
                              f"flash algorithm's {flash_err:.3e}, largest gradient {ref_abs:.3e})")
        errors[name] = err
    return errors


def check_dropout(q, k, v, p, **kwargs) -> None:
    """A dropout call's output (the forward kernel) and gradients (forward_lse and backward) under
    the keep-mask written out from the generator's definition (conftest.reference_keep_mask, with
    the seed the call draws): each within 2x the error of SDPA's math backend under that mask of
    the float64 reference's.  So a target's kernels must draw the cpu target's mask."""
    from torch_xegpu_attn import frontend
    seed = torch.randint(2**31, ()).item()
    torch.manual_seed(seed)
    keep = reference_keep_mask(frontend.draw_seed(torch.device("cpu")), (*q.shape[:-1], k.size(-2)), p)

    def run(*args, **kw):
        torch.manual_seed(seed)
        return torch_xegpu_attn.attention(*args, **kw)
    case = Case(q, k, v, {**kwargs, "dropout_p": p})
    assert check_case(case, run, keep=keep.to(q.device)) is not None
    assert check_gradients(case, run, keep=keep.to(q.device)) is not None


def _half_ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Half the spacing of `dtype`'s numbers at |x| (at least the normal range's smallest)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny))) - 1) * info.eps


def check_summed_gradients(q, k, v, summed: str, **kwargs) -> None:
    """Gradients of 16-bit inputs the call broadcasts (`summed`: some of "qkv"; over batch dims,
    or key/value heads shared by all query heads) are float32 sums rounded once: each element
    within half a unit in the last place of the float64 reference's, plus 2e-5 of the largest
    for the float32 arithmetic.  Rounding each broadcast copy's gradient to 16 bits before
    summing them misses that bound by up to hundreds of half-units where the copies' terms
    cancel.  For a target whose contractions take float32 operands (the cpu target's); the GPU
    targets' matrix engines take 16-bit ones, an error of its own."""
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch_xegpu_attn.attention(*inputs, **kwargs)
    grad_out = torch.randn(out.shape, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, inputs, grad_out)
    wide = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*wide, **kwargs), wide, grad_out.cpu().double())
    for name, grad, ref in zip("qkv", grads, expected):
        if name in summed:
            error = (grad.cpu().double() - ref).abs()
            worst = (error / (_half_ulp(ref, q.dtype) + 2e-5 * ref.abs().max())).max().item()
            assert worst <= 1, f"gradient of {name}: {worst:.2f} times the bound of a sum rounded once"
