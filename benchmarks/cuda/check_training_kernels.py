"""The nvvm training kernels called directly, each gradient against a float64 reference.

torch.ops.xegpu.attention_with_lse (output, log-sum-exp) and attention_backward (dq, dk, dv, fed
the reference's output and log-sum-exp, so each kernel is judged on its own) on small float16
problems: one and several key tiles, head dims 16 to 128, causal with tails.  Prints each
result's max abs error next to its largest magnitude and the query/key rows an error sits in
(what tells a race in one warp's rows from a wrong formula).  Not a test: the bounds are in
tests/test_nvvm_gpu.py.

    python benchmarks/cuda/check_training_kernels.py --precompile sm_90a   # here: fill the cache
    python benchmarks/cuda/check_training_kernels.py                        # on the GPU machine
"""
import math
import sys

import torch

import torch_xegpu_attn

#: (B, H, L, S, E, causal)
CONFIGS = [(1, 1, 64, 64, 16, False), (1, 1, 64, 64, 64, False), (1, 1, 128, 128, 64, False),
           (1, 2, 200, 200, 64, True), (1, 1, 64, 64, 128, False)]


def reference(q, k, v, causal):
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def main(argv) -> int:
    arch = argv[argv.index("--precompile") + 1] if "--precompile" in argv else ""
    device = "meta" if arch else "cuda"
    torch.manual_seed(0)
    for config in CONFIGS:
        try:
            check(*config, arch, device)
        except Exception as error:  # noqa: BLE001  (a schedule variant, XEGPU_ATTN_SCHEDULE, may not take it)
            print(f"{config}: {type(error).__name__}: {str(error).splitlines()[0]}")
    return 0


def check(b, h, l, s, e, causal, arch, device) -> None:
    """Build (arch given: precompile) or run and check one case."""
    q, k, v = (torch.randn(b, h, n, e, dtype=torch.float16, device=device) for n in (l, s, s))
    if arch:
        for kernel in ("forward_lse", "backward"):
            torch_xegpu_attn.precompile(q, k, v, is_causal=causal, target="nvvm", arch=arch, kernel=kernel)
        return
    out, lse, seed = torch.ops.xegpu.attention_with_lse(q, k, v, None, 0.0, causal, None, False)
    torch.cuda.synchronize()
    ref_out, ref_lse = reference(q, k, v, causal)
    print(f"B={b} H={h} L={l} S={s} E={e} causal={causal}: out {(out.double().cpu() - ref_out).abs().max():.2e}, "
          f"lse {(lse.double().cpu() - ref_lse).abs().max():.2e}")
    leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(b, h, l, e, dtype=torch.float16, device=device)
    expected = torch.autograd.grad(reference(*leaves, causal)[0], leaves, dout.double().cpu())
    grads = torch.ops.xegpu.attention_backward(dout, None, q, k, v, None, ref_out.float().cuda(),
                                               ref_lse.float().cuda(), seed, 0.0, causal, None, False)
    torch.cuda.synchronize()
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        error = (got.double().cpu() - want).abs()
        rows = (error.amax(-1) > 1e-2 * want.abs().max()).nonzero()[:, -1].unique().tolist()
        print(f"    {name}: {error.max():.2e} of {want.abs().max():.2e}; rows off by > 1%: {rows[:40]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
