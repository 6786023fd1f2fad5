"""RMSNorm forward and backward in Triton: y = x * rsqrt(mean(x^2) + eps) * w over the last dim.

Forward: one program per row (the whole row in registers, BLOCK_C = next power of two of C), fp32
math, saves 1/rms per row (N floats) for backward instead of the normalised activations.
Backward: dx = r * (g - x * r^2 * mean(g * x)) with g = dy * w; dw = sum_rows dy * x * r. Each program
walks a contiguous range of rows and keeps its dw partial in registers; the (programs, C) partials
are summed by torch, so no atomics and a deterministic result.
Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019); Liger-Kernel rms_norm.
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret, next_pow2


@triton.jit
def _fwd_kernel(X, W, Y, RSTD, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
    tl.store(Y + row * C + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(DY, X, W, RSTD, DX, DW_PART, N, C, rows_per_program, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    start = pid * rows_per_program
    base = start.to(tl.int64) * C                                # int64: N * C may pass 2^31
    for row in range(start, tl.minimum(start + rows_per_program, N)):
        x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        g = dy * w
        dx = rstd * (g - x * (rstd * rstd * tl.sum(g * x, 0) / C))
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x * rstd
        base += C
    tl.store(DW_PART + pid * C + cols, dw, mask=mask)


def _programs(device, N):
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(N, 4 * sms))


def _warps(C):
    return min(16, max(1, triton.next_power_of_2(C) // 256))


def rmsnorm_forward(x2, weight, eps):
    N, C = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(N, dtype=torch.float32, device=x2.device)
    if N:
        _fwd_kernel[(N,)](x2, weight, y, rstd, C, eps, BLOCK_C=next_pow2(C), num_warps=_warps(C))
    return y, rstd


def rmsnorm_backward(dy2, x2, weight, rstd):
    N, C = x2.shape
    dx = torch.empty_like(x2)
    P = _programs(x2.device, N)
    rows = triton.cdiv(N, P) if N else 0
    part = torch.zeros((P, C), dtype=torch.float32, device=x2.device)
    if N:
        _bwd_kernel[(P,)](dy2, x2, weight, rstd, dx, part, N, C, rows, BLOCK_C=next_pow2(C), num_warps=_warps(C))
    return dx, part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()               # (N, C)
        w = weight.contiguous()
        y, rstd = rmsnorm_forward(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy.reshape(x2.shape).contiguous(), x2, w, rstd)
        return dx.view(dy.shape), dw, None


def rmsnorm(x, weight, eps=1e-6):
    """x (..., C), weight (C,) -> (..., C) in x's dtype; differentiable in x and weight."""
    check_cuda_or_interpret("x", x)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    return RMSNormFunction.apply(x, weight, float(eps))
