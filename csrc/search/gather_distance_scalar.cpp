// Scalar path: the formulas of gather_distance.h, one dimension at a time (the portable fallback
// and the reference the SIMD paths are tested against).
#include "search/gather_distance.h"

namespace quark {
namespace {

void l2_f32(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    const float* y = static_cast<const float*>(base) + idx[i] * d;
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) { float t = q.q[k] - y[k]; s += t * t; }
    out[i] = s;
  }
}

void ip_f32(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    const float* y = static_cast<const float*>(base) + idx[i] * d;
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += q.q[k] * y[k];
    out[i] = -s;
  }
}

void l2_sq8(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    const uint8_t* c = static_cast<const uint8_t*>(base) + idx[i] * d;
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) { float t = q.q[k] - float(c[k]); s += q.w[k] * t * t; }
    out[i] = s;
  }
}

void ip_sq8(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    const uint8_t* c = static_cast<const uint8_t*>(base) + idx[i] * d;
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += q.q[k] * float(c[k]);
    out[i] = -(s + q.bias);
  }
}

}  // namespace

const GatherKernels& gather_kernels_scalar() {
  static const GatherKernels k{l2_f32, ip_f32, l2_sq8, ip_sq8};
  return k;
}

}  // namespace quark
