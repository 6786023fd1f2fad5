"""Plain torch/numpy oracles for every kernel: the fallback on devices without a fast path, and
the reference the tests compare against (run in float64 there)."""
import numpy as np
import torch


def _as_torch(a):
    return (torch.from_numpy(a), True) if isinstance(a, np.ndarray) else (a, False)


def pairwise_distance(x, y, metric="l2"):
    """Same contract as quark.ops.pairwise_distance, in the input's own dtype."""
    xt, was_np = _as_torch(x)
    yt, _ = _as_torch(y)
    dot = xt @ yt.T
    if metric == "l2":
        out = ((xt * xt).sum(1)[:, None] + (yt * yt).sum(1)[None, :] - 2 * dot).clamp_min(0)
    elif metric == "ip":
        out = -dot
    elif metric == "cosine":
        den = xt.norm(dim=1)[:, None] * yt.norm(dim=1)[None, :]
        out = torch.where(den > 0, 1 - dot / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(dot))
    else:
        raise ValueError(f"metric must be 'l2', 'ip' or 'cosine', got {metric!r}")
    return out.numpy() if was_np else out


def attention(q, k, v, causal=True, scale=None):
    """q (B, Hq, S, D), k/v (B, Hkv, S, D) -> (B, Hq, S, D); GQA when Hq % Hkv == 0.
    Causal masking aligns the last query with the last key (so Sq < Sk continues a prefix)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale                                   # (B, Hq, Sq, Sk)
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(diagonal=Sk - Sq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)        # fully masked rows -> 0
    return p @ v


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, k_scale=None, v_scale=None):
    """One new token per sequence: q (B, Hq, D) over caches (B, Hkv, Smax, D) holding
    cache_seqlens[b] valid positions -> (B, Hq, D). A sequence of length 0 gets zeros.
    int8 caches are dequantized with k_scale / v_scale (B, Hkv, Smax): x = q * scale."""
    B, Hq, D = q.shape
    Hkv, Smax = k_cache.shape[1], k_cache.shape[2]
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32         # fp32 math unless asked for fp64
    k, v = k_cache.to(wide), v_cache.to(wide)
    if k_scale is not None:
        k = k * k_scale.to(k.dtype)[..., None]
        v = v * v_scale.to(v.dtype)[..., None]
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bhd,bhsd->bhs", q.to(wide), k) * scale                    # (B, Hq, Smax)
    lengths = torch.as_tensor(cache_seqlens, device=q.device).long()
    valid = torch.arange(Smax, device=q.device)[None, :] < lengths[:, None]       # (B, Smax)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                                  # length 0 -> zeros
    return torch.einsum("bhs,bhsd->bhd", p, v).to(q.dtype)
