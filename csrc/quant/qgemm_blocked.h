// Blocked GEMM driver for quantized weights (M past the GEMV's range, qlinear.cpp), shared by the AVX2
// and AVX-512 paths.
//
// BLIS-style loop order: each task owns an N block of kNBlock output columns and an M chunk of rows.
// For every K block of kKBlock it dequantizes W[n-block, k-block] into k-major panels of NR columns
// (panel[k * NR + j] = W[n0 + j, k0 + k], kKBlock * NR * 4 bytes = L1-resident), then sweeps the M
// chunk with an MR x NR register tile of FMAs and adds the tile into out. Dequantization costs
// O(N K) per M chunk against O(M N K) FMAs, i.e. 1/kMChunk of the work.
//
// Included by one .cpp per ISA; everything is in an anonymous namespace so the copies compiled with
// different -m flags never merge.
#pragma once
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/bf16.h"
#include "common/threading.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

constexpr int64_t kKBlock = 128;   // multiple of 32 (int4 blocks); panel of 32 columns = 16 KiB
constexpr int64_t kNBlock = 128;   // columns per task
constexpr int64_t kMChunk = 256;   // rows per task: the A block kMChunk x kKBlock fp32 = 128 KiB (L2)

struct PanelBuffer {
  float* p = nullptr;
  explicit PanelBuffer(size_t n) { p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64)); }
  ~PanelBuffer() { std::free(p); }
};

// dst[k * stride] = W[n, k0 + k] for k < len (len is a multiple of 32 for int4: k0 and kKBlock are).
inline void dequant_row(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* dst, int64_t stride) {
  if (w.scheme == QScheme::int8) {
    const int8_t* src = reinterpret_cast<const int8_t*>(w.data) + n * w.k + k0;
    const float s = w.scales[n];
    for (int64_t k = 0; k < len; ++k) dst[k * stride] = static_cast<float>(src[k]) * s;
    return;
  }
  const int64_t ngroups = w.k / w.group;
  const uint8_t* row = w.data + n * (w.k / 2);
  for (int64_t b = k0; b < k0 + len; b += 32) {
    const int64_t g = b / w.group;
    const int z = w.zeros[n * ngroups + g];
    const float s = bf16_to_f32(w.scales16[n * ngroups + g]);
    const uint8_t* q = row + b / 2;
    float* d = dst + (b - k0) * stride;
    for (int j = 0; j < 16; ++j) {
      d[j * stride] = static_cast<float>((q[j] & 15) - z) * s;
      d[(j + 16) * stride] = static_cast<float>((q[j] >> 4) - z) * s;
    }
  }
}

// Kernel: a microkernel of common/gemm_f32_<isa>.h, providing static constexpr int MR, NR;
//   static void dispatch_rows(int rows, const float* x, int64_t ldx, int64_t kc, const float* panel, float* acc);
// computing acc (rows x NR) = x[rows, 0:kc] . panel (kc x NR).
template <class Kernel>
static void run_qgemm(const QLinearArgs& a) {
  constexpr int MR = Kernel::MR, NR = Kernel::NR;
  const int64_t M = a.m, N = a.w.n, K = a.w.k;
  const int64_t nblocks = (N + kNBlock - 1) / kNBlock, nchunks = (M + kMChunk - 1) / kMChunk;
  parallel_for(nblocks * nchunks, 1, [&](int64_t it0, int64_t it1) {
    PanelBuffer panels(static_cast<size_t>(kKBlock) * kNBlock);
    alignas(64) float acc[MR * NR];
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t b = it / nchunks, c = it % nchunks;
      const int64_t n0 = b * kNBlock, nb = std::min(kNBlock, N - n0);
      const int64_t m0 = c * kMChunk, m1 = std::min(M, m0 + kMChunk);
      for (int64_t i = m0; i < m1; ++i) {
        float* o = a.out + i * N + n0;
        if (a.bias) std::memcpy(o, a.bias + n0, nb * sizeof(float));
        else std::memset(o, 0, nb * sizeof(float));
      }
      const int64_t npanels = (nb + NR - 1) / NR;
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
        const int64_t kc = std::min(kKBlock, K - k0);
        for (int64_t p = 0; p < npanels; ++p) {
          float* panel = panels.p + p * kKBlock * NR;
          for (int j = 0; j < NR; ++j) {
            const int64_t n = n0 + p * NR + j;
            if (p * NR + j < nb) dequant_row(a.w, n, k0, kc, panel + j, NR);
            else for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = 0.f;
          }
        }
        for (int64_t p = 0; p < npanels; ++p) {
          const float* panel = panels.p + p * kKBlock * NR;
          const int cols = static_cast<int>(std::min<int64_t>(NR, nb - p * NR));
          for (int64_t i = m0; i < m1; i += MR) {
            const int rows = static_cast<int>(std::min<int64_t>(MR, m1 - i));
            Kernel::dispatch_rows(rows, a.x + i * K + k0, K, kc, panel, acc);
            for (int r = 0; r < rows; ++r) {
              float* o = a.out + (i + r) * N + n0 + p * NR;
              for (int j = 0; j < cols; ++j) o[j] += acc[r * NR + j];
            }
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace quark
