// AVX-512 BF16 path: vdpbf16ps multiplies 32 bf16 weights by 32 bf16 x values pairwise and adds each
// pair's two exact products into one of 16 fp32 lanes: no widening of W at all. The last K % 32
// columns load masked (zeros add nothing).
#include <immintrin.h>

#include "quant/gemv_bf16_driver.h"

namespace quark {
namespace {

struct Bf16Dot {
  static constexpr int kStep = 32, kRows = 8;
  using Acc = __m512;
  using X = __m512bh;
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __mmask32 mask(int n) { return n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }
  static X load_x(const uint16_t* p, int n) { return (__m512bh)_mm512_maskz_loadu_epi16(mask(n), p); }
  static Acc madd(Acc acc, const uint16_t* w, X x, int n) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mask(n), w), x);
  }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};

}  // namespace

void gemv_bf16_avx512_bf16(const GemvBf16Args& a) { run_gemv_bf16<Bf16Dot>(a); }

}  // namespace quark
