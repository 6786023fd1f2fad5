// Scalar path: the plain definition, for any M; the fallback on CPUs without AVX2.
#include "common/bf16.h"
#include "common/threading.h"
#include "quant/gemv_bf16.h"

namespace quark {

void gemv_bf16_scalar(const GemvBf16Args& a) {
  const int64_t M = a.m, N = a.n, K = a.k;
  parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* w = a.w + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const uint16_t* x = a.x + m * K;
        float y = 0.f;
        for (int64_t k = 0; k < K; ++k) y += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
        a.out[m * N + n] = f32_to_bf16(a.bias ? y + bf16_to_f32(a.bias[n]) : y);
      }
    }
  });
}

}  // namespace quark
