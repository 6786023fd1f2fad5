// Blocked driver shared by the SIMD distance paths: a GEMM-style inner product X . Y^T with
// ||x||^2 + ||y||^2 - 2<x,y> for l2, so the hot loop is pure FMAs (faiss does the same).
//
// Layout: base vectors are packed, block by block, into panels of NR vectors stored k-major
// (panel[k * NR + j] = y[j][k]); the microkernel broadcasts one query element and FMAs it with
// NR base elements, keeping an MR x NR tile of dot products in registers. Any d works without a
// vector tail, and any nb works by zero-padding the last panel.
//
// Included by one .cpp per ISA. Everything here is static: the same code compiled with different
// -m flags must never be merged across translation units by the linker.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/threading.h"
#include "search/distance.h"

namespace quark {
namespace {

constexpr int64_t kBaseBlock = 256;    // base vectors per packed block (128 KiB at d=128: L2-resident)
constexpr int64_t kQueryChunk = 256;   // queries per task; repacking cost is 1/kQueryChunk of the work

struct AlignedBuffer {
  float* p = nullptr;
  explicit AlignedBuffer(size_t n) { p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64)); }
  ~AlignedBuffer() { std::free(p); }
};

template <int NR>
static void pack_block(const float* y, int64_t nvec, int64_t d, float* panels, float* sqnorms) {
  const int64_t npanels = (nvec + NR - 1) / NR;
  for (int64_t p = 0; p < npanels; ++p) {
    float* dst = panels + p * d * NR;
    for (int j = 0; j < NR; ++j) {
      int64_t v = p * NR + j;
      if (v < nvec) {
        const float* src = y + v * d;
        float s = 0.f;
        for (int64_t k = 0; k < d; ++k) { dst[k * NR + j] = src[k]; s += src[k] * src[k]; }
        sqnorms[v] = s;
      } else {
        for (int64_t k = 0; k < d; ++k) dst[k * NR + j] = 0.f;
      }
    }
  }
}

// acc: (rows, NR) dot products of queries [i0, i0+rows) with one panel; writes final distances.
template <int NR>
static void epilogue(const DistanceArgs& a, int64_t i0, int rows, int64_t j0, int cols, const float* acc,
                     const float* xsq, const float* ysq) {
  for (int r = 0; r < rows; ++r) {
    float* o = a.out + (i0 + r) * a.ldo + j0;
    const float* t = acc + r * NR;
    switch (a.metric) {
      case Metric::l2:
        for (int j = 0; j < cols; ++j) o[j] = std::max(xsq[i0 + r] + ysq[j] - 2.f * t[j], 0.f);
        break;
      case Metric::ip:
        for (int j = 0; j < cols; ++j) o[j] = -t[j];
        break;
      case Metric::cosine:
        for (int j = 0; j < cols; ++j) {
          float den = std::sqrt(xsq[i0 + r]) * std::sqrt(ysq[j]);
          o[j] = den > 0.f ? 1.f - t[j] / den : 1.f;
        }
        break;
    }
  }
}

// Kernel: a microkernel of common/gemm_f32_<isa>.h (MR, NR and
//   dispatch_rows(rows, x, ldx, kc, panel, acc /* rows x NR */)).
template <class Kernel>
static void run_blocked(const DistanceArgs& a) {
  constexpr int MR = Kernel::MR, NR = Kernel::NR;
  const int64_t d = a.d;
  std::vector<float> xsq(a.nq);
  for (int64_t i = 0; i < a.nq; ++i) {
    const float* x = a.x + i * d;
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += x[k] * x[k];
    xsq[i] = s;
  }
  const int64_t nblocks = (a.nb + kBaseBlock - 1) / kBaseBlock;
  const int64_t nchunks = (a.nq + kQueryChunk - 1) / kQueryChunk;
  parallel_for(nblocks * nchunks, 1, [&](int64_t it0, int64_t it1) {
    AlignedBuffer panels(static_cast<size_t>(kBaseBlock) * d);
    alignas(64) float ysq[kBaseBlock];
    alignas(64) float acc[MR * NR];
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t b = it / nchunks, c = it % nchunks;
      const int64_t j_begin = b * kBaseBlock, nvec = std::min(kBaseBlock, a.nb - j_begin);
      pack_block<NR>(a.y + j_begin * d, nvec, d, panels.p, ysq);
      if (a.y_sqnorms) std::memcpy(ysq, a.y_sqnorms + j_begin, nvec * sizeof(float));
      const int64_t i_end = std::min(a.nq, (c + 1) * kQueryChunk);
      for (int64_t p = 0; p * NR < nvec; ++p) {
        const float* panel = panels.p + p * d * NR;
        const int cols = static_cast<int>(std::min<int64_t>(NR, nvec - p * NR));
        for (int64_t i = c * kQueryChunk; i < i_end; i += MR) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, i_end - i));
          Kernel::dispatch_rows(rows, a.x + i * d, d, d, panel, acc);
          epilogue<NR>(a, i, rows, j_begin + p * NR, cols, acc, xsq.data(), ysq + p * NR);
        }
      }
    }
  });
}

}  // namespace
}  // namespace quark
