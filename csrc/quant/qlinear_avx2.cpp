// AVX2 path: the AVX-512 design at 8 lanes.
// GEMV int8: 8 bytes -> vpmovsxbd -> cvt -> FMA (scalar tail for K % 8). int4: the AVX-512 chunk order
// (qgemv.h) in two halves, with AND + cvt where AVX-512 has vpermps (AVX2 has no 16-entry permute).
// GEMM: 6 x 16 tile (12 ymm accumulators) over dequantized panels. W8A8: int16 vpmaddwd row dots.
#include <immintrin.h>

#include <algorithm>

#include "common/bf16.h"
#include "common/gemm_f32_avx2.h"
#include "common/threading.h"
#include "quant/qgemm_blocked.h"
#include "quant/qgemv.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int M, int R>
void gemv_int8_rows(const QLinearArgs& a, int64_t n0, int64_t stride, int64_t wrap) {
  const int64_t K = a.w.k, N = a.w.n;
  const uint8_t* w = a.w.data + n0 * K;
  __m256 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  auto step = [&](int r, int64_t k) {
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * stride * K + k))));
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.x + m * K + k), acc[r][m]);
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * stride * K, k, K, wrap * K);
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) step(r, k + 8 * u);
    }
  }
  for (; k + 8 <= K; k += 8)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) step(r, k);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      float y = hsum(acc[r][m]);
      for (int64_t t = k; t < K; ++t) y += static_cast<float>(static_cast<int8_t>(w[r * stride * K + t])) * a.x[m * K + t];
      y *= a.w.scales[n0 + r * stride];
      a.out[m * N + n0 + r * stride] = a.bias ? y + a.bias[n0 + r * stride] : y;
    }
}

// int4, chunks of 128 weights (qgemv.h) as two halves of 8 dwords: nibble i of half h is
// cvt((v >> 4i) & 15), against xp[c + 16 i + 8 h ..]. Lane d of half h belongs to block 2h + d/4.
template <int G>
inline __m256 half_scales(const uint16_t* s, int64_t c, int h, int64_t blocks) {
  if constexpr (G == 32) {
    const uint16_t* p = s + 4 * c + 2 * h;
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(bf16_to_f32(p[0]))),
                                _mm_set1_ps(blocks > 2 * h + 1 ? bf16_to_f32(p[1]) : 0.f), 1);
  } else if constexpr (G == 64) {
    return _mm256_set1_ps(bf16_to_f32(s[2 * c + h]));
  } else {
    static_assert(G == 128);
    return _mm256_set1_ps(bf16_to_f32(s[c]));
  }
}

template <int M, int R, int G>
void gemv_int4_rows(const QLinearArgs& a, int64_t n0, int64_t stride, int64_t wrap, const float* xp, int64_t kc,
                    const float* xsum) {
  const int64_t K = a.w.k, N = a.w.n, ng = K / G, row_bytes = K / 2, nchunks = (K + kChunk - 1) / kChunk;
  const uint8_t* q = a.w.data + n0 * row_bytes;
  const uint16_t* sc = a.w.scales16 + n0 * ng;
  const uint8_t* zp = a.w.zeros + n0 * ng;
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  prefetch_next_zeros<R>(zp, ng, stride, wrap);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t blocks = std::min<int64_t>(4, (K - kChunk * c) / 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = q + r * stride * row_bytes + 64 * c;
      if (blocks == 4) {
        prefetch_ahead(q + r * stride * row_bytes, 64 * c, row_bytes, wrap * row_bytes);
        prefetch_scales_ahead<G>(sc + r * stride * ng, c, ng, row_bytes, wrap);
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        if (2 * h >= blocks) break;
        const __m256i v = blocks >= 2 * h + 2
                              ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h))
                              : _mm256_maskload_epi32(reinterpret_cast<const int*>(src + 32 * h),
                                                      _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
        const float* xc = xp + kChunk * c + 8 * h;
        __m256 ac[M];
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, low4));
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) ac[m] = _mm256_mul_ps(w0, _mm256_loadu_ps(xc + m * kc));
#pragma GCC unroll 8
        for (int i = 1; i < 8; ++i) {
          const __m256i sh = _mm256_srli_epi32(v, 4 * i);
          const __m256 wi = _mm256_cvtepi32_ps(i == 7 ? sh : _mm256_and_si256(sh, low4));
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) ac[m] = _mm256_fmadd_ps(wi, _mm256_loadu_ps(xc + m * kc + 16 * i), ac[m]);
        }
        const __m256 sv = half_scales<G>(sc + r * stride * ng, c, h, blocks);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(ac[m], sv, acc[r][m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m256 corr[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) corr[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
      const __m256 s = bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + r * stride * ng + g)));
      const __m256 sz = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + r * stride * ng + g)))));
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) corr[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xsum + m * ng + g), corr[m]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      float y = hsum(_mm256_sub_ps(acc[r][m], corr[m]));
      for (int64_t t = g; t < ng; ++t) y -= bf16_to_f32(sc[r * stride * ng + t]) * static_cast<float>(zp[r * stride * ng + t]) * xsum[m * ng + t];
      a.out[m * N + n0 + r * stride] = a.bias ? y + a.bias[n0 + r * stride] : y;
    }
  }
}

template <int M, int R>
void w8a8_rows(const W8A8Args& a, int64_t m0, int64_t n0) {
  const int64_t K = a.w.k, N = a.w.n;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w.data) + n0 * K;
  __m256i acc[R][M];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i xv[M];
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq16 + (m0 + m) * a.kp + k));
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv, xv[m]));
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      int32_t d = hsum_epi32(acc[r][m]);
      for (int64_t t = k; t < K; ++t) d += static_cast<int32_t>(w[r * K + t]) * a.xq[(m0 + m) * a.kp + t];
      a.dots[(m0 + m) * N + n0 + r] = d;
    }
}

template <int R>
void w8a8_block(const W8A8Args& a, int64_t n0) {
  int64_t m = 0;
  for (; m + 2 <= a.m; m += 2) w8a8_rows<2, R>(a, m, n0);
  if (m < a.m) w8a8_rows<1, R>(a, m, n0);
}

}  // namespace

void qgemv_f32_avx2(const QLinearArgs& a) { run_qgemv<4>(a); }

void qgemm_f32_avx2(const QLinearArgs& a) { run_qgemm<GemmTileAvx2>(a); }

void w8a8_dots_avx2(const W8A8Args& a) {
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
