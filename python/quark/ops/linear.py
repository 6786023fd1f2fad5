"""Dense linear for decode-sized batches: quark.ops.linear(x, weight, bias) = F.linear.

At a few rows a linear layer is a GEMV: every weight is read once per call, so its speed is the rate
at which W streams from memory. The C++ kernels stream several weight rows per thread with register
accumulators: fp32 (csrc/quant/gemv_f32*; on the 2-core Zen 4 dev box, 32000 x 1024, ~25-29 GB/s at
1..4 rows where torch's F.linear reads 6-16, and still 1.4x at 16 rows) and bf16 (csrc/quant/gemv_bf16*:
x, W, bias and out all bf16, fp32 sums, one rounding; torch widens bf16 W in a compute-bound loop).
Other cases go to torch.nn.functional.linear, the right tool for them: more than MAX_ROWS rows (a
GEMM), non-CPU tensors or mixed dtypes, a non-contiguous weight, and autograd (no backward here).
"""
import torch
import torch.nn.functional as F

from quark import _C

MAX_ROWS = 16   # measured crossover (fp32): at 24-32 rows torch's GEMM is as fast, beyond it faster
_KERNELS = {torch.float32: _C.gemv_f32, torch.bfloat16: _C.gemv_bf16}   # weight dtype -> GEMV (same dtype x, bias, out)


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N), like torch.nn.functional.linear."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.ndim == 0 or x.shape[-1] != K:
        raise ValueError(f"x must have last dimension K={K} (weight has shape {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    # the checks below run on every decode projection: plain attribute reads, no device objects
    kernel = _KERNELS.get(weight.dtype)
    rows = x.numel() // K if K else 0
    if (kernel is None or not 0 < rows <= MAX_ROWS or x.dtype != weight.dtype or not (x.is_cpu and weight.is_cpu)
            or not weight.is_contiguous()
            or bias is not None and (bias.dtype != weight.dtype or not bias.is_cpu or not bias.is_contiguous())
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    out = torch.empty((*x.shape[:-1], N), dtype=weight.dtype)
    kernel(x.detach().reshape(rows, K).contiguous(), weight.detach(), None if bias is None else bias.detach(),
           out.view(rows, N))
    return out
