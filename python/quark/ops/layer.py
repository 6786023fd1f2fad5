"""The small ops of a decode step around its GEMVs and attention, one C++ call each (csrc/layer):
rmsnorm (with the residual add before it), rope_store (rotary embedding of q and k, and k/v written
into a slot KV cache) and silu_mul (SwiGLU). Each replaces 5-15 torch ops, and at batch 1 those ops
are the step's overhead: every one runs cold, after a GEMV has streamed megabytes through the caches.
The arithmetic is quark.model.gpt's, op by op: bf16 tensors round after every op as torch does.

float32 or bfloat16 tensors; the binding checks shapes, dtypes and bounds and raises ValueError naming
the argument. rope_store is CPU only (the slot caches live there); rmsnorm and silu_mul run their torch
forms on other devices.
"""
import torch
import torch.nn.functional as F

from quark import _C


def _cpu(*tensors):
    return all(t.device.type == "cpu" for t in tensors)


def rmsnorm(x, weight, eps, residual=None, out=None):
    """x (M, d) -> out (M, d) = x / sqrt(mean(x^2) + eps) * weight, in x's dtype (quark.model.gpt.RMSNorm).
    With residual (M, d), x += residual first, in place: x is the residual stream of a block."""
    if out is None:
        out = torch.empty_like(x)
    if _cpu(x, weight, out):
        _C.rmsnorm(residual, x, weight, out, float(eps))
        return out
    if residual is not None:
        x.add_(residual)
    xf = x.float()
    out.copy_((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight)
    return out


def rope_store(qkv, cos, sin, pos, q_out, k_cache, v_cache, k_scale=None, v_scale=None):
    """One new token per slot b < n. qkv (n, (H + 2 Hkv) D): each token's q, k, v side by side; cos,
    sin (n, D/2) float32; pos (n,) int64. Writes q rotated into q_out (n, H, D), k rotated and v into
    k_cache / v_cache (slots, Hkv, Smax, D) at [b, :, pos[b]]; an int8 cache also gets its per-row scale
    in k_scale / v_scale (slots, Hkv, Smax), as quark.ops.quantize_kv computes it."""
    _C.rope_store(qkv, cos, sin, pos, q_out, k_cache, v_cache, k_scale, v_scale)


def silu_mul(gu, out=None):
    """gu (M, 2F) = [gate | up] -> (M, F) = silu(gate) * up, in gu's dtype."""
    if out is None:
        out = torch.empty((gu.shape[0], gu.shape[1] // 2), dtype=gu.dtype, device=gu.device)
    if _cpu(gu, out):
        _C.silu_mul(gu, out)
        return out
    g, u = gu.chunk(2, -1)
    out.copy_(F.silu(g) * u)
    return out
