"""GPTQ: int4 weight quantization with second-order error compensation (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For a Linear layer with weights W (N, K) and calibration inputs X (n, K), GPTQ minimises the output
error ||X W^T - X Q^T||^2 one input column at a time: after rounding column k it spreads the
rounding error over the columns not yet quantized, weighted by the inverse Hessian H^-1 of that
quadratic (H = 2 X^T X / n). Using the upper Cholesky factor of H^-1 makes each update a row of it,
and processing columns in blocks makes most of the work one matrix product per block (the
reference implementation's "lazy batch" updates).

Groups: the int4 format is asymmetric per group of `group_size` columns (quark.ops.quant). When K
is not a multiple of the group, W and H are padded with zero columns to the format's packed width:
inputs that are always zero, whose weights stay zero and round exactly. The
scale and zero point of a group are chosen when GPTQ reaches its first column, from the weights as
already updated by the earlier groups' errors (as the reference does with groupsize), with the same
clipping search as round-to-nearest. Block size = group size, so a group's parameters always see
every earlier update.

The model is processed block by block: the calibration hidden states enter block i after blocks
< i have been quantized, so each block also compensates the error of the ones before it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quark.nn.patch import is_skipped
from quark.ops.quant import QuantizedTensor, _pack_int4, padded_k, quantize_rtn
from quark.optimize.calibration import block_inputs, run_block


def gptq_quantize(w, hessian, group_size=128, damp=0.01, act_order=False, block_size=128):
    """w (N, K) float, hessian (K, K) = X^T X / n of the layer's inputs -> (QuantizedTensor int4, loss).

    damp: fraction of the mean diagonal added to H (the reference's percdamp), which keeps the
    Cholesky factorisation stable when some inputs are (nearly) collinear.
    act_order: quantize the columns in order of decreasing H_kk (the inputs with the most energy first,
    while the most columns are left to absorb their error; the reference's --act-order). Our int4
    format keeps contiguous groups, so each group's scale and zero point are then fixed up front
    from the unmodified weights (the reference's --static-groups) rather than when GPTQ reaches it.
    loss: the reference's objective sum((w - q)^2 / U_kk^2) / 2 over all weights, U the Cholesky factor
    of H^-1 (lower is better).
    """
    N, K0 = w.shape
    if tuple(hessian.shape) != (K0, K0):
        raise ValueError(f"hessian must have shape ({K0}, {K0}), got {tuple(hessian.shape)}")
    K = padded_k(K0, group_size)
    W = F.pad(w.detach().to(torch.float32), (0, K - K0))                        # (N, K), a copy
    H = F.pad(hessian.detach().to(torch.float64), (0, K - K0, 0, K - K0))       # (K, K), a copy
    dead = torch.diag(H) == 0                     # inputs that are always zero: their weights don't matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    G = K // group_size
    scales = torch.empty(N, G)                    # fp32 copies of the bf16 scales (exact)
    zeros = torch.empty(N, G, dtype=torch.uint8)
    perm = torch.arange(K)
    if act_order:
        static = quantize_rtn(W, "int4", group_size)
        scales, zeros = static.scales.float(), static.zeros.clone()
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        block_size = group_size   # a group's grid is chosen from weights that saw every earlier update
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)

    codes = torch.empty(N, K, dtype=torch.uint8)                                  # in processing order
    loss = 0.0
    for c0 in range(0, K, block_size):
        c1 = min(c0 + block_size, K)
        W1 = W[:, c0:c1].clone()                                                  # (N, B)
        Hinv1 = Hinv[c0:c1, c0:c1]
        if not act_order:                                                         # this block is one group
            params = quantize_rtn(W1, "int4", group_size)
            scales[:, c0 // group_size], zeros[:, c0 // group_size] = params.scales[:, 0], params.zeros[:, 0]
        err1 = torch.empty_like(W1)
        for i in range(c1 - c0):
            g = int(perm[c0 + i]) // group_size
            s, z = scales[:, g], zeros[:, g].float()                              # (N,)
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s) + z, 0, 15)
            codes[:, c0 + i] = q.to(torch.uint8)
            e = (col - (q - z) * s) / Hinv1[i, i]
            loss += float((e * e).sum()) / 2
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]                      # compensate within the block
            err1[:, i] = e
        W[:, c1:] -= err1 @ Hinv[c0:c1, c1:]                                      # and in the columns after it
    codes = codes[:, torch.argsort(perm)]                                         # back to the layer's column order
    qt = QuantizedTensor("int4", (N, K0), _pack_int4(codes.contiguous()), scales.to(torch.bfloat16), zeros.contiguous(),
                         group_size)
    return qt, loss


@torch.no_grad()
def gptq_model(model, calib, group_size=128, damp=0.01, act_order=False, skip=("lm_head",), batch_size=16):
    """Run GPTQ over every block's Linear layers with calibration tokens calib (n, T) int64.

    Returns {layer name: QuantizedTensor} for quantize_model's quantizer hook. The model's Linear
    weights are left holding their dequantized values (the next block is calibrated on them).
    Layers outside the blocks (the head) are not in the result.
    """
    x, cos, sin = block_inputs(model, calib, batch_size)                          # (n, T, d)
    result = {}
    for b, block in enumerate(model.blocks):
        linears = {f"blocks.{b}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, nn.Linear) and not is_skipped(f"blocks.{b}.{n}", skip)}
        hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def hook(name):
            def fn(module, inputs, output):
                a = inputs[0].reshape(-1, module.in_features).to(torch.float64)   # (tokens, K)
                hessians[name] += a.T @ a
                counts[name] += a.shape[0]
            return fn

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        try:
            run_block(block, x, cos, sin, batch_size)
        finally:
            for h in handles:
                h.remove()
        for name, m in linears.items():
            qt, loss = gptq_quantize(m.weight, hessians[name] / max(counts[name], 1), group_size, damp,
                                     act_order)
            m.weight.copy_(qt.dequantize().to(m.weight.dtype))
            result[name] = qt
        x = run_block(block, x, cos, sin, batch_size)                             # inputs of the next block
    return result
