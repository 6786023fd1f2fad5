// bf16 GEMV for decode-sized batches: out (M, N) = x (M, K) . W^T (+ bias), all bfloat16, fp32 sums.
//
// A bf16 model's linear layers at decode: every weight is read once per call (half fp32's bytes), so
// the speed is bytes of W per second, as for gemv_f32. torch's bf16 matmul at one row widens W to
// fp32 in a compute-bound loop (on the AVX-512 dev box about 60% of its fp32 GEMV's rate, though it
// reads half the bytes); these kernels stream R rows at a time with fp32 accumulators in registers:
// AVX-512 BF16 multiplies bf16 pairs directly (vdpbf16ps: products exact, fp32 sums), AVX-512 and
// AVX2 widen W with one shift per vector. Each output is rounded to bf16 once (round to nearest even),
// after the bias: torch's bf16 linear rounds its fp32 result once too.
// The SIMD drivers take x in chunks of at most kGemvBf16Rows rows (more rows belong to a GEMM).
#pragma once
#include <cstdint>

namespace quark {

struct GemvBf16Args {
  const uint16_t* x;      // (M, K) row-major bf16
  const uint16_t* w;      // (N, K) row-major bf16
  const uint16_t* bias;   // (N,) bf16 or nullptr
  uint16_t* out;          // (M, N) row-major bf16
  int64_t m, n, k;
};

constexpr int64_t kGemvBf16Rows = 8;

void gemv_bf16(const GemvBf16Args& a);   // dispatches on current_isa(); threads: threading.h

void gemv_bf16_scalar(const GemvBf16Args& a);
void gemv_bf16_avx2(const GemvBf16Args& a);          // M <= kGemvBf16Rows
void gemv_bf16_avx512(const GemvBf16Args& a);        // M <= kGemvBf16Rows
void gemv_bf16_avx512_bf16(const GemvBf16Args& a);   // M <= kGemvBf16Rows

}  // namespace quark
