"""GPU benchmarks, all ratios taken in one run on one device.

    python scripts/bench.py                                   # copy bandwidth + dense decode, Llama-3-8B
    python scripts/bench.py --presets Llama-3-8B Llama-2-7B --new-tokens 128
    python scripts/bench.py --gemv                            # sparse GEMV vs cuBLAS, ideal, read floor
    python scripts/bench.py --e2e dense teal50 cats50 ...     # decode tok/s per method, same run
    python scripts/bench.py --skip-dense --e2e dense dense-torch teal50 --profile   # + GPU time per kernel,
                                                              # and the step's critical path by kernel
    python scripts/bench.py --sweep --dense-sweep --dense-attention                # launch-configuration sweeps
    python scripts/bench.py --sweep --space gemv:programs_per_sm=2,3,4 gemv:num_warps=4   # one axis narrowed
    python scripts/bench.py --skip-dense --batch-sweep --batch 4 --e2e dense teal50 dense  # batch 4 decode
    python scripts/bench.py --skip-dense --e2e dense teal50 --floor          # + each step vs its read floor

1. Device copy bandwidth: a large device-to-device copy, counting bytes read + written.
2. Dense decode per preset (random weights, bf16, batch 1): generate.py's compiled
   decode step (reduce-overhead, fullgraph, CUDA graphs); tokens/s, achieved GB/s
   (weight bytes one decode step reads x tokens/s) and achieved / copy bandwidth.

Prints a table; --json writes the numbers too.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as gen  # noqa: E402
from kernels import _await_previous, _launch_next, pdl_args  # noqa: E402
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


def setup_inductor(coordinate_descent=True):
    import torch._inductor.config as ic
    ic.coordinate_descent_tuning = coordinate_descent  # also makes inductor turn M=1 matmuls into reductions
    ic.triton.unique_kernel_names = True
    ic.fx_graph_cache = True


def time_decode(model, context=16, new_tokens=128, reps=5, compiled_step=None, profile=False, batch=1, record=False):
    """Median seconds per decode step (one token for each of `batch` sequences) after a dense
    prefill of `context` random tokens per sequence, a different prompt each (so a sparse site
    reads the union of the sequences' kept channels, as in serving); the `decode` token policy,
    which also keeps the reference attention path from materialising (H, L, L) scores in a long
    prefill. With profile: also a per-kernel table. With record: returns (seconds, measured), measured
    the sites' sparsity (sparsity.stop_recording) over an eager decode of the same prompt and length: with
    random weights a greedy decode often repeats a few tokens, whose kept fractions can differ from the
    calibration batches' (D-COUNTDOWN 70%: 1.16x or 1.22x dense by the decoded tokens, session 22)."""
    device = model.output.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device, dtype=torch.int)
    gen.decode_one_token = compiled_step or EAGER_STEP
    model.setup_caches(max_batch_size=batch, max_seq_len=context + new_tokens + 1)
    mods = [m for layer in model.layers for m in (layer.attention, layer.feed_forward)]

    def prefill():
        saved = [m.sparsity for m in mods]
        for m in mods:
            m.sparsity = None
        with torch.no_grad():
            tok = model(prompt, torch.arange(context, device=device))[:, -1:].argmax(-1).int()
        for m, sp_ in zip(mods, saved):  # the same objects again: the compiled step's guards still hold
            m.sparsity = sp_
        gen.synchronize(device)
        return tok

    def run(n_tokens, tok=None):
        tok = prefill() if tok is None else tok
        t0 = time.perf_counter()
        with torch.no_grad():
            gen.decode_n_tokens(model, tok, torch.tensor([context], device=device, dtype=torch.int), n_tokens, 0.0,
                                None)
        gen.synchronize(device)
        return (time.perf_counter() - t0) / n_tokens

    for _ in range(2):  # compile + CUDA-graph capture
        run(new_tokens)
    sec = statistics.median(run(new_tokens) for _ in range(reps))
    if profile:
        from torch.profiler import ProfilerActivity
        tok = prefill()  # outside the trace: the table is the decode steps' kernels alone
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(16, tok)
        print_kernel_table(prof, 16, sec)
        print_critical_path(prof, 16, model.config.n_layers)
    if not record:
        return sec
    import sparsity as sp
    tok = prefill()
    gen.decode_one_token = EAGER_STEP  # recording runs each site's PyTorch reference
    sp.start_recording(model)
    run(new_tokens, tok)
    return sec, sp.stop_recording(model)


def print_kernel_table(prof, n_steps, sec_per_token, top=24):
    """GPU time per decode step by kernel name (summed over every launch of that kernel)."""
    rows = [(e.self_device_time_total / n_steps, e.count // n_steps, e.key) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    if not rows:
        print("  profile: no GPU kernels recorded (CUDA-graph replays not traced by this build)")
        return
    total = sum(r[0] for r in rows)
    print(f"  profile: {total / 1e3:.3f} ms of kernels per step, {sec_per_token * 1e3:.3f} ms per step wall "
          f"({total / 1e3 / (sec_per_token * 1e3):.0%} busy)")
    for us, count, name in sorted(rows, reverse=True)[:top]:
        print(f"  {us:8.1f} us  {100 * us / total:5.1f}%  x{count:<4} {name[:110]}")


def critical_path(launches, n_steps: int, n_layers: int) -> list:
    """Where a step's time goes when launches overlap (PDL: a kernel starts, and waits, before the previous one
    ends, so durations add up to more than the step). launches: (name, start, end) of every kernel of n_steps
    steps. Taken in start order, each kernel is charged the time by which it moves the latest end so far (its
    increment): the increments sum to the span from the first start to the last end. A kernel that runs k >= 2
    times per layer is told apart by its place in the layer ("#0".."#k-1": the q/k/v, o, gate+up and down GEMVs
    of a sparse layer), its launches after the layers' (the LM head's GEMV) as such. Returns rows (role,
    launches per step, increment per launch, duration per launch, increment per step), in first-launch order;
    times in the input's unit."""
    per_step = {}
    for name, _, _ in launches:
        per_step[name] = per_step.get(name, 0) + 1
    seen, rows, latest = {}, {}, None
    for name, start, end in sorted(launches, key=lambda k: (k[1], k[2])):
        count = max(1, per_step[name] // n_steps)  # (a copy or two in some steps only: count 1)
        i = seen.get(name, 0)
        seen[name] = i + 1
        k, occ = count // n_layers, i % count  # launches per layer; this one's place in its step
        role = name if k < 2 else f"{name} #{occ % k}" if occ < k * n_layers else f"{name} (after the layers)"
        inc = end - start if latest is None else max(0.0, end - latest)  # an idle gap before it included
        latest = end if latest is None else max(latest, end)
        r = rows.setdefault(role, [0, 0.0, 0.0])
        r[0] += 1
        r[1] += inc
        r[2] += end - start
    return [(role, n / n_steps, inc / n, dur / n, inc / n_steps) for role, (n, inc, dur) in rows.items()]


def print_critical_path(prof, n_steps: int, n_layers: int, top=16):
    """critical_path of the profiled decode steps, in microseconds, the largest shares first."""
    ks = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
          if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    if not ks:
        return
    rows = critical_path(ks, n_steps, n_layers)
    total = sum(r[4] for r in rows)
    print(f"  critical path: {total / 1e3:.3f} ms per step (first start to last end; increments by launch)")
    for role, n, inc, dur, step in sorted(rows, key=lambda r: -r[4])[:top]:
        print(f"  {step:8.1f} us  {100 * step / total:5.1f}%  x{n:<5g} {inc:6.2f} us per launch (runs {dur:6.2f})  "
              f"{role[:90]}")


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


# (K in, N out): Llama-3-8B q/k/v, o, gate+up (one launch), down; Llama-2-7B q/k/v, gate+up, down
GEMV_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 12288), (4096, 22016), (11008, 4096)]
GEMV_SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.7, 0.9]
MERGED_GATE_UP = (28672, 22016)  # the [gate; up] shapes: the batch-1 kernel also forms SiLU(gate) * up


# Launch-configuration spaces of the sweeps; --space overrides one axis, e.g. gemv:programs_per_sm=2,3,4
SPACES = dict(
    # 4 programs fit an SM at block_k 256 x block_n 64 (scripts/kernel_regs.py), measured faster than 5 (session 24)
    gemv=dict(block_n=(32, 64, 128), block_k=(128, 256, 512), programs_per_sm=(2, 3, 4, 8), num_warps=(4, 8)),
    # input_sparse_gemv at batch 2..8 (block_n stays 64: the model's sites are cut in 64-column blocks)
    gemv_batch=dict(block_k=(32, 64, 128), programs_per_sm=(8,), num_warps=(1, 2, 4), num_stages=(1, 2)),
    # block_l = keys_per_program: a chunk's K rows in one load, its V rows in one more (Top-Theta)
    attn=dict(keys_per_program=(64, 128), block_l=(32, 64, 128), programs_per_sm=(2, 4, 8), num_warps=(2, 4, 8)),
    dense_attn=dict(block_l=(32, 64), keys_per_program=(64, 128, 256), programs_per_sm=(1, 2, 4),
                    merge_block=(1, 16), num_warps=(2, 4)),
)


def configs(space: dict) -> list:
    """Every combination of a space's axes, as tuning dicts."""
    out = [{}]
    for key, values in space.items():
        out = [dict(c, **{key: v}) for c in out for v in values]
    return out


def sweep_gemv(copy_gbs):
    """Try launch configurations of sparse_gemv (batch 1, what a decode step runs) on the Llama-3-8B
    shapes at s = 0, 0.5, 0.9; prints each shape's time and each shape's best configuration."""
    import kernels
    best, per_shape_best = None, {}
    for tn in configs(SPACES["gemv"]):
        if tn["block_n"] * tn["block_k"] > 16384:  # 168-250 registers at 4 warps, 2-3 per SM (kernel_regs.py)
            continue
        per_shape = {}
        for K, N in GEMV_SHAPES[:4]:
            per_shape[K, N] = sum(_time_sparse(K, N, s, 1, copy_gbs, tn, fused=True,
                                               compact=s >= kernels.COMPACT_MIN_SPARSITY) for s in (0.0, 0.5, 0.9))
            if (K, N) not in per_shape_best or per_shape[K, N] < per_shape_best[K, N][0]:
                per_shape_best[K, N] = (per_shape[K, N], tn)
        total = sum(per_shape.values())
        print(f"sweep {tn}: sum of times {total * 1e6:.1f} us ("
              + ", ".join(f"{K}->{N} {t * 1e6:.1f}" for (K, N), t in per_shape.items()) + ")", flush=True)
        if best is None or total < best[0]:
            best = (total, tn)
    for (K, N), (t, tn) in per_shape_best.items():
        print(f"best for {K}->{N} alone: {tn} ({t * 1e6:.1f} us)", flush=True)
    print(f"best launch configuration: {best[1]}", flush=True)
    kernels.GEMV_TUNING.update(best[1])
    return best[1]


def sweep_gemv_batch(copy_gbs, batches=(2, 4, 8)):
    """Launch configurations of input_sparse_gemv's batch kernel (what batch 2..8 decode runs; the
    kernel alone, its K chunks' sum is fused into the next op) on the Llama-3-8B shapes at s = 0,
    0.5, 0.9 against cuBLAS on the same data. Thresholds at the s-quantile of |x| over independent
    rows: a weight row is read if any sequence keeps it. GEMV_BATCH_TUNING is set to the best sum."""
    import kernels
    base, space = dict(kernels.GEMV_BATCH_TUNING), configs(SPACES["gemv_batch"])
    totals, parts = [0.0] * len(space), [[] for _ in space]
    for K, N in GEMV_SHAPES[:4]:  # each shape's buffers made once, every configuration timed on them
        block_n = kernels.block_n_for([N])
        for b in batches:
            ws, wts, xs, a = _gemv_buffers(K, N, b)
            n = len(ws)
            cublas = graph_time(lambda i: torch.nn.functional.linear(xs[i % n], ws[i % n]))
            for s in (0.0, 0.5, 0.9):
                t = torch.full((N,), _threshold_at(a, s), device="cuda")
                for j, tn in enumerate(space):
                    kernels.GEMV_BATCH_TUNING.update(tn)
                    sec = graph_time(lambda i: kernels.input_sparse_gemv_partials(xs[i % n], wts[i % n], t, None,
                                                                                  block_n))
                    kernels.GEMV_BATCH_TUNING.update(base)
                    totals[j] += sec
                    parts[j].append(f"{K}->{N} b{b} s{s} {cublas / sec:.2f}x")
    for tn, total, part in zip(space, totals, parts):
        print(f"batch sweep {tn}: sum of times {total * 1e6:.1f} us; vs cuBLAS: {', '.join(part)}", flush=True)
    j = min(range(len(space)), key=totals.__getitem__)
    best = (totals[j], dict(base, **space[j]))
    kernels.GEMV_BATCH_TUNING.update(best[1])
    print(f"best batch launch configuration: {best[1]} ({best[0] * 1e6:.1f} us)", flush=True)
    _GEMV_BUFS.clear()  # the weight buffers, before an --e2e model needs the memory
    torch.cuda.empty_cache()
    return best[1]


def sweep_dense(copy_gbs):
    """Launch configurations of the dense gemv kernel (one weight; two with SwiGLU), batch 1,
    Llama-3-8B shapes incl. the LM head; each tuning dict is set to its best."""
    import kernels
    F = torch.nn.functional
    best = {}
    for name, shapes, space in (
            ("DENSE_TUNING", [(4096, 6144), (4096, 4096), (14336, 4096), (4096, 128256)],
             [(bn, bk, w, st) for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8) for st in (1, 3, 4)]),
            ("SWIGLU_TUNING", [(4096, 14336)],
             [(bn, bk, w, st) for bn in (4, 8, 16) for bk in (256, 512) for w in (4, 8) for st in (1, 3)])):
        tuning = getattr(kernels, name)
        for bn, bk, w, st in space:
            tuning.update(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            total = 0.0
            for K, N in shapes:
                ws, _, xs, _ = _gemv_buffers(K, N, 1)
                n = len(ws)
                two = name == "SWIGLU_TUNING"
                total += graph_time(lambda i: kernels.gemv(xs[i % n], ws[i % n], ws[(i + 1) % n] if two else None))
            print(f"{name} sweep {dict(tuning)}: sum of times {total * 1e6:.1f} us", flush=True)
            if name not in best or total < best[name][0]:
                best[name] = (total, dict(tuning))
        tuning.update(best[name][1])
        ref = 0.0
        for K, N in shapes:
            ws, _, xs, _ = _gemv_buffers(K, N, 1)
            n = len(ws)
            if name == "SWIGLU_TUNING":
                ref += graph_time(lambda i: F.silu(F.linear(xs[i % n], ws[i % n]))
                                  * F.linear(xs[i % n], ws[(i + 1) % n]))
            else:
                ref += graph_time(lambda i: F.linear(xs[i % n], ws[i % n]))
        ideal = sum(K * N * 2 for K, N in shapes) * (2 if name == "SWIGLU_TUNING" else 1) / (copy_gbs * 1e9)
        print(f"best {name}: {best[name][1]}: {best[name][0] * 1e6:.1f} us vs cuBLAS (eager) {ref * 1e6:.1f} us, "
              f"ideal {ideal * 1e6:.1f} us", flush=True)
    return {k: v[1] for k, v in best.items()}


def sweep_gated(copy_gbs):
    """Launch configurations of gated_rows (CATS mode, 50% of rows kept, batch 1), Llama-3-8B MLP."""
    import kernels
    K, N = 4096, 14336
    w = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    p = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
    t = float(torch.nn.functional.silu(p.float()).abs().median())
    best = None
    for block_n in (4, 8, 16, 32):
        for block_k in (128, 256, 512, 1024):
            for warps in (2, 4, 8):
                kernels.GATED_TUNING.update(block_n=block_n, block_k=block_k, num_warps=warps)
                sec = graph_time(lambda i: kernels.gated_rows(x, w[i % 4], None, p, t, 0))
                ideal = 0.5 * K * N * 2 / (copy_gbs * 1e9)
                print(f"gated sweep block_n={block_n} block_k={block_k} warps={warps}: {sec * 1e6:.1f} us "
                      f"(ideal {ideal * 1e6:.1f})", flush=True)
                if best is None or sec < best[0]:
                    best = (sec, dict(kernels.GATED_TUNING))
    kernels.GATED_TUNING.update(best[1])
    dense = graph_time(lambda i: torch.nn.functional.linear(x, w[i % 4]))
    print(f"best gated_rows configuration: {best[1]}: {best[0] * 1e6:.1f} us at 50% rows vs cuBLAS dense "
          f"{dense * 1e6:.1f} us", flush=True)
    return best[1]


def thresholds_keeping(q, k, keep):
    """Per query head, the scaled-score quantile that keeps a `keep` fraction of its scores over
    the keys k (-inf for keep = 1). q: (B, H, D), k: (B, Hkv, L, D); B = 1."""
    H, D = q.shape[1], q.shape[2]
    if keep >= 1.0:
        return torch.full((H,), -float("inf"), device=q.device)
    a = torch.einsum("bhd,bhnd->bhn", q.float(), k.float().repeat_interleave(H // k.shape[1], 1)) / D ** 0.5
    return torch.quantile(a[0], 1 - keep, dim=-1).float()


def sweep_attention(copy_gbs):
    """Launch configurations of theta_attention, compiled as in a model (its merge kernel after it),
    Llama-3-8B heads, 10% of scores kept, 8k and 32k keys. Sets ATTN_TUNING to the best."""
    import kernels
    B, H, Hkv, D = 1, 32, 8, 128
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    best = None
    caches = []  # (keys, values, theta, lohi) per cache length, built once for every configuration
    for L in (8192, 32768):
        ks = [torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        vs = [torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        caches.append((ks, vs, thresholds_keeping(q, ks[0], 0.1),
                       torch.tensor([0, L], dtype=torch.int32, device="cuda")))
    for tn in configs(SPACES["attn"]):
        kernels.ATTN_TUNING.update(tn)
        torch._dynamo.reset()
        attend = torch.compile(kernels.theta_attention, fullgraph=True)
        total = 0.0
        for ks, vs, theta, lohi in caches:
            total += graph_time(lambda i: attend(q, ks[i % 4], vs[i % 4], theta, lohi, 0))
        print(f"attention sweep {tn}: {total * 1e6:.1f} us", flush=True)
        if best is None or total < best[0]:
            best = (total, dict(kernels.ATTN_TUNING))
    kernels.ATTN_TUNING.update(best[1])
    torch._dynamo.reset()
    print(f"best theta_attention configuration: {best[1]}", flush=True)
    return best[1]


def _attention_case(L, B=1, H=32, Hkv=8, D=128):
    """Decode attention over L cache positions, Llama-3-8B heads: rotating KV caches (> 200 MB
    in all, so L2 never holds them), one query, the window (0, L), and the time of the masked
    SDPA every position visible (the model's dense decode attention before the kernel)."""
    import sparsity as sp
    n_buf = max(2, int(200e6 // (2 * B * Hkv * L * D * 2)))
    ks = [torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(n_buf)]
    vs = [torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(n_buf)]
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool, device="cuda")
    lohi = torch.tensor([0, L] + [0] * (B * Hkv), dtype=torch.int32, device="cuda")  # + merge counters
    t_sdpa = graph_time(lambda i: sp.dense_attention(q, ks[i % n_buf], vs[i % n_buf], mask))
    return ks, vs, q, lohi, t_sdpa


def bench_attention(copy_gbs, lengths=(8192, 16384, 32768)):
    """Top-Theta decode attention (kernels.theta_attention) vs SDPA on the same KV cache,
    Llama-3-8B heads (32 query / 8 KV heads, head_dim 128), batch 1. Thresholds per head at
    the score quantile that keeps `keep` of each head's scores; a V row is read when any of
    the 4 heads sharing it keeps it."""
    import kernels
    B, H, Hkv, D = 1, 32, 8, 128
    attend = torch.compile(kernels.theta_attention, fullgraph=True)  # the chunks' kernel + the merge, as in a model
    rows = []
    for L in lengths:
        ks, vs, q, lohi, t_mask = _attention_case(L, B, H, Hkv, D)
        n_buf = len(ks)
        t_flash = graph_time(lambda i: torch.nn.functional.scaled_dot_product_attention(
            q, ks[i % n_buf], vs[i % n_buf], enable_gqa=True))
        t_dense = graph_time(lambda i: kernels.decode_attention(q[:, :, 0], ks[i % n_buf], vs[i % n_buf], lohi))
        a = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), ks[0].float().repeat_interleave(H // Hkv, 1)) / D ** 0.5
        for keep in (1.0, 0.25, 0.1, 0.03):
            theta = thresholds_keeping(q[:, :, 0], ks[0], keep)
            kept = a[0] > theta[:, None]
            v_frac = float(kept.view(Hkv, H // Hkv, L).any(1).float().mean())
            sec = graph_time(lambda i: attend(q[:, :, 0], ks[i % n_buf], vs[i % n_buf], theta, lohi, 0))
            ideal = (1 + v_frac) * B * Hkv * L * D * 2 / (copy_gbs * 1e9)
            rows.append(dict(L=L, keep=keep, v_rows_read=v_frac, us=sec * 1e6, us_sdpa_mask=t_mask * 1e6,
                             us_sdpa_nomask=t_flash * 1e6, us_ideal=ideal * 1e6, us_dense_kernel=t_dense * 1e6))
            print(f"attention L={L:>6} keep {keep:.2f} (V rows read {v_frac:.2f}): theta kernel + merge "
                  f"{sec * 1e6:6.1f} us  SDPA masked {t_mask * 1e6:7.1f} us  SDPA no mask {t_flash * 1e6:7.1f} us  "
                  f"dense kernel {t_dense * 1e6:7.1f} us  ideal {ideal * 1e6:6.1f} us  the model's: vs masked SDPA "
                  f"{t_mask / sec:.2f}x, vs the dense kernel {t_dense / sec:.2f}x", flush=True)
        ks = vs = None  # free the caches before the next length
        torch.cuda.empty_cache()
    return rows


def bench_dense_attention(lengths=(145, 1089, 8256, 32768)):
    """Dense decode attention: kernels.decode_attention (compiled; chunks merged in-kernel) for
    each configuration of SPACES["dense_attn"] vs the masked SDPA, Llama-3-8B heads, batch 1,
    every cache position visible. Sets DENSE_ATTN_TUNING to the configuration whose time relative
    to the best at each length sums lowest (a raw sum would let the longest cache decide alone)."""
    import kernels
    B, Hkv = 1, 8
    cands = configs(SPACES["dense_attn"])
    axes = list(SPACES["dense_attn"])
    rows, times = [], {}
    for L in lengths:
        ks, vs, q, lohi, t_sdpa = _attention_case(L, B, Hkv=Hkv)
        n_buf = len(ks)
        line = f"dense attention L={L:>5}: masked SDPA {t_sdpa * 1e6:6.1f} us; kernel by ({', '.join(axes)}):"
        for c, tn in enumerate(cands):
            kernels.DENSE_ATTN_TUNING.update(tn)
            torch._dynamo.reset()
            attend = torch.compile(kernels.decode_attention, fullgraph=True)
            sec = graph_time(lambda i: attend(q[:, :, 0], ks[i % n_buf], vs[i % n_buf], lohi))
            times[L, c] = sec
            splits = kernels.attention_splits(B, Hkv, L, q.device, dense=True)
            rows.append(dict(L=L, **tn, splits=splits, us=sec * 1e6, us_sdpa_mask=t_sdpa * 1e6))
            line += f" ({','.join(str(tn[a]) for a in axes)}): {sec * 1e6:.1f} [{splits}]"
        print(line, flush=True)
        ks = vs = None
        torch.cuda.empty_cache()
    score = [sum(times[L, c] / min(times[L, j] for j in range(len(cands))) for L in lengths) for c in range(len(cands))]
    best = min(range(len(cands)), key=score.__getitem__)
    kernels.DENSE_ATTN_TUNING.update(cands[best])
    print(f"best dense decode attention tuning: {cands[best]} (sum of time / best time per length "
          f"{score[best]:.2f} over {len(lengths)} lengths)", flush=True)
    return rows


# ----------------------------------------------------------------------------- the read floor
@triton.jit
def _read_kernel(W, OUT, n_words, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Reads W's first n_words int32 words (grid-stride, BLOCK words per program per step) and
    stores each program's checksum: a kernel that does nothing but its reads, PDL-chained as the
    decode kernels are (kernels._await_previous / _launch_next)."""
    _await_previous(PDL)
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(pid * BLOCK, n_words, tl.num_programs(0) * BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(W + offs, mask=offs < n_words, other=0)
    _launch_next(PDL)
    tl.store(OUT + pid, tl.sum(acc, 0))


def floor_reads(args: ModelArgs, s: float, context: int) -> list:
    """Bytes each kernel of a batch-1 bf16 decode step reads, one kernel per dependency, in launch
    order: per layer q/k/v, attention (the context's K and V rows), o, gate+up, down, each
    projection at its (1 - s) share; then the LM head (dense)."""
    a = args
    qkv = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    layer = [qkv * (1 - s), 2 * context * a.n_kv_heads * a.head_dim, a.n_heads * a.head_dim * a.dim * (1 - s),
             2 * a.dim * a.intermediate_size * (1 - s), a.intermediate_size * a.dim * (1 - s)]
    return [2 * int(n) for n in layer] * a.n_layers + [2 * a.vocab_size * a.dim]


FLOOR_LAUNCHES = [(8, 2048, 4), (4, 4096, 4)]  # (programs per SM, BLOCK, warps): the floor is the faster
FLOOR_SPARSITIES = (0.0, 0.25, 0.4, 0.5)


def floor_spans(reads, ring_words: int) -> list:
    """(first word, words) in the ring for each read: one after the other, each 4 KB-aligned (a
    start off 16 bytes costs the vectorised loads: the floor rose 6% at s 0.501 against 0.5),
    back to the start when the next would not fit."""
    spans, at = [], 0
    for n in reads:
        words = n // 4
        if at + words > ring_words:
            at = 0
        spans.append((at, words))
        at += -(-words // 1024) * 1024
    return spans


def read_floor(args: ModelArgs, s: float, context: int, ring: torch.Tensor) -> float:
    """Seconds per step of floor_reads' kernels as pure reads (CUDA-graph replays, the faster of
    FLOOR_LAUNCHES): what a decode step costs at sparsity s with one kernel per dependency and
    nothing but the reads it must do (each kernel's share contiguous, the most DRAM-friendly case).
    Successive kernels read successive regions of ring (int32, well over L2's size), so no read hits L2."""
    return read_chain(floor_spans(floor_reads(args, s, context), ring.numel()), ring)


def read_ring(largest_read: int) -> torch.Tensor:
    """The int32 words read_chain's spans index: 2 GiB (well over L2's size), or two of the largest read."""
    return torch.empty(max(2 << 30, 2 * largest_read) // 4, dtype=torch.int32, device="cuda").random_(0, 7)


def read_chain(spans, ring: torch.Tensor) -> float:
    """Seconds per replay of _read_kernel launched once per (first word, words) span of ring, PDL-chained
    (CUDA-graph replays, the faster of FLOOR_LAUNCHES)."""
    sms = torch.cuda.get_device_properties(ring.device).multi_processor_count
    out = torch.zeros(8 * sms, dtype=torch.int32, device=ring.device)
    best = float("inf")
    for pps, block, warps in FLOOR_LAUNCHES:
        def step(i):
            for at, words in spans:
                _read_kernel[(pps * sms,)](ring[at:], out, words, BLOCK=block, num_warps=warps,
                                           **pdl_args(ring))
        best = min(best, graph_time(step, reps=3))
    return best


def launch_floor(n_bytes: int, ring: torch.Tensor, launches: int = 16) -> float:
    """Seconds per launch of a pure read of n_bytes, launches of them back to back (read_chain), each
    from the next region of ring, so none hits L2: what one GEMV launch that reads n_bytes of weights
    cannot beat. A read takes longer than its bytes at copy bandwidth by the launch's ramp and tail:
    1.0-1.5 us on an H100 for reads up to 50 MB (BENCHMARKS.md session 25)."""
    return read_chain(floor_spans([n_bytes] * launches, ring.numel()), ring) / launches


def bench_floor(preset: str, sparsities, context: int, copy_gbs: float, e2e_rows=()) -> list:
    """The read floor per sparsity (read_floor), with the bound it puts on a speedup, floor(0) /
    floor(s); then each batch-1 e2e row of this preset against the floor at its effective sparsity, the one
    measured over its decode (else over the calibration batches)."""
    args = ModelArgs.from_preset(preset)
    reads = floor_reads(args, 0.0, context)
    ring = read_ring(max(reads))
    floors = {}

    def floor(s):
        if s not in floors:
            floors[s] = read_floor(args, s, context, ring)
        return floors[s]

    rows = []
    for s in sparsities:
        ideal = sum(floor_reads(args, s, context)) / (copy_gbs * 1e9)
        rows.append(dict(preset=preset, sparsity=s, context=context, floor_ms=floor(s) * 1e3, ideal_ms=ideal * 1e3,
                         kernels=len(reads), bound_vs_floor0=floor(0.0) / floor(s)))
        print(f"read floor {preset} s {s:.2f} (context {context}, {len(reads)} kernels): {floor(s) * 1e3:.3f} ms per "
              f"step ({ideal * 1e3:.3f} at copy bandwidth; {(floor(s) - ideal) * 1e6 / len(reads):.2f} us more per "
              f"kernel); at most {floor(0.0) / floor(s):.3f}x over the s 0 floor", flush=True)
    for r in e2e_rows:
        if r["preset"] != preset or r["batch"] != 1 or r["context"] != context:
            continue
        which = "decode" if r.get("decode_sparsity") is not None else "effective"
        s = round(r["decode_sparsity"] if which == "decode" else r["effective_sparsity"], 3)
        step_ms = 1e3 / r["tok_s"]
        r.update(floor_ms=floor(s) * 1e3, step_over_floor=step_ms / (floor(s) * 1e3), floor_sparsity=s)
        print(f"e2e {preset} {r['method']:>20}: {step_ms:.3f} ms per step = {r['step_over_floor']:.3f}x the read "
              f"floor at its {which} sparsity {s:.3f} ({floor(s) * 1e3:.3f} ms)", flush=True)
    return rows


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


def _threshold_at(a, s: float) -> float:
    """The threshold that skips a fraction s of the inputs whose sorted |x| is a (-1: none skipped)."""
    return float(a[int(s * (a.numel() - 1))]) if s > 0 else -1.0


def _time_sparse(K, N, s, batch, copy_gbs, tuning=None, compiled=False, fused=False, compact=True):
    """Seconds per sparse GEMV at sparsity s: input_sparse_gemv, its partial sums added by a
    compiled op (compiled) or eagerly (batch > 1 decode and the -unfused rows run it); fused
    (batch 1): kernels.sparse_gemv, what a batch-1 decode step runs (K chunks summed in-kernel;
    on the merged gate+up shapes with SiLU(gate) * up); compact=False: its loop over every
    tile of x with the skipped rows' loads masked off (what sites below kernels.COMPACT_MIN_SPARSITY run)."""
    import kernels
    ws, wts, xs, a = _gemv_buffers(K, N, batch)
    n = len(ws)
    t_col = torch.full((N,), _threshold_at(a, s), device="cuda")
    tun = kernels.GEMV_TUNING if batch == 1 else kernels.GEMV_BATCH_TUNING
    old = dict(tun)
    tun.update(tuning or {})
    try:
        if fused:
            swiglu = N in MERGED_GATE_UP
            block_n = kernels.block_n_for([N // 2] if swiglu else [N])
            counters = torch.zeros(N, dtype=torch.int32, device="cuda")
            return graph_time(lambda i: kernels.sparse_gemv(xs[i % n], wts[i % n], t_col, None, None, block_n,
                                                            counters, swiglu=swiglu, compact=compact))
        block_n = kernels.block_n_for([N])
        gemv = kernels.input_sparse_gemv
        if compiled:  # the partial sums' reduction compiled as in a model (the sweep compares configurations eagerly)
            torch._dynamo.reset()
            gemv = torch.compile(gemv, fullgraph=True)
        return graph_time(lambda i: gemv(xs[i % n], wts[i % n], t_col, None, None, block_n))
    finally:
        tun.clear()
        tun.update(old)


def bench_gemv(copy_gbs, batch=1, floors=None):
    """Input-sparse GEMV vs the dense GEMVs: cuBLAS (F.linear) and, at batch 1, this repo's
    dense gemv kernel (what the dense model runs); speedup is against the faster of the two.
    floors: {bytes: launch_floor seconds}, shared by the calls for several batch sizes (a floor depends on the
    bytes alone), so each is timed once per run and the 2 GiB ring allocated once."""
    import kernels
    rows = []
    floors = {} if floors is None else floors
    ring = None

    def floor(n_bytes):  # the same bytes as one contiguous read: no kernel beats it
        nonlocal ring
        if n_bytes not in floors:
            ring = ring if ring is not None else read_ring(max(K * N * 2 for K, N in GEMV_SHAPES))
            floors[n_bytes] = launch_floor(n_bytes, ring)
        return floors[n_bytes]

    for K, N in GEMV_SHAPES:
        ws, _, xs, _ = _gemv_buffers(K, N, batch)
        n = len(ws)
        t_cublas = graph_time(lambda i: torch.nn.functional.linear(xs[i % n], ws[i % n]))
        t_kernel = graph_time(lambda i: kernels.gemv(xs[i % n], ws[i % n], None)) if batch == 1 else float("inf")
        t_dense = min(t_cublas, t_kernel)
        for s in GEMV_SPARSITIES:
            t_sp = _time_sparse(K, N, s, batch, copy_gbs, compiled=True)
            t_fused = _time_sparse(K, N, s, batch, copy_gbs, fused=True) if batch == 1 else float("nan")
            t_masked = _time_sparse(K, N, s, batch, copy_gbs, fused=True, compact=False) if batch == 1 \
                else float("nan")
            n_bytes = int((1 - s) * K * N) * 2
            ideal = n_bytes / (copy_gbs * 1e9)
            t_floor = floor(n_bytes)
            t_model = t_fused if s >= kernels.COMPACT_MIN_SPARSITY else t_masked  # what a site at s runs
            rows.append(dict(K=K, N=N, sparsity=s, batch=batch, us_sparse=t_sp * 1e6, us_cublas=t_cublas * 1e6,
                             us_dense_kernel=t_kernel * 1e6, us_ideal=ideal * 1e6, speedup=t_dense / t_sp,
                             vs_ideal=t_sp / ideal, us_fused_compact=t_fused * 1e6,
                             us_fused_masked=t_masked * 1e6, fused_vs_ideal=t_model / ideal,
                             us_launch_floor=t_floor * 1e6, floor_vs_ideal=t_floor / ideal,
                             fused_vs_floor=t_model / t_floor))
            r = rows[-1]
            print(f"gemv {K:>5}->{N:<5} s={s:.2f} b={batch}: sparse {r['us_sparse']:7.1f} us  (fused: compact "
                  f"{r['us_fused_compact']:6.1f} us, masked {r['us_fused_masked']:6.1f} us, the model's "
                  f"{r['fused_vs_ideal']:.2f}x ideal, {r['fused_vs_floor']:.2f}x the launch floor)  cuBLAS "
                  f"{r['us_cublas']:7.1f} us  dense kernel {r['us_dense_kernel']:7.1f} us  "
                  f"ideal {r['us_ideal']:7.1f} us  launch floor {r['us_launch_floor']:6.1f} us "
                  f"({r['floor_vs_ideal']:.2f}x ideal)"
                  f"  speedup {r['speedup']:.2f}x  time/ideal {r['vs_ideal']:.2f}", flush=True)
    return rows


E2E = {  # name -> calibrate() keyword arguments (paper operating points)
    "teal25": dict(method="teal", sparsity=0.25), "teal40": dict(method="teal", sparsity=0.4),
    "teal50": dict(method="teal", sparsity=0.5), "teal70": dict(method="teal", sparsity=0.7),
    "cats50": dict(method="cats", sparsity=0.5),
    "scap": dict(method="scap", scap="up,zero,0.35,gate,zero,0.35,down,zero,0.55"),
    "m-countdown70": dict(method="m-countdown", sparsity=0.7),
    "d-countdown70": dict(method="d-countdown", sparsity=0.7, rank=512),
    "d-countdown-oracle70": dict(method="d-countdown-oracle", sparsity=0.7),
    # Top-Theta: thresholds from 1024-token calibration rows (n > 1024 uses the n = 1024 column)
    "top-theta": dict(attention="top-theta", k=128),
}


# row-name suffixes, e.g. teal50-nopdl, dense-nopdl
E2E_VARIANTS = ("unfused", "masked", "nopdl", "batchkernel", "cublas", "nodefer")


def split_row(name: str):
    """An --e2e row name as (base, variant): 'teal50-nopdl' -> ('teal50', 'nopdl'), 'top-theta' -> ('top-theta', '')."""
    base, _, suffix = name.rpartition("-")
    return (base, suffix) if suffix in E2E_VARIANTS else (name, "")


def bench_e2e(preset, names, copy_gbs, new_tokens, context=16, profile=False, batch=1):
    import calibrate as cal
    import kernels
    import sparsity as sp
    compact_min = kernels.COMPACT_MIN_SPARSITY
    max_union = sp.BATCH_KERNEL_MAX_UNION
    torch.manual_seed(0)
    model = random_model(ModelArgs.from_preset(preset), device="cuda", dtype=torch.bfloat16)
    step_bytes = gen.decode_step_bytes(model)
    rows, dense_tok_s = [], None
    for name in names:
        t0 = time.perf_counter()
        base, suffix = split_row(name)
        # dense-torch: dense with every kernel off (inductor's / cuBLAS's GEMVs, masked SDPA), as gpt-fast
        os.environ["ACTSPARSE_KERNELS"] = "0" if base == "dense-torch" else "1"
        # dense-sdpa: the gemv kernels, but the masked SDPA for decode attention at any cache length
        sp.DENSE_ATTENTION_KERNEL = base != "dense-sdpa"
        # <row>-unfused: batch-1 sparse GEMVs as norm op, input_sparse_gemv, partial sums + residual ops
        sp.FUSED_SPARSE_GEMV = suffix != "unfused"
        # <row>-masked: sparse_gemv walks every tile of x at every site (no kept-channel lists)
        kernels.COMPACT_MIN_SPARSITY = float("inf") if suffix == "masked" else compact_min
        # <row>-batchkernel / -cublas: at batch 2..8, input_sparse_gemv's batch kernel and gated_rows at every site /
        # cuBLAS at every site (sparsity.batch_kernel_pays)
        sp.BATCH_KERNEL_MAX_UNION = dict(batchkernel=1.0, cublas=-1.0).get(suffix, max_union)
        # <row>-nopdl: every kernel launched to wait for the previous one's end (no programmatic dependent launch)
        kernels.PDL = suffix != "nopdl"
        # <row>-nodefer: every sparse projection merges its own K chunks' sums (no deferred sums)
        sp.DEFER_SUMS = suffix != "nodefer"
        method = None  # the config's projection method (none: dense, attention-only rows), whose skipped bytes count
        if base in ("dense", "dense-torch", "dense-sdpa"):
            sp.apply(model, None)
            eff = 0.0
        else:
            kw = E2E[base]
            batches = torch.randint(0, model.config.vocab_size, (1, 1024) if "attention" in kw else (2, 64))
            cfg = cal.calibrate(model, batches, progress=False, **kw)
            method = cfg.header.get("method")
            eff = sp.effective_sparsity(model, cal.measure(model, cfg, batches), method) if method else 0.0
            sp.apply(model, cfg)
        t_cal = time.perf_counter() - t0
        torch._dynamo.reset()
        step = torch.compile(EAGER_STEP, mode="reduce-overhead", fullgraph=True)
        print(f"e2e {preset} {name} (context {context}, batch {batch}):", flush=True)
        s_per_step = time_decode(model, context=context, new_tokens=new_tokens, compiled_step=step, profile=profile,
                                 batch=batch, record=bool(method))
        # the fraction of weight bytes the timed decode's tokens skipped (the calibration batches' is eff)
        eff_decode = None
        if method:
            s_per_step, measured = s_per_step
            eff_decode = sp.effective_sparsity(model, measured, method)
        tok_s = batch / s_per_step  # tokens of all sequences
        dense_tok_s = dense_tok_s or (tok_s if name.startswith("dense") else None)
        rows.append(dict(preset=preset, method=name, context=context, batch=batch, tok_s=tok_s, effective_sparsity=eff,
                         decode_sparsity=eff_decode,
                         speedup_vs_dense=tok_s / dense_tok_s if dense_tok_s else float("nan"),
                         dense_gb_s_equiv=step_bytes * tok_s / batch / 1e9, calibrate_s=t_cal))
        r = rows[-1]
        print(f"e2e {preset} {name:>20}: {tok_s:7.1f} tok/s  speedup vs dense {r['speedup_vs_dense']:.2f}x  "
              f"effective sparsity {eff:.3f}" + (f" (decode {eff_decode:.3f})" if eff_decode is not None else "")
              + f"  (dense-equivalent {r['dense_gb_s_equiv']:.0f} GB/s, "
              f"copy {copy_gbs:.0f} GB/s)", flush=True)
    os.environ["ACTSPARSE_KERNELS"] = "1"
    sp.DENSE_ATTENTION_KERNEL = True
    sp.FUSED_SPARSE_GEMV = True
    kernels.COMPACT_MIN_SPARSITY = compact_min
    sp.BATCH_KERNEL_MAX_UNION = max_union
    kernels.PDL = True
    sp.DEFER_SUMS = True
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
    ap.add_argument("--batch-sweep", action="store_true",
                    help="sweep the batch 2..8 input-sparse GEMV's launch configurations (before --e2e)")
    ap.add_argument("--e2e", nargs="+", help=f"decode per method: dense dense-torch dense-sdpa {' '.join(E2E)} "
                                                  "(+ '-unfused': without kernels.sparse_gemv, '-masked': "
                                                  "sparse_gemv without the kept-channel list, '-nopdl': "
                                                  "no programmatic dependent launch, '-batchkernel' / '-cublas': "
                                                  "the batch kernels at every batch / cuBLAS from batch 2, "
                                                  "'-nodefer': each sparse projection merges its own sums)")
    ap.add_argument("--context", type=int, default=16, help="e2e: tokens in the cache before decoding")
    ap.add_argument("--batch", type=int, default=1,
                    help="e2e: sequences decoded together, tok/s counts all of them (at batch 2-8 a site takes the "
                         "batch kernels where the union of kept rows is small, else cuBLAS: "
                         "sparsity.batch_kernel_pays; beyond kernels.MAX_BATCH = 8, the PyTorch reference)")
    ap.add_argument("--profile", action="store_true",
                    help="e2e: print GPU time per kernel of a decode step and the step's critical path by kernel")
    ap.add_argument("--dense-sweep", action="store_true", help="sweep the dense gemv kernel's launch configurations")
    ap.add_argument("--gated-sweep", action="store_true", help="sweep gated_rows launch configurations")
    ap.add_argument("--attention", action="store_true", help="Top-Theta decode attention vs SDPA")
    ap.add_argument("--dense-attention", action="store_true", help="dense decode attention kernel vs masked SDPA")
    ap.add_argument("--attention-sweep", action="store_true", help="sweep theta_attention launch configurations")
    ap.add_argument("--space", nargs="+", default=[], metavar="SWEEP:AXIS=V1,V2",
                    help="override one axis of a sweep's space (sweeps: gemv, gemv_batch, attn, dense_attn), "
                         "e.g. gemv:programs_per_sm=2,3,4")
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense per-preset table")
    ap.add_argument("--floor", type=float, nargs="*", metavar="S",
                    help="the read floor: a step of pure read kernels, one per dependency, at these sparsities "
                         f"(default {' '.join(map(str, FLOOR_SPARSITIES))}) and at each --e2e row's effective sparsity "
                         "(measured over its decode)")
    ap.add_argument("--no-coordinate-descent", action="store_true",
                    help="inductor without coordinate-descent tuning: M=1 matmuls stay on cuBLAS")
    a = ap.parse_args()
    for spec in a.space:
        sweep, _, axis_values = spec.partition(":")
        axis, _, values = axis_values.partition("=")
        if sweep not in SPACES or axis not in SPACES[sweep] or not all(v.isdigit() for v in values.split(",")):
            ap.error(f"--space {spec}: expected SWEEP:AXIS=V1,V2 (integers) with SWEEP:AXIS one of "
                     + ", ".join(f"{k}:{ax}" for k, sp_ in SPACES.items() for ax in sp_))
        SPACES[sweep][axis] = tuple(int(v) for v in values.split(","))
    if a.batch < 1:
        ap.error(f"--batch {a.batch}: give the number of sequences decoded together, 1 or more")
    for v in a.floor or []:
        if not 0 <= v < 1:
            ap.error(f"--floor {v}: a sparsity is a fraction in [0, 1)")
    assert torch.cuda.is_available(), "bench.py needs a CUDA GPU"
    setup_inductor(not a.no_coordinate_descent)
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
    batch_tuning = sweep_gemv_batch(copy_gbs) if a.batch_sweep else None
    gated_tuning = sweep_gated(copy_gbs) if a.gated_sweep else None
    dense_tuning = sweep_dense(copy_gbs) if a.dense_sweep else None
    if a.gemv:
        floors = {}
        for b in a.gemv_batch:
            gemv += bench_gemv(copy_gbs, b, floors)
    attn_tuning = sweep_attention(copy_gbs) if a.attention_sweep else None
    attention = bench_attention(copy_gbs) if a.attention else []
    if a.dense_attention:
        attention += bench_dense_attention()
    if a.e2e:
        for p in a.presets:
            e2e += bench_e2e(p, a.e2e, copy_gbs, a.new_tokens, a.context, a.profile, a.batch)
    floor = []
    if a.floor is not None:
        for p in a.presets:
            floor += bench_floor(p, a.floor or FLOOR_SPARSITIES, a.context, copy_gbs, e2e)
    if a.json:
        import sparsity as sp
        results = dict(device=name, torch=torch.__version__, copy_gb_s=copy_gbs, tuning=tuning,
                       batch_tuning=batch_tuning, gated_tuning=gated_tuning, dense_tuning=dense_tuning,
                       attention_tuning=attn_tuning, dense=rows, gemv=gemv, attention=attention, e2e=e2e, floor=floor)
        sp.write_atomic(a.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))


if __name__ == "__main__":
    main()
