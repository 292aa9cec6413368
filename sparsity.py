"""Activation sparsity, called inline from model.py at each marked site.

Every function here takes the site's config (or None) last. With None it is
the dense computation, written exactly as a dense model would write it, so a
model with no sparsity config traces to the dense graph.

Sites (model.py):
  attention input  -> sparse_qkv        (q/k/v projection input)
  attention scores -> sparse_attention  (softmax(q k^T) rows)
  attention output -> sparse_linear     (o projection input)
  MLP input / MLP intermediate -> sparse_mlp (gate/up input, down input)
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def sparse_linear(x: Tensor, linear: torch.nn.Linear, site=None) -> Tensor:
    """y = linear(x), or with a site config the thresholded input (see ThresholdSite)."""
    if site is None:
        return linear(x)
    raise NotImplementedError("sparse sites arrive with the sparsity-methods issue")


def sparse_qkv(x: Tensor, wqkv: torch.nn.Linear, attn_sparsity=None) -> Tensor:
    """Fused q/k/v projection of the attention input."""
    if attn_sparsity is None or attn_sparsity.qkv is None:
        return wqkv(x)
    raise NotImplementedError("sparse sites arrive with the sparsity-methods issue")


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask, input_pos, attn_sparsity=None) -> Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, H, S, D); k, v: (B, Hkv, L, D); mask: bool (1, 1, S, L) or None for causal
    over S == L. Returns (B, H, S, D).
    """
    if attn_sparsity is None or attn_sparsity.scores is None:
        return dense_attention(q, k, v, mask)
    raise NotImplementedError("sparse sites arrive with the sparsity-methods issue")


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    # GQA without copying the cache: fold each KV group's query heads into the row
    # dimension, (B, H, S, D) -> (B, Hkv, rep*S, D); row r*S + s is query s of head r.
    rep = H // Hkv
    q = q.reshape(B, Hkv, rep * S, D)
    mask = mask.repeat(1, 1, rep, 1) if rep > 1 else mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.view(B, H, S, D)


def sparse_mlp(x: Tensor, ffn, mlp_sparsity) -> Tensor:
    raise NotImplementedError("sparse sites arrive with the sparsity-methods issue")
