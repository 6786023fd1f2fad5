// The small per-token ops of a transformer decode step around its GEMVs and attention: RMSNorm (with
// the residual add before it) and rotary embedding + KV-cache store. Each is one pass over a
// few kilobytes, so what they save is the dozens of framework ops per layer they replace, each of which
// runs cold after a GEMV has streamed megabytes through the caches. Arithmetic follows torch's op by op
// (quark.model.gpt): bf16 rounds after every op as torch does, so results match it to the last bit but
// for the order of the RMSNorm sum.
#pragma once
#include <cstdint>

#include "attention/attention.h"   // DType

namespace quark {

// x (M, d) in dt; with residual: x += residual first (x is the residual stream, updated in place).
// out (M, d) = x / sqrt(mean(x^2) + eps) (rounded to dt) * weight (d,).
void rmsnorm(const void* residual, void* x, const void* weight, void* out, DType dt, int64_t M, int64_t d, float eps);

struct RopeStoreArgs {
  const void* qkv;      // (n, (H + 2 Hkv) D) in dt: q, k, v of each token side by side
  DType dt;             // float32 or bfloat16
  const float* cos;     // (n, D/2) rotation of each token
  const float* sin;
  const int64_t* pos;   // (n,): token b goes to cache slot b at position pos[b]
  int64_t n, H, Hkv, D, Smax;
  void* q_out;          // (n, H, D) rotated q, in q_dt
  DType q_dt;
  void* k_cache;        // (>= n, Hkv, Smax, D) in cache_dt (f32, bf16 or i8 with scales)
  void* v_cache;
  DType cache_dt;
  float* k_scale;       // (>= n, Hkv, Smax) for i8 caches, else null
  float* v_scale;
};
void rope_store(const RopeStoreArgs& a);

}  // namespace quark
