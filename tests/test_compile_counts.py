"""Lengths are run-time arguments: loops over lengths compile a handful of kernels, not one per length.

A decoding loop (the key length grows by one per step) and a stream of prompts
of random lengths are the workloads that compiled at every call when lengths
were compiled in.  Each test starts from an empty memory and disk cache and
counts compilations (compiler.COUNTERS); every output is checked against SDPA.
"""

import random

import torch
import torch.nn.functional as F

import torch_xegpu_attn
from torch_xegpu_attn.compiler import COUNTERS


def close_to_sdpa(out, q, k, v, **kw):
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kw), atol=2e-5, rtol=2e-5)


def test_decode_loop_compiles_at_most_two_kernels(cache_dir, fresh_seed):
    # B=1, H=8, L=1, S = 100..299, E=64: the key/value cache grows by one each step.
    k_cache, v_cache = torch.randn(1, 8, 299, 64), torch.randn(1, 8, 299, 64)
    before = COUNTERS["compilations"]
    for s in range(100, 300):
        q = torch.randn(1, 8, 1, 64)
        k, v = k_cache[:, :, :s], v_cache[:, :, :s]  # views of the cache, read in place
        out = torch_xegpu_attn.attention(q, k, v)
        if s % 37 == 0:
            close_to_sdpa(out, q, k, v)
    assert COUNTERS["compilations"] - before <= 2


def test_gqa_decode_loop_compiles_one_kernel(cache_dir, fresh_seed):
    before = COUNTERS["compilations"]
    for s in range(50, 120):
        q, k, v = torch.randn(2, 8, 1, 32), torch.randn(2, 2, s, 32), torch.randn(2, 2, s, 32)
        out = torch_xegpu_attn.attention(q, k, v, enable_gqa=True)
        if s % 23 == 0:
            close_to_sdpa(out, q, k, v, enable_gqa=True)
    assert COUNTERS["compilations"] - before == 1


def test_random_prompt_lengths_compile_at_most_three_kernels(cache_dir, fresh_seed):
    # 50 prompts, L = S uniform in [1, 2048], causal (as a prefill), one head to keep it short.
    lengths = random.Random(fresh_seed).choices(range(1, 2049), k=50)
    lengths[:3] = [1, 7, 2048]  # one of each extreme for certain
    before = COUNTERS["compilations"]
    for n in lengths:
        q, k, v = torch.randn(1, 1, n, 64), torch.randn(1, 1, n, 64), torch.randn(1, 1, n, 64)
        out = torch_xegpu_attn.attention(q, k, v, is_causal=True)
        if n in lengths[:3]:
            close_to_sdpa(out, q, k, v, is_causal=True)
    assert COUNTERS["compilations"] - before <= 3


def test_batch_and_heads_are_run_time_too(cache_dir, fresh_seed):
    before = COUNTERS["compilations"]
    for b, h in [(1, 1), (3, 2), (2, 5), (4, 1)]:
        q, k, v = torch.randn(b, h, 40, 16), torch.randn(b, h, 70, 16), torch.randn(b, h, 70, 16)
        close_to_sdpa(torch_xegpu_attn.attention(q, k, v), q, k, v)
    assert COUNTERS["compilations"] - before == 1
