"""Integration of torch.ops.xegpu.attention with PyTorch.

- torch.library.opcheck on several specs (schema, autograd registration,
  fake kernel, AOT dispatch with dynamic shapes);
- torch.compile(fullgraph=True) of a module calling the op: same output as
  eager, the op kept in the graph, no graph break;
- drop-in swap: a transformer block using F.scaled_dot_product_attention,
  run as is and under torch_xegpu_attn.replace_sdpa(), gives SDPA's output,
  and F.scaled_dot_product_attention is restored afterwards;
- torch_xegpu_attn.attention takes SDPA's positional / keyword signature;
- gradients flow through both entry points (SDPA's gradients; tests/test_gradients.py holds
  the thorough checks);
- the fake kernel gives SDPA's output shape without compiling, on FakeTensorMode
  and 'meta' tensors, and rejects what the real kernel rejects.

Sizes stay small (L, S <= 64): every distinct spec compiles a kernel.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_xegpu_attn
from torch_xegpu_attn.cache import stats

OP = torch.ops.xegpu.attention


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def activity():
    return (torch_xegpu_attn.COUNTERS["compilations"], torch_xegpu_attn.COUNTERS["payloads_built"],
            stats()["memory_hits"], stats()["disk_hits"])


# --------------------------------------------------------------------------------------------- opcheck

def _specs():
    q, kv = (2, 3, 16, 32), (2, 3, 24, 32)
    return {
        "plain": ((rand(*q), rand(*kv), rand(*kv)), {}),
        "causal": ((rand(*q), rand(*kv), rand(*kv)), {"is_causal": True}),
        "scale": ((rand(*q), rand(*kv), rand(*kv)), {"scale": 0.3}),
        "bool_mask": ((rand(*q), rand(*kv), rand(*kv), torch.rand(2, 1, 16, 24) > 0.3), {}),
        "additive_mask": ((rand(*q), rand(*kv), rand(*kv), rand(16, 24)), {}),
        "gqa": ((rand(2, 4, 16, 32), rand(2, 2, 24, 32), rand(2, 2, 24, 32)), {"enable_gqa": True}),
        "float16": ((rand(1, 2, 16, 32, dtype=torch.float16), rand(1, 2, 24, 32, dtype=torch.float16),
                     rand(1, 2, 24, 32, dtype=torch.float16)), {"is_causal": True}),
        "bfloat16": ((rand(1, 2, 16, 32, dtype=torch.bfloat16), rand(1, 2, 24, 32, dtype=torch.bfloat16),
                      rand(1, 2, 24, 32, dtype=torch.bfloat16)), {}),
        "3d": ((rand(3, 16, 32), rand(3, 24, 32), rand(3, 24, 16)), {}),
    }


@pytest.mark.parametrize("name", list(_specs()))
def test_opcheck(name, fresh_seed):
    args, kwargs = _specs()[name]
    torch.library.opcheck(OP.default, args, kwargs)
    # opcheck checks consistency between modes, not values: compare with SDPA too.
    ours, sdpa = OP(*args, **kwargs), F.scaled_dot_product_attention(*args, **kwargs)
    tol = 1e-5 if args[0].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, sdpa, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------- torch.compile

class AttentionModule(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.ops.xegpu.attention(q, k, v, is_causal=True, scale=0.25)
        return y.transpose(1, 2).reshape(b, l, d) + x


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(backend, dynamic, fresh_seed):
    module = AttentionModule().eval()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend=recording, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for length in (16, 24):
            x = rand(2, length, 32)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-6, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert targets & {OP, OP.default}, "the op is not in the compiled graph"
    with torch.no_grad():  # reference: the same module with SDPA
        q, k, v = module.qkv(x).view(2, 24, 3, 2, 16).permute(2, 0, 3, 1, 4)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25).transpose(1, 2)
        torch.testing.assert_close(compiled(x), ref.reshape(2, 24, 32) + x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ drop-in swap

class TransformerBlock(nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, l, d = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).view(b, l, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, l, d))


def test_replace_sdpa_drop_in(fresh_seed):
    block = TransformerBlock().eval()
    x = rand(2, 40, 64)
    original = F.scaled_dot_product_attention
    with torch.no_grad():
        expected = block(x)
        before = activity()
        with torch_xegpu_attn.replace_sdpa():
            assert F.scaled_dot_product_attention is torch_xegpu_attn.attention
            swapped = block(x)
        assert activity() != before, "the block did not run the xegpu kernel"
    assert F.scaled_dot_product_attention is original
    assert torch.nn.functional.scaled_dot_product_attention is original
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-5)


def test_replace_sdpa_restores_on_error():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with torch_xegpu_attn.replace_sdpa():
            raise KeyError("inside the block")
    assert F.scaled_dot_product_attention is original


# ------------------------------------------------------------------------------------------- signature

def test_plain_function_signature(fresh_seed):
    q, k, v = rand(2, 4, 16, 32), rand(2, 2, 24, 32), rand(2, 2, 24, 32)
    mask = torch.rand(16, 24) > 0.2
    sdpa = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.3, enable_gqa=True)
    calls = {
        "positional": torch_xegpu_attn.attention(q, k, v, mask, 0.0, False, 0.3, True),
        "sdpa_style": torch_xegpu_attn.attention(q, k, v, mask, 0.0, False, scale=0.3, enable_gqa=True),
        "keywords": torch_xegpu_attn.attention(query=q, key=k, value=v, attn_mask=mask, dropout_p=0.0,
                                               is_causal=False, scale=0.3, enable_gqa=True),
        "keywords_reordered": torch_xegpu_attn.attention(enable_gqa=True, scale=0.3, value=v, key=k, query=q,
                                                         attn_mask=mask),
        "op": OP(q, k, v, mask, 0.0, False, scale=0.3, enable_gqa=True),
    }
    for name, out in calls.items():
        torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # Defaults are SDPA's: no mask, no dropout, not causal, 1/sqrt(E), no GQA.
    q, k, v = rand(2, 2, 16, 32), rand(2, 2, 24, 32), rand(2, 2, 24, 32)
    torch.testing.assert_close(torch_xegpu_attn.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)
    causal = torch_xegpu_attn.attention(q, k, v, None, 0.0, True)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, None, 0.0, True),
                               rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("entry", ["op", "attention"])
def test_backward(entry, fresh_seed):
    fn = OP if entry == "op" else torch_xegpu_attn.attention
    q, k, v = (rand(1, 2, 16, 32).requires_grad_() for _ in range(3))
    out = fn(q, k, v, is_causal=True)
    assert out.requires_grad
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, is_causal=True).backward(grad)
    for ours, theirs in zip((q, k, v), ref):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_forward_with_frozen_inputs_needs_no_backward(fresh_seed):
    q, k, v = (rand(1, 2, 16, 32) for _ in range(3))
    out = OP(q, k, v, is_causal=True)
    assert not out.requires_grad and out.grad_fn is None


# ------------------------------------------------------------------------------------------ fake kernel

FAKE_SHAPES = {
    "4d": ((2, 3, 17, 32), (2, 3, 40, 32), (2, 3, 40, 16), {}),
    "gqa": ((2, 8, 17, 32), (2, 2, 40, 32), (2, 2, 40, 32), {"enable_gqa": True}),
    "mqa_broadcast": ((2, 8, 17, 32), (2, 1, 40, 32), (2, 1, 40, 32), {"is_causal": True}),
    "batch_broadcast": ((4, 3, 17, 32), (1, 3, 40, 32), (1, 3, 40, 32), {}),
    "3d": ((5, 17, 32), (5, 40, 32), (5, 40, 8), {}),
    "2d": ((17, 32), (40, 32), (40, 32), {"scale": 0.1}),
    "5d": ((2, 3, 4, 17, 32), (2, 3, 4, 40, 32), (2, 3, 4, 40, 32), {}),
}


@pytest.mark.parametrize("case", list(FAKE_SHAPES))
@pytest.mark.parametrize("mode", ["fake", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_kernel_shape(case, mode, dtype):
    *shapes, kwargs = FAKE_SHAPES[case]
    before = activity()
    if mode == "fake":
        with FakeTensorMode():
            q, k, v = (rand(*s, dtype=dtype) for s in shapes)
            ours = OP(q, k, v, **kwargs)
            sdpa = F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        q, k, v = (rand(*s, dtype=dtype, device="meta") for s in shapes)
        ours = OP(q, k, v, **kwargs)
        sdpa = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert ours.shape == sdpa.shape
    assert ours.dtype == dtype and ours.device == q.device
    assert activity() == before, "the fake kernel compiled or looked up a kernel"


@pytest.mark.parametrize("case", ["head_dim", "heads", "mask_shape", "mask_dtype"])
def test_fake_kernel_rejects_like_real_kernel(case):
    q, kv, mask = (1, 2, 4, 8), (1, 2, 5, 8), None
    k_shape = (1, 2, 5, 16) if case == "head_dim" else (1, 3, 5, 8) if case == "heads" else kv
    if case == "mask_shape":
        mask = torch.ones(4, 6, dtype=torch.bool)
    if case == "mask_dtype":
        mask = torch.ones(4, 5, dtype=torch.int32)
    with pytest.raises(RuntimeError) as real:
        OP(rand(*q), rand(*k_shape), rand(*kv), mask)
    before = activity()
    with pytest.raises(RuntimeError) as fake:
        OP(rand(*q, device="meta"), rand(*k_shape, device="meta"), rand(*kv, device="meta"),
           None if mask is None else mask.to("meta"))
    assert type(fake.value) is type(real.value)
    assert activity() == before


def test_attention_on_meta_tensors():
    q, k, v = (torch.empty(2, 4, 8, 16, device="meta") for _ in range(3))
    out = torch_xegpu_attn.attention(q, k, v, is_causal=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 16)


def test_scale_as_zero_dim_tensor(fresh_seed):
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    torch.testing.assert_close(torch_xegpu_attn.attention(q, k, v, scale=torch.tensor(0.3)),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)


def test_lazily_negated_input(fresh_seed):
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    for _ in range(2):  # the second call may take the recorded fast path
        torch.testing.assert_close(torch_xegpu_attn.attention(torch._neg_view(q), k, v),
                                   F.scaled_dot_product_attention(-q, k, v), rtol=1e-5, atol=1e-5)
