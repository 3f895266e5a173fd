"""PyTorch's own OpInfo samples of scaled_dot_product_attention (torch's test suite draws
them for every SDPA backend), dropout included, run through the op on the cpu target.

Each sample's output and its gradients of query, key and value are checked against the
float64 reference and SDPA's own error on the same inputs (`sdpa_cases.check_case` and
`check_gradients`).  A dropout sample is compared under the keep-mask the op draws
(`torch_xegpu_attn.dropout_mask` after the same `torch.manual_seed`): the reference and SDPA's
math backend (which takes a keep-mask for testing) apply that mask.  Every sample also passes
`torch.autograd.gradcheck` in float64.
"""

import pytest
import torch

import torch_xegpu_attn
from sdpa_cases import Case, check_case, check_gradients

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="torch's OpInfo database needs expecttest (requirements-test.txt)")
SDPA_INFO = next(info for info in common_methods_invocations.op_db
                 if info.name == "nn.functional.scaled_dot_product_attention")
DTYPES = sorted(SDPA_INFO.supported_dtypes("cpu"), key=str)


def _samples(dtype, seed):
    """The OpInfo samples for `dtype` (their tensors come from torch's default generator)."""
    torch.manual_seed(seed)
    return list(SDPA_INFO.sample_inputs("cpu", dtype, requires_grad=True))


def _sample_id(sample) -> str:
    kwargs = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sample.kwargs.items()}
    return f"q{tuple(sample.input.shape)} kv{tuple(sample.args[0].shape)} {kwargs}"


def _checked_call(sample, seed):
    """(case, run, keep) for one sample: the op reseeded to `seed` before each call, so that a
    dropout sample draws one keep-mask, `keep` (None without dropout)."""
    case = Case(sample.input.detach(), sample.args[0].detach(), sample.args[1].detach(), dict(sample.kwargs))

    def run(*args, **kwargs):
        torch.manual_seed(seed)
        return torch_xegpu_attn.attention(*args, **kwargs)
    p = case.kwargs.get("dropout_p", 0.0)
    if p == 0:
        return case, run, None
    out_shape = torch.broadcast_shapes(case.q.shape[:-2], case.k.shape[:-2]) + (case.q.size(-2), case.k.size(-2))
    torch.manual_seed(seed)
    return case, run, torch_xegpu_attn.dropout_mask(out_shape, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_samples_match_reference(dtype, fresh_seed):
    samples = _samples(dtype, fresh_seed)
    assert any(s.kwargs.get("dropout_p", 0) > 0 for s in samples)  # dropout samples run, not refused
    for index, sample in enumerate(samples):
        case, run, keep = _checked_call(sample, fresh_seed + index)
        try:
            assert check_case(case, run, keep=keep) is not None
            assert check_gradients(case, run, keep=keep) is not None
        except AssertionError as error:
            raise AssertionError(f"OpInfo sample {index}: {_sample_id(sample)}: {error}") from error


def test_samples_gradcheck(fresh_seed):
    """gradcheck (float64) of every sample with respect to query, key and value.  The sample
    with an additive mask that requires grad: its mask's gradient is refused (NotImplementedError,
    tests/test_gradients.py), so it is checked detached."""
    for index, sample in enumerate(_samples(torch.float64, fresh_seed)):
        kwargs = dict(sample.kwargs)
        if kwargs.get("attn_mask") is not None:
            kwargs["attn_mask"] = kwargs["attn_mask"].detach()

        def fn(q, k, v, seed=fresh_seed + index):
            torch.manual_seed(seed)  # a dropout sample keeps one mask over gradcheck's evaluations
            return torch_xegpu_attn.attention(q, k, v, **kwargs)
        assert torch.autograd.gradcheck(fn, [sample.input, *sample.args], fast_mode=True), \
            f"OpInfo sample {index}: {_sample_id(sample)}"
