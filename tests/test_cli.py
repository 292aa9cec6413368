"""Bad input: one-line error, non-zero exit, no traceback, no partial files."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_line_error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0]


def test_missing_checkpoint():
    assert_one_line_error(run("generate.py", "--checkpoint", "checkpoints/does-not-exist"), "not found")


def test_unknown_preset():
    assert_one_line_error(run("generate.py", "--random-init", "Llama-9-1T"), "unknown preset", "Llama-3-8B")


def test_prompt_longer_than_max_sequence_length(smollm2_dir):
    p = run("generate.py", "--checkpoint", str(smollm2_dir), "--prompt", "word " * 9000, "--max-new-tokens", "5")
    assert_one_line_error(p, "exceeds the model's maximum sequence length 8192")


def test_unsupported_architecture_leaves_no_partial_files(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    out_root = tmp_path / "checkpoints"
    p = run("scripts/convert_hf_checkpoint.py", "--source", str(src), "--out-root", str(out_root))
    assert_one_line_error(p, "unsupported architecture 'GPT2LMHeadModel'")
    assert not out_root.exists() or list(out_root.iterdir()) == []


def test_missing_weights_leave_no_partial_files(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10}))
    out_root = tmp_path / "checkpoints"
    p = run("scripts/convert_hf_checkpoint.py", "--source", str(src), "--out-root", str(out_root))
    assert_one_line_error(p, "no weights")
    assert list(out_root.iterdir()) == []


@pytest.mark.parametrize("flags", [["--prompt", "The capital of France is"],
                                   ["--chat", "--prompt", "What is the capital of France?"]])
def test_generate_runs_on_embedded_model(smollm2_dir, flags):
    p = run("generate.py", "--checkpoint", str(smollm2_dir), "--max-new-tokens", "8", *flags)
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "tok/s" in p.stderr and "GB/s" in p.stderr and "peak memory" in p.stderr
    assert "add --compile" not in p.stderr  # the GPU's note (uncompiled decode is launch-bound there), not the CPU's


def test_generate_with_sparsity_reports_measured(smollm2_dir, tmp_path):
    p = run("calibrate.py", "--checkpoint", str(smollm2_dir), "--method", "cats", "--sparsity", "0.4",
            "--n-seqs", "2", "--seq-len", "64", "--out", str(tmp_path / "cats.sparsity"))
    assert p.returncode == 0, p.stderr
    g = run("generate.py", "--checkpoint", str(smollm2_dir), "--sparsity", str(tmp_path / "cats.sparsity"),
            "--max-new-tokens", "6", "--no-stop")
    assert g.returncode == 0, g.stderr
    assert "measured sparsity over generated tokens (tokens=all): mlp_coeff" in g.stderr
    assert "effective weight sparsity" in g.stderr


def test_sparsity_config_for_another_model(tmp_path):
    import torch
    import calibrate
    import sparsity
    from model import ModelArgs, Transformer
    tiny = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                                 intermediate_size=64, vocab_size=50))
    cfg = calibrate.calibrate(tiny, torch.randint(0, 50, (2, 16)), method="cats", sparsity=0.5, progress=False)
    sparsity.save_config(tmp_path / "tiny.sparsity", cfg)
    p = run("generate.py", "--sparsity", str(tmp_path / "tiny.sparsity"), "--max-new-tokens", "2")
    assert_one_line_error(p, "made for another model")
    (tmp_path / "junk.sparsity").write_bytes(b"\x00" * 50)
    assert_one_line_error(run("generate.py", "--sparsity", str(tmp_path / "junk.sparsity")), "corrupt")


def test_dump_activations_one_file_per_token(smollm2_dir, tmp_path):
    import calibrate
    import sparsity
    from model import load_model
    from tokenizer import get_tokenizer
    model, tok = load_model(smollm2_dir, dtype=torch_float32()), get_tokenizer(smollm2_dir)
    cfg = calibrate.calibrate(model, calibrate.token_batches(tok, calibrate.calibration_texts(), 1, 64),
                              method="teal", sparsity=0.5, progress=False)
    sparsity.save_config(tmp_path / "teal.sparsity", cfg)
    out = tmp_path / "trace"
    p = run("generate.py", "--checkpoint", str(smollm2_dir), "--sparsity", str(tmp_path / "teal.sparsity"),
            "--max-new-tokens", "6", "--no-stop", "--dump-activations", str(out), "--dump-tokens", "3")
    assert p.returncode == 0, p.stderr
    files = sorted(f.name for f in out.iterdir())
    assert files == ["token_0000.safetensors", "token_0001.safetensors", "token_0002.safetensors"]
    from safetensors.torch import load_file
    t = load_file(str(out / files[0]))
    assert t["layers.0.q"].shape == (1, 576) and t["layers.29.down"].shape == (1, 1536)
    zero_frac = float((t["layers.3.down"] == 0).float().mean())
    assert 0.2 < zero_frac < 0.8  # the sparsified input, not the dense one
    # eval.py: the last token of each scored request
    out2 = tmp_path / "trace_eval"
    p = run("eval.py", "--checkpoint", str(smollm2_dir), "--sparsity", str(tmp_path / "teal.sparsity"),
            "--tasks", "arc_easy", "--limit", "2", "--dump-activations", str(out2), "--dump-tokens", "3")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out2.iterdir()) == files
    t = load_file(str(out2 / files[1]))
    assert t["layers.29.down"].shape == (1, 1536) and 0.2 < float((t["layers.3.down"] == 0).float().mean()) < 0.8
    assert_one_line_error(run("eval.py", "--checkpoint", str(smollm2_dir), "--tasks", "arc_easy",
                              "--dump-activations", str(out2)), "needs --sparsity")
    from scripts.plot import plot_histograms
    (png,) = plot_histograms(out2, tmp_path / "plots")
    assert png.name == "histograms.png" and png.stat().st_size > 5000


def torch_float32():
    import torch
    return torch.float32


def test_bench_space_overrides_one_axis():
    """bench.py --space narrows one axis of a sweep (checked before any GPU is needed); a wrong
    sweep, axis or value is a one-line usage error naming the valid ones."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    assert bench.configs(dict(a=(1, 2), b=(3,))) == [dict(a=1, b=3), dict(a=2, b=3)]
    assert len(bench.configs(bench.SPACES["dense_attn"])) == 2 * 3 * 3 * 2 * 2
    for bad in ("gemv:foo=1", "nope:block_n=64", "gemv:block_n=", "gemv:block_n=6x"):
        p = run("scripts/bench.py", "--space", bad)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"--space {bad}: expected SWEEP:AXIS=V1,V2" in p.stderr and "gemv:programs_per_sm" in p.stderr
    assert "gemv_batch:num_stages" in p.stderr  # the batch sweep's axes are named too
    p = run("scripts/bench.py", "--batch", "0")  # also before any GPU is needed
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--batch 0: give the number of sequences" in p.stderr


def test_bench_read_floor_counts_and_reads_every_byte():
    """bench.py --floor: floor_reads lists what a batch-1 decode step reads, one kernel per dependency
    (per layer q/k/v, attention's K and V rows, o, gate+up, down; then the LM head), the projections
    at their (1 - s) share; the read kernel sums exactly the words it is given, however they split
    over programs and blocks; launch_floor's spans (one GEMV's bytes, launch after launch) wrap around
    the ring without re-reading the previous launch's region."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from model import ModelArgs, random_model
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=100)
    model = random_model(args, device="cpu", dtype=torch.bfloat16)
    names = ("wqkv", "wo", "gate", "up", "down", "output")
    weights = sum(p.numel() * 2 for n, p in model.named_parameters() if n.split(".")[-2] in names)
    reads = bench.floor_reads(args, 0.0, 0)
    assert len(reads) == 5 * 3 + 1 and sum(reads) == weights and reads[-1] == 2 * 100 * 64
    kv = 2 * 7 * 2 * 16 * 2  # K and V rows: 7 positions x 2 KV heads x 16 dims, bf16
    assert bench.floor_reads(args, 0.0, 7)[1] == kv and bench.floor_reads(args, 0.5, 7)[1] == kv
    half = bench.floor_reads(args, 0.5, 0)
    assert sum(half) - half[-1] == (weights - reads[-1]) // 2 and half[-1] == reads[-1]
    spans = bench.floor_spans(bench.floor_reads(args, 0.37, 5), 10_000)
    assert [w for _, w in spans] == [n // 4 for n in bench.floor_reads(args, 0.37, 5)]
    assert all(at % 1024 == 0 and at + w <= 10_000 for at, w in spans) and spans[0][0] == 0
    assert all(a1 >= a0 + w0 or a1 == 0 for (a0, w0), (a1, _) in zip(spans, spans[1:]))  # in turn, wrapping
    spans = bench.floor_spans([12_000] * 16, 10_000)  # launch_floor: one GEMV's bytes, launch after launch
    assert [w for _, w in spans] == [3000] * 16 and {at for at, _ in spans} == {0, 3072, 6144}
    assert all(a1 >= a0 + w0 or a1 + w1 <= a0 for (a0, w0), (a1, w1) in zip(spans, spans[1:]))  # never the last's
    w = torch.randint(0, 1000, (1000,), dtype=torch.int32)
    for n, programs, block in ((1000, 3, 64), (937, 4, 128), (64, 2, 64)):
        out = torch.full((programs,), -1, dtype=torch.int32)
        bench._read_kernel[(programs,)](w, out, n, BLOCK=block, PDL=False)
        assert int(out.sum()) == int(w[:n].sum()), (n, programs, block)
    p = run("scripts/bench.py", "--floor", "0.5", "1.0")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--floor 1.0: a sparsity is a fraction" in p.stderr


def test_bench_e2e_row_names():
    """bench.py --e2e rows: a method or dense row, optionally with one variant suffix; hyphens inside
    a method's own name (top-theta, d-countdown70) are not variants."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    assert bench.split_row("teal50-nopdl") == ("teal50", "nopdl")
    assert bench.split_row("dense-nopdl") == ("dense", "nopdl")
    assert bench.split_row("d-countdown70-masked") == ("d-countdown70", "masked")
    assert bench.split_row("teal50-batchkernel") == ("teal50", "batchkernel")
    assert bench.split_row("m-countdown70-cublas") == ("m-countdown70", "cublas")
    assert bench.split_row("top-theta") == ("top-theta", "")
    assert bench.split_row("dense-sdpa") == ("dense-sdpa", "")
    for name in ("teal50", "top-theta", "d-countdown-oracle70", "scap-unfused", "top-theta-nopdl"):
        assert bench.split_row(name)[0] in bench.E2E


def test_bench_time_decode_records_its_decode():
    """bench.time_decode(record=True): the sites' sparsity over an eager decode of the timed prompt, the decode steps
    only (the prompt is prefilled dense): the same numbers as generate(record_decode=True) on that prompt."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    import calibrate as cal
    import generate as gen
    import sparsity as sp
    from model import ModelArgs, random_model
    torch.manual_seed(0)
    model = random_model(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96,
                                   vocab_size=61), device="cpu", dtype=torch.float32)
    cfg = cal.calibrate(model, torch.randint(0, 61, (2, 16)), progress=False, method="teal", sparsity=0.5)
    sp.apply(model, cfg)
    torch.manual_seed(1)
    sec, measured = bench.time_decode(model, context=5, new_tokens=4, reps=1, record=True)
    torch.manual_seed(1)
    prompt = torch.randint(0, 61, (1, 5), dtype=torch.int)
    gen.generate(model, prompt[0], max_new_tokens=5, dense_prefix=5, record_decode=True)
    expected = sp.stop_recording(model)
    assert sec > 0 and sorted(measured) == [0, 1] and measured == expected
    assert 0.2 < sp.effective_sparsity(model, measured, "teal") < 0.8


def test_bench_critical_path_charges_each_kernel_its_increment():
    """bench.critical_path: launches that overlap (PDL) are charged the time by which each moves the latest end, so
    the shares sum to the span of the steps; a kernel launched several times per layer is split by its place in the
    layer; an idle gap goes to the kernel after it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    # 2 steps x 2 layers: per layer gemv (q/k/v), attn, gemv (o), then a head per step
    ks, t = [], 0.0
    for step in range(2):
        for layer in range(2):
            ks += [("gemv", t, t + 10), ("attn", t + 8, t + 13), ("gemv", t + 12, t + 20)]
            t += 20
        ks.append(("head", t + 1, t + 6))  # 1 idle before it
        ks.append(("gemv", t + 6, t + 7))  # the same kernel once more after the layers
        t += 7
    rows = {r[0]: r for r in bench.critical_path(ks, 2, 2)}
    assert set(rows) == {"gemv #0", "attn", "gemv #1", "head", "gemv (after the layers)"}
    assert rows["gemv (after the layers)"][1:] == (1, 1.0, 1.0, 1.0)
    assert rows["gemv #0"][1:] == (2, 10.0, 10.0, 20.0)  # the first of all: its whole run; later: from the o's end
    assert rows["attn"][1:] == (2, 3.0, 5.0, 6.0)
    assert rows["gemv #1"][1:] == (2, 7.0, 8.0, 14.0)
    assert rows["head"][1:] == (1, 6.0, 5.0, 6.0)
    assert sum(r[4] for r in rows.values()) * 2 == ks[-1][2] - ks[0][1]
    # a launch wholly inside an earlier one adds nothing; kernels not per layer keep their bare name
    rows = {r[0]: r for r in bench.critical_path([("a", 0, 10), ("b", 2, 5), ("a", 9, 12)], 1, 4)}
    assert rows["b"][2] == 0.0 and rows["a"][1:] == (2, 6.0, 6.5, 12.0)
    rows = {r[0]: r for r in bench.critical_path([("a", 0, 10), ("copy", 10, 11), ("a", 11, 20)], 2, 1)}
    assert rows["copy"][1:] == (0.5, 1.0, 1.0, 0.5)  # in one step of two
