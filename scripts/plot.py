"""Plots: quality vs effective weight sparsity from a sweep (Pareto curves, all methods on
one chart, plus the measured per-layer sparsity of each point); per-layer thresholds of
sparsity configs; activation histograms from --dump-activations traces.

    python scripts/plot.py results/sweep_smollm2.json [more sweeps ...] [--out-dir results/plots]
    python scripts/plot.py --configs configs/teal50.sparsity configs/cats50.sparsity --out-dir results/plots
    python scripts/plot.py --dump traces/teal0 --out-dir results/plots   # generate.py/eval.py --dump-activations
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    """fig as a PNG at path, written atomically (sparsity.write_atomic: never half an image), then closed."""
    import sparsity as sp
    sp.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)
    return Path(path)


def plot_thresholds(config_paths, out_dir) -> list:
    """thresholds.png: per-layer threshold of every thresholded site, one panel per config;
    theta.png: Top-Theta thresholds theta(n) per head of the first and last layer."""
    import sparsity as sp
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfgs = [(Path(c).stem, sp.load_config(c)) for c in config_paths]
    written = []
    with_sites = [(n, c) for n, c in cfgs if any(k.endswith(".threshold") for k in c.tensors)]
    fig, axes = plt.subplots(1, max(1, len(with_sites)), figsize=(5.5 * max(1, len(with_sites)), 4), squeeze=False)
    for ax, (name, cfg) in zip(axes[0], with_sites):
        n_layers = len(cfg.header["layers"])
        keys = sorted({m.group(2) for k in cfg.tensors if (m := re.fullmatch(r"layers\.(\d+)\.(.+)\.threshold", k))})
        for site in keys:
            ys = [float(cfg.tensors[f"layers.{i}.{site}.threshold"]) if f"layers.{i}.{site}.threshold" in cfg.tensors
                  else float("nan") for i in range(n_layers)]
            ax.plot(range(n_layers), ys, marker=".", label=site)
        ax.set_title(f"{name} ({cfg.header.get('method') or cfg.header.get('attention')})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("threshold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "thresholds.png"))
    thetas = [(name, cfg) for name, cfg in cfgs if any(k.endswith(".theta") for k in cfg.tensors)]
    if thetas:
        name, cfg = thetas[0]
        layers = sorted(int(k.split(".")[1]) for k in cfg.tensors if k.endswith(".theta"))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, i in zip(axes, (layers[0], layers[-1])):
            table = cfg.tensors[f"layers.{i}.theta"]  # (H, N), -inf where rows stay dense
            for h in range(table.shape[0]):
                ax.plot(range(1, table.shape[1] + 1), table[h].numpy(), lw=0.8)
            ax.set_title(f"{name}: Top-Theta thresholds, layer {i} (one line per head)", fontsize=9)
            ax.set_xlabel("visible keys n")
            ax.set_ylabel("theta")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "theta.png"))
    return written


def plot_histograms(dump_dir, out_dir, layers=None) -> list:
    """histograms.png: distribution of each site's input over the dumped tokens (safetensors
    files from --dump-activations), a few layers per panel, log-count axis. Dumped inputs are
    the sparsified ones: calibrate a config at sparsity 0 to see the dense distributions."""
    from safetensors.torch import load_file
    import torch
    plt = _plt()
    files = sorted(Path(dump_dir).glob("token_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no token_*.safetensors in {dump_dir}; write them with --dump-activations")
    data = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            data.setdefault(k, []).append(v.flatten())
    data = {k: torch.cat(v) for k, v in data.items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in data)
    layers = layers or sorted({0, n_layers // 2, n_layers - 1})
    sites = sorted({k.split(".", 2)[2] for k in data}, key=lambda s: "qkvo gate up down mlp_coeff".find(s))
    fig, axes = plt.subplots(1, len(sites), figsize=(3.6 * len(sites), 3.4), squeeze=False)
    for ax, site in zip(axes[0], sites):
        for i in layers:
            v = data.get(f"layers.{i}.{site}")
            if v is None:
                continue
            zero = float((v == 0).float().mean())
            lim = float(v.abs().quantile(0.999)) if v.numel() < (1 << 24) else float(v.abs().max())
            ax.hist(v.clamp(-lim, lim).numpy(), bins=120, histtype="step", log=True,
                    label=f"layer {i} ({zero:.0%} zero)")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("activation")
        ax.legend(fontsize=6)
    fig.suptitle(f"site inputs over {len(files)} dumped tokens ({dump_dir})", fontsize=9)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / "histograms.png")]


def load_rows(sweep_jsons) -> list:
    """Rows of one or more sweeps (one dense row kept); a method evaluated under several token
    policies is named "method (policy)"."""
    rows, seen_dense = [], False
    for path in sweep_jsons:
        for r in json.loads(Path(path).read_text()):
            if r["method"] == "dense":
                if seen_dense:
                    continue
                seen_dense = True
            rows.append(r)
    policies = {}
    for r in rows:
        policies.setdefault(r["method"], set()).add(r["tokens"])
    for r in rows:
        if r["method"] != "dense" and len(policies[r["method"]]) > 1:
            r["method"] = f"{r['method']} ({r['tokens']})"
    return rows


def make_plots(sweep_jsons, out_dir) -> list:
    import sparsity as sp
    plt = _plt()
    rows = load_rows([sweep_jsons] if isinstance(sweep_jsons, (str, Path)) else sweep_jsons)
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
    written.append(_save(fig, out_dir / "pareto.png"))
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
    written.append(_save(fig, out_dir / "per_layer_sparsity.png"))
    written.append(sp.write_atomic(out_dir / "results.md", lambda tmp: Path(tmp).write_text(results_table(rows))))
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
    ap.add_argument("sweep_json", nargs="*", help="scripts/sweep.py outputs (.json), shown together")
    ap.add_argument("--configs", nargs="+", default=[], help="sparsity configs: per-layer threshold plots")
    ap.add_argument("--dump", help="a --dump-activations folder: activation histograms")
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    if not (a.sweep_json or a.configs or a.dump):
        ap.error("give a sweep JSON, --configs and/or --dump")
    out = a.out_dir or (str(Path(a.sweep_json[0]).parent / "plots") if a.sweep_json else "results/plots")
    written = make_plots(a.sweep_json, out) if a.sweep_json else []
    written += plot_thresholds(a.configs, out) if a.configs else []
    written += plot_histograms(a.dump, out) if a.dump else []
    for p in written:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
