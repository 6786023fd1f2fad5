// Scalar path: the plain definition, for any M; the fallback on CPUs without AVX2.
#include "common/threading.h"
#include "quant/gemv_f32.h"

namespace quark {

void gemv_f32_scalar(const GemvF32Args& a) {
  const int64_t M = a.m, N = a.n, K = a.k;
  parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* w = a.w + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* x = a.x + m * K;
        float y = 0.f;
        for (int64_t k = 0; k < K; ++k) y += w[k] * x[k];
        a.out[m * N + n] = a.bias ? y + a.bias[n] : y;
      }
    }
  });
}

}  // namespace quark
