// AVX2 path: 8 weights per step widened to fp32 with one shift, fp32 FMAs; 16 ymm registers, so half
// the AVX-512 rows per block. The last K % 8 columns go through a zero-padded copy.
#include <immintrin.h>

#include <cstring>

#include "quant/gemv_bf16_driver.h"

namespace quark {
namespace {

struct Widen8 {
  static constexpr int kStep = 8, kRows = 4;
  using Acc = __m256;
  using X = __m256;
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 load(const uint16_t* p, int n) {
    if (n == 8) return bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    uint16_t pad[8] = {};
    std::memcpy(pad, p, n * sizeof(uint16_t));
    return bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pad)));
  }
  static X load_x(const uint16_t* p, int n) { return load(p, n); }
  static Acc madd(Acc acc, const uint16_t* w, X x, int n) { return _mm256_fmadd_ps(load(w, n), x, acc); }
  static float sum(Acc v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
};

}  // namespace

void gemv_bf16_avx2(const GemvBf16Args& a) { run_gemv_bf16<Widen8>(a); }

}  // namespace quark
