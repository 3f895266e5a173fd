"""Host cost of one cache-hit CUDA call, stage by stage (medians of 2000 calls)."""
import statistics, time, torch, torch_xegpu_attn as t
import torch.nn.functional as F
from torch_xegpu_attn import frontend
from torch_xegpu_attn.cache import CACHE
def med(fn, n=2000):
    for _ in range(100): fn()
    torch.cuda.synchronize()
    xs = []
    for _ in range(n):
        s = time.perf_counter(); fn(); xs.append(time.perf_counter() - s)
    torch.cuda.synchronize()
    return statistics.median(xs) * 1e6
for shape in ((1, 1, 16, 64), (1, 1, 32, 64)):
    q = torch.randn(*shape, dtype=torch.float16, device="cuda")
    t.attention(q, q, q)
    plan = frontend.plan(q, q, q)
    kernel = CACHE.get(plan.spec)
    print(shape, plan.spec.short_name(), {
        "attention()": round(med(lambda: t.attention(q, q, q)), 1),
        "torch.ops": round(med(lambda: torch.ops.xegpu.attention(q, q, q)), 1),
        "frontend.plan": round(med(lambda: frontend.plan(q, q, q)), 1),
        "CACHE.get": round(med(lambda: CACHE.get(plan.spec)), 1),
        "kernel(operands)": round(med(lambda: kernel(plan.operands)), 1),
        "torch.empty": round(med(lambda: torch.empty(shape, dtype=q.dtype, device="cuda")), 1),
        "SDPA": round(med(lambda: F.scaled_dot_product_attention(q, q, q)), 1)}, flush=True)
