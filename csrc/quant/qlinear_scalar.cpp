// Scalar path: the plain definition of every format, for any M. It is the fallback on CPUs without
// AVX2 and the readable statement of what the SIMD paths compute.
#include "common/bf16.h"
#include "common/threading.h"
#include "quant/qlinear.h"

namespace quark {

void qgemv_f32_scalar(const QLinearArgs& a) {
  const int64_t M = a.m, N = a.w.n, K = a.w.k, G = a.w.group, ngroups = K / G;
  parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        const float* x = a.x + m * K;
        float y = 0.f;
        if (a.w.scheme == QScheme::int8) {
          const int8_t* w = reinterpret_cast<const int8_t*>(a.w.data) + n * K;
          for (int64_t k = 0; k < K; ++k) y += static_cast<float>(w[k]) * x[k];
          y *= a.w.scales[n];
        } else {
          const uint8_t* q = a.w.data + n * (K / 2);
          for (int64_t g = 0; g < ngroups; ++g) {
            const int z = a.w.zeros[n * ngroups + g];
            const float s = bf16_to_f32(a.w.scales16[n * ngroups + g]);
            for (int64_t k = g * G; k < (g + 1) * G; ++k) {
              const uint8_t byte = q[(k / 32) * 16 + (k % 16)];
              const int v = (k % 32) < 16 ? (byte & 15) : (byte >> 4);
              y += static_cast<float>(v - z) * s * x[k];
            }
          }
        }
        a.out[m * N + n] = a.bias ? y + a.bias[n] : y;
      }
    }
  });
}

void w8a8_dots_scalar(const W8A8Args& a) {
  const int64_t N = a.w.n, K = a.w.k;
  parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = reinterpret_cast<const int8_t*>(a.w.data) + n * K;
      for (int64_t m = 0; m < a.m; ++m) {
        const int8_t* x = a.xq + m * a.kp;
        int32_t d = 0;
        for (int64_t k = 0; k < K; ++k) d += static_cast<int32_t>(w[k]) * x[k];
        a.dots[m * N + n] = d;
      }
    }
  });
}

}  // namespace quark
