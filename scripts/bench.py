"""GPU benchmarks, all ratios taken in one run on one device.

    python scripts/bench.py                                   # copy bandwidth + dense decode, Llama-3-8B
    python scripts/bench.py --presets Llama-3-8B Llama-2-7B --new-tokens 128
    python scripts/bench.py --gemv                            # sparse GEMV vs cuBLAS vs ideal
    python scripts/bench.py --e2e dense teal50 cats50 ...     # decode tok/s per method, same run

1. Device copy bandwidth: a large device-to-device copy, counting bytes read + written.
2. Dense decode per preset (random weights, bf16, batch 1): generate.py's compiled
   decode step (reduce-overhead, fullgraph, CUDA graphs); tokens/s, achieved GB/s
   (weight bytes one decode step reads x tokens/s) and achieved / copy bandwidth.

Prints a table; --json writes the numbers too.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as gen  # noqa: E402
from model import ModelArgs, random_model  # noqa: E402

EAGER_STEP = gen.decode_one_token


def copy_bandwidth_gbs(n_bytes=2 << 30, reps=20) -> float:
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n_bytes / statistics.median(times) / 1e9


def setup_inductor():
    import torch._inductor.config as ic
    ic.coordinate_descent_tuning = True
    ic.triton.unique_kernel_names = True
    ic.fx_graph_cache = True


def time_decode(model, prompt_len=16, new_tokens=128, reps=5, batch_size=1, compiled_step=None):
    """Median seconds per generated token over `reps` generations (after warm-up)."""
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), device="cuda", dtype=torch.int)
    gen.decode_one_token = compiled_step or gen.decode_one_token
    for _ in range(2):  # compile + CUDA-graph capture
        gen.generate(model, prompt, new_tokens, batch_size)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.generate(model, prompt, new_tokens, batch_size)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / new_tokens


def bench_dense(preset, copy_gbs, new_tokens, compile=True):
    torch.manual_seed(0)
    model = random_model(ModelArgs.from_preset(preset), device="cuda", dtype=torch.bfloat16)
    step = torch.compile(EAGER_STEP, mode="reduce-overhead", fullgraph=True) if compile else None
    s_per_tok = time_decode(model, new_tokens=new_tokens, compiled_step=step)
    step_bytes = gen.decode_step_bytes(model)
    gbs = step_bytes / s_per_tok / 1e9
    row = dict(preset=preset, tok_s=1 / s_per_tok, gb_s=gbs, step_gb=step_bytes / 1e9,
               ideal_tok_s=copy_gbs * 1e9 / step_bytes, ratio_to_copy=gbs / copy_gbs)
    del model
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def graph_time(fn, reps=20) -> float:
    """Seconds per call of fn(i) (i rotates input buffers), timed as CUDA-graph replays so
    launch gaps do not count."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


GEMV_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 11008), (11008, 4096)]  # (K in, N out)
GEMV_SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.7, 0.9]


def sweep_gemv(copy_gbs):
    """Try launch configurations of input_sparse_gemv on the Llama-3-8B shapes."""
    import kernels
    best = None
    for block_n in (64, 128, 256):
        for block_k in (128, 256, 512):
            for pps in (2, 4, 8):
                for warps in (4, 8):
                    tn = dict(block_n=block_n, block_k=block_k, programs_per_sm=pps, num_warps=warps)
                    total = 0.0
                    for K, N in GEMV_SHAPES[:3]:
                        for s in (0.0, 0.5, 0.9):
                            total += _time_sparse(K, N, s, 1, copy_gbs, tn)
                    print(f"sweep {tn}: sum of times {total * 1e6:.1f} us", flush=True)
                    if best is None or total < best[0]:
                        best = (total, tn)
    print(f"best launch configuration: {best[1]}", flush=True)
    kernels.GEMV_TUNING.update(best[1])
    return best[1]


_GEMV_BUFS = {}


def _gemv_buffers(K, N, batch):
    key = (K, N, batch)
    if key not in _GEMV_BUFS:
        _GEMV_BUFS.clear()
        torch.cuda.empty_cache()
        n_buf = max(2, int(256e6 // (K * N * 2)))  # rotate > L2 worth of weights
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_buf)]
        wts = [w.t().contiguous() for w in ws]
        xs = [torch.randn(batch, K, device="cuda", dtype=torch.bfloat16) for _ in range(n_buf)]
        a = torch.cat([x.float().abs().flatten() for x in xs]).sort().values
        _GEMV_BUFS[key] = (ws, wts, xs, a)
    return _GEMV_BUFS[key]


def _time_sparse(K, N, s, batch, copy_gbs, tuning=None):
    import kernels
    ws, wts, xs, a = _gemv_buffers(K, N, batch)
    n = len(ws)
    thr = float(a[int(s * (a.numel() - 1))]) if s > 0 else -1.0
    t_col = torch.full((N,), thr, device="cuda")
    old = dict(kernels.GEMV_TUNING)
    kernels.GEMV_TUNING.update(tuning or {})
    block_n = kernels.block_n_for([N])
    try:
        return graph_time(lambda i: kernels.input_sparse_gemv(xs[i % n], wts[i % n], t_col, None, None, block_n))
    finally:
        kernels.GEMV_TUNING.clear()
        kernels.GEMV_TUNING.update(old)


def bench_gemv(copy_gbs, batch=1):
    rows = []
    for K, N in GEMV_SHAPES:
        ws, _, xs, _ = _gemv_buffers(K, N, batch)
        n = len(ws)
        t_dense = graph_time(lambda i: torch.nn.functional.linear(xs[i % n], ws[i % n]))
        for s in GEMV_SPARSITIES:
            t_sp = _time_sparse(K, N, s, batch, copy_gbs)
            ideal = (1 - s) * K * N * 2 / (copy_gbs * 1e9)
            rows.append(dict(K=K, N=N, sparsity=s, batch=batch, us_sparse=t_sp * 1e6, us_dense=t_dense * 1e6,
                             us_ideal=ideal * 1e6, speedup=t_dense / t_sp, vs_ideal=t_sp / ideal))
            r = rows[-1]
            print(f"gemv {K:>5}->{N:<5} s={s:.2f} b={batch}: sparse {r['us_sparse']:7.1f} us  cuBLAS "
                  f"{r['us_dense']:7.1f} us  ideal {r['us_ideal']:7.1f} us  speedup {r['speedup']:.2f}x  "
                  f"time/ideal {r['vs_ideal']:.2f}", flush=True)
    return rows


E2E = {  # name -> calibrate() keyword arguments (paper operating points)
    "teal25": dict(method="teal", sparsity=0.25), "teal40": dict(method="teal", sparsity=0.4),
    "teal50": dict(method="teal", sparsity=0.5), "cats50": dict(method="cats", sparsity=0.5),
    "scap": dict(method="scap", scap="up,zero,0.35,gate,zero,0.35,down,zero,0.55"),
    "m-countdown70": dict(method="m-countdown", sparsity=0.7),
    "d-countdown70": dict(method="d-countdown", sparsity=0.7, rank=512),
    "d-countdown-oracle70": dict(method="d-countdown-oracle", sparsity=0.7),
}


def bench_e2e(preset, names, copy_gbs, new_tokens):
    import calibrate as cal
    import sparsity as sp
    torch.manual_seed(0)
    model = random_model(ModelArgs.from_preset(preset), device="cuda", dtype=torch.bfloat16)
    step_bytes = gen.decode_step_bytes(model)
    batches = torch.randint(0, model.config.vocab_size, (2, 64))
    rows, dense_tok_s = [], None
    for name in names:
        t0 = time.perf_counter()
        if name == "dense":
            sp.apply(model, None)
            eff = 0.0
        else:
            cfg = cal.calibrate(model, batches, progress=False, **E2E[name])
            eff = sp.effective_sparsity(model, cal.measure(model, cfg, batches), cfg.header["method"])
            sp.apply(model, cfg)
        t_cal = time.perf_counter() - t0
        torch._dynamo.reset()
        step = torch.compile(EAGER_STEP, mode="reduce-overhead", fullgraph=True)
        s_per_tok = time_decode(model, new_tokens=new_tokens, compiled_step=step)
        tok_s = 1 / s_per_tok
        dense_tok_s = dense_tok_s or (tok_s if name == "dense" else None)
        rows.append(dict(preset=preset, method=name, tok_s=tok_s, effective_sparsity=eff,
                         speedup_vs_dense=tok_s / dense_tok_s if dense_tok_s else float("nan"),
                         dense_gb_s_equiv=step_bytes * tok_s / 1e9, calibrate_s=t_cal))
        r = rows[-1]
        print(f"e2e {preset} {name:>20}: {tok_s:7.1f} tok/s  speedup vs dense {r['speedup_vs_dense']:.2f}x  "
              f"effective sparsity {eff:.3f}  (dense-equivalent {r['dense_gb_s_equiv']:.0f} GB/s, "
              f"copy {copy_gbs:.0f} GB/s)", flush=True)
    sp.apply(model, None)
    del model
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["Llama-3-8B"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--gemv", action="store_true", help="GEMV micro-benchmarks")
    ap.add_argument("--gemv-batch", type=int, nargs="+", default=[1])
    ap.add_argument("--sweep", action="store_true", help="sweep GEMV launch configurations first")
    ap.add_argument("--e2e", nargs="+", help=f"decode per method: dense {' '.join(E2E)}")
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense per-preset table")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "bench.py needs a CUDA GPU"
    setup_inductor()
    name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {name}, torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows, gemv, e2e = [], [], []
    for p in ([] if a.skip_dense else a.presets):
        r = bench_dense(p, copy_gbs, a.new_tokens, compile=not a.no_compile)
        rows.append(r)
        print(f"{p:>14}: {r['tok_s']:7.1f} tok/s  {r['gb_s']:7.0f} GB/s  step {r['step_gb']:.2f} GB  "
              f"limit {r['ideal_tok_s']:6.1f} tok/s  achieved/copy = {r['ratio_to_copy']:.3f}", flush=True)
    tuning = sweep_gemv(copy_gbs) if a.sweep else None
    if a.gemv:
        for b in a.gemv_batch:
            gemv += bench_gemv(copy_gbs, b)
    if a.e2e:
        for p in a.presets:
            e2e += bench_e2e(p, a.e2e, copy_gbs, a.new_tokens)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, copy_gb_s=copy_gbs, tuning=tuning,
                                                dense=rows, gemv=gemv, e2e=e2e), indent=2))


if __name__ == "__main__":
    main()
