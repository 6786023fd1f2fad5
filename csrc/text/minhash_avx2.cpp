// AVX2 path: 32 permutations per pass as 8 ymm accumulators of 4 x u64. AVX2 has neither a 64-bit
// low multiply nor an unsigned 64-bit min, so:
//   a * x mod 2^64 = lo(a) * lo(x) + ((hi(a) * lo(x) + lo(a) * hi(x)) << 32)   (3 x vpmuludq)
//   unsigned min   = signed compare after flipping the sign bit; the accumulators live in the
//                    flipped domain for the whole loop and are flipped back once at the end.
#include <immintrin.h>

#include "text/minhash.h"

namespace quark {

void minhash_block_avx2(const uint64_t* shingles, int64_t m, const uint64_t* a, const uint64_t* b,
                        int num_perm_padded, uint64_t* sig) {
  const __m256i sign = _mm256_set1_epi64x((long long)0x8000000000000000ULL);
  constexpr int V = kPermBlock / 4;  // 8 vectors of 4 lanes
  for (int p = 0; p < num_perm_padded; p += kPermBlock) {
    __m256i va[V], va_hi[V], vb[V], acc[V];
    for (int v = 0; v < V; ++v) {
      va[v] = _mm256_loadu_si256((const __m256i*)(a + p + 4 * v));
      va_hi[v] = _mm256_srli_epi64(va[v], 32);
      vb[v] = _mm256_loadu_si256((const __m256i*)(b + p + 4 * v));
      acc[v] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(sig + p + 4 * v)), sign);
    }
    for (int64_t s = 0; s < m; ++s) {
      const __m256i x = _mm256_set1_epi64x((long long)shingles[s]);
      const __m256i x_hi = _mm256_srli_epi64(x, 32);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        __m256i lo = _mm256_mul_epu32(va[v], x);
        __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(va_hi[v], x), _mm256_mul_epu32(va[v], x_hi));
        __m256i h = _mm256_add_epi64(_mm256_add_epi64(lo, _mm256_slli_epi64(cross, 32)), vb[v]);
        h = _mm256_xor_si256(h, sign);
        acc[v] = _mm256_blendv_epi8(acc[v], h, _mm256_cmpgt_epi64(acc[v], h));
      }
    }
    for (int v = 0; v < V; ++v)
      _mm256_storeu_si256((__m256i*)(sig + p + 4 * v), _mm256_xor_si256(acc[v], sign));
  }
}

}  // namespace quark
