// AVX-512 path (F/BW/DQ/VL).
// GEMV: R weight rows at a time (R prefetched streams, R x M accumulators), 16 weights per vector:
//   int8  16 bytes -> vpmovsxbd -> cvt -> FMA; the row scale is applied once after the reduction.
//   int4  64 bytes = 128 weights -> per 16: shift, vpermps (nibble -> fp32), FMA against x permuted
//         to the same order; scales once per chunk, zero points once per row (see gemv_int4_rows).
// GEMM: 8 x 32 register tile (16 zmm accumulators) over dequantized panels (qgemm_blocked.h).
// W8A8 without VNNI: int8 -> int16 and vpmaddwd (pairs into int32, no saturation), exact.
#include <immintrin.h>

#include "common/bf16.h"
#include "common/gemm_f32_avx512.h"
#include "common/threading.h"
#include "quant/qgemm_blocked.h"
#include "quant/qgemv.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

template <int M, int R>
void gemv_int8_rows(const QLinearArgs& a, int64_t n0, int64_t stride, int64_t wrap) {
  const int64_t K = a.w.k, N = a.w.n;
  const uint8_t* w = a.w.data + n0 * K;
  __m512 acc[R][M];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * stride * K, k, K, wrap * K);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * stride * K + k + 16 * u));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a.x + m * K + k + 16 * u), acc[r][m]);
      }
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, w + r * stride * K + k)));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, a.x + m * K + k), acc[r][m]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = _mm512_reduce_add_ps(acc[r][m]) * a.w.scales[n0 + r * stride];
      a.out[m * N + n0 + r * stride] = a.bias ? y + a.bias[n0 + r * stride] : y;
    }
}

// The bf16 scales of the (up to four) groups of chunk c as fp32, spread over the lanes of their blocks:
// one masked word permute puts scale j in the high half of each dword of its lanes, zero below.
template <int G>
inline __m512 chunk_scales(const uint16_t* s, int64_t c, __mmask8 mk) {
  static_assert(G == 32 || G == 64 || G == 128);
  constexpr int lanes = G / 8;   // dword lanes per group
  alignas(64) static constexpr uint16_t idx[32] = {
      0, 0 / lanes, 0, 1 / lanes, 0, 2 / lanes, 0, 3 / lanes, 0, 4 / lanes, 0, 5 / lanes, 0, 6 / lanes, 0, 7 / lanes,
      0, 8 / lanes, 0, 9 / lanes, 0, 10 / lanes, 0, 11 / lanes, 0, 12 / lanes, 0, 13 / lanes, 0, 14 / lanes, 0, 15 / lanes};
  const __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi16(mk, s + (kChunk / G) * c));
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_load_si512(idx), v));
}

// int4, chunks of 128 weights seen as 16 dwords (qgemv.h): vpermps reads only the low 4 bits of
// each index, so permutexvar(v >> 4i, {0, 1, ..., 15}) is nibble i as fp32 -- one shift and one permute
// per 16 weights, no mask and no convert -- and every FMA is a plain 16-lane one against xp.
template <int M, int R, int G>
void gemv_int4_rows(const QLinearArgs& a, int64_t n0, int64_t stride, int64_t wrap, const float* xp, int64_t kc,
                    const float* xsum) {
  const int64_t K = a.w.k, N = a.w.n, ng = K / G, row_bytes = K / 2, full = K / kChunk;
  const uint8_t* q = a.w.data + n0 * row_bytes;
  const uint16_t* sc = a.w.scales16 + n0 * ng;
  const uint8_t* zp = a.w.zeros + n0 * ng;
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr __mmask8 kAllScales = (1u << (kChunk / G)) - 1;   // a whole chunk's scales
  __m512 acc[R][M];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  // acc[r] += scales(chunk c) * sum_i nibble_i(v) * xp_i
  auto chunk = [&](int r, int64_t c, __m512i v, __mmask8 smk) {
    const float* xc = xp + kChunk * c;
    __m512 ac[M];
    const __m512 w0 = _mm512_permutexvar_ps(v, table);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) ac[m] = _mm512_mul_ps(w0, _mm512_loadu_ps(xc + m * kc));
#pragma GCC unroll 8
    for (int i = 1; i < 8; ++i) {
      const __m512 wi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * i), table);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) ac[m] = _mm512_fmadd_ps(wi, _mm512_loadu_ps(xc + m * kc + 16 * i), ac[m]);
    }
    const __m512 sv = chunk_scales<G>(sc + r * stride * ng, c, smk);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(ac[m], sv, acc[r][m]);
  };
  prefetch_next_zeros<R>(zp, ng, stride, wrap);
  for (int64_t c = 0; c < full; ++c) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(q + r * stride * row_bytes, 64 * c, row_bytes, wrap * row_bytes);
      prefetch_scales_ahead<G>(sc + r * stride * ng, c, ng, row_bytes, wrap);
      chunk(r, c, _mm512_loadu_si512(q + r * stride * row_bytes + 64 * c), kAllScales);
    }
  }
  if (full * kChunk < K) {   // 1 to 3 blocks left: masked lanes read 0 -> nibble 0 -> 0 * xp pad
    const int64_t blocks = (K - full * kChunk) / 32;
    const __mmask16 wmk = static_cast<__mmask16>((1u << (4 * blocks)) - 1);
    const __mmask8 smk = static_cast<__mmask8>((1u << (blocks * 32 / G)) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) chunk(r, full, _mm512_maskz_loadu_epi32(wmk, q + r * stride * row_bytes + 64 * full), smk);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    __m512 corr[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) corr[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 mk = ng - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (ng - g)) - 1);
      const __m512 sz = _mm512_mul_ps(bf16x16_to_f32(_mm256_maskz_loadu_epi16(mk, sc + r * stride * ng + g)),
                                      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zp + r * stride * ng + g))));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) corr[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mk, xsum + m * ng + g), corr[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = _mm512_reduce_add_ps(_mm512_sub_ps(acc[r][m], corr[m]));
      a.out[m * N + n0 + r * stride] = a.bias ? y + a.bias[n0 + r * stride] : y;
    }
  }
}

// dots[m0 + i, n0 + r] for M rows starting at m0 and R weight rows starting at n0.
template <int M, int R>
void w8a8_rows(const W8A8Args& a, int64_t m0, int64_t n0) {
  const int64_t K = a.w.k, N = a.w.n;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w.data) + n0 * K;
  __m512i acc[R][M];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mk = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
    __m512i xv[M];   // xq16 is zero-padded to kp, so full loads are safe
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(a.xq16 + (m0 + m) * a.kp + k);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w + r * K + k));
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_add_epi32(acc[r][m], _mm512_madd_epi16(wv, xv[m]));
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) a.dots[(m0 + m) * N + n0 + r] = _mm512_reduce_add_epi32(acc[r][m]);
}

template <int R>
void w8a8_block(const W8A8Args& a, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= a.m; m += 4) w8a8_rows<4, R>(a, m, n0);   // the R weight rows stay in L1 across m
  switch (a.m - m) {
    case 3: w8a8_rows<3, R>(a, m, n0); break;
    case 2: w8a8_rows<2, R>(a, m, n0); break;
    case 1: w8a8_rows<1, R>(a, m, n0); break;
    default: break;
  }
}

}  // namespace

void qgemv_f32_avx512(const QLinearArgs& a) { run_qgemv<8>(a); }

void qgemm_f32_avx512(const QLinearArgs& a) { run_qgemm<GemmTileAvx512>(a); }

void w8a8_dots_avx512(const W8A8Args& a) {
  constexpr int R = 4;
  const int64_t N = a.w.n, full = N / R, tasks = full + N % R;
  parallel_for(tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < full) w8a8_block<R>(a, t * R);
      else w8a8_block<1>(a, full * R + (t - full));
    }
  });
}

}  // namespace quark
