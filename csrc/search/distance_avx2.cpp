// AVX2 path: a 6 x 16 tile of dot products in 12 ymm accumulators (2 vectors of 8 per row),
// leaving 4 of the 16 ymm registers for the panel loads and the broadcast.
#include <immintrin.h>

#include "search/distance_blocked.h"

namespace quark {
namespace {

struct KernelAvx2 {
  static constexpr int MR = 6, NR = 16;

  template <int R>
  static void tile(const float* x, int64_t d, const float* panel, float* acc) {
    __m256 c0[R], c1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) { c0[r] = _mm256_setzero_ps(); c1[r] = _mm256_setzero_ps(); }
    for (int64_t k = 0; k < d; ++k) {
      const __m256 b0 = _mm256_load_ps(panel + k * NR);
      const __m256 b1 = _mm256_load_ps(panel + k * NR + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(x + r * d + k);
        c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
        c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(acc + r * NR, c0[r]);
      _mm256_store_ps(acc + r * NR + 8, c1[r]);
    }
  }

  static void dispatch_rows(int rows, const float* x, int64_t d, const float* panel, float* acc) {
    switch (rows) {
      case 6: return tile<6>(x, d, panel, acc);
      case 5: return tile<5>(x, d, panel, acc);
      case 4: return tile<4>(x, d, panel, acc);
      case 3: return tile<3>(x, d, panel, acc);
      case 2: return tile<2>(x, d, panel, acc);
      default: return tile<1>(x, d, panel, acc);
    }
  }
};

}  // namespace

void pairwise_distance_avx2(const DistanceArgs& a) { run_blocked<KernelAvx2>(a); }

}  // namespace quark
