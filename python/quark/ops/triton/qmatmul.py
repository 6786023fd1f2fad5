"""Weight-only quantized matmul in Triton: out (M, N) = x (M, K) @ dequantize(W)^T + bias, with W in
the formats of quark.ops.quant (see csrc/quant/qlinear.h):
  int8  data (N, K) int8, scales (N,) fp32                          W[n, k] = data[n, k] * s[n]
  int4  data (N, K/2) uint8, scales/zeros (N, K/G) bf16/uint8      W[n, k] = (q[n, k] - z[n, g]) * s[n, g]
        packed in blocks of 32 along K: byte 16*b + j holds q[32b + j] (low nibble) and q[32b + j + 16]
        (high nibble).
The kernels never unpack nibbles into K order: a byte tile (.., BK/2) is split into its low and high
nibbles, and x is loaded twice with the matching column permutation (k = 32*(i//16) + i%16, +16), so
the two halves are two ordinary dot products.

GEMV (M <= 4, decode): memory-bound, one program per (BLOCK_N rows, x row); one quantization group
per step, its scale and zero factored out of the sum:
    sum_k (q - z) s x = s * (sum_k q x - z * sum_k x),
so the inner loop is nibble -> float -> FMA. int4 reads 0.5 + 3/G bytes per weight instead of 2 (bf16).
GEMM (M > 4, prefill): tensor-core tiles (BM x BN x BK); the weight tile is dequantized to x's dtype
in registers (int8 values are exact in bf16/fp16; int8's per-row scale is applied to the accumulator).
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret, mma

GEMV_MAX_ROWS = 4


@triton.jit
def _int4_gemv_kernel(X, D, S, Z, B, O, N, K, n_groups, sxm, som,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    nmask = offs_n < N
    HALF: tl.constexpr = GROUP // 2
    i = tl.arange(0, HALF)
    k_lo = (i // 16) * 32 + i % 16                               # column of the low nibble of byte i
    d_rows = D + offs_n.to(tl.int64)[:, None] * (K // 2)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, n_groups):
        k0 = g * GROUP
        xl = tl.load(X + m * sxm + k0 + k_lo).to(tl.float32)                          # (HALF,)
        xh = tl.load(X + m * sxm + k0 + k_lo + 16).to(tl.float32)
        byte = tl.load(d_rows + k0 // 2 + i[None, :], mask=nmask[:, None], other=0)   # (BN, HALF) uint8
        lo = (byte & 15).to(tl.float32)
        hi = (byte >> 4).to(tl.float32)
        dot = tl.sum(lo * xl[None, :] + hi * xh[None, :], 1)                           # (BN,)
        s = tl.load(S + offs_n * n_groups + g, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(Z + offs_n * n_groups + g, mask=nmask, other=0).to(tl.float32)
        acc += s * (dot - z * (tl.sum(xl, 0) + tl.sum(xh, 0)))
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(O + m * som + offs_n, acc.to(O.dtype.element_ty), mask=nmask)


@triton.jit
def _int8_gemv_kernel(X, D, S, B, O, N, K, sxm, som,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    d_rows = D + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = k0 + offs_k < K
        x = tl.load(X + m * sxm + k0 + offs_k, mask=kmask, other=0.0).to(tl.float32)
        q = tl.load(d_rows + k0 + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0).to(tl.float32)
        acc += q * x[None, :]
    out = tl.sum(acc, 1) * tl.load(S + offs_n, mask=nmask, other=0.0)
    if HAS_BIAS:
        out += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(O + m * som + offs_n, out.to(O.dtype.element_ty), mask=nmask)


@triton.jit
def _qgemm_kernel(X, D, S, Z, B, O, M, N, K, n_groups, sxm, som,
                  INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * sxm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if INT4:
        # K is a multiple of 32 (whole packing blocks): a 32-block of the tile is all in range or all out.
        HALF: tl.constexpr = BLOCK_K // 2
        i = tl.arange(0, HALF)
        k_lo = (i // 16) * 32 + i % 16
        d_cols = D + offs_n.to(tl.int64)[None, :] * (K // 2)
        for k0 in range(0, K, BLOCK_K):
            kl = k0 + k_lo                                                             # (HALF,)
            kvalid = kl < K                                                            # whole 32-blocks
            xl = tl.load(x_rows + kl[None, :], mask=mmask[:, None] & kvalid[None, :], other=0.0)
            xh = tl.load(x_rows + kl[None, :] + 16, mask=mmask[:, None] & kvalid[None, :], other=0.0)
            wmask = kvalid[:, None] & nmask[None, :]
            byte = tl.load(d_cols + k0 // 2 + i[:, None], mask=wmask, other=0)        # (HALF, BN)
            gidx = offs_n[None, :] * n_groups + kl[:, None] // GROUP
            s = tl.load(S + gidx, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(Z + gidx, mask=wmask, other=0).to(tl.float32)
            wl = (((byte & 15).to(tl.float32) - z) * s).to(xl.dtype)
            wh = (((byte >> 4).to(tl.float32) - z) * s).to(xl.dtype)
            acc = mma(xl, wl, acc, IEEE)
            acc = mma(xh, wh, acc, IEEE)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        d_cols = D + offs_n.to(tl.int64)[None, :] * K
        for k0 in range(0, K, BLOCK_K):
            kmask = k0 + offs_k < K
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            q = tl.load(d_cols + k0 + offs_k[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
            acc = mma(x, q.to(tl.float32).to(x.dtype), acc, IEEE)                      # exact integers
        acc = acc * tl.load(S + offs_n, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(O + offs_m[:, None] * som + offs_n[None, :], acc.to(O.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def qmatmul(x, scheme, data, scales, zeros=None, group_size=None, bias=None):
    """x (..., K) fp16/bf16/fp32 on the GPU, W (N, K) as in quark.ops.quant ("int4" or "int8") ->
    (..., N) in x's dtype. M = prod(leading dims) <= 4 takes the GEMV kernels, else the GEMM."""
    check_cuda_or_interpret("x", x)
    if scheme not in ("int4", "int8"):
        raise ValueError(f"scheme must be 'int4' or 'int8', got {scheme!r}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    N = data.shape[0]
    K = data.shape[1] * (2 if scheme == "int4" else 1)
    if x.shape[-1] != K:
        raise ValueError(f"x must have last dimension K={K}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else scales
    if M == 0:
        return out.reshape(*lead, N)
    if scheme == "int4":
        G = int(group_size)
        if G % 32 or K % G:
            raise ValueError(f"group_size must be a multiple of 32 dividing K={K}, got {group_size}")
        if M <= GEMV_MAX_ROWS:
            BN = 32
            _int4_gemv_kernel[(triton.cdiv(N, BN), M)](x2, data, scales, zeros, b, out, N, K, K // G, x2.stride(0),
                                                       out.stride(0), GROUP=G, BLOCK_N=BN, HAS_BIAS=has_bias,
                                                       num_warps=4)
            return out.reshape(*lead, N)
    elif M <= GEMV_MAX_ROWS:
        BN, BK = 16, 256
        _int8_gemv_kernel[(triton.cdiv(N, BN), M)](x2, data, scales, b, out, N, K, x2.stride(0), out.stride(0),
                                                   BLOCK_N=BN, BLOCK_K=BK, HAS_BIAS=has_bias, num_warps=4)
        return out.reshape(*lead, N)
    BM, BN, BK = (64, 128, 64) if M > 64 else (16, 128, 128)
    G = int(group_size) if scheme == "int4" else 32                # GROUP is unused by int8
    _qgemm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x2, data, scales, zeros if zeros is not None else scales, b, out, M, N, K, K // G if scheme == "int4" else 1,
        x2.stride(0), out.stride(0), INT4=scheme == "int4", GROUP=G, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32, num_warps=4 if BM <= 16 else 8, num_stages=3)
    return out.reshape(*lead, N)
