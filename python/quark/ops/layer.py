"""The small ops of a decode step around its GEMVs and attention, one C++ call each (csrc/layer):
rmsnorm (with the residual add before it) and rope_store (rotary embedding of q and k, and k/v written
into a slot KV cache). Each replaces 8-15 torch ops, and at batch 1 those ops
are the step's overhead: every one runs cold, after a GEMV has streamed megabytes through the caches.
The arithmetic is quark.model.gpt's, op by op: bf16 tensors round after every op as torch does.

The kernels get the tensors' addresses (importing a tensor as an array costs ~10 us of Python, far more
than these ops), so every check is here: CPU, float32 or bfloat16 (caches also int8), contiguous,
shapes that agree, cache positions in range; a failure raises ValueError (TypeError for a non-tensor)
naming the argument. rope_store is CPU only (the slot caches live there); rmsnorm runs its torch form
on other devices. (SwiGLU stays two torch ops: their vectorized exp beats a scalar one here.)
"""
import torch

from quark import _C

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _check(name, t, shape=None, dtypes=(torch.float32, torch.bfloat16)):
    """t's dtype code after checking that it is a contiguous CPU tensor of one of dtypes (and shape)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if not t.is_cpu or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor of {' or '.join(str(d) for d in dtypes)}, got "
                         f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return _CODES.get(t.dtype)


def rmsnorm(x, weight, eps, residual=None, out=None):
    """x (M, d) -> out (M, d) = x / sqrt(mean(x^2) + eps) * weight, in x's dtype (quark.model.gpt.RMSNorm).
    With residual (M, d), x += residual first, in place: x is the residual stream of a block."""
    if out is None:
        out = torch.empty_like(x)
    if not x.is_cpu:
        if residual is not None:
            x.add_(residual)
        xf = x.float()
        return out.copy_((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, d), got shape {tuple(x.shape)}")
    M, d = x.shape
    code = _check("x", x)
    for name, t, shape in (("weight", weight, (d,)), ("out", out, (M, d)), ("residual", residual, (M, d))):
        if t is not None and (_check(name, t, shape) != code):
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    _C._rmsnorm(0 if residual is None else residual.data_ptr(), x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                code, M, d, float(eps))
    return out


def rope_store(qkv, cos, sin, pos, q_out, k_cache, v_cache, k_scale=None, v_scale=None):
    """One new token per slot b < n. qkv (n, (H + 2 Hkv) D): each token's q, k, v side by side; cos,
    sin (n, D/2) float32; pos (n,) int64. Writes q rotated into q_out (n, H, D), k rotated and v into
    k_cache / v_cache (slots, Hkv, Smax, D) at [b, :, pos[b]]; an int8 cache also gets its per-row scale
    in k_scale / v_scale (slots, Hkv, Smax), as quark.ops.quantize_kv computes it."""
    if not isinstance(q_out, torch.Tensor) or q_out.ndim != 3:
        raise ValueError(f"q_out must be a 3-D tensor (n, H, D), got {getattr(q_out, 'shape', type(q_out).__name__)}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.ndim != 4:
        raise ValueError(f"k_cache must be a 4-D tensor (slots, Hkv, Smax, D), got "
                         f"{getattr(k_cache, 'shape', type(k_cache).__name__)}")
    n, H, D = q_out.shape
    slots, Hkv, Smax, Dk = k_cache.shape
    if D % 2 or not 0 < D <= 1024 or Dk != D or n > slots:
        raise ValueError(f"q_out {tuple(q_out.shape)} and k_cache {tuple(k_cache.shape)} must agree on an even "
                         f"head_dim <= 1024, with no more tokens than slots")
    dt = _check("qkv", qkv, (n, (H + 2 * Hkv) * D))
    q_dt = _check("q_out", q_out)
    _check("cos", cos, (n, D // 2), (torch.float32,))
    _check("sin", sin, (n, D // 2), (torch.float32,))
    _check("pos", pos, (n,), (torch.int64,))
    cache_dt = _check("k_cache", k_cache, dtypes=tuple(_CODES))
    _check("v_cache", v_cache, tuple(k_cache.shape), (k_cache.dtype,))
    int8 = k_cache.dtype == torch.int8
    if int8 != (k_scale is not None and v_scale is not None):
        raise ValueError("an int8 cache needs k_scale and v_scale (from quantize_kv); a float cache takes neither")
    if int8:
        _check("k_scale", k_scale, (slots, Hkv, Smax), (torch.float32,))
        _check("v_scale", v_scale, (slots, Hkv, Smax), (torch.float32,))
    positions = pos.tolist()
    if n and not (min(positions) >= 0 and max(positions) < Smax):
        raise ValueError(f"pos outside the cache's [0, {Smax}): {positions}")
    _C._rope_store(qkv.data_ptr(), dt, cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), n, H, Hkv, D, Smax,
                   q_out.data_ptr(), q_dt, k_cache.data_ptr(), v_cache.data_ptr(), cache_dt,
                   k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0)
