"""Decode timings of the current XEGPU_ATTN_SCHEDULE (bf16, D=128, GQA 32/8) next to SDPA's cuDNN and flash."""
import os, torch, torch_xegpu_attn as t
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
rows = []
for b, s in ((1, 1024), (1, 4096), (1, 32768), (8, 4096), (8, 32768)):
    q = torch.randn(b, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(b, 8, s, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out = t.attention(q, k, v, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    err = (out.float() - ref).abs().max().item()
    ours = do_bench(lambda: t.attention(q, k, v, enable_gqa=True), warmup=25, rep=100, return_mode="median")
    # the GPU time alone: a CUDA graph of 20 calls removes the host cost
    g = torch.cuda.CUDAGraph()
    s_ = torch.cuda.Stream(); s_.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s_):
        t.attention(q, k, v, enable_gqa=True)
    torch.cuda.current_stream().wait_stream(s_)
    with torch.cuda.graph(g):
        for _ in range(20): torch.ops.xegpu.attention(q, k, v, enable_gqa=True)
    graph = do_bench(lambda: g.replay(), warmup=5, rep=50, return_mode="median") / 20
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), warmup=25, rep=100, return_mode="median")
    print(f"{os.environ.get('XEGPU_ATTN_SCHEDULE', '{}'):40} B={b} S={s:6d} ours {ours*1e3:7.1f} us  ours(graph) {graph*1e3:7.1f} us  cudnn {cudnn*1e3:7.1f} us  err {err:.2e}", flush=True)
