// AVX-512 path: an 8 x 32 tile of dot products in 16 zmm accumulators (2 vectors of 16 per row).
// Per k: 2 panel loads, 8 broadcasts, 16 FMAs.
#include <immintrin.h>

#include "search/distance_blocked.h"

namespace quark {
namespace {

struct KernelAvx512 {
  static constexpr int MR = 8, NR = 32;

  template <int R>
  static void tile(const float* x, int64_t d, const float* panel, float* acc) {
    __m512 c0[R], c1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) { c0[r] = _mm512_setzero_ps(); c1[r] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < d; ++k) {
      const __m512 b0 = _mm512_load_ps(panel + k * NR);
      const __m512 b1 = _mm512_load_ps(panel + k * NR + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(x[r * d + k]);
        c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
        c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(acc + r * NR, c0[r]);
      _mm512_store_ps(acc + r * NR + 16, c1[r]);
    }
  }

  static void dispatch_rows(int rows, const float* x, int64_t d, const float* panel, float* acc) {
    switch (rows) {
      case 8: return tile<8>(x, d, panel, acc);
      case 7: return tile<7>(x, d, panel, acc);
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

void pairwise_distance_avx512(const DistanceArgs& a) { run_blocked<KernelAvx512>(a); }

}  // namespace quark
