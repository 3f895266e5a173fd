"""The cpu target against SDPA on calls drawn from SDPA's whole input space (tests/sdpa_cases.py).

The examples are drawn from a fixed seed; a failure is shrunk to a small case, saved in the
failure database (tests/hypothesis-db) and replayed first by the next run.  The cases found
by earlier searches stay below as explicit examples.  Budget: the profile's, per kind of
masking (30 examples each in the default "ci" profile; XEGPU_ATTN_HYPOTHESIS_PROFILE=deep
for 300).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sdpa_cases import MASKINGS, Case, cases, check_case, reproducible


@pytest.mark.parametrize("masking", MASKINGS)
@reproducible()
@given(data=st.data())
def test_matches_sdpa(masking, data):
    check_case(data.draw(cases(masking=masking), label="case"))


def test_scale_one():
    """Models that scale their queries themselves pass scale=1.0: a multiply by one that the
    payload's canonicalization erases must not leave the flash stage without its scale."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 32, generator=g) for _ in range(3))
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": torch.rand(70, 70, generator=g) > 0.3},
                   {"attn_mask": torch.randn(70, 70, generator=g)}):
        check_case(Case(q, k, v, {"scale": 1.0, **kwargs}))
    check_case(Case(q.half(), k.half(), v.half(), {"scale": 1.0, "is_causal": True}))
