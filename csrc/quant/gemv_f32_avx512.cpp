// AVX-512 path: R weight rows at a time, 16 floats per load, one accumulator per (weight row, x row):
// R x M independent FMA chains, each x vector loaded once per step and reused R times. Above M = 2
// that is more accumulators than zmm registers and some live in L1; measured on Zen 4 that still
// beats fewer streams (M = 4, 32000 x 1024: ~30 GB/s with R = 8 vs ~25 with R = 4).
#include <immintrin.h>

#include "common/threading.h"
#include "quant/gemv_f32.h"

namespace quark {
namespace {

template <int M, int R>
void rows(const GemvF32Args& a, int64_t n0) {
  const int64_t K = a.k, N = a.n;
  const float* w = a.w + n0 * K;
  __m512 acc[R][M];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, a.x + m * K + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mk, w + r * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = _mm512_reduce_add_ps(acc[r][m]);
      a.out[m * N + n0 + r] = a.bias ? y + a.bias[n0 + r] : y;
    }
}

// Threads over N in blocks of R rows, runs of consecutive blocks per chunk (threading.h).
// R = 8 streams per thread measured fastest on Zen 4 (about 1.5x R = 2, whose two streams 4 KB apart
// alias); software prefetch measured slower than the hardware prefetcher on these sequential rows.
template <int M>
void gemv(const GemvF32Args& a) {
  constexpr int R = M <= 4 ? 8 : 4;
  const int64_t full = a.n / R, tasks = full + a.n % R;
  parallel_for(tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < full) rows<M, R>(a, t * R);
      else rows<M, 1>(a, full * R + (t - full));
    }
  });
}

}  // namespace

void gemv_f32_avx512(const GemvF32Args& a) {
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
