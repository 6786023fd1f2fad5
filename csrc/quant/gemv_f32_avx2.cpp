// AVX2 path: as the AVX-512 one with 8-float vectors and 16 ymm registers, so fewer rows per block
// (R x M <= 12 accumulators; x is read from L1 inside the FMAs); the last K % 8 columns are summed in scalar.
#include <immintrin.h>

#include "common/threading.h"
#include "quant/gemv_f32.h"

namespace quark {
namespace {

float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int M, int R>
void rows(const GemvF32Args& a, int64_t n0) {
  const int64_t K = a.k, N = a.n;
  const float* w = a.w + n0 * K;
  __m256 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.x + m * K + k), acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      float y = hsum(acc[r][m]);
      for (int64_t j = k; j < K; ++j) y += w[r * K + j] * a.x[m * K + j];
      a.out[m * N + n0 + r] = a.bias ? y + a.bias[n0 + r] : y;
    }
}

template <int M>
void gemv(const GemvF32Args& a) {
  constexpr int R = M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 3 : 1;
  const int64_t full = a.n / R, tasks = full + a.n % R;
  parallel_for(tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < full) rows<M, R>(a, t * R);
      else rows<M, 1>(a, full * R + (t - full));
    }
  });
}

}  // namespace

void gemv_f32_avx2(const GemvF32Args& a) {
  switch (a.m) {
    case 1: return gemv<1>(a);
    case 2: return gemv<2>(a);
    case 3: return gemv<3>(a);
    case 4: return gemv<4>(a);
    case 5: return gemv<5>(a);
    case 6: return gemv<6>(a);
    case 7: return gemv<7>(a);
    default: return gemv<8>(a);
  }
}

}  // namespace quark
