"""Rotary position embedding in Triton, the rotate-half layout of quark.model.gpt.apply_rope:
x = [x1, x2] (halves of the head dim) -> [x1 cos - x2 sin, x1 sin + x2 cos].

One program per (batch * head, block of positions); cos/sin are (S, D/2), or (B, S, D/2) for
per-sequence positions (decode with ragged lengths), read through strides so a (B, 1, S, D/2) view
costs nothing. Backward is the inverse rotation (sin -> -sin), the same kernel.
Reference: Su et al., "RoFormer" (2021).
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret, next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, Y, H, S, sxb, sxh, sxs, syb, syh, sys_, scb, scs, sign,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_H)
    mask = (offs_s[:, None] < S) & (offs_d[None, :] < HALF)
    x_ptr = X + b * sxb + h * sxh + offs_s[:, None] * sxs + offs_d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    c_off = b * scb + offs_s[:, None] * scs + offs_d[None, :]
    cos = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32) * sign
    y_ptr = Y + b * syb + h * syh + offs_s[:, None] * sys_ + offs_d[None, :]
    tl.store(y_ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, (x1 * sin + x2 * cos).to(Y.dtype.element_ty), mask=mask)


def _apply(x, cos, sin, sign):
    B, H, S, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty((B, H, S, D), dtype=x.dtype, device=x.device)
    scb = cos.stride(0) if cos.ndim == 3 else 0                  # (S, D/2) broadcasts over batch
    BLOCK_S = 16
    if y.numel():
        _rope_kernel[(B * H, triton.cdiv(S, BLOCK_S))](x, cos, sin, y, H, S, *x.stride()[:3], *y.stride()[:3],
                                                       scb, cos.stride(-2), sign, HALF=D // 2,
                                                       BLOCK_H=next_pow2(D // 2, lo=1), BLOCK_S=BLOCK_S)
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _apply(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _apply(dy, cos, sin, -1.0), None, None


def rope(x, cos, sin):
    """x (B, H, S, D) with D even; cos/sin (S, D/2), (B, S, D/2) or (B, 1, S, D/2) -> (B, H, S, D) in
    x's dtype. Differentiable in x."""
    check_cuda_or_interpret("x", x)
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be (B, H, S, D) with an even D, got shape {tuple(x.shape)}")
    B, H, S, D = x.shape
    if cos.ndim == 4:                                            # (B, 1, S, D/2) from the model's decode path
        cos, sin = cos[:, 0], sin[:, 0]
    want = [(S, D // 2), (B, S, D // 2)]
    if tuple(cos.shape) not in want or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must both have shape (S, D/2) = {want[0]} or (B, S, D/2) = {want[1]}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return RoPEFunction.apply(x, cos, sin)
