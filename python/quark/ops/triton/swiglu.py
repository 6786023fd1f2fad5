"""SwiGLU gate in Triton: y = silu(a) * b (the Llama MLP between w1/w3 and w2), fused forward and
backward so neither silu(a) nor the sigmoid is stored: backward recomputes them from a and b.

d/da silu(a) = s + a * s * (1 - s) with s = sigmoid(a); da = dy * b * that, db = dy * silu(a).
Elementwise over the flattened tensors, fp32 math, BLOCK elements per program.
Reference: Shazeer, "GLU Variants Improve Transformer" (2020); Liger-Kernel swiglu.
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret

BLOCK = 1024


@triton.jit
def _fwd_kernel(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (a * tl.sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    tl.store(DA + offs, (dy * b * (s + silu * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dy * silu).to(DB.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        n = a.numel()
        if n:
            _fwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        if n:
            _bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, a, b, da, db, n, BLOCK=BLOCK)
        return da, db


def swiglu(a, b):
    """silu(a) * b, same shape and dtype; differentiable in a and b."""
    check_cuda_or_interpret("a", a)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a and b must have one shape and dtype, got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}")
    return SwiGLUFunction.apply(a, b)
