// Dispatch of the quantized linear family, and the ISA-independent halves of W8A8: per-token
// activation quantization before the integer kernels and the scaling epilogue after them. Both are
// compiled here with baseline flags only (no FMA contraction), so every ISA path rounds identically.
#include "quant/qlinear.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common/bf16.h"
#include "common/dispatch.h"
#include "common/threading.h"

#if QUARK_X86
#include <immintrin.h>
#endif

namespace quark {

static FamilyRegistration reg("quant", Isa::amx);

// f(i) for i < n, on the pool when `parallel` (in chunks of at least `grain`), else in this thread:
// decode-sized M stays serial, where starting the workers costs more than the work.
template <class F>
static void for_each(int64_t n, int64_t grain, bool parallel, F f) {
  auto range = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) f(i);
  };
  if (parallel) parallel_for(n, grain, range);
  else range(0, n);
}

// Runs `run` on fp32 I/O: bf16 x16 widened into a buffer, out16 rounded from one.
template <class Run>
static void with_f32_io(const QLinearArgs& a, Run run) {
  if (!a.x16 && !a.out16) return run(a);
  const int64_t M = a.m, K = a.w.k, N = a.w.n;
  std::vector<float> xf(a.x16 ? M * K : 0), of(a.out16 ? M * N : 0);
  QLinearArgs f = a;
  if (a.x16) {
    for_each(M * K, 4096, M > kGemvMaxRows, [&](int64_t i) { xf[i] = bf16_to_f32(a.x16[i]); });
    f.x = xf.data(), f.x16 = nullptr;
  }
  if (a.out16) f.out = of.data(), f.out16 = nullptr;
  run(f);
  if (a.out16) {
    for_each(M * N, 4096, M > kGemvMaxRows, [&](int64_t i) { a.out16[i] = f32_to_bf16(of[i]); });
  }
}

// Up to these M, weight-only runs the GEMV (in passes of up to 8 rows, qgemv.h) rather than the
// blocked GEMMs, which unpack the whole weight matrix on every call whatever M is. At 11008x4096 that
// costs ~7 ms on AMX and ~17 ms with AVX-512 / AVX2, against 0.5-0.8 ms per row of GEMV. Measured
// there with GEMV passes of 4 rows (GEMV / GEMM, ms, from DRAM; passes of 8 only widened the gaps):
//   AMX      int4 g32 M=8 5.4 / 8.1, M=12 8.0 / 7.1; g128 M=8 5.0 / 5.9, M=10 6.4 / 6.1;
//            int8 M=8 5.3 / 6.6, M=12 8.0 / 6.7; int4 with bf16 compute (the AMX GEMM rounds the
//            weights to bf16, see qlinear.h) M=5 4.1 / 5.2, M=6 5.1 / 5.2, M=8 5.3 / 4.7
//   AVX-512  int4 g32 M=32 26.8 / 27.6, M=48 40.4 / 33.4; int8 M=32 18.5 / 45.9, M=96 57 / 68
//   AVX2     int4 g32 M=16 16.5 / 22.7, M=32 32.4 / 30.7; int8 M=32 24.3 / 29.2
static int64_t gemv_max_rows(Isa isa, const QLinearArgs& a) {
  switch (isa) {
    case Isa::amx: return a.bf16_compute && a.w.scheme == QScheme::int4 ? 5 : 8;
    case Isa::avx2: return 16;
    default: return 32;   // avx512, avx512_bf16
  }
}

void qlinear_f32(const QLinearArgs& a) {
  if (a.m == 0 || a.w.n == 0) return;
#if QUARK_X86
  const Isa isa = family_isa(Isa::amx);
  const bool gemv = isa == Isa::scalar || a.m <= gemv_max_rows(isa, a);
  if (isa == Isa::amx && !gemv) return qgemm_f32_amx(a);   // reads and writes bf16 itself
  with_f32_io(a, [&](const QLinearArgs& f) {
    if (isa == Isa::scalar) return qgemv_f32_scalar(f);
    if (gemv) return isa == Isa::avx2 ? qgemv_f32_avx2(f) : qgemv_f32_avx512(f);
    return isa == Isa::avx2 ? qgemm_f32_avx2(f) : qgemm_f32_avx512(f);
  });
#else
  with_f32_io(a, qgemv_f32_scalar);
#endif
}

// W8A8 on fp32 I/O.
static void w8a8(const QLinearArgs& a) {
  if (a.m == 0 || a.w.n == 0) return;
  const int64_t M = a.m, N = a.w.n, K = a.w.k, kp = (K + 63) / 64 * 64;
  const Isa isa = family_isa(Isa::amx);
  // The int16 copy feeds the madd kernels; the VNNI and AMX GEMMs (M > 4) read the bytes only.
  const bool wide = !(M > kGemvMaxRows && isa >= Isa::avx512_bf16);
  std::vector<int8_t> xq(M * kp, 0);
  std::vector<int16_t> xq16(wide ? M * kp : 0, 0);
  std::vector<float> sx(M);
  // Per-token symmetric quantization: q = round_half_even(x * (127 / max|x|)), scale = max|x| / 127.
  // cvtss2si rounds half to even (the default MXCSR mode) without a libm call per element (lrintf,
  // the same rounding, elsewhere). A row with a NaN gets a NaN scale, so every output of the row is
  // NaN, as in a float linear (int8 has no NaN to carry it; cvtss2si would make it INT_MIN, which
  // casts to 0).
  for_each(M, 1, M > kGemvMaxRows, [&](int64_t m) {
    const float* x = a.x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::fabs(x[k]);
      amax = v > amax ? v : amax;
    }
    sx[m] = amax / 127.f;
    // Below 127 / FLT_MAX (~3.7e-37) 127 / amax overflows and the row would quantize to zeros: such a
    // row is quantized from a copy scaled by 2^100 (exact for these values, denormals included).
    std::vector<float> scaled;
    if (amax > 0.f && amax < 127.f / std::numeric_limits<float>::max()) {
      scaled.assign(x, x + K);
      for (float& v : scaled) v *= 0x1p100f;
      x = scaled.data(), amax *= 0x1p100f;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      nan |= x[k] != x[k];
#if QUARK_X86
      const int8_t q = static_cast<int8_t>(_mm_cvtss_si32(_mm_set_ss(x[k] * inv)));
#else
      const int8_t q = static_cast<int8_t>(std::lrintf(x[k] * inv));
#endif
      xq[m * kp + k] = q;
      if (wide) xq16[m * kp + k] = q;
    }
    if (nan) sx[m] = std::numeric_limits<float>::quiet_NaN();
  });
  std::unique_ptr<int32_t[]> dots(new int32_t[M * N]);   // every entry is written by the kernel
  W8A8Args w{xq.data(), xq16.data(), M, kp, a.w, dots.get()};
#if QUARK_X86
  switch (isa) {
    case Isa::scalar: w8a8_dots_scalar(w); break;
    case Isa::avx2: w8a8_dots_avx2(w); break;
    case Isa::avx512: w8a8_dots_avx512(w); break;
    case Isa::avx512_bf16: w8a8_dots_avx512_bf16(w); break;
    default: M > kGemvMaxRows ? w8a8_dots_amx(w) : w8a8_dots_avx512_bf16(w); break;
  }
#else
  w8a8_dots_scalar(w);
#endif
  for_each(M, 1, M > kGemvMaxRows, [&](int64_t m) {
    for (int64_t n = 0; n < N; ++n) {
      // dots first: sx * sw of a tiny row is denormal and would keep only a few digits
      const float y = static_cast<float>(dots[m * N + n]) * sx[m] * a.w.scales[n];
      a.out[m * N + n] = a.bias ? y + a.bias[n] : y;
    }
  });
}

void qlinear_w8a8(const QLinearArgs& a) { with_f32_io(a, w8a8); }

}  // namespace quark
