"""Bad and degenerate inputs: what the op rejects, with which exception and message.

Every rejected input must raise a specific exception type whose message names
what is wrong, must raise before anything is compiled or even looked up in the
kernel cache, and, where torch.nn.functional.scaled_dot_product_attention
(SDPA) also rejects the input, must raise an exception of SDPA's type (so a
caller's `except` clause written for SDPA still works).  Inputs SDPA accepts
but this package does not support (dropout, head dim 0, attn_mask together
with is_causal) raise TypeError / NotImplementedError / RuntimeError
as documented in torch_xegpu_attn/frontend.py.

Empty problems (batch 0, L = 0, Ev = 0, S = 0) are not errors: they return what
SDPA returns (an empty tensor of SDPA's shape, or zeros when S = 0) without
compiling anything.  Non-contiguous inputs are covered in test_numerics.py.
"""

import pytest
import torch
import torch.nn.functional as F

import torch_xegpu_attn
from torch_xegpu_attn.cache import stats


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def activity():
    """Everything that moves when the op compiles a kernel or fetches one from the cache."""
    return (torch_xegpu_attn.COUNTERS["compilations"], torch_xegpu_attn.COUNTERS["payloads_built"],
            stats()["memory_hits"], stats()["disk_hits"])


def sdpa_error(*args, **kwargs):
    """The exception SDPA raises for these arguments, or None if it accepts them."""
    try:
        F.scaled_dot_product_attention(*args, **kwargs)
    except Exception as error:  # noqa: BLE001  (any exception is the reference)
        return error
    return None


ENTRY_POINTS = {"attention": torch_xegpu_attn.attention, "op": torch.ops.xegpu.attention}


def check_rejected(exc, match, *args, same_as_sdpa=True, entry_points=("attention", "op"), **kwargs):
    """Each entry point raises `exc` matching `match` and touches no kernel; SDPA's type where SDPA raises."""
    reference = sdpa_error(*args, **kwargs)
    for name in entry_points:
        before = activity()
        with pytest.raises(exc, match=match) as info:
            ENTRY_POINTS[name](*args, **kwargs)
        assert activity() == before, f"{name}: a rejected input compiled or looked up a kernel"
        if reference is not None and same_as_sdpa:
            assert isinstance(info.value, type(reference)), (
                f"{name}: SDPA raises {type(reference).__name__} ({reference}), ours raises "
                f"{type(info.value).__name__} ({info.value})")


Q, KV = (1, 2, 4, 8), (1, 2, 5, 8)


# ----------------------------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("shapes", [((8,), (8,), (8,)), ((8,), (5, 8), (5, 8)), ((4, 8), (8,), (5, 8)),
                                    ((4, 8), (5, 8), (8,))], ids=["all", "query", "key", "value"])
def test_rank_below_two(shapes):
    check_rejected(RuntimeError, r"at least 2 dimensional", *[rand(*s) for s in shapes])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32, torch.float32)])
def test_dtype_mismatch(dtypes):
    q, k, v = (rand(*s, dtype=d) for s, d in zip((Q, KV, KV), dtypes))
    check_rejected(RuntimeError, r"same dtype", q, k, v)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.uint8])
def test_other_dtypes_unsupported(dtype):
    # SDPA's CPU backend takes float32, float64, float16 and bfloat16, and so does the op.
    q, k, v = (torch.ones(s).to(dtype) for s in (Q, KV, KV))
    check_rejected(Exception, r"float32, float16, bfloat16 and float64.*" + str(dtype)[6:], q, k, v,
                   same_as_sdpa=False)


def test_int32_unsupported():
    # SDPA raises RuntimeError ("expected scalar type Float but found Int"): ours must be a RuntimeError too.
    q, k, v = (torch.ones(s, dtype=torch.int32) for s in (Q, KV, KV))
    check_rejected(Exception, r"int32", q, k, v)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["query", "key", "value"])
def test_device_mismatch(which):
    tensors = [rand(*Q), rand(*KV), rand(*KV)]
    tensors[which] = tensors[which].to("meta")
    check_rejected(RuntimeError, r"same device.*meta", *tensors)


def test_head_dim_mismatch():
    check_rejected(RuntimeError, r"head dimension.*8.*16", rand(*Q), rand(1, 2, 5, 16), rand(*KV))


def test_sequence_length_mismatch_key_value():
    # SDPA on CPU does not check this (it returns a result); ours refuses.
    check_rejected(RuntimeError, r"key and value.*sequence length.*5.*6", rand(*Q), rand(*KV), rand(1, 2, 6, 8))


@pytest.mark.parametrize("q_shape,kv_shape", [((2, 2, 4, 8), (3, 2, 5, 8)),     # batch
                                              ((2, 3, 2, 4, 8), (2, 4, 2, 5, 8)),  # second batch dim
                                              ((1, 4, 4, 8), (1, 3, 5, 8)),     # heads, no enable_gqa
                                              ((1, 4, 4, 8), (1, 2, 5, 8))],    # GQA shape without the flag
                         ids=["batch", "batch_dim2", "heads", "gqa_without_flag"])
def test_shapes_do_not_broadcast(q_shape, kv_shape):
    check_rejected(RuntimeError, r"do not broadcast", rand(*q_shape), rand(*kv_shape), rand(*kv_shape))


@pytest.mark.parametrize("hq,hk,hv", [(6, 4, 4), (4, 3, 3), (8, 2, 3)])
def test_gqa_heads_do_not_divide(hq, hk, hv):
    check_rejected(RuntimeError, r"must divide the number of heads in query", rand(1, hq, 4, 8),
                   rand(1, hk, 5, 8), rand(1, hv, 5, 8), enable_gqa=True)


@pytest.mark.parametrize("mask_shape", [(4, 6), (3, 4, 5), (2, 1, 4, 5), (5, 4), (2, 1, 1, 4, 5)],
                         ids=["wrong_S", "wrong_heads", "batch_beyond_query", "transposed", "extra_dim"])
def test_attn_mask_does_not_broadcast(mask_shape):
    mask = torch.ones(mask_shape, dtype=torch.bool)
    check_rejected(RuntimeError, r"attn_mask", rand(*Q), rand(*KV), rand(*KV), attn_mask=mask)


def test_attn_mask_shape_checked_for_empty_problem():
    check_rejected(RuntimeError, r"attn_mask", rand(0, 2, 4, 8), rand(0, 2, 5, 8), rand(0, 2, 5, 8),
                   attn_mask=torch.ones(4, 6, dtype=torch.bool))


@pytest.mark.parametrize("mask_dtype,q_dtype", [(torch.int32, torch.float32), (torch.float16, torch.float32),
                                                (torch.uint8, torch.float32), (torch.float64, torch.float32),
                                                (torch.bfloat16, torch.float16)])
def test_attn_mask_wrong_dtype(mask_dtype, q_dtype):
    mask = torch.zeros(4, 5, dtype=mask_dtype)
    q, k, v = rand(*Q, dtype=q_dtype), rand(*KV, dtype=q_dtype), rand(*KV, dtype=q_dtype)
    check_rejected(RuntimeError, r"attn_mask dtype", q, k, v, attn_mask=mask)


def test_attn_mask_device_mismatch():
    mask = torch.ones(4, 5, dtype=torch.bool, device="meta")
    check_rejected(RuntimeError, r"attn_mask.*meta", rand(*Q), rand(*KV), rand(*KV), attn_mask=mask)


@pytest.mark.parametrize("kind", [torch.bool, torch.float32])
def test_attn_mask_with_is_causal(kind):
    mask = torch.ones(4, 5, dtype=kind)
    check_rejected(RuntimeError, r"attn_mask.*is_causal", rand(*Q), rand(*KV), rand(*KV), attn_mask=mask,
                   is_causal=True)


# -------------------------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("p", [0.1, 1.0])
def test_dropout_runs(p):
    # dropout (tests/test_dropout.py); p = 1 drops every probability: zeros, as SDPA
    out = torch_xegpu_attn.attention(rand(*Q), rand(*KV), rand(*KV), dropout_p=p)
    assert not out.isnan().any() and ((out == 0).all() if p == 1.0 else (out != 0).any())


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_out_of_range(p):
    # The brief asks for ValueError here although SDPA raises RuntimeError (see the report).
    check_rejected(ValueError, r"dropout_p must be in \[0, 1\]", rand(*Q), rand(*KV), rand(*KV), dropout_p=p,
                   same_as_sdpa=False)


@pytest.mark.parametrize("name,value,match", [
    ("query", [[1.0]], r"'query'.*Tensor.*list"),
    ("key", None, r"'key'.*Tensor.*NoneType"),
    ("value", 3.0, r"'value'.*Tensor.*float"),
    ("attn_mask", [[True]], r"'attn_mask'.*Tensor.*list"),
    ("dropout_p", "0", r"'dropout_p'.*float.*str"),
    ("scale", "1", r"'scale'.*float.*str"),
    ("is_causal", "yes", r"'is_causal'.*bool.*str"),
    ("is_causal", 1, r"'is_causal'.*bool.*int"),
    ("enable_gqa", 1, r"'enable_gqa'.*bool.*int"),
])
def test_wrong_argument_types(name, value, match):
    kwargs = {"query": rand(*Q), "key": rand(*KV), "value": rand(*KV), name: value}
    assert isinstance(sdpa_error(**kwargs), TypeError), "reference: SDPA raises TypeError here"
    check_rejected(TypeError, match, entry_points=("attention",), **kwargs)


def test_head_dim_zero():
    check_rejected(NotImplementedError, r"head dimension of 0", rand(1, 2, 4, 0), rand(1, 2, 5, 0), rand(*KV))


def test_a_valid_call_does_count():
    """Control for the `activity() == before` checks: a fresh valid problem moves the counters."""
    def lookups():  # exactly one of these moves per kernel fetch
        return torch_xegpu_attn.COUNTERS["compilations"] + stats()["disk_hits"] + stats()["memory_hits"]

    before, before_activity = lookups(), activity()
    q, k, v = rand(1, 1, 3, 8), rand(1, 1, 11, 8), rand(1, 1, 11, 8)
    out = torch_xegpu_attn.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert lookups() == before + 1 and activity() != before_activity


# ------------------------------------------------------------------------------------------------ empty

EMPTY = {
    "batch0": ((0, 2, 4, 8), (0, 2, 5, 8), (0, 2, 5, 8)),
    "batch0_broadcast": ((0, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8)),
    "L0": ((1, 2, 0, 8), (1, 2, 5, 8), (1, 2, 5, 8)),
    "Ev0": ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 0)),
    "heads0": ((1, 0, 4, 8), (1, 0, 5, 8), (1, 0, 5, 8)),
    "L0_2d": ((0, 8), (5, 8), (5, 8)),
    "S0": ((1, 2, 4, 8), (1, 2, 0, 8), (1, 2, 0, 8)),
    "S0_3d": ((3, 4, 8), (3, 0, 8), (3, 0, 6)),
    "S0_gqa": ((2, 4, 4, 8), (2, 2, 0, 8), (2, 2, 0, 8)),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty(case, is_causal, dtype):
    q, k, v = (rand(*s, dtype=dtype) for s in EMPTY[case])
    gqa = case.endswith("gqa")
    before = activity()
    ours = torch_xegpu_attn.attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    assert activity() == before, "an empty problem compiled or looked up a kernel"
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    assert ours.shape == sdpa.shape and ours.dtype == sdpa.dtype == dtype
    if case.startswith("S0"):
        assert ours.numel() > 0 and (sdpa == 0).all()
    torch.testing.assert_close(ours, sdpa, rtol=0, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_empty_keys_with_mask(mask_dtype):
    q, k, v = rand(2, 2, 4, 8), rand(2, 2, 0, 8), rand(2, 2, 0, 8)
    mask = torch.zeros(2, 1, 4, 0, dtype=mask_dtype)
    ours = torch_xegpu_attn.attention(q, k, v, attn_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.shape == sdpa.shape == (2, 2, 4, 8)
    torch.testing.assert_close(ours, sdpa, rtol=0, atol=0)
