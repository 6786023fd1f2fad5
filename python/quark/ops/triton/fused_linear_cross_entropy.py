"""Fused linear + cross-entropy (the LM head and its loss) without the (N, V) logits tensor.

The unfused loss materialises logits (N, V), their fp32 softmax and the gradient of the same size:
for N = 8k tokens and V = 128k that is 4+ GiB. Here the tokens are processed in chunks of n_c rows,
chosen so that a chunk's logits (n_c, V) are about the size of x itself:
    logits_c = x_c @ W^T (+ b)                         torch matmul (tensor cores), x's dtype
    Triton kernel, one program per row: online max / sum-exp over V blocks -> loss = lse - z[target],
        then overwrite the row in place with its gradient (softmax - onehot) / n_valid
    grad_x_c = dlogits_c @ W, grad_W += dlogits_c^T @ x_c, grad_b += colsum(dlogits_c)
so the gradients are ready when forward ends (backward only scales them by the incoming grad, a
scalar). grad_W accumulates in W's dtype, as Liger does (each chunk's GEMM sums in fp32, the running
total is rounded once per chunk): an fp32 (V, C) accumulator would alone cost 2x a bf16 weight. Peak
extra memory: one logits chunk + grad_x + grad_W.
Targets equal to ignore_index contribute no loss and no gradient; "mean" divides by the count of the
others (read on device, no host sync). Reference: Liger-Kernel fused_linear_cross_entropy (2024).
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret

REDUCTIONS = ("mean", "sum")


@triton.jit
def _ce_kernel(LOGITS, TARGET, LOSS, N_VALID, V, stride_row, ignore_index,
               MEAN: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    ptr = LOGITS + row.to(tl.int64) * stride_row
    target = tl.load(TARGET + row)
    offs = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        for start in range(0, V, BLOCK_V):
            tl.store(ptr + start + offs, tl.zeros([BLOCK_V], tl.float32).to(LOGITS.dtype.element_ty),
                     mask=start + offs < V)
    else:
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):                       # pass 1: online log-sum-exp
            z = tl.load(ptr + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        z_target = tl.load(ptr + target).to(tl.float32)
        tl.store(LOSS + row, lse - z_target)
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.load(N_VALID).to(tl.float32)
        for start in range(0, V, BLOCK_V):                       # pass 2: gradient in place of the logits
            cols = start + offs
            z = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=cols < V)


def _chunk_rows(N, C, V):
    # logits chunk (n_c, V) ~ the size of x (N, C); a power of two keeps the matmul shapes friendly.
    return max(1, min(N, triton.next_power_of_2(triton.cdiv(N, triton.cdiv(V, C)))))


def fused_linear_cross_entropy_forward(x, weight, target, bias, ignore_index, reduction, need_grads):
    N, C = x.shape
    V = weight.shape[0]
    loss_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    n_valid = (target != ignore_index).sum().to(torch.float32).reshape(1)          # stays on device
    grad_x = torch.empty_like(x) if need_grads[0] else None
    grad_w = torch.zeros_like(weight) if need_grads[1] else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=x.device) if need_grads[2] else None
    n_c = _chunk_rows(N, C, V)
    block_v = min(triton.next_power_of_2(V), 4096)
    for s in range(0, N, n_c):
        x_c = x[s:s + n_c]                                                         # (n_c, C)
        logits = x_c @ weight.T                                                    # (n_c, V)
        if bias is not None:
            logits += bias
        logits = logits.contiguous()
        _ce_kernel[(x_c.shape[0],)](logits, target[s:s + n_c], loss_rows[s:s + n_c], n_valid, V,
                                    logits.stride(0), ignore_index, MEAN=reduction == "mean",
                                    BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
        if grad_x is not None:
            torch.matmul(logits, weight, out=grad_x[s:s + n_c])                    # (n_c, C)
        if grad_w is not None:
            grad_w.addmm_(logits.T, x_c.to(weight.dtype))                          # (V, C)
        if grad_b is not None:
            grad_b += logits.sum(0, dtype=torch.float32)
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / n_valid[0]                                                   # 0/0 = nan, as torch
    return loss, grad_x, grad_w, grad_b


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, reduction):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        loss, gx, gw, gb = fused_linear_cross_entropy_forward(x, weight, target, bias, ignore_index, reduction, need)
        ctx.save_for_backward(*(t for t in (gx, gw, gb) if t is not None))
        ctx.have = [t is not None for t in (gx, gw, gb)]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        gx, gw, gb = (next(saved) if have else None for have in ctx.have)
        out = []
        for g, dtype in zip((gx, gw, gb), ctx.dtypes):
            out.append(None if g is None else (g * grad_loss).to(dtype))
        return out[0], out[1], None, out[2], None, None


def fused_linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(x @ weight.T + bias, target) without the logits: x (N, C), weight (V, C),
    target (N,) int64, bias (V,) or None -> scalar fp32 loss; differentiable in x, weight, bias."""
    check_cuda_or_interpret("x", x)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (N, C) and weight (V, C) must agree on C, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if target.shape != (x.shape[0],) or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be int64 of shape ({x.shape[0]},), got {target.dtype} {tuple(target.shape)}")
    V = weight.shape[0]
    if bool((((target < 0) | (target >= V)) & (target != ignore_index)).any()):
        raise ValueError(f"target values must lie in [0, {V}) or equal ignore_index={ignore_index}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
    return FusedLinearCrossEntropyFunction.apply(x.contiguous(), weight.contiguous(), target.contiguous(),
                                                 bias, int(ignore_index), reduction)
