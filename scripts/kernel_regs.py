"""Registers and spills of the decode-path Triton kernels at the current launch tuning,
compiled for an H100 (sm_90a) on any machine: no GPU needed, only the ptxas that ships in
Triton's wheel. A kernel that spills in its hot loop, or that needs so many registers that
few programs fit on an SM, is latency-bound whatever its tile sizes say; this shows it
before a GPU visit.

    python scripts/kernel_regs.py             # Llama-3-8B shapes
    python scripts/kernel_regs.py --warps 4   # also: every kernel at 4 warps
    python scripts/kernel_regs.py --loops     # also: SASS instructions per iteration of each loop

A GEMV walk that issues many instructions per weight tile is slow even when it reads few rows
(session 12's timeline); --loops counts them (nvdisasm, also from Triton's wheel), which is how
session 14 found the bf16 unpacking and address arithmetic worth removing.

Shapes: Llama-3-8B (dim 4096, 32 / 8 heads of 128, intermediate 14336), batch 1, bf16.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402

H100_SMS = 132
F32, BF16, I32, I64 = "*fp32", "*bf16", "*i32", "*i64"
FLOATS = {"eps", "scale", "t"}
# Integer arguments that are multiples of 16 at the Llama-3-8B shapes. A launch specialises such
# arguments (and 16-byte aligned pointers) as divisible by 16, which is what lets loads
# vectorise and the software pipeliner use async copies; compiled without it, sparse_gemv
# looked like 168-255 registers where it runs at 123-128 (session 9). COUNT, a slice of the
# step's window tensor at an 8-byte offset, is the one pointer left unaligned, and the attention
# stats' strides (6 floats per key chunk) the strides left unspecialised.
DIV16 = {"K", "N", "N_OUT", "col2", "k_per_prog", "q_cols"}
ROPE = dict(COS=F32, SIN=F32, POS=I64, KC=BF16, VC=BF16)  # the RoPE epilogue: cos / sin tables, pos, caches


def resident(regs: int, shared: int, num_warps: int) -> int:
    """Programs of this size an H100 SM holds at once: 64K registers allocated per warp in
    units of 256, 228 KB of shared memory (1 KB reserved per block), 64 warps, 32 blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 233472 // (shared + 1024), 64 // num_warps, 32)


def run_on_file(argv: list, data, suffix: str) -> subprocess.CompletedProcess:
    """argv with the path of a temporary file holding data (str or bytes) appended, its output
    captured; the file removed afterwards."""
    with tempfile.NamedTemporaryFile("wb" if isinstance(data, bytes) else "w", suffix=suffix, delete=False) as f:
        f.write(data)
    try:
        return subprocess.run([*argv, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)


def loop_sizes(cubin: bytes) -> list:
    """SASS instructions per iteration of each loop in the kernel (from a backward branch's target
    to the branch), in code order, from the disassembly."""
    run = run_on_file([knobs.nvidia.nvdisasm.path, "-c"], cubin, ".cubin")
    run.check_returncode()
    sass = run.stdout
    labels, code, pending = {}, [], []
    for line in sass.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            code.append((int(m.group(1), 16), m.group(2)))
            labels.update((label, code[-1][0]) for label in pending)
            pending = []
    sizes = []
    for addr, ins in code:
        m = re.search(r"\bBRA\b.*\.(L_x_\d+)", ins)
        if m and labels.get(m.group(1), addr) < addr:
            sizes.append(sum(labels[m.group(1)] <= a <= addr for a, _ in code))
    return sizes


def compile_stats(fn, pointers: dict, constexprs: dict, num_warps: int, programs: int, num_stages: int = 3,
                  loops: bool = False) -> str:
    """ptxas -v's registers and spill bytes for fn compiled with these constexprs, how many
    programs fit on an SM, and in how many waves a grid of `programs` runs on the H100
    (loops: and the instructions per iteration of each loop, loop_sizes)."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in FLOATS else "i32")
           for n in fn.arg_names}
    div16 = [n for n in fn.arg_names if (n in pointers and n != "COUNT") or n in DIV16
             or (n.startswith("stride_") and not n.startswith("stride_s"))]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    # The ptxas Triton itself uses (TRITON_PTXAS_PATH or the wheel's), whose version the PTX follows: with
    # the wheel's binary hard-coded, this exited 255 under pytest on the GPU machine (session 9); with
    # Triton's own, the test passed there (session 10). ptxas's message comes with a failure.
    ptxas = get_ptxas(90).path
    run = run_on_file([str(ptxas), "-v", "--gpu-name", "sm_90a", "-o", os.devnull], ptx, ".ptx")
    if run.returncode != 0:
        raise RuntimeError(f"{ptxas} exited {run.returncode} on {fn.__name__}: {(run.stderr + run.stdout)[-800:]}")
    out = run.stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    fit = resident(regs, k.metadata.shared, num_warps)
    return (f"{regs:>3} registers, {spill:>4} B spilled, {k.metadata.shared:>6} B shared: {fit:>2} programs/SM, "
            f"grid {programs:>4} = {programs / (fit * H100_SMS):4.2f} waves"
            + (f"; loop instructions {loop_sizes(k.asm['cubin'])}" if loops else ""))


def sparse_gemv_cases():
    """kernels.sparse_gemv as the model launches it at each Llama-3-8B site (masked and compact; q/k/v with
    RoPE and the cache write in its epilogue, sparse_gemv_rope, and without), and with deferred sums
    (sparsity.DEFER_SUMS: q/k/v and gate+up reading the fp32 stream and writing its copy, gate+up's sums
    unmerged, o and down through sparse_gemv_add, down forming SiLU(g) * u from gate+up's 2 chunks)."""
    defer_qkv = dict(round_x=True, copy_x=True)
    for name, K, n_out, norm, swiglu, residual, head_d, defer in (
            ("qkv + RoPE", 4096, 6144, True, False, False, 128, {}),
            ("qkv", 4096, 6144, True, False, False, 0, {}),
            ("o", 4096, 4096, False, False, True, 0, {}),
            ("gate+up", 4096, 14336, True, True, False, 0, {}),
            ("down", 14336, 4096, False, False, True, 0, {}),
            ("qkv + RoPE, deferred", 4096, 6144, True, False, False, 128, defer_qkv),
            ("o, deferred (add)", 4096, 4096, False, False, False, 0, dict(add=True)),
            ("gate+up, deferred (parts)", 4096, 14336, True, True, False, 0, dict(defer_qkv, parts=True)),
            ("down, deferred (add, SiLU(g) * u)", 14336, 4096, False, False, False, 0, dict(glu_x=2, add=True))):
        for compact in (False, True):
            grid, _, meta = kernels.sparse_gemv_launch(K, n_out, kernels.GEMV_TUNING["block_n"], None, norm, False,
                                                       swiglu, False, residual, compact, True, head_d, **defer)
            x = F32 if defer.get("round_x") or defer.get("glu_x") else BF16
            y = F32 if defer.get("add") or defer.get("parts") else BF16
            yield (f"sparse_gemv {name} {'compact' if compact else 'masked'} (split {grid[1]})",
                   kernels._sparse_gemv_kernel,
                   dict(X=x, G=BF16, WT=BF16, T=F32, M=F32, SHIFT=F32, R=BF16, P=F32, COUNT=I32, S=I32, Y=y, XC=F32,
                        **ROPE), grid, dict(meta, stride_wk=2 * n_out if swiglu else n_out))


def batch_cases(B=4):
    """input_sparse_gemv's batch kernel (decode at batch 2..8) at the Llama-3-8B shapes, GEMV_BATCH_TUNING."""
    for name, K, N in (("qkv", 4096, 6144), ("gate+up", 4096, 28672), ("down", 14336, 4096)):
        grid, meta = kernels.input_sparse_gemv_launch(B, K, N, kernels.GEMV_TUNING["block_n"], None, False, False)
        yield (f"input_sparse_gemv {name}, batch {B} (split {grid[1]})", kernels._input_sparse_gemv_kernel,
               dict(X=BF16, WT=BF16, T=F32, M=F32, Y=F32), grid, meta)


def gated_cases():
    """gated_rows at batch 1 (GATED_TUNING, x and rows as 32-bit pairs) over the Llama-3-8B MLP's 14336 rows: one
    weight (CATS, M-COUNTDOWN) and two (D-COUNTDOWN)."""
    tn = kernels.GATED_TUNING
    for mode, label in ((0, "CATS / M-COUNTDOWN"), (2, "D-COUNTDOWN")):
        yield (f"gated_rows {label}, batch 1", kernels._gated_rows_kernel,
               dict(X=BF16, W1=BF16, W2=BF16, P=BF16, Y=F32), (14336 // tn["block_n"],),
               dict(MODE=mode, B_PAD=1, BLOCK_N=tn["block_n"], BLOCK_K=tn["block_k"], PACKED=True,
                    num_warps=tn["num_warps"]))


def attention_cases(L=8192):
    """decode_attention (dense, chunks merged in-kernel) and theta_attention (the chunks' states, their merge)."""
    for dense in (True, False):
        tn = kernels.attention_tuning(dense)
        n_split = kernels.attention_splits(1, 8, L, None, dense=dense)
        grid, meta = kernels.attention_launch(1, 32, 8, 128, n_split, torch.bfloat16, dense, 0)
        label = f"decode_attention, merge_block {tn['merge_block']}" if dense else "theta_attention"
        yield (f"{label}, block_l {tn['block_l']}, {L} keys", kernels._theta_attention_kernel,
               dict(Q=BF16, K=BF16, V=BF16, THETA=F32, LOHI=I32, DENSE_ROW=I32, ACC=F32, STATS=F32, COUNT=I32,
                    OUT=BF16), grid, dict(meta, HAS_DENSE_ROW=False))
    n_split = kernels.attention_splits(1, 8, L, None)
    grid, meta = kernels.theta_merge_launch(1, 32, 128, n_split)
    yield (f"theta_attention's merge, {n_split} chunks, {meta['CHUNKS']} per load", kernels._theta_merge_kernel,
           dict(ACC=F32, STATS=F32, THETA=F32, LOHI=I32, DENSE_ROW=I32, V=BF16, OUT=BF16), grid,
           dict(meta, SDC=2, HAS_DENSE_ROW=False))


def gemv_cases():
    """kernels.gemv (dense decode GEMV with the norm / residual / SwiGLU fused)."""
    for name, n_out, swiglu, norm, residual, head_d in (("dense qkv + RoPE", 6144, False, True, False, 128),
                                                        ("dense qkv", 6144, False, True, False, 0),
                                                        ("dense gate/up", 14336, True, True, False, 0),
                                                        ("dense down", 4096, False, False, True, 0)):
        grid, meta = kernels.gemv_launch(n_out, swiglu, norm, residual, head_d)
        pointers = dict(X=BF16, W1=BF16, W2=BF16, G=BF16, R=BF16, Y=BF16, XN=BF16, **ROPE)
        yield name, kernels._gemv_kernel, pointers, grid, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warps", type=int, nargs="*", default=[], help="also compile every kernel at these num_warps")
    ap.add_argument("--loops", action="store_true", help="also count the SASS instructions per loop iteration")
    a = ap.parse_args()
    kernels._num_sms = lambda device: H100_SMS  # split-K / key-chunk counts as on the H100 (no GPU here)
    print(f"Triton {triton.__version__}, sm_90a, {H100_SMS} SMs; registers per thread (255 max), spill stores")
    for label, fn, pointers, grid, meta in (*gemv_cases(), *sparse_gemv_cases(), *batch_cases(), *gated_cases(),
                                            *attention_cases()):
        c = dict(meta, PDL=True)  # programmatic dependent launch, as on the H100
        warps = c.pop("num_warps")
        stages = c.pop("num_stages", 3)
        for w in dict.fromkeys([warps, *a.warps]):
            print(f"{label:<70} {w} warps: {compile_stats(fn, pointers, c, w, math.prod(grid), stages, a.loops)}",
                  flush=True)


if __name__ == "__main__":
    main()
