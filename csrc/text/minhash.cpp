// Dispatch and shingling for the MinHash kernel. Shingling (byte scanning, FNV-1a, fmix64) is
// scalar and shared by every path; only the num_perm x shingles min-reduction, where the time
// goes, has one file per ISA.
#include "text/minhash.h"

#include <vector>

#include "common/dispatch.h"
#include "common/threading.h"

namespace quark {

static FamilyRegistration reg("minhash", Isa::avx512);

namespace {

inline uint64_t fmix64(uint64_t k) {  // MurmurHash3 finalizer: every input bit flips each output bit ~1/2
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kShingleInit = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline bool is_word_byte(unsigned char c) {
  return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

// Byte-string hash: 8 bytes at a time (little-endian, the last block zero-padded), each block
// folded in with one multiply, then fmix64 with the length. Per block the step is a bijection of
// the block, so distinct words of up to 8 bytes never collide; the per-byte work is only packing.
constexpr uint64_t kBlockMul = 0x9FB21C651E98DF25ULL;
inline uint64_t fold_block(uint64_t h, uint64_t v) {
  h = (h ^ v) * kBlockMul;
  return h ^ (h >> 32);
}

struct BytesHasher {
  uint64_t h = kFnvOffset, block = 0;
  int fill = 0;
  uint64_t len = 0;
  inline void push(unsigned char c) {
    block |= (uint64_t)c << (8 * fill);
    ++len;
    if (++fill == 8) { h = fold_block(h, block); block = 0; fill = 0; }
  }
  inline uint64_t finish() {
    if (fill) h = fold_block(h, block);
    return fmix64(h ^ len);
  }
};

// Shingle hash: fmix64(sum_t w_t * m_t) with a distinct odd multiplier per position t: the n
// multiplies are independent (no serial dependency chain) and the result depends on word order.
void shingle_multipliers(int ngram, std::vector<uint64_t>& m) {
  m.resize(ngram);
  uint64_t state = kShingleInit;
  for (int t = 0; t < ngram; ++t) m[t] = splitmix64(state) | 1;
}

void combine_shingles(const std::vector<uint64_t>& units, int ngram, const std::vector<uint64_t>& mul,
                      std::vector<uint64_t>& out) {
  out.clear();
  const int64_t k = (int64_t)units.size();
  if (k == 0) return;
  const int64_t span = k < ngram ? k : ngram;
  for (int64_t j = 0; j + span <= k; ++j) {
    uint64_t h = 0;
    for (int64_t t = 0; t < span; ++t) h += units[j + t] * mul[t];
    out.push_back(fmix64(h));
  }
}

void word_shingles(const unsigned char* s, int64_t len, int ngram, const std::vector<uint64_t>& mul,
                   std::vector<uint64_t>& words, std::vector<uint64_t>& out) {
  words.clear();
  int64_t i = 0;
  while (i < len) {
    while (i < len && !is_word_byte(s[i])) ++i;
    if (i >= len) break;
    BytesHasher hs;
    while (i < len && is_word_byte(s[i])) {
      unsigned char c = s[i++];
      if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
      hs.push(c);
    }
    words.push_back(hs.finish());
  }
  combine_shingles(words, ngram, mul, out);
}

void char_shingles(const unsigned char* s, int64_t len, int ngram, std::vector<uint64_t>& starts,
                   std::vector<uint64_t>& out) {
  starts.clear();
  for (int64_t i = 0; i < len; ++i)
    if ((s[i] & 0xC0) != 0x80) starts.push_back((uint64_t)i);  // first byte of a code point
  out.clear();
  const int64_t c = (int64_t)starts.size();
  if (c == 0) return;
  const int64_t span = c < ngram ? c : ngram;
  starts.push_back((uint64_t)len);
  for (int64_t j = 0; j + span <= c; ++j) {
    BytesHasher hs;
    for (uint64_t p = starts[j]; p < starts[j + span]; ++p) hs.push(s[p]);
    out.push_back(hs.finish());
  }
}

}  // namespace

void minhash(const MinhashArgs& a) {
  if (a.n == 0 || a.num_perm == 0) return;
  using BlockFn = void (*)(const uint64_t*, int64_t, const uint64_t*, const uint64_t*, int, uint64_t*);
  BlockFn block = minhash_block_scalar;
#if QUARK_X86
  switch (family_isa(Isa::avx512)) {
    case Isa::scalar: break;
    case Isa::avx2: block = minhash_block_avx2; break;
    default: block = minhash_block_avx512; break;
  }
#endif
  // Permutation parameters, padded to whole blocks (the padding lanes are computed and dropped).
  const int padded = (a.num_perm + kPermBlock - 1) / kPermBlock * kPermBlock;
  std::vector<uint64_t> pa(padded, 1), pb(padded, 0), mul;
  shingle_multipliers(a.ngram, mul);
  uint64_t state = a.seed;
  for (int i = 0; i < a.num_perm; ++i) {
    pa[i] = splitmix64(state) | 1;  // odd: multiplication by a_i is a bijection mod 2^64
    pb[i] = splitmix64(state);
  }
  parallel_for(a.n, 16, [&](int64_t d0, int64_t d1) {
    std::vector<uint64_t> scratch, shingles, sig(padded);
    for (int64_t d = d0; d < d1; ++d) {
      const auto* s = reinterpret_cast<const unsigned char*>(a.texts[d]);
      if (a.unit == ShingleUnit::word) word_shingles(s, a.lengths[d], a.ngram, mul, scratch, shingles);
      else char_shingles(s, a.lengths[d], a.ngram, scratch, shingles);
      for (auto& v : sig) v = UINT64_MAX;
      if (!shingles.empty()) block(shingles.data(), (int64_t)shingles.size(), pa.data(), pb.data(), padded, sig.data());
      uint64_t* o = a.out + d * a.num_perm;
      for (int i = 0; i < a.num_perm; ++i) o[i] = sig[i];
    }
  });
}

}  // namespace quark
