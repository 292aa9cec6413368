"""cuBLAS at batch 2..8 on Llama-3-8B decode shapes: nn.Linear's (N, K) weight vs input-major (K, N),
gate and up as two GEMMs vs one over [gate; up]."""
import sys, torch
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from bench import graph_time, copy_bandwidth_gbs
import torch.nn.functional as F
torch.manual_seed(0)
print("copy GB/s", round(copy_bandwidth_gbs()))
n = 3  # rotate 3 weight buffers so L2 does not hold them
for B in (1, 2, 4, 8):
    for name, K, Ns in [("qkv", 4096, [6144]), ("o", 4096, [4096]), ("gate,up", 4096, [14336, 14336]),
                        ("gate+up", 4096, [28672]), ("down", 14336, [4096])]:
        ws = [[torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for N in Ns] for _ in range(n)]
        wts = [[w.t().contiguous() for w in ww] for ww in ws]
        xs = [torch.randn(B, K, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        t_rm = graph_time(lambda i: [F.linear(xs[i % n], w) for w in ws[i % n]])
        t_im = graph_time(lambda i: [xs[i % n] @ wt for wt in wts[i % n]])
        t_imT = graph_time(lambda i: [F.linear(xs[i % n], wt.t()) for wt in wts[i % n]])
        gb = sum(Ns) * K * 2 / 1e9
        print(f"B={B} {name:8s} K={K} N={sum(Ns)}: row-major {t_rm*1e6:7.1f} us ({gb/t_rm:5.0f} GB/s)  "
              f"input-major x@wt {t_im*1e6:7.1f} us ({gb/t_im:5.0f} GB/s)  F.linear(x, wt.t()) {t_imT*1e6:7.1f} us  "
              f"ratio rm/im {t_rm/t_im:.3f}", flush=True)
