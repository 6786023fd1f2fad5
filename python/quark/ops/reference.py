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


def _wide(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rmsnorm(x, weight, eps=1e-6):
    """x (..., C), weight (C,) -> x * rsqrt(mean(x^2) + eps) * weight in x's dtype (fp32 math)."""
    xf = x.to(_wide(x))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)).to(x.dtype)


def rope(x, cos, sin):
    """Rotate-half RoPE (quark.model.gpt.apply_rope): x (B, H, S, D), cos/sin (S, D/2) or (B, S, D/2)."""
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]                                     # (B, 1, S, D/2)
    xf = x.to(_wide(x))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def swiglu(a, b):
    """silu(a) * b in a's dtype (fp32 math)."""
    af = a.to(_wide(a))
    return (torch.nn.functional.silu(af) * b.to(af.dtype)).to(a.dtype)


def fused_linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(x @ weight.T + bias, target): x (N, C), weight (V, C), target (N,) int; the
    logits are materialised in fp32 (the unfused baseline). Targets equal to ignore_index add nothing;
    "mean" divides by the number of the others."""
    logits = x.to(_wide(x)) @ weight.to(_wide(x)).T
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


_M64 = (1 << 64) - 1


def _fmix64(k):
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def _bytes_hash(data):
    h = 0xCBF29CE484222325
    for k in range(0, len(data), 8):
        v = int.from_bytes(bytes(data[k:k + 8]).ljust(8, b"\0"), "little")
        h = ((h ^ v) * 0x9FB21C651E98DF25) & _M64
        h ^= h >> 32
    return _fmix64(h ^ len(data))


def _splitmix_stream(state):
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        yield z ^ (z >> 31)


def minhash_shingles(text, ngram=5, unit="word"):
    """The set of 64-bit shingle hashes of one document (see csrc/text/minhash.h)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if unit == "word":
        words, cur = [], bytearray()
        for c in data + b" ":
            if c >= 0x80 or chr(c).isascii() and chr(c).isalnum():
                cur.append(c + 32 if 65 <= c <= 90 else c)
            elif cur:
                words.append(_bytes_hash(cur))
                cur = bytearray()
        stream = _splitmix_stream(0x9E3779B97F4A7C15)
        mul = [next(stream) | 1 for _ in range(ngram)]
        span = min(len(words), ngram)
        return {_fmix64(sum(w * m for w, m in zip(words[j:j + span], mul)) & _M64)
                for j in range(len(words) - span + 1 if words else 0)}
    starts = [i for i, c in enumerate(data) if c & 0xC0 != 0x80]
    span = min(len(starts), ngram)
    bounds = starts + [len(data)]
    return {_bytes_hash(data[bounds[j]:bounds[j + span]]) for j in range(len(starts) - span + 1 if starts else 0)}


def minhash_params(num_perm, seed=0):
    """(a, b) of the permutations h_i(x) = a_i x + b_i mod 2^64, from splitmix64(seed)."""
    stream, a, b = _splitmix_stream(seed), [], []
    for _ in range(num_perm):
        a.append(next(stream) | 1)
        b.append(next(stream))
    return a, b


def minhash(texts, num_perm=128, ngram=5, seed=0, unit="word"):
    """Same contract as quark.ops.minhash, in plain Python (slow; for tests)."""
    a, b = minhash_params(num_perm, seed)
    out = np.full((len(texts), num_perm), _M64, dtype=np.uint64)
    for d, text in enumerate(texts):
        shingles = minhash_shingles(text, ngram, unit)
        if shingles:
            out[d] = [min((ai * s + bi) & _M64 for s in shingles) for ai, bi in zip(a, b)]
    return out


def dequantize(qt):
    """Same contract as quark.ops.dequantize: QuantizedTensor -> float32 weights (N, K). int4 bytes
    hold, per block of 32 columns, column j in the low nibble of byte j and column j + 16 in the high one."""
    N, K = qt.shape
    if qt.scheme != "int4":
        return qt.data.float() * qt.scales.float()[:, None]
    Kp = qt.data.shape[1] * 2                                                   # K padded to whole groups
    blocks = qt.data.view(N, Kp // 32, 16).long()
    q = torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(N, Kp // qt.group_size, qt.group_size).float()
    return ((q - qt.zeros.float()[..., None]) * qt.scales.float()[..., None]).reshape(N, Kp)[:, :K]


def quantize_activations(x):
    """Same contract as quark.ops.quant.quantize_activations: x (M, K) float32 -> per-row symmetric int8
    (q, scale (M,)), q = round(x * 127 / max|x|). Rows whose 127 / max|x| overflows float32 are scaled by
    2^100 first (exact), and the division is done as the kernel does it, 127 / (max|x| * pre)."""
    amax = x.abs().amax(dim=1)
    tiny = (amax > 0) & (amax < 127.0 / torch.finfo(torch.float32).max)
    pre = torch.where(tiny, torch.full_like(amax, 2.0**100), torch.ones_like(amax))
    denom = torch.where(amax > 0, amax * pre, torch.ones_like(amax))
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / denom, torch.zeros_like(amax))
    return torch.round(x * pre[:, None] * inv[:, None]).to(torch.int8), amax / torch.full_like(amax, 127.0)


def qlinear(x, qt, bias=None):
    """Same contract as quark.ops.qlinear: x (..., K) @ dequantize(qt).T + bias in x's dtype; "w8a8"
    first quantizes x per row to int8 exactly as the kernel does."""
    w = dequantize(qt).to(x.device)
    xf = x.float().reshape(-1, x.shape[-1])
    if qt.scheme == "w8a8":
        q, s = quantize_activations(xf)
        xf = q.float() * s[:, None]
    y = xf @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


def linear(x, weight, bias=None):
    """Same contract as quark.ops.linear: x (..., K) @ weight.T + bias, in x's dtype (float64 in tests)."""
    y = x @ weight.T
    return y if bias is None else y + bias
