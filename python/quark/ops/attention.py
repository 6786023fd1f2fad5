"""Attention entry points: causal/non-causal prefill with GQA, and decode over a KV cache.

Dispatch: CPU tensors -> C++ kernels (csrc/attention), CUDA -> Triton (ops/triton), else the
reference. Until a fast path lands for a device, that device uses torch's SDPA / the reference.
"""
import torch
import torch.nn.functional as F

from quark.ops import reference


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def attention(q, k, v, causal=True, scale=None):
    """q (B, Hq, S, D), k/v (B, Hkv, S, D) -> (B, Hq, S, D). Differentiable."""
    _check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None):
    """q (B, Hq, D), caches (B, Hkv, Smax, D), cache_seqlens (B,) int -> (B, Hq, D)."""
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
