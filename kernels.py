"""Triton kernels that turn skipped activations into skipped weight reads (decode).

Each kernel sits beside a plain-PyTorch reference of the same function (the
`*_ref` functions): the reference is what tests compare against and what runs
on CPU. Kernels are registered with torch.library.custom_op (+ fake
implementation), so `torch.compile(fullgraph=True, mode="reduce-overhead")`
captures them in the CUDA graph with no graph break.

1. input_sparse_gemv: y = W ((x - m) * 1[|x - m| > t]) (+ W m), TEAL / SCAP / the down
   projection of CATS and COUNTDOWN. W is stored input-major (wt = W^T, (K, N)
   contiguous), so the weights of one input channel are one contiguous row and a
   skipped channel costs no memory traffic (a predicated-off load). Thresholds and
   modes are per output column (N,), constant within each BLOCK_N block, so one launch
   serves fused q/k/v with three thresholds. Split-K partial sums go through fp32
   atomics into an fp32 output (no fp16/bf16 atomics, so bf16 and fp16 both work).
   Batch 1..8: a weight row is read if any row of the batch needs it.

2. gated_rows: output-sparse GEMV over the rows n of W (output-major, nn.Linear's own
   layout) that a per-row criterion keeps, fused with the MLP's elementwise step:
     mode 0 CATS:         p = g,      keep |SiLU(p)| > t,  s = SiLU(p) * (W1 x)
     mode 1 M-COUNTDOWN:  p = u,      keep |p| > t,        s = SiLU(W1 x) * p
     mode 2 D-COUNTDOWN:  p = logits, keep p > 0,          s = SiLU(W1 x) * (W2 x)
     mode 3 plain:        p = any,    keep p > 0,          s = W1 x
   Dropped rows are never read and give s = 0, which the down projection's
   input_sparse_gemv (t = 0) then skips.

Set ACTSPARSE_KERNELS=0 to force the PyTorch reference path on GPU (A/B runs).
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


def enabled(x: Tensor) -> bool:
    """Use the Triton kernels for this activation? On CUDA unless ACTSPARSE_KERNELS=0;
    ACTSPARSE_KERNELS=force also on CPU (tests, through the Triton interpreter)."""
    flag = os.environ.get("ACTSPARSE_KERNELS", "1")
    return triton is not None and flag != "0" and (x.is_cuda or flag == "force")


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


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:
    @triton.jit
    def _input_sparse_gemv_kernel(X, WT, T, M, Y, B, K, N, stride_xb, stride_wk, stride_yb,
                                  K_PER_PROG: tl.constexpr, B_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_N: tl.constexpr, HAS_MODE: tl.constexpr, USE_ATOMIC: tl.constexpr,
                                  DOT_FP32: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_b = tl.arange(0, B_PAD)
        b_ok = offs_b < B
        # One threshold (and mode) per BLOCK_N block: the host guarantees blocks never
        # straddle two projections, so the row mask is uniform along n and loads vectorise.
        t = tl.load(T + pid_n * BLOCK_N)
        if HAS_MODE:
            m = tl.load(M + pid_n * BLOCK_N)
        acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
        k0 = pid_k * K_PER_PROG
        for kk in range(0, K_PER_PROG, BLOCK_K):
            offs_k = k0 + kk + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :],
                        mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (B_PAD, BLOCK_K)
            if HAS_MODE:
                x = x - m
            keep = (tl.abs(x) > t) & b_ok[:, None] & k_ok[None, :]
            xs = tl.where(keep, x, 0.0)
            need = tl.max(keep.to(tl.int32), axis=0) > 0  # (BLOCK_K,): any row of the batch
            w = tl.load(WT + offs_k[:, None] * stride_wk + offs_n[None, :],
                        mask=need[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if B_PAD == 1:
                acc += tl.sum(tl.reshape(xs, (BLOCK_K,))[:, None] * w.to(tl.float32), axis=0)[None, :]
            elif DOT_FP32:  # several rows: tl.dot on 16 rows (padding rows are zero); fp32 weights
                acc += tl.dot(xs, w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xs.to(w.dtype), w)
        ptrs = Y + offs_b[:, None] * stride_yb + offs_n[None, :]
        out_mask = b_ok[:, None] & n_ok[None, :]
        if USE_ATOMIC:  # relaxed: partial sums need no ordering, only atomicity
            tl.atomic_add(ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            acc += tl.load(ptrs, mask=out_mask, other=0.0)
            tl.store(ptrs, acc, mask=out_mask)

    @triton.jit
    def _gated_rows_kernel(X, W1, W2, P, Y, B, K, N, t, stride_xb, stride_w1, stride_w2, stride_pb, stride_yb,
                           MODE: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc1 = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
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


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


GEMV_TUNING = dict(block_k=512, block_n=64, programs_per_sm=8, num_warps=4)  # sweep: BENCHMARKS.md


def gemv_launch_config(B: int, K: int, N: int, block_n: int, device, tuning=None) -> dict:
    """Split K so that about `programs_per_sm` programs per SM are in flight: a fixed choice
    per shape (no per-token tuning). block_n must keep thresholds uniform within a block
    (see block_n_for)."""
    tn = dict(GEMV_TUNING, **(tuning or {}))
    b_pad = 1 if B == 1 else 16  # batch > 1: tl.dot on 16 rows (tensor cores)
    block_k = tn["block_k"] if B == 1 else min(tn["block_k"], 128)
    n_blocks = triton.cdiv(N, block_n)
    split = max(1, min(triton.cdiv(K, block_k), (tn["programs_per_sm"] * _num_sms(device)) // n_blocks))
    k_per_prog = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_prog)
    return dict(B_PAD=b_pad, BLOCK_K=block_k, BLOCK_N=block_n, K_PER_PROG=k_per_prog, split=split,
                num_warps=tn["num_warps"])


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
    @torch.library.custom_op("actsparse::input_sparse_gemv", mutates_args=())
    def input_sparse_gemv(x: Tensor, wt: Tensor, t: Tensor, m: Optional[Tensor], shift: Optional[Tensor],
                          block_n: int) -> Tensor:
        """x: (B, K) bf16/fp16/fp32; wt: (K, N) contiguous; t, m, shift: (N,) fp32, t and m
        constant within each block_n block. Returns (B, N) fp32."""
        B, K = x.shape
        N = wt.shape[1]
        x = x.contiguous()
        cfg = gemv_launch_config(B, K, N, block_n, x.device)
        split = cfg.pop("split")
        if shift is not None:
            y = shift.float().repeat(B, 1)
        else:
            y = torch.zeros(B, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, block_n), split)
        _input_sparse_gemv_kernel[grid](x, wt, t, m if m is not None else t, y, B, K, N, x.stride(0),
                                        wt.stride(0), y.stride(0), HAS_MODE=m is not None,
                                        USE_ATOMIC=split > 1,
                                        DOT_FP32=wt.dtype == torch.float32 or INTERPRET, **cfg)
        return y

    @input_sparse_gemv.register_fake
    def _(x, wt, t, m, shift, block_n):
        return x.new_empty(x.shape[0], wt.shape[1], dtype=torch.float32)

    @torch.library.custom_op("actsparse::gated_rows", mutates_args=())
    def gated_rows(x: Tensor, w1: Tensor, w2: Optional[Tensor], p: Tensor, t: float, mode: int) -> Tensor:
        """x: (B, K); w1, w2: (N, K) row-major; p: (B, N). Returns s (B, N) fp32."""
        B, K = x.shape
        N = w1.shape[0]
        x, p = x.contiguous(), p.contiguous()
        y = torch.empty(B, N, dtype=torch.float32, device=x.device)
        b_pad = triton.next_power_of_2(B)
        block_n = 16 if b_pad <= 2 else 8
        block_k = 256 if b_pad <= 2 else 128 // (b_pad // 2)
        w2_ = w2 if w2 is not None else w1
        _gated_rows_kernel[(triton.cdiv(N, block_n),)](
            x, w1, w2_, p, y, B, K, N, float(t), x.stride(0), w1.stride(0), w2_.stride(0), p.stride(0),
            y.stride(0), MODE=mode, B_PAD=b_pad, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        return y

    @gated_rows.register_fake
    def _(x, w1, w2, p, t, mode):
        return x.new_empty(x.shape[0], w1.shape[0], dtype=torch.float32)


# ----------------------------------------------------------------------------- layout
def make_input_major(linear: torch.nn.Linear):
    """Store W as (W^T contiguous)^T: the same (out, in) parameter for every dense use
    (cuBLAS takes the transposed layout), while W.t() is the contiguous (in, out) matrix
    input_sparse_gemv reads. No second copy of the weights."""
    w = linear.weight
    if not w.t().is_contiguous():
        linear.weight = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
