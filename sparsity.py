"""Activation sparsity, called inline from model.py at each marked site.

Every function here takes the site's config (or None) last. With None it is
the dense computation, written exactly as a dense model writes it, so a model
with no sparsity config traces to the dense graph. The dense graph itself runs
tuned kernels on GPU decode steps (the same in a dense and a sparse model): the
batch-1 GEMVs (model.Linear -> kernels.linear) and the decode attention
(kernels.decode_attention: split over the keys, where the masked SDPA reads the
whole static cache on a few thread blocks; 4x faster at 145 cache positions,
9x at 8k, BENCHMARKS.md).

Sites (model.py)                 function            methods
  attention input (q/k/v input)  sparse_qkv          TEAL, SCAP
  attention scores               sparse_attention    Top-Theta, top-k
  attention output (o input)     sparse_linear       TEAL, SCAP
  MLP input / MLP intermediate   sparse_mlp          TEAL, SCAP, CATS, M-/D-COUNTDOWN

Notation for the SwiGLU MLP: g = W_gate x, u = W_up x, s = SiLU(g) * u, y = W_down s.

Which tokens are sparse is explicit: `dense_rows` (bool, one per query row of
the current forward) marks rows that stay dense. Config field `tokens` is
"all" (every token sparse; CATS, SCAP evaluate so), "decode" (prompt/context
dense, generated/continuation tokens sparse; TEAL's fast path, COUNTDOWN) or
"last-half" (TEAL's accuracy path: the last half of the prompt sparse too);
generate.py and eval.py turn it into `dense_prefix` for Transformer.forward.

This file is the plain-PyTorch reference: masked activations are computed
densely and zeroed, which gives the same numbers as skipping the weights.
kernels.py makes the skipping real on GPU (use_kernels below).

The config file (one per calibration, written by calibrate.py) is a
safetensors file: tensors (thresholds, modes, predictors, attention threshold
tables) plus a JSON header with the methods, targets, calibrated sparsities
and a fingerprint of the model it was made for.
"""
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels

FORMAT = "activation-sparsity/1"
PROJ_METHODS = ("teal", "scap", "cats", "m-countdown", "d-countdown", "d-countdown-oracle")
ATTN_METHODS = ("top-theta", "top-k")
LINEAR_SITES = ("q", "k", "v", "o", "gate", "up", "down")
DENSE_ATTENTION_KERNEL = True  # dense decode attention on GPU through kernels.decode_attention (bench: A/B)
# Batch-1 GPU decode through kernels.sparse_gemv: norm + sparse GEMV + K-chunk sums + SiLU(g) * u or
# the residual in one kernel (q/k/v: and RoPE + the cache write), as many kernels per layer as dense (BENCHMARKS.md,
# session 5). False: the norm, input_sparse_gemv and the sums as separate ops (`bench.py --e2e teal50-unfused`, A/B).
FUSED_SPARSE_GEMV = True
# Deferred sums, in a batch-1 GPU decode step of a layer whose four projections are all sparse_gemv sites (TEAL,
# SCAP): the o and down projections add their K chunks' partial sums into an fp32 copy of the residual stream with
# atomics (kernels.sparse_gemv_add), which the q/k/v and gate+up kernels wrote while normalising it; gate+up leaves
# its chunks' sums to the down projection, which forms SiLU(g) * u as it loads them. No program waits to merge,
# 1.2-1.8 us per launch (BENCHMARKS.md session 20). The kernels that read the stream round it as a merge would
# have, so the step computes the same function; the atomics' order makes the sums' last bits vary between runs.
# False: every projection merges its own sums (`bench.py --e2e teal50-nodefer`, A/B).
DEFER_SUMS = True
# A GPU decode step of B >= 2 sequences reads a weight row if any sequence keeps its channel: about 1 - s^B of the
# rows for sites calibrated to sparsity s (the sequences' kept channels are close to independent: TEAL 50% on
# SmolLM2 reads 74% of the rows at batch 2, 91% at batch 4, 98% at batch 8; BENCHMARKS.md session 13). Where that
# union is above BATCH_KERNEL_MAX_UNION, cuBLAS over every row beats the batch kernels (input_sparse_gemv's tl.dot
# form, gated_rows): the site runs cuBLAS on its thresholded input, CATS / COUNTDOWN's MLP its formulas. H100,
# Llama-3-8B, vs dense, batch kernels / cuBLAS: TEAL 50% batch 2 1.03x / 1.02x, batch 3 0.95x / 1.02x, batch 4
# 0.94x / 1.03x, batch 8 0.89x / 1.05x; CATS 50% batch 2 0.96x / 1.00x, batch 4 0.43x / 1.00x; M-COUNTDOWN 70%
# batch 2 (union 51%) 1.02x / 0.99x. A/B: `bench.py --e2e teal50-batchkernel` / `teal50-cublas`.
BATCH_KERNEL_MAX_UNION = 0.6


def batch_kernel_pays(B: int, s: float) -> bool:
    """Batch 1, or B sequences whose union of kept rows (sites at sparsity s) is small enough for the batch kernels."""
    return B == 1 or 1.0 - s ** B <= BATCH_KERNEL_MAX_UNION


# ----------------------------------------------------------------------------- config objects
@dataclass
class LinearSite:
    """Input thresholding of one projection (TEAL sec. 3; SCAP sec. 3 with Mode-Centering):
        y = W ((x - m) * 1[|x - m| > t]) + W m
    TEAL: m = 0. SCAP: m = the calibrated mode; W m (`shift_bias`, fp32) makes t = 0 exact."""
    threshold: Tensor  # scalar
    mode: Optional[Tensor] = None  # scalar or None (= 0)
    shift_bias: Optional[Tensor] = None  # (out,) fp32, W m; filled by apply()
    sparsity: float = 0.0  # the calibration target (fraction of inputs skipped): picks the kernel's loop
    # For kernels.input_sparse_gemv, filled by apply(): per-output-column t and m, block size.
    t_col: Optional[Tensor] = None
    m_col: Optional[Tensor] = None
    block_n: int = 0
    parts: tuple = ()  # (start, end) column ranges of one threshold and mode each (merged q/k/v, gate/up)

    @property
    def compact(self) -> bool:
        """The kernels walk this site's list of kept channels (calibrated to >= COMPACT_MIN_SPARSITY)."""
        return self.sparsity >= kernels.COMPACT_MIN_SPARSITY


@dataclass
class AttentionScores:
    """Top-Theta (arXiv 2502.08363) or top-k attention for one layer.
    thresholds: (H, N) theta per head and visible length n = 1..N (top-theta)."""
    method: str  # "top-theta" | "top-k"
    k: int  # rows that see n <= k keys stay dense; top-k keeps k per row
    placement: str = "pre"  # "pre": scaled scores (dropped -> -inf); "post": probabilities (dropped -> 0)
    thresholds: Optional[Tensor] = None
    sdc: str = "none"  # softmax-denominator compensation (pre only): none | exact | theta
    vmc: bool = False  # V-mean compensation
    collect: Optional[dict] = None  # calibration: {n: list of (H,) k-th values}
    kernel: bool = False  # decode through kernels.theta_attention (set by prepare_kernels)


@dataclass
class AttentionSparsity:
    q: Optional[LinearSite] = None
    k: Optional[LinearSite] = None
    v: Optional[LinearSite] = None
    o: Optional[LinearSite] = None
    scores: Optional[AttentionScores] = None
    sizes: tuple = ()  # (q_size, kv_size, kv_size): how wqkv's rows split
    qkv_kernel: Optional[LinearSite] = None  # q, k, v sites merged per column (kernel path)
    defers: bool = False  # the layer's GPU decode step can defer its sums (DEFER_SUMS; set by prepare_kernels)
    stats: Optional[dict] = None  # site -> [zeros, total] while recording

    @property
    def qkv(self):
        return (self.q, self.k, self.v) if (self.q or self.k or self.v) else None


@dataclass
class MLPSparsity:
    method: str  # one of PROJ_METHODS
    gate: Optional[LinearSite] = None  # teal / scap: input sites
    up: Optional[LinearSite] = None
    down: Optional[LinearSite] = None
    threshold: Optional[Tensor] = None  # cats: on |SiLU(g)|; m-countdown: on |u|
    ratio: Optional[float] = None  # the target fraction of zero coefficients (d-countdown-oracle: per token)
    predictor_v: Optional[Tensor] = None  # d-countdown: logit = (x V) U^T + b, V: (dim, r)
    predictor_u: Optional[Tensor] = None  # U: (d_ff, r)
    predictor_b: Optional[Tensor] = None  # b: (d_ff,)
    predictor_vt: Optional[Tensor] = None  # kernel path: V^T (r, dim), U, b (1, d_ff) in the model's dtype
    predictor_ut: Optional[Tensor] = None
    predictor_bt: Optional[Tensor] = None
    down_kernel: Optional[LinearSite] = None  # t = 0 on the down input: skip exact zeros (kernel path)
    gate_up_kernel: Optional[LinearSite] = None  # teal / scap: gate and up sites merged per column (kernel path)
    gate_up_weight: Optional[Tensor] = None  # (2 d_ff, dim) view of the input-major [gate; up] buffer
    kernel_t: float = 0.0  # `threshold` as a Python float for the kernel (no host sync in the graph)
    defers: bool = False  # as AttentionSparsity.defers
    next_attn: Optional[AttentionSparsity] = None  # the next layer's: if it defers, it reads this one's fp32 output
    stats: Optional[dict] = None


# ----------------------------------------------------------------------------- sites
def _record(stats, name, kept: Tensor, dense_rows, values: Optional[Tensor] = None):
    """Count zeros over the sparse rows only. kept: bool (..., S, C). With a "_dump" dict in
    stats (generate.py --dump-activations), also keep the sparsified input of the last row."""
    if stats is None:
        return
    if values is not None and stats.get("_dump") is not None:
        stats["_dump"][name] = values[..., -1, :].detach().float().cpu()
    if dense_rows is not None:
        kept = kept[..., ~dense_rows, :]
    entry = stats.setdefault(name, [0, 0])
    entry[0] += int((~kept).sum())
    entry[1] += kept.numel()


def threshold_input(x: Tensor, site: LinearSite, dense_rows=None):
    """(x - m) * 1[|x - m| > t], rows in dense_rows kept whole. Returns (x_tilde, kept)."""
    return threshold(x, site.threshold, site.mode, dense_rows)


def threshold(x: Tensor, t: Tensor, m: Optional[Tensor] = None, dense_rows=None):
    """threshold_input with t and m (0-d tensors) given directly."""
    c = x if m is None else x - m.to(x.dtype)
    kept = c.abs() > t.to(x.dtype)
    if dense_rows is not None:
        kept = kept | dense_rows[:, None]
    return c * kept, kept


def _kernel_step(x: Tensor, stats) -> bool:
    """A decode step on GPU (kernels enabled) that records nothing: the sites take the kernels."""
    return stats is None and kernels.enabled(x) and kernels.is_decode(x)


def sparse_linear(x: Tensor, linear: torch.nn.Linear, site=None, stats=None, name="", dense_rows=None,
                  weight=None, bias=None, residual=None, window=None, acc=None) -> Tensor:
    """[residual +] linear(x); with a LinearSite, W (x - m) * 1[|x - m| > t] + W m. window: the
    decode step's visible_window (its counters let the kernel add the residual itself). acc (deferred sums,
    see deferred_residual): the fp32 residual stream that the kernel adds into; returns it."""
    if acc is not None:
        kernels.sparse_gemv_add(x.view(1, -1), linear.weight.t(), site.t_col, site.m_col, site.shift_bias,
                                site.block_n, acc, site.compact)
        return acc.view(1, 1, -1)
    if site is None:
        y = linear(x) if linear is not None else F.linear(x, weight, bias)
        return y if residual is None else residual + y
    weight = linear.weight if linear is not None else weight
    bias = linear.bias if linear is not None else bias
    if site.t_col is not None and _kernel_step(x, stats):
        return _kernel_linear(x, weight, bias, site, residual=residual, window=window)
    xs, kept = threshold_input(x, site, dense_rows)
    _record(stats, name, kept, dense_rows, xs)
    y = F.linear(xs, weight, bias)
    if site.shift_bias is not None:
        y = y + site.shift_bias.to(y.dtype)
    return y if residual is None else residual + y


def _defers(x: Tensor, part, window) -> bool:
    """Does this decode step defer the sums of a layer's attention or MLP (part; DEFER_SUMS)? One sequence
    through the fused kernels (the step's window), nothing recorded, the layer prepared for it."""
    return (DEFER_SUMS and part is not None and part.defers and x.shape[0] == 1 and window is not None
            and FUSED_SPARSE_GEMV and _kernel_step(x, part.stats))


def deferred_residual(x: Tensor, attn: Optional[AttentionSparsity], window) -> Optional[Tensor]:
    """Deferred sums (DEFER_SUMS) in this layer's decode step: the (1, dim) fp32 buffer that the q/k/v kernel
    fills with x (rounded) and the o projection adds into (sparse_linear's acc); else None. x may be the
    previous layer's fp32 output (sparse_mlp)."""
    return torch.empty(1, x.shape[-1], dtype=torch.float32, device=x.device) if _defers(x, attn, window) else None


def sparse_qkv(x: Tensor, wqkv: torch.nn.Linear, attn: Optional[AttentionSparsity] = None,
               dense_rows=None, norm=None, window=None, rope=None, x_copy=None) -> Tensor:
    """Fused q/k/v projection of norm(x) (or x); with sparsity, each of q, k, v thresholds the
    shared input with its own threshold (TEAL's greedy gives them different sparsities). A GPU
    decode step runs the norm inside the kernel, and with rope (cos, sin, pos, k_cache, v_cache,
    n_heads) RoPE and the cache write: it then returns RoPE(q) (B, H, D) (kernels.linear).
    x_copy (deferred_residual): the kernel also writes x, rounded, into it."""
    if attn is not None and attn.qkv_kernel is not None and _kernel_step(x, attn.stats):
        return _kernel_linear(x, wqkv.weight, wqkv.bias, attn.qkv_kernel, norm, window=window, rope=rope,
                              x_copy=x_copy)
    x = norm(x) if norm is not None else x
    if attn is None or attn.qkv is None:
        return kernels.with_rope(wqkv(x), rope)
    ws = wqkv.weight.split(attn.sizes)
    bs = wqkv.bias.split(attn.sizes) if wqkv.bias is not None else (None, None, None)
    return kernels.with_rope(torch.cat([sparse_linear(x, None, site, attn.stats, name, dense_rows, w, b)
                                        for site, name, w, b in zip(attn.qkv, "qkv", ws, bs)], dim=-1), rope)


def sparse_mlp(x: Tensor, ffn, mlp: MLPSparsity, dense_rows=None, norm=None, residual=None, window=None) -> Tensor:
    """[residual +] the SwiGLU MLP of norm(x) (or x) under a projection-sparsity method.
    x: (B, S, dim). A GPU decode step runs the norm and the residual add inside its kernels."""
    m, st = mlp.method, mlp.stats
    kernel = _kernel_step(x, st)
    if kernel and mlp.down_kernel is not None and batch_kernel_pays(x.shape[0], mlp.down_kernel.sparsity):
        return _kernel_mlp(x, ffn, mlp, norm, residual, window)
    if m in ("teal", "scap"):
        # TEAL sec. 3.1 / SCAP sec. 3: threshold the input of gate, up and down.
        if _defers(x, mlp, window):
            return _deferred_mlp(x, ffn, mlp, norm)
        if kernel and mlp.gate_up_kernel is not None:
            # gate and up share their input: one launch over the [gate; up] rows, SiLU(g) * u inside
            s = _kernel_linear(x, mlp.gate_up_weight, None, mlp.gate_up_kernel, norm, window=window, swiglu=True)
        else:
            x = norm(x) if norm is not None else x
            s = F.silu(sparse_linear(x, ffn.gate, mlp.gate, st, "gate", dense_rows)) \
                * sparse_linear(x, ffn.up, mlp.up, st, "up", dense_rows)
        return sparse_linear(s, ffn.down, mlp.down, st, "down", dense_rows, residual=residual, window=window)
    x = norm(x) if norm is not None else x
    if m == "cats":
        # CATS sec. 3 (eq. 3): keep i where |SiLU(g_i)| > t; gate stays dense, up rows and
        # down columns of dropped neurons are skipped.
        a = F.silu(ffn.gate(x))
        keep = a.abs() > mlp.threshold.to(a.dtype)
        keep = keep if dense_rows is None else keep | dense_rows[:, None]
        s = a * keep * ffn.up(x)
    elif m == "m-countdown":
        # COUNTDOWN sec. 4.2 (M-COUNTDOWN): u dense, keep i where |u_i| > t; gate rows and
        # down columns of dropped i are skipped.
        u = ffn.up(x)
        keep = u.abs() > mlp.threshold.to(u.dtype)
        keep = keep if dense_rows is None else keep | dense_rows[:, None]
        s = F.silu(ffn.gate(x)) * u * keep
    elif m == "d-countdown-oracle":
        # COUNTDOWN sec. 4.1 (D-COUNTDOWN, ideal): per token keep the top (1 - ratio) of |s|.
        s = F.silu(ffn.gate(x)) * ffn.up(x)
        keep = topk_mask(s.abs(), s.shape[-1] - int(round(mlp.ratio * s.shape[-1])))
        keep = keep if dense_rows is None else keep | dense_rows[:, None]
        s = s * keep
    elif m == "d-countdown":
        # COUNTDOWN sec. 4.1 (practical): a low-rank predictor on x picks the kept
        # coefficients before any projection; gate/up rows and down columns are skipped.
        keep = predictor_logits(x, mlp) > 0
        keep = keep if dense_rows is None else keep | dense_rows[:, None]
        s = F.silu(ffn.gate(x)) * ffn.up(x) * keep
    else:
        raise ValueError(f"unknown MLP sparsity method {m!r}")
    _record(st, "mlp_coeff", keep, dense_rows, s)
    return ffn.down(s, residual=residual)


def _deferred_mlp(x: Tensor, ffn, mlp: MLPSparsity, norm) -> Tensor:
    """sparse_mlp's decode step with deferred sums (DEFER_SUMS): gate+up leaves its K chunks' sums unmerged
    and writes x (rounded) into h; the down projection forms SiLU(g) * u from those sums and adds into h.
    Returns h (fp32) for a next layer that defers too (its q/k/v kernel rounds it), else h rounded."""
    h = torch.empty(1, x.shape[-1], dtype=torch.float32, device=x.device)
    gu, down = mlp.gate_up_kernel, mlp.down
    parts = kernels.sparse_gemv_parts(x.view(1, -1), mlp.gate_up_weight.t(), gu.t_col, gu.m_col, gu.shift_bias,
                                      gu.block_n, *kernels.norm_args(norm), gu.compact, h)
    kernels.sparse_gemv_add(parts, ffn.down.weight.t(), down.t_col, down.m_col, down.shift_bias, down.block_n, h,
                            down.compact, True)
    nxt = mlp.next_attn
    return h.view(1, 1, -1) if nxt is not None and nxt.defers else h.to(ffn.down.weight.dtype).view(1, 1, -1)


def _kernel_linear(x: Tensor, weight: Tensor, bias, site: LinearSite, norm=None, residual=None, window=None,
                   swiglu=False, rope=None, x_copy=None) -> Tensor:
    """Decode step on GPU: [residual +] the thresholded input-sparse GEMV of norm(x) (weights
    stored input-major; swiglu: [gate; up] merged, SiLU(g) * u). One sequence with the step's
    window (FUSED_SPARSE_GEMV): one kernel, the norm, the partial sums' reduction and the
    residual add inside (kernels.sparse_gemv; sites calibrated to high sparsity walk a list of the
    kept channels), and for q/k/v RoPE and the cache write (rope: see kernels.linear);
    otherwise norm, kernel, sums, add, as ops."""
    B, S, K = x.shape
    compact = site.compact  # list the kept channels first
    if B == 1 and window is not None and FUSED_SPARSE_GEMV:
        args = (x.view(1, K), weight.t(), site.t_col, site.m_col, site.shift_bias, site.block_n, window[2:],
                *kernels.norm_args(norm))
        if rope is not None and bias is None and kernels.rope_fusable(weight.shape[0], site.block_n, *rope):
            return kernels.sparse_gemv_rope(*args, compact, *rope, x_copy)
        if x_copy is not None:  # deferred sums, no RoPE in the kernel (a q/k/v bias): the copy as an op
            x_copy.copy_(x.view(1, K).to(weight.dtype))
        y = kernels.sparse_gemv(*args, residual.view(1, -1) if residual is not None else None, swiglu, compact)
        return kernels.with_rope((y if bias is None else y + bias).view(B, 1, -1), rope)
    x = norm(x) if norm is not None else x
    if not batch_kernel_pays(B, site.sparsity):
        y = _dense_union(x.view(B, K), weight, site)
    else:
        y = kernels.input_sparse_gemv(x.view(B, K), weight.t(), site.t_col, site.m_col, site.shift_bias,
                                      site.block_n)
    if bias is not None:
        y = y + bias
    if swiglu:
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    y = y.to(x.dtype).view(B, 1, -1)
    return kernels.with_rope(y if residual is None else residual + y, rope)


def _dense_union(x: Tensor, weight: Tensor, site: LinearSite) -> Tensor:
    """input_sparse_gemv's result by cuBLAS (batch_kernel_pays is False): every weight row read,
    once. A merged site (q/k/v, gate/up) has one threshold and mode per part: each part's thresholded
    copy of x is a row block of one (parts * B, K) input, and part j's columns come from row block j."""
    B = x.shape[0]
    parts = [(a, b, site.t_col[a], site.m_col[a] if site.m_col is not None else None) for a, b in site.parts]
    xs = torch.cat([threshold(x, t, m)[0] for _, _, t, m in parts])
    out = F.linear(xs.to(weight.dtype), weight).float()  # x: fp32 from gated_rows; the batch kernel rounds it too
    y = torch.cat([out[j * B:(j + 1) * B, a:b] for j, (a, b, _, _) in enumerate(parts)], dim=1)
    return y if site.shift_bias is None else y + site.shift_bias


def _kernel_mlp(x: Tensor, ffn, mlp: MLPSparsity, norm=None, residual=None, window=None) -> Tensor:
    """Decode step on GPU for the neuron-selecting methods: the kept rows of gate/up are
    computed (kernels.gated_rows, fused with SiLU and the product), then the down
    projection reads only the columns of non-zero coefficients (and adds the residual).
    The dense GEMV that picks the rows (gate, up, or the predictor's first factor) runs the MLP's
    norm and, for one sequence, writes its output x' for gated_rows (kernels.linear_norm)."""
    B, S, K = x.shape
    x2 = x.view(B, K)
    m = mlp.method
    if m == "cats":
        gate, x2 = kernels.linear_norm(x2, ffn.gate.weight, norm)
        s = kernels.gated_rows(x2, ffn.up.weight, None, gate, mlp.kernel_t, 0)
    elif m == "m-countdown":
        up, x2 = kernels.linear_norm(x2, ffn.up.weight, norm)
        s = kernels.gated_rows(x2, ffn.gate.weight, None, up, mlp.kernel_t, 1)
    elif m == "d-countdown":
        # the predictor (x' V) U^T + b: two GEMVs of weights cast and laid out once (prepare_kernels), b added in
        # the second one's epilogue
        h, x2 = kernels.linear_norm(x2, mlp.predictor_vt, norm)
        p = kernels.linear(h, mlp.predictor_ut, None, residual=mlp.predictor_bt)
        s = kernels.gated_rows(x2, ffn.gate.weight, ffn.up.weight, p, 0.0, 2)
    elif m == "d-countdown-oracle":
        s = kernels.swiglu(x2, ffn.gate, ffn.up, norm)
        s = s * topk_mask(s.abs(), s.shape[-1] - int(round(mlp.ratio * s.shape[-1])))
    else:
        raise ValueError(f"no fused MLP kernel path for {m!r}")
    y = _kernel_linear(s.view(B, 1, -1), ffn.down.weight, None, mlp.down_kernel, residual=residual, window=window)
    return y.to(x.dtype)


def predictor_logits(x: Tensor, mlp: MLPSparsity) -> Tensor:
    """D-COUNTDOWN's low-rank predictor, logit = (x V) U^T + b, on (tokens, dim) rows."""
    x2 = x.reshape(-1, x.shape[-1])
    v, u, b = (t.to(x.dtype) for t in (mlp.predictor_v, mlp.predictor_u, mlp.predictor_b))
    return ((x2 @ v) @ u.T + b).view(*x.shape[:-1], -1)


def topk_mask(a: Tensor, k: int) -> Tensor:
    """bool mask of the k largest entries of the last dim (k may be 0 or all)."""
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if k >= a.shape[-1]:
        return torch.ones_like(a, dtype=torch.bool)
    idx = a.topk(k, dim=-1).indices
    return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)


# ----------------------------------------------------------------------------- attention
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask, attn=None, dense_rows=None, window=None) -> Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, H, S, D); k, v: (B, Hkv, L, D); mask: bool (1, 1, S, L), or None for causal
    over S == L; window: visible_window(mask, B * Hkv) of a decode step, if already computed.
    Returns (B, H, S, D).
    """
    decode_kernel = mask is not None and q.shape[2] == 1 and kernels.enabled(q)
    if decode_kernel and window is None:
        window = visible_window(mask, q.shape[0] * k.shape[1])
    if attn is None or attn.scores is None:
        # Dense decode on GPU: the split-over-keys kernel (masked SDPA reads the whole static
        # cache on a few thread blocks; the kernel is 4x faster at 145 positions, BENCHMARKS.md).
        if decode_kernel and DENSE_ATTENTION_KERNEL:
            return _kernel_attention(q, k, v, window)
        return dense_attention(q, k, v, mask)
    if attn.scores.kernel and attn.stats is None and decode_kernel:
        return _kernel_attention(q, k, v, window, attn.scores, dense_rows)
    return thresholded_attention(q, k, v, mask, attn.scores, attn.stats, dense_rows)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    # GQA without copying the cache: fold each KV group's query heads into the row
    # dimension, (B, H, S, D) -> (B, Hkv, rep*S, D); row r*S + s is query s of head r.
    rep = H // Hkv
    q = q.reshape(B, Hkv, rep * S, D)
    mask = mask.repeat(1, 1, rep, 1) if rep > 1 else mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.reshape(B, H, S, D)  # SDPA's output may follow q's strides (CUDA, fp32)


def thresholded_attention(q, k, v, mask, sc: AttentionScores, stats=None, dense_rows=None):
    """Top-Theta (arXiv 2502.08363, sec. 3-4) and top-k attention, reference.

    Row r sees n_r keys. Rows with n_r <= sc.k stay dense. Otherwise a score a_{r,j} is
    kept if a_{r,j} > theta[h, n_r] (top-theta; nearest calibrated n beyond the table)
    or if it is among the k largest (top-k). pre: on scaled masked scores, dropped -> -inf,
    with optional SDC; post: on probabilities, dropped -> 0. VMC adds (1 - kept mass) * mean(V).
    """
    B, H, S, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    rep = H // Hkv
    kf = k.repeat_interleave(rep, dim=1).float()  # (B, H, L, D)
    vf = v.repeat_interleave(rep, dim=1).float()
    if mask is None:
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)[None, None]
    a = (q.float() @ kf.transpose(-1, -2)) / math.sqrt(D)  # (B, H, S, L)
    a = a.masked_fill(~mask, -math.inf)
    n = mask.sum(-1).expand(B, H, S)  # visible keys per row
    scores_for_threshold = a if sc.placement == "pre" else torch.softmax(a, dim=-1)
    if sc.collect is not None:  # calibration: the k-th largest per row, per (head, n)
        _collect_kth(scores_for_threshold, n, sc)
    if sc.method == "top-k":
        keep = topk_mask(scores_for_threshold, sc.k)
        # SDC "theta" under top-k: the row's k-th largest score plays the threshold's part.
        theta = scores_for_threshold.topk(min(sc.k, L), dim=-1).values[..., -1]
    else:
        table = sc.thresholds.to(a.device)  # (H, N)
        idx = (n - 1).clamp(max=table.shape[1] - 1)
        theta = torch.gather(table[None, :, None, :].expand(B, H, S, -1), -1, idx[..., None]).squeeze(-1)
        # A row whose every score falls below theta would have no softmax mass: keep its max.
        keep = (scores_for_threshold > theta[..., None]) | (a == a.amax(-1, keepdim=True))
    keep = keep & mask
    dense_row = n <= sc.k
    if dense_rows is not None:
        dense_row = dense_row | dense_rows[None, None, :]
    keep = keep | (dense_row[..., None] & mask)
    if stats is not None:
        sparse = ~dense_row
        # scores per head; V rows a decode kernel skips: a key's row is read if any query head of its
        # KV group keeps it (a group's heads share their rows' dense flag: its first head's)
        for name, kept, heads, rows in (("scores", keep, H, sparse),
                                        ("v_rows", keep.view(B, Hkv, rep, S, L).any(2), Hkv, sparse[:, ::rep])):
            visible = mask.expand(B, heads, S, L)
            entry = stats.setdefault(name, [0, 0])
            entry[0] += int(((~kept) & visible)[rows].sum())
            entry[1] += int(visible[rows].sum())
    row_max = a.amax(-1, keepdim=True)
    e = torch.exp(a - row_max)  # masked -> 0
    if sc.placement == "pre":
        kept_e = e * keep
        denom = kept_e.sum(-1, keepdim=True)
        if sc.sdc == "exact":  # add the exact mass of the dropped scores
            denom = denom + (e * (~keep & mask)).sum(-1, keepdim=True)
        elif sc.sdc == "theta":  # each dropped score counted as exp(theta - M)
            n_drop = (~keep & mask).sum(-1, keepdim=True)
            denom = denom + n_drop * torch.exp(theta[..., None] - row_max).nan_to_num(0.0)
        p = kept_e / denom
    else:
        p = (e / e.sum(-1, keepdim=True)) * keep
    y = p @ vf
    if sc.vmc:  # causal mean of all visible V rows, weighted by the missing probability mass
        v_mean = (mask.float() @ vf) / n[..., None]
        y = y + (1 - p.sum(-1, keepdim=True)) * v_mean
    return y.to(q.dtype)


def n_counters(c, B: int) -> int:
    """Counters a decode step's kernels need (see visible_window): one per (sequence, KV head)
    for the attention merge, one per column block of the widest sparse GEMV (block_n >= 1)."""
    return max(B * c.n_kv_heads, c.dim, c.intermediate_size, c.q_size + 2 * c.kv_size)


def visible_window(mask, n_counters: int) -> Tensor:
    """int32 (2 + n_counters,): lo, hi - the keys lo <= j < hi that a decode step's one query
    row sees (mask (1, 1, 1, L), a causal or sliding window) - then n_counters zeros that the
    kernels count finished programs in: the dense attention's key chunks per (sequence, KV head),
    kernels.sparse_gemv's K chunks per column block. Each launch leaves them at zero, so every
    kernel of the step can use them in turn."""
    row = mask[0, 0, 0]
    lo = row.int().argmax()
    return torch.cat([torch.stack([lo, lo + row.sum()]).to(torch.int32),
                      torch.zeros(n_counters, dtype=torch.int32, device=row.device)])


def _kernel_attention(q, k, v, lohi, sc: Optional[AttentionScores] = None, dense_rows=None):
    """Decode step on GPU: kernels.decode_attention / theta_attention split the visible keys
    lo <= j < hi over the GPU (the masked SDPA does not); Top-Theta (pre-softmax) reads every
    K row but only the V rows whose score some head of the KV group keeps."""
    if sc is None:
        return kernels.decode_attention(q[:, :, 0], k, v, lohi)[:, :, None]  # in q's dtype
    # The kernels pick theta for the step's visible length n from the (H, N) table; rows that see
    # n <= k keys, or that the token policy keeps dense, keep every score.
    y = kernels.theta_attention(q[:, :, 0], k, v, sc.thresholds, lohi, kernels.SDC_MODES[sc.sdc], sc.k,
                                None if dense_rows is None else dense_rows[:1])
    return y[:, :, None]


def _collect_kth(scores, n, sc: AttentionScores):
    """Record, per (head, visible length n > k), the k-th largest score of each row."""
    B, H, S, L = scores.shape
    if L < sc.k:
        return
    kth = scores.topk(sc.k, dim=-1).values[..., -1]  # (B, H, S)
    for s in range(S):
        n_s = int(n[0, 0, s])
        if n_s > sc.k:
            sc.collect.setdefault(n_s, []).append(kth[:, :, s].reshape(-1, H).cpu())


# ----------------------------------------------------------------------------- applying a config
@dataclass
class SparsityConfig:
    """What calibrate.py writes and generate.py / eval.py load."""
    header: dict
    tensors: dict = field(default_factory=dict)

    @property
    def tokens(self) -> str:
        return self.header["tokens"]

    def dense_prefix(self, context_len: int) -> int:
        return dense_prefix(self.tokens, context_len)


TOKEN_POLICIES = ("all", "decode", "last-half")


def dense_prefix(tokens: str, context_len: int) -> int:
    """How many leading prompt/context rows run dense under a token policy:
    all -> 0; decode -> the whole context (TEAL's fast path, COUNTDOWN's harness);
    last-half -> the first half (TEAL's accuracy path: the last half of prefill is sparse).
    Generated / continuation tokens are sparse under every policy."""
    if tokens not in TOKEN_POLICIES:
        raise ValueError(f"unknown token policy {tokens!r}; one of {', '.join(TOKEN_POLICIES)}")
    return {"all": 0, "decode": context_len, "last-half": context_len // 2}[tokens]


def fingerprint(model) -> dict:
    c = model.config
    return dict(architecture=c.architecture, dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                vocab_size=c.vocab_size, weights=weights_signature(model))


def weights_signature(model) -> list:
    """Mean |W_down| of every layer: tells checkpoints apart, and survives a change of dtype
    (a config calibrated in fp32 on CPU applies to the same model in bf16 on GPU)."""
    return [float(layer.feed_forward.down.weight.detach().float().abs().mean()) for layer in model.layers]


def _same_model(a: dict, b: dict) -> list:
    """Names of the fingerprint fields that differ (weights compared to 1e-2 relative)."""
    diff = [k for k in b if k != "weights" and a.get(k) != b[k]]
    wa, wb = a.get("weights"), b["weights"]
    if not isinstance(wa, list) or len(wa) != len(wb) or any(
            abs(x - y) > 1e-2 * max(abs(y), 1e-12) for x, y in zip(wa, wb)):
        diff.append("weights")
    return diff


def check_sparsity_value(s, what="sparsity"):
    if not (0.0 <= float(s) < 1.0):
        raise ValueError(f"{what} {s} is outside [0, 1); pass a fraction such as 0.5")


def write_atomic(path, write) -> Path:
    """write(tmp) creates and fills a temp file next to `path` (a random name with the same suffix), which then
    replaces `path` in one rename: an interrupted or failed write leaves `path` as it was, never half a file, and no
    temp file behind. The writer creates the file, so it gets the permissions open() gives (mkstemp's would be
    owner-only). Every output file of the repo's scripts is written this way (configs, activation dumps, eval /
    sweep / bench JSON, plots); the checkpoint converter renames a whole temp folder instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_config(path, cfg: SparsityConfig):
    """Atomic (write_atomic)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in cfg.tensors.items()}
    if not tensors:
        tensors = {"_empty": torch.zeros(1)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={
        "config": json.dumps(dict(cfg.header, format=FORMAT))}))


def load_config(path) -> SparsityConfig:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sparsity config {path} not found; make one with calibrate.py")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
        header = json.loads(meta["config"])
    except Exception as e:
        raise ValueError(f"sparsity config {path} is corrupt or not a sparsity config ({type(e).__name__}); "
                         "re-run calibrate.py") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"sparsity config {path} has format {header.get('format')!r}, expected {FORMAT!r}")
    return SparsityConfig(header, tensors)


def apply(model, cfg: Optional[SparsityConfig]):
    """Attach per-layer sparsity configs to the model (None removes them: dense again). Weights
    go back to nn.Linear's layout first; prepare_kernels then stores input-major (GPU) only
    the projections this config thresholds, so every other one keeps the dense kernels."""
    for layer in model.layers:
        layer.attention.sparsity = None
        layer.feed_forward.sparsity = None
        for lin in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.gate, layer.feed_forward.up,
                    layer.feed_forward.down):
            kernels.make_output_major(lin)
    if cfg is None:
        return model
    h = cfg.header
    diff = _same_model(h["model"], fingerprint(model))
    if diff:
        raise ValueError(f"sparsity config was made for another model (differs in {', '.join(diff)}); "
                         "calibrate it for this checkpoint with calibrate.py")
    c = model.config
    device = model.output.weight.device
    T = {k: v.to(device) for k, v in cfg.tensors.items()}
    for i, layer in enumerate(model.layers):
        lh = h["layers"][i]
        sites = {}
        for name in LINEAR_SITES:
            key = f"layers.{i}.{name}.threshold"
            if key in T:
                mode = T.get(f"layers.{i}.{name}.mode")
                sites[name] = LinearSite(T[key], mode, sparsity=float(lh.get("targets", {}).get(name, 0.0)))
        attn = AttentionSparsity(q=sites.get("q"), k=sites.get("k"), v=sites.get("v"), o=sites.get("o"),
                                 sizes=(c.q_size, c.kv_size, c.kv_size))
        wq, wk, wv = layer.attention.wqkv.weight.split(attn.sizes)
        for name, w in (("q", wq), ("k", wk), ("v", wv), ("o", layer.attention.wo.weight)):
            _fill_shift(sites.get(name), w)
        if "attention" in lh:
            a = lh["attention"]
            attn.scores = AttentionScores(method=a["method"], k=a["k"], placement=a.get("placement", "pre"),
                                          thresholds=T.get(f"layers.{i}.theta"), sdc=a.get("sdc", "none"),
                                          vmc=a.get("vmc", False))
        if attn.qkv is not None or attn.o is not None or attn.scores is not None:
            layer.attention.sparsity = attn
        if "mlp" in lh:
            mh = lh["mlp"]
            ffn = layer.feed_forward
            mlp = MLPSparsity(method=mh["method"], gate=sites.get("gate"), up=sites.get("up"),
                              down=sites.get("down"), threshold=T.get(f"layers.{i}.mlp.threshold"),
                              ratio=mh.get("ratio"), predictor_v=T.get(f"layers.{i}.predictor.v"),
                              predictor_u=T.get(f"layers.{i}.predictor.u"),
                              predictor_b=T.get(f"layers.{i}.predictor.b"))
            for name in ("gate", "up", "down"):
                _fill_shift(sites.get(name), getattr(ffn, name).weight)
            ffn.sparsity = mlp
        prepare_kernels(layer, c)
    for layer, nxt in zip(model.layers, model.layers[1:]):
        if layer.feed_forward.sparsity is not None:
            layer.feed_forward.sparsity.next_attn = nxt.attention.sparsity
    return model


def prepare_kernels(layer, c, force=False):
    """Per-column thresholds and input-major weight layout for the GPU decode kernels.
    Only on CUDA (or force, for tests under the interpreter): the CPU path is the
    reference and keeps nn.Linear's layout."""
    attn, mlp = layer.attention.sparsity, layer.feed_forward.sparsity
    if not (force or layer.attention.wqkv.weight.is_cuda):
        return
    if attn is not None:
        if attn.scores is not None:  # the kernel has no post-softmax placement and no V-mean (VMC reads all V)
            sc = attn.scores
            sc.kernel = sc.method == "top-theta" and sc.placement == "pre" and not sc.vmc
            if sc.kernel:  # the kernels read the (H, N) table as it is
                sc.thresholds = sc.thresholds.float().contiguous()
        if attn.qkv is not None:
            attn.qkv_kernel = _merged_site(attn.qkv, attn.sizes, layer.attention.wqkv.weight.device, c.head_dim)
            kernels.make_input_major(layer.attention.wqkv)
        if attn.o is not None:
            _prepare_site(attn.o, layer.attention.wo)
    if mlp is not None:
        ffn = layer.feed_forward
        if mlp.method in ("teal", "scap"):
            merged = mlp.gate is not None and mlp.up is not None  # gate and up: one launch (sparse_mlp)
            for name in ("gate", "up", "down"):  # the others dispatch in sparse_linear
                if getattr(mlp, name) is not None and (name == "down" or not merged):
                    _prepare_site(getattr(mlp, name), getattr(ffn, name))
            if merged:
                mlp.gate_up_kernel = _merged_site((mlp.gate, mlp.up), (c.intermediate_size,) * 2,
                                                  ffn.gate.weight.device)
                mlp.gate_up_weight = kernels.make_input_major_merged((ffn.gate, ffn.up))
        else:
            mlp.kernel_t = float(mlp.threshold) if mlp.threshold is not None else 0.0
            mlp.down_kernel = LinearSite(torch.tensor(0.0), t_col=torch.zeros(c.dim, device=ffn.down.weight.device),
                                         block_n=kernels.block_n_for([c.dim]), sparsity=mlp.ratio or 0.0,
                                         parts=((0, c.dim),))
            kernels.make_input_major(ffn.down)
            if mlp.predictor_v is not None:  # D-COUNTDOWN's predictor in the model's dtype, row-major for kernels.gemv
                dt = ffn.gate.weight.dtype
                mlp.predictor_vt = mlp.predictor_v.t().to(dt).contiguous()
                mlp.predictor_ut = mlp.predictor_u.to(dt).contiguous()
                mlp.predictor_bt = mlp.predictor_b.to(dt).view(1, -1)
    # deferred sums (DEFER_SUMS): q/k/v and gate+up normalise the stream and write its copy, o and down add into it
    defers = (attn is not None and attn.qkv_kernel is not None and attn.o is not None and mlp is not None
              and mlp.gate_up_kernel is not None and mlp.down is not None)
    for part in (attn, mlp):
        if part is not None:
            part.defers = defers


def _merged_site(sites, sizes, dev, head_dim: int = 0) -> LinearSite:
    """Several sites reading one input (q/k/v; gate/up) as one kernel site: per-column
    threshold, mode and W m, constant within each block_n block (a dense site: t = -1).
    head_dim (q/k/v): column blocks inside one head, so that the kernel can apply RoPE in its
    epilogue (kernels.rope_fusable)."""
    def cols(f, default):
        return torch.cat([torch.full((n,), float(f(s)) if s is not None else default, device=dev)
                          for s, n in zip(sites, sizes)])
    has_mode = any(s is not None and s.mode is not None for s in sites)
    parts, start = [], 0  # column ranges of one (t, m) each; neighbouring sites that share them form one
    for s, n in zip(sites, sizes):
        key = (float(s.threshold), float(s.mode) if s.mode is not None else 0.0) if s is not None else None
        if parts and parts[-1][2] == key:
            parts[-1] = (parts[-1][0], start + n, key)
        else:
            parts.append((start, start + n, key))
        start += n
    shift = None
    if any(s is not None and s.shift_bias is not None for s in sites):
        shift = torch.cat([s.shift_bias if (s is not None and s.shift_bias is not None)
                           else torch.zeros(n, device=dev) for s, n in zip(sites, sizes)])
    return LinearSite(torch.tensor(0.0), shift_bias=shift, t_col=cols(lambda s: s.threshold, -1.0),
                      m_col=cols(lambda s: s.mode if s.mode is not None else 0.0, 0.0) if has_mode else None,
                      block_n=kernels.block_n_for(list(sizes) + ([head_dim] if head_dim else [])),
                      parts=tuple((a, b) for a, b, _ in parts),
                      sparsity=min(s.sparsity if s is not None else 0.0 for s in sites))  # a dense part: masked loop


def _prepare_site(site: LinearSite, linear):
    n = linear.weight.shape[0]
    dev = linear.weight.device
    site.t_col = torch.full((n,), float(site.threshold), device=dev)
    site.m_col = torch.full((n,), float(site.mode), device=dev) if site.mode is not None else None
    site.block_n = kernels.block_n_for([n])
    site.parts = ((0, n),)
    kernels.make_input_major(linear)


def _fill_shift(site, weight):
    if site is not None and site.mode is not None:
        site.shift_bias = (weight.float() @ torch.full((weight.shape[1],), float(site.mode),
                                                       device=weight.device)).float()


# ----------------------------------------------------------------------------- measuring
def _configured(model):
    """(layer index, AttentionSparsity / MLPSparsity) of each of the model's modules that has a sparsity config."""
    for i, layer in enumerate(model.layers):
        for mod in (layer.attention, layer.feed_forward):
            if mod.sparsity is not None:
                yield i, mod.sparsity


def start_recording(model):
    for _, cfg in _configured(model):
        cfg.stats = {}


def recording(model) -> bool:
    """Does a site of the model record its sparsity (start_recording) or dump its inputs?"""
    return any(cfg.stats is not None for _, cfg in _configured(model))


def stop_recording(model) -> dict:
    """{layer: {site: measured sparsity}} over the rows recorded since start_recording."""
    out = {}
    for i, cfg in _configured(model):
        if cfg.stats is not None:
            for site, (z, t) in ((k, v) for k, v in cfg.stats.items() if k != "_dump"):
                out.setdefault(i, {})[site] = z / t if t else float("nan")
            cfg.stats = None
    return out


def start_dumping(model):
    """With recording on, keep each site's sparsified input of the newest token."""
    for _, cfg in _configured(model):
        if cfg.stats is not None:
            cfg.stats["_dump"] = {}


def take_dump(model) -> dict:
    """{"layers.{i}.{site}": (B, C) tensor} of the newest token; clears it."""
    out = {}
    for i, cfg in _configured(model):
        st = cfg.stats if cfg.stats is not None else {}
        for site, t in (st.get("_dump") or {}).items():
            out[f"layers.{i}.{site}"] = t.contiguous()
        if st.get("_dump") is not None:
            st["_dump"] = {}
    return out


def projection_bytes(model) -> dict:
    """Bytes of each projection weight of one layer: q, k, v, o, gate, up, down."""
    c = model.config
    b = model.output.weight.element_size()
    return dict(q=c.q_size * c.dim * b, k=c.kv_size * c.dim * b, v=c.kv_size * c.dim * b,
                o=c.dim * c.q_size * b, gate=c.intermediate_size * c.dim * b,
                up=c.intermediate_size * c.dim * b, down=c.dim * c.intermediate_size * b)


def skipped_fractions(method: str, site_sparsity: dict) -> dict:
    """Fraction of each projection's weight a decode step does not read, given the
    measured sparsity of the method's sites (input sites q..down, or `mlp_coeff`)."""
    f = {name: site_sparsity.get(name, 0.0) for name in ("q", "k", "v", "o")}
    s = site_sparsity.get("mlp_coeff", 0.0)
    if method in ("teal", "scap") or method is None:
        f.update({n: site_sparsity.get(n, 0.0) for n in ("gate", "up", "down")})
    elif method == "cats":  # gate dense; up rows and down columns skipped
        f.update(gate=0.0, up=s, down=s)
    elif method == "m-countdown":  # up dense; gate rows and down columns skipped
        f.update(gate=s, up=0.0, down=s)
    elif method == "d-countdown-oracle":  # gate and up computed densely to rank |s|
        f.update(gate=0.0, up=0.0, down=s)
    elif method == "d-countdown":  # predictor decides first: gate, up, down all skipped
        f.update(gate=s, up=s, down=s)
    return f


def effective_sparsity(model, measured: dict, method: Optional[str]) -> float:
    """Fraction of the blocks' projection-weight bytes (q, k, v, o, gate, up, down of every
    layer) one decode step need not read, from measured per-layer site sparsities.
    A D-COUNTDOWN predictor's own bytes count as extra reads."""
    pb = projection_bytes(model)
    total = sum(pb.values()) * len(model.layers)
    skipped = 0.0
    for i, layer in enumerate(model.layers):
        fr = skipped_fractions(method, measured.get(i, {}))
        skipped += sum(pb[n] * fr[n] for n in pb)
        mlp = layer.feed_forward.sparsity
        if mlp is not None and mlp.predictor_v is not None:
            n = mlp.predictor_v.numel() + mlp.predictor_u.numel() + mlp.predictor_b.numel()
            skipped -= n * model.output.weight.element_size()
    return skipped / total


def mean_by_site(measured: dict) -> dict:
    sites = {}
    for per_layer in measured.values():
        for site, v in per_layer.items():
            sites.setdefault(site, []).append(v)
    return {s: sum(v) / len(v) for s, v in sites.items()}
