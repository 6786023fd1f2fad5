// AVX-512 path (F/BW/DQ/VL).
// GEMV: R weight rows at a time (R independent streams, R x M accumulators), 16 weights per vector:
//   int8  16 bytes -> vpmovsxbd -> cvt -> FMA; the row scale is applied once after the reduction.
//   int4  16 bytes = 32 weights -> vpmovzxbd, AND 15 / shift 4 (the two runs of 16, see qlinear.h),
//         cvt, FMA into a per-group accumulator; scale and zero point applied once per group.
// GEMM: 8 x 32 register tile (16 zmm accumulators) over dequantized panels (qgemm_blocked.h).
// W8A8 without VNNI: int8 -> int16 and vpmaddwd (pairs into int32, no saturation), exact.
#include <immintrin.h>

#include <vector>

#include "common/gemm_f32_avx512.h"
#include "quant/qgemm_blocked.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

template <int M, int R>
void gemv_int8_rows(const QLinearArgs& a, int64_t n0) {
  const int64_t K = a.w.k, N = a.w.n;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w.data) + n0 * K;
  __m512 acc[R][M];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[M];
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(a.x + m * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[M];
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, a.x + m * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_maskz_loadu_epi8(mk, w + r * K + k);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = _mm512_reduce_add_ps(acc[r][m]) * a.w.scales[n0 + r];
      a.out[m * N + n0 + r] = a.bias ? y + a.bias[n0 + r] : y;
    }
}

// int4 with the zero point and scale outside the inner loop: per group g of row n,
//   sum_k (q - z) s x_k = s * (sum_k q x_k) - s z * xsum[g],   xsum[g] = sum of x over the group,
// so the hot loop is unpack, cvt and FMA only (q >= 0 and z are small integers: the cancellation costs
// a few ulps at most). xsum (M, ng) is computed once per call; the correction sum_g s z xsum[g] is a
// 16-groups-wide dot product per row.
template <int M, int R>
void gemv_int4_rows(const QLinearArgs& a, int64_t n0, const float* xsum) {
  const int64_t K = a.w.k, N = a.w.n, G = a.w.group, ng = K / G, row_bytes = K / 2;
  const uint8_t* q = a.w.data + n0 * row_bytes;
  const float* sc = a.w.scales + n0 * ng;
  const uint8_t* zp = a.w.zeros + n0 * ng;
  const __m512i low4 = _mm512_set1_epi32(15);
  __m512 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 ag[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) ag[r][m] = _mm512_setzero_ps();
    for (int64_t b = g * G; b < (g + 1) * G; b += 32) {
      __m512 x0[M], x1[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        x0[m] = _mm512_loadu_ps(a.x + m * K + b);
        x1[m] = _mm512_loadu_ps(a.x + m * K + b + 16);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i v =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * row_bytes + b / 2)));
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, low4));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          ag[r][m] = _mm512_fmadd_ps(w0, x0[m], ag[r][m]);
          ag[r][m] = _mm512_fmadd_ps(w1, x1[m], ag[r][m]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(sc[r * ng + g]);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(ag[r][m], sv, acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m512 corr[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) corr[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 mk = ng - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (ng - g)) - 1);
      const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sc + r * ng + g),
                                      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zp + r * ng + g))));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) corr[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mk, xsum + m * ng + g), corr[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = _mm512_reduce_add_ps(acc[r][m]) - _mm512_reduce_add_ps(corr[m]);
      a.out[m * N + n0 + r] = a.bias ? y + a.bias[n0 + r] : y;
    }
  }
}

template <int M, int R>
void gemv_rows(const QLinearArgs& a, int64_t n0, const float* xsum) {
  if (a.w.scheme == QScheme::int8) gemv_int8_rows<M, R>(a, n0);
  else gemv_int4_rows<M, R>(a, n0, xsum);
}

// Threads over N: a static schedule gives each thread one contiguous slab of rows to stream.
template <int M>
void gemv(const QLinearArgs& a) {
  constexpr int R = M <= 2 ? 4 : 2;   // R x M accumulators plus zero/scale/x vectors fit 32 zmm
  const int64_t N = a.w.n, full = N / R, tasks = full + N % R;
  std::vector<float> xsum;   // (M, K / G) group sums of x for the int4 zero points
  if (a.w.scheme == QScheme::int4) {
    const int64_t K = a.w.k, G = a.w.group, ng = K / G;
    xsum.assign(M * ng, 0.f);
    for (int m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xsum[m * ng + k / G] += a.x[m * K + k];
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    if (t < full) gemv_rows<M, R>(a, t * R, xsum.data());
    else gemv_rows<M, 1>(a, full * R + (t - full), xsum.data());
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

void qgemv_f32_avx512(const QLinearArgs& a) {
  switch (a.m) {
    case 1: return gemv<1>(a);
    case 2: return gemv<2>(a);
    case 3: return gemv<3>(a);
    default: return gemv<4>(a);
  }
}

void qgemm_f32_avx512(const QLinearArgs& a) { run_qgemm<GemmTileAvx512>(a); }

void w8a8_dots_avx512(const W8A8Args& a) {
  constexpr int R = 4;
  const int64_t N = a.w.n, full = N / R, tasks = full + N % R;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    if (t < full) w8a8_block<R>(a, t * R);
    else w8a8_block<1>(a, full * R + (t - full));
  }
}

}  // namespace quark
