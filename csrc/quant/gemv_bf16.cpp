// Dispatch of the bf16 GEMV family: the SIMD kernels take up to kGemvBf16Rows rows of x per call.
#include "quant/gemv_bf16.h"

#include <algorithm>

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("gemv_bf16", Isa::avx512_bf16);

void gemv_bf16(const GemvBf16Args& a) {
  if (a.m == 0 || a.n == 0) return;
#if QUARK_X86
  const Isa isa = family_isa(Isa::avx512_bf16);
  if (isa == Isa::scalar) return gemv_bf16_scalar(a);
  for (int64_t m0 = 0; m0 < a.m; m0 += kGemvBf16Rows) {
    GemvBf16Args c = a;
    c.x = a.x + m0 * a.k;
    c.out = a.out + m0 * a.n;
    c.m = std::min(kGemvBf16Rows, a.m - m0);
    if (isa == Isa::avx2) gemv_bf16_avx2(c);
    else if (isa == Isa::avx512) gemv_bf16_avx512(c);
    else gemv_bf16_avx512_bf16(c);
  }
#else
  gemv_bf16_scalar(a);
#endif
}

}  // namespace quark
