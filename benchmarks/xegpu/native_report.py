"""Per kernel variant of the xegpu target: compile time, and what Intel's offline compiler
makes of its SPIR-V for pvc and bmg (GRF mode, spills, DPAS, 2D block messages, instructions
of the whole kernel and of one flash-loop step).  Needs the toolchain of scripts/setup_xegpu.sh.

    .venv/bin/python benchmarks/xegpu/native_report.py
"""

import time
from dataclasses import replace

from torch_xegpu_attn.compiler import CompileReport, compile_spec
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec
from torch_xegpu_attn.targets import get_target
from torch_xegpu_attn.targets import xegpu as xegpu_target
from torch_xegpu_attn.targets.xegpu import toolchain

BASE = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float16", target="xegpu", length_class="prefill")
VARIANTS = {
    "f16 e64": BASE,
    "f16 e64 causal": replace(BASE, causal=True),
    "bf16 e64": replace(BASE, dtype="bfloat16"),
    "f16 e64 gqa4": replace(BASE, group=4),
    "f16 e32": replace(BASE, head_dim=32, v_head_dim=32),
    "f16 e128": replace(BASE, head_dim=128, v_head_dim=128),
    "bf16 e128": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16"),
    "f16 e128 causal": replace(BASE, head_dim=128, v_head_dim=128, causal=True),
    "f16 e64 ev128 causal": replace(BASE, v_head_dim=128, causal=True),
    "f16 e64 bool mask (l, s)": replace(BASE, mask=MaskSpec("bool", ("l", "s"), "bool")),
    "f16 e64 f32 mask (b, h, l, s)": replace(BASE, mask=MaskSpec("additive", ("b", "h", "l", "s"), "float32")),
    "f16 e64 bool mask (b, s)": replace(BASE, mask=MaskSpec("bool", ("b", "s"), "bool")),
    "bf16 e128 bf16 mask (l)": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16",
                                       mask=MaskSpec("additive", ("l",), "bfloat16")),
    "bf16 e96 causal": replace(BASE, head_dim=96, v_head_dim=96, dtype="bfloat16", causal=True),
    "f16 e64 decode gqa4": replace(BASE, group=4, length_class="decode"),
    "bf16 e128 decode": replace(BASE, head_dim=128, v_head_dim=128, dtype="bfloat16", length_class="decode"),
}


def main() -> None:
    print(f"ocloc {toolchain.ocloc_version()}")
    target = get_target("xegpu")
    print("| variant | work-group (rows x sub-groups, kv tile) | compile s | device | GRF | spill B | dpas | "
          "block loads / prefetches / stores | instructions | loop step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, spec in VARIANTS.items():
        report = CompileReport()
        start = time.perf_counter()
        artifact = compile_spec(spec, report=report)
        seconds = time.perf_counter() - start
        geometry = xegpu_target._geometry(spec, target.options_for(spec).schedule)
        shape = f"{geometry.rows} x {geometry.subgroups} ({geometry.sg_rows} rows each), kv {geometry.kv_tile}"
        for device in ("pvc", "bmg"):
            n = toolchain.native(artifact.binary, device, large_grf=True)
            print(f"| {name} | {shape} | {seconds:.2f} | {device} | {n['grf']} | {n['spill_bytes']} | {n['dpas']} | "
                  f"{n['block_loads']} / {n['block_prefetches']} / {n['block_stores']} | {n['instructions']} | "
                  f"{n['loop_step_instructions']} |")


if __name__ == "__main__":
    main()
