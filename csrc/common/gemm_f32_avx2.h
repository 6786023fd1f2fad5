// fp32 register-tiled microkernel shared by the blocked GEMM drivers (search/distance_blocked.h,
// quant/qgemm_blocked.h): a 6 x 16 tile in 12 ymm accumulators (2 vectors of 8 per row), leaving 4
// of the 16 ymm registers for the panel loads and the broadcast. Same contract as gemm_f32_avx512.h.
// Include only from *_avx2.cpp files.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace quark {
namespace {

struct GemmTileAvx2 {
  static constexpr int MR = 6, NR = 16;

  template <int R>
  static void tile(const float* x, int64_t ldx, int64_t kc, const float* panel, float* acc) {
    __m256 c0[R], c1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) { c0[r] = _mm256_setzero_ps(); c1[r] = _mm256_setzero_ps(); }
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b0 = _mm256_load_ps(panel + k * NR);
      const __m256 b1 = _mm256_load_ps(panel + k * NR + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(x + r * ldx + k);
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

  static void dispatch_rows(int rows, const float* x, int64_t ldx, int64_t kc, const float* panel, float* acc) {
    switch (rows) {
      case 6: return tile<6>(x, ldx, kc, panel, acc);
      case 5: return tile<5>(x, ldx, kc, panel, acc);
      case 4: return tile<4>(x, ldx, kc, panel, acc);
      case 3: return tile<3>(x, ldx, kc, panel, acc);
      case 2: return tile<2>(x, ldx, kc, panel, acc);
      default: return tile<1>(x, ldx, kc, panel, acc);
    }
  }
};

}  // namespace
}  // namespace quark
