"""Dense fp32 linear for decode-sized batches: quark.ops.linear(x, weight, bias) = F.linear.

At a few rows a linear layer is a GEMV: every weight is read once per call, so its speed is the rate
at which W streams from memory. The C++ kernel (csrc/quant/gemv_f32*) streams several weight rows per
thread with register accumulators: on the 2-core Zen 4 dev box, 32000 x 1024 fp32, it reads ~25-29
GB/s at 1..4 rows where torch's F.linear reads 6-16, and still beats it 1.4x at 16 rows (8-row chunks,
W read twice). Other cases go to torch.nn.functional.linear, the right tool for them: more than
MAX_ROWS rows (a GEMM), non-CPU or non-fp32 tensors, a non-contiguous weight, and autograd (the
kernel has no backward).
"""
import torch
import torch.nn.functional as F

from quark import _C

MAX_ROWS = 16   # measured crossover: at 24-32 rows torch's GEMM is as fast, beyond it faster


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
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    rows = x.numel() // K if K else 0
    fast = (0 < rows <= MAX_ROWS
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and weight.is_contiguous() and (bias is None or bias.is_contiguous())
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
    if not fast:
        return F.linear(x, weight, bias)
    x2 = x.detach().reshape(rows, K).contiguous()
    out = torch.empty((rows, N), dtype=torch.float32)
    _C.gemv_f32(x2, weight.detach(), None if bias is None else bias.detach(), out)
    return out.reshape(*x.shape[:-1], N)
