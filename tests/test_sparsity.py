"""Sparsity methods: the inline path vs straightforward formulas written here, calibration
hitting its targets, the config file, and the method-specific claims of each paper."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import calibrate as cal
import sparsity as sp
from conftest import ROOT
from model import ModelArgs, Transformer

TINY = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=160,
                 vocab_size=97, max_position_embeddings=256, name="tiny")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = Transformer(TINY).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.15)
    return m


@pytest.fixture(scope="module")
def tiny_batches():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY.vocab_size, (4, 48), generator=g)


@pytest.fixture(scope="module")
def smol_batches(smollm2):
    _, tok = smollm2
    return cal.token_batches(tok, cal.calibration_texts(), 2, 128)


def dense_logits(model, ids):
    sp.apply(model, None)
    with torch.no_grad():
        return model(ids)


# ----------------------------------------------------------------------------- reference formulas
def ref_mlp(ffn, x, method, cfg_layer):
    """The papers' formulas, written out independently of sparsity.py."""
    Wg, Wu, Wd = ffn.gate.weight, ffn.up.weight, ffn.down.weight
    if method in ("teal", "scap"):
        def th(v, site):
            if site is None:
                return v, 0
            m = 0.0 if site.mode is None else float(site.mode)
            c = v - m
            return torch.where(c.abs() > site.threshold, c, torch.zeros_like(c)), m
        xg, mg = th(x, cfg_layer.gate)
        xu, mu = th(x, cfg_layer.up)
        g = xg @ Wg.T + mg * Wg.sum(1)
        u = xu @ Wu.T + mu * Wu.sum(1)
        s, md = th(F.silu(g) * u, cfg_layer.down)
        return s @ Wd.T + md * Wd.sum(1)
    g, u = x @ Wg.T, x @ Wu.T
    if method == "cats":
        a = F.silu(g)
        keep = a.abs() > cfg_layer.threshold
        return ((a * keep) * u) @ Wd.T
    if method == "m-countdown":
        keep = u.abs() > cfg_layer.threshold
        return (F.silu(g) * u * keep) @ Wd.T
    s = F.silu(g) * u
    if method == "d-countdown-oracle":
        n_keep = s.shape[-1] - round(cfg_layer.ratio * s.shape[-1])
        kth = s.abs().sort(dim=-1, descending=True).values[..., n_keep - 1:n_keep]
        return (s * (s.abs() >= kth)) @ Wd.T
    if method == "d-countdown":
        logit = x @ cfg_layer.predictor_v @ cfg_layer.predictor_u.T + cfg_layer.predictor_b
        return (s * (logit > 0)) @ Wd.T


PROJ = [dict(method="teal", sparsity=0.5), dict(method="teal", sparsity=0.4, greedy=True),
        dict(method="scap", scap="up,median,0.35,gate,median,0.35,down,kde,0.55"),
        dict(method="cats", sparsity=0.5), dict(method="m-countdown", sparsity=0.7),
        dict(method="d-countdown-oracle", sparsity=0.7), dict(method="d-countdown", sparsity=0.7, rank=16)]


@pytest.mark.parametrize("kw", PROJ, ids=lambda kw: kw["method"] + ("-greedy" if kw.get("greedy") else ""))
def test_tiny_mlp_matches_formula_and_calibration_hits_target(tiny, tiny_batches, kw):
    cfg = cal.calibrate(tiny, tiny_batches, progress=False, **kw)
    sp.apply(tiny, cfg)
    x = torch.randn(2, 7, TINY.dim)
    for layer in tiny.layers:
        ffn = layer.feed_forward
        with torch.no_grad():
            # FeedForward returns x + MLP(norm(x)) (the residual add is part of the sublayer)
            ours, ref = ffn(x, layer.ffn_norm), x + ref_mlp(ffn, layer.ffn_norm(x), kw["method"], ffn.sparsity)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    measured = cal.measure(tiny, cfg, tiny_batches)
    by_site = sp.mean_by_site(measured)
    if kw["method"] == "teal" and not kw.get("greedy"):
        for site in sp.LINEAR_SITES:
            assert abs(by_site[site] - kw["sparsity"]) < 0.01, (site, by_site)
    elif kw["method"] == "scap":
        assert abs(by_site["down"] - 0.55) < 0.01 and abs(by_site["up"] - 0.35) < 0.01
    elif kw["method"] != "teal":
        assert abs(by_site["mlp_coeff"] - kw["sparsity"]) < 0.01, by_site
    ids = tiny_batches[:1]
    sp.apply(tiny, cfg)
    with torch.no_grad():
        sparse = tiny(ids)
    assert not torch.equal(sparse, dense_logits(tiny, ids))  # the config does something
    sp.apply(tiny, None)
    with torch.no_grad():
        assert torch.equal(tiny(ids), dense_logits(tiny, ids))  # removed: bit-identical dense


def test_teal_attention_sites_match_formula(tiny, tiny_batches):
    cfg = cal.calibrate(tiny, tiny_batches, method="teal", sparsity=0.5, progress=False)
    sp.apply(tiny, cfg)
    attn = tiny.layers[1].attention
    x = torch.randn(1, 5, TINY.dim)
    wq, wk, wv = attn.wqkv.weight.split(attn.sparsity.sizes)
    outs = []
    for w, site in zip((wq, wk, wv), attn.sparsity.qkv):
        outs.append(torch.where(x.abs() > site.threshold, x, 0.0) @ w.T)
    with torch.no_grad():
        torch.testing.assert_close(sp.sparse_qkv(x, attn.wqkv, attn.sparsity), torch.cat(outs, -1))
    sp.apply(tiny, None)


def test_smollm2_calibration_hits_targets(smollm2, smol_batches):
    model, _ = smollm2
    for kw, site, target in (
            (dict(method="teal", sparsity=0.5), "down", 0.5), (dict(method="cats", sparsity=0.5), "mlp_coeff", 0.5),
            (dict(method="m-countdown", sparsity=0.7), "mlp_coeff", 0.7),
            (dict(method="scap", scap="up,zero,0.35,gate,zero,0.35,down,median,0.55"), "down", 0.55),
            (dict(method="d-countdown", sparsity=0.7, rank=16), "mlp_coeff", 0.7),
            (dict(method="d-countdown-oracle", sparsity=0.7), "mlp_coeff", 0.7)):
        cfg = cal.calibrate(model, smol_batches, progress=False, **kw)
        by_site = sp.mean_by_site(cal.measure(model, cfg, smol_batches))
        assert abs(by_site[site] - target) < 0.01, (kw, by_site)
        layer = model.layers[5]
        sp.apply(model, cfg)
        x = torch.randn(1, 4, model.config.dim)
        with torch.no_grad():
            torch.testing.assert_close(layer.feed_forward(x, layer.ffn_norm),
                                       x + ref_mlp(layer.feed_forward, layer.ffn_norm(x), kw["method"],
                                                   layer.feed_forward.sparsity))
        sp.apply(model, None)


def test_decode_token_policy_keeps_prefix_dense(tiny, tiny_batches):
    cfg = cal.calibrate(tiny, tiny_batches, method="teal", sparsity=0.5, tokens="decode", progress=False)
    assert cfg.tokens == "decode" and cfg.dense_prefix(10) == 10
    assert sp.dense_prefix("last-half", 10) == 5 and sp.dense_prefix("all", 10) == 0
    with pytest.raises(ValueError, match="unknown token policy"):
        sp.dense_prefix("prefill", 10)
    ids = tiny_batches[:1, :20]
    dense = dense_logits(tiny, ids)
    sp.apply(tiny, cfg)
    with torch.no_grad():
        out = tiny(ids, dense_prefix=12)
    assert torch.equal(out[:, :12], dense[:, :12])  # causal: rows before 12 see only dense rows
    assert not torch.allclose(out[:, 12:], dense[:, 12:])
    sp.apply(tiny, None)


def test_teal_greedy_beats_uniform_block_error(tiny, tiny_batches):
    layer = tiny.layers[1]
    sp.apply(tiny, None)
    tiny.setup_rope(tiny_batches.shape[1])
    with torch.no_grad():
        h = cal.block_forward(tiny, tiny.layers[0], [tiny.tok_embeddings(tiny_batches)])
    levels = cal.teal_greedy(tiny, layer, h, 0.5)
    pb = sp.projection_bytes(tiny)
    eff = sum(pb[n] * levels[n] for n in pb) / sum(pb.values())
    assert eff >= 0.5 and len(set(round(v, 3) for v in levels.values())) > 1
    x = {"attn": cal.captured(tiny, layer, h, [("outputs", layer.attention_norm, "a")]).cat("a"),
         "o": cal.captured(tiny, layer, h, [("inputs", layer.attention.wo, "o")]).cat("o"),
         "mlp": cal.captured(tiny, layer, h, [("outputs", layer.ffn_norm, "m")]).cat("m"),
         "down": cal.captured(tiny, layer, h, [("inputs", layer.feed_forward.down, "d")]).cat("d")}
    src = dict(q="attn", k="attn", v="attn", o="o", gate="mlp", up="mlp", down="down")

    def err(lv):
        sites = {n: sp.LinearSite(torch.tensor(cal.quantile(x[src[n]].abs().flatten(), lv[n]))) for n in lv}
        layer.attention.sparsity = sp.AttentionSparsity(sites["q"], sites["k"], sites["v"], sites["o"],
                                                        sizes=(TINY.n_heads * 16, 32, 32))
        layer.feed_forward.sparsity = sp.MLPSparsity("teal", sites["gate"], sites["up"], sites["down"])
        with torch.no_grad():
            out = cal.block_forward(tiny, layer, h)[0]
        layer.attention.sparsity = layer.feed_forward.sparsity = None
        with torch.no_grad():
            ref = cal.block_forward(tiny, layer, h)[0]
        return float((out - ref).pow(2).mean())
    assert err(levels) < err({n: eff for n in levels})


def test_scap_mode_centering():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=True)
    x = torch.randn(64, 32) * 0.3 - 0.8  # activations centred away from zero
    site = sp.LinearSite(torch.tensor(0.0), torch.tensor(-0.8))
    sp._fill_shift(site, lin.weight)
    torch.testing.assert_close(sp.sparse_linear(x, lin, site), lin(x), rtol=1e-5, atol=1e-5)  # t = 0: exact
    errs = {}
    for mode in (None, -0.8):
        c = x - (mode or 0.0)
        t = cal.quantile(c.abs().flatten(), 0.5)
        s = sp.LinearSite(torch.tensor(t), None if mode is None else torch.tensor(mode))
        sp._fill_shift(s, lin.weight)
        errs[mode] = float((sp.sparse_linear(x, lin, s) - lin(x)).pow(2).mean())
    assert errs[-0.8] < errs[None] / 2


def test_scap_config_string_errors():
    assert cal.parse_scap("up,zero,0.35,gate,zero,0.35,down,kde,0.5")["down"] == ("kde", 0.5)
    for bad in ("up,zero", "mlp,zero,0.3", "up,mean,0.3", "up,zero,1.5"):
        with pytest.raises(ValueError):
            cal.parse_scap(bad)


# ----------------------------------------------------------------------------- attention
def attn_inputs(S=12, L=12, H=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, H, S, D, generator=g) * 2
    k = torch.randn(1, Hkv, L, D, generator=g) * 2
    v = torch.randn(1, Hkv, L, D, generator=g)
    return q, k, v


def test_top_theta_with_minus_inf_thresholds_equals_dense():
    q, k, v = attn_inputs()
    sc = sp.AttentionScores("top-theta", k=2, thresholds=torch.full((4, 12), -math.inf))
    out = sp.thresholded_attention(q, k, v, None, sc)
    torch.testing.assert_close(out, sp.dense_attention(q, k, v, None), rtol=1e-5, atol=1e-5)


def test_top_theta_formula_and_compensations():
    q, k, v = attn_inputs()
    H, S, D = 4, 12, 8
    theta = torch.full((H, S), 0.5)
    kf, vf = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    a = (q @ kf.transpose(-1, -2)) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    a = a.masked_fill(~causal, -math.inf)
    p_dense = a.softmax(-1)
    y_dense = p_dense @ vf
    n = causal.sum(-1)
    keep = ((a > 0.5) | (a == a.amax(-1, keepdim=True)) | (n <= 3)[:, None]) & causal
    # uncompensated pre-softmax: softmax over the kept scores only
    p_none = torch.where(keep, a, -math.inf).softmax(-1)
    out = {}
    for sdc, vmc in (("none", False), ("exact", False), ("exact", True)):
        sc = sp.AttentionScores("top-theta", k=3, thresholds=theta, sdc=sdc, vmc=vmc)
        out[sdc, vmc] = sp.thresholded_attention(q, k, v, None, sc)
    torch.testing.assert_close(out["none", False], p_none @ vf, rtol=1e-5, atol=1e-5)
    # SDC exact: kept probabilities are the dense ones (no inflation), so less output mass
    torch.testing.assert_close(out["exact", False], (p_dense * keep) @ vf, rtol=1e-5, atol=1e-5)
    err = {key: float((o - y_dense).norm()) for key, o in out.items()}
    assert err["exact", True] < err["none", False]  # SDC + VMC bring the output closer to dense
    assert err["exact", True] < err["exact", False]


def test_top_k_attention_keeps_k_per_row():
    q, k, v = attn_inputs()
    sc = sp.AttentionScores("top-k", k=3)
    stats = {}
    sp.thresholded_attention(q, k, v, None, sc, stats)
    n = torch.arange(1, 13)
    expect_drop = 4 * int((n[n > 3] - 3).sum())
    assert stats["scores"] == [expect_drop, 4 * int(n[n > 3].sum())]
    # V rows: a key is read when either head of its KV group keeps it (heads 2g, 2g + 1)
    a = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    skipped = total = 0
    for s in range(3, 12):  # rows that see n = s + 1 > k keys
        for g in range(2):
            read = {int(j) for h in (2 * g, 2 * g + 1) for j in a[0, h, s, :s + 1].topk(3).indices}
            skipped, total = skipped + s + 1 - len(read), total + s + 1
    assert stats["v_rows"] == [skipped, total] and 0 < skipped < expect_drop / 2


def test_top_theta_calibration_and_composition(tiny, tiny_batches):
    cfg = cal.calibrate(tiny, tiny_batches, method="teal", sparsity=0.3, attention="top-theta", k=8,
                        k_overrides={0: 64}, progress=False)
    assert cfg.header["layers"][0]["attention"]["k"] == 64
    assert cfg.tensors["layers.1.theta"].shape == (TINY.n_heads, tiny_batches.shape[1])
    measured = cal.measure(tiny, cfg, tiny_batches)
    assert "scores" in measured[1] and "q" in measured[1]
    assert math.isnan(measured[0]["scores"])  # k=64 > 48 tokens: no row is sparse


# ----------------------------------------------------------------------------- config file
def test_config_round_trip_and_errors(tiny, tiny_batches, tmp_path, smollm2):
    cfg = cal.calibrate(tiny, tiny_batches, method="cats", sparsity=0.5, progress=False)
    path = tmp_path / "cats.sparsity"
    sp.save_config(path, cfg)
    loaded = sp.load_config(path)
    assert loaded.header["method"] == "cats" and loaded.tokens == "all"
    sp.apply(tiny, loaded)
    assert tiny.layers[0].feed_forward.sparsity.threshold is not None
    sp.apply(tiny, None)
    with pytest.raises(ValueError, match="made for another model"):
        sp.apply(smollm2[0], loaded)
    other = Transformer(TINY).eval()  # same shapes, other weights
    with pytest.raises(ValueError, match="differs in weights"):
        sp.apply(other, loaded)
    sp.apply(tiny.to(torch.bfloat16), loaded)  # same model in another dtype: accepted
    tiny.to(torch.float32)
    sp.apply(tiny, None)
    bad = tmp_path / "truncated.sparsity"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        sp.load_config(bad)
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
            sp.check_sparsity_value(s)


def test_write_atomic_replaces_the_file_whole_or_not_at_all(tmp_path):
    """sparsity.write_atomic, which every output file of the scripts goes through (configs, eval / sweep / bench
    JSON, plots): a writer that fails halfway leaves the old file as it was and no temp file behind; one that
    succeeds replaces it, with open()'s permissions. The temp file sits next to the path with its suffix
    (matplotlib picks a format by it)."""
    path = tmp_path / "new_dir" / "results.json"
    assert sp.write_atomic(path, lambda tmp: Path(tmp).write_text("old")) == path
    assert path.read_text() == "old"

    def interrupted(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sp.write_atomic(path, interrupted)
    assert path.read_text() == "old"
    assert [f.name for f in path.parent.iterdir()] == ["results.json"]
    temps = []
    sp.write_atomic(path, lambda tmp: temps.append(Path(tmp)) or Path(tmp).write_text("new"))
    assert path.read_text() == "new" and [f.name for f in path.parent.iterdir()] == ["results.json"]
    assert temps[0].parent == path.parent and temps[0].suffix == ".json" and temps[0] != path
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() gives, not mkstemp's owner-only 0o600


def test_calibration_uses_the_math_attention_kernel_on_cpu(tiny, tiny_batches, monkeypatch):
    """calibrate and measure run dense attention through SDPA's math kernel on CPU (the flash kernel's bits
    vary between processes, and so did the thresholds); the setting does not outlive them."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(torch.backends.cuda.flash_sdp_enabled()) or real(*a, **k))
    cfg = cal.calibrate(tiny, tiny_batches, method="teal", sparsity=0.5, progress=False)
    cal.measure(tiny, cfg, tiny_batches, progress=False)
    assert seen and not any(seen)
    assert torch.backends.cuda.flash_sdp_enabled()


def test_calibrate_cli_bad_sparsity_one_line(tmp_path):
    p = subprocess.run([sys.executable, "calibrate.py", "--method", "teal", "--sparsity", "1.2", "--out",
                        str(tmp_path / "x.sparsity")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.sparsity").exists()


def test_effective_sparsity_hand_computed(tiny):
    # per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up/down 160x64 (x4 bytes, fp32)
    measured = {i: {"q": 0.5, "k": 0.5, "v": 0.5, "o": 0.5, "gate": 0.5, "up": 0.5, "down": 0.5} for i in range(3)}
    assert sp.effective_sparsity(tiny, measured, "teal") == pytest.approx(0.5)
    measured = {i: {"mlp_coeff": 0.6} for i in range(3)}
    total = 64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3
    assert sp.effective_sparsity(tiny, measured, "cats") == pytest.approx(0.6 * 2 * 160 * 64 / total)
    assert sp.effective_sparsity(tiny, measured, "d-countdown-oracle") == pytest.approx(0.6 * 160 * 64 / total)
