"""Draw bench_cuda.py's CSV: prefill TFLOPS per head dim / dtype / causality (ours next to SDPA's
backends) and the decode times.  Needs matplotlib (not a dependency of the package).

    python benchmarks/plot_bench.py results.csv out.png
"""

import csv
import sys


def main(path: str, out: str) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        rows = list(csv.DictReader(f))
    prefill = [r for r in rows if r["kind"] == "prefill"]
    groups = sorted({(r["dtype"], r["D"], r["causal"]) for r in prefill})
    fig, axes = plt.subplots(2, (len(groups) + 1) // 2 + 1, figsize=(4 * ((len(groups) + 1) // 2 + 1), 7))
    axes = axes.flatten()
    for ax, (dtype, d, causal) in zip(axes, groups):
        sel = sorted((r for r in prefill if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)),
                     key=lambda r: int(r["L"]))
        n = [int(r["L"]) for r in sel]
        for name, style in (("ours", "o-"), ("flash", "s--"), ("cudnn", "^--"), ("efficient", "v:")):
            values = [float(r[f"{name}_tflops"]) if r[f"{name}_tflops"] else None for r in sel]
            if any(v is not None for v in values):
                ax.plot(n, values, style, label=name if name != "ours" else "xegpu::attention")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} D={d} {'causal' if causal == 'True' else 'non-causal'}", fontsize=9)
        ax.set_xlabel("N = L = S")
        ax.set_ylabel("TFLOPS")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    decode = [r for r in rows if r["kind"] == "decode"]
    ax = axes[len(groups)]
    labels = [f"B={r['B']}\nS={r['S']}" for r in decode]
    width = 0.25
    for i, name in enumerate(("ours", "flash", "cudnn")):
        ax.bar([x + (i - 1) * width for x in range(len(decode))],
               [float(r[f"{name}_ms"]) * 1e3 if r[f"{name}_ms"] else 0 for r in decode], width,
               label=name if name != "ours" else "xegpu::attention")
    ax.set_xticks(range(len(decode)), labels, fontsize=7)
    ax.set_ylabel("us per call (decode, bf16, D=128, GQA 32/8)")
    ax.legend(fontsize=7)
    for extra in axes[len(groups) + 1:]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
