"""Every Triton kernel equals its PyTorch reference (run under TRITON_INTERPRET=1 on CPU):
fresh random inputs, poisoned outputs, odd shapes, batch 1 and 4, sparsity 0 .. 1."""
import pytest
import torch

import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tiny_model(std=None, norm_std=None, **overrides):
    """The model-level tests' tiny Llama (4 query / 2 KV heads, head_dim 16) on DEVICE, seeded.
    With std: weights ~ N(0, std), norm weights ~ N(1, norm_std) (left at 1 without norm_std)."""
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    cfg = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96,
                    vocab_size=61, **overrides)
    model = Transformer(cfg).eval().to(DEVICE)
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith("norm.weight"):
                    p.normal_(0.0, std)
                elif norm_std is not None:
                    p.normal_(1.0, norm_std)
    return cfg, model


def thresholds_for(x, sparsity, mode=0.0, gap=1e-4):
    """The sparsity-quantile of |x - mode| (sparsity 1.0: above every value), halfway between two
    neighbouring values at least `gap` apart relative to their size, the pair nearest the quantile:
    a kernel's own rounding (tl.exp, fused multiply-adds) then moves no value across it. Two equal
    values, which 16-bit inputs often give, would leave the threshold on both (a flaky test on the GPU)."""
    c = (x.float() - mode).abs().flatten()
    if sparsity >= 1.0:
        return float(c.max()) + 1.0
    if sparsity <= 0.0:
        return -1.0
    s = c.sort().values
    i = int(sparsity * (c.numel() - 1))
    wide = ((s[1:] - s[:-1]) > gap * s[1:]).nonzero().flatten()  # j: s[j] and s[j + 1] far enough apart
    if wide.numel():
        i = int(wide[(wide - i).abs().argmin()])
    return float(s[i] + s[i + 1]) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("programs_per_sm", [8, 1])  # several K chunks (partial sums) / one chunk of 4 blocks
def test_input_sparse_gemv(dtype, B, sparsity, programs_per_sm, monkeypatch):
    for name in ("GEMV_TUNING", "GEMV_BATCH_TUNING"):
        monkeypatch.setattr(kernels, name, dict(getattr(kernels, name), block_k=64, programs_per_sm=programs_per_sm))
    K, N = 200, 96  # K not a multiple of BLOCK_K (several K chunks); N: "projections" of 64 and 32
    x = torch.randn(B, K, device=DEVICE).to(dtype)
    wt = torch.randn(K, N, device=DEVICE).to(dtype)
    t = torch.empty(N, device=DEVICE)
    t[:64] = thresholds_for(x, sparsity)
    t[64:] = thresholds_for(x, min(1.0, sparsity + 0.05))  # a second projection, other threshold
    block_n = kernels.block_n_for([64, 32])
    y = kernels.input_sparse_gemv(x, wt, t, None, None, block_n)
    ref = kernels.input_sparse_gemv_ref(x, wt, t)
    if sparsity == 1.0:
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("B", [1, 3])
def test_input_sparse_gemv_mode_shift(B):
    """SCAP: centred thresholding plus the precomputed W m; t = 0 (keep all but exact ties)
    reproduces the dense product."""
    K, N = 130, 48
    x = torch.randn(B, K, device=DEVICE) * 0.5 - 0.7
    wt = torch.randn(K, N, device=DEVICE)
    m = torch.full((N,), -0.7, device=DEVICE)
    shift = (torch.full((K,), -0.7, device=DEVICE) @ wt)
    for sparsity in (0.0, 0.6):
        t = torch.full((N,), thresholds_for(x, sparsity, -0.7), device=DEVICE)
        y = kernels.input_sparse_gemv(x, wt, t, m, shift, kernels.block_n_for([N]))
        assert rel_err(y, kernels.input_sparse_gemv_ref(x, wt, t, m, shift)) < 1e-4
        if sparsity == 0.0:
            assert rel_err(y, x @ wt) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("fused", ["", "norm", "residual", "norm+mode+shift", "swiglu", "swiglu+norm+mode+shift"])
@pytest.mark.parametrize("programs_per_sm", [8, 1])  # several K chunks merged in-kernel / one chunk
@pytest.mark.parametrize("compact", [False, True])  # every tile, masked / the list of kept channels
def test_sparse_gemv(dtype, sparsity, fused, programs_per_sm, compact, monkeypatch):
    """The batch-1 fused sparse GEMV: RMSNorm prologue (threshold on the normalised input),
    per-projection thresholds and modes, SiLU(gate) * up, W m and the residual in the epilogue,
    K chunks summed by the last program; odd shapes, poisoned output, counters left at zero;
    the masked walk and the kept-channel list (gate and up with different thresholds: their union)."""
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=64, programs_per_sm=programs_per_sm))
    K, N = 200, 96  # K: several chunks, not a multiple of BLOCK_K; N: "projections" of 64 and 32 (swiglu: 48 + 48)
    swiglu = "swiglu" in fused
    x = (3 * torch.randn(1, K, device=DEVICE) + 0.2).to(dtype)  # rms ~3: the norm must matter
    wt = torch.randn(K, N, device=DEVICE).to(dtype)
    g = torch.rand(K, device=DEVICE).add(0.5).to(dtype) if "norm" in fused else None
    xn = kernels.rms_norm_ref(x, g, 1e-5) if g is not None else x.float()  # what the thresholds see
    sizes = [48, 48] if swiglu else [64, 32]
    mode = 0.1 if "mode" in fused else 0.0
    t = torch.cat([torch.full((sizes[0],), thresholds_for(xn, sparsity, mode), device=DEVICE),
                   torch.full((sizes[1],), thresholds_for(xn, min(1.0, sparsity + 0.05), -mode), device=DEVICE)])
    m = torch.cat([torch.full((sizes[0],), mode, device=DEVICE), torch.full((sizes[1],), -mode, device=DEVICE)]) \
        if mode else None
    shift = torch.randn(N, device=DEVICE) if "shift" in fused else None
    n_out = N // 2 if swiglu else N
    r = (10 * torch.randn(1, n_out, device=DEVICE)).to(dtype) if "residual" in fused else None
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    torch.empty(1, n_out, dtype=dtype, device=DEVICE).fill_(float("nan"))  # poison the allocator's next block
    y = kernels.sparse_gemv(x, wt, t, m, shift, kernels.block_n_for(sizes), counters, g, 1e-5, r, swiglu, compact)
    assert y.dtype == dtype and y.shape == (1, n_out) and not torch.isnan(y).any()
    assert torch.equal(counters, torch.zeros_like(counters))
    ref = kernels.sparse_gemv_ref(x, wt, t, m, shift, g, 1e-5, r, swiglu)
    if sparsity == 1.0 and shift is None and r is None:
        assert torch.equal(y.float(), torch.zeros_like(ref))
    else:
        assert rel_err(y.float(), ref) < TOL[dtype]
    if r is not None:  # the residual is really added (not just small next to W x)
        assert rel_err(y.float() - r.float(), ref - r.float()) < TOL[dtype] * 2


def check_rounded_copy(x_copy, x, dtype):
    """x_copy (fp32) holds x rounded to dtype: values dtype can hold, each within one unit in the last place of
    x (the interpreter's fp32 -> 16-bit conversion truncates where the GPU's rounds to nearest)."""
    assert x_copy.dtype == torch.float32 and torch.equal(x_copy.to(dtype).float(), x_copy)
    if dtype == torch.float32:
        assert torch.equal(x_copy, x)
    else:
        ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
        assert ((x_copy - x).abs() <= ulp * x.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 rounds through the same code
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("fused", ["", "mode+shift"])
@pytest.mark.parametrize("programs_per_sm", [8, 1])  # several K chunks / one
@pytest.mark.parametrize("compact", [False, True])
def test_deferred_sums(dtype, sparsity, fused, programs_per_sm, compact, monkeypatch):
    """Deferred sums (sparsity.DEFER_SUMS), kernel by kernel, as a layer's MLP and o projection run them:
    sparse_gemv_parts normalises the fp32 residual stream (rounded to the weights' dtype first), writes that
    rounding to x_copy and returns its K chunks' sums of gate and up unmerged (W m once); sparse_gemv_add with
    glu thresholds SiLU(g) * u formed from those sums and adds its products into the stream; the o projection's
    add likewise from a plain input. Odd shapes, NaN-poisoned buffers, thresholds keeping all and nothing."""
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=64, programs_per_sm=programs_per_sm))
    K, F, Ko = 200, 48, 64  # the stream, the MLP's width, the attention output
    gap = 1e-4 if dtype == torch.float32 else 2e-2  # 16-bit inputs: a rounding may move a value by one unit
    h = 3 * torch.randn(1, K, device=DEVICE) + 0.2  # the fp32 stream: not representable in 16 bits
    g = torch.rand(K, device=DEVICE).add(0.5).to(dtype)
    wgu = torch.randn(K, 2 * F, device=DEVICE).to(dtype)
    xn = kernels.rms_norm_ref(h.to(dtype), g, 1e-5)
    mode = 0.1 if "mode" in fused else 0.0
    t = torch.cat([torch.full((F,), thresholds_for(xn, sparsity, mode, gap), device=DEVICE),
                   torch.full((F,), thresholds_for(xn, min(1.0, sparsity + 0.05), -mode, gap), device=DEVICE)])
    m = torch.cat([torch.full((F,), mode, device=DEVICE), torch.full((F,), -mode, device=DEVICE)]) if mode else None
    shift = torch.randn(2 * F, device=DEVICE) if "shift" in fused else None
    x_copy = torch.full((1, K), float("nan"), device=DEVICE)
    torch.empty(8, 2 * F, device=DEVICE).fill_(float("nan"))  # poison the allocator's next block
    parts = kernels.sparse_gemv_parts(h, wgu, t, m, shift, 16, g, 1e-5, compact, x_copy)
    check_rounded_copy(x_copy, h, dtype)
    split = kernels.gemv_launch_config(1, K, F, 16, h.device)["split"]
    assert parts.dtype == torch.float32 and parts.shape == (split, 2 * F)
    assert (split > 1) == (programs_per_sm > 1 or h.is_cuda)  # 132 SMs: several chunks even at one program each
    pre = kernels.input_sparse_gemv_ref(kernels.rms_norm_ref(x_copy, g, 1e-5), wgu, t, m, shift)  # gate, up sums
    if sparsity == 1.0 and shift is None:
        assert torch.equal(parts, torch.zeros_like(parts))
    else:
        assert rel_err(parts.sum(0, keepdim=True), pre) < 1e-4

    # the down projection: SiLU(g) * u from the parts, thresholded, added into the stream
    s = torch.nn.functional.silu(pre[:, :F]) * pre[:, F:]
    wd = torch.randn(F, K, device=DEVICE).to(dtype)
    td = torch.full((K,), thresholds_for(s.to(dtype), sparsity, 0.0, gap), device=DEVICE)
    acc = x_copy.clone()
    kernels.sparse_gemv_add(parts, wd, td, None, None, 8, acc, compact, True)
    added = kernels.input_sparse_gemv_ref(s.to(dtype), wd, td)
    if sparsity == 1.0:
        assert torch.equal(acc, x_copy)
    else:
        assert rel_err(acc - x_copy, added) < TOL[dtype] and rel_err(acc, x_copy + added) < TOL[dtype]

    # the o projection: a plain input, W m added once, into the stream
    y = torch.randn(1, Ko, device=DEVICE).to(dtype)
    wo = torch.randn(Ko, K, device=DEVICE).to(dtype)
    to = torch.full((K,), thresholds_for(y, sparsity, mode, gap), device=DEVICE)
    mo = torch.full((K,), mode, device=DEVICE) if mode else None
    so = torch.randn(K, device=DEVICE) if shift is not None else None
    acc = x_copy.clone()
    kernels.sparse_gemv_add(y, wo, to, mo, so, 8, acc, compact)
    added = kernels.input_sparse_gemv_ref(y, wo, to, mo, so)
    if sparsity == 1.0 and so is None:
        assert torch.equal(acc, x_copy)
    else:
        assert rel_err(acc - x_copy, added) < 1e-4  # exact inputs, fp32 sums


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["divides", "unaligned"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_sparse_gemv_weight_layouts(dtype, layout, swiglu, monkeypatch):
    """The two ways sparse_gemv's walk reads weights, beyond test_sparse_gemv's odd shapes (bound masks,
    column pairs as 32-bit words): shapes that the K chunks and column blocks divide (no bound masks,
    as at the Llama shapes), and 16-bit weights whose rows start at odd addresses (no 32-bit words)."""
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=64, programs_per_sm=8))
    K, N = (256, 128) if layout == "divides" else (200, 96)
    full = torch.randn(K, N + (layout == "unaligned"), device=DEVICE).to(dtype)
    wt = full[:, 1:] if layout == "unaligned" else full
    assert kernels.packed_pairs(wt) == (layout == "divides")
    n_out = N // 2 if swiglu else N
    block_n = kernels.block_n_for([n_out])
    _, _, meta = kernels.sparse_gemv_launch(K, n_out, block_n, wt.device, False, False, swiglu, False, False, False,
                                            kernels.packed_pairs(wt))
    assert meta["BOUNDS"] == (layout != "divides")
    x = torch.randn(1, K, device=DEVICE).to(dtype)
    t = torch.full((N,), thresholds_for(x, 0.5), device=DEVICE)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    y = kernels.sparse_gemv(x, wt, t, None, None, block_n, counters, swiglu=swiglu)
    assert rel_err(y.float(), kernels.sparse_gemv_ref(x, wt, t, swiglu=swiglu)) < TOL[dtype]


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("block_n", [64, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_sparse_gemv_thread_rows(swiglu, block_n, sparsity):
    """The walk's tiles at the production tuning: (rows, THREAD_ROWS) channels, each thread summing its
    THREAD_ROWS in registers first (16 for a 256-channel tile at block_n 64, 8 for gate+up's 128), over
    several tiles and a chunk that ends mid-tile (K = 600), against the reference."""
    K, n_out = 600, 128
    _, _, meta = kernels.sparse_gemv_launch(K, n_out, block_n, torch.device(DEVICE), False, False, swiglu, False,
                                            False, False, True)
    tile = kernels.GEMV_TUNING["block_k"] // (2 if swiglu else 1)
    assert meta["BLOCK_K"] == tile and meta["THREAD_ROWS"] > 1 and tile % meta["THREAD_ROWS"] == 0
    x = torch.randn(1, K, device=DEVICE).to(torch.bfloat16)
    wt = torch.randn(K, 2 * n_out if swiglu else n_out, device=DEVICE).to(torch.bfloat16)
    t = torch.full((wt.shape[1],), thresholds_for(x, sparsity), device=DEVICE)
    y = kernels.sparse_gemv(x, wt, t, None, None, block_n, torch.zeros(64, dtype=torch.int32, device=DEVICE),
                            swiglu=swiglu)
    ref = kernels.sparse_gemv_ref(x, wt, t, swiglu=swiglu)
    assert torch.equal(y.float(), ref) if sparsity == 1.0 else rel_err(y.float(), ref) < TOL[torch.bfloat16]


def test_sparse_gemv_thread_rows_at_llama_shapes():
    """What the H100 runs (scripts/kernel_regs.py compiles the same): 256-channel tiles as 16 rows of 16, gate+up's
    two 128-channel tiles as 16 rows of 8, so each of a program's accumulators is (16, 32)."""
    for K, n_out, swiglu, rows in ((4096, 6144, False, 16), (4096, 14336, True, 8), (14336, 4096, False, 16)):
        _, _, meta = kernels.sparse_gemv_launch(K, n_out, 64, torch.device("cpu"), True, False, swiglu, False, False,
                                                False, True)
        assert (meta["BLOCK_K"], meta["THREAD_ROWS"]) == (rows * 16, rows)


def test_sparse_gemv_swiglu_odd_halves(monkeypatch):
    """[gate; up] with an odd number of columns each: the up block starts at an odd column, so the
    pairs of 16-bit columns are not 32-bit aligned there and the walk must not read them as words."""
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=64, programs_per_sm=8))
    K, n_out = 128, 45
    x = torch.randn(1, K, device=DEVICE).to(torch.bfloat16)
    wt = torch.randn(K, 2 * n_out, device=DEVICE).to(torch.bfloat16)
    assert kernels.packed_pairs(wt)  # the merged weight alone would qualify
    _, _, meta = kernels.sparse_gemv_launch(K, n_out, 2, wt.device, False, False, True, False, False, False, True)
    assert not meta["PACKED"]  # (the interpreter reads misaligned words fine; a GPU would fault)
    t = torch.full((2 * n_out,), thresholds_for(x, 0.5), device=DEVICE)
    y = kernels.sparse_gemv(x, wt, t, None, None, 2, torch.zeros(64, dtype=torch.int32, device=DEVICE), swiglu=True)
    assert rel_err(y.float(), kernels.sparse_gemv_ref(x, wt, t, swiglu=True)) < TOL[torch.bfloat16]


def test_sparse_gemv_refuses_odd_column_blocks():
    x, wt, t = torch.randn(1, 64, device=DEVICE), torch.randn(64, 9, device=DEVICE), torch.zeros(9, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        kernels.sparse_gemv(x, wt, t, None, None, kernels.block_n_for([9]), torch.zeros(8, dtype=torch.int32))


def test_sparse_gemv_refuses_short_counters(monkeypatch):
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=64, programs_per_sm=8))
    x, wt, t = torch.randn(1, 200, device=DEVICE), torch.randn(200, 96, device=DEVICE), torch.zeros(96, device=DEVICE)
    with pytest.raises(ValueError, match="counters"):
        kernels.sparse_gemv(x, wt, t, None, None, 32, torch.zeros(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# RMSNorm prologue / residual epilogue as the model uses them (no residual after gate/up)
@pytest.mark.parametrize("swiglu,fused", [(False, ""), (False, "norm"), (False, "norm+residual"), (False, "residual"),
                                          (True, ""), (True, "norm")])
@pytest.mark.parametrize("K,N", [(200, 77), (1030, 40)])  # one partial K block; several K blocks
def test_dense_gemv(dtype, swiglu, fused, K, N, monkeypatch):
    """The dense decode GEMV (and its SwiGLU form) equals x W^T; with the RMSNorm folded in,
    RMSNorm(x) g W^T (+ residual); odd shapes, poisoned output."""
    monkeypatch.setattr(kernels, "DENSE_TUNING", dict(kernels.DENSE_TUNING, block_k=128))
    monkeypatch.setattr(kernels, "SWIGLU_TUNING", dict(kernels.SWIGLU_TUNING, block_k=128))
    x = (3 * torch.randn(1, K, device=DEVICE)).to(dtype)  # rms 3: the norm must matter
    # weights ~ N(0, 1/K): sums of size ~3, so that fp16's SiLU(g) * u cannot overflow (with unit weights at K 1030,
    # |g| and |u| near 100 made it inf in about one run in ten)
    w1 = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    w2 = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype) if swiglu else None
    g = torch.rand(K, device=DEVICE).add(0.5).to(dtype) if "norm" in fused else None
    r = (3 * torch.randn(1, N, device=DEVICE)).to(dtype) if "residual" in fused else None  # as large as W x
    torch.empty(1, N, dtype=dtype, device=DEVICE).fill_(float("nan"))  # poison the allocator's next block
    y = kernels.gemv(x, w1, w2, g, 1e-5, r)
    assert y.dtype == dtype and y.shape == (1, N) and not torch.isnan(y).any()
    ref = kernels.gemv_ref(x, w1, w2, g, 1e-5, r)
    assert rel_err(y.float(), ref) < TOL[dtype]
    if r is not None:  # the residual is really added (not just small next to W x)
        assert rel_err(y.float() - r.float(), ref - r.float()) < TOL[dtype] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(200, 77), (1030, 8)])  # one partial K block; 9 K blocks, one program
def test_gemv_norm(dtype, K, N, monkeypatch):
    """gemv_norm: the gemv with the norm folded in, and x' = RMSNorm(x) * g written by its programs (grid-stride
    over x's tiles), rounded to x's dtype; poisoned outputs."""
    monkeypatch.setattr(kernels, "DENSE_TUNING", dict(kernels.DENSE_TUNING, block_k=128))
    x = (3 * torch.randn(1, K, device=DEVICE)).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    g = torch.rand(K, device=DEVICE).add(0.5).to(dtype)
    torch.empty(1, N + K, dtype=dtype, device=DEVICE).fill_(float("nan"))
    y, xn = kernels.gemv_norm(x, w, g, 1e-5)
    assert y.shape == (1, N) and xn.shape == (1, K) and xn.dtype == dtype
    assert rel_err(y.float(), kernels.gemv_ref(x, w, None, g, 1e-5)) < TOL[dtype]
    ref = kernels.rms_norm_ref(x, g, 1e-5)  # each element within one unit in the last place (fp32: a few)
    assert ((xn.float() - ref).abs() <= {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7}[dtype] * ref.abs()).all()


def test_linear_dispatch(monkeypatch):
    from model import RMSNorm
    """kernels.linear / swiglu: the gemv kernel for one token on the kernel path (bias added),
    F.linear otherwise (several tokens; input-major weights) - same numbers either way."""
    monkeypatch.setenv("ACTSPARSE_KERNELS", "force")
    F = torch.nn.functional
    up, gate = torch.nn.Linear(40, 24, bias=True).to(DEVICE), torch.nn.Linear(40, 24, bias=False).to(DEVICE)
    w, b = up.weight.detach(), up.bias.detach()
    up.bias = None
    calls = []
    real = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        for shape in [(1, 1, 40), (3, 1, 40), (1, 5, 40)]:
            x = torch.randn(*shape, device=DEVICE)
            assert rel_err(kernels.linear(x, w, b), F.linear(x, w, b)) < 1e-4
            assert rel_err(kernels.swiglu(x, gate, up), F.silu(gate(x)) * up(x)) < 1e-4
        assert len(calls) == 2  # only the (1, 1, K) input took the kernel
        norm = RMSNorm(40, 1e-6).to(DEVICE)
        norm.weight.data.uniform_(0.5, 1.5)
        for shape in [(1, 1, 40), (3, 1, 40)]:  # fused RMSNorm + residual, and the unfused fallback
            x = torch.randn(*shape, device=DEVICE)
            res = torch.randn(*shape[:-1], 24, device=DEVICE)
            assert rel_err(kernels.linear(x, w, b, norm, res), res + F.linear(norm(x), w, b)) < 1e-4
            assert rel_err(kernels.swiglu(x, gate, up, norm), F.silu(gate(norm(x))) * up(norm(x))) < 1e-4
        assert len(calls) == 4
        wt = w.t().contiguous().t()  # input-major layout: not the row-major kernel's
        assert rel_err(kernels.linear(torch.ones(1, 1, 40, device=DEVICE), wt), wt.sum(1)[None, None]) < 1e-4
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,D", [(1, 4, 2, 16), (3, 6, 3, 12)])  # GQA; D/2 not a power of two
def test_rope_kv_update(dtype, B, H, Hkv, D):
    """RoPE on q and k + the cache write at pos, one kernel: equals the reference; every other
    cache entry (other positions, sequences beyond B) is left as it was."""
    from model import ModelArgs, rope_tables
    cos, sin = rope_tables(ModelArgs(head_dim=D, rope_theta=100.0), 20, DEVICE)
    pos = torch.tensor([13], device=DEVICE)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device=DEVICE).to(dtype)
    caches = [torch.randn(B + 1, Hkv, 20, D, device=DEVICE).to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = kernels.rope_kv_update(qkv, cos.to(dtype), sin.to(dtype), pos, *caches, H)  # the tables; row pos
    ref_q = kernels.rope_kv_update_ref(qkv, cos.to(dtype), sin.to(dtype), pos, *ref_caches, H)
    assert q.shape == (B, H, D) and q.dtype == dtype
    assert rel_err(q.float(), ref_q.float()) < TOL[dtype]
    for c, r in zip(caches, ref_caches):
        assert rel_err(c[:, :, 13].float(), r[:, :, 13].float()) < TOL[dtype]
        keep = torch.ones(20, dtype=torch.bool)
        keep[13] = False
        assert torch.equal(c[:, :, keep], r[:, :, keep]) and torch.equal(c[B:], r[B:])
    v = qkv.view(B, H + 2 * Hkv, D)[:, H + Hkv:]
    assert torch.equal(caches[1][:B, :, 13], v)  # v copied as is


def rope_case(H, Hkv, D, dtype):
    """The fp32 cos / sin tables of 20 positions (as the model passes them), pos 13, and random K / V
    caches (2 sequences, 20 positions) with a copy for the reference."""
    from model import ModelArgs, rope_tables
    cos, sin = rope_tables(ModelArgs(head_dim=D, rope_theta=100.0), 20, DEVICE)
    pos = torch.tensor([13], device=DEVICE)
    caches = [torch.randn(2, Hkv, 20, D, device=DEVICE).to(dtype) for _ in range(2)]
    return (cos, sin, pos), caches, [c.clone() for c in caches]


def check_rope_outputs(q, ref_q, caches, ref_caches, dtype):
    """q and the cache rows at pos (13) of sequence 0 equal the reference; nothing else was written."""
    assert q.shape == ref_q.shape and q.dtype == ref_q.dtype and not torch.isnan(q).any()
    assert rel_err(q.float(), ref_q.float()) < TOL[dtype]
    keep = torch.ones(20, dtype=torch.bool)
    keep[13] = False
    for c, r in zip(caches, ref_caches):
        assert rel_err(c[0, :, 13].float(), r[0, :, 13].float()) < TOL[dtype]
        assert torch.equal(c[:, :, keep], r[:, :, keep]) and torch.equal(c[1:], r[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv,D,block_n", [(4, 2, 16, 8), (2, 2, 32, 8), (3, 1, 8, 8), (4, 2, 32, 16)])
@pytest.mark.parametrize("norm", [False, True])
def test_gemv_rope(dtype, H, Hkv, D, block_n, norm, monkeypatch):
    """The dense q/k/v gemv with RoPE and the KV-cache write in its epilogue equals gemv_ref's fp32 sums
    through rope_kv_update_ref: RoPE(q) returned, RoPE(k) and v in the caches at pos, every other cache entry
    as it was. Heads of one, two and four column blocks; GQA."""
    monkeypatch.setattr(kernels, "DENSE_TUNING", dict(kernels.DENSE_TUNING, block_k=64, block_n=block_n))
    K, N = 100, (H + 2 * Hkv) * D  # K: not a multiple of block_k
    x = (3 * torch.randn(1, K, device=DEVICE)).to(dtype)
    w = torch.randn(N, K, device=DEVICE).to(dtype)
    g = torch.rand(K, device=DEVICE).add(0.5).to(dtype) if norm else None
    rope, caches, ref_caches = rope_case(H, Hkv, D, dtype)
    assert kernels.rope_fusable(N, block_n, *rope, *caches, H)
    torch.empty(1, H, D, dtype=dtype, device=DEVICE).fill_(float("nan"))  # poison the allocator's next block
    q = kernels.gemv_rope(x, w, g, 1e-5, *rope, *caches, H)
    ref_q = kernels.rope_kv_update_ref(kernels.gemv_ref(x, w, None, g, 1e-5), *rope, *ref_caches, H)
    check_rope_outputs(q, ref_q, caches, ref_caches, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("H,Hkv,D,block_n", [(4, 2, 16, 16), (2, 1, 32, 16), (2, 2, 16, 8)])
@pytest.mark.parametrize("fused", ["norm", "mode,shift", "norm,compact", "norm,copy"])
def test_sparse_gemv_rope(dtype, sparsity, H, Hkv, D, block_n, fused, monkeypatch):
    """sparse_gemv on q/k/v with RoPE and the KV-cache write in its epilogue equals sparse_gemv_ref's fp32
    sums through rope_kv_update_ref. q, k and v have their own thresholds (and SCAP's modes and W m);
    several K chunks merged by the last program, column blocks of half a head or a whole one; both walks.
    copy (deferred sums): the input is the fp32 residual stream, rounded to dtype in the kernel, which
    writes that rounding to x_copy."""
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=32, programs_per_sm=8))
    K = 150  # several chunks, not a multiple of BLOCK_K
    sizes = [H * D, Hkv * D, Hkv * D]
    N = sum(sizes)
    x = 3 * torch.randn(1, K, device=DEVICE) + 0.2
    x = x if "copy" in fused else x.to(dtype)
    x_copy = torch.full((1, K), float("nan"), device=DEVICE) if "copy" in fused else None
    wt = torch.randn(K, N, device=DEVICE).to(dtype)
    g = torch.rand(K, device=DEVICE).add(0.5).to(dtype) if "norm" in fused else None
    xn = kernels.rms_norm_ref(x.to(dtype), g, 1e-5) if g is not None else x.float()
    modes = [0.1, -0.1, 0.05] if "mode" in fused else [0.0] * 3
    t = torch.cat([torch.full((n,), thresholds_for(xn, min(1.0, sparsity + 0.05 * j), mode), device=DEVICE)
                   for j, (n, mode) in enumerate(zip(sizes, modes))])
    m = torch.cat([torch.full((n,), mode, device=DEVICE) for n, mode in zip(sizes, modes)]) if "mode" in fused else None
    shift = torch.randn(N, device=DEVICE) if "shift" in fused else None
    rope, caches, ref_caches = rope_case(H, Hkv, D, dtype)
    assert kernels.rope_fusable(N, block_n, *rope, *caches, H) and kernels.block_n_for(sizes) >= block_n
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    torch.empty(1, H, D, dtype=dtype, device=DEVICE).fill_(float("nan"))  # poison the allocator's next block
    q = kernels.sparse_gemv_rope(x, wt, t, m, shift, block_n, counters, g, 1e-5, "compact" in fused, *rope,
                                 *caches, H, x_copy)
    assert torch.equal(counters, torch.zeros_like(counters))
    if x_copy is not None:
        check_rounded_copy(x_copy, x, dtype)
        x = x_copy  # the rounding the kernel used (the interpreter's and the GPU's differ)
    ref_q = kernels.rope_kv_update_ref(kernels.sparse_gemv_ref(x, wt, t, m, shift, g, 1e-5), *rope, *ref_caches, H)
    check_rope_outputs(q, ref_q, caches, ref_caches, dtype)


def test_linear_rope_dispatch(monkeypatch):
    """kernels.linear with rope returns RoPE(q) and fills the caches on every path: gemv_rope for one token
    without a bias; rope_kv_update after F.linear for 3 sequences or with a bias (added before the rotation)."""
    monkeypatch.setenv("ACTSPARSE_KERNELS", "force")
    H, Hkv, D, K = 4, 2, 16, 40
    w = torch.randn((H + 2 * Hkv) * D, K, device=DEVICE)
    fused = []
    real = kernels.gemv_rope
    monkeypatch.setattr(kernels, "gemv_rope", lambda *a: fused.append(1) or real(*a))
    for B, bias in ((1, None), (3, None), (1, torch.randn(w.shape[0], device=DEVICE))):
        x = torch.randn(B, 1, K, device=DEVICE)
        rope, caches, ref_caches = rope_case(H, Hkv, D, torch.float32)
        caches = [torch.cat([c, c]) for c in caches]  # room for 3 sequences (+ one untouched)
        ref_caches = [c.clone() for c in caches]
        q = kernels.linear(x, w, bias, rope=(*rope, *caches, H))
        ref_q = kernels.rope_kv_update_ref(torch.nn.functional.linear(x, w, bias).view(B, -1), *rope, *ref_caches, H)
        assert q.shape == (B, H, D) and rel_err(q, ref_q) < 1e-4
        for c, r in zip(caches, ref_caches):
            assert rel_err(c, r) < 1e-5 and torch.equal(c[B:], r[B:])
    assert len(fused) == 1


def test_rope_fusable():
    """The epilogue needs each column block inside one head, half of it first-half columns: block_n divides
    head_dim and is a multiple of 4; the caches alike; the column count that of q, k and v."""
    rope, caches, _ = rope_case(4, 2, 16, torch.float32)
    assert kernels.rope_fusable(128, 16, *rope, *caches, 4) and kernels.rope_fusable(128, 4, *rope, *caches, 4)
    assert not kernels.rope_fusable(128, 32, *rope, *caches, 4)  # a block over two heads
    assert not kernels.rope_fusable(128, 2, *rope, *caches, 4)  # half a block: one column
    assert not kernels.rope_fusable(96, 16, *rope, *caches, 4)  # not q/k/v of these heads
    longer = torch.zeros(2, 2, 40, 16, device=DEVICE)[:, :, :20]  # the V cache's head stride another
    assert not kernels.rope_fusable(128, 16, *rope, caches[0], longer, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_model_dense_decode_kernel_path_equals_reference(dtype, bias, monkeypatch):
    """The dense model's decode steps through the gemv kernels (RMSNorm in the q/k/v, gate/up
    and LM-head prologues, residual adds in the o and down epilogues, RoPE and the cache write in
    q/k/v's epilogue, decode attention kernel) give the logits of the plain-PyTorch path. With a
    q/k/v bias, added after the kernel, RoPE is rope_kv_update's."""
    _, model = tiny_model(std=0.2, norm_std=0.2, attention_bias=bias)
    calls, rope_calls, rope_kv = [], [], []
    for name, log in (("gemv", calls), ("gemv_rope", rope_calls), ("rope_kv_update", rope_kv)):
        monkeypatch.setattr(kernels, name, lambda *a, real=getattr(kernels, name), log=log: log.append(
            a[3] is not None if log is calls else 1) or real(*a))
    err_kernel, err_torch = decode_errors(model, dtype, monkeypatch)
    qkv = 3 * 2  # 3 steps, 2 layers
    assert (len(rope_calls), len(rope_kv)) == ((0, qkv) if bias else (qkv, 0))
    assert calls.count(True) == 3 * (2 + 1) + (qkv if bias else 0)  # norms fused: gate/up, LM head (q/k/v)
    assert calls.count(False) == 3 * 2 * 2  # o, down
    # fp32: the same function; bf16: no further from the fp32 logits than the PyTorch path (the
    # fused norm keeps RMSNorm(x) * g in fp32, where the PyTorch path rounds it to bf16 twice)
    assert err_kernel < (TOL[dtype] if dtype == torch.float32 else 1.5 * err_torch + 1e-3)


def decode_errors(model, dtype, monkeypatch, prepare=lambda model: None):
    """A 5-token prefill and 3 decode steps on the PyTorch path in fp32 and in dtype, and on the
    kernel path in dtype (prepare(model) after each cast). Returns the relative errors of the
    kernel path's and the PyTorch path's dtype logits from the fp32 ones."""
    logits = {}
    for flag, dt in (("0", torch.float32), ("0", dtype), ("force", dtype)):
        monkeypatch.setenv("ACTSPARSE_KERNELS", flag)
        model = model.to(dt)
        prepare(model)
        model.max_seq_len = -1  # new caches in this dtype
        model.setup_caches(max_batch_size=1, max_seq_len=16)
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9, 2, 4]], device=DEVICE), torch.arange(5, device=DEVICE))
            logits[flag, dt] = torch.stack([model(torch.tensor([[t]], device=DEVICE), torch.tensor([5 + i], device=DEVICE))
                                            for i, t in enumerate([7, 3, 11])]).float()
    exact = logits["0", torch.float32]
    err_kernel, err_torch = rel_err(logits["force", dtype], exact), rel_err(logits["0", dtype], exact)
    print(f"{dtype}: kernel path {err_kernel:.2e}, PyTorch path {err_torch:.2e} from fp32")
    return err_kernel, err_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("K", [150, 151])  # batch 1, 16-bit: pairs of channels as 32-bit words / not (odd K)
def test_gated_rows(dtype, B, mode, sparsity, K):
    N = 77  # odd
    x = torch.randn(B, K, device=DEVICE).to(dtype)
    assert kernels.packed_pairs(x) == (dtype != torch.float32 and K % 2 == 0)
    w1 = torch.randn(N, K, device=DEVICE).to(dtype)
    w2 = torch.randn(N, K, device=DEVICE).to(dtype)
    p = torch.randn(B, N, device=DEVICE).to(dtype)
    if mode == 0:
        t = thresholds_for(torch.nn.functional.silu(p.float()), sparsity)
    elif mode == 1:
        t = thresholds_for(p, sparsity)
    else:
        t = 0.0
        p = p.float() - thresholds_for(p, sparsity) if sparsity < 1.0 else -p.float().abs() - 1
        p = p.to(dtype)
    torch.empty(B, N, device=DEVICE).fill_(float("nan"))  # poison the allocator's next block: dropped rows write 0
    y = kernels.gated_rows(x, w1, w2 if mode == 2 else None, p, t, mode)
    ref = kernels.gated_rows_ref(x, w1, w2 if mode == 2 else None, p, t, mode)
    assert not torch.isnan(y).any()
    if sparsity == 1.0:
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert rel_err(y, ref) < TOL[dtype]


def test_block_n_for_segments():
    assert kernels.block_n_for([4096, 1024, 1024], cap=256) == 256
    assert kernels.block_n_for([576, 192, 192], cap=256) == 64
    assert kernels.block_n_for([77]) == 1


def test_batch_kernel_pays():
    """The batch kernels where the union of the sequences' kept rows, 1 - s^B, is at most 60%: the
    measured cases (BENCHMARKS.md session 13) fall on the side that was faster."""
    import sparsity as sp
    assert sp.BATCH_KERNEL_MAX_UNION == 0.6
    assert sp.batch_kernel_pays(1, 0.0) and sp.batch_kernel_pays(1, 0.5)  # batch 1: always the kernels
    assert sp.batch_kernel_pays(2, 0.7)  # M-COUNTDOWN 70%, batch 2: gated_rows 1.02x vs cuBLAS 0.99x
    assert not any(sp.batch_kernel_pays(b, 0.5) for b in (2, 3, 4, 8))  # TEAL, CATS 50%: cuBLAS
    assert not sp.batch_kernel_pays(3, 0.7) and sp.batch_kernel_pays(8, 0.95)


@pytest.mark.parametrize("method", ["teal", "scap", "cats", "m-countdown", "d-countdown", "d-countdown-oracle"])
@pytest.mark.parametrize("B,path", [(1, "rule"), (2, "kernels"), (5, "kernels"), (2, "cublas"), (5, "cublas")])
def test_model_decode_kernel_path_equals_reference(method, B, path, monkeypatch):
    """sparsity.py's GPU decode path (kernels) equals its reference path on a tiny model, batch 2 and 5
    through either side of sparsity.batch_kernel_pays: the batch kernels (input_sparse_gemv's tl.dot form,
    gated_rows), or cuBLAS on each part's thresholded input and CATS / COUNTDOWN's formulas."""
    import calibrate as cal
    import sparsity as sp
    if path != "rule":  # either side of the rule, whatever the sparsity
        monkeypatch.setattr(sp, "BATCH_KERNEL_MAX_UNION", {"kernels": 1.0, "cublas": -1.0}[path])
    batch_kernels = B == 1 or path == "kernels"
    calls, rows = [], []
    real, real_rows = kernels.input_sparse_gemv, kernels.gated_rows
    monkeypatch.setattr(kernels, "input_sparse_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(kernels, "gated_rows", lambda *a: rows.append(1) or real_rows(*a))
    cfg_m, model = tiny_model(std=0.2, attention_bias=True)
    batches = torch.randint(0, 61, (3, 32), device=DEVICE)
    cfg = cal.calibrate(model, batches, method=method, sparsity=0.5, rank=8, progress=False,
                        scap="q,median,0.3,k,zero,0.5,o,median,0.4,up,median,0.35,gate,zero,0.35,down,kde,0.5")
    sp.apply(model, cfg)
    x = torch.randn(B, 1, 64, device=DEVICE)
    for layer in model.layers:
        monkeypatch.setenv("ACTSPARSE_KERNELS", "0")  # the reference path, also on GPU
        with torch.no_grad():
            ref_mlp = sp.sparse_mlp(x, layer.feed_forward, layer.feed_forward.sparsity)
            ref_qkv = sp.sparse_qkv(x, layer.attention.wqkv, layer.attention.sparsity)
        monkeypatch.delenv("ACTSPARSE_KERNELS")
        sp.prepare_kernels(layer, cfg_m, force=True)
        a, f = layer.attention.sparsity, layer.feed_forward.sparsity
        with torch.no_grad():
            if method in ("teal", "scap"):
                # uniform TEAL: q, k, v share the input and so the threshold, one part; SCAP's spec: three
                parts = [len(a.qkv_kernel.parts), len(f.gate_up_kernel.parts)]
                assert parts == ([1, 1] if method == "teal" else [3, 2])
                got = sp._kernel_linear(x, layer.attention.wqkv.weight, layer.attention.wqkv.bias, a.qkv_kernel)
                assert rel_err(got, ref_qkv) < 1e-4
                # gate and up in one launch over the merged input-major buffer
                assert f.gate_up_kernel is not None and f.gate.t_col is None
                monkeypatch.setenv("ACTSPARSE_KERNELS", "force")
                assert rel_err(sp.sparse_mlp(x, layer.feed_forward, f), ref_mlp) < 1e-4
                monkeypatch.delenv("ACTSPARSE_KERNELS")
                s = torch.randn(B, 1, 96, device=DEVICE)
                assert rel_err(sp._kernel_linear(s, layer.feed_forward.down.weight, None, f.down),
                               sp.sparse_linear(s, layer.feed_forward.down, dataclass_without_kernel(f.down))) < 1e-4
            else:
                assert rel_err(sp._kernel_mlp(x, layer.feed_forward, f), ref_mlp) < 1e-4
                # the decode step's dispatch: gated_rows, or the formulas on cuBLAS
                rows.clear()
                monkeypatch.setenv("ACTSPARSE_KERNELS", "force")
                assert rel_err(sp.sparse_mlp(x, layer.feed_forward, f), ref_mlp) < 1e-4
                monkeypatch.delenv("ACTSPARSE_KERNELS")
                assert bool(rows) == (batch_kernels and method != "d-countdown-oracle")
    assert set(calls) == ({B} if batch_kernels else set())


@pytest.mark.parametrize("max_union", [1.0, -1.0])
def test_down_projection_takes_fp32_coefficients(max_union, monkeypatch):
    """CATS / COUNTDOWN's down projection reads gated_rows' fp32 coefficients with bf16 weights, through the batch
    kernel or cuBLAS on the thresholded input: both round them to bf16, as the reference."""
    import calibrate as cal
    import sparsity as sp
    monkeypatch.setattr(sp, "BATCH_KERNEL_MAX_UNION", max_union)
    B = 4
    cfg_m, model = tiny_model(std=0.2)
    cfg = cal.calibrate(model, torch.randint(0, 61, (3, 32), device=DEVICE), method="cats", sparsity=0.5,
                        progress=False)
    model.to(torch.bfloat16)
    sp.apply(model, cfg)
    layer = model.layers[0]
    sp.prepare_kernels(layer, cfg_m, force=True)
    s = torch.randn(B, 1, 96, device=DEVICE) * (torch.rand(B, 1, 96, device=DEVICE) > 0.5)
    with torch.no_grad():
        got = sp._kernel_linear(s, layer.feed_forward.down.weight, None, layer.feed_forward.sparsity.down_kernel)
        ref = torch.nn.functional.linear(s.to(torch.bfloat16), layer.feed_forward.down.weight)
    assert rel_err(got.float(), ref.float()) < TOL[torch.bfloat16]


@pytest.mark.parametrize("method,dtype,sparsity,defer", [
    ("teal", torch.float32, 0.5, True), ("teal", torch.bfloat16, 0.5, True), ("scap", torch.float32, None, True),
    ("teal", torch.float32, 0.5, False), ("teal", torch.bfloat16, 0.5, False), ("scap", torch.float32, None, False),
    # a q/k/v bias: RoPE and the cache write after the GEMV, the stream's copy as an op
    ("teal-bias", torch.float32, 0.5, True), ("teal-bias", torch.bfloat16, 0.5, True),
    ("cats", torch.float32, 0.5, True), ("m-countdown", torch.float32, 0.5, True),
    ("d-countdown", torch.float32, 0.5, True),
    # calibrated to >= COMPACT_MIN_SPARSITY: the kept-channel-list loop
    ("teal", torch.float32, 0.8, True), ("teal", torch.bfloat16, 0.8, True), ("teal", torch.float32, 0.8, False),
    ("cats", torch.float32, 0.8, True), ("m-countdown", torch.float32, 0.8, True),
    ("d-countdown", torch.float32, 0.8, True)])
def test_model_sparse_decode_fused_path_equals_reference(method, dtype, sparsity, defer, monkeypatch):
    """A sparse model's batch-1 decode steps through kernels.sparse_gemv (RMSNorm, thresholds,
    K-chunk sums, SiLU * up and the residual adds inside; the step's window supplies the
    counters) give the logits of the plain-PyTorch path; sites calibrated to high sparsity
    (SCAP's spec here: 0.3-0.5, below) walk the kept-channel list. TEAL / SCAP with deferred sums
    (sparsity.DEFER_SUMS): o and down through sparse_gemv_add into the fp32 stream that q/k/v and
    gate+up copied, gate+up's sums left unmerged for down; without: each projection merges its own."""
    import calibrate as cal
    import sparsity as sp
    monkeypatch.setattr(kernels, "GEMV_TUNING", dict(kernels.GEMV_TUNING, block_k=32, programs_per_sm=8))
    monkeypatch.setattr(sp, "DEFER_SUMS", defer)
    bias = method.endswith("-bias")
    method = method.removesuffix("-bias")
    cfg_m, model = tiny_model(std=0.2, norm_std=0.2, attention_bias=bias)
    cfg = cal.calibrate(model, torch.randint(0, 61, (3, 32), device=DEVICE), method=method, sparsity=sparsity or 0.5,
                        rank=8,
                        progress=False, scap="q,median,0.3,k,zero,0.5,o,median,0.4,up,median,0.35,gate,zero,0.35,"
                                            "down,kde,0.5")
    calls, roped, adds = [], [], []
    real, real_rope, real_add = kernels.sparse_gemv, kernels.sparse_gemv_rope, kernels.sparse_gemv_add
    monkeypatch.setattr(kernels, "sparse_gemv", lambda *a: calls.append((a[7] is not None, a[11])) or real(*a))
    monkeypatch.setattr(kernels, "sparse_gemv_rope",  # q/k/v, with RoPE and the cache write
                        lambda *a: roped.append(1) or calls.append((a[7] is not None, a[9])) or real_rope(*a))
    real_parts = kernels.sparse_gemv_parts
    monkeypatch.setattr(kernels, "sparse_gemv_parts",  # deferred sums: gate+up, its chunks' sums left for down
                        lambda *a: calls.append((a[6] is not None, a[8])) or real_parts(*a))
    monkeypatch.setattr(kernels, "sparse_gemv_add",  # deferred sums: o (x: the attention output), down (glu)
                        lambda *a: adds.append(a[8] if len(a) > 8 else False) or calls.append((False, a[7]))
                        or real_add(*a))
    normed, real_norm = [], kernels.gemv_norm  # CATS / COUNTDOWN: the MLP's norm inside the GEMV before gated_rows
    monkeypatch.setattr(kernels, "gemv_norm", lambda *a: normed.append(1) or real_norm(*a))

    def prepare(model):
        sp.apply(model, cfg)
        for layer in model.layers:
            sp.prepare_kernels(layer, cfg_m, force=True)

    err_kernel, err_torch = decode_errors(model, dtype, monkeypatch, prepare)
    per_layer = {"teal": (2, 2), "scap": (2, 2)}.get(method, (0, 1))  # (with the norm, without): qkv, gate/up; o, down
    with_norm = [norm for norm, _ in calls]
    assert with_norm.count(True) == 3 * 2 * per_layer[0] and with_norm.count(False) == 3 * 2 * per_layer[1]
    assert len(roped) == (3 * 2 if method in ("teal", "scap") and not bias else 0)
    deferred = defer and method in ("teal", "scap")
    assert adds == ([False, True] * 3 * 2 if deferred else [])  # o, then down from gate+up's sums; per layer, step
    assert all(compact == ((sparsity or 0) >= kernels.COMPACT_MIN_SPARSITY) for _, compact in calls)
    assert len(normed) == (0 if method in ("teal", "scap") else 3 * 2)
    # fp32: the same function. bf16: channels near a threshold fall on either side in the two
    # paths (the kernel thresholds the fp32 RMSNorm(x) * g, the PyTorch path its bf16 rounding),
    # so only "no worse than the PyTorch path" is asked.
    assert err_kernel < (TOL[dtype] if dtype == torch.float32 else 1.5 * err_torch + 1e-3)


def test_apply_restores_layouts():
    """Each config gets the weight layouts it needs: a TEAL config stores every thresholded
    projection input-major; applying CATS afterwards (or no config) gives the projections it does
    not threshold back their row-major layout (the dense gemv and gated_rows read that), same logits."""
    import calibrate as cal
    import sparsity as sp
    cfg_m, model = tiny_model(std=0.2)
    tokens = torch.randint(0, 61, (2, 16), device=DEVICE)
    with torch.no_grad():
        dense = model(tokens)
    layer = model.layers[0]
    linears = {"wqkv": layer.attention.wqkv, "wo": layer.attention.wo, "gate": layer.feed_forward.gate,
               "up": layer.feed_forward.up, "down": layer.feed_forward.down}

    def input_major():
        return {n for n, lin in linears.items() if not lin.weight.is_contiguous()}

    for method, expect in (("teal", set(linears)), ("cats", {"down"}), (None, set())):
        cfg = cal.calibrate(model, tokens, method=method, sparsity=0.5, progress=False) if method else None
        sp.apply(model, cfg)
        for lay in model.layers:
            sp.prepare_kernels(lay, cfg_m, force=True)
        assert input_major() == expect, method
    with torch.no_grad():
        assert torch.equal(model(tokens), dense)


def dataclass_without_kernel(site):
    import dataclasses
    return dataclasses.replace(site, t_col=None)


@pytest.mark.parametrize("method,batch,max_union", [("teal", 1, None), ("cats", 1, None), ("m-countdown", 1, None),
                                                    ("d-countdown", 1, None), ("teal", 2, 1.0), ("cats", 2, 1.0),
                                                    ("teal", 4, -1.0), ("cats", 4, -1.0)])
def test_decode_step_traces_without_graph_breaks(method, batch, max_union, monkeypatch):
    """generate.py's decode step with the kernel path, under torch.compile(fullgraph=True)
    (dynamo tracing, eager backend): a graph break is an error. Batch 2: the batch kernels; batch 4:
    cuBLAS on the thresholded inputs (sparsity._dense_union) and CATS' formula."""
    import calibrate as cal
    import generate
    import sparsity as sp
    if max_union is not None:  # batch 2 / 4: one side of sparsity.batch_kernel_pays, whatever the sparsity
        monkeypatch.setattr(sp, "BATCH_KERNEL_MAX_UNION", max_union)
    cfg_m, model = tiny_model()
    cfg = cal.calibrate(model, torch.randint(0, 61, (2, 16), device=DEVICE), method=method, sparsity=0.5,
                        rank=8, progress=False)
    sp.apply(model, cfg)
    for layer in model.layers:
        sp.prepare_kernels(layer, cfg_m, force=True)
    monkeypatch.setenv("ACTSPARSE_KERNELS", "force")
    model.setup_caches(max_batch_size=batch, max_seq_len=16)
    step = torch.compile(generate.decode_one_token, backend="eager", fullgraph=True)
    x, pos = torch.arange(3, 3 + batch, device=DEVICE).view(batch, 1), torch.tensor([4], device=DEVICE)
    with torch.no_grad():
        compiled = step(model, x, pos, 0.0, None)
        monkeypatch.setenv("ACTSPARSE_KERNELS", "0")
        eager = generate.decode_one_token(model, x, pos, 0.0, None)
    assert compiled.shape == (batch, 1) and torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs an sm_90+ GPU (on CPU, kernel_regs compiles it)")
@pytest.mark.parametrize("method,batch,sparsity,defer", [(None, 1, 0, False), ("teal", 1, 0.5, False),
                                                         ("teal", 1, 0.5, True), ("top-theta", 1, 0, False),
                                                         ("cats", 1, 0.5, False), ("teal", 2, 0.8, False),
                                                         ("m-countdown", 2, 0.7, False), ("teal", 4, 0.5, False)])
def test_pdl_decode_equals_serial_launches(method, batch, sparsity, defer, monkeypatch):
    """The compiled decode step (reduce-overhead: CUDA graphs) with every kernel launched by
    programmatic dependent launch gives the logits of serial launches bit for bit: no kernel
    reads or writes before it waits for the previous one (_await_previous). Real head sizes,
    a cache long enough for several key chunks merged in-kernel, grids of several waves;
    CATS: gated_rows; batch 2 at high sparsity: input_sparse_gemv's tl.dot form and gated_rows between compiled ops;
    batch 4 at 50%: cuBLAS on the thresholded inputs (sparsity.batch_kernel_pays). Deferred sums
    (sparsity.DEFER_SUMS) add with atomics in no fixed order: that row, with PDL, is compared with
    the serial launches of the merging kernels within bf16 rounding instead (a read before the wait
    would be far off)."""
    import calibrate as cal
    import sparsity as sp
    from model import ModelArgs, random_model
    cfg = ModelArgs(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128, intermediate_size=3584,
                    vocab_size=512)
    model = random_model(cfg, device="cuda", dtype=torch.bfloat16)
    ctx, tokens = 1500, torch.randint(0, 512, (8,), device="cuda")
    if method:
        kw = dict(attention="top-theta", k=64) if method == "top-theta" else dict(method=method, sparsity=sparsity)
        sp.apply(model, cal.calibrate(model, torch.randint(0, 512, (1, 256), device="cuda"), progress=False, **kw))
    prompt = torch.randint(0, 512, (batch, ctx), device="cuda")

    def decode(pdl, defer=False):
        monkeypatch.setattr(kernels, "PDL", pdl)
        monkeypatch.setattr(sp, "DEFER_SUMS", defer)
        torch._dynamo.reset()
        model.setup_caches(max_batch_size=batch, max_seq_len=ctx + len(tokens))
        with torch.no_grad():
            model(prompt, torch.arange(ctx, device="cuda"))
            step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            return torch.stack([step(t.view(1, 1).expand(batch, 1), torch.tensor([ctx + i], device="cuda")).clone()
                                for i, t in enumerate(tokens)])

    serial = decode(False)
    assert serial.isfinite().all()
    if defer:
        assert rel_err(decode(True, True), serial) < 1e-2
    else:
        assert torch.equal(decode(True), serial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,D", [(1, 4, 2, 16), (2, 3, 3, 24)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("sdc", [0, 1, 2])
@pytest.mark.parametrize("chunks", ["several", "one", "wide"])
def test_theta_attention(dtype, B, H, Hkv, D, sparsity, sdc, chunks, monkeypatch):
    """Top-Theta decode attention: odd head dim, GQA and plain, a visible window lo..hi that
    is not a multiple of the key block, thresholds that keep everything and nothing; the
    cache split into several key chunks of several 32-key blocks, into one chunk, or into
    chunks of one or two 128-key blocks ("wide"); the chunks' states merged by the merge kernel,
    with several chunks 2 per load and the head dim in slices of 8."""
    tuning = dict(several=dict(block_l=32, keys_per_program=64, merge_chunks=2, merge_block_d=8),  # merged 2 per load
                  one=dict(block_l=32, keys_per_program=1000), wide=dict(block_l=128, keys_per_program=128))[chunks]
    monkeypatch.setattr(kernels, "ATTN_TUNING", dict(kernels.ATTN_TUNING, **tuning))
    L, lo, hi = 300, 7, 290
    n_split = kernels.attention_splits(B, Hkv, L, torch.device(DEVICE))
    assert (n_split == 1) == (chunks == "one") and (B > 1 or n_split in (1, 5, 3))
    q = torch.randn(B, H, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hkv, L, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, L, D, device=DEVICE).to(dtype)
    a = torch.einsum("bhd,bhnd->bhn", q.float(), k[:, :, lo:hi].float().repeat_interleave(H // Hkv, 1)) / D ** 0.5
    theta = torch.tensor([thresholds_for(a[:, h], sparsity) for h in range(H)], device=DEVICE)
    theta[0] = -float("inf")  # one dense head
    lohi = torch.tensor([lo, hi], dtype=torch.int32, device=DEVICE)
    y = kernels.theta_attention(q, k, v, theta, lohi, sdc)
    ref = kernels.theta_attention_ref(q, k, v, theta, lo, hi, sdc)
    assert y.dtype == dtype and not torch.isnan(y).any()
    for h in range(H):  # per head: a head that keeps nothing has outputs ~100x smaller than a dense one
        assert rel_err(y[:, h], ref[:, h]) < TOL[dtype], h


@pytest.mark.parametrize("sdc", [0, 2])
def test_theta_attention_picks_the_threshold_column(sdc):
    """With an (H, N) table the kernels use column min(n, N) - 1 for a row seeing n = hi - lo keys
    (the last column beyond the table), and every score when n <= dense_below or dense_row is set."""
    B, H, Hkv, D, L = 1, 4, 2, 16, 200
    q = torch.randn(B, H, D, device=DEVICE)
    k = torch.randn(B, Hkv, L, D, device=DEVICE)
    v = torch.randn(B, Hkv, L, D, device=DEVICE)
    # odd columns drop most scores, even ones keep nearly all: a wrong column changes the result
    table = torch.where(torch.arange(50, device=DEVICE) % 2 == 1, 0.8, -3.0) + 0.1 * torch.randn(H, 50, device=DEVICE)
    for lo, hi, dense_below, dense_row, col in ((3, 33, 0, None, 29), (0, 180, 0, None, 49), (5, 40, 35, None, None),
                                                (5, 40, 34, False, 34), (5, 40, 0, True, None)):
        theta = torch.full((H,), -float("inf"), device=DEVICE) if col is None else table[:, col]
        ref = kernels.theta_attention_ref(q, k, v, theta, lo, hi, sdc)
        lohi = torch.tensor([lo, hi], dtype=torch.int32, device=DEVICE)
        row = None if dense_row is None else torch.tensor([dense_row], device=DEVICE)
        y = kernels.theta_attention(q, k, v, table, lohi, sdc, dense_below, row)
        assert rel_err(y, ref) < TOL[torch.float32], (lo, hi, dense_below, dense_row)
        other = kernels.theta_attention_ref(q, k, v, table[:, (col or 0) - 1], lo, hi, sdc)
        assert rel_err(y, other) > 1e-2  # a neighbouring column (or any column, for dense) gives another result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys_per_program", [1000, 64, 16])  # one chunk (normalised in the kernel) / merged
@pytest.mark.parametrize("merge_block", [1, 4])
def test_decode_attention(dtype, keys_per_program, merge_block, monkeypatch):
    """Dense decode attention (every score kept) equals the reference over a window lo..hi;
    with several chunks merged in-kernel (the last program of each KV head, one or 4 chunks
    per load), also when most chunks see no key, and called again (the merge counters are
    left at zero)."""
    monkeypatch.setattr(kernels, "DENSE_ATTN_TUNING", dict(kernels.DENSE_ATTN_TUNING, programs_per_sm=64,
                                                           keys_per_program=keys_per_program, merge_block=merge_block))
    B, H, Hkv, D, L = 2, 6, 2, 24, 300
    assert kernels.attention_splits(B, Hkv, L, torch.device(DEVICE), dense=True) == -(-L // keys_per_program)
    for lo, hi in ((5, 201), (290, 293), (0, 1)):
        q = torch.randn(B, H, D, device=DEVICE).to(dtype)
        k = torch.randn(B, Hkv, L, D, device=DEVICE).to(dtype)
        v = torch.randn(B, Hkv, L, D, device=DEVICE).to(dtype)
        v[:, :, hi:] = float("nan")  # keys past the window must never be read into the result
        lohi = torch.tensor([lo, hi] + [0] * (B * Hkv), dtype=torch.int32, device=DEVICE)  # + merge counters
        ref = kernels.theta_attention_ref(q, k, v.nan_to_num(0.0), torch.full((H,), -float("inf"), device=DEVICE),
                                          lo, hi, 0)
        for _ in range(2):
            y = kernels.decode_attention(q, k, v, lohi)
            assert not torch.isnan(y).any()
            assert rel_err(y, ref) < TOL[dtype]
        assert not lohi[2:].any()  # the counters are left at zero
    if kernels.attention_splits(B, Hkv, L, torch.device(DEVICE), dense=True) > 1:  # several chunks, no counters
        with pytest.raises(ValueError, match="zeroed counters"):
            kernels.decode_attention(q, k, v, lohi[:2])
    kernels.DENSE_ATTN_TUNING["merge_block"] = 0
    with pytest.raises(ValueError, match="merge_block"):
        kernels.decode_attention(q, k, v, lohi)


@pytest.mark.parametrize("sdc", ["none", "exact", "theta", "dense"])
def test_model_decode_theta_attention_kernel_equals_reference(sdc, monkeypatch):
    """A decode step of a Top-Theta model (GQA, sliding window) through the kernel equals the
    reference thresholded_attention, and the thresholds really drop scores; with no config
    ("dense") the kernel's decode attention equals SDPA's. Several key chunks: merged by the merge
    kernel (Top-Theta) or in the kernel, two per load (dense; the model's window tensor has the counters)."""
    import calibrate as cal
    import sparsity as sp
    monkeypatch.setitem(kernels.ATTN_TUNING, "keys_per_program", 8)
    monkeypatch.setattr(kernels, "DENSE_ATTN_TUNING", dict(kernels.DENSE_ATTN_TUNING, keys_per_program=8,
                                                           programs_per_sm=64, merge_block=2))
    cfg_m, model = tiny_model(std=0.3, sliding_window=24)
    if sdc != "dense":
        cfg = cal.calibrate(model, torch.randint(0, 61, (3, 32), device=DEVICE), attention="top-theta", k=4,
                            sdc=sdc, progress=False)
        sp.apply(model, cfg)
        for layer in model.layers:
            sp.prepare_kernels(layer, cfg_m, force=True)
            assert layer.attention.sparsity.scores.kernel
    model.setup_caches(max_batch_size=2, max_seq_len=40)
    prompt = torch.randint(0, 61, (2, 30), device=DEVICE)
    x, pos = torch.randint(0, 61, (2, 1), device=DEVICE), torch.tensor([30], device=DEVICE)
    with torch.no_grad():
        monkeypatch.setenv("ACTSPARSE_KERNELS", "0")
        model(prompt, torch.arange(30, device=DEVICE))
        ref = model(x, pos)
        sp.start_recording(model)
        model(x, pos)
        measured = sp.stop_recording(model)
        monkeypatch.setenv("ACTSPARSE_KERNELS", "force")
        got = model(x, pos)
    if sdc != "dense":
        assert min(m["scores"] for m in measured.values()) > 0.3  # scores were dropped
    assert rel_err(got, ref) < 1e-4


def test_kernels_compile_for_sm90():
    """scripts/kernel_regs.py compiles every decode-path kernel variant for an H100 with Triton's
    own compiler and ptxas (no GPU needed): code the interpreter accepts but the GPU compiler
    rejects fails here, and each line reports registers, spills and (--loops) the instructions per
    iteration of the kernel's loops, which every one of these kernels has."""
    import os
    import re
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_regs.py"), "--loops"], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "warps:" in line]
    # gemv, sparse_gemv (q/k/v with RoPE too; deferred sums), the batch kernel, gated_rows, attention
    assert len(lines) == 4 + 18 + 3 + 2 + 3, out.stdout
    assert all("registers" in line and "waves" in line for line in lines), out.stdout
    assert all(re.search(r"loop instructions \[[1-9]\d+", line) for line in lines), out.stdout
