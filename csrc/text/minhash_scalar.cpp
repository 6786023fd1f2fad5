// Scalar path: the definition, one permutation at a time (the portable fallback and the oracle
// the SIMD paths are checked against in tests).
#include "text/minhash.h"

namespace quark {

void minhash_block_scalar(const uint64_t* shingles, int64_t m, const uint64_t* a, const uint64_t* b,
                          int num_perm_padded, uint64_t* sig) {
  for (int i = 0; i < num_perm_padded; ++i) {
    uint64_t best = sig[i];
    for (int64_t s = 0; s < m; ++s) {
      uint64_t v = a[i] * shingles[s] + b[i];
      best = v < best ? v : best;
    }
    sig[i] = best;
  }
}

}  // namespace quark
