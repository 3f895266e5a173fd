"""Gradients of the op (cpu target): the backward kernel against SDPA's backward and a float64
reference, torch.autograd.gradcheck in float64, the log-sum-exp output and the merge of partial
results over key chunks, the ops' registrations (opcheck), and what a forward that needs no
gradient pays (nothing: the inference kernel, no log-sum-exp).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st

import torch_xegpu_attn
from conftest import reference_scores, uncached_compile
from sdpa_cases import CPU, MASKINGS, Case, budget, cases, check_gradients, check_summed_gradients, reproducible
from torch_xegpu_attn.cache import CACHE

#: backward cases cost about three forwards: a smaller drawn problem.
GRADIENT_TARGET = CPU.__class__(dtypes=CPU.dtypes, head_dims=CPU.head_dims, max_work=600_000)


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible(max_examples=budget(0.5))
@given(data=st.data())
def test_gradients_match_sdpa(masking, data):
    errors = check_gradients(data.draw(cases(GRADIENT_TARGET, masking=masking), label="case"))
    event("checked" if errors is not None else "SDPA and the op raise alike")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


#: the contract's corners for gradcheck: (shapes of q, k, v; keyword arguments).
GRADCHECK_CASES = {
    "plain": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), {}),
    "causal-L<S": ((1, 2, 5, 8), (1, 2, 9, 8), (1, 2, 9, 8), {"is_causal": True}),
    "causal-L>S": ((1, 2, 9, 8), (1, 2, 4, 8), (1, 2, 4, 6), {"is_causal": True}),
    "gqa-unequal-kv-heads": ((1, 6, 5, 8), (1, 2, 7, 8), (1, 3, 7, 8), {"enable_gqa": True}),
    "mqa-broadcast-heads": ((2, 4, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), {}),
    "broadcast-batch": ((3, 2, 5, 8), (1, 2, 7, 8), (3, 2, 7, 8), {}),
    "2d": ((5, 8), (7, 8), (7, 3), {}),
    "5d": ((2, 2, 2, 3, 8), (2, 1, 2, 7, 8), (2, 2, 2, 7, 8), {}),
    "one-key": ((1, 2, 6, 8), (1, 2, 1, 8), (1, 2, 1, 8), {}),
    "one-query": ((1, 2, 1, 8), (1, 2, 70, 8), (1, 2, 70, 8), {}),
    "multi-tile": ((1, 1, 70, 8), (1, 1, 130, 8), (1, 1, 130, 8), {"is_causal": True}),
    "scale-1": ((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), {"scale": 1.0}),
    "scale-0": ((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), {"scale": 0.0}),
    "scale-negative": ((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), {"scale": -0.7}),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck(name, fresh_seed):
    qs, ks, vs, kwargs = GRADCHECK_CASES[name]
    q, k, v = _f64(*qs), _f64(*ks), _f64(*vs)
    assert torch.autograd.gradcheck(lambda q, k, v: torch_xegpu_attn.attention(q, k, v, **kwargs), (q, k, v))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_gradcheck_masks(kind, fresh_seed):
    # Masks broadcast over batch and heads, with a row whose keys are all masked (gradient 0).
    q, k, v = _f64(2, 2, 6, 8), _f64(2, 2, 9, 8), _f64(2, 2, 9, 5)
    if kind == "bool":
        mask = torch.rand(2, 1, 6, 9) > 0.4
        mask[:, :, 2] = False
    else:
        mask = torch.randn(1, 2, 6, 9, dtype=torch.float64)
        mask[..., 3, :] = float("-inf")
    assert torch.autograd.gradcheck(lambda q, k, v: torch_xegpu_attn.attention(q, k, v, attn_mask=mask), (q, k, v))
    out = torch_xegpu_attn.attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    dead = 2 if kind == "bool" else 3
    assert (q.grad[..., dead, :] == 0).all() if kind == "additive" else (q.grad[:, :, dead] == 0).all()


def test_gradcheck_log_sum_exp(fresh_seed):
    # Gradients flowing in through lse as well as out.
    q, k, v = _f64(1, 2, 5, 8), _f64(1, 2, 9, 8), _f64(1, 2, 9, 8)
    mask = torch.rand(5, 9) > 0.3
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch_xegpu_attn.attention(q, k, v, attn_mask=mask, return_lse=True), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch_xegpu_attn.attention(q, k, v, is_causal=True, return_lse=True)[1], (q, k, v))


#: schedules of the log-sum-exp kernel: the cpu target's own, and keys split over three
#: work-groups whose partials a combine loop merges (query heads packed, the combine in two
#: tiles of value columns: the log-sum-exp comes from the first).
LSE_SCHEDULES = {"default": None,
                 "split3-packed": dict(row_tile=8, kv_tile=16, kv_splits=3, pack_gqa=True, combine_cols=8)}


@pytest.mark.parametrize("schedule", LSE_SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp(dtype, causal, schedule, monkeypatch, fresh_seed):
    if LSE_SCHEDULES[schedule] is not None:
        monkeypatch.setenv("XEGPU_ATTN_SCHEDULE", json.dumps(LSE_SCHEDULES[schedule]))
    q, k, v = rand(2, 4, 70, 32, dtype=dtype), rand(2, 2, 90, 32, dtype=dtype), rand(2, 2, 90, 16, dtype=dtype)
    mask = None if causal else torch.rand(70, 90) > 0.5
    if mask is not None:
        mask[5] = False  # a row that sees no key: lse -inf, output 0
    out, lse = torch_xegpu_attn.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                          return_lse=True)
    assert lse.shape == (2, 4, 70) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = torch.logsumexp(reference_scores(q, k, attn_mask=mask, is_causal=causal, enable_gqa=True), -1)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), finite)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse.double()[finite], expected[finite], rtol=tol, atol=tol)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(out, torch_xegpu_attn.attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                enable_gqa=True), rtol=0, atol=0)


def test_log_sum_exp_of_empty_problems():
    out, lse = torch_xegpu_attn.attention(rand(1, 2, 4, 8), rand(1, 2, 0, 8), rand(1, 2, 0, 8), return_lse=True)
    assert (out == 0).all() and lse.shape == (1, 2, 4) and (lse == float("-inf")).all()
    out, lse = torch_xegpu_attn.attention(rand(1, 2, 0, 8), rand(1, 2, 3, 8), rand(1, 2, 3, 8), return_lse=True)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("chunks", [(0, 20), (0, 7, 20), (0, 1, 9, 16, 20)])
@pytest.mark.parametrize("causal_mask", [False, True])
def test_merge_over_key_chunks(chunks, causal_mask, fresh_seed):
    """Attention over key chunks merged by their log-sum-exps is attention over all keys, and so
    are its gradients (the step of ring and context-parallel attention).  With a causal mask some
    chunks see no key for some rows (lse -inf)."""
    q, k, v = _f64(2, 3, 12, 16), _f64(2, 3, 20, 16), _f64(2, 3, 20, 8)
    mask = torch.ones(12, 20, dtype=torch.bool).tril() if causal_mask else None

    def merged(q, k, v):
        parts = [torch_xegpu_attn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True,
                                            attn_mask=None if mask is None else mask[:, a:b])
                 for a, b in zip(chunks, chunks[1:])]
        return torch_xegpu_attn.merge_attention([p[0] for p in parts], [p[1] for p in parts])

    out, lse = merged(q, k, v)
    full_out, full_lse = torch_xegpu_attn.attention(q, k, v, attn_mask=mask, return_lse=True)
    torch.testing.assert_close(out, full_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(full_out, (q, k, v), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(merged, (q, k, v))


def test_merge_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="one lse per output"):
        torch_xegpu_attn.merge_attention([rand(1, 2, 3, 4)], [])


def test_mask_gradient_not_implemented(fresh_seed):
    q, k, v = (rand(1, 2, 5, 8).requires_grad_() for _ in range(3))
    mask = torch.randn(5, 5, requires_grad=True)
    out = torch_xegpu_attn.attention(q, k, v, attn_mask=mask)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        out.sum().backward()
    # a mask that needs no gradient: the inputs' gradients flow
    out = torch_xegpu_attn.attention(q, k, v, attn_mask=mask.detach())
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_no_double_backward(fresh_seed):
    q, k, v = (rand(1, 1, 4, 8, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = torch_xegpu_attn.attention(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


def _kernels_in_memory():
    return {spec.kernel for spec in CACHE.specs()}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen_inputs"])
def test_inference_pays_nothing(mode, fresh_seed):
    """A forward that needs no gradient runs the inference kernel (no log-sum-exp written): the
    training kernels are compiled only for calls that need them."""
    CACHE.clear_memory()
    q, k, v = (rand(1, 2, 9, 16).requires_grad_(mode != "frozen_inputs") for _ in range(3))
    if mode == "no_grad":
        with torch.no_grad():
            out = torch_xegpu_attn.attention(q, k, v)
    elif mode == "inference_mode":
        with torch.inference_mode():
            out = torch.ops.xegpu.attention(q, k, v)
    else:
        out = torch.ops.xegpu.attention(q, k, v)
    assert out.grad_fn is None and _kernels_in_memory() == {"forward"}
    out = torch_xegpu_attn.attention(*(t.detach().requires_grad_() for t in (q, k, v)))
    assert _kernels_in_memory() == {"forward", "forward_lse"}
    out.sum().backward()
    assert _kernels_in_memory() == {"forward", "forward_lse", "backward"}


@pytest.mark.parametrize("op", ["attention", "attention_with_lse", "attention_backward"])
def test_opcheck_with_gradients(op, fresh_seed):
    q, k, v = (rand(2, 4, 20, 16).requires_grad_() for _ in range(3))
    mask = torch.rand(20, 20) > 0.3
    if op == "attention_backward":
        out, lse, seed = torch.ops.xegpu.attention_with_lse(q, k, v, mask, 0.1)
        args = (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), mask, out.detach(), lse.detach(),
                seed, 0.1, False, None, False)
        torch.library.opcheck(torch.ops.xegpu.attention_backward.default, args)
        return
    torch.library.opcheck(getattr(torch.ops.xegpu, op).default, (q, k, v, mask), {"scale": 0.3})


def test_gradients_of_the_op_entry_points_agree(fresh_seed):
    q, k, v = (rand(2, 4, 33, 16, dtype=torch.float64).requires_grad_() for _ in range(3))
    grads = []
    for fn in (torch.ops.xegpu.attention, torch_xegpu_attn.attention,
               lambda *a, **kw: torch.ops.xegpu.attention_with_lse(*a, **kw)[0]):
        out = fn(q, k, v, is_causal=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*ref, is_causal=True).square().sum(), ref)
    for a, b in zip(grads[0], expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradient_dtypes_and_shapes_follow_the_inputs(fresh_seed):
    # expanded (stride-0) and transposed inputs: gradients have the inputs' shapes
    q = rand(2, 3, 7, 16, dtype=torch.bfloat16).requires_grad_()
    k = rand(1, 3, 9, 16, dtype=torch.bfloat16).expand(2, 3, 9, 16).detach().requires_grad_()
    v = rand(2, 9, 3, 8, dtype=torch.bfloat16).transpose(1, 2).detach().requires_grad_()
    out = torch_xegpu_attn.attention(q, k, v)
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype and not t.grad.isnan().any()


#: (query shape, key/value shape, kwargs, the inputs broadcast): 64 batch copies of one query
#: or of the keys and values, key/value heads shared by eight query heads, a 5-D batch
SUMMED_GRADIENTS = [((1, 2, 16, 16), (64, 2, 24, 16), {}, "q"),
                    ((64, 2, 16, 16), (1, 2, 24, 16), {}, "kv"),
                    ((2, 8, 16, 16), (2, 1, 24, 16), {"is_causal": True}, "kv"),
                    ((4, 1, 2, 16, 32), (1, 3, 2, 24, 32), {}, "qkv")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_shape,kv_shape,kwargs,summed", SUMMED_GRADIENTS, ids=["q", "kv", "heads", "5d"])
def test_summed_gradients_round_once(dtype, q_shape, kv_shape, kwargs, summed, fresh_seed):
    """16-bit gradients summed over broadcast dims round once (the kernel writes them in float32)."""
    check_summed_gradients(torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype),
                           torch.randn(kv_shape, dtype=dtype), summed, **kwargs)


# ------------------------------------------------------------------------------------ training


class _Block(torch.nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x):
        b, l, _ = x.shape
        q = self.q(x).view(b, l, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, l, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = torch.ops.xegpu.attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, l, -1) + x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_training_step(backend, fresh_seed):
    """torch.compile(fullgraph=True) of a training step, forward and backward: no graph break,
    the op's training kernels in the graphs, eager's gradients."""
    from torch._dynamo.utils import counters
    block = _Block()
    x = torch.randn(2, 24, 32)

    def step(x):
        return block(x).square().mean()

    torch._dynamo.reset()
    counters.clear()
    with uncached_compile():
        loss = torch.compile(step, backend=backend, fullgraph=True)(x)
        loss.backward()
    compiled = {name: p.grad.clone() for name, p in block.named_parameters()}
    assert not counters["graph_break"], dict(counters["graph_break"])
    block.zero_grad()
    expected = step(x)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, p in block.named_parameters():
        torch.testing.assert_close(compiled[name], p.grad, rtol=1e-5, atol=1e-6)


def test_compiled_autograd(fresh_seed):
    """The backward traced by compiled autograd (the op's autograd node is traceable): eager's
    gradients."""
    from torch._dynamo import compiled_autograd
    block = _Block()
    x = torch.randn(2, 24, 32)
    block(x).square().mean().backward()
    expected = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    torch._dynamo.reset()
    with uncached_compile(), compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        block(x).square().mean().backward()
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6)


def test_transformer_encoder_layer_trains_under_replace_sdpa(fresh_seed):
    """nn.TransformerEncoderLayer (train mode, no dropout) under replace_sdpa(): the op serves its
    attention, and the gradients of every parameter are those of SDPA."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).train()
    x = torch.randn(3, 17, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(17)

    def step():
        layer.zero_grad()
        layer(x, src_mask=mask, is_causal=True).square().mean().backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()}

    expected = step()
    with torch_xegpu_attn.replace_sdpa() as swap:
        got = step()
    assert swap.calls == 2  # the forward kernel and the backward kernel
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with torch_xegpu_attn.replace_sdpa():
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = layer(x, src_mask=mask, is_causal=True).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("target,fields", [
    ("xegpu", {"kernel": "backward", "dtype": "float32", "head_dim": 80}),
    ("xegpu", {"kernel": "backward", "dtype": "float32", "v_head_dim": 128}),
])
def test_gpu_targets_reject_what_they_lack_clearly(target, fields):
    """The xegpu backward does not run in float32 above head dim 64 (E or Ev): the target says so
    before any compile."""
    from torch_xegpu_attn.spec import AttentionSpec
    from torch_xegpu_attn.targets import get_target
    spec = AttentionSpec(**{"group": 1, "head_dim": 64, "v_head_dim": 64, "dtype": "float16", "target": target,
                            **fields})
    with pytest.raises(NotImplementedError, match="CPU tensors"):
        get_target(target).check(spec)
