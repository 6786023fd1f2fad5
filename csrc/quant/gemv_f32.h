// fp32 GEMV for decode-sized batches: out (M, N) = x (M, K) . W^T (+ bias), W (N, K) row-major fp32.
//
// At a few rows a linear layer is memory bound: every weight is read once and used M times, so the
// speed is bytes of W per second. The kernels stream R = 1..8 weight rows at a time (R sequential
// streams the hardware prefetcher follows), keep R x M accumulators in registers (independent FMA
// chains that hide the FMA latency) and thread over N so every core streams its own slab of rows.
// Any M is accepted; the SIMD drivers take x in chunks of at most kGemvF32Rows rows (larger M belongs
// to a GEMM: quark.ops.linear sends it to torch).
#pragma once
#include <cstdint>

namespace quark {

struct GemvF32Args {
  const float* x;      // (M, K) row-major
  const float* w;      // (N, K) row-major
  const float* bias;   // (N,) or nullptr
  float* out;          // (M, N) row-major
  int64_t m, n, k;
};

constexpr int64_t kGemvF32Rows = 8;

void gemv_f32(const GemvF32Args& a);   // dispatches on current_isa(); threads: threading.h

void gemv_f32_scalar(const GemvF32Args& a);
void gemv_f32_avx2(const GemvF32Args& a);     // M <= kGemvF32Rows
void gemv_f32_avx512(const GemvF32Args& a);   // M <= kGemvF32Rows

}  // namespace quark
