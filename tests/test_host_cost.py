"""The host cost of a cache-hit call stays within 1.5x SDPA's, through both entry points.

benchmarks/bench_host.py's measurement (the three entry points interleaved,
median of batches), on its tiny problem; the outputs are checked against SDPA
first.  The calls timed must be replays of the recorded call.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_xegpu_attn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_host  # noqa: E402


def test_cache_hit_costs_at_most_one_and_a_half_sdpa(fresh_seed):
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(torch_xegpu_attn.attention(q, k, v), sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.xegpu.attention(q, k, v), sdpa, rtol=1e-5, atol=1e-5)
    replays = torch_xegpu_attn.stats()["replays"]
    medians = bench_host.measure(q, k, v, batches=15, calls=200)
    assert torch_xegpu_attn.stats()["replays"] - replays >= 2 * 15 * 200, "the timed calls were not replays"
    base = medians["F.scaled_dot_product_attention"]
    for name in ("torch_xegpu_attn.attention", "torch.ops.xegpu.attention"):
        assert medians[name] <= 1.5 * base, f"{name}: {medians[name]:.2f} us > 1.5 x SDPA's {base:.2f} us"
