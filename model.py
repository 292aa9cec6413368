"""A Llama-family decoder in plain PyTorch, gpt-fast style.

One file: `ModelArgs` (read from a Hugging Face `config.json`, or a named preset
with real shapes), `KVCache`, `Transformer`, `TransformerBlock`, `Attention`,
`FeedForward`, `RMSNorm` and the RoPE helpers. Covers Llama-2/3/3.1/3.2,
Mistral, SmolLM (llama, tied embeddings) and Qwen2 (q/k/v bias).

Prefill and single-token decode go through the same `Transformer.forward`.
With caches set up (`setup_caches`) keys and values go into a static cache at
`input_pos`; without, the call is a plain causal forward over `idx` (used by
evaluation and calibration).

Sparsity: every place where an activation-sparsity method acts is marked
`# SPARSITY SITE` and calls one function of `sparsity.py` with this module's
`sparsity` attribute (a plain config object or None). With None every call
returns its input untouched and Python's `if` removes it from the traced
graph, so a dense model compiles to exactly the dense graph.

Names: projections are `wqkv` (fused q/k/v, as gpt-fast), `wo`, and the MLP's
`gate`, `up`, `down` (gpt-fast's w1, w3, w2).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

import kernels
import sparsity as sp

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Hugging Face's dict: llama3 or linear
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v carry a bias
    sliding_window: Optional[int] = None  # Mistral v0.1: 4096
    architecture: str = "LlamaForCausalLM"
    name: str = "custom"

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "custom") -> "ModelArgs":
        """Build from a Hugging Face config.json dict (no name matching)."""
        archs = config.get("architectures") or [config.get("model_type", "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} in config.json; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        n_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        # transformers >= 5 writes "rope_parameters" (theta inside); older files rope_theta/rope_scaling.
        rope = config.get("rope_parameters") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = (rope if rope.get("rope_type", "default") != "default" else None) or config.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} in config.json; "
                                 "supported: llama3, linear")
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        return cls(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or config.get("attention_bias", False),
            sliding_window=window,
            architecture=arch,
            name=name,
        )

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_hf_config(PRESETS[name], name=name)

    @classmethod
    def from_checkpoint_dir(cls, path: Path) -> "ModelArgs":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {path}; convert a checkpoint first "
                                    "(scripts/convert_hf_checkpoint.py)")
        return cls.from_hf_config(json.loads(config_path.read_text()), name=Path(path).name)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


def _llama(dim, layers, heads, kv, ffn, vocab, theta, ctx, scaling=None, tie=False, arch="LlamaForCausalLM",
           **extra):
    return dict(architectures=[arch], hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab, rope_theta=theta,
                max_position_embeddings=ctx, rope_scaling=scaling, tie_word_embeddings=tie,
                rms_norm_eps=1e-5, **extra)


_LLAMA31_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
_LLAMA32_SCALING = dict(_LLAMA31_SCALING, factor=32.0)

# Real shapes for benchmarks with random weights (values from the released config.json files).
PRESETS = {
    "Llama-2-7B": _llama(4096, 32, 32, 32, 11008, 32000, 10000.0, 4096),
    "Llama-2-13B": _llama(5120, 40, 40, 40, 13824, 32000, 10000.0, 4096),
    "Llama-3-8B": _llama(4096, 32, 32, 8, 14336, 128256, 500000.0, 8192),
    "Llama-3.1-8B": _llama(4096, 32, 32, 8, 14336, 128256, 500000.0, 131072, _LLAMA31_SCALING),
    "Llama-3.2-1B": _llama(2048, 16, 32, 8, 8192, 128256, 500000.0, 131072, _LLAMA32_SCALING, tie=True),
    "Mistral-7B": _llama(4096, 32, 32, 8, 14336, 32000, 10000.0, 32768, arch="MistralForCausalLM",
                         sliding_window=4096),
    "Llama-3-70B": _llama(8192, 80, 64, 8, 28672, 128256, 500000.0, 8192),
    "SmolLM2-135M": _llama(576, 30, 9, 3, 1536, 49152, 100000.0, 8192, tie=True),
}


class KVCache(nn.Module):
    """Static cache, (batch, n_kv_heads, max_seq_len, head_dim), written at input_pos."""

    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # input_pos: (S,), k/v: (B, n_kv_heads, S, head_dim)
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k
        self.v_cache[:B, :, input_pos] = v
        return self.k_cache[:B], self.v_cache[:B]


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_len = -1
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, dtype=torch.bool), persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_len: int):
        """Allocate the static KV cache and the RoPE tables for max_seq_len positions."""
        if max_seq_len == self.max_seq_len and max_batch_size <= self.max_batch_size:
            return
        c = self.config
        dtype, device = self.output.weight.dtype, self.output.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, c.n_kv_heads, c.head_dim,
                                               dtype).to(device)
        self.setup_rope(max_seq_len)
        i = torch.arange(max_seq_len, device=device)
        mask = i[:, None] >= i[None, :]
        if c.sliding_window is not None:
            mask &= (i[:, None] - i[None, :]) < c.sliding_window
        self.causal_mask = mask
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def setup_rope(self, n_positions: int):
        if self.rope_cos.shape[0] >= n_positions:
            return
        device = self.output.weight.device
        cos, sin = rope_tables(self.config, n_positions, device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None, dense_prefix: int = 0) -> Tensor:
        """idx: (B, S) token ids. input_pos: (S,) positions in the KV cache, or None for a
        cache-less causal forward over positions 0..S-1. Rows at positions < dense_prefix
        skip activation sparsity (the prompt under the `decode` token policy).
        Returns logits (B, S, vocab)."""
        B, S = idx.shape
        if input_pos is None:
            self.setup_rope(S)
            positions = torch.arange(S, device=idx.device)
            mask = None
        else:
            assert self.max_seq_len > 0, "call setup_caches() before a forward with input_pos"
            positions = input_pos
            mask = self.causal_mask[None, None, input_pos]  # (1, 1, S, max_seq_len)
        # A GPU decode step: its keys lo <= j < hi, found once for every layer's attention kernel.
        decode_kernels = mask is not None and S == 1 and kernels.enabled(idx)
        window = sp.visible_window(mask, sp.n_counters(self.config, B)) if decode_kernels else None
        dense_rows = positions < dense_prefix if dense_prefix > 0 else None  # (S,) bool
        if decode_kernels:  # the kernels read row input_pos of the tables themselves: no gather, no cast
            cos, sin = self.rope_cos, self.rope_sin
        else:
            cos = self.rope_cos[positions].to(self.output.weight.dtype)
            sin = self.rope_sin[positions].to(self.output.weight.dtype)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, dense_rows, window)
        return self.output(x, norm=self.norm)  # output(norm(x))

    @classmethod
    def from_preset(cls, name: str) -> "Transformer":
        return cls(ModelArgs.from_preset(name))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, dense_rows=None, window=None):
        # h = x + attention(attention_norm(x)); returns h + feed_forward(ffn_norm(h)). Each
        # sublayer gets its norm and adds its own residual, so that a dense GPU decode step runs
        # the RMSNorm inside its first GEMV and the residual add inside its last one.
        h = self.attention(x, self.attention_norm, cos, sin, mask, input_pos, dense_rows, window)
        return self.feed_forward(h, self.ffn_norm, dense_rows, window)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        total = config.q_size + 2 * config.kv_size
        self.wqkv = Linear(config.dim, total, bias=config.attention_bias)
        self.wo = Linear(config.q_size, config.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.sparsity = None  # sparsity.AttentionSparsity or None

    def forward(self, x, norm, cos, sin, mask, input_pos, dense_rows=None, window=None):
        """x + attention(norm(x)); x: (B, S, dim) the residual stream."""
        c = self.config
        B, S, _ = x.shape
        cache = self.kv_cache
        # GPU decode step: RoPE on q and k (cos, sin: the whole tables), and k, v written into the cache
        # at input_pos, by the projection's kernel (batch 1: in its epilogue), which returns RoPE(q) (B, H, D).
        rope = (cos, sin, input_pos, cache.k_cache, cache.v_cache, c.n_heads) \
            if window is not None and cache is not None else None
        # GPU decode of a layer with every projection sparse: the fp32 buffer that the q/k/v kernel copies x into
        # and the o projection adds its sums into (deferred sums, see sparsity.DEFER_SUMS); else None.
        h = sp.deferred_residual(x, self.sparsity, window)
        if self.sparsity is None or self.sparsity.qkv is None:
            qkv = self.wqkv(x, norm=norm, rope=rope)  # wqkv(norm(x)): one fused GEMM (on GPU decode, norm included)
        else:
            # SPARSITY SITE: attention input (q/k/v input; TEAL, SCAP): wqkv(threshold(norm(x))),
            # on GPU decode one kernel with the norm inside.
            qkv = sp.sparse_qkv(x, self.wqkv, self.sparsity, dense_rows, norm, window, rope, x_copy=h)
        if rope is not None:
            q = qkv[:, :, None]  # (B, H, 1, D)
            k, v = cache.k_cache[:B], cache.v_cache[:B]
        else:
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = q.view(B, S, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, S, D)
            k = k.view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
            v = v.view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.kv_cache is not None and input_pos is not None:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, max_seq_len, D)
        # SPARSITY SITE: attention scores (Top-Theta, top-k). Dense: SDPA.
        y = sp.sparse_attention(q, k, v, mask, self.sparsity, dense_rows, window)  # (B, H, S, D)
        y = y.transpose(1, 2).reshape(B, S, c.q_size)
        if self.sparsity is None or self.sparsity.o is None:
            return self.wo(y, residual=x)  # x + wo(y)
        # SPARSITY SITE: attention output (o_proj input; TEAL, SCAP): x + wo(threshold(y)).
        return sp.sparse_linear(y, self.wo, self.sparsity.o, self.sparsity.stats, "o", dense_rows, residual=x,
                                window=window, acc=h)


class FeedForward(nn.Module):
    """SwiGLU: y = down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.gate = Linear(config.dim, config.intermediate_size, bias=False)
        self.up = Linear(config.dim, config.intermediate_size, bias=False)
        self.down = Linear(config.intermediate_size, config.dim, bias=False)
        self.sparsity = None  # sparsity.MLPSparsity or None

    def forward(self, x, norm, dense_rows=None, window=None):
        """x + mlp(norm(x)); x: (B, S, dim) the residual stream."""
        if self.sparsity is None:
            # SiLU(gate(norm(x))) * up(norm(x)), then x + down(.); on GPU decode two kernels in all.
            return self.down(kernels.swiglu(x, self.gate, self.up, norm), residual=x)
        # SPARSITY SITES: MLP input (gate/up input) and MLP intermediate (down input);
        # which activations are zeroed is the method's choice, see sparsity.sparse_mlp (on GPU
        # decode the norm and the residual add run inside its kernels).
        return sp.sparse_mlp(x, self, self.sparsity, dense_rows, norm, residual=x, window=window)


class Linear(nn.Linear):
    """nn.Linear whose batch-1 decode step on GPU runs kernels.gemv (a tuned GEMV, measured
    closer to copy bandwidth than cuBLAS's and inductor's on the Llama shapes, with the RMSNorm
    before it and the residual add after it fused in); F.linear otherwise."""

    def forward(self, x: Tensor, norm=None, residual: Optional[Tensor] = None, rope=None) -> Tensor:
        """[residual +] linear(norm(x)); norm (an RMSNorm) and residual are folded into the
        kernel on the GPU decode path, and so are q/k/v's RoPE and cache write (rope, see kernels.linear)."""
        return kernels.linear(x, self.weight, self.bias, norm, residual, rope)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the scale, as Hugging Face Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelArgs) -> Tensor:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3 (Llama-3.1 report, sec. 3.3): keep high frequencies, divide low frequencies by
    # `factor`, and blend smoothly in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


def rope_tables(config: ModelArgs, n_positions: int, device=None):
    """cos/sin tables (n_positions, head_dim) in fp32, rotate-half layout (Hugging Face)."""
    inv_freq = rope_inv_freq(config).to(device)
    t = torch.arange(n_positions, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, S, D); cos/sin: (S, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def load_model(checkpoint_dir, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Build on the meta device and assign the mmapped weights: no double memory."""
    checkpoint_dir = Path(checkpoint_dir)
    weights = checkpoint_dir / "model.pth"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.pth in {checkpoint_dir}; convert a checkpoint first "
                                "(python scripts/prepare.py for the default model, or "
                                "scripts/convert_hf_checkpoint.py)")
    config = ModelArgs.from_checkpoint_dir(checkpoint_dir)
    with torch.device("meta"):
        model = Transformer(config)
    state = torch.load(weights, mmap=True, weights_only=True, map_location="cpu")
    expected = set(model.state_dict().keys())
    if config.tie_word_embeddings:
        expected.discard("output.weight")
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(f"model.pth in {checkpoint_dir} does not match its config.json "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                         "re-run the converter")
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # Buffers made on meta must be re-made for real.
    model.rope_cos = torch.empty(0)
    model.rope_sin = torch.empty(0)
    model.causal_mask = torch.empty(0, dtype=torch.bool)
    return model.to(device=device, dtype=dtype).eval()


def random_model(config: ModelArgs, device="cpu", dtype=torch.bfloat16, seed=0) -> Transformer:
    """A model with random weights at real shapes, built directly on the device (benchmarks)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()
