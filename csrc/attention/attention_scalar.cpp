// Scalar path: the direct formulas one query row at a time (two-pass softmax over the visible keys),
// the portable fallback and the readable statement of what the blocked SIMD kernels compute.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention_common.h"
#include "common/threading.h"

namespace quark {

void attention_forward_scalar(const AttentionFwdArgs& a) {
  const int64_t D = a.D, group = a.Hq / a.Hkv;
  parallel_for(a.B * a.Hq * a.Sq, 4, [&](int64_t it0, int64_t it1) {
    std::vector<float> qr(D), kr(D), vr(D), acc(D), p(std::max<int64_t>(a.Sk, 1));
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t bh = it / a.Sq, i = it % a.Sq;
      const int64_t b = bh / a.Hq, hkv = (bh % a.Hq) / group;
      const int64_t kv_base = (b * a.Hkv + hkv) * a.Sk * D, row = bh * a.Sq + i;
      const int64_t nk = visible_keys(i, a.Sq, a.Sk, a.causal);
      load_row(a.q, a.dtype, row * D, D, qr.data(), a.scale);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < nk; ++j) {
        load_row(a.k, a.dtype, kv_base + j * D, D, kr.data());
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
        p[j] = s;
        m = std::max(m, s);
      }
      float l = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < nk; ++j) {
        const float e = std::exp(p[j] - m);
        l += e;
        load_row(a.v, a.dtype, kv_base + j * D, D, vr.data());
        for (int64_t d = 0; d < D; ++d) acc[d] += e * vr[d];
      }
      store_row(a.out, a.dtype, row * D, D, acc.data(), l > 0.f ? 1.f / l : 0.f);
      if (a.lse) a.lse[row] = nk > 0 ? m + std::log(l) : -std::numeric_limits<float>::infinity();
    }
  });
}

// One task per (batch, kv head): it owns dk/dv of that head and dq of the query heads reading it,
// so no two threads ever write the same gradient.
void attention_backward_scalar(const AttentionBwdArgs& a) {
  const int64_t D = a.D, group = a.Hq / a.Hkv;
  parallel_for(a.B * a.Hkv, 1, [&](int64_t bk0, int64_t bk1) {
    std::vector<float> qr(D), dor(D), orow(D), kr(D), vr(D), dqr(D);
    for (int64_t bk = bk0; bk < bk1; ++bk) {
      const int64_t kv_base = bk * a.Sk * D;
      std::fill(a.dk + kv_base, a.dk + kv_base + a.Sk * D, 0.f);
      std::fill(a.dv + kv_base, a.dv + kv_base + a.Sk * D, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t bh = (bk / a.Hkv) * a.Hq + (bk % a.Hkv) * group + g;
        for (int64_t i = 0; i < a.Sq; ++i) {
          const int64_t row = bh * a.Sq + i, nk = visible_keys(i, a.Sq, a.Sk, a.causal);
          load_row(a.q, a.dtype, row * D, D, qr.data());
          load_row(a.dout, a.dtype, row * D, D, dor.data());
          load_row(a.out, a.dtype, row * D, D, orow.data());
          float di = 0.f;  // rowsum(dO * O) = sum_j p_j dp_j
          for (int64_t d = 0; d < D; ++d) di += dor[d] * orow[d];
          std::fill(dqr.begin(), dqr.end(), 0.f);
          for (int64_t j = 0; j < nk; ++j) {
            load_row(a.k, a.dtype, kv_base + j * D, D, kr.data());
            load_row(a.v, a.dtype, kv_base + j * D, D, vr.data());
            float s = 0.f, dp = 0.f;
            for (int64_t d = 0; d < D; ++d) { s += qr[d] * kr[d]; dp += dor[d] * vr[d]; }
            const float p = std::exp(s * a.scale - a.lse[row]);
            const float ds = p * (dp - di) * a.scale;
            float* dk = a.dk + kv_base + j * D;
            float* dv = a.dv + kv_base + j * D;
            for (int64_t d = 0; d < D; ++d) {
              dqr[d] += ds * kr[d];
              dk[d] += ds * qr[d];
              dv[d] += p * dor[d];
            }
          }
          std::memcpy(a.dq + row * D, dqr.data(), D * sizeof(float));
        }
      }
    }
  });
}

void decode_attention_scalar(const DecodeArgs& a) {
  const int64_t D = a.D, group = a.Hq / a.Hkv;
  struct Scratch {
    std::vector<float> qr, kr, vr, acc, p;
  };
  PerThread scratch([&] { return Scratch{std::vector<float>(D), std::vector<float>(D), std::vector<float>(D),
                                          std::vector<float>(D), std::vector<float>(std::max<int64_t>(a.Smax, 1))}; });
  parallel_for(a.B * a.Hq, 1, [&](int64_t bh0, int64_t bh1) {
    auto& [qr, kr, vr, acc, p] = scratch.local();
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / a.Hq, hkv = (bh % a.Hq) / group, n = a.lengths[b];
      const int64_t tok = (b * a.Hkv + hkv) * a.Smax;  // first cache position of this head
      load_row(a.q, a.q_dtype, bh * D, D, qr.data(), a.scale);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        load_row(a.k, a.kv_dtype, (tok + j) * D, D, kr.data(), a.k_scale ? a.k_scale[tok + j] : 1.f);
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
        p[j] = s;
        m = std::max(m, s);
      }
      float l = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float e = std::exp(p[j] - m);
        l += e;
        load_row(a.v, a.kv_dtype, (tok + j) * D, D, vr.data(), a.v_scale ? a.v_scale[tok + j] : 1.f);
        for (int64_t d = 0; d < D; ++d) acc[d] += e * vr[d];
      }
      store_row(a.out, a.q_dtype, bh * D, D, acc.data(), l > 0.f ? 1.f / l : 0.f);
    }
  });
}

}  // namespace quark
