// Scalar on purpose: each op touches a few KB once per token, well under a microsecond at any ISA, and a
// single thread (waking the pool would cost more than the work).
#include "layer/layer.h"

#include <algorithm>
#include <cmath>

#include "common/bf16.h"

namespace quark {
namespace {

// Elements of dtype dt as float, and float rounded back to dt (torch's rounding after every bf16 op).
inline float load(const void* p, DType dt, int64_t i) {
  return dt == DType::bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline float round_to(float x, DType dt) { return dt == DType::bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

inline void store(void* p, DType dt, int64_t i, float x) {
  if (dt == DType::bf16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(x);
  else
    static_cast<float*>(p)[i] = x;
}

// One (token, head) row of D values into a float / bf16 cache row, or an int8 row with its scale as
// quark.ops.quantize_kv computes it: scale = amax / 127, q = round-half-even(x / scale) in [-127, 127].
void store_row(const float* x, int64_t D, void* cache, DType dt, int64_t offset, float* scale, int64_t srow) {
  if (dt != DType::i8) {
    for (int64_t j = 0; j < D; ++j) store(cache, dt, offset + j, x[j]);
    return;
  }
  float amax = 0.f;
  for (int64_t j = 0; j < D; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float s = amax / 127.f, safe = s > 0.f ? s : 1.f;
  int8_t* q = static_cast<int8_t*>(cache) + offset;
  for (int64_t j = 0; j < D; ++j) q[j] = static_cast<int8_t>(std::clamp(std::nearbyint(x[j] / safe), -127.f, 127.f));
  scale[srow] = s;
}

}  // namespace

void rmsnorm(const void* residual, void* x, const void* weight, void* out, DType dt, int64_t M, int64_t d, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = m * d;
    if (residual)
      for (int64_t j = 0; j < d; ++j) store(x, dt, r + j, load(x, dt, r + j) + load(residual, dt, r + j));
    double ss = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const float v = load(x, dt, r + j);
      ss += static_cast<double>(v * v);
    }
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / d) + eps);
    for (int64_t j = 0; j < d; ++j)
      store(out, dt, r + j, round_to(load(x, dt, r + j) * inv, dt) * load(weight, dt, j));
  }
}

void rope_store(const RopeStoreArgs& a) {
  const int64_t D = a.D, h = D / 2, width = (a.H + 2 * a.Hkv) * D;
  float row[1024];   // one rotated head (D <= 1024, checked by quark.ops.layer)
  for (int64_t b = 0; b < a.n; ++b) {
    const int64_t base = b * width;
    const float* c = a.cos + b * h;
    const float* s = a.sin + b * h;
    for (int64_t head = 0; head < a.H + 2 * a.Hkv; ++head) {
      const int64_t off = base + head * D;
      if (head < a.H + a.Hkv) {   // q and k heads: x1 cos - x2 sin, x1 sin + x2 cos, rounded as torch rounds
        for (int64_t j = 0; j < h; ++j) {
          const float x1 = load(a.qkv, a.dt, off + j), x2 = load(a.qkv, a.dt, off + h + j);
          const float cj = round_to(c[j], a.dt), sj = round_to(s[j], a.dt);
          row[j] = round_to(round_to(x1 * cj, a.dt) - round_to(x2 * sj, a.dt), a.dt);
          row[h + j] = round_to(round_to(x1 * sj, a.dt) + round_to(x2 * cj, a.dt), a.dt);
        }
      } else {
        for (int64_t j = 0; j < D; ++j) row[j] = load(a.qkv, a.dt, off + j);
      }
      if (head < a.H) {
        for (int64_t j = 0; j < D; ++j) store(a.q_out, a.q_dt, (b * a.H + head) * D + j, row[j]);
        continue;
      }
      const bool is_k = head < a.H + a.Hkv;
      const int64_t kvh = head - a.H - (is_k ? 0 : a.Hkv);
      const int64_t srow = (b * a.Hkv + kvh) * a.Smax + a.pos[b];
      store_row(row, D, is_k ? a.k_cache : a.v_cache, a.cache_dt, srow * D, is_k ? a.k_scale : a.v_scale, srow);
    }
  }
}

}  // namespace quark
