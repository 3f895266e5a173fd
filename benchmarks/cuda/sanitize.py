"""Small tail-heavy calls of the nvvm kernels for compute-sanitizer (memcheck / racecheck /
synccheck): partial tiles, masks, causal straddles, decode splits, each checked then replayed
(benchmarks/cuda/run_on_gpu.sh); training steps (forward_lse, then the backward's Delta, dQ and
dK/dV kernels) on the same kinds of tails.  Arguments: substrings of the case names to run
(default all)."""
import sys

import torch
import torch_xegpu_attn as t


def r(*s, dtype=torch.float16):
    return torch.randn(*s, dtype=dtype, device="cuda")


def train(q, k, v, **kw):
    """A training step: the forward that saves the log-sum-exp, the backward; returns dq."""
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = t.attention(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), torch.randn_like(out))[0]

torch.manual_seed(0)
mask = torch.rand(2, 3, 37, 70, device="cuda") > 0.4
mask[:, :, 5] = False
cases = [
    ("train e64 causal 1000x1000", lambda: train(r(2, 4, 1000, 64), r(2, 4, 1000, 64), r(2, 4, 1000, 64), is_causal=True)),
    ("train e64 300x100 causal (rows that see no key)", lambda: train(r(2, 4, 300, 64), r(2, 4, 100, 64), r(2, 4, 100, 64), is_causal=True)),
    ("train e64 1x700 (split-key forward)", lambda: train(r(2, 4, 1, 64), r(2, 4, 700, 64), r(2, 4, 700, 64))),
    ("train bf16 gqa 8/2 150x150 causal", lambda: train(r(2, 8, 150, 64, dtype=torch.bfloat16), r(2, 2, 150, 64, dtype=torch.bfloat16), r(2, 2, 150, 64, dtype=torch.bfloat16), is_causal=True, enable_gqa=True)),
    ("train bool mask 37x70 (a row sees no key)", lambda: train(r(2, 3, 37, 64), r(2, 3, 70, 64), r(2, 3, 70, 64), attn_mask=mask)),
    ("train e32 ev64 133x200 causal", lambda: train(r(2, 2, 133, 32), r(2, 2, 200, 32), r(2, 2, 200, 64), is_causal=True)),
    ("train dropout 0.1 gqa 6/2 100x130", lambda: train(r(2, 6, 100, 64), r(2, 2, 130, 64), r(2, 2, 130, 64), dropout_p=0.1, enable_gqa=True)),
    ("train e128 bf16 300x333 (wgmma, tiles copied once a step's first product is issued)", lambda: train(r(1, 2, 300, 128, dtype=torch.bfloat16), r(1, 2, 333, 128, dtype=torch.bfloat16), r(1, 2, 333, 128, dtype=torch.bfloat16))),
    ("train f32 e64 200x200 causal", lambda: train(r(2, 3, 200, 64, dtype=torch.float32), r(2, 3, 200, 64, dtype=torch.float32), r(2, 3, 200, 64, dtype=torch.float32), is_causal=True)),
    ("prefill e64 causal 100x257", lambda: t.attention(r(1, 2, 100, 64), r(1, 2, 257, 64), r(1, 2, 257, 64), is_causal=True)),
    ("prefill e64 causal 3x7 heads 300x300 (head chunks: 16 + 5)", lambda: t.attention(r(3, 7, 300, 64), r(3, 7, 300, 64), r(3, 7, 300, 64), is_causal=True)),
    ("prefill e64 100x30 (no full key tile)", lambda: t.attention(r(1, 2, 100, 64), r(1, 2, 30, 64), r(1, 2, 30, 64))),
    ("prefill e64 257x100", lambda: t.attention(r(1, 2, 257, 64), r(1, 2, 100, 64), r(1, 2, 100, 64))),
    ("prefill e128 bf16 causal 129x300", lambda: t.attention(r(1, 2, 129, 128, dtype=torch.bfloat16), r(1, 2, 300, 128, dtype=torch.bfloat16), r(1, 2, 300, 128, dtype=torch.bfloat16), is_causal=True)),
    ("prefill e128 300x333 (wgmma, 128-key tiles)", lambda: t.attention(r(1, 2, 300, 128), r(1, 2, 333, 128), r(1, 2, 333, 128))),
    ("prefill e256 70x70", lambda: t.attention(r(1, 1, 70, 256), r(1, 1, 70, 256), r(1, 1, 70, 256))),
    ("bool mask per batch 37x70", lambda: t.attention(r(2, 3, 37, 64), r(2, 3, 70, 64), r(2, 3, 70, 64), attn_mask=torch.rand(2, 1, 37, 70, device="cuda") > 0.4)),
    ("decode gqa 1000", lambda: t.attention(r(3, 32, 1, 128, dtype=torch.bfloat16), r(3, 8, 1000, 128, dtype=torch.bfloat16), r(3, 8, 1000, 128, dtype=torch.bfloat16), enable_gqa=True)),
    ("decode gqa 2500 (20 splits: the combine's remainder loop)", lambda: t.attention(r(1, 32, 1, 128, dtype=torch.bfloat16), r(1, 8, 2500, 128, dtype=torch.bfloat16), r(1, 8, 2500, 128, dtype=torch.bfloat16), enable_gqa=True)),
    ("decode gqa 63 (prefill class)", lambda: t.attention(r(1, 32, 1, 128, dtype=torch.bfloat16), r(1, 8, 63, 128, dtype=torch.bfloat16), r(1, 8, 63, 128, dtype=torch.bfloat16), enable_gqa=True)),
    ("decode mha 7x7 causal", lambda: t.attention(r(1, 2, 7, 64), r(1, 2, 7, 64), r(1, 2, 7, 64), is_causal=True)),
    ("f32 prefill e64 causal 100x257", lambda: t.attention(r(1, 2, 100, 64, dtype=torch.float32), r(1, 2, 257, 64, dtype=torch.float32), r(1, 2, 257, 64, dtype=torch.float32), is_causal=True)),
    ("f32 prefill e64 additive mask 37x70", lambda: t.attention(r(2, 2, 37, 64, dtype=torch.float32), r(2, 2, 70, 64, dtype=torch.float32), r(2, 2, 70, 64, dtype=torch.float32), attn_mask=r(37, 70, dtype=torch.float32))),
    ("f32 decode e256 1000", lambda: t.attention(r(1, 4, 1, 256, dtype=torch.float32), r(1, 4, 1000, 256, dtype=torch.float32), r(1, 4, 1000, 256, dtype=torch.float32))),
]
wanted = sys.argv[1:]
for name, fn in cases:
    if wanted and not any(w in name for w in wanted):
        continue
    for run in ("checked", "replayed"):  # the second call of a signature is replayed in C++
        out = fn()
        torch.cuda.synchronize()
        print(name, run, "ok", tuple(out.shape), bool(out.isfinite().all()))
