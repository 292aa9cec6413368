"""One call of each decode GEMV (Llama-3-8B shapes, bf16, batch 1), for Nsight Compute's hardware
counters: the sparse sites as the model runs them (masked walk at 50%, kept-channel list at 90%) and
the dense gemv kernel. Needs a CUDA GPU and `ncu`:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats python scripts/ncu_gemv.py

Each case is compiled and warmed up before the profiled range (cudaProfilerStart/Stop), then
launched once inside it, so ncu reports one kernel per case, in the order printed. ncu runs each
kernel alone, with caches flushed between its replay passes: durations are longer than in a decode
step, where the next kernel's launch overlaps this one's tail (PDL) and x comes from L2.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402

BF16 = torch.bfloat16


def sparse_case(K, N, s, swiglu=False, norm=False, residual=False, compact=False):
    """kernels.sparse_gemv on random weights, the threshold at the s-quantile of |x|."""
    wt = torch.randn(K, N, device="cuda", dtype=BF16) * 0.02
    x = torch.randn(1, K, device="cuda", dtype=BF16)
    a = x.float().abs().flatten().sort().values
    t = torch.full((N,), float(a[int(s * (a.numel() - 1))]) if s > 0 else -1.0, device="cuda")
    n_out = N // 2 if swiglu else N
    counters = torch.zeros(N, dtype=torch.int32, device="cuda")
    g = torch.ones(K, device="cuda", dtype=BF16) if norm else None
    r = torch.randn(1, n_out, device="cuda", dtype=BF16) if residual else None
    return lambda: kernels.sparse_gemv(x, wt, t, None, None, kernels.block_n_for([n_out]), counters, g, 1e-5, r,
                                       swiglu=swiglu, compact=compact)


def dense_case(K, N, swiglu=False):
    """kernels.gemv (row-major weights; swiglu: two of them)."""
    w1 = torch.randn(N, K, device="cuda", dtype=BF16) * 0.02
    w2 = torch.randn(N, K, device="cuda", dtype=BF16) * 0.02 if swiglu else None
    x = torch.randn(1, K, device="cuda", dtype=BF16)
    return lambda: kernels.gemv(x, w1, w2)


def cases():
    return [
        ("sparse qkv 4096->6144 s=0.5 masked, norm", sparse_case(4096, 6144, 0.5, norm=True)),
        ("sparse o 4096->4096 s=0.5 masked, residual", sparse_case(4096, 4096, 0.5, residual=True)),
        ("sparse gate+up 4096->2x14336 s=0.5 masked, norm, swiglu",
         sparse_case(4096, 28672, 0.5, swiglu=True, norm=True)),
        ("sparse down 14336->4096 s=0.5 masked, residual", sparse_case(14336, 4096, 0.5, residual=True)),
        ("sparse gate+up 4096->2x14336 s=0.5 compact, norm, swiglu",
         sparse_case(4096, 28672, 0.5, swiglu=True, norm=True, compact=True)),
        ("sparse down 14336->4096 s=0.0 masked", sparse_case(14336, 4096, 0.0)),
        ("sparse o 4096->4096 s=0.9 compact", sparse_case(4096, 4096, 0.9, compact=True)),
        ("dense gemv 4096->4096", dense_case(4096, 4096)),
        ("dense gemv swiglu 4096->2x14336", dense_case(4096, 14336, swiglu=True)),
        ("dense gemv 14336->4096", dense_case(14336, 4096)),
    ]


def main():
    if not torch.cuda.is_available():
        sys.exit("ncu_gemv.py needs a CUDA GPU (and Nsight Compute's ncu to read its counters)")
    torch.manual_seed(0)
    todo = cases()
    for _, fn in todo:  # compile and warm up outside the profiled range
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for i, (name, _) in enumerate(todo):
        print(f"case {i}: {name}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    for _, fn in todo:
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
