// Dispatch of the quantized linear family, and the ISA-independent halves of W8A8: per-token
// activation quantization before the integer kernels and the scaling epilogue after them. Both are
// compiled here with baseline flags only (no FMA contraction), so every ISA path rounds identically.
#include "quant/qlinear.h"

#include <cmath>
#include <vector>

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("quant", Isa::avx512_bf16);

void qlinear_f32(const QLinearArgs& a) {
  if (a.m == 0 || a.w.n == 0) return;
  const Isa isa = family_isa(Isa::avx512_bf16);
  if (isa == Isa::scalar) return qgemv_f32_scalar(a);
  if (a.m <= kGemvMaxRows) return isa == Isa::avx2 ? qgemv_f32_avx2(a) : qgemv_f32_avx512(a);
  return isa == Isa::avx2 ? qgemm_f32_avx2(a) : qgemm_f32_avx512(a);
}

void qlinear_w8a8(const QLinearArgs& a) {
  if (a.m == 0 || a.w.n == 0) return;
  const int64_t M = a.m, N = a.w.n, K = a.w.k, kp = (K + 63) / 64 * 64;
  std::vector<int8_t> xq(M * kp, 0);
  std::vector<int16_t> xq16(M * kp, 0);
  std::vector<float> sx(M);
  // Per-token symmetric quantization: q = round_half_even(x * (127 / max|x|)), scale = max|x| / 127.
  // Decode-sized M stays serial: a parallel region (fork + barrier) costs more than the work there.
#pragma omp parallel for schedule(static) if (M > kGemvMaxRows)
  for (int64_t m = 0; m < M; ++m) {
    const float* x = a.x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(x[k]));
    sx[m] = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t q = static_cast<int8_t>(std::nearbyint(x[k] * inv));
      xq[m * kp + k] = q;
      xq16[m * kp + k] = q;
    }
  }
  std::vector<int32_t> dots(M * N);
  W8A8Args w{xq.data(), xq16.data(), M, kp, a.w, dots.data()};
  switch (family_isa(Isa::avx512_bf16)) {
    case Isa::scalar: w8a8_dots_scalar(w); break;
    case Isa::avx2: w8a8_dots_avx2(w); break;
    case Isa::avx512: w8a8_dots_avx512(w); break;
    default: w8a8_dots_avx512_bf16(w); break;
  }
#pragma omp parallel for schedule(static) if (M > kGemvMaxRows)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const float y = static_cast<float>(dots[m * N + n]) * (sx[m] * a.w.scales[n]);
      a.out[m * N + n] = a.bias ? y + a.bias[n] : y;
    }
  }
}

}  // namespace quark
