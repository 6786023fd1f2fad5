// AVX2 path: the AVX-512 design at 8 lanes.
// GEMV int8: 8 bytes -> vpmovsxbd -> cvt -> FMA (scalar tail for K % 8). int4: each 32-weight block is
// two 8-byte loads, each unpacking into weights [b+8h, b+8h+8) (low nibbles) and [b+16+8h, ...) (high).
// GEMM: 6 x 16 tile (12 ymm accumulators) over dequantized panels. W8A8: int16 vpmaddwd row dots.
#include <immintrin.h>

#include "common/gemm_f32_avx2.h"
#include "quant/qgemm_blocked.h"
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
void gemv_int8_rows(const QLinearArgs& a, int64_t n0) {
  const int64_t K = a.w.k, N = a.w.n;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w.data) + n0 * K;
  __m256 acc[R][M];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[M];
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(a.x + m * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * K + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      float y = hsum(acc[r][m]);
      for (int64_t t = k; t < K; ++t) y += static_cast<float>(w[r * K + t]) * a.x[m * K + t];
      y *= a.w.scales[n0 + r];
      a.out[m * N + n0 + r] = a.bias ? y + a.bias[n0 + r] : y;
    }
}

template <int M, int R>
void gemv_int4_rows(const QLinearArgs& a, int64_t n0) {
  const int64_t K = a.w.k, N = a.w.n, G = a.w.group, ng = K / G, row_bytes = K / 2;
  const uint8_t* q = a.w.data + n0 * row_bytes;
  const float* sc = a.w.scales + n0 * ng;
  const uint8_t* zp = a.w.zeros + n0 * ng;
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 acc[R][M];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256i zv[R];
    __m256 sv[R];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      zv[r] = _mm256_set1_epi32(zp[r * ng + g]);
      sv[r] = _mm256_set1_ps(sc[r * ng + g]);
    }
    for (int64_t b = g * G; b < (g + 1) * G; b += 32) {
      #pragma GCC unroll 8
      for (int h = 0; h < 2; ++h) {
        __m256 x0[M], x1[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          x0[m] = _mm256_loadu_ps(a.x + m * K + b + 8 * h);
          x1[m] = _mm256_loadu_ps(a.x + m * K + b + 16 + 8 * h);
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i v = _mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r * row_bytes + b / 2 + 8 * h)));
          const __m256 w0 =
              _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, low4), zv[r])), sv[r]);
          const __m256 w1 =
              _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), zv[r])), sv[r]);
          #pragma GCC unroll 8
          for (int m = 0; m < M; ++m) {
            acc[r][m] = _mm256_fmadd_ps(w0, x0[m], acc[r][m]);
            acc[r][m] = _mm256_fmadd_ps(w1, x1[m], acc[r][m]);
          }
        }
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = hsum(acc[r][m]);
      a.out[m * N + n0 + r] = a.bias ? y + a.bias[n0 + r] : y;
    }
}

template <int M, int R>
void gemv_rows(const QLinearArgs& a, int64_t n0) {
  if (a.w.scheme == QScheme::int8) gemv_int8_rows<M, R>(a, n0);
  else gemv_int4_rows<M, R>(a, n0);
}

template <int M>
void gemv(const QLinearArgs& a) {
  constexpr int R = M == 1 ? 4 : 2;   // R x M accumulators plus zero/scale/x vectors fit 16 ymm
  const int64_t N = a.w.n, full = N / R, tasks = full + N % R;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    if (t < full) gemv_rows<M, R>(a, t * R);
    else gemv_rows<M, 1>(a, full * R + (t - full));
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

void qgemv_f32_avx2(const QLinearArgs& a) {
  switch (a.m) {
    case 1: return gemv<1>(a);
    case 2: return gemv<2>(a);
    case 3: return gemv<3>(a);
    default: return gemv<4>(a);
  }
}

void qgemm_f32_avx2(const QLinearArgs& a) { run_qgemm<GemmTileAvx2>(a); }

void w8a8_dots_avx2(const W8A8Args& a) {
  constexpr int R = 4;
  const int64_t N = a.w.n, full = N / R, tasks = full + N % R;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    if (t < full) w8a8_block<R>(a, t * R);
    else w8a8_block<1>(a, full * R + (t - full));
  }
}

}  // namespace quark
