// fp32 register-tiled microkernel shared by the blocked GEMM drivers (search/distance_blocked.h,
// quant/qgemm_blocked.h): an MR x NR tile of dot products of MR rows of x (leading dimension ldx)
// with one packed panel (panel[k * NR + j], k < kc). Per k: 2 panel loads, MR broadcasts, 2*MR FMAs
// in 16 zmm accumulators. Include only from *_avx512*.cpp files: it needs the AVX-512 flags, and the
// anonymous namespace keeps each translation unit's copy its own.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace quark {
namespace {

struct GemmTileAvx512 {
  static constexpr int MR = 8, NR = 32;

  template <int R>
  static void tile(const float* x, int64_t ldx, int64_t kc, const float* panel, float* acc) {
    __m512 c0[R], c1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) { c0[r] = _mm512_setzero_ps(); c1[r] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < kc; ++k) {
      const __m512 b0 = _mm512_load_ps(panel + k * NR);
      const __m512 b1 = _mm512_load_ps(panel + k * NR + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(x[r * ldx + k]);
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

  static void dispatch_rows(int rows, const float* x, int64_t ldx, int64_t kc, const float* panel, float* acc) {
    switch (rows) {
      case 8: return tile<8>(x, ldx, kc, panel, acc);
      case 7: return tile<7>(x, ldx, kc, panel, acc);
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
