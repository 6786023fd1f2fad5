// AVX-512 vector traits for the blocked attention driver (attention_blocked.h): 16 fp32 lanes, a
// 6 x 64 register tile (24 zmm accumulators), exp2 by range reduction + polynomial + vscalefps.
// Included by attention_avx512.cpp and attention_avx512_bf16.cpp; anonymous namespace because the
// same code is compiled under different -m flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/bf16.h"

namespace quark {
namespace {

struct VecAvx512 {
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 6, NVMAX = 4;  // 24 accumulators + 4 panel vectors + 1 broadcast <= 32 zmm

  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static float hmax(reg x) { return _mm512_reduce_max_ps(x); }

  static reg load_bf16(const uint16_t* p) {
    return bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }

  // 2^x with relative error ~1e-7; exactly 0 below -126 (so -inf, the mask value, gives 0).
  // x = n + f with n = round(x), |f| <= 0.5, 2^f by its degree-6 Taylor series in f*ln2.
  static reg exp2(reg x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(127.f));
    const reg n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm512_sub_ps(x, n);
    reg p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(live, p, n);
  }
};

}  // namespace
}  // namespace quark
