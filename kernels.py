"""Triton kernels that turn skipped activations into skipped weight reads (decode).

Each kernel sits beside a plain-PyTorch reference of the same function (the
`*_ref` functions): the reference is what tests compare against and what runs
on CPU. Kernels are registered with torch.library.custom_op (+ fake
implementation), so `torch.compile(fullgraph=True, mode="reduce-overhead")`
captures them in the CUDA graph with no graph break.

0. gemv / linear / swiglu: the dense batch-1 decode GEMV (nn.Linear's row-major weights),
   optionally two weights at once with the SwiGLU product fused (gate and up in one pass).
   Used by the dense model: measured closer to copy bandwidth than cuBLAS's and inductor's
   GEMVs on the Llama shapes (BENCHMARKS.md), so dense vs sparse compares two tuned kernels.
   gemv_norm / linear_norm: the same with the RMSNorm folded in, also writing the normalised x
   for the kernel after it (the neuron methods' gated_rows).

1. input_sparse_gemv: y = W ((x - m) * 1[|x - m| > t]) (+ W m), TEAL / SCAP / the down
   projection of CATS and COUNTDOWN. W is stored input-major (wt = W^T, (K, N)
   contiguous), so the weights of one input channel are one contiguous row and a
   skipped channel costs no memory traffic (a predicated-off load). Thresholds and
   modes are per output column (N,), constant within each BLOCK_N block, so one launch
   serves fused q/k/v with three thresholds. Split K: each K chunk writes an fp32 partial
   sum and the caller adds them in plain PyTorch, which torch.compile fuses into the next
   op (no atomics, no zero-fill; bf16 and fp16 both work). Batch 1: sparse_gemv's kernel (1b)
   without its prologue and epilogue: each program walks its K chunk in tiles of 256 channels into 2-D
   fp32 accumulators (each thread first sums its rows of a tile in registers; one reduction at the end;
   bf16 / fp16 weights read as one 32-bit word per pair of columns, _column_pairs) and loads the next
   tile's x before the current tile's weights, so the x -> mask -> weight-load chain does not serialise.
   Batch 2..8: tl.dot on 16 padded rows; a weight row is read if any row of the batch needs it. Decode steps take it
   only where that union is small (sparsity.batch_kernel_pays); over most rows, cuBLAS on the
   thresholded input is faster.

1b. sparse_gemv: the batch-1 decode form of input_sparse_gemv with everything around it fused,
   so that a sparse decode step has as few kernels as a dense one (5 per layer at batch 1): the RMSNorm
   before the projection (each program sums x^2 over all of x first; thresholds apply to the
   normalised value), the K chunks' partial sums added by the program that finishes a column
   block last (an atomic counter per block, in the step's window tensor), then + W m, SiLU(gate)
   * up for the merged [gate; up] weights, or the residual add, written in the model dtype.
   compact (sites calibrated to >= COMPACT_MIN_SPARSITY): each program first writes the list of
   its chunk's kept channels (one load of the chunk, a prefix sum, a scatter to a scratch slot)
   and then walks only those rows, so its loop is (1 - s) times as long; the masked walk over
   every tile waits on each tile's loads however few rows they fetch (at 90%: about half the time).
   Deferred sums (a layer whose four projections are all sparse, sparsity.DEFER_SUMS): the o and down
   projections' programs add their partial sums into an fp32 copy of the residual stream with atomics
   (sparse_gemv_add) and are done; the q/k/v and gate+up kernels wrote that copy while normalising the
   stream (rounded to the model dtype, as a merge stores it), and gate+up leaves its K chunks' sums to the
   down projection (sparse_gemv_parts), which forms SiLU(g) * u as it loads them. No program waits for the
   others: TEAL 50% 1.48x -> 1.55x over dense on an H100 (BENCHMARKS.md session 20).

2. gated_rows: output-sparse GEMV over the rows n of W (output-major, nn.Linear's own
   layout) that a per-row criterion keeps, fused with the MLP's elementwise step:
     mode 0 CATS:         p = g,      keep |SiLU(p)| > t,  s = SiLU(p) * (W1 x)
     mode 1 M-COUNTDOWN:  p = u,      keep |p| > t,        s = SiLU(W1 x) * p
     mode 2 D-COUNTDOWN:  p = logits, keep p > 0,          s = SiLU(W1 x) * (W2 x)
     mode 3 plain:        p = any,    keep p > 0,          s = W1 x
   Dropped rows are never read and give s = 0, which the down projection's
   input_sparse_gemv (t = 0) then skips. Its batch form is a CUDA-core loop: decode steps take it at
   batch 2-8 only where the union of the kept rows is small (sparsity.batch_kernel_pays).

3. theta_attention: Top-Theta decode attention (arXiv 2502.08363, pre-softmax placement).
   Split over keys (flash-decoding): every K row is read, since every score is compared
   with its threshold, but a V row only if some query head of the KV group keeps its
   score; theta for the step's visible-key count is read from the (H, N) table in the kernel.
   Each key chunk writes its online-softmax state over the kept scores and over all scores;
   a second small kernel (_theta_merge_kernel) merges them, applies SDC none / exact / theta
   and keeps the row maximum when no score passes. Merged by the chunk kernel's last program
   instead, it was slower (BENCHMARKS.md session 8); with the compiled PyTorch merge this
   kernel replaced, chunks + merge took 22.7 us at 8k keys, 10% kept, vs 18.8 us (session 10).
   VMC and post-softmax placement need every V row or the full denominator first: those
   configs use sparsity.py's reference path. decode_attention is the same kernel with every
   score kept (dense decode attention; V rows loaded with K rows, chunks merged in the kernel
   by the program that finishes last).

4. RoPE and the KV-cache write of a decode step: at batch 1, in the q/k/v GEMV's epilogue
   (gemv_rope, sparse_gemv_rope: each column block holds half a head's first-half columns and
   their rotate-half partners, so the merging program rotates the fp32 sums it already has;
   5 kernels per layer). Dense +0.7%, TEAL 50% +1.0% end to end on an H100 (BENCHMARKS.md
   session 18). Otherwise (batch 2-8, a q/k/v bias) rope_kv_update after the projection, one
   small kernel (torch.compile made three of them: launch gaps, not bytes). Both read row pos
   of the model's cos / sin tables themselves: a per-step gather + cast of the rows made
   inductor copy them per consumer, a dozen small launches inside the step that broke the PDL
   chain (dense +0.45%, TEAL 50% +0.9% without them).

Set ACTSPARSE_KERNELS=0 to force the PyTorch reference path on GPU (A/B runs), ACTSPARSE_PDL=0 to launch
each kernel only after the previous one ended (no programmatic dependent launch, see PDL).
"""
import math
import os
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency, but keep CPU users working
    triton = None

MAX_BATCH = 8
# Triton's CPU interpreter has no bf16 matrix product: there, tl.dot runs in fp32 (same result).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Programmatic dependent launch (Hopper on): the decode kernels are launched so that their programs can be
# scheduled while the previous kernel's last programs still run (_launch_next, after a kernel's main loop),
# and wait for its results in their first instruction (_await_previous). False: each launch waits for the
# previous kernel to end (bench rows -nopdl; ACTSPARSE_PDL=0). H100, one run (BENCHMARKS.md session 9):
# TEAL 50% 262.8 vs 254.8 tok/s, dense 183.4 vs 180.8; the logits are the same bit for bit.
PDL = os.environ.get("ACTSPARSE_PDL", "1") != "0"


def enabled(x: Tensor) -> bool:
    """Use the Triton kernels for this activation? On CUDA unless ACTSPARSE_KERNELS=0;
    ACTSPARSE_KERNELS=force also on CPU (tests, through the Triton interpreter)."""
    flag = os.environ.get("ACTSPARSE_KERNELS", "1")
    return triton is not None and flag != "0" and (x.is_cuda or flag == "force")


def pdl_args(x: Tensor) -> dict:
    """A kernel's PDL constexpr and Triton's launch_pdl for a launch reading x: programmatic
    dependent launch when PDL is on and x is on a CUDA GPU of sm_90 on."""
    on = PDL and x.is_cuda and not INTERPRET and torch.cuda.get_device_capability(x.device)[0] >= 9
    return dict(PDL=on, launch_pdl=on)


def is_decode(x: Tensor) -> bool:
    """(B, 1, K) with B <= MAX_BATCH: one new token per sequence."""
    return x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_BATCH


# ----------------------------------------------------------------------------- references
def input_sparse_gemv_ref(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor] = None,
                          shift: Optional[Tensor] = None) -> Tensor:
    """x: (B, K); wt: (K, N); t, m, shift: (N,) fp32. Returns (B, N) fp32."""
    x, wt = x.float(), wt.float()
    m = torch.zeros_like(t) if m is None else m
    y = torch.zeros(x.shape[0], wt.shape[1], dtype=torch.float32, device=x.device)
    for tv, mv in torch.unique(torch.stack([t, m], 1), dim=0).tolist():
        cols = (t == tv) & (m == mv)
        c = x - mv
        y[:, cols] = (c * (c.abs() > tv)) @ wt[:, cols]
    return y if shift is None else y + shift


def rms_norm_ref(x: Tensor, g: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) * g in fp32 (the fused gemv prologue's function)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g.float()


def sparse_gemv_ref(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                    g: Optional[Tensor] = None, eps: float = 0.0, r: Optional[Tensor] = None,
                    swiglu: bool = False) -> Tensor:
    """The fused decode form of input_sparse_gemv_ref: x' = RMSNorm(x) * g (fp32) with g, else x;
    y = W ((x' - m) * 1[|x' - m| > t]) + shift; with swiglu (wt: (K, 2F), gate columns then up
    columns) y = SiLU(y[:, :F]) * y[:, F:]; then [r +] y. x: (B, K). Returns fp32."""
    y = input_sparse_gemv_ref(rms_norm_ref(x, g, eps) if g is not None else x, wt, t, m, shift)
    if swiglu:
        f = y.shape[1] // 2
        y = torch.nn.functional.silu(y[:, :f]) * y[:, f:]
    return y if r is None else y + r.float()


def gemv_ref(x: Tensor, w1: Tensor, w2: Optional[Tensor] = None, g: Optional[Tensor] = None, eps: float = 0.0,
             r: Optional[Tensor] = None) -> Tensor:
    """x: (B, K); w1, w2: (N, K); g: (K,); r: (B, N). [r +] x' W1^T, or SiLU(x' W1^T) * (x' W2^T)
    with w2, where x' = RMSNorm(x) * g with g, else x. Returns fp32."""
    x = rms_norm_ref(x, g, eps) if g is not None else x.float()
    y = x @ w1.float().T
    y = y if w2 is None else torch.nn.functional.silu(y) * (x @ w2.float().T)
    return y if r is None else y + r.float()


def gated_rows_ref(x: Tensor, w1: Tensor, w2: Optional[Tensor], p: Tensor, t: float, mode: int) -> Tensor:
    """x: (B, K); w1, w2: (N, K); p: (B, N). Returns s (B, N) fp32 (see module docstring)."""
    x, p = x.float(), p.float()
    h1 = x @ w1.float().T
    if mode == 0:
        a = torch.nn.functional.silu(p)
        keep, s = a.abs() > t, a * h1
    elif mode == 1:
        keep, s = p.abs() > t, torch.nn.functional.silu(h1) * p
    elif mode == 2:
        keep, s = p > 0, torch.nn.functional.silu(h1) * (x @ w2.float().T)
    else:
        keep, s = p > 0, h1
    return s * keep


def rope_kv_update_ref(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                      n_heads: int) -> Tensor:
    """qkv: (B, (H + 2 Hkv) D) one decode token per sequence; cos, sin: (positions, D) tables (the
    model's rope_cos / rope_sin), row pos used; pos: (1,). Writes RoPE(k) and v into the caches
    (B', Hkv, L, D) at pos; returns RoPE(q) (B, H, D)."""
    from model import apply_rope
    B, Hkv, D = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
    cos, sin = cos[pos], sin[pos]
    q, k, v = qkv.view(B, n_heads + 2 * Hkv, D).split([n_heads, Hkv, Hkv], dim=1)
    k_cache[:B, :, pos] = apply_rope(k.float(), cos.float(), sin.float()).to(k_cache.dtype)[:, :, None]
    v_cache[:B, :, pos] = v.to(v_cache.dtype)[:, :, None]
    return apply_rope(q.float(), cos.float(), sin.float()).to(k_cache.dtype)


SDC_MODES = {"none": 0, "exact": 1, "theta": 2}


def theta_attention_ref(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, lo: int, hi: int, sdc: int) -> Tensor:
    """Top-Theta decode attention (pre-softmax placement). q: (B, H, D); k, v: (B, Hkv, L, D);
    keys lo <= j < hi visible; theta: (H,) on scaled scores (-inf: dense). Kept: scores > theta,
    or the row maximum if none is. sdc: 0 none, 1 exact (dense denominator), 2 theta (each
    dropped score counted as exp(theta - max)). Returns (B, H, D) fp32."""
    B, H, D = q.shape
    rep = H // k.shape[1]
    kf = k[:, :, lo:hi].float().repeat_interleave(rep, dim=1)  # (B, H, n, D)
    vf = v[:, :, lo:hi].float().repeat_interleave(rep, dim=1)
    a = torch.einsum("bhd,bhnd->bhn", q.float(), kf) / math.sqrt(D)
    mx = a.amax(-1, keepdim=True)
    keep = a > theta[None, :, None]
    keep = keep | (~keep.any(-1, keepdim=True) & (a == mx))
    e = torch.exp(a - mx)
    denom = (e * keep).sum(-1, keepdim=True)
    if sdc == 1:
        denom = e.sum(-1, keepdim=True)
    elif sdc == 2:
        denom = denom + (~keep).sum(-1, keepdim=True) * torch.exp(theta[None, :, None] - mx)
    return torch.einsum("bhn,bhnd->bhd", e * keep / denom, vf)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _await_previous(PDL: tl.constexpr):
        """First statement of a kernel launched with programmatic dependent launch: wait until the
        previous kernel has ended and its writes are visible (nothing may be read or written before)."""
        if PDL:
            gdc_wait()

    @triton.jit
    def _launch_next(PDL: tl.constexpr):
        """After a kernel's main loop: once every program got here, the next kernel's programs may be
        scheduled on free SM slots (they wait in _await_previous), so its launch overlaps this one's
        tail (merges, epilogues). Here, not at the start: programs resident early sit on the slots
        they got, and a dense GEMV whose next programs all landed at once ran 10-20% slower."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def _rope_columns(pid, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
        """The output columns of column block pid of a q/k/v projection whose epilogue applies RoPE
        (_rope_store): BLOCK_N // 2 consecutive columns of one head's first half, then, in the same
        order, their rotate-half partners HEAD_D // 2 further on. Every column once over the blocks."""
        per_head: tl.constexpr = HEAD_D // BLOCK_N
        col0 = (pid // per_head) * HEAD_D + (pid % per_head) * (BLOCK_N // 2)
        r = tl.arange(0, BLOCK_N)
        return col0, col0 + r % (BLOCK_N // 2) + (r // (BLOCK_N // 2)) * (HEAD_D // 2)

    @triton.jit
    def _rope_rows(COS, SIN, POS, col0, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
        """For _rope_store: the position POS and its cos / sin (fp32) at the first-half columns of the
        block that starts at col0 (1) and at their partners (2), from the (positions, HEAD_D) tables.
        Loaded before the block's sums are reduced or merged, so that these loads overlap that work."""
        pos = tl.load(POS)
        at = pos * HEAD_D + (col0 + tl.arange(0, BLOCK_N // 2)) % HEAD_D  # d < HEAD_D // 2
        c1 = tl.load(COS + at).to(tl.float32)
        s1 = tl.load(SIN + at).to(tl.float32)
        c2 = tl.load(COS + HEAD_D // 2 + at).to(tl.float32)
        s2 = tl.load(SIN + HEAD_D // 2 + at).to(tl.float32)
        return pos, c1, s1, c2, s2

    @triton.jit
    def _rope_store(y, col0, rows, Q, KC, VC, q_cols, n_cols, stride_ch, stride_cl, BLOCK_N: tl.constexpr,
                    HEAD_D: tl.constexpr):
        """Epilogue of a batch-1 q/k/v GEMV with RoPE: y (fp32), the sums of the columns of the
        block that starts at col0 (_rope_columns); rows: _rope_rows. A q or k head is rotated
        (rotate-half RoPE in fp32, as rope_kv_update_ref); q goes to Q (H x HEAD_D), k and v into
        the caches (Hkv, L, HEAD_D; equal strides) at row pos."""
        pos, c1, s1, c2, s2 = rows
        a, b = tl.split(tl.trans(tl.reshape(y, (2, BLOCK_N // 2))))  # first-half columns, their partners
        col = col0 + tl.arange(0, BLOCK_N // 2)
        kv_cols = (n_cols - q_cols) // 2
        is_qk = col0 < q_cols + kv_cols  # a q or k head, rotated; a v head is stored as it is
        a, b = tl.where(is_qk, a * c1 - b * s1, a), tl.where(is_qk, b * c2 + a * s2, b)
        if col0 < q_cols:
            tl.store(Q + col, a.to(Q.dtype.element_ty))
            tl.store(Q + col + HEAD_D // 2, b.to(Q.dtype.element_ty))
        else:
            kv = col - q_cols - tl.where(is_qk, 0, kv_cols)  # column in the k part, or in the v part
            row = tl.where(is_qk, KC, VC) + (kv // HEAD_D) * stride_ch + pos * stride_cl + kv % HEAD_D
            tl.store(row, a.to(KC.dtype.element_ty))
            tl.store(row + HEAD_D // 2, b.to(KC.dtype.element_ty))

    @triton.jit
    def _gemv_kernel(X, W1, W2, G, R, Y, XN, K, N, stride_w1, stride_w2, eps, COS, SIN, POS, KC, VC, q_cols,
                     stride_ch, stride_cl, SWIGLU: tl.constexpr, NORM: tl.constexpr, NORM_OUT: tl.constexpr,
                     RESIDUAL: tl.constexpr, ROPE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
        """Dense batch-1 GEMV over BLOCK_N weight rows (whole K per program, no split): a 2-D
        fp32 accumulator, one reduction at the end; SWIGLU: rows of W1 and W2, SiLU(g) * u.
        NORM: the input is RMSNorm(x) * G. Every program walks all of x anyway, so it sums x^2
        on the way and scales its dot products by 1/rms at the end (W (x*G) / rms): the norm
        costs no extra pass and no kernel of its own. RESIDUAL: adds R (the residual stream).
        ROPE (q/k/v, heads of HEAD_D): each program's rows are half from a head's first half, half
        their rotate-half partners, and the epilogue writes RoPE(q) to Y and RoPE(k), v into the
        caches KC, VC at POS (_rope_store): no kernel of its own. NORM_OUT: the programs also write
        RMSNorm(x) * G to XN, tile i by program i (grid-stride), once their 1/rms is known."""
        _await_previous(PDL)
        pid = tl.program_id(0)
        if ROPE:
            col0, offs_n = _rope_columns(pid, BLOCK_N, HEAD_D)
        else:
            offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs = tl.arange(0, BLOCK_K)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        sumsq = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + offs
            k_ok = offs_k < K
            x = tl.load(X + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:
                sumsq += x * x
                x = x * tl.load(G + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            wm = n_ok[:, None] & k_ok[None, :]
            w1 = tl.load(W1 + offs_n[:, None] * stride_w1 + offs_k[None, :], mask=wm, other=0.0)
            acc1 += w1.to(tl.float32) * x[None, :]
            if SWIGLU:
                w2 = tl.load(W2 + offs_n[:, None] * stride_w2 + offs_k[None, :], mask=wm, other=0.0)
                acc2 += w2.to(tl.float32) * x[None, :]
        _launch_next(PDL)
        if ROPE:
            rope_rows = _rope_rows(COS, SIN, POS, col0, BLOCK_N, HEAD_D)
        y = tl.sum(acc1, 1)
        if NORM:
            inv_rms = 1.0 / tl.sqrt(tl.sum(sumsq, 0) / K + eps)
            y = y * inv_rms
            if NORM_OUT:  # x's tiles again (in L2 by now), normalised
                for k0 in range(pid * BLOCK_K, K, tl.num_programs(0) * BLOCK_K):
                    offs_k = k0 + offs
                    k_ok = offs_k < K
                    xn = _sparse_x(X, G, offs_k, k_ok, inv_rms, K, True, False, 0, XN.dtype.element_ty)
                    tl.store(XN + offs_k, xn.to(XN.dtype.element_ty), mask=k_ok)
        if SWIGLU:
            y2 = tl.sum(acc2, 1)
            if NORM:
                y2 = y2 * inv_rms
            y = y / (1.0 + tl.exp(-y)) * y2
        if RESIDUAL:
            y += tl.load(R + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if ROPE:
            _rope_store(y, col0, rope_rows, Y, KC, VC, q_cols, N, stride_ch, stride_cl, BLOCK_N, HEAD_D)
        else:
            tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _sparse_x(X, G, offs_k, k_ok, inv_rms, K, NORM: tl.constexpr, ROUND_X: tl.constexpr, GLU_X: tl.constexpr,
                  DTYPE: tl.constexpr):
        """A tile of the GEMV's input in fp32: x, or RMSNorm(x) * G given 1/rms. Deferred sums (sparse_gemv_add):
        ROUND_X: X is the fp32 residual stream that the last projection added into, rounded here to DTYPE as its
        merge would have stored it; GLU_X > 0: X is gate+up's GLU_X rows of per-chunk sums (2K each: gate, then
        up), and x = SiLU(sum of gate) * sum of up, rounded to DTYPE, as gate+up's merge would have stored it."""
        if GLU_X > 0:
            g = tl.zeros(offs_k.shape, tl.float32)
            u = tl.zeros(offs_k.shape, tl.float32)
            for j in tl.static_range(GLU_X):
                g += tl.load(X + j * 2 * K + offs_k, mask=k_ok, other=0.0)
                u += tl.load(X + j * 2 * K + K + offs_k, mask=k_ok, other=0.0)
            x = (g / (1.0 + tl.exp(-g)) * u).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        else:
            x = tl.load(X + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if ROUND_X:
                x = x.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        if NORM:
            x = x * tl.load(G + offs_k, mask=k_ok, other=0.0).to(tl.float32) * inv_rms
        return x

    @triton.jit
    def _halves(w, DTYPE: tl.constexpr):
        """32-bit words w, each two 16-bit values of DTYPE (bf16 or fp16), as two fp32 tensors: the
        values at the lower addresses (little-endian: the low halves) and those at the higher."""
        if DTYPE == tl.bfloat16:  # a bf16 is the top half of an fp32
            return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
        lo = w.to(tl.int16).to(tl.float16, bitcast=True)  # the truncation keeps the low half
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return lo.to(tl.float32), hi.to(tl.float32)

    @triton.jit
    def _column_pairs(WT, offs_k, offs_h, keep, n_out, stride_wk: tl.constexpr, PACKED: tl.constexpr,
                      BOUNDS: tl.constexpr, GROUPED: tl.constexpr):
        """Rows offs_k of WT (those with keep; the others read as zeros, not loaded) at the column
        pairs offs_h, i.e. columns 2h and 2h + 1, as two fp32 tiles: the even columns, the odd ones.
        PACKED (16-bit weights, even row stride, 4-byte aligned, even column count): one 32-bit
        load per pair. Then bf16 to fp32 is one shift (even) or one AND (odd) per value, where the
        conversion of a bf16 tile took about 1.5 instructions per value: the masked walk's loop fell
        from 264 to 215 instructions per tile (down projection, sm_90 SASS; BENCHMARKS.md session
        14). Otherwise (fp32 weights, 16-bit rows at odd addresses): a (.., pairs, 2) tile, split.
        BOUNDS: mask columns >= n_out. GROUPED: the PACKED offsets summed before the pointer add (below).
        offs_k, keep: (ROWS, THREAD_ROWS) (see _sparse_gemv_kernel's walk); the tiles are (ROWS, THREAD_ROWS, pairs)."""
        if PACKED:
            mask = keep[:, :, None]
            if BOUNDS:
                mask = mask & (offs_h < n_out // 2)[None, None, :]
            # GROUPED, the offsets summed first, then one pointer add: ptxas schedules the walk differently (the qkv
            # site's kept-channel loop 250 -> 242 SASS instructions per tile), and TEAL 50% decoded 0.8-0.9% faster
            # end to end (H100, one process, BENCHMARKS.md session 17). Not where grouping measured slower, which add
            # the row offsets to the pointer first: the merged gate+up kernel's kept-channel walk (1.47x slower
            # grouped: 4096 -> 28672 at 90% 21.3 vs 14.5 us, session 22) and gated_rows (7-34%, session 17).
            w_int = WT.to(tl.pointer_type(tl.int32))
            if GROUPED:
                w = tl.load(w_int + (offs_k[:, :, None] * (stride_wk // 2) + offs_h[None, None, :]), mask=mask,
                            other=0)
            else:
                w = tl.load(w_int + offs_k[:, :, None] * (stride_wk // 2) + offs_h[None, None, :], mask=mask, other=0)
            return _halves(w, WT.dtype.element_ty)
        else:  # (an else, not code after the return: Triton also compiles the code after a constexpr if that returns)
            offs_n = 2 * offs_h[:, None] + tl.arange(0, 2)[None, :]  # (pairs, 2): columns 2h, 2h + 1
            mask = keep[:, :, None, None]
            if BOUNDS:
                mask = mask & (offs_n < n_out)[None, None, :, :]
            w = tl.load(WT + offs_k[:, :, None, None] * stride_wk + offs_n[None, None, :, :], mask=mask, other=0.0)
            return tl.split(w.to(tl.float32))

    @triton.jit
    def _sparse_tile(WT, offs_k, k_end, x, m, t, offs_h, n_out, stride_wk: tl.constexpr, PACKED: tl.constexpr,
                     BOUNDS: tl.constexpr, GROUPED: tl.constexpr):
        """One tile: the thresholded inputs (x - m) * 1[|x - m| > t] and the weight rows of the
        kept channels (the others are not loaded), as even and odd columns (_column_pairs).
        BOUNDS False: the caller knows every channel is < k_end and every column < n_out."""
        c = x - m
        keep = tl.abs(c) > t
        if BOUNDS:
            keep = keep & (offs_k < k_end)
        w_even, w_odd = _column_pairs(WT, offs_k, offs_h, keep, n_out, stride_wk, PACKED, BOUNDS, GROUPED)
        return tl.where(keep, c, 0.0), w_even, w_odd

    @triton.jit
    def _kept_channels(X, G, S, k0, k_end, inv_rms, m1, t1, m2, t2, K, CHUNK: tl.constexpr, NORM: tl.constexpr,
                       SWIGLU: tl.constexpr, ROUND_X: tl.constexpr, GLU_X: tl.constexpr, DTYPE: tl.constexpr):
        """Writes to S, in order, the channels k0 <= k < k_end whose input passes a threshold (either
        one with SWIGLU): the whole chunk in one load, positions by a prefix sum. Returns their count."""
        offs = k0 + tl.arange(0, CHUNK)
        ok = offs < k_end
        x = _sparse_x(X, G, offs, ok, inv_rms, K, NORM, ROUND_X, GLU_X, DTYPE)
        keep = tl.abs(x - m1) > t1
        if SWIGLU:
            keep = keep | (tl.abs(x - m2) > t2)
        keep = (keep & ok).to(tl.int32)
        tl.store(S + tl.cumsum(keep, 0) - 1, offs, mask=keep != 0)
        return tl.sum(keep, 0)

    @triton.jit
    def _sparse_gemv_out(y1, y2, offs_n, n_ok, SHIFT, R, Y, col2, col0, N_OUT, ROPE_ARGS, SWIGLU: tl.constexpr,
                         HAS_SHIFT: tl.constexpr, RESIDUAL: tl.constexpr, ROPE: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_D: tl.constexpr):
        """Epilogue of _sparse_gemv_kernel on a finished block of sums: + W m, SiLU(gate) * up,
        + residual, stored in Y's dtype; or ROPE: + W m, RoPE and the KV-cache write (_rope_store)."""
        if HAS_SHIFT:
            y1 += tl.load(SHIFT + offs_n, mask=n_ok, other=0.0)
            if SWIGLU:
                y2 += tl.load(SHIFT + col2 + offs_n, mask=n_ok, other=0.0)
        if SWIGLU:
            y1 = y1 / (1.0 + tl.exp(-y1)) * y2
        if RESIDUAL:
            y1 += tl.load(R + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if ROPE:
            rows, KC, VC, q_cols, stride_ch, stride_cl = ROPE_ARGS
            _rope_store(y1, col0, rows, Y, KC, VC, q_cols, N_OUT, stride_ch, stride_cl, BLOCK_N, HEAD_D)
        else:
            tl.store(Y + offs_n, y1.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _sparse_gemv_kernel(X, G, WT, T, M, SHIFT, R, P, COUNT, S, Y, XC, K, N_OUT, col2, k_per_prog, split,
                            stride_wk: tl.constexpr, stride_p, eps, COS, SIN, POS, KC, VC, q_cols, stride_ch,
                            stride_cl, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
                            NORM: tl.constexpr, HAS_MODE: tl.constexpr, SWIGLU: tl.constexpr,
                            HAS_SHIFT: tl.constexpr, RESIDUAL: tl.constexpr, MERGE: tl.constexpr,
                            SPLIT_PAD: tl.constexpr, COMPACT: tl.constexpr, CHUNK: tl.constexpr,
                            PACKED: tl.constexpr, BOUNDS: tl.constexpr, ROPE: tl.constexpr, HEAD_D: tl.constexpr,
                            ROUND_X: tl.constexpr, COPY_X: tl.constexpr, COPY_PAD: tl.constexpr,
                            GLU_X: tl.constexpr, ADD: tl.constexpr, PARTS: tl.constexpr, THREAD_ROWS: tl.constexpr,
                            PDL: tl.constexpr):
        """Batch-1 input-sparse GEMV with everything around it fused, so that a sparse decode
        step has as few kernels as a dense one. One program: one BLOCK_N block of output
        columns (SWIGLU: and the up block col2 columns further) over one K chunk.
        NORM: the input is RMSNorm(x) * G; each program first sums x^2 over all of x (K_PAD
        elements in one load, from L2), so the threshold applies to the normalised value.
        Then the chunk in BLOCK_K tiles: a weight row is loaded only if its channel passes
        |x' - m| > t (t, m uniform within the block), the next tile's x loaded before this tile's
        products, which go to 2-D fp32 accumulators, one for the even columns and one for the odd
        (_column_pairs; THREAD_ROWS of a tile's channels summed in each thread first, see the walk; one
        reduction at the end); COMPACT: over the list of kept channels
        (_kept_channels), not every tile. stride_wk is a constexpr (one compile per weight shape):
        the weight addresses are then cheaper, and gate+up's loop ran about 5% faster at 40-50%
        sparsity (BENCHMARKS.md session 14). BOUNDS False: the chunks and column blocks tile K and
        N exactly, so the walk has no bound masks. MERGE (several K chunks): each
        program stores its partial sums in P; the program that finishes its column block last (an
        atomic counter per block, reset by it afterwards) sums them and runs the epilogue
        (+ W m, SiLU(gate) * up, + residual R) and writes Y in Y's dtype: no reduction kernel.
        Several chunks without MERGE (input_sparse_gemv's batch 1): chunk k's sums in row k of Y.
        ROPE (q/k/v, heads of HEAD_D): a column block is half a head's first-half columns, half their
        rotate-half partners (_rope_columns; the pairs in two runs), and the epilogue writes RoPE(q)
        to Y and RoPE(k), v into the caches KC, VC at POS (_rope_store): no kernel of its own.
        Deferred sums (sparse_gemv_add, BENCHMARKS.md session 20): ADD: each program adds its partial sums into Y
        (fp32) with atomics and is done (no counter, no merging program, no epilogue: Y already holds the
        residual); PARTS: each program stores its raw partial sums in row pid_k of Y (gate+up; the down
        projection's GLU_X input sums them); with either, the K chunk 0 programs add W m. COPY_X (NORM): the
        programs also write the input they normalise (ROUND_X: rounded), a slice each (COPY_PAD lanes), to XC
        (fp32): the buffer that the next projection adds into. ROUND_X, GLU_X: see _sparse_x."""
        _await_previous(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        if ROPE:
            col0, offs_n = _rope_columns(pid_n, BLOCK_N, HEAD_D)
            r = tl.arange(0, BLOCK_N // 2)  # the same columns as pairs (_column_pairs): two runs
            offs_h = col0 // 2 + r % (BLOCK_N // 4) + (r // (BLOCK_N // 4)) * (HEAD_D // 4)
        else:
            col0 = pid_n * BLOCK_N
            offs_n = col0 + tl.arange(0, BLOCK_N)
            offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # column pairs (_column_pairs)
        n_ok = offs_n < N_OUT
        t1 = tl.load(T + col0)
        t2 = t1
        m1 = 0.0
        m2 = 0.0
        if HAS_MODE:
            m1 = tl.load(M + col0)
        if SWIGLU:
            t2 = tl.load(T + col2 + col0)
            if HAS_MODE:
                m2 = tl.load(M + col2 + col0)
        inv_rms = 1.0
        DTYPE = WT.dtype.element_ty
        if NORM:
            offs_all = tl.arange(0, K_PAD)
            xa = _sparse_x(X, G, offs_all, offs_all < K, 1.0, K, False, ROUND_X, 0, DTYPE)  # x (rounded), no norm
            inv_rms = 1.0 / tl.sqrt(tl.sum(xa * xa, 0) / K + eps)
            if COPY_X:  # program p writes elements [p * per, (p + 1) * per), COPY_PAD >= per lanes (x from L1 again):
                # a store over all K_PAD lanes, masked to the slice, cost TEAL 50% 0.8% end to end (session 23)
                per = tl.cdiv(K, tl.num_programs(0) * tl.num_programs(1))
                lo = (pid_k * tl.num_programs(0) + pid_n) * per
                offs_c = lo + tl.arange(0, COPY_PAD)
                c_ok = (offs_c < lo + per) & (offs_c < K)
                tl.store(XC + offs_c, _sparse_x(X, G, offs_c, c_ok, 1.0, K, False, ROUND_X, 0, DTYPE), mask=c_ok)
        k0 = pid_k * k_per_prog
        k_end = tl.minimum(k0 + k_per_prog, K)
        # A tile of BLOCK_K channels as (ROWS, THREAD_ROWS): the THREAD_ROWS channels of a row of the tile are in
        # one thread (the tile's layout puts no threads along that axis), and each tile's products are first summed
        # over them in registers, so the fp32 accumulators of the even and the odd columns, the gate's (1) and the
        # up projection's (2), are (ROWS, pairs): THREAD_ROWS times fewer registers than (BLOCK_K, pairs) ones.
        # The registers freed hold a taller tile: twice the weight bytes in flight per SM, TEAL 50% +5% end to end
        # (H100, BENCHMARKS.md session 24).
        ROWS: tl.constexpr = BLOCK_K // THREAD_ROWS
        offs = tl.arange(0, ROWS)[:, None] + tl.arange(0, THREAD_ROWS)[None, :] * ROWS
        acc1e = tl.zeros((ROWS, BLOCK_N // 2), tl.float32)
        acc1o = tl.zeros((ROWS, BLOCK_N // 2), tl.float32)
        acc2e = tl.zeros((ROWS, BLOCK_N // 2), tl.float32)
        acc2o = tl.zeros((ROWS, BLOCK_N // 2), tl.float32)
        if COMPACT:
            # The kept channels' indices first (this program's slot of S), then tiles of kept
            # channels only: the loop runs (1 - s) times as long and every loaded row is needed.
            S += (pid_k * tl.num_programs(0) + pid_n) * CHUNK
            n = _kept_channels(X, G, S, k0, k_end, inv_rms, m1, t1, m2, t2, K, CHUNK, NORM, SWIGLU, ROUND_X, GLU_X,
                               DTYPE)
            tl.debug_barrier()  # every thread's stores before any thread reads the list
            idx = tl.load(S + offs, mask=offs < n, other=k_end)  # k_end: padding, masked below
            x = _sparse_x(X, G, idx, idx < k_end, inv_rms, K, NORM, ROUND_X, GLU_X, DTYPE)
            for j in range(0, n, BLOCK_K):
                # gate+up: row offsets added to the pointer one by one (_column_pairs' GROUPED)
                xs1, w1e, w1o = _sparse_tile(WT, idx, k_end, x, m1, t1, offs_h, N_OUT, stride_wk, PACKED, True,
                                             not SWIGLU)
                if SWIGLU:
                    xs2, w2e, w2o = _sparse_tile(WT + col2, idx, k_end, x, m2, t2, offs_h, N_OUT, stride_wk,
                                                 PACKED, True, False)
                nxt = j + BLOCK_K + offs
                idx = tl.load(S + nxt, mask=nxt < n, other=k_end)
                # the next tile's x, before the products
                x = _sparse_x(X, G, idx, idx < k_end, inv_rms, K, NORM, ROUND_X, GLU_X, DTYPE)
                acc1e += tl.sum(xs1[:, :, None] * w1e, 1)
                acc1o += tl.sum(xs1[:, :, None] * w1o, 1)
                if SWIGLU:
                    acc2e += tl.sum(xs2[:, :, None] * w2e, 1)
                    acc2o += tl.sum(xs2[:, :, None] * w2o, 1)
        else:
            # Every tile of the chunk, offsets from the loop index. One loop for both walks (the
            # offsets carried across iterations, as the list's are) decoded TEAL 50% 2% slower on
            # an H100: 250 vs 256 tok/s in one run (benchmarks/h100_s8_loop_ab_*.txt).
            x = _sparse_x(X, G, k0 + offs, k0 + offs < k_end, inv_rms, K, NORM, ROUND_X, GLU_X, DTYPE)
            for kk in range(k0, k_end, BLOCK_K):
                offs_k = kk + offs
                xs1, w1e, w1o = _sparse_tile(WT, offs_k, k_end, x, m1, t1, offs_h, N_OUT, stride_wk, PACKED, BOUNDS,
                                             True)
                if SWIGLU:
                    xs2, w2e, w2o = _sparse_tile(WT + col2, offs_k, k_end, x, m2, t2, offs_h, N_OUT, stride_wk,
                                                 PACKED, BOUNDS, True)
                nxt = offs_k + BLOCK_K
                # the next tile's x, before the products
                x = _sparse_x(X, G, nxt, nxt < k_end, inv_rms, K, NORM, ROUND_X, GLU_X, DTYPE)
                acc1e += tl.sum(xs1[:, :, None] * w1e, 1)
                acc1o += tl.sum(xs1[:, :, None] * w1o, 1)
                if SWIGLU:
                    acc2e += tl.sum(xs2[:, :, None] * w2e, 1)
                    acc2o += tl.sum(xs2[:, :, None] * w2o, 1)
        _launch_next(PDL)
        rope = (COS, SIN)  # unused
        if ROPE:  # every program loads them (a few hundred bytes), overlapping the merge's round trips
            rope = (_rope_rows(COS, SIN, POS, col0, BLOCK_N, HEAD_D), KC, VC, q_cols, stride_ch, stride_cl)
        # Each column's sum, the pairs interleaved back into column order.
        y1 = tl.reshape(tl.join(tl.sum(acc1e, 0), tl.sum(acc1o, 0)), (BLOCK_N,))
        y2 = tl.reshape(tl.join(tl.sum(acc2e, 0), tl.sum(acc2o, 0)), (BLOCK_N,))
        if ADD or PARTS:
            if HAS_SHIFT:  # W m, once per column
                y1 += tl.load(SHIFT + offs_n, mask=n_ok & (pid_k == 0), other=0.0)
                if SWIGLU:
                    y2 += tl.load(SHIFT + col2 + offs_n, mask=n_ok & (pid_k == 0), other=0.0)
            if ADD:
                tl.atomic_add(Y + offs_n, y1, mask=n_ok, sem="relaxed")
            else:
                tl.store(Y + pid_k * stride_p + offs_n, y1, mask=n_ok)
                if SWIGLU:
                    tl.store(Y + pid_k * stride_p + col2 + offs_n, y2, mask=n_ok)
        elif MERGE:
            tl.store(P + pid_k * stride_p + offs_n, y1, mask=n_ok)
            if SWIGLU:
                tl.store(P + pid_k * stride_p + col2 + offs_n, y2, mask=n_ok)
            # As in the attention merge: every thread's stores before the release, the last
            # program's loads after its acquire, from L2 (.cg).
            tl.debug_barrier()
            done = tl.atomic_add(COUNT + pid_n, 1, sem="acq_rel")
            if done == split - 1:  # every chunk's partial sums in one load, not split dependent ones
                offs_s = tl.arange(0, SPLIT_PAD)
                p_rows = P + offs_s[:, None] * stride_p + offs_n[None, :]
                p_ok = (offs_s < split)[:, None] & n_ok[None, :]
                y1 = tl.sum(tl.load(p_rows, mask=p_ok, other=0.0, cache_modifier=".cg"), 0)
                if SWIGLU:
                    y2 = tl.sum(tl.load(p_rows + col2, mask=p_ok, other=0.0, cache_modifier=".cg"), 0)
                _sparse_gemv_out(y1, y2, offs_n, n_ok, SHIFT, R, Y, col2, col0, N_OUT, rope, SWIGLU, HAS_SHIFT,
                                 RESIDUAL, ROPE, BLOCK_N, HEAD_D)
                tl.store(COUNT + pid_n, 0)
        else:  # one chunk; or, for input_sparse_gemv (no epilogue), each chunk's partial sums in its row of Y
            _sparse_gemv_out(y1, y2, offs_n, n_ok, SHIFT, R, Y + pid_k * stride_p, col2, col0, N_OUT, rope, SWIGLU,
                             HAS_SHIFT, RESIDUAL, ROPE, BLOCK_N, HEAD_D)

    @triton.jit
    def _input_sparse_gemv_kernel(X, WT, T, M, Y, B, K, N, stride_xb, stride_wk, stride_ys, stride_yb,
                                  K_PER_PROG: tl.constexpr, B_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_N: tl.constexpr, HAS_MODE: tl.constexpr, DOT_FP32: tl.constexpr,
                                  PDL: tl.constexpr):
        _await_previous(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_b = tl.arange(0, B_PAD)
        b_ok = offs_b < B
        # One threshold (and mode) per BLOCK_N block: the host guarantees blocks never
        # straddle two projections, so the row mask is uniform along n and loads vectorise.
        t = tl.load(T + pid_n * BLOCK_N)
        m = 0.0
        if HAS_MODE:
            m = tl.load(M + pid_n * BLOCK_N)
        acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
        k0 = pid_k * K_PER_PROG
        for kk in range(0, K_PER_PROG, BLOCK_K):
            offs_k = k0 + kk + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :],
                        mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) - m  # (B_PAD, BLOCK_K)
            keep = (tl.abs(x) > t) & b_ok[:, None] & k_ok[None, :]
            xs = tl.where(keep, x, 0.0)
            need = tl.max(keep.to(tl.int32), axis=0) > 0  # (BLOCK_K,): any row of the batch
            w = tl.load(WT + offs_k[:, None] * stride_wk + offs_n[None, :],
                        mask=need[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if DOT_FP32:  # several rows: tl.dot on 16 rows (padding rows are zero); fp32 weights
                acc += tl.dot(xs, w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xs.to(w.dtype), w)
        _launch_next(PDL)
        # One partial sum per K chunk (no atomics, no zero-filled output); the caller sums them,
        # which torch.compile fuses into the next op.
        tl.store(Y + pid_k * stride_ys + offs_b[:, None] * stride_yb + offs_n[None, :], acc,
                 mask=b_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _gated_rows_kernel(X, W1, W2, P, Y, B, K, N, t, stride_xb, stride_w1, stride_w2, stride_pb, stride_yb,
                           MODE: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PACKED: tl.constexpr, PDL: tl.constexpr):
        """Output-sparse rows (see gated_rows). PACKED (batch 1, x and weights 16-bit of one dtype, even
        K and strides, 4-byte aligned): x and each kept row read as 32-bit words of two channels
        (_halves), both products of a pair into one 2-D fp32 accumulator, summed once after the
        loop. Otherwise (batch 2-8, fp32, odd K) the batch loop: each tile's products summed at
        once. On the H100 the packed loop took 0.80 of the batch loop's time at batch 1
        (BENCHMARKS.md session 14): 230 instead of 381 instructions per tile, and no cross-thread
        sums per tile."""
        _await_previous(PDL)
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_b = tl.arange(0, B_PAD)
        b_ok = offs_b < B
        io_mask = b_ok[:, None] & n_ok[None, :]
        p = tl.load(P + offs_b[:, None] * stride_pb + offs_n[None, :], mask=io_mask, other=0.0).to(tl.float32)
        if MODE == 0:
            a = p / (1.0 + tl.exp(-p))
            keep = tl.abs(a) > t
        elif MODE == 1:
            keep = tl.abs(p) > t
        else:
            keep = p > 0
        keep = keep & io_mask
        row = tl.max(keep.to(tl.int32), axis=0) > 0  # (BLOCK_N,): read row n if any sequence keeps it
        # A program none of whose rows is kept skips its loop (its masked loads fetch nothing, but the walk
        # still issues them) and stores its zeros: at batch 1 0.91x the time at 30% of rows kept, 0.73x at 10%,
        # the same at 50% (H100, session 22; the batch loop likewise, not timed).
        k_end = tl.where(tl.max(row.to(tl.int32), axis=0) > 0, K, 0)
        if PACKED:
            acc1p = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)  # one per pair: half the registers
            acc2p = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
            dtype = W1.dtype.element_ty
            for h0 in range(0, k_end // 2, BLOCK_K // 2):  # h: a pair of channels, 2h and 2h + 1
                offs_h = h0 + tl.arange(0, BLOCK_K // 2)
                h_ok = offs_h < K // 2
                xe, xo = _halves(tl.load(X.to(tl.pointer_type(tl.int32)) + offs_h, mask=h_ok, other=0), dtype)
                wmask = row[:, None] & h_ok[None, :]
                w1e, w1o = _halves(tl.load(W1.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_w1 // 2)
                                           + offs_h[None, :], mask=wmask, other=0), dtype)
                acc1p += w1e * xe[None, :]
                acc1p += w1o * xo[None, :]
                if MODE == 2:
                    w2e, w2o = _halves(tl.load(W2.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_w2 // 2)
                                               + offs_h[None, :], mask=wmask, other=0), dtype)
                    acc2p += w2e * xe[None, :]
                    acc2p += w2o * xo[None, :]
            acc1 = tl.sum(acc1p, 1)[None, :]
            acc2 = tl.sum(acc2p, 1)[None, :]
        else:
            acc1 = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
            acc2 = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :],
                            mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (B_PAD, BLOCK_K)
                wmask = row[:, None] & k_ok[None, :]
                w1 = tl.load(W1 + offs_n[:, None] * stride_w1 + offs_k[None, :], mask=wmask, other=0.0).to(tl.float32)
                acc1 += tl.sum(x[:, None, :] * w1[None, :, :], axis=2)
                if MODE == 2:
                    w2 = tl.load(W2 + offs_n[:, None] * stride_w2 + offs_k[None, :], mask=wmask,
                                 other=0.0).to(tl.float32)
                    acc2 += tl.sum(x[:, None, :] * w2[None, :, :], axis=2)
        _launch_next(PDL)
        if MODE == 0:
            s = a * acc1
        elif MODE == 1:
            s = acc1 / (1.0 + tl.exp(-acc1)) * p
        elif MODE == 2:
            s = acc1 / (1.0 + tl.exp(-acc1)) * acc2
        else:
            s = acc1
        s = tl.where(keep, s, 0.0)
        tl.store(Y + offs_b[:, None] * stride_yb + offs_n[None, :], s, mask=io_mask)


if triton is not None:
    @triton.jit
    def _rope_kv_kernel(QKV, COS, SIN, POS, Q, KC, VC, H, Hkv, stride_xb, stride_kb, stride_kh, stride_kl,
                        stride_vb, stride_vh, stride_vl, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                        PDL: tl.constexpr):
        """One program per (sequence, head) of q, k and v: rotate-half RoPE in fp32 on a q head
        (stored to Q, (B, H, 2 HALF)) or a k head (stored into the K cache at POS), with row POS of the
        cos / sin tables; a v head is copied into the V cache."""
        _await_previous(PDL)
        _launch_next(PDL)  # a few hundred bytes per program: no main loop to wait for
        b = tl.program_id(0)
        j = tl.program_id(1)
        o = tl.arange(0, HALF_PAD)
        ok = o < HALF
        src = QKV + b * stride_xb + j * 2 * HALF
        x1 = tl.load(src + o, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + o, mask=ok, other=0.0).to(tl.float32)
        pos = tl.load(POS)
        if j < H + Hkv:  # q or k: rotate
            at = pos * 2 * HALF + o  # row pos of the (positions, 2 HALF) tables
            c1 = tl.load(COS + at, mask=ok, other=0.0).to(tl.float32)
            c2 = tl.load(COS + HALF + at, mask=ok, other=0.0).to(tl.float32)
            s1 = tl.load(SIN + at, mask=ok, other=0.0).to(tl.float32)
            s2 = tl.load(SIN + HALF + at, mask=ok, other=0.0).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
            if j < H:
                dst = Q + (b * H + j) * 2 * HALF
            else:
                dst = KC + b * stride_kb + (j - H) * stride_kh + pos * stride_kl
            tl.store(dst + o, y1.to(KC.dtype.element_ty), mask=ok)
            tl.store(dst + HALF + o, y2.to(KC.dtype.element_ty), mask=ok)
        else:  # v: copy
            dst = VC + b * stride_vb + (j - H - Hkv) * stride_vh + pos * stride_vl
            tl.store(dst + o, x1.to(VC.dtype.element_ty), mask=ok)
            tl.store(dst + HALF + o, x2.to(VC.dtype.element_ty), mask=ok)

    @triton.jit
    def _theta_attention_kernel(Q, K, V, THETA, LOHI, DENSE_ROW, ACC, STATS, COUNT, OUT, B, Hkv, n_split, scale,
                                n_cols, dense_below,
                                stride_qb, stride_qh, stride_kb, stride_kh, stride_kl,
                                stride_vb, stride_vh, stride_vl, stride_ab, stride_ah, stride_as,
                                stride_sb, stride_sh, stride_ss,
                                REP: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                                BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr, DENSE: tl.constexpr,
                                NORMALIZE: tl.constexpr, MERGE: tl.constexpr, SDC: tl.constexpr,
                                REP_P2: tl.constexpr, MERGE_BLOCK: tl.constexpr, HAS_DENSE_ROW: tl.constexpr,
                                PDL: tl.constexpr):
        """One program: one KV head (its REP query heads together) over one chunk of keys.
        Top-Theta: THETA (H, n_cols) per head and visible-key count, see _theta_threshold.
        K rows are all read (every score is needed); a V row is read only if a query head of
        the group keeps its score. Those V rows wait for the block's scores, so they are used one
        block later: the load is in flight during the next block's K rows and scores, where
        using them at once left its latency exposed in every block (8k keys, 3% kept: 14.1 against
        18.6 us, BENCHMARKS.md session 16). Writes the chunk's online-softmax state over kept scores
        (m_k, l_k, acc), the maximum over all scores and its argmax (m_a, arg), and what its
        SDC mode needs: l_a, the exp-sum over all scores (exact), or the dropped count (theta).
        DENSE: every visible score kept (dense decode attention): V rows are loaded with the
        K rows, and the output is written, not the state: NORMALIZE (one chunk) from registers;
        MERGE (several chunks) by the program that finishes last for its (sequence, KV head) -
        an atomic counter per pair tells it - which merges every chunk's state, MERGE_BLOCK
        chunks per load (_merged_state), and resets the counter (no merge kernels). Both write
        OUT (B, H, D) in q's dtype, the layout wo reads.
        """
        _await_previous(PDL)
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        lo = tl.load(LOHI)
        hi = tl.load(LOHI + 1)
        per = tl.cdiv(tl.cdiv(hi - lo, n_split), BLOCK_L) * BLOCK_L
        start = lo + pid_s * per
        end = tl.minimum(start + per, hi)
        offs_r = tl.arange(0, REP_PAD)
        r_ok = offs_r < REP
        heads = hk * REP + offs_r
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        theta = tl.full((REP_PAD,), float("-inf"), tl.float32)
        if not DENSE:
            theta = _theta_threshold(THETA, heads, r_ok, hi - lo, n_cols, dense_below, DENSE_ROW, HAS_DENSE_ROW)
        m_k = tl.full((REP_PAD,), float("-inf"), tl.float32)
        l_k = tl.zeros((REP_PAD,), tl.float32)
        m_a = tl.full((REP_PAD,), float("-inf"), tl.float32)
        l_a = tl.zeros((REP_PAD,), tl.float32)
        n_drop = tl.zeros((REP_PAD,), tl.float32)
        arg = tl.zeros((REP_PAD,), tl.int32)
        acc = tl.zeros((REP_PAD, D_PAD), tl.float32)
        p_prev = tl.zeros((REP_PAD, BLOCK_L), tl.float32)  # Top-Theta: the previous block's weights,
        a_prev = tl.full((REP_PAD,), 1.0, tl.float32)  # its rescale of acc
        v_prev = tl.zeros((BLOCK_L, D_PAD), V.dtype.element_ty)  # and its V rows (zeros: no block yet)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        for j0 in range(start, end, BLOCK_L):
            offs_l = j0 + tl.arange(0, BLOCK_L)
            l_ok = offs_l < end
            kt = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :],
                         other=0.0)
            if DENSE:  # V does not depend on the scores: issue its load with K's
                vt = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :],
                             mask=l_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                a = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                a = tl.dot(q, tl.trans(kt))
            a = tl.where(l_ok[None, :], a * scale, float("-inf"))  # (REP_PAD, BLOCK_L)
            keep = l_ok[None, :] & r_ok[:, None]
            if not DENSE:
                # every visible score: max, argmax, exp-sum (SDC exact), dropped count (SDC theta)
                bm = tl.max(a, 1)
                barg = tl.argmax(a, 1) + j0
                arg = tl.where(bm > m_a, barg, arg)
                m_new = tl.maximum(m_a, bm)
                if SDC == 1:
                    l_a = l_a * tl.exp(m_a - m_new) + tl.sum(tl.exp(a - m_new[:, None]), 1)
                m_a = m_new
                keep = keep & (a > theta[:, None])
                if SDC == 2:
                    n_drop += tl.sum((l_ok[None, :] & ~keep).to(tl.float32), 1)
                need = tl.max(keep.to(tl.int32), 0) > 0  # (BLOCK_L,): union over the group's heads
                vt = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :],
                             mask=need[:, None] & d_ok[None, :], other=0.0)
            mk_new = tl.maximum(m_k, tl.max(tl.where(keep, a, float("-inf")), 1))
            mk_safe = tl.where(mk_new == float("-inf"), 0.0, mk_new)
            alpha = tl.exp(m_k - mk_safe)
            p = tl.where(keep, tl.exp(a - mk_safe[:, None]), 0.0)
            l_k = l_k * alpha + tl.sum(p, 1)
            if DENSE:
                acc = _add_pv(acc, alpha, p, vt, DOT_FP32)
            else:  # this block's V rows are in flight: the previous block's products now
                acc = _add_pv(acc, a_prev, p_prev, v_prev, DOT_FP32)
                p_prev, a_prev, v_prev = p, alpha, vt
            m_k = mk_new
        if not DENSE:
            acc = _add_pv(acc, a_prev, p_prev, v_prev, DOT_FP32)  # the last block's
        _launch_next(PDL)
        if NORMALIZE:  # dense, one chunk: the output itself
            _store_dense_output(OUT, acc, l_k, b * Hkv * REP + heads, r_ok, offs_d, d_ok, D)
        else:
            out = b * stride_ab + heads[:, None] * stride_ah + pid_s * stride_as + offs_d[None, :]
            tl.store(ACC + out, acc, mask=r_ok[:, None] & d_ok[None, :])
            st = STATS + b * stride_sb + heads * stride_sh + pid_s * stride_ss
            tl.store(st, m_k, mask=r_ok)
            tl.store(st + 1, l_k, mask=r_ok)
            if not DENSE:
                tl.store(st + 2, m_a, mask=r_ok)
                tl.store(st + 3, l_a, mask=r_ok)
                tl.store(st + 4, n_drop, mask=r_ok)
                tl.store(st + 5, arg.to(tl.float32), mask=r_ok)
            if MERGE:  # dense, several chunks
                # Every thread's stores above happen before the counter's release (the barrier), and
                # the last program's loads below after its acquire; .cg reads from L2, not a stale L1.
                tl.debug_barrier()
                done = tl.atomic_add(COUNT + pid_bh, 1, sem="acq_rel")
                if done == n_split - 1:
                    offs_h = tl.arange(0, REP_P2)  # the merge has no tl.dot: no padding to 16 rows
                    h_ok = offs_h < REP
                    g_heads = hk * REP + offs_h
                    g_lk, g_acc = _merged_state(ACC, STATS, b, g_heads, h_ok, offs_d, d_ok, n_split, stride_ab,
                                                stride_ah, stride_as, stride_sb, stride_sh, stride_ss, REP_P2, D_PAD,
                                                MERGE_BLOCK)
                    _store_dense_output(OUT, g_acc, g_lk, b * Hkv * REP + g_heads, h_ok, offs_d, d_ok, D)
                    tl.store(COUNT + pid_bh, 0)

    @triton.jit
    def _add_pv(acc, alpha, p, vt, DOT_FP32: tl.constexpr):
        """One key block into the attention accumulator: acc rescaled by alpha (per head) plus the
        block's weights p (heads, keys) times its V rows vt (keys, D)."""
        if DOT_FP32:
            return acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        return acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)

    @triton.jit
    def _store_dense_output(OUT, acc, l_k, rows, ok, offs_d, d_ok, D: tl.constexpr):
        """Dense attention's output acc / l_k (0 where no key was visible) into rows of OUT,
        (B * H, D) in OUT's dtype, the layout wo reads."""
        y = acc / tl.where(l_k == 0, 1.0, l_k)[:, None]
        tl.store(OUT + rows[:, None] * D + offs_d[None, :], y.to(OUT.dtype.element_ty),
                 mask=ok[:, None] & d_ok[None, :])

    @triton.jit
    def _theta_threshold(THETA, heads, ok, n, n_cols, dense_below, DENSE_ROW, HAS_DENSE_ROW: tl.constexpr):
        """Top-Theta's threshold of each of these heads for a query row that sees n keys: column
        min(n, n_cols) - 1 of THETA (H, n_cols), the table's last column beyond it; -inf (every
        score kept) when the row sees at most dense_below keys or DENSE_ROW (one bool) is set."""
        col = tl.minimum(tl.maximum(n - 1, 0), n_cols - 1)
        theta = tl.load(THETA + heads * n_cols + col, mask=ok, other=float("inf"))
        dense = n <= dense_below
        if HAS_DENSE_ROW:
            dense = dense | (tl.load(DENSE_ROW) != 0)
        return tl.where(dense, float("-inf"), theta)

    @triton.jit
    def _theta_merge_kernel(ACC, STATS, THETA, LOHI, DENSE_ROW, V, OUT, H, REP, n_split, n_cols, dense_below,
                            stride_ab, stride_ah, stride_as, stride_sb, stride_sh, stride_ss,
                            stride_vb, stride_vh, stride_vl, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            CHUNKS: tl.constexpr, SDC: tl.constexpr, HAS_DENSE_ROW: tl.constexpr,
                            PDL: tl.constexpr):
        """Top-Theta's key chunks merged, one program per (sequence, query head, BLOCK_D slice of
        the head dim): the chunks' states (acc, and m_k, l_k, m_a, l_a, dropped count, argmax)
        weighted to the maximum M over every visible score, SDC applied (exact: the dense
        denominator; theta: each dropped score counted as exp(theta - M)), and the V row of the
        maximum when no score was kept. CHUNKS chunks' states and partial outputs per load, all
        issued at once (one round trip to L2 when every chunk fits), online over the loads (the
        running maximum, earlier sums rescaled to it). Writes OUT (B * H, D) in its dtype."""
        _await_previous(PDL)
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        st0 = STATS + b * stride_sb + h * stride_sh
        M = float("-inf")  # running maximum over the visible scores
        L_k = 0.0  # kept exp-mass, relative to M
        l_a = 0.0  # every score's exp-mass, relative to M (SDC exact)
        dropped = 0.0
        best = 0  # chunk holding the maximum
        out = tl.zeros((BLOCK_D,), tl.float32)
        offs_c = tl.arange(0, CHUNKS)
        for c0 in range(0, n_split, CHUNKS):
            c = c0 + offs_c
            c_ok = c < n_split
            st = st0 + c * stride_ss
            m_k = tl.load(st, mask=c_ok, other=float("-inf"))  # -inf: the chunk kept nothing
            l_k = tl.load(st + 1, mask=c_ok, other=0.0)
            m_a = tl.load(st + 2, mask=c_ok, other=float("-inf"))  # -inf: the chunk saw no key
            a = tl.load(ACC + b * stride_ab + h * stride_ah + c[:, None] * stride_as + offs_d[None, :],
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(M, tl.max(m_a, 0))
            best = tl.where(tl.max(m_a, 0) > M, c0 + tl.argmax(m_a, 0), best)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key in the chunks so far
            old = tl.exp(M - safe)
            w = tl.exp(m_k - safe)
            out = out * old + tl.sum(a * w[:, None], 0)
            L_k = L_k * old + tl.sum(l_k * w, 0)
            if SDC == 1:
                l_a = l_a * old + tl.sum(tl.load(st + 3, mask=c_ok, other=0.0) * tl.exp(m_a - safe), 0)
            if SDC == 2:
                dropped += tl.sum(tl.load(st + 4, mask=c_ok, other=0.0), 0)
            M = m_new
        none = L_k == 0  # no score above theta: the row maximum alone is kept (weight exp(M - M) = 1)
        kept = tl.where(none, 1.0, L_k)
        if SDC == 1:
            denom = l_a
        elif SDC == 2:
            theta = _theta_threshold(THETA, h, h < H, tl.load(LOHI + 1) - tl.load(LOHI), n_cols, dense_below,
                                     DENSE_ROW, HAS_DENSE_ROW)
            denom = kept + (dropped - none.to(tl.float32)) * tl.exp(theta - M)
        else:
            denom = kept
        if none:
            j = tl.load(st0 + best * stride_ss + 5).to(tl.int32)  # that chunk's argmax: a key index
            out = tl.load(V + b * stride_vb + (h // REP) * stride_vh + j * stride_vl + offs_d, mask=d_ok,
                          other=0.0).to(tl.float32)
        tl.store(OUT + pid * D + offs_d, (out / denom).to(OUT.dtype.element_ty), mask=d_ok)
        # The next kernel's programs scheduled at the end, as the others do: triggered at the top, with
        # this grid small, decode at 8k context was 0.6% slower (BENCHMARKS.md session 16).
        _launch_next(PDL)

    @triton.jit
    def _merged_state(ACC, STATS, b, heads, h_ok, offs_d, d_ok, n_split, stride_ab, stride_ah, stride_as,
                      stride_sb, stride_sh, stride_ss, REP_P2: tl.constexpr, D_PAD: tl.constexpr,
                      MERGE_BLOCK: tl.constexpr):
        """Dense decode attention's key chunks merged into one state per head of a KV group
        (what one chunk over every key would have written), MERGE_BLOCK chunks per load: one
        (heads, MERGE_BLOCK, D) tile of partial outputs and (heads, MERGE_BLOCK) of m_k and l_k,
        so 33 chunks take 3 round trips to L2 at MERGE_BLOCK 16, not 33. Online over the blocks:
        the running maximum m_k, with l_k and acc rescaled to it. Returns l_k, acc."""
        m_k = tl.full((REP_P2,), float("-inf"), tl.float32)
        l_k = tl.zeros((REP_P2,), tl.float32)
        acc = tl.zeros((REP_P2, D_PAD), tl.float32)
        offs_c = tl.arange(0, MERGE_BLOCK)
        for c0 in range(0, n_split, MERGE_BLOCK):
            c = c0 + offs_c
            ok = h_ok[:, None] & (c < n_split)[None, :]  # (heads, chunks)
            st = STATS + b * stride_sb + heads[:, None] * stride_sh + c[None, :] * stride_ss
            mk_c = tl.load(st, mask=ok, other=float("-inf"), cache_modifier=".cg")
            lk_c = tl.load(st + 1, mask=ok, other=0.0, cache_modifier=".cg")
            acc_c = tl.load(ACC + b * stride_ab + heads[:, None, None] * stride_ah + c[None, :, None] * stride_as
                            + offs_d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                            cache_modifier=".cg")
            mk_new = tl.maximum(m_k, tl.max(mk_c, 1))
            safe = tl.where(mk_new == float("-inf"), 0.0, mk_new)  # no visible key in the chunks so far
            w_old = tl.exp(m_k - safe)
            w_c = tl.exp(mk_c - safe[:, None])
            l_k = l_k * w_old + tl.sum(lk_c * w_c, 1)
            acc = acc * w_old[:, None] + tl.sum(acc_c * w_c[:, :, None], 1)
            m_k = mk_new
        return l_k, acc


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Launch configurations, each the best of a sweep on an H100 (BENCHMARKS.md, `scripts/bench.py --sweep`).
# sparse_gemv(compact=True) from this calibrated sparsity on. With the masked walk's tiles of 256 channels
# (session 24) the kept-channel list cost 0.1-2.5 us more per GEMV at 70% sparsity and saved 0.2-11.7 us at 90%
# on the H100 (`scripts/bench.py --gemv`, BENCHMARKS.md); with tiles of 128 it had saved 0-5 us at 70%.
COMPACT_MIN_SPARSITY = 0.75
GEMV_TUNING = dict(block_k=256, block_n=64, programs_per_sm=4, num_warps=4)  # (input_)sparse_gemv, batch 1
# input_sparse_gemv, batch 2..8 (`scripts/bench.py --batch-sweep`, H100 session 12): one warp per program and a
# 2-stage pipeline, 1416 us summed over the sweep's 36 cases. In another run that day the tuning before (4 warps,
# Triton's default 3 stages: 45 KB of shared memory, 3 programs per SM) took 2409 us, 2 warps / 2 stages 1448 us
GEMV_BATCH_TUNING = dict(block_k=128, block_n=64, programs_per_sm=8, num_warps=1, num_stages=2)
DENSE_TUNING = dict(block_n=8, block_k=512, num_warps=4, num_stages=4)  # gemv
SWIGLU_TUNING = dict(block_n=4, block_k=512, num_warps=8, num_stages=3)  # gemv with two weights
GATED_TUNING = dict(block_n=4, block_k=1024, num_warps=2)  # gated_rows, batch 1-2
# theta_attention; its merge: merge_chunks key chunks' states per load, merge_block_d of the head dim per program
ATTN_TUNING = dict(block_l=32, keys_per_program=64, programs_per_sm=4, num_warps=2, merge_chunks=128,
                   merge_block_d=32, merge_warps=4)
# decode_attention's own (tuning Top-Theta leaves dense attention as it is): key chunks merged in-kernel,
# merge_block per load. H100 session 8: 16 chunks per load and 2 programs per SM took 18.1 us at 8k keys,
# 51.9 at 32k, vs 23.5 / 61.6 one chunk per load at 1 per SM; 2 warps (which spill ~100 B) as fast as 4.
DENSE_ATTN_TUNING = dict(block_l=32, keys_per_program=128, programs_per_sm=2, merge_block=16, num_warps=2)


def gemv_launch_config(B: int, K: int, N: int, block_n: int, device, tuning=None) -> dict:
    """Split K so that about `programs_per_sm` programs per SM are in flight: a fixed choice
    per shape (no per-token tuning). block_n must keep thresholds uniform within a block
    (see block_n_for)."""
    tn = dict(GEMV_TUNING if B == 1 else GEMV_BATCH_TUNING, **(tuning or {}))
    block_k = tn["block_k"]
    n_blocks = triton.cdiv(N, block_n)
    split = max(1, min(triton.cdiv(K, block_k), (tn["programs_per_sm"] * _num_sms(device)) // n_blocks))
    k_per_prog = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_prog)
    return dict(BLOCK_K=block_k, BLOCK_N=block_n, K_PER_PROG=k_per_prog, split=split, num_warps=tn["num_warps"],
                num_stages=tn.get("num_stages", 3))


def sparse_gemv_launch(K: int, n_out: int, block_n: int, device, norm: bool, mode: bool, swiglu: bool, shift: bool,
                       residual: bool, compact: bool, packed: bool, head_d: int = 0, round_x: bool = False,
                       copy_x: bool = False, glu_x: int = 0, add: bool = False, parts: bool = False):
    """How sparse_gemv launches _sparse_gemv_kernel (scripts/kernel_regs.py compiles the same):
    grid (column blocks, K chunks), the chunk length k_per_prog, constexprs + num_warps.
    packed: the weights qualify for one 32-bit load per column pair (packed_pairs).
    head_d: q/k/v with RoPE in the epilogue, heads of head_d (sparse_gemv_rope; 0: none).
    Deferred sums (the kernel's ROUND_X, COPY_X, GLU_X, ADD, PARTS): round_x, copy_x, glu_x (rows of
    gate+up partial sums in x), add (sparse_gemv_add), parts (sparse_gemv_parts): no in-kernel merge."""
    if block_n < 2:
        raise ValueError(f"sparse_gemv: column blocks of {block_n}; the kernel reads columns in pairs, so the "
                         "projection sizes must be even (block_n_for gives a power of two dividing them all)")
    cfg = gemv_launch_config(1, K, n_out, block_n, device)
    split = cfg["split"]
    # packed also needs an even n_out: with SwiGLU the up block starts n_out columns in
    n_blocks = triton.cdiv(n_out, block_n)
    tile = cfg["BLOCK_K"] // 2 if swiglu else cfg["BLOCK_K"]  # two weights' tiles in registers: half as tall each
    # Triton lays a (rows, R, pairs) tile out with 4 pairs (16 bytes) per thread across a row, the rest of a warp's 32
    # threads and the warps down the rows, none along R: THREAD_ROWS = R makes one tile row per row of threads
    thread_rows = min(tile, 32 // max(1, min(32, block_n // 8)) * cfg["num_warps"])
    meta = dict(BLOCK_N=block_n, PACKED=packed and n_out % 2 == 0,
                BOUNDS=n_out % block_n != 0 or K % cfg["K_PER_PROG"] != 0, ROUND_X=round_x, COPY_X=copy_x,
                COPY_PAD=triton.next_power_of_2(triton.cdiv(K, n_blocks * split)) if copy_x else 1,
                GLU_X=glu_x, ADD=add, PARTS=parts,
                BLOCK_K=tile, THREAD_ROWS=tile // thread_rows,
                K_PAD=triton.next_power_of_2(K) if norm else 16, NORM=norm, HAS_MODE=mode, SWIGLU=swiglu,
                HAS_SHIFT=shift, RESIDUAL=residual, MERGE=split > 1 and not (add or parts),
                SPLIT_PAD=triton.next_power_of_2(split),
                COMPACT=compact, CHUNK=triton.next_power_of_2(cfg["K_PER_PROG"]), ROPE=head_d > 0, HEAD_D=head_d,
                num_warps=cfg["num_warps"])
    return (n_blocks, split), cfg["K_PER_PROG"], meta


def packed_pairs(a: Tensor) -> bool:
    """The kernels may load a 2-D tensor's pairs of adjacent elements as one 32-bit word each
    (sparse_gemv's weight columns, gated_rows' x and weight rows): 16-bit values, unit stride
    along a row, rows 4-byte aligned, an even row length."""
    return (a.element_size() == 2 and a.stride(1) == 1 and a.data_ptr() % 4 == 0 and a.stride(0) % 2 == 0
            and a.shape[1] % 2 == 0)


def input_sparse_gemv_launch(B: int, K: int, N: int, block_n: int, device, mode: bool, dot_fp32: bool):
    """How input_sparse_gemv launches _input_sparse_gemv_kernel at batch 2..8 (scripts/kernel_regs.py
    compiles the same): grid (column blocks, K chunks) and constexprs + num_warps / num_stages."""
    cfg = gemv_launch_config(B, K, N, block_n, device)
    split = cfg.pop("split")
    return (triton.cdiv(N, block_n), split), dict(cfg, B_PAD=16, HAS_MODE=mode, DOT_FP32=dot_fp32 or INTERPRET)


def gemv_launch(N: int, swiglu: bool, norm: bool, residual: bool, head_d: int = 0, norm_out: bool = False):
    """How gemv launches _gemv_kernel: grid and constexprs + num_warps (DENSE_ / SWIGLU_TUNING).
    head_d: q/k/v with RoPE in the epilogue, heads of head_d (gemv_rope; 0: none); norm_out: gemv_norm."""
    tn = SWIGLU_TUNING if swiglu else DENSE_TUNING
    return (triton.cdiv(N, tn["block_n"]),), dict(SWIGLU=swiglu, NORM=norm, NORM_OUT=norm_out, RESIDUAL=residual,
                                                  ROPE=head_d > 0, HEAD_D=head_d, BLOCK_N=tn["block_n"],
                                                  BLOCK_K=tn["block_k"], STAGES=tn["num_stages"],
                                                  num_warps=tn["num_warps"])


def rope_fusable(n_cols: int, block_n: int, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
                 v_cache: Tensor, n_heads: int) -> bool:
    """Can a batch-1 q/k/v GEMV with block_n columns per program apply RoPE and write the caches in
    its epilogue (_rope_columns: a block is half first-half columns of one head, half their
    partners)? rope_kv_update's arguments after qkv; n_cols: q/k/v's columns."""
    D = k_cache.shape[3]
    return (n_cols == (n_heads + 2 * k_cache.shape[1]) * D and D % block_n == 0 and block_n % 4 == 0
            and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and k_cache.dtype == v_cache.dtype
            and cos.shape[-1] == D and cos.is_contiguous() and sin.is_contiguous())


def attention_tuning(dense: bool) -> dict:
    """decode_attention's launch tuning (DENSE_ATTN_TUNING) or theta_attention's (ATTN_TUNING)."""
    return DENSE_ATTN_TUNING if dense else ATTN_TUNING


def attention_launch(B: int, H: int, Hkv: int, D: int, n_split: int, dtype, dense: bool, sdc: int):
    """How kernels.attention launches _theta_attention_kernel: grid and constexprs +
    num_warps. Dense: the output from one chunk (NORMALIZE) or merged in-kernel (MERGE)."""
    tn = attention_tuning(dense)
    rep = H // Hkv
    return (B * Hkv, n_split), dict(
        REP=rep, REP_PAD=max(16, triton.next_power_of_2(rep)), D=D, D_PAD=max(16, triton.next_power_of_2(D)),
        BLOCK_L=tn["block_l"], DOT_FP32=dtype == torch.float32 or INTERPRET, DENSE=dense,
        NORMALIZE=dense and n_split == 1, MERGE=dense and n_split > 1, SDC=sdc,
        REP_P2=triton.next_power_of_2(rep), MERGE_BLOCK=tn["merge_block"] if dense else 1, num_warps=tn["num_warps"])


def theta_merge_launch(B: int, H: int, D: int, n_split: int):
    """How kernels.attention launches _theta_merge_kernel: grid (sequence x head, head-dim
    slices) and constexprs + num_warps (ATTN_TUNING's merge_*)."""
    tn = ATTN_TUNING
    block_d = min(tn["merge_block_d"], triton.next_power_of_2(D))
    return (B * H, triton.cdiv(D, block_d)), dict(
        D=D, BLOCK_D=block_d, CHUNKS=min(tn["merge_chunks"], triton.next_power_of_2(n_split)),
        num_warps=tn["merge_warps"])


def block_n_for(segments, cap=None) -> int:
    """Largest power of two <= cap dividing every segment length (q/k/v sizes)."""
    cap = cap or GEMV_TUNING["block_n"]
    g = 0
    for s in segments:
        g = math.gcd(g, int(s))
    b = 1
    while b * 2 <= cap and g % (b * 2) == 0:
        b *= 2
    return b


# ----------------------------------------------------------------------------- custom ops
if triton is not None:
    @torch.library.custom_op("actsparse::input_sparse_gemv_partials", mutates_args=())
    def input_sparse_gemv_partials(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], block_n: int) -> Tensor:
        """x: (B, K) bf16/fp16/fp32; wt: (K, N) with unit column stride; t, m: (N,) fp32, constant
        within each block_n block. Returns (split, B, N) fp32 partial sums over K chunks."""
        B, K = x.shape
        N = wt.shape[1]
        x = x.contiguous()
        cfg = gemv_launch_config(B, K, N, block_n, x.device)
        split = cfg.pop("split")
        y = torch.empty(split, B, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, block_n), split)
        m_ = m if m is not None else t
        if B == 1:  # the fused kernel's masked walk with no prologue or epilogue, the chunks' sums left unmerged
            _, k_per_prog, meta = sparse_gemv_launch(K, N, block_n, x.device, False, m is not None, False, False,
                                                     False, False, packed_pairs(wt))
            unused = dict(G=x, SHIFT=t, R=y, P=y, COUNT=y, S=y, XC=y, COS=y, SIN=y, POS=y, KC=y, VC=y, q_cols=0,
                          stride_ch=0, stride_cl=0)  # no norm, shift, residual, merge, list or RoPE
            _sparse_gemv_kernel[grid](X=x, WT=wt, T=t, M=m_, Y=y, K=K, N_OUT=N, col2=N, k_per_prog=k_per_prog,
                                      split=split, stride_wk=wt.stride(0), stride_p=y.stride(0), eps=0.0, **unused,
                                      **dict(meta, MERGE=False), **pdl_args(x))
        else:
            _, meta = input_sparse_gemv_launch(B, K, N, block_n, x.device, m is not None, wt.dtype == torch.float32)
            _input_sparse_gemv_kernel[grid](x, wt, t, m_, y, B, K, N, x.stride(0), wt.stride(0), y.stride(0),
                                            y.stride(1), **meta, **pdl_args(x))
        return y

    @input_sparse_gemv_partials.register_fake
    def _(x, wt, t, m, block_n):
        cfg = gemv_launch_config(x.shape[0], x.shape[1], wt.shape[1], block_n, x.device)
        return x.new_empty(cfg["split"], x.shape[0], wt.shape[1], dtype=torch.float32)

    def _rope_launch(x: Tensor, rope: Optional[tuple]):
        """For the GEMV launches with RoPE in the epilogue (rope: rope_kv_update's arguments after
        qkv): the RoPE(q) output (1, H, D) or None, the kernels' RoPE arguments (COS, SIN, POS, KC,
        VC, q_cols, stride_ch, stride_cl; placeholders without rope), and head_d (0: no RoPE)."""
        if rope is None:
            return None, (x, x, x, x, x, 0, 0, 0), 0
        cos, sin, pos, kc, vc, n_heads = rope
        D = kc.shape[3]
        q = torch.empty(1, n_heads, D, dtype=kc.dtype, device=x.device)
        return q, (cos, sin, pos, kc, vc, n_heads * D, kc.stride(1), kc.stride(2)), D

    def _launch_sparse_gemv(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor],
                            block_n: int, counters: Optional[Tensor], g: Optional[Tensor], eps: float,
                            r: Optional[Tensor], swiglu: bool, compact: bool, rope: Optional[tuple] = None,
                            x_copy: Optional[Tensor] = None, acc: Optional[Tensor] = None, glu: bool = False,
                            parts: bool = False) -> Tensor:
        """sparse_gemv and sparse_gemv_rope (rope: rope_kv_update's arguments after qkv), sparse_gemv_add (acc)."""
        K = x.shape[1] // 2 if glu else x.shape[1]
        N = wt.shape[1]
        n_out = N // 2 if swiglu else N
        assert (glu or x.shape[0] == 1) and wt.stride(1) == 1 and not (swiglu and r is not None)
        assert x_copy is None or (g is not None and x_copy.dtype == torch.float32 and x_copy.numel() == K)
        x = x.contiguous()
        q, rope_args, head_d = _rope_launch(x, rope)
        grid, k_per_prog, meta = sparse_gemv_launch(
            K, n_out, block_n, x.device, g is not None, m is not None, swiglu, shift is not None, r is not None,
            compact, packed_pairs(wt), head_d, round_x=g is not None and x.dtype == torch.float32,
            copy_x=x_copy is not None, glu_x=x.shape[0] if glu else 0, add=acc is not None, parts=parts)
        n_blocks, split = grid
        if meta["MERGE"] and counters.numel() < n_blocks:
            raise ValueError(f"sparse_gemv: {counters.numel()} counters for {n_blocks} column blocks; pass the "
                             "decode step's window tensor's tail (sparsity.visible_window) sized for the model")
        if acc is not None:
            y = acc
        elif parts:
            y = torch.empty(split, N, dtype=torch.float32, device=x.device)
        else:  # with RoPE: q out, k and v into the caches
            dtype = r.dtype if r is not None else wt.dtype if meta["ROUND_X"] else x.dtype
            y = q if q is not None else torch.empty(1, n_out, dtype=dtype, device=x.device)
        p = torch.empty(split if meta["MERGE"] else 0, N, dtype=torch.float32, device=x.device)
        s = torch.empty(n_blocks * split * meta["CHUNK"] if compact else 0, dtype=torch.int32, device=x.device)
        _sparse_gemv_kernel[grid](
            x, g if g is not None else x, wt, t, m if m is not None else t, shift if shift is not None else t,
            r.contiguous() if r is not None else y, p, counters if counters is not None else s, s, y,
            x_copy if x_copy is not None else y, K, n_out, n_out, k_per_prog, split, wt.stride(0),
            N, float(eps), *rope_args, **pdl_args(x), **meta)
        return y

    @torch.library.custom_op("actsparse::sparse_gemv", mutates_args=())
    def sparse_gemv(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor], block_n: int,
                    counters: Tensor, g: Optional[Tensor] = None, eps: float = 0.0, r: Optional[Tensor] = None,
                    swiglu: bool = False, compact: bool = False) -> Tensor:
        """See sparse_gemv_ref (same arguments; x: (1, K), t, m, shift: (N,) fp32 with t and m
        constant within each block_n block; r: (1, N_out)), one launch. counters: int32 zeros,
        at least one per block_n block of output columns, left at zero (the window tensor's tail,
        sparsity.visible_window). Returns (1, N_out), N_out = N (N / 2 with swiglu), in r's dtype
        with a residual, else x's. compact: each program first lists its chunk's kept channels,
        then walks only those (faster from about 60% sparsity on, slower below: COMPACT_MIN_SPARSITY).
        x may be fp32 with g (deferred sums: the residual stream that sparse_gemv_add left), rounded to wt's
        dtype first; the result is then in wt's dtype."""
        return _launch_sparse_gemv(x, wt, t, m, shift, block_n, counters, g, eps, r, swiglu, compact)

    @sparse_gemv.register_fake
    def _(x, wt, t, m, shift, block_n, counters, g=None, eps=0.0, r=None, swiglu=False, compact=False):
        dtype = r.dtype if r is not None else wt.dtype if x.dtype == torch.float32 and g is not None else x.dtype
        return x.new_empty(1, wt.shape[1] // 2 if swiglu else wt.shape[1], dtype=dtype)

    @torch.library.custom_op("actsparse::sparse_gemv_parts", mutates_args=("x_copy",))
    def sparse_gemv_parts(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor],
                          block_n: int, g: Tensor, eps: float, compact: bool, x_copy: Tensor) -> Tensor:
        """Deferred sums (sparse_gemv_add), the merged [gate; up] projection (wt: (K, 2F)) of RMSNorm(x) * g:
        returns its K chunks' partial sums unmerged, (split, 2F) fp32, gate columns then up columns, shift added
        in row 0 (sparse_gemv_add's glu forms SiLU(g) * u from them). x: (1, K), may be fp32 (rounded to wt's
        dtype first, as in sparse_gemv); x_copy: (1, K) fp32, gets that (rounded) x."""
        return _launch_sparse_gemv(x, wt, t, m, shift, block_n, None, g, eps, None, True, compact, None, x_copy,
                                   parts=True)

    @sparse_gemv_parts.register_fake
    def _(x, wt, t, m, shift, block_n, g, eps, compact, x_copy):
        split = gemv_launch_config(1, x.shape[1], wt.shape[1] // 2, block_n, x.device)["split"]
        return x.new_empty(split, wt.shape[1], dtype=torch.float32)

    @torch.library.custom_op("actsparse::sparse_gemv_add", mutates_args=("acc",))
    def sparse_gemv_add(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor],
                        block_n: int, acc: Tensor, compact: bool = False, glu: bool = False) -> None:
        """Deferred sums: acc += sparse_gemv_ref(x', wt, t, m, shift) where x' = x, or with glu
        x' = SiLU(sum of x[:, :K]) * sum of x[:, K:] rounded to wt's dtype (x: sparse_gemv's parts of
        gate+up, (split, 2K)). acc: (1, N) fp32, the residual stream as the q/k/v or gate+up kernel copied it.
        Each program adds its K chunk's partial sums into acc with fp32 atomics and is done: no program
        waits for the others to merge them (1.2-1.8 us less per launch on an H100, BENCHMARKS.md
        session 20). The atomics' order varies, so acc may differ from run to run in its last bits."""
        _launch_sparse_gemv(x, wt, t, m, shift, block_n, None, None, 0.0, None, False, compact, None, None, acc,
                            glu)

    @sparse_gemv_add.register_fake
    def _(x, wt, t, m, shift, block_n, acc, compact=False, glu=False):
        return None

    @torch.library.custom_op("actsparse::sparse_gemv_rope", mutates_args=("k_cache", "v_cache", "x_copy"))
    def sparse_gemv_rope(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor],
                         block_n: int, counters: Tensor, g: Optional[Tensor], eps: float, compact: bool, cos: Tensor,
                         sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int,
                         x_copy: Optional[Tensor]) -> Tensor:
        """The q/k/v projection sparse_gemv(x, wt, ...) followed by rope_kv_update(qkv, cos, sin, pos,
        k_cache, v_cache, n_heads), in one launch (the rotation in the epilogue, on the fp32 sums;
        rope_fusable must hold). Returns RoPE(q) (1, H, D). x may be fp32 (as in sparse_gemv); x_copy
        (deferred sums, sparse_gemv_add; None: none): (1, K) fp32, gets x as normalised (rounded). No default:
        torch 2.11's custom ops drop a mutated argument left at its default (pytorch issue 176078)."""
        return _launch_sparse_gemv(x, wt, t, m, shift, block_n, counters, g, eps, None, False, compact,
                                   (cos, sin, pos, k_cache, v_cache, n_heads), x_copy)

    @sparse_gemv_rope.register_fake
    def _(x, wt, t, m, shift, block_n, counters, g, eps, compact, cos, sin, pos, k_cache, v_cache, n_heads, x_copy):
        return x.new_empty(1, n_heads, k_cache.shape[3], dtype=k_cache.dtype)

    def _launch_gemv(x: Tensor, w1: Tensor, w2: Optional[Tensor], g: Optional[Tensor], eps: float,
                     r: Optional[Tensor], rope: Optional[tuple] = None, xn: Optional[Tensor] = None) -> Tensor:
        """gemv, gemv_rope (rope: rope_kv_update's arguments after qkv) and gemv_norm (xn: x's normalised copy)."""
        K = x.shape[1]
        N = w1.shape[0]
        x = x.contiguous()
        q, rope_args, head_d = _rope_launch(x, rope)
        y = q if q is not None else torch.empty(1, N, dtype=x.dtype, device=x.device)  # RoPE: k, v into the caches
        w2_ = w2 if w2 is not None else w1
        grid, meta = gemv_launch(N, w2 is not None, g is not None, r is not None, head_d, xn is not None)
        _gemv_kernel[grid](
            x, w1, w2_, g if g is not None else x, r.contiguous() if r is not None else y, y,
            xn if xn is not None else x, K, N, w1.stride(0), w2_.stride(0), float(eps), *rope_args, **pdl_args(x),
            **meta)
        return y

    @torch.library.custom_op("actsparse::gemv", mutates_args=())
    def gemv(x: Tensor, w1: Tensor, w2: Optional[Tensor], g: Optional[Tensor] = None, eps: float = 0.0,
             r: Optional[Tensor] = None) -> Tensor:
        """x: (1, K); w1, w2: (N, K) with unit stride along K; g: (K,) RMSNorm weight; r: (1, N).
        Returns [r +] x' W1^T, or with w2 [r +] SiLU(x' W1^T) * (x' W2^T), where x' = RMSNorm(x) * g
        (eps inside the root) with g, else x; (1, N) in x's dtype (fp32 accumulation)."""
        return _launch_gemv(x, w1, w2, g, eps, r)

    @gemv.register_fake
    def _(x, w1, w2, g=None, eps=0.0, r=None):
        return x.new_empty(1, w1.shape[0])

    @torch.library.custom_op("actsparse::gemv_norm", mutates_args=())
    def gemv_norm(x: Tensor, w: Tensor, g: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """gemv(x, w, None, g, eps) and x' = RMSNorm(x) * g in x's dtype, (1, N) and (1, K), in one launch: the
        programs write x' once their sums are in (for the kernel after it: the neuron methods' gated_rows)."""
        xn = torch.empty_like(x)
        return _launch_gemv(x, w, None, g, eps, None, xn=xn), xn

    @gemv_norm.register_fake
    def _(x, w, g, eps):
        return x.new_empty(1, w.shape[0]), torch.empty_like(x)

    @torch.library.custom_op("actsparse::gemv_rope", mutates_args=("k_cache", "v_cache"))
    def gemv_rope(x: Tensor, w: Tensor, g: Optional[Tensor], eps: float, cos: Tensor, sin: Tensor, pos: Tensor,
                  k_cache: Tensor, v_cache: Tensor, n_heads: int) -> Tensor:
        """The q/k/v projection gemv(x, w, None, g, eps) followed by rope_kv_update(qkv, cos, sin, pos,
        k_cache, v_cache, n_heads), in one launch (the rotation in the epilogue, on the fp32 sums;
        rope_fusable must hold). Returns RoPE(q) (1, H, D)."""
        return _launch_gemv(x, w, None, g, eps, None, (cos, sin, pos, k_cache, v_cache, n_heads))

    @gemv_rope.register_fake
    def _(x, w, g, eps, cos, sin, pos, k_cache, v_cache, n_heads):
        return x.new_empty(1, n_heads, k_cache.shape[3], dtype=k_cache.dtype)

    @torch.library.custom_op("actsparse::gated_rows", mutates_args=())
    def gated_rows(x: Tensor, w1: Tensor, w2: Optional[Tensor], p: Tensor, t: float, mode: int) -> Tensor:
        """x: (B, K); w1, w2: (N, K) row-major; p: (B, N). Returns s (B, N) fp32."""
        B, K = x.shape
        N = w1.shape[0]
        x, p = x.contiguous(), p.contiguous()
        y = torch.empty(B, N, dtype=torch.float32, device=x.device)
        b_pad = triton.next_power_of_2(B)
        tn = GATED_TUNING
        block_n = tn["block_n"] if b_pad <= 2 else 8
        block_k = tn["block_k"] if b_pad <= 2 else 128 // (b_pad // 2)
        w2_ = w2 if w2 is not None else w1
        packed = B == 1 and x.dtype == w1.dtype == w2_.dtype and all(packed_pairs(a) for a in (x, w1, w2_))
        _gated_rows_kernel[(triton.cdiv(N, block_n),)](
            x, w1, w2_, p, y, B, K, N, float(t), x.stride(0), w1.stride(0), w2_.stride(0), p.stride(0),
            y.stride(0), MODE=mode, B_PAD=b_pad, BLOCK_N=block_n, BLOCK_K=block_k, PACKED=packed, **pdl_args(x),
            num_warps=tn["num_warps"])
        return y

    @gated_rows.register_fake
    def _(x, w1, w2, p, t, mode):
        return x.new_empty(x.shape[0], w1.shape[0], dtype=torch.float32)


def input_sparse_gemv(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor],
                      block_n: int) -> Tensor:
    """y = W ((x - m) * 1[|x - m| > t]) + shift. x: (B, K); wt = W^T (K, N); t, m, shift: (N,)
    fp32 (t, m constant within each block_n block). Returns (B, N) fp32. The sum over the
    K-chunk partials is plain PyTorch so that torch.compile fuses it into the next op."""
    y = input_sparse_gemv_partials(x, wt, t, m, block_n).sum(0)
    return y if shift is None else y + shift


def _gemv_ok(x: Tensor, *weights: Tensor) -> bool:
    """One token of one sequence, on GPU, row-major weights: the dense gemv kernel applies."""
    return enabled(x) and x.numel() == x.shape[-1] and all(w.stride(-1) == 1 for w in weights)


def norm_args(norm):
    """gemv's (g, eps) for an RMSNorm module, or none."""
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


def with_rope(qkv: Tensor, rope: Optional[tuple]) -> Tensor:
    """A decode step's q/k/v projection (B, 1, n_cols) as it leaves the projection: with rope
    (rope_kv_update's arguments after qkv), RoPE(q) (B, H, D), k and v written into the caches."""
    return qkv if rope is None else rope_kv_update(qkv.reshape(qkv.shape[0], -1), *rope)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, norm=None,
           residual: Optional[Tensor] = None, rope: Optional[tuple] = None) -> Tensor:
    """[residual +] F.linear(norm(x), weight, bias) (norm: an RMSNorm module with .weight, .eps,
    or None). A batch-1 decode step on GPU runs it all in the gemv kernel: the norm in its
    prologue, the residual add in its epilogue (no kernels of their own). rope (the q/k/v
    projection of a GPU decode step: the cos, sin tables, pos, k_cache, v_cache, n_heads): returns
    RoPE(q) (B, H, D) and writes RoPE(k), v into the caches; at batch 1, in the gemv's epilogue."""
    if (rope is not None and bias is None and _gemv_ok(x, weight)
            and rope_fusable(weight.shape[0], DENSE_TUNING["block_n"], *rope)):
        return gemv_rope(x.reshape(1, -1), weight, *norm_args(norm), *rope)
    return with_rope(_linear(x, weight, bias, norm, residual), rope)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm, residual: Optional[Tensor]) -> Tensor:
    """linear without rope: the gemv kernel for one token, F.linear otherwise."""
    if _gemv_ok(x, weight) and (residual is None or residual.numel() == weight.shape[0]):
        y = gemv(x.reshape(1, -1), weight, None, *norm_args(norm),
                 residual.reshape(1, -1) if residual is not None else None)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    y = torch.nn.functional.linear(norm(x) if norm is not None else x, weight, bias)
    return y if residual is None else residual + y


def linear_norm(x: Tensor, weight: Tensor, norm) -> tuple:
    """(F.linear(x', weight), x'), x' = norm(x) (or x). A batch-1 decode step on GPU runs one gemv kernel
    (gemv_norm), which also writes x' for the kernel after it (the neuron methods' gated_rows)."""
    if norm is not None and _gemv_ok(x, weight):
        y, xn = gemv_norm(x.reshape(1, -1), weight, norm.weight, norm.eps)
        return y.view(*x.shape[:-1], weight.shape[0]), xn.view(x.shape)
    x = norm(x) if norm is not None else x
    return _linear(x, weight, None, None, None), x


def swiglu(x: Tensor, gate: torch.nn.Linear, up: torch.nn.Linear, norm=None) -> Tensor:
    """SiLU(gate(x')) * up(x'), x' = norm(x) (or x); a batch-1 decode step on GPU reads both
    weights in one kernel, the norm in its prologue (otherwise the modules are called, so
    forward hooks - calibration's - see them)."""
    if _gemv_ok(x, gate.weight, up.weight) and gate.bias is None and up.bias is None:
        return gemv(x.reshape(1, -1), gate.weight, up.weight, *norm_args(norm)).view(*x.shape[:-1],
                                                                                     gate.weight.shape[0])
    x = norm(x) if norm is not None else x
    return torch.nn.functional.silu(gate(x)) * up(x)


def attention_splits(B: int, Hkv: int, L: int, device, dense: bool = False) -> int:
    """Key chunks per (sequence, KV head), fixed per cache size L: at least `keys_per_program`
    cache positions per chunk (a short cache: one chunk, no merge), at most enough chunks to
    give each SM `programs_per_sm` programs (DENSE_ATTN_TUNING's for decode_attention)."""
    tn = attention_tuning(dense)
    return max(1, min(triton.cdiv(L, tn["keys_per_program"]), (tn["programs_per_sm"] * _num_sms(device)) // (B * Hkv)))


if triton is not None:
    @torch.library.custom_op("actsparse::rope_kv_update", mutates_args=("k_cache", "v_cache"))
    def rope_kv_update(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                       n_heads: int) -> Tensor:
        """See rope_kv_update_ref (same arguments, same effect); one launch."""
        B = qkv.shape[0]
        Hkv, D = k_cache.shape[1], k_cache.shape[3]
        assert D % 2 == 0 and qkv.shape[1] == (n_heads + 2 * Hkv) * D and qkv.stride(1) == 1 and cos.shape[-1] == D
        assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
        q = torch.empty(B, n_heads, D, dtype=k_cache.dtype, device=qkv.device)
        _rope_kv_kernel[(B, n_heads + 2 * Hkv)](
            qkv, cos.contiguous(), sin.contiguous(), pos, q, k_cache, v_cache, n_heads, Hkv, qkv.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), HALF=D // 2, HALF_PAD=triton.next_power_of_2(D // 2),
            num_warps=1, **pdl_args(qkv))
        return q

    @rope_kv_update.register_fake
    def _(qkv, cos, sin, pos, k_cache, v_cache, n_heads):
        return qkv.new_empty(qkv.shape[0], n_heads, k_cache.shape[3], dtype=k_cache.dtype)

    @torch.library.custom_op("actsparse::attention", mutates_args=())
    def attention(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], lohi: Tensor, n_split: int, sdc: int,
                  dense_below: int, dense_row: Optional[Tensor]) -> Tensor:
        """Decode attention, (B, H, D) in q's dtype. q: (B, H, D); k, v: (B, Hkv, L, D) with unit
        stride in D; lohi: int32, visible keys lo <= j < hi, then (dense, several chunks) B * Hkv
        zeroed counters (sparsity.visible_window). theta None: dense, the key chunks merged by
        the kernel's last program per (sequence, KV head), DENSE_ATTN_TUNING["merge_block"]
        chunks per load. Else Top-Theta: theta (H, n_cols) fp32 per head and visible-key count
        (_theta_threshold; dense_below, dense_row: rows kept dense), the chunks' states acc
        (B, H, splits, D) and stats (B, H, splits, 6) - per chunk m_k, l_k, m_a, l_a (sdc 1), dropped
        count (sdc 2), argmax - merged by _theta_merge_kernel, a second launch."""
        B, H, D = q.shape
        Hkv = k.shape[1]
        dense = theta is None
        if dense and DENSE_ATTN_TUNING["merge_block"] < 1:
            raise ValueError("decode_attention: DENSE_ATTN_TUNING['merge_block'] must be >= 1 (chunks merged per load)")
        merge = dense and n_split > 1
        if merge and lohi.numel() < 2 + B * Hkv:
            raise ValueError(f"decode_attention: lohi has {lohi.numel()} entries; merging key chunks needs lo, hi "
                             f"and {B * Hkv} zeroed counters after them (sparsity.visible_window(mask, B * Hkv))")
        assert dense or (theta.dtype == torch.float32 and theta.dim() == 2 and theta.shape[0] == H
                         and theta.is_contiguous()), "theta: (H, n_cols) fp32, contiguous"
        out = q.new_empty(B, H, D)
        rows = B if n_split > 1 or not dense else 0  # the chunks' states (one dense chunk: none)
        acc = torch.empty(rows, H, n_split, D, dtype=torch.float32, device=q.device)
        stats = torch.empty(rows, H, n_split, 6, dtype=torch.float32, device=q.device)
        n_cols = 1 if dense else theta.shape[1]
        flags = lohi if dense_row is None else dense_row
        pdl = pdl_args(q)
        grid, meta = attention_launch(B, H, Hkv, D, n_split, q.dtype, dense, sdc)
        _theta_attention_kernel[grid](
            q, k, v, lohi if dense else theta, lohi, flags, acc, stats, lohi[2:] if merge else lohi, out,
            B, Hkv, n_split, 1.0 / math.sqrt(D), n_cols, dense_below,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            acc.stride(0), acc.stride(1), acc.stride(2), stats.stride(0), stats.stride(1), stats.stride(2),
            HAS_DENSE_ROW=dense_row is not None, **pdl, **meta)
        if not dense:
            grid, meta = theta_merge_launch(B, H, D, n_split)
            _theta_merge_kernel[grid](
                acc, stats, theta, lohi, flags, v, out, H, H // Hkv, n_split, n_cols, dense_below,
                acc.stride(0), acc.stride(1), acc.stride(2), stats.stride(0), stats.stride(1), stats.stride(2),
                v.stride(0), v.stride(1), v.stride(2), SDC=sdc, HAS_DENSE_ROW=dense_row is not None,
                **pdl, **meta)
        return out

    @attention.register_fake
    def _(q, k, v, theta, lohi, n_split, sdc, dense_below, dense_row):
        return torch.empty_like(q)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lohi: Tensor) -> Tensor:
    """Dense decode attention over the visible keys lo <= j < hi of a static cache, split over
    the keys (flash-decoding); a short cache is one chunk whose output needs no merge, longer
    ones are merged by the program that finishes last (lohi: lo, hi, then B * Hkv zeroed
    counters, see sparsity.visible_window). q: (B, H, D); k, v: (B, Hkv, L, D).
    Returns (B, H, D) in q's dtype."""
    n_split = attention_splits(q.shape[0], k.shape[1], k.shape[2], q.device, dense=True)
    return attention(q, k, v, None, lohi, n_split, 0, 0, None)


def theta_attention(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, lohi: Tensor, sdc: int, dense_below: int = 0,
                    dense_row: Optional[Tensor] = None) -> Tensor:
    """Top-Theta decode attention, same contract as theta_attention_ref (lo/hi as a tensor),
    returned in q's dtype. theta: (H,), or (H, N) per visible-key count n = 1..N (the column
    for the step's hi - lo picked in the kernels, the last beyond N); a row seeing at most
    dense_below keys, or with dense_row (one bool) set, keeps every score. Two launches: the
    key chunks' states, then their merge (_theta_merge_kernel)."""
    n_split = attention_splits(q.shape[0], k.shape[1], k.shape[2], q.device)
    table = theta.float().reshape(theta.shape[0], -1).contiguous()
    return attention(q, k, v, table, lohi, n_split, sdc, dense_below, dense_row)


# ----------------------------------------------------------------------------- layout
def make_input_major_merged(linears) -> Tensor:
    """Input-major storage shared by several projections of one input (gate and up): one
    (K, sum N) buffer, each linear's weight a view of its columns. Returns the (sum N, K)
    view whose .t() input_sparse_gemv reads in one launch."""
    wt = torch.cat([lin.weight.detach().t() for lin in linears], dim=1).contiguous()
    off = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(wt[:, off:off + n].t(), requires_grad=False)
        off += n
    return wt.t()


def make_output_major(linear: torch.nn.Linear):
    """Back to nn.Linear's own (out, in) row-major storage (what the dense gemv kernel and
    gated_rows read), e.g. when a config without a sparse site here replaces one with it."""
    if not linear.weight.is_contiguous():
        linear.weight = torch.nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)


def make_input_major(linear: torch.nn.Linear):
    """Store W as (W^T contiguous)^T: the same (out, in) parameter for every dense use
    (cuBLAS takes the transposed layout), while W.t() is the contiguous (in, out) matrix
    input_sparse_gemv reads. No second copy of the weights."""
    w = linear.weight
    if not w.t().is_contiguous():
        linear.weight = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
