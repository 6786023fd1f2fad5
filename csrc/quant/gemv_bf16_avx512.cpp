// AVX-512 path (no BF16 instructions): 16 weights per step widened to fp32 with one shift, fp32 FMAs.
// The last K % 16 columns load masked (zeros add nothing).
#include <immintrin.h>

#include "quant/gemv_bf16_driver.h"

namespace quark {
namespace {

struct Widen16 {
  static constexpr int kStep = 16, kRows = 8;
  using Acc = __m512;
  using X = __m512;
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 load(const uint16_t* p, int n) {
    const __mmask16 mk = n == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(mk, p));
  }
  static X load_x(const uint16_t* p, int n) { return load(p, n); }
  static Acc madd(Acc acc, const uint16_t* w, X x, int n) { return _mm512_fmadd_ps(load(w, n), x, acc); }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};

}  // namespace

void gemv_bf16_avx512(const GemvBf16Args& a) { run_gemv_bf16<Widen16>(a); }

}  // namespace quark
