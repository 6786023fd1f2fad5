// Dispatch of the fp32 GEMV family: the SIMD kernels take up to kGemvF32Rows rows of x per call.
#include "quant/gemv_f32.h"

#include <algorithm>

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("gemv_f32", Isa::avx512);

void gemv_f32(const GemvF32Args& a) {
  if (a.m == 0 || a.n == 0) return;
#if QUARK_X86
  const Isa isa = family_isa(Isa::avx512);
  if (isa == Isa::scalar) return gemv_f32_scalar(a);
  for (int64_t m0 = 0; m0 < a.m; m0 += kGemvF32Rows) {
    GemvF32Args c = a;
    c.x = a.x + m0 * a.k;
    c.out = a.out + m0 * a.n;
    c.m = std::min(kGemvF32Rows, a.m - m0);
    if (isa == Isa::avx2) gemv_f32_avx2(c);
    else gemv_f32_avx512(c);
  }
#else
  gemv_f32_scalar(a);
#endif
}

}  // namespace quark
