// AVX-512 VNNI path for W8A8 GEMM (M > 4): vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes
// and adds them into an int32 lane, 64 MACs per instruction.
//
// vpdpbusd wants one operand unsigned, so activations are shifted to xu = xq + 128 (0..255) and the
// shift is removed per column afterwards: sum_k xu*w = sum_k xq*w + 128 * colsum(w).
// Weights are packed per panel of NR = 32 columns in VNNI order, panel[((k/4) * NR + j) * 4 + k%4]
// = w[n0 + j, k] (zero past K and N), and the column sums are taken while packing. Each task packs one
// panel (K * 32 bytes, L2-resident) and sweeps an M chunk with an 8 x 32 tile: per 4 k, 2 panel loads,
// 8 broadcasts, 16 vpdpbusd. All integer: the dots are exact, identical to every other path.
// M <= 4 stays on the int16 row-dot kernel of the avx512 path (memory bound; packing would only add
// a second pass over the weights).
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/threading.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

constexpr int MR = 8, NR = 32;
constexpr int64_t kMChunk = 256;

template <int R>
void vnni_tile(const uint8_t* xu, int64_t ldx, int64_t k4n, const int8_t* panel, const int32_t* colsum,
               int32_t* dots, int64_t ldd, int cols) {
  __m512i c0[R], c1[R];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) { c0[r] = _mm512_setzero_si512(); c1[r] = _mm512_setzero_si512(); }
  for (int64_t k4 = 0; k4 < k4n; ++k4) {
    const __m512i b0 = _mm512_load_si512(panel + k4 * NR * 4);
    const __m512i b1 = _mm512_load_si512(panel + k4 * NR * 4 + 64);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, xu + r * ldx + 4 * k4, 4);
      const __m512i av = _mm512_set1_epi32(quad);
      c0[r] = _mm512_dpbusd_epi32(c0[r], av, b0);
      c1[r] = _mm512_dpbusd_epi32(c1[r], av, b1);
    }
  }
  const __m512i shift0 = _mm512_slli_epi32(_mm512_loadu_si512(colsum), 7);        // 128 * colsum
  const __m512i shift1 = _mm512_slli_epi32(_mm512_loadu_si512(colsum + 16), 7);
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols <= 16 ? 0 : cols >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_epi32(dots + r * ldd, m0, _mm512_sub_epi32(c0[r], shift0));
    _mm512_mask_storeu_epi32(dots + r * ldd + 16, m1, _mm512_sub_epi32(c1[r], shift1));
  }
}

void vnni_rows(int rows, const uint8_t* xu, int64_t ldx, int64_t k4n, const int8_t* panel, const int32_t* colsum,
               int32_t* dots, int64_t ldd, int cols) {
  switch (rows) {
    case 8: return vnni_tile<8>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    case 7: return vnni_tile<7>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    case 6: return vnni_tile<6>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    case 5: return vnni_tile<5>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    case 4: return vnni_tile<4>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    case 3: return vnni_tile<3>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    case 2: return vnni_tile<2>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
    default: return vnni_tile<1>(xu, ldx, k4n, panel, colsum, dots, ldd, cols);
  }
}

// Rows are copied 4 bytes (one VNNI quad) at a time: panel[(k4 * NR + j) * 4 .. +4] = row_j[4 k4 .. +4].
void pack_panel(const QWeight& w, int64_t n0, int64_t kp, int8_t* panel, int32_t* colsum) {
  const int8_t* src = reinterpret_cast<const int8_t*>(w.data);
  const int64_t K = w.k, k4full = K / 4;
  std::memset(panel, 0, kp * NR);
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j;
    int32_t s = 0;
    if (n < w.n) {
      const int8_t* row = src + n * K;
      for (int64_t k4 = 0; k4 < k4full; ++k4) std::memcpy(panel + (k4 * NR + j) * 4, row + 4 * k4, 4);
      for (int64_t k = 4 * k4full; k < K; ++k) panel[(k4full * NR + j) * 4 + (k - 4 * k4full)] = row[k];
      for (int64_t k = 0; k < K; ++k) s += row[k];
    }
    colsum[j] = s;
  }
}

}  // namespace

void w8a8_dots_avx512_bf16(const W8A8Args& a) {
  if (a.m <= kGemvMaxRows) return w8a8_dots_avx512(a);
  const int64_t M = a.m, N = a.w.n, kp = a.kp;
  std::vector<uint8_t> xu(M * kp);
  for (int64_t i = 0; i < M * kp; ++i) xu[i] = static_cast<uint8_t>(a.xq[i] + 128);
  const int64_t npanels = (N + NR - 1) / NR, nchunks = (M + kMChunk - 1) / kMChunk;
  parallel_for(npanels * nchunks, 1, [&](int64_t it0, int64_t it1) {
    int8_t* panel = static_cast<int8_t*>(std::aligned_alloc(64, kp * NR));
    alignas(64) int32_t colsum[NR];
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t p = it / nchunks, c = it % nchunks;
      const int64_t n0 = p * NR, m0 = c * kMChunk, m1 = std::min(M, m0 + kMChunk);
      const int cols = static_cast<int>(std::min<int64_t>(NR, N - n0));
      pack_panel(a.w, n0, kp, panel, colsum);
      for (int64_t i = m0; i < m1; i += MR) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, m1 - i));
        vnni_rows(rows, xu.data() + i * kp, kp, kp / 4, panel, colsum, a.dots + i * N + n0, N, cols);
      }
    }
    std::free(panel);
  });
}

}  // namespace quark
