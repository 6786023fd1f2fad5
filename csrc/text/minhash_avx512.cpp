// AVX-512 path: 32 permutations per pass as 4 zmm accumulators of 8 x u64, with the native 64-bit
// low multiply (vpmullq, AVX-512DQ) and unsigned 64-bit min (vpminuq). The a/b/acc registers stay
// in place while the shingle hashes stream past from L1, two shingles per step for more
// independent multiplies in flight.
#include <immintrin.h>

#include "text/minhash.h"

namespace quark {

void minhash_block_avx512(const uint64_t* shingles, int64_t m, const uint64_t* a, const uint64_t* b,
                          int num_perm_padded, uint64_t* sig) {
  constexpr int V = kPermBlock / 8;  // 4 vectors of 8 lanes
  for (int p = 0; p < num_perm_padded; p += kPermBlock) {
    __m512i va[V], vb[V], acc[V];
    for (int v = 0; v < V; ++v) {
      va[v] = _mm512_loadu_si512(a + p + 8 * v);
      vb[v] = _mm512_loadu_si512(b + p + 8 * v);
      acc[v] = _mm512_loadu_si512(sig + p + 8 * v);
    }
    int64_t s = 0;
    for (; s + 2 <= m; s += 2) {
      const __m512i x0 = _mm512_set1_epi64((long long)shingles[s]);
      const __m512i x1 = _mm512_set1_epi64((long long)shingles[s + 1]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const __m512i h0 = _mm512_add_epi64(_mm512_mullo_epi64(va[v], x0), vb[v]);
        const __m512i h1 = _mm512_add_epi64(_mm512_mullo_epi64(va[v], x1), vb[v]);
        acc[v] = _mm512_min_epu64(acc[v], _mm512_min_epu64(h0, h1));
      }
    }
    if (s < m) {
      const __m512i x0 = _mm512_set1_epi64((long long)shingles[s]);
      for (int v = 0; v < V; ++v)
        acc[v] = _mm512_min_epu64(acc[v], _mm512_add_epi64(_mm512_mullo_epi64(va[v], x0), vb[v]));
    }
    for (int v = 0; v < V; ++v) _mm512_storeu_si512(sig + p + 8 * v, acc[v]);
  }
}

}  // namespace quark
