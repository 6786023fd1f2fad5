"""Python side of the CUDA C++ kernels in csrc/cuda (built only with QUARK_CUDA=ON): argument checks
that name the problem, output/workspace allocation, and the current torch stream.

quark.ops routes CUDA tensors to the Triton kernels by default; these hand-written kernels are the
second implementation the GPU benchmark compares against (benchmarks/bench_gpu.py).
"""
import torch

from quark import _C
from quark.ops.quant import pad_to_packed


def available():
    """True when the extension was built with QUARK_CUDA=ON and torch sees a CUDA device."""
    return hasattr(_C, "cuda_decode_attention") and torch.cuda.is_available()


def _require(name, t, dtypes):
    if not available():
        raise RuntimeError("the CUDA C++ kernels need a CUDA device and Quark built with QUARK_CUDA=ON "
                           "(QUARK_CUDA=ON pip install -e .)")
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, splits=None):
    """q (B, Hq, D), caches (B, Hkv, Smax, D) in q's dtype, D in {64, 128, 256} -> (B, Hq, D)."""
    _require("q", q, _FLOATS)
    _require("k_cache", k_cache, (q.dtype,))
    _require("v_cache", v_cache, (q.dtype,))
    B, Hq, D = q.shape
    lengths = torch.as_tensor(cache_seqlens, device=q.device).to(torch.int64).contiguous()
    splits = splits or _C.cuda_decode_splits(B, Hq, k_cache.shape[2])
    workspace = torch.empty(_C.cuda_decode_workspace_floats(B, Hq, D, splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _C.cuda_decode_attention(q, k_cache, v_cache, lengths, out, workspace, D ** -0.5 if scale is None else float(scale),
                             splits, torch.cuda.current_stream(q.device).cuda_stream)
    return out


def int4_gemv(x, qt, bias=None):
    """x (M, K) with M <= 8, qt an int4 quark.ops.QuantizedTensor on the GPU -> (M, N) in x's dtype."""
    _require("x", x, _FLOATS)
    if qt.scheme != "int4":
        raise ValueError(f"qt must be an int4 QuantizedTensor, got scheme {qt.scheme!r}")
    if x.ndim != 2 or x.shape[1] != qt.shape[1] or not 1 <= x.shape[0] <= 8:
        raise ValueError(f"x must be (M, {qt.shape[1]}) with 1 <= M <= 8, got {tuple(x.shape)}")
    out = torch.empty((x.shape[0], qt.shape[0]), dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32).contiguous()
    _C.cuda_int4_gemv(pad_to_packed(x, qt).contiguous(), qt.data, qt.scales, qt.zeros, b, out, qt.group_size,
                      torch.cuda.current_stream(x.device).cuda_stream)
    return out
