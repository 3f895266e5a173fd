"""Per kernel variant of the xegpu target: compile time, and what Intel's offline compiler
makes of its SPIR-V for pvc and bmg in the register-file mode the kernel asks for (spills, DPAS,
2D block messages, instructions of the whole kernel and of one flash-loop step).  Needs the
toolchain of scripts/setup_xegpu.sh.  Prints the README's table (pvc / bmg side by side) and,
with --detail, one line per device.

    .venv/bin/python benchmarks/xegpu/native_report.py [--detail] [--only SUBSTRING]
"""

import argparse
import time
from dataclasses import replace

from torch_xegpu_attn.compiler import CompileReport, compile_spec
from torch_xegpu_attn.spec import AttentionSpec, MaskSpec
from torch_xegpu_attn.targets import get_target
from torch_xegpu_attn.targets import xegpu as xegpu_target
from torch_xegpu_attn.targets.xegpu import toolchain

BASE = AttentionSpec(group=1, head_dim=64, v_head_dim=64, dtype="float16", target="xegpu", length_class="prefill")


def _dims(e: int, ev: int = 0) -> dict:
    return {"head_dim": e, "v_head_dim": ev or e}


VARIANTS = {
    "f16 e64": BASE,
    "f16 e64 causal": replace(BASE, causal=True),
    "bf16 e64": replace(BASE, dtype="bfloat16"),
    "f16 e64 gqa4": replace(BASE, group=4),
    "f16 e32": replace(BASE, **_dims(32)),
    "f16 e128": replace(BASE, **_dims(128)),
    "bf16 e128": replace(BASE, **_dims(128), dtype="bfloat16"),
    "f16 e128 causal": replace(BASE, **_dims(128), causal=True),
    "f16 e64 ev128 causal": replace(BASE, v_head_dim=128, causal=True),
    "f16 e64 bool mask (l, s)": replace(BASE, mask=MaskSpec("bool", ("l", "s"), "bool")),
    "f16 e64 f32 mask (b, h, l, s)": replace(BASE, mask=MaskSpec("additive", ("b", "h", "l", "s"), "float32")),
    "f16 e64 bool mask (b, s)": replace(BASE, mask=MaskSpec("bool", ("b", "s"), "bool")),
    "bf16 e128 bf16 mask (l)": replace(BASE, **_dims(128), dtype="bfloat16",
                                       mask=MaskSpec("additive", ("l",), "bfloat16")),
    "bf16 e96 causal": replace(BASE, **_dims(96), dtype="bfloat16", causal=True),
    "f16 e64 decode gqa4": replace(BASE, group=4, length_class="decode"),
    "bf16 e128 decode": replace(BASE, **_dims(128), dtype="bfloat16", length_class="decode"),
    # every other multiple of 16 up to 256
    **{f"f16 e{e}": replace(BASE, **_dims(e)) for e in (16, 48, 80, 112, 144, 160, 176, 192, 208, 224, 240, 256)},
    "f16 e16 bool mask (l, s)": replace(BASE, **_dims(16), mask=MaskSpec("bool", ("l", "s"), "bool")),
    "bf16 e48 causal": replace(BASE, **_dims(48), dtype="bfloat16", causal=True),
    "f16 e80 ev48 bool mask (l, s)": replace(BASE, **_dims(80, 48), mask=MaskSpec("bool", ("l", "s"), "bool")),
    "f16 e176 ev144 causal": replace(BASE, **_dims(176, 144), causal=True),
    "bf16 e176 bool mask (l, s)": replace(BASE, **_dims(176), dtype="bfloat16",
                                          mask=MaskSpec("bool", ("l", "s"), "bool")),
    "bf16 e256 causal": replace(BASE, **_dims(256), dtype="bfloat16", causal=True),
    "f16 e256 f32 mask (b, h, l, s)": replace(BASE, **_dims(256),
                                              mask=MaskSpec("additive", ("b", "h", "l", "s"), "float32")),
    "f16 e32 decode": replace(BASE, **_dims(32), length_class="decode"),
    "bf16 e256 decode gqa2": replace(BASE, **_dims(256), dtype="bfloat16", group=2, length_class="decode"),
    # float32: DPAS on bf16 parts (targets/xegpu/f32.py)
    "f32 e32": replace(BASE, **_dims(32), dtype="float32"),
    "f32 e64": replace(BASE, dtype="float32"),
    "f32 e64 causal": replace(BASE, dtype="float32", causal=True),
    "f32 e64 bool mask (l, s)": replace(BASE, dtype="float32", mask=MaskSpec("bool", ("l", "s"), "bool")),
    "f32 e80": replace(BASE, **_dims(80), dtype="float32"),
    "f32 e128": replace(BASE, **_dims(128), dtype="float32"),
    "f32 e256": replace(BASE, **_dims(256), dtype="float32"),
    "f32 e64 decode": replace(BASE, dtype="float32", length_class="decode"),
    # dropout: the generator's ten Philox rounds on every score
    "f16 e64 dropout": replace(BASE, dropout_p=0.1),
    "bf16 e128 causal dropout": replace(BASE, **_dims(128), dtype="bfloat16", causal=True, dropout_p=0.1),
    "f16 e256 dropout": replace(BASE, **_dims(256), dropout_p=0.1),
}


def work_group(spec: AttentionSpec) -> str:
    geometry = xegpu_target._geometry(spec, get_target("xegpu").options_for(spec).schedule)
    if geometry.subgroups == 1:
        shape = f"{geometry.rows} rows, 1 sub-group"
    else:
        shape = f"{geometry.rows} rows, {geometry.subgroups} sub-groups x {geometry.sg_rows} rows"
    shape += f", {geometry.kv_tile}-key steps"
    if geometry.reload_q:
        shape += ", Q re-read per step"
    return shape


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--detail", action="store_true", help="one line per device, with the compile time")
    parser.add_argument("--only", default="", help="the variants whose name contains this")
    args = parser.parse_args()
    print(f"ocloc {toolchain.ocloc_version()}")
    if args.detail:
        print("| variant | work-group | compile s | device | GRF | spill B | dpas | "
              "block loads / prefetches / stores | instructions | loop step |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    else:
        print("| variant | work-group | GRF | device | spills | dpas | 2D loads / prefetches / stores | "
              "instructions | loop step |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, spec in VARIANTS.items():
        if args.only not in name:
            continue
        report = CompileReport()
        start = time.perf_counter()
        artifact = compile_spec(spec, report=report)
        seconds = time.perf_counter() - start
        large = artifact.metadata["large_grf"]
        found = {device: toolchain.native(artifact.binary, device, large_grf=large) for device in ("pvc", "bmg")}
        if args.detail:
            for device, n in found.items():
                print(f"| {name} | {work_group(spec)} | {seconds:.2f} | {device} | {n['grf']} | {n['spill_bytes']} | "
                      f"{n['dpas']} | {n['block_loads']} / {n['block_prefetches']} / {n['block_stores']} | "
                      f"{n['instructions']} | {n['loop_step_instructions']} |")
            continue
        p, b = found["pvc"], found["bmg"]

        def both(key):
            return str(p[key]) if p[key] == b[key] else f"{p[key]} / {b[key]}"

        messages = " / ".join(both(k) for k in ("block_loads", "block_prefetches", "block_stores"))
        print(f"| {name} | {work_group(spec)} | {p['grf']} | pvc / bmg | {p['spill_bytes']} / {b['spill_bytes']} | "
              f"{both('dpas')} | {messages} | {p['instructions']} / {b['instructions']} | "
              f"{p['loop_step_instructions']} / {b['loop_step_instructions']} |", flush=True)


if __name__ == "__main__":
    main()
