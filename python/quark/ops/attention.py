"""Attention entry points: causal/non-causal prefill with GQA (differentiable), and decode of one
new token per sequence over a KV cache (float32, bfloat16 or int8 with per-token scales).

Dispatch: CPU tensors run the C++ kernels in csrc/attention (FlashAttention-2-style tiles with an
online softmax, O(S*D) memory; backward recomputes the scores), CUDA tensors the Triton kernels in
quark.ops.triton (when triton is installed), other devices torch's SDPA / the reference in
quark.ops.reference.

Conventions (shared with the reference): q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Hq % Hkv == 0 (GQA/MQA);
the causal mask aligns the last query with the last key, so Sq < Sk continues a cached prefix; a query
that sees no key gets zeros (no NaN), and so does a cache row of length 0.
"""
import torch
import torch.nn.functional as F
from torch.utils.dlpack import to_dlpack

from quark import _C
from quark.ops import reference
from quark.ops import triton as triton_ops

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_cpu(name, t, dtypes=_CPU_DTYPES):
    """The C++ kernels read tensors in place: wrong dtype or layout is an error, never a silent copy."""
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names} on CPU, got {str(t.dtype).replace('torch.', '')}; convert it "
                        f"first (e.g. {name}.float())")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")


def _check_qkv(q, k, v):
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


class _AttentionCPU(torch.autograd.Function):
    """C++ forward saving the row log-sum-exp; C++ backward recomputing P block by block."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out = torch.empty_like(q)                                   # (B, Hq, Sq, D)
        need_grad = any(ctx.needs_input_grad[:3])
        lse = torch.empty(q.shape[:3], dtype=torch.float32) if need_grad else None   # (B, Hq, Sq)
        _C.attention_forward(q, k, v, out, lse, scale, causal)
        if need_grad:
            ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.to(q.dtype).contiguous()
        dq = torch.empty(q.shape, dtype=torch.float32)
        dk = torch.empty(k.shape, dtype=torch.float32)
        dv = torch.empty(v.shape, dtype=torch.float32)
        _C.attention_backward(q, k, v, out, dout, lse, dq, dk, dv, ctx.scale, ctx.causal)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def attention(q, k, v, causal=True, scale=None):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Hq, Sq, D), softmax(scale * q k^T) v. Differentiable.

    scale defaults to D ** -0.5. On CPU: float32 or bfloat16 (fp32 accumulation), contiguous inputs.
    """
    _check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.device.type == "cuda" and triton_ops.available() and q.dtype in _GPU_DTYPES and q.shape[-1] <= 256:
        from quark.ops.triton.attention import attention as attention_triton
        return attention_triton(q, k, v, causal, scale)
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_cpu(name, t)
    return _AttentionCPU.apply(q, k, v, bool(causal), scale)


def quantize_kv(x):
    """Symmetric int8 quantization of new cache rows, one scale per (token, head): x (..., D) float ->
    (int8 (..., D), float32 scale (...)) with x ~= q * scale[..., None]. Append both to the cache:
    k_cache[b, :, pos] = kq; k_scale[b, :, pos] = ks."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0                                   # (...)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _lengths(cache_seqlens, B, Smax):
    lengths = torch.as_tensor(cache_seqlens).to(device="cpu", dtype=torch.int64).contiguous()
    if lengths.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape ({B},), got {tuple(lengths.shape)}")
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > Smax):
        raise ValueError(f"cache_seqlens must lie in [0, {Smax}] (the cache length), got {lengths.tolist()}")
    return lengths


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, k_scale=None, v_scale=None):
    """One new token per sequence: q (B, Hq, D) over caches (B, Hkv, Smax, D) holding cache_seqlens[b]
    valid positions -> (B, Hq, D) in q's dtype. A sequence of length 0 gets zeros.

    Caches are float32, bfloat16, or int8 with k_scale / v_scale (B, Hkv, Smax) float32 from quantize_kv.
    """
    # Fast path, a decode step's case (once per layer per token): CPU tensors and int64 lengths go
    # straight to the binding, whose checks (shapes, dtypes, layout, lengths within the cache) cover the
    # ones below; whatever it refuses takes the checked path, which raises the error naming the argument.
    # The tensors go as DLPack capsules (see quark.ops.quant._run_kernel: ~10 us of Python saved per
    # tensor), which drop a negative-view bit, so such views take the checked path.
    tensors = (q, k_cache, v_cache, cache_seqlens) + ((k_scale, v_scale) if k_scale is not None else ())
    if (all(type(t) is torch.Tensor and t.is_cpu and not t.is_neg() for t in tensors)
            and cache_seqlens.dtype is torch.int64 and q.ndim == 3 and (k_scale is None) == (v_scale is None)):
        try:
            out = torch.empty_like(q)
            scales = (None, None) if k_scale is None else (to_dlpack(k_scale), to_dlpack(v_scale))
            _C.decode_attention(to_dlpack(q), to_dlpack(k_cache), to_dlpack(v_cache), *scales, to_dlpack(cache_seqlens),
                                to_dlpack(out), q.shape[2] ** -0.5 if scale is None else float(scale))
            return out
        except (TypeError, ValueError, RuntimeError):   # RuntimeError: to_dlpack of a non-strided tensor
            pass
    _check_tensor("q", q, 3)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    B, Hq, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    Hkv, Smax = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} must agree on batch and head_dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of cache heads ({Hkv})")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    quantized = k_cache.dtype == torch.int8
    if quantized != (k_scale is not None and v_scale is not None):
        raise ValueError("an int8 cache needs both k_scale and v_scale (from quantize_kv); a float cache takes neither")
    if quantized:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check_tensor(name, s, 3)
            if tuple(s.shape) != (B, Hkv, Smax):
                raise ValueError(f"{name} must have shape {(B, Hkv, Smax)}, got {tuple(s.shape)}")
    scale = D ** -0.5 if scale is None else float(scale)
    lengths = _lengths(cache_seqlens, B, Smax)
    if (q.device.type == "cuda" and triton_ops.available() and q.dtype in _GPU_DTYPES
            and k_cache.dtype in (q.dtype, torch.int8)):
        from quark.ops.triton.decode_attention import decode_attention as decode_triton
        return decode_triton(q, k_cache, v_cache, lengths.to(q.device), scale, k_scale, v_scale)
    if q.device.type != "cpu":
        return reference.decode_attention(q, k_cache, v_cache, lengths.to(q.device), scale, k_scale, v_scale)
    _check_cpu("q", q)
    _check_cpu("k_cache", k_cache, _CPU_DTYPES + (torch.int8,))
    _check_cpu("v_cache", v_cache, _CPU_DTYPES + (torch.int8,))
    if quantized:
        _check_cpu("k_scale", k_scale, (torch.float32,))
        _check_cpu("v_scale", v_scale, (torch.float32,))
    out = torch.empty_like(q)
    _C.decode_attention(q, k_cache, v_cache, k_scale, v_scale, lengths, out, scale)
    return out
