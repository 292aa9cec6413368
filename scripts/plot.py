"""Plots from a sweep (scripts/sweep.py): quality vs effective weight sparsity (Pareto
curves, all methods on one chart) and the measured per-layer sparsity of each point.

    python scripts/plot.py results/sweep_smollm2.json [--out-dir results/plots]
"""
import argparse
import json
from pathlib import Path


def make_plots(sweep_json, out_dir) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.loads(Path(sweep_json).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    metrics = [k for k in ("perplexity",) + tuple(k for k in rows[0] if k.endswith("_acc")) if
               any(r.get(k) is not None for r in rows)]
    methods = sorted({r["method"] for r in rows if r["method"] != "dense"})
    dense = next((r for r in rows if r["method"] == "dense"), None)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for m in methods:
            pts = sorted((r["effective_sparsity"], r[metric]) for r in rows if r["method"] == m and r.get(metric))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if dense is not None and dense.get(metric) is not None:
            ax.axhline(dense[metric], color="gray", ls="--", label="dense")
        ax.set_xlabel("effective weight sparsity (projection bytes skipped per decode step)")
        ax.set_ylabel(metric)
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "pareto.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.get("per_layer"):
            layers = sorted(int(k) for k in r["per_layer"])
            vals = [sum(r["per_layer"][str(i)].values()) / len(r["per_layer"][str(i)]) for i in layers]
            ax.plot(layers, vals, label=f"{r['method']} {r['level']}")
    ax.set_xlabel("layer")
    ax.set_ylabel("measured sparsity (mean over sites)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p = out_dir / "per_layer_sparsity.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    p = out_dir / "results.md"
    p.write_text(results_table(rows))
    written.append(p)
    return written


def results_table(rows) -> str:
    """Markdown: one row per sweep point."""
    accs = [k for k in rows[0] if k.endswith("_acc")]
    head = ["method", "level", "tokens", "effective sparsity", "perplexity"] + accs + ["measured by site"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['level']:.2f}", r["tokens"], f"{r['effective_sparsity']:.3f}",
                 f"{r['perplexity']:.2f}" if r.get("perplexity") else "-"]
        cells += [f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in accs]
        cells.append(", ".join(f"{k} {v:.2f}" for k, v in (r.get("measured") or {}).items()) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep_json")
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    out = a.out_dir or str(Path(a.sweep_json).parent / "plots")
    for p in make_plots(a.sweep_json, out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
