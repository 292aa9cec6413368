"""GPU benchmarks, all ratios taken in one run on one device.

    python scripts/bench.py                                   # copy bandwidth + dense decode, Llama-3-8B
    python scripts/bench.py --presets Llama-3-8B Llama-2-7B --new-tokens 128

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["Llama-3-8B"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "bench.py needs a CUDA GPU"
    setup_inductor()
    name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {name}, torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    for p in a.presets:
        r = bench_dense(p, copy_gbs, a.new_tokens, compile=not a.no_compile)
        rows.append(r)
        print(f"{p:>14}: {r['tok_s']:7.1f} tok/s  {r['gb_s']:7.0f} GB/s  step {r['step_gb']:.2f} GB  "
              f"limit {r['ideal_tok_s']:6.1f} tok/s  achieved/copy = {r['ratio_to_copy']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=name, copy_gb_s=copy_gbs, dense=rows), indent=2))


if __name__ == "__main__":
    main()
