"""Split-K decode attention (flash-decoding) in Triton: one new query token per sequence over a KV cache.

Decode reads every cache byte once and does ~2 FLOPs per byte, so it is memory-bound; the work is
spread so that the whole GPU streams the cache even at batch 1:
  stage 1, grid (B * Hkv, splits): each program owns one kv head and one slice of the sequence, and
     computes all G = Hq / Hkv query heads of its GQA group against it (K/V read once, not G times;
     the G rows are padded to 16 so the dots run on tensor cores). It writes a partial output
     normalised by its own softmax sum, plus that slice's log-sum-exp (base 2).
  stage 2, grid (B * Hq): merge the slices by their log-sum-exp.
Caches are fp16/bf16/fp32, or int8 with per-(token, head) scales (quark.ops.quantize_kv): the int8
values are exact in fp16/bf16, so K is dotted as integers and the column scales applied to the
scores; V's scales are folded into P before the P.V dot.

Contract = quark.ops.reference.decode_attention; a sequence of length 0 gets zeros.
Reference: Dao et al., "Flash-Decoding for long-context inference" (2023).
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret, mma, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(Q, K, V, KS, VS, LENS, PO, PLSE,
                  sqb, sqh, skb, skh, skn, svb, svh, svn, ssb, ssh,
                  HK, Hq, G, split_len, n_splits, qk_scale,
                  QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, hk = bh // HK, bh % HK
    length = tl.load(LENS + b).to(tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + (hk * G + offs_g[:, None]) * sqh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)                           # (BG, BD)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    s_base = b * ssb + hk * ssh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < hi
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0)
        if QUANT:                                               # int8 -> fp32 -> q's dtype: exact
            k = k.to(tl.float32).to(q.dtype)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), IEEE)
        if QUANT:
            s = s * tl.load(KS + s_base + cols, mask=nmask, other=0.0)[None, :]
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                   # finite: every block has >= 1 valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0)
        if QUANT:
            p = p * tl.load(VS + s_base + cols, mask=nmask, other=0.0)[None, :]
            v = v.to(tl.float32).to(q.dtype)
        acc = mma(p.to(q.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))          # empty slice: weight 0
    row = (b * Hq + hk * G + offs_g) * n_splits + split                                 # (BG,)
    tl.store(PO + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(PLSE + row, lse, mask=gmask)


@triton.jit
def _combine_kernel(PO, PLSE, O, n_splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    row = tl.program_id(0)                                       # b * Hq + h; O is (B, Hq, D) contiguous
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < n_splits
    lse = tl.load(PLSE + row * n_splits + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)))
    po = tl.load(PO + (row * n_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                 mask=smask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(po * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _num_splits(device, B, Hkv, Smax, block_n):
    # Enough programs for ~2 waves over the SMs, but never slices shorter than one key block.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, B * Hkv), triton.cdiv(Smax, block_n), 64))


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, k_scale=None, v_scale=None, num_splits=None):
    """Same contract as quark.ops.decode_attention (which validates shapes first) on CUDA tensors.
    q (B, Hq, D) fp16/bf16/fp32; caches (B, Hkv, Smax, D) in q's dtype or int8 with k_scale/v_scale
    (B, Hkv, Smax) fp32; cache_seqlens (B,) int on q's device -> (B, Hq, D) in q's dtype."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_cuda_or_interpret(name, t)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton decode, got {q.dtype}")
    quant = k_cache.dtype == torch.int8
    if not quant and k_cache.dtype != q.dtype:
        raise TypeError(f"a float cache must have q's dtype {q.dtype}, got {k_cache.dtype}")
    B, Hq, D = q.shape
    Hkv, Smax = k_cache.shape[1], k_cache.shape[2]
    q = q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    if quant:
        k_scale, v_scale = k_scale.float().contiguous(), v_scale.float().contiguous()
        ss = k_scale.stride()[:2]
    else:
        k_scale = v_scale = q                                    # unused pointers (QUANT=False)
        ss = (0, 0)
    scale = D ** -0.5 if scale is None else float(scale)
    lens = torch.as_tensor(cache_seqlens, device=q.device)
    BLOCK_N = 64 if D <= 128 else 32
    splits = num_splits or _num_splits(q.device, B, Hkv, Smax, BLOCK_N)
    split_len = triton.cdiv(triton.cdiv(Smax, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(Smax, split_len) if Smax else 1
    G = Hq // Hkv
    part_o = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    BD = next_pow2(D)
    _split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, k_scale, v_scale, lens, part_o, part_lse,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], *ss,
        Hkv, Hq, G, split_len, splits, scale * LOG2E, QUANT=quant, HEAD_DIM=D, BLOCK_D=BD,
        BLOCK_G=next_pow2(G), BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _combine_kernel[(B * Hq,)](part_o, part_lse, out, splits, HEAD_DIM=D, BLOCK_D=BD,
                               BLOCK_S=next_pow2(splits, lo=2))
    return out
