"""Flash attention (FlashAttention-2) forward and backward in Triton: causal or not, GQA/MQA, fp16/bf16
(fp32 too, with IEEE dots). O(S*D) memory: the (S, S) score matrix never leaves registers.

Forward, one program per (BLOCK_M queries, batch*head): stream K/V blocks, online softmax in the
exp2 domain (scores pre-multiplied by scale*log2(e)), save the row log-sum-exp (base 2) for backward.
Key blocks that every query row of the tile sees run without a mask; only the diagonal / ragged-end
blocks pay for one.

Backward (recompute, no stored P): delta = rowsum(dO * O); one kernel per (BLOCK_N keys, batch*kv_head)
accumulates dK, dV over every query head of its GQA group (no atomics), one kernel per
(BLOCK_M queries, batch*head) accumulates dQ.

Conventions = quark.ops.reference.attention: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); the causal mask
aligns the last query with the last key (query i sees key j iff j <= i + Sk - Sq); a query that sees
no key gets zeros and zero gradients.
References: Dao, "FlashAttention-2" (2023); the Triton fused-attention tutorial.
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret, mma, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _key_blocks(start_m, off, Sk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of the query rows start_m .. start_m + BLOCK_M (row i sees keys <= i + off when causal)
    -> (full_end, hi): blocks below full_end are seen whole by every row (no mask), blocks up to hi in part."""
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(start_m + off + 1, 0), Sk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + off, 0), Sk)
    else:
        full_end = Sk // BLOCK_N * BLOCK_N
        hi = Sk
    return full_end, hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                H, G, Sq, Sk, qk_scale,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G                                                        # GQA: G query heads per kv head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m[:, None] < Sq) & dmask[None, :], other=0.0)                # (BM, BD)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    off = Sk - Sq
    full_end, hi = _key_blocks(start_m, off, Sk, CAUSAL, BLOCK_M, BLOCK_N)
    # Stage 1: blocks every row of the tile sees entirely -> no mask.
    for start_n in range(0, full_end, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=dmask[None, :], other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=dmask[None, :], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    # Stage 2: the diagonal and the ragged end -> causal and bounds mask.
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n
        kmask = cols < Sk
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE) * qk_scale
        keep = kmask[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + off)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)        # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    rmask = offs_m < Sq
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))     # inf: P = 0 in backward
    tl.store(LSE + bh * Sq + offs_m, lse, mask=rmask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, Sq, H, sob, soh, som, sdb, sdh, sdm,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, start_m, offs_n, offs_d, dmask, sqm, sdm, Sq, off,
               MASK: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rmask = offs_m < Sq
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdm + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(LSE + offs_m, mask=rmask, other=float("inf"))      # rows past Sq: P = 0
    delta = tl.load(DELTA + offs_m, mask=rmask, other=0.0)
    sT = mma(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], tl.float32), IEEE)       # (BN, BM), scaled log2
    pT = tl.exp2(sT - lse[None, :])
    if MASK:
        pT = tl.where(offs_n[:, None] <= offs_m[None, :] + off, pT, 0.0)
    dv = mma(pT.to(do.dtype), do, dv, IEEE)
    dpT = mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], tl.float32), IEEE)
    dsT = pT * (dpT - delta[None, :])
    dk = mma(dsT.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                     sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     H, HK, G, Sq, Sk, qk_scale, sm_scale,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, hk = bh // HK, bh % HK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    nmask = offs_n < Sk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    # Fold the softmax scale (log2 domain) into K once: sT = (k * qk_scale) q^T.
    ks = (k.to(tl.float32) * qk_scale).to(k.dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    off = Sk - Sq
    if CAUSAL:
        lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M       # first query that sees this block
        mid = lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off - lo, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, tl.cdiv(Sq, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        mid = 0
    for g in range(G):
        h = hk * G + g
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sdb + h * sdh
        lse_ptr = LSE + (b * H + h) * Sq
        delta_ptr = DELTA + (b * H + h) * Sq
        for start_m in range(lo, mid, BLOCK_M):                      # blocks crossing the diagonal
            dk, dv = _dkdv_step(dk, dv, ks, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, offs_n, offs_d,
                                dmask, sqm, sdm, Sq, off, CAUSAL, BLOCK_M, IEEE)
        for start_m in range(mid, Sq, BLOCK_M):                      # fully visible blocks
            dk, dv = _dkdv_step(dk, dv, ks, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, offs_n, offs_d,
                                dmask, sqm, sdm, Sq, off, False, BLOCK_M, IEEE)
    smask = nmask[:, None] & dmask[None, :]
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=smask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdqb, sdqh, sdqm,
                   H, G, Sq, Sk, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    rmask = offs_m < Sq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=rmask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    off = Sk - Sq
    full_end, hi = _key_blocks(start_m, off, Sk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kmask = cols < Sk
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if start_n >= full_end:                                       # diagonal / ragged block
            keep = kmask[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + off)
            p = tl.where(keep, p, 0.0)
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, IEEE)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _fwd_config(D):
    # (BLOCK_M, BLOCK_N, num_warps, num_stages): the Triton tutorial's H100 choices; D = 256 halves the
    # tiles so Q, K, V and the accumulator fit in registers / shared memory.
    if D <= 64:
        return 128, 64, 4, 3
    if D <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def _bwd_config(D):
    # (BLOCK_M, BLOCK_N) of the dK/dV kernel (the dQ kernel swaps them), num_warps, num_stages.
    if D <= 64:
        return 32, 128, 4, 3
    if D <= 128:
        return 32, 64, 8, 2
    return 16, 32, 8, 1


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention_forward(q, k, v, causal, scale):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> (out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32, base 2)."""
    B, H, Sq, D = q.shape
    HK, Sk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    BM, BN, warps, stages = _fwd_config(D)
    grid = (triton.cdiv(Sq, BM), B * H)
    _fwd_kernel[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                      H, H // HK, Sq, Sk, scale * LOG2E, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=next_pow2(D),
                      BLOCK_M=BM, BLOCK_N=BN, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out, lse


def flash_attention_backward(q, k, v, out, dout, lse, causal, scale):
    B, H, Sq, D = q.shape
    HK, Sk = k.shape[1], k.shape[2]
    BD = next_pow2(D)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(Sq, 64), B * H)](out, dout, delta, Sq, H, *out.stride()[:3], *dout.stride()[:3],
                                                    HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BM, BN, warps, stages = _bwd_config(D)
    ieee = q.dtype == torch.float32
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    _bwd_dkdv_kernel[(triton.cdiv(Sk, BN), B * HK)](
        q, k, v, dout, lse, delta, dk, dv, *strides, *dk.stride()[:3], *dv.stride()[:3],
        H, HK, H // HK, Sq, Sk, scale * LOG2E, scale, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=BD,
        BLOCK_M=BM, BLOCK_N=BN, IEEE=ieee, num_warps=warps, num_stages=stages)
    _bwd_dq_kernel[(triton.cdiv(Sq, BN), B * H)](
        q, k, v, dout, lse, delta, dq, *strides, *dq.stride()[:3],
        H, H // HK, Sq, Sk, scale * LOG2E, scale, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=BD,
        BLOCK_M=BN, BLOCK_N=BM, IEEE=ieee, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = flash_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, _last_dim_contiguous(dout.to(q.dtype)), lse,
                                              ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal=True, scale=None):
    """Same contract as quark.ops.attention (which checks shapes first) on CUDA tensors, fp16/bf16/fp32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_cuda_or_interpret(name, t)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton attention, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim must be <= 256 for the Triton attention, got {q.shape[-1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, bool(causal), scale)
