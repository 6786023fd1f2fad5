"""Pairwise distances and fused top-k for vector search, in Triton.

pairwise_distance: out (nq, nb) = distance(x[i], y[j]), one (BM x BN) tile per program; the dot
products run through tl.dot (IEEE fp32 for fp32 inputs) and the squared norms are summed from the
same loads, so x and y are each read once per tile. Metrics (smaller is nearer, as quark.ops):
"l2" squared Euclidean, "ip" negative inner product, "cosine" 1 - cos (a zero vector is at 1).

pairwise_topk: the k nearest base vectors per query without writing (nq, nb). Grid (query blocks,
splits); each program scans its share of the base tiles and keeps a running top-k per query row in
registers: per tile, k rounds of "take the tile's row minimum; if it beats the buffer's current
maximum, replace that slot" (k * (BN + k) compares against BN * d FMAs for the tile). The splits'
(nq, splits * k) candidates are merged with torch.topk. k <= 128.
"""
import torch
import triton
import triton.language as tl

from quark.ops.triton._common import check_cuda_or_interpret, mma, next_pow2

METRICS = {"l2": 0, "ip": 1, "cosine": 2}
MAX_K = 128


@triton.jit
def _distance_tile(X, Y, offs_m, offs_n, nq, nb, d, sx, sy,
                   METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < nq
    nmask = offs_n < nb
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    xx = tl.zeros([BLOCK_M], tl.float32)
    yy = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kmask = k0 + offs_k < d
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * sx + k0 + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        y = tl.load(Y + offs_n.to(tl.int64)[:, None] * sy + k0 + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        dot = mma(x, tl.trans(y), dot, IEEE)
        if METRIC != 1:
            xf = x.to(tl.float32)
            yf = y.to(tl.float32)
            xx += tl.sum(xf * xf, 1)
            yy += tl.sum(yf * yf, 1)
    if METRIC == 0:
        out = tl.maximum(xx[:, None] + yy[None, :] - 2.0 * dot, 0.0)
    elif METRIC == 1:
        out = -dot
    else:
        den = tl.sqrt(xx)[:, None] * tl.sqrt(yy)[None, :]
        out = tl.where(den > 0, 1.0 - dot / tl.where(den > 0, den, 1.0), 1.0)
    return out


@triton.jit
def _distance_kernel(X, Y, O, nq, nb, d, sx, sy, so,
                     METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out = _distance_tile(X, Y, offs_m, offs_n, nq, nb, d, sx, sy, METRIC, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    tl.store(O + offs_m.to(tl.int64)[:, None] * so + offs_n[None, :], out,
             mask=(offs_m[:, None] < nq) & (offs_n[None, :] < nb))


@triton.jit
def _topk_kernel(X, Y, CD, CI, nq, nb, d, sx, sy, k, tiles_per_split, n_splits,
                 METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 KP: tl.constexpr, IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    slots = tl.arange(0, KP)
    # Slots >= k hold -inf so they are never the buffer maximum, hence never filled.
    best_d = tl.where(slots[None, :] < k, float("inf"), float("-inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    best_i = tl.full([BLOCK_M, KP], -1, tl.int64)
    cols = tl.arange(0, BLOCK_N)
    first = split * tiles_per_split * BLOCK_N
    last = tl.minimum(first + tiles_per_split * BLOCK_N, nb)
    for start_n in range(first, last, BLOCK_N):
        offs_n = start_n + cols
        dist = _distance_tile(X, Y, offs_m, offs_n, nq, nb, d, sx, sy, METRIC, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        dist = tl.where(offs_n[None, :] < nb, dist, float("inf"))
        for _ in range(k):
            v, j = tl.min(dist, 1, return_indices=True)                              # (BM,)
            worst, slot = tl.max(best_d, 1, return_indices=True)
            take = (slots[None, :] == slot[:, None]) & (v < worst)[:, None]
            best_d = tl.where(take, v[:, None], best_d)
            best_i = tl.where(take, (start_n + j).to(tl.int64)[:, None], best_i)
            dist = tl.where(cols[None, :] == j[:, None], float("inf"), dist)
    row = offs_m.to(tl.int64)[:, None] * (n_splits * k) + split * k + slots[None, :]
    smask = (offs_m[:, None] < nq) & (slots[None, :] < k)
    tl.store(CD + row, best_d, mask=smask)
    tl.store(CI + row, best_i, mask=smask)


def _check(x, y, metric):
    check_cuda_or_interpret("x", x)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x (nq, d) and y (nb, d) must agree on d, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x and y must share a dtype among float32/float16/bfloat16, got {x.dtype} and {y.dtype}")
    return (x if x.stride(-1) == 1 else x.contiguous()), (y if y.stride(-1) == 1 else y.contiguous())


def pairwise_distance(x, y, metric="l2"):
    """x (nq, d), y (nb, d) -> (nq, nb) float32 distances (contract of quark.ops.pairwise_distance)."""
    x, y = _check(x, y, metric)
    nq, d = x.shape
    nb = y.shape[0]
    out = torch.empty((nq, nb), dtype=torch.float32, device=x.device)
    if out.numel():
        BM, BN, BK = 64, 64, min(64, next_pow2(d))
        _distance_kernel[(triton.cdiv(nq, BM), triton.cdiv(nb, BN))](
            x, y, out, nq, nb, d, x.stride(0), y.stride(0), out.stride(0), METRIC=METRICS[metric],
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, IEEE=x.dtype == torch.float32, num_warps=4, num_stages=3)
    return out


def pairwise_topk(x, y, k, metric="l2", num_splits=None):
    """The k nearest rows of y for each row of x: (distances (nq, k) float32 ascending, ids (nq, k) int64)."""
    x, y = _check(x, y, metric)
    nq, d = x.shape
    nb = y.shape[0]
    if not 1 <= k <= min(MAX_K, nb):
        raise ValueError(f"k must be in [1, min({MAX_K}, nb={nb})], got {k}")
    BM, BN, BK = 32, 64, min(64, next_pow2(d))
    tiles = triton.cdiv(nb, BN)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 2
        num_splits = max(1, min(tiles, triton.cdiv(2 * sms, triton.cdiv(nq, BM))))
    per = triton.cdiv(tiles, num_splits)
    splits = triton.cdiv(tiles, per)
    cand_d = torch.empty((nq, splits * k), dtype=torch.float32, device=x.device)
    cand_i = torch.empty((nq, splits * k), dtype=torch.int64, device=x.device)
    if nq:
        _topk_kernel[(triton.cdiv(nq, BM), splits)](
            x, y, cand_d, cand_i, nq, nb, d, x.stride(0), y.stride(0), k, per, splits, METRIC=METRICS[metric],
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, KP=next_pow2(k, lo=2), IEEE=x.dtype == torch.float32,
            num_warps=4, num_stages=2)
    dist, pos = torch.topk(cand_d, k, dim=1, largest=False)                    # sorted ascending
    return dist, torch.gather(cand_i, 1, pos)
