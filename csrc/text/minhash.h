// MinHash signatures of documents (Broder 1997): sig[d][i] = min over the shingles s of document d
// of h_i(hash(s)), for num_perm hash functions h_i. Two documents agree at position i with
// probability equal to the Jaccard similarity of their shingle sets, so the fraction of equal
// positions estimates it.
//
// Shingles (all 64-bit hashes):
//   bytes hash: h = 0xcbf29ce484222325; per 8-byte little-endian block v (last one zero-padded)
//         h = (h ^ v) * 0x9FB21C651E98DF25, h ^= h >> 32; result fmix64(h ^ byte_length).
//   word: words are maximal runs of bytes that are ASCII letters/digits or any byte >= 0x80 (so
//         UTF-8 letters stay inside words); ASCII letters are lowercased, everything else
//         separates. A shingle is `ngram` consecutive words w_0..w_{n-1} (bytes hashes), hashed
//         as fmix64(sum_t w_t * m_t) with odd multipliers m_t = splitmix64 stream from
//         0x9E3779B97F4A7C15, OR 1.
//   char: `ngram` consecutive Unicode code points of the UTF-8 text as given (no normalisation);
//         shingle hash = bytes hash of their UTF-8 bytes.
// A document with fewer than `ngram` units has one shingle made of all of them; an empty one
// has none, and its signature is all UINT64_MAX (as in datasketch).
// Permutations: h_i(x) = a_i * x + b_i mod 2^64, a_i odd, (a_i, b_i) drawn from splitmix64(seed):
// a bijection of the 64-bit space per i; x is already a well-mixed hash, so the minimum of
// a_i * x + b_i behaves as the minimum of a random permutation (checked against exact Jaccard in
// tests/test_minhash.py). quark.ops.reference.minhash is the same algorithm in plain Python.
#pragma once
#include <cstdint>

namespace quark {

enum class ShingleUnit : int { word = 0, chr = 1 };

struct MinhashArgs {
  const char* const* texts;   // (n,) UTF-8 documents
  const int64_t* lengths;     // (n,) byte lengths
  int64_t n;
  int num_perm;
  int ngram;
  ShingleUnit unit;
  uint64_t seed;
  uint64_t* out;              // (n, num_perm) row-major
};

void minhash(const MinhashArgs& a);  // threads over documents; SIMD path chosen once per call

// Per-ISA inner loop: sig[i] = min(sig[i], min_s a[i] * s + b[i]) for i < num_perm_padded
// (a multiple of kPermBlock), over the m shingle hashes.
constexpr int kPermBlock = 32;
void minhash_block_scalar(const uint64_t* shingles, int64_t m, const uint64_t* a, const uint64_t* b,
                          int num_perm_padded, uint64_t* sig);
void minhash_block_avx2(const uint64_t* shingles, int64_t m, const uint64_t* a, const uint64_t* b,
                        int num_perm_padded, uint64_t* sig);
void minhash_block_avx512(const uint64_t* shingles, int64_t m, const uint64_t* a, const uint64_t* b,
                          int num_perm_padded, uint64_t* sig);

}  // namespace quark
