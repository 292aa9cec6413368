"""Methods x sparsity levels -> one CSV + JSON of quality vs effective weight sparsity.

    python scripts/sweep.py --methods teal,cats,m-countdown --levels 0.3,0.5,0.7 \\
        --tasks arc_easy --limit 200 --ppl-tokens 20000 --out results/sweep_smollm2
    python scripts/plot.py results/sweep_smollm2.json
    python scripts/sweep.py --methods teal@all,teal@decode --levels 0.5 ...   # both token policies

Each point: calibrate (CoQA stories) -> evaluate (LAMBADA perplexity, lm-eval tasks) with the
measured per-site sparsity and the effective weight sparsity. The dense model is the first row.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import calibrate as cal  # noqa: E402
import eval as ev  # noqa: E402
import sparsity as sp  # noqa: E402

METHOD_ARGS = {  # level -> calibrate() keywords
    "teal": lambda s: dict(method="teal", sparsity=s),
    "teal-greedy": lambda s: dict(method="teal", sparsity=s, greedy=True),
    "cats": lambda s: dict(method="cats", sparsity=s),
    "scap": lambda s: dict(method="scap", scap=f"up,zero,{s},gate,zero,{s},down,zero,{min(0.95, s + 0.2):.2f}"),
    "m-countdown": lambda s: dict(method="m-countdown", sparsity=s),
    "d-countdown": lambda s: dict(method="d-countdown", sparsity=s),
    "d-countdown-oracle": lambda s: dict(method="d-countdown-oracle", sparsity=s),
}


def run_sweep(model, tokenizer, methods, levels, tasks=(), limit=None, ppl_tokens=20000, tokens=None,
              n_seqs=16, seq_len=256, out=None):
    batches = cal.token_batches(tokenizer, cal.calibration_texts(), n_seqs, seq_len)
    points = [("dense", 0.0)] + [(m, s) for m in methods for s in levels]
    rows = []
    for spec, level in tqdm(points, desc="sweep", unit="point"):
        method, _, policy = spec.partition("@")  # "teal@all": this point under the `all` token policy
        cfg = None if method == "dense" else cal.calibrate(model, batches, progress=False, **METHOD_ARGS[method](level))
        res = ev.evaluate(model, tokenizer, cfg, policy or tokens, list(tasks), limit, ppl=ppl_tokens > 0,
                          ppl_tokens=ppl_tokens)
        row = dict(method=method, level=level, tokens=res["tokens"],
                   effective_sparsity=res["effective_weight_sparsity"],
                   perplexity=res.get("perplexity", {}).get("value"))
        for task, metrics in res.get("tasks", {}).items():
            row[f"{task}_acc"] = metrics.get("acc,none")
        row["measured"] = res.get("measured_sparsity", {}).get("by_site", {})
        row["per_layer"] = res.get("measured_sparsity", {}).get("per_layer", {})
        rows.append(row)
        if out:
            write(rows, out)  # after every point: an interrupted sweep keeps what it measured
    return rows


def write(rows, out):
    out = Path(out)
    sp.write_atomic(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))
    keys = [k for k in rows[0] if k not in ("measured", "per_layer")]
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("measured", "per_layer")]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    sp.write_atomic(out.with_suffix(".csv"), write_csv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/SmolLM2-135M-Instruct")
    ap.add_argument("--methods", default="teal,cats,m-countdown",
                    help="comma-separated; name@all or name@decode sets that method's token policy")
    ap.add_argument("--levels", default="0.3,0.5,0.7")
    ap.add_argument("--tasks", default="arc_easy")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=20000)
    ap.add_argument("--tokens", choices=["all", "decode"])
    ap.add_argument("--n-seqs", type=int, default=16, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="results/sweep_smollm2")
    a = ap.parse_args()
    from model import load_model
    from tokenizer import get_tokenizer
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m.partition("@")[0] not in METHOD_ARGS or m.partition("@")[2] not in
           ("", "all", "decode")]
    if bad:
        sys.exit(f"error: unknown method(s) {', '.join(bad)}; choose from {', '.join(METHOD_ARGS)}")
    levels = [float(x) for x in a.levels.split(",") if x]
    for s in levels:
        try:
            sp.check_sparsity_value(s)
        except ValueError as e:
            sys.exit(f"error: {e}")
    model = load_model(a.checkpoint, dtype=torch.float32)
    run_sweep(model, get_tokenizer(a.checkpoint), methods, levels, [t for t in a.tasks.split(",") if t], a.limit,
              a.ppl_tokens, a.tokens, a.n_seqs, a.seq_len, out=a.out)
    print(f"wrote {a.out}.csv and {a.out}.json")


if __name__ == "__main__":
    main()
