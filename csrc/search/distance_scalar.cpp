// Scalar path: the direct formulas, one pair at a time. Slow but exact enough to sit beside the
// SIMD paths as the portable fallback.
#include <cmath>

#include "common/threading.h"
#include "search/distance.h"

namespace quark {

void pairwise_distance_scalar(const DistanceArgs& a) {
  const int64_t d = a.d;
  parallel_for(a.nq, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* x = a.x + i * d;
      float xn = 0.f;
      for (int64_t k = 0; k < d; ++k) xn += x[k] * x[k];
      for (int64_t j = 0; j < a.nb; ++j) {
        const float* y = a.y + j * d;
        float r;
        if (a.metric == Metric::l2) {
          float s = 0.f;
          for (int64_t k = 0; k < d; ++k) { float t = x[k] - y[k]; s += t * t; }
          r = s;
        } else {
          float dot = 0.f, yn = 0.f;
          for (int64_t k = 0; k < d; ++k) { dot += x[k] * y[k]; yn += y[k] * y[k]; }
          if (a.metric == Metric::ip) r = -dot;
          else r = (xn > 0.f && yn > 0.f) ? 1.f - dot / (std::sqrt(xn) * std::sqrt(yn)) : 1.f;
        }
        a.out[i * a.ldo + j] = r;
      }
    }
  });
}

}  // namespace quark
