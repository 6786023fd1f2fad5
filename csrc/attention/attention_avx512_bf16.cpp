// bf16 prefill forward with AVX512-BF16: both GEMMs of a block on vdpbf16ps, which multiplies pairs
// of bf16 and accumulates into fp32 lanes (two FMAs per lane per instruction, twice the fp32 rate).
//
// Operands are packed as 32-bit words holding a bf16 pair along the reduction dimension:
//   S = Q . K^T   reduction over d: Qw[r][dp] = (q[r][2dp], q[r][2dp+1]) (the raw rows, padded to an
//                 even D), Kw[kb][dp][j] = (k[j][2dp], k[j][2dp+1]): one zmm = 16 keys of one d-pair.
//   O += P . V    reduction over keys: Pw[r][jp] = (p[r][2jp], p[r][2jp+1]) (P rounded to bf16, as
//                 torch does), Vw[jp][d] = (v[2jp][d], v[2jp+1][d]): one zmm = 16 columns of a key pair.
// Scores come out in fp32; scale*log2(e) is applied there (Q is not pre-scaled in bf16, which would
// add a rounding). The online softmax, masking and output are the fp32 driver's (attention_blocked.h).
#include <immintrin.h>

#include "attention/attention_blocked.h"
#include "attention/attention_vec_avx512.h"

namespace quark {
namespace {

using Blk = Blocked<VecAvx512>;
constexpr int64_t BM = Blk::BM, BN = Blk::BN;
constexpr int MR = VecAvx512::MR, NVMAX = VecAvx512::NVMAX;

struct GemmBf16 {
  int64_t K2;              // reduction length in pairs
  const uint32_t* A;       // A[r * lda + k]
  int64_t lda;
  const uint32_t* B;       // row k at B + k * ldb, N words
  int64_t ldb;
  float* C;
  int64_t ldc;
  const float* cscale;     // per-row factor on the loaded C, or nullptr for C = A.B
};

template <int R, int NV>
static void tile(const GemmBf16& g) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 s = g.cscale ? _mm512_set1_ps(g.cscale[r]) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      c[r][v] = g.cscale ? _mm512_mul_ps(_mm512_loadu_ps(g.C + r * g.ldc + v * 16), s) : _mm512_setzero_ps();
  }
  const uint32_t* A = g.A;
  const uint32_t* B = g.B;
  for (int64_t k = 0; k < g.K2; ++k, ++A, B += g.ldb) {
    __m512bh b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * g.lda]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], av, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(g.C + r * g.ldc + v * 16, c[r][v]);
}

template <int R, int NV>
static void tile_rows(int rows, const GemmBf16& g) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1, NV>(rows, g);
  }
  tile<R, NV>(g);
}

template <int NV>
static void tile_any(int rows, int nv, const GemmBf16& g) {
  if constexpr (NV > 1) {
    if (nv < NV) return tile_any<NV - 1>(rows, nv, g);
  }
  tile_rows<MR, NV>(rows, g);
}

// C (M, N) [= cscale * C +] A . B with N a multiple of 16.
static void gemm_bf16(int64_t M, int64_t N, const GemmBf16& g) {
  for (int64_t n0 = 0; n0 < N; n0 += NVMAX * 16) {
    const int nv = static_cast<int>(std::min<int64_t>(NVMAX, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      GemmBf16 t = g;
      t.A = g.A + m0 * g.lda;
      t.B = g.B + n0;
      t.C = g.C + m0 * g.ldc + n0;
      t.cscale = g.cscale ? g.cscale + m0 : nullptr;
      tile_any<NVMAX>(static_cast<int>(std::min<int64_t>(MR, M - m0)), nv, t);
    }
  }
}

inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

}  // namespace

void attention_forward_bf16_avx512_bf16(const AttentionFwdArgs& a) {
  const int64_t D = a.D, D2 = (D + 1) / 2, Dp = round_up(D, 16), group = a.Hq / a.Hkv;
  const int64_t nkb = (a.Sk + BN - 1) / BN, Skp = nkb * BN, nqb = (a.Sq + BM - 1) / BM, nbk = a.B * a.Hkv;
  const uint16_t* q = static_cast<const uint16_t*>(a.q);
  const uint16_t* k = static_cast<const uint16_t*>(a.k);
  const uint16_t* v = static_cast<const uint16_t*>(a.v);
  // Packed K (per kv head: nkb blocks of (D2, BN) words) and V (per kv head: (Skp / 2, Dp) words).
  std::unique_ptr<uint32_t[]> kw(new uint32_t[std::max<int64_t>(nbk * Skp * D2, 1)]);
  std::unique_ptr<uint32_t[]> vw(new uint32_t[std::max<int64_t>(nbk * Skp / 2 * Dp, 1)]);
  parallel_for(nbk, 1, [&](int64_t bk0, int64_t bk1) {
    for (int64_t bk = bk0; bk < bk1; ++bk) {
      const uint16_t* kh = k + bk * a.Sk * D;
      const uint16_t* vh = v + bk * a.Sk * D;
      uint32_t* kd = kw.get() + bk * Skp * D2;
      uint32_t* vd = vw.get() + bk * Skp / 2 * Dp;
      for (int64_t j = 0; j < Skp; ++j)
        for (int64_t dp = 0; dp < D2; ++dp) {
          const uint16_t lo = j < a.Sk ? kh[j * D + 2 * dp] : 0;
          const uint16_t hi = j < a.Sk && 2 * dp + 1 < D ? kh[j * D + 2 * dp + 1] : 0;
          kd[(j / BN) * D2 * BN + dp * BN + j % BN] = pair(lo, hi);
        }
      for (int64_t jp = 0; jp < Skp / 2; ++jp)
        for (int64_t d = 0; d < Dp; ++d) {
          const uint16_t lo = 2 * jp < a.Sk && d < D ? vh[2 * jp * D + d] : 0;
          const uint16_t hi = 2 * jp + 1 < a.Sk && d < D ? vh[(2 * jp + 1) * D + d] : 0;
          vd[jp * Dp + d] = pair(lo, hi);
        }
    }
  });
  parallel_for(a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<uint32_t[]> qw(new uint32_t[BM * D2]), pw(new uint32_t[BM * BN / 2]);
    Buffer s = alloc_floats(BM * BN), o = alloc_floats(BM * Dp);
    float m[BM], l[BM], alpha[BM];
    const float smul = a.scale * kLog2e;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, ib = nqb - 1 - t % nqb;
      const int64_t bk = (bh / a.Hq) * a.Hkv + (bh % a.Hq) / group;
      const int64_t i0 = ib * BM, mb = std::min(BM, a.Sq - i0);
      for (int64_t r = 0; r < mb; ++r) {
        const uint16_t* src = q + (bh * a.Sq + i0 + r) * D;
        for (int64_t dp = 0; dp < D2; ++dp) qw[r * D2 + dp] = pair(src[2 * dp], 2 * dp + 1 < D ? src[2 * dp + 1] : 0);
      }
      for (int64_t r = 0; r < mb; ++r) { m[r] = kNegInf; l[r] = 0.f; }
      std::memset(o.get(), 0, sizeof(float) * BM * Dp);
      const int64_t kend = visible_keys(i0 + mb - 1, a.Sq, a.Sk, a.causal);
      for (int64_t j0 = 0; j0 < kend; j0 += BN) {
        gemm_bf16(mb, BN, GemmBf16{D2, qw.get(), D2, kw.get() + bk * Skp * D2 + (j0 / BN) * D2 * BN, BN, s.get(), BN,
                                   nullptr});
        Blk::online_softmax(a, s.get(), mb, i0, j0, smul, m, l, alpha);
        for (int64_t r = 0; r < mb; ++r)
          for (int64_t c = 0; c < BN; c += 32) {
            const float* p = s.get() + r * BN + c;
            const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
            _mm512_storeu_si512(pw.get() + r * (BN / 2) + c / 2, (__m512i)h);
          }
        gemm_bf16(mb, Dp, GemmBf16{BN / 2, pw.get(), BN / 2, vw.get() + bk * Skp / 2 * Dp + (j0 / 2) * Dp, Dp, o.get(),
                                   Dp, alpha});
      }
      Blk::store_rows(a, o.get(), Dp, bh, i0, mb, m, l);
    }
  });
}

}  // namespace quark
