"""replace_sdpa() reaches every SDPA call a model makes, or says why not.

For each module path: the module run as is (PyTorch's native fast path or
SDPA) is the reference, the same module inside the block must give the same
output, and the op must have served the expected number of calls
(SdpaSwap.calls).  A control shows that without the block's fast-path switch
the eval/no_grad modules never call F.scaled_dot_product_attention.  The paths
the swap cannot reach (need_weights=True, a name imported before the block)
must warn, naming the cause.
"""

import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_xegpu_attn

D, HEADS = 32, 4
TOL = dict(rtol=2e-5, atol=2e-5)


def counting_sdpa(monkeypatch):
    """Replace F.scaled_dot_product_attention by a counting wrapper of itself; returns the counts."""
    calls = []
    original = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def no_warnings():
    return warnings.catch_warnings(record=True)


@pytest.mark.parametrize("padding", [False, True])
def test_transformer_encoder_layer_eval_no_grad(padding, fresh_seed, monkeypatch):
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(3, 20, D)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    if padding:
        pad[1, 15:] = True
        pad[2, 5:] = True
    kwargs = {"src_key_padding_mask": pad} if padding else {}
    with torch.no_grad():
        with monkeypatch.context() as m:  # control: the native fast path never calls SDPA
            calls = counting_sdpa(m)
            expected = layer(x, **kwargs)
            assert calls == [], "the fast path was not taken: this test does not test the switch"
        with torch_xegpu_attn.replace_sdpa() as swap:
            assert not torch.backends.mha.get_fastpath_enabled()
            got = layer(x, **kwargs)
    assert torch.backends.mha.get_fastpath_enabled(), "the fast path was not restored"
    assert swap.calls == 1
    torch.testing.assert_close(got, expected, **TOL)


def test_transformer_encoder_with_nested_tensors_and_padding(fresh_seed):
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 16, D)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 10:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=pad)  # nested tensors: padded rows come back as 0
        with torch_xegpu_attn.replace_sdpa() as swap:
            got = encoder(x, src_key_padding_mask=pad)
    assert swap.calls == 2
    valid = ~pad
    torch.testing.assert_close(got[valid], expected[valid], **TOL)


@pytest.mark.parametrize("mask", ["none", "key_padding", "causal"])
def test_multihead_attention_need_weights_false(mask, fresh_seed):
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    q, kv = torch.randn(2, 12, D), torch.randn(2, 17, D)
    kwargs = {"need_weights": False}
    if mask == "key_padding":
        pad = torch.zeros(2, 17, dtype=torch.bool)
        pad[0, 9:] = True
        kwargs["key_padding_mask"] = pad
    if mask == "causal":
        q = kv = torch.randn(2, 12, D)
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(12)
        kwargs["is_causal"] = True
    with torch.no_grad():
        expected, _ = mha(q, kv, kv, **kwargs)
        with torch_xegpu_attn.replace_sdpa() as swap:
            got, weights = mha(q, kv, kv, **kwargs)
    assert weights is None and swap.calls == 1 and swap.unreachable == 0
    torch.testing.assert_close(got, expected, **TOL)


def test_multihead_attention_in_grad_mode(fresh_seed):
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    x = torch.randn(2, 9, D)
    expected, _ = mha(x, x, x, need_weights=False)
    with torch_xegpu_attn.replace_sdpa() as swap:
        got, _ = mha(x, x, x, need_weights=False)  # parameters need gradients: the op's forward still runs
    assert swap.calls == 1
    torch.testing.assert_close(got.detach(), expected.detach(), **TOL)


def test_multihead_attention_need_weights_true_warns(fresh_seed):
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        expected, expected_weights = mha(x, x, x)
        with pytest.warns(UserWarning) as caught:
            with torch_xegpu_attn.replace_sdpa() as swap:
                got, weights = mha(x, x, x)  # need_weights=True is the default
    messages = [str(w.message) for w in caught]
    assert any("need_weights=True" in m and "need_weights=False" in m for m in messages), messages
    assert any("no call reached xegpu::attention" in m for m in messages), messages
    assert swap.calls == 0 and swap.unreachable == 1
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(weights, expected_weights, **TOL)


def test_training_dropout_is_served(fresh_seed):
    # In training, MultiheadAttention passes its dropout to SDPA: the op applies it (its own
    # generator: the output differs from SDPA's draw, but is reproducible) and trains.
    mha = nn.MultiheadAttention(D, HEADS, dropout=0.1, batch_first=True).train()
    x = torch.randn(2, 9, D)
    with torch_xegpu_attn.replace_sdpa() as swap:
        torch.manual_seed(1)
        first, _ = mha(x, x, x, need_weights=False)
        torch.manual_seed(1)
        again, _ = mha(x, x, x, need_weights=False)
        first.sum().backward()
    assert swap.calls == 3  # two forwards and a backward
    assert torch.equal(first, again)
    assert all(p.grad is not None for p in mha.parameters())


def test_name_imported_before_the_block_is_named(tmp_path, fresh_seed):
    source = tmp_path / "early_import_model.py"
    source.write_text(
        "from torch.nn.functional import scaled_dot_product_attention\n"
        "def forward(q, k, v):\n"
        "    return scaled_dot_product_attention(q, k, v)\n")
    spec = importlib.util.spec_from_file_location("early_import_model", source)
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.modules["early_import_model"] = module
    try:
        spec.loader.exec_module(module)
        q = torch.randn(1, 2, 8, 16)
        with pytest.warns(UserWarning, match=r"early_import_model\.scaled_dot_product_attention") as caught:
            with torch_xegpu_attn.replace_sdpa() as swap:
                out = module.forward(q, q, q)
        assert swap.calls == 0
        assert "from torch.nn.functional import scaled_dot_product_attention" in str(caught[0].message)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    finally:
        del sys.modules["early_import_model"]


def test_calls_counted_and_no_warning_when_reached(fresh_seed):
    q = torch.randn(1, 2, 8, 16)
    with no_warnings() as caught:
        warnings.simplefilter("always")
        with torch_xegpu_attn.replace_sdpa() as swap:
            for _ in range(3):
                out = F.scaled_dot_product_attention(q, q, q)
            assert swap.calls == 3
        with torch_xegpu_attn.replace_sdpa(warn_if_unused=False) as idle:
            pass
    assert swap.calls == 3 and idle.calls == 0
    assert not [w for w in caught if "replace_sdpa" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(out, torch.ops.aten.scaled_dot_product_attention(q, q, q), **TOL)


def test_fast_path_setting_restored_on_error():
    torch.backends.mha.set_fastpath_enabled(False)  # a user's own setting survives the block
    try:
        with pytest.raises(KeyError):
            with torch_xegpu_attn.replace_sdpa():
                raise KeyError("inside the block")
        assert torch.backends.mha.get_fastpath_enabled() is False
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch_xegpu_attn.replace_sdpa(warn_if_unused=False):
        pass
    assert torch.backends.mha.get_fastpath_enabled() is True
    assert F.multi_head_attention_forward.__name__ == "multi_head_attention_forward"
    assert F.multi_head_attention_forward.__module__ == "torch.nn.functional"
