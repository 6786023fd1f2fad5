// Decode over int8 and bf16 KV caches with AVX512-VNNI / AVX512-BF16 dot products: the cached values
// are used as they are, never widened to fp32 (the AVX-512 path spends two or three instructions per
// 16 cached values on that). One driver (online softmax per chunk of 64 keys, flash-decoding splits
// and merge from DecodeSplit in attention_blocked.h) over two cache kernels:
//
// int8 (vpdpbusd: 64 unsigned x 64 signed bytes added in fours into 16 int32 lanes)
//   q . k   q (scale * log2 e folded in) is rounded per (task, query head) to 24-bit fixed point
//           q24 = 65536 qh + 256 qm + ql with signed byte limbs; the key bytes become unsigned by
//           k + 128 (one xor), and q24 . k = 65536 (Kh - 128 sum qh) + (Kml - 128 sum (256 qm + ql))
//           with Kh = sum_d (k + 128) qh and Kml the same for 256 qm + ql: exact int32 sums (D <= 256).
//   p . V   per chunk, w_j = p_j * v_scale_j is rounded to 24-bit fixed point against the chunk's
//           largest w (three unsigned byte limbs); four key rows are interleaved bytewise (two unpack
//           levels) so one vpdpbusd adds w_j..w_j+3 times v_j..v_j+3 for 16 columns (the columns come
//           out in a fixed lane order, undone once per chunk); exact int32 sums per limb, then scaled
//           into the fp32 accumulators.
//   24 bits, not 16: the rounding is relative to the largest entry, and a query channel 100x the
//   others (common in LLMs) made 16-bit q cost 1e-3 relative error; at 24 bits the result is as exact
//   as the fp32 paths (~3e-7 relative to float64 on the dequantized cache, < 1e-5 with such outliers).
//
// bf16 (vdpbf16ps: 16 pairs of bf16 products added into 16 fp32 lanes)
//   q . k   the key row as stored against q: two bf16 terms hi + lo (16 significant bits) for an fp32
//           query, one for a bf16 query (exact).
//   p . V   two key rows interleaved into pairs (one in-lane unpack per 16 columns; the column order
//           is undone once per chunk), times (p_j, p_j+1): two bf16 terms for an fp32 result, one (P
//           rounded to bf16, as torch does) for a bf16 result. Products of bf16 are exact in fp32:
//           the error of an fp32 result is the 2^-17 of the split (~5e-6 relative in the tests).
//
// Both kernels prefetch, while scoring a row of K, the same row of V (read right after the scores)
// and the row of K one chunk ahead: one core streams the cache faster with it (measured 1.3-1.6x for
// int8 at B = 8).
#include <immintrin.h>

#include "attention/attention_blocked.h"
#include "attention/attention_vec_avx512.h"

namespace quark {
namespace {

constexpr int64_t KC = 64;           // keys per chunk (and one fixed-point scale for int8 weights)
constexpr int kQMax = 8355711;       // 127 * (65536 + 256 + 1): q24 splits into three signed bytes
constexpr float kWMax = 16777215.f;  // 2^24 - 1: w24 splits into three unsigned bytes

inline __mmask64 first_n64(int64_t n) { return n <= 0 ? 0 : n >= 64 ? ~0ull : (1ull << n) - 1; }
inline __mmask32 first_n32(int64_t n) { return n <= 0 ? 0 : n >= 32 ? 0xffffffffu : (1u << n) - 1; }
inline __mmask16 first_n16(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// v[0..8) -> their horizontal sums, in order (int32 or fp32 lanes: I = __m512i or __m512).
template <class I>
inline I hsum8(const I v[8]) {
  auto cast = [](auto x) { return _mm512_castps_si512(x); };
  __m512i w[8];
  for (int i = 0; i < 8; ++i) {
    if constexpr (std::is_same_v<I, __m512>) w[i] = cast(v[i]);
    else w[i] = v[i];
  }
  auto add = [](__m512i a, __m512i b) {
    if constexpr (std::is_same_v<I, __m512>)
      return _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b)));
    else return _mm512_add_epi32(a, b);
  };
  __m512i t[4], u[2];
  for (int i = 0; i < 4; ++i)  // lane L of t[i]: w[2i], w[2i+1] summed over two of L's four elements, twice
    t[i] = add(_mm512_unpacklo_epi32(w[2 * i], w[2 * i + 1]), _mm512_unpackhi_epi32(w[2 * i], w[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // lane L of u[i]: w[4i..4i+3] summed over L's four elements
    u[i] = add(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i x = add(_mm512_shuffle_i32x4(u[0], u[1], 0x44), _mm512_shuffle_i32x4(u[0], u[1], 0xEE));
  const __m512i r = _mm512_shuffle_i32x4(x, x, 0xD8);  // lanes: u0 (L0+L2), u1 (L0+L2), u0 (L1+L3), u1 (L1+L3)
  const __m512i sum = add(r, _mm512_shuffle_i32x4(r, r, 0x4E));  // the 8 sums in lanes 0 and 1
  if constexpr (std::is_same_v<I, __m512>) return _mm512_castsi512_ps(sum);
  else return sum;
}

// ------------------------------------------------------------------------------------------ int8
// NCH = 64-column chunks of a row (1..4), a template argument so the accumulators stay in registers.
template <int NCH>
struct I8Cache {
  static constexpr int64_t kCols = 64 * NCH;  // accumulator columns
  struct Query {
    alignas(64) int8_t hi[kCols], mid[kCols], lo[kCols];  // limbs of q24, zero past D
    int32_t corr_hi, corr_low;  // 128 * sum_d qh and 128 * sum_d (256 qm + ql)
    float scale;                // q * (scale * log2 e) ~ q24 * scale
  };
  const DecodeArgs& a;
  const int8_t *kc, *vc;
  int64_t tok0 = 0;      // cache row of position 0 of the task's (batch, kv head)
  __mmask64 cmask[NCH];  // valid bytes of each chunk of a row
  std::vector<Query> q;
  alignas(64) uint8_t wb[3][KC];  // byte limbs of the chunk's weights, most significant first

  explicit I8Cache(const DecodeArgs& args)
      : a(args), kc(static_cast<const int8_t*>(a.k)), vc(static_cast<const int8_t*>(a.v)), q(a.Hq / a.Hkv) {
    for (int c = 0; c < NCH; ++c) cmask[c] = first_n64(a.D - 64 * c);
  }

  // Query g (fp32, zero past D) -> fixed-point limbs; the logit factor scale * log2 e goes into q.scale.
  void set_query(int64_t g, const float* qf) {
    Query& out = q[g];
    __m512 amax = _mm512_setzero_ps();
    for (int64_t d = 0; d < kCols; d += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(qf + d)));
    const float m = _mm512_reduce_max_ps(amax);
    out.scale = m > 0.f ? m / kQMax * a.scale * kLog2e : 0.f;
    const __m512 inv = _mm512_set1_ps(m > 0.f ? kQMax / m : 0.f);
    __m512i sum_hi = _mm512_setzero_si512(), sum_low = _mm512_setzero_si512();
    for (int64_t d = 0; d < kCols; d += 16) {
      __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(qf + d), inv));
      x = _mm512_max_epi32(_mm512_min_epi32(x, _mm512_set1_epi32(kQMax)), _mm512_set1_epi32(-kQMax));
      // Signed byte limbs, lowest first: l = the low byte sign-extended, then (x - l) / 256 is exact.
      const __m512i lo = _mm512_srai_epi32(_mm512_slli_epi32(x, 24), 24);
      const __m512i r = _mm512_srai_epi32(_mm512_sub_epi32(x, lo), 8);
      const __m512i mid = _mm512_srai_epi32(_mm512_slli_epi32(r, 24), 24);
      const __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(r, mid), 8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.hi + d), _mm512_cvtepi32_epi8(hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.mid + d), _mm512_cvtepi32_epi8(mid));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.lo + d), _mm512_cvtepi32_epi8(lo));
      sum_hi = _mm512_add_epi32(sum_hi, hi);
      sum_low = _mm512_add_epi32(sum_low, _mm512_add_epi32(_mm512_slli_epi32(mid, 8), lo));
    }
    out.corr_hi = 128 * _mm512_reduce_add_epi32(sum_hi);
    out.corr_low = 128 * _mm512_reduce_add_epi32(sum_low);
  }

  // s[0, nk) = base-2 logits of query g against keys [j0, j0 + nk); -inf after, up to KC.
  void scores(int64_t g, int64_t j0, int64_t nk, float* s) const {
    const Query& qg = q[g];
    alignas(64) int32_t dot_hi[KC] = {}, dot_low[KC] = {};
    const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t j = 0; j < nk; j += 8) {
      __m512i h[8], m[8], l[8];
      for (int i = 0; i < 8; ++i) h[i] = m[i] = l[i] = _mm512_setzero_si512();
#pragma GCC unroll 8  // keeps the 24 accumulators in registers
      for (int i = 0; i < 8; ++i) {
        const int64_t row = (tok0 + j0 + j + i) * a.D;
        if (g == 0) {
          prefetch_row(vc + row, a.D);
          prefetch_row(kc + row + KC * a.D, a.D);
        }
        for (int c = 0; c < NCH; ++c) {
          const __m512i k8 = _mm512_maskz_loadu_epi8(j + i < nk ? cmask[c] : 0, kc + row + 64 * c);
          const __m512i ku = _mm512_xor_si512(k8, bias);
          h[i] = _mm512_dpbusd_epi32(h[i], ku, _mm512_load_si512(qg.hi + 64 * c));
          m[i] = _mm512_dpbusd_epi32(m[i], ku, _mm512_load_si512(qg.mid + 64 * c));
          l[i] = _mm512_dpbusd_epi32(l[i], ku, _mm512_load_si512(qg.lo + 64 * c));
        }
      }
      for (int i = 0; i < 8; ++i) m[i] = _mm512_add_epi32(_mm512_slli_epi32(m[i], 8), l[i]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dot_hi + j), _mm512_castsi512_si256(hsum8(h)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dot_low + j), _mm512_castsi512_si256(hsum8(m)));
    }
    // logit = q24 . k * q.scale * k_scale, q24 . k = 65536 (dot_hi - corr_hi) + (dot_low - corr_low): both
    // differences are exact int32 and 65536 times the first is exact in fp32.
    const __m512i corr_hi = _mm512_set1_epi32(qg.corr_hi), corr_low = _mm512_set1_epi32(qg.corr_low);
    const __m512 qs = _mm512_set1_ps(qg.scale);
    for (int64_t j = 0; j < KC; j += 16) {
      const __mmask16 live = first_n16(nk - j);
      const __m512 ks = _mm512_maskz_loadu_ps(live, a.k_scale + tok0 + j0 + j);
      const __m512 dh = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(dot_hi + j), corr_hi));
      const __m512 dl = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(dot_low + j), corr_low));
      const __m512 x = _mm512_mul_ps(_mm512_fmadd_ps(dh, _mm512_set1_ps(65536.f), dl), _mm512_mul_ps(ks, qs));
      _mm512_store_ps(s + j, _mm512_mask_blend_ps(live, _mm512_set1_ps(kNegInf), x));
    }
  }

  // acc (kCols) += sum_j p_j v_scale_j v_j over keys [j0, j0 + nk) (p zero past nk).
  void weighted_sum(const float* p, int64_t j0, int64_t nk, float* acc) {
    alignas(64) float w[KC];
    __m512 wmax = _mm512_setzero_ps();
    for (int64_t j = 0; j < KC; j += 16) {
      const __m512 vs = _mm512_maskz_loadu_ps(first_n16(nk - j), a.v_scale + tok0 + j0 + j);
      const __m512 x = _mm512_mul_ps(_mm512_load_ps(p + j), vs);
      _mm512_store_ps(w + j, x);
      wmax = _mm512_max_ps(wmax, x);
    }
    const float w_max = _mm512_reduce_max_ps(wmax);
    if (w_max <= 0.f) return;  // every v_scale of the chunk is 0
    const __m512 to_fixed = _mm512_set1_ps(kWMax / w_max);
    for (int64_t j = 0; j < KC; j += 16) {
      // The product can round up to 2^24 in fp32: clamp into [0, 2^24 - 1].
      const __m512i w24 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(w + j), to_fixed)),
                                           _mm512_set1_epi32(0xffffff));
      _mm_store_si128(reinterpret_cast<__m128i*>(wb[0] + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w24, 16)));
      _mm_store_si128(reinterpret_cast<__m128i*>(wb[1] + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w24, 8)));
      _mm_store_si128(reinterpret_cast<__m128i*>(wb[2] + j), _mm512_cvtepi32_epi8(w24));
    }
    const __m512 sv = _mm512_set1_ps(w_max / kWMax);
    for (int c = 0; c < NCH; ++c) {
      __m512i h[4], m[4], l[4];
      for (int k = 0; k < 4; ++k) h[k] = m[k] = l[k] = _mm512_setzero_si512();
      for (int64_t j = 0; j < nk; j += 4) {
        __m512i r[4];
        for (int i = 0; i < 4; ++i)
          r[i] = _mm512_maskz_loadu_epi8(j + i < nk ? cmask[c] : 0, vc + (tok0 + j0 + j + i) * a.D + 64 * c);
        // u[k], 128-bit lane L, dword i: rows j..j+3 of column 16 L + 4 k + i.
        const __m512i t0 = _mm512_unpacklo_epi8(r[0], r[1]), t1 = _mm512_unpackhi_epi8(r[0], r[1]);
        const __m512i t2 = _mm512_unpacklo_epi8(r[2], r[3]), t3 = _mm512_unpackhi_epi8(r[2], r[3]);
        const __m512i u[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2),
                              _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
        int32_t b[3];
        for (int x = 0; x < 3; ++x) std::memcpy(&b[x], wb[x] + j, 4);
        const __m512i wh = _mm512_set1_epi32(b[0]), wm = _mm512_set1_epi32(b[1]), wl = _mm512_set1_epi32(b[2]);
        for (int k = 0; k < 4; ++k) {
          h[k] = _mm512_dpbusd_epi32(h[k], wh, u[k]);
          m[k] = _mm512_dpbusd_epi32(m[k], wm, u[k]);
          l[k] = _mm512_dpbusd_epi32(l[k], wl, u[k]);
        }
      }
      // 65536 h + (256 m + l): the second term is an exact int32 (64 keys), the sum rounds once in fp32.
      __m512 x[4];
      for (int k = 0; k < 4; ++k)
        x[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h[k]), _mm512_set1_ps(65536.f),
                               _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(m[k], 8), l[k])));
      // Columns 16 L .. 16 L + 15 = lane L of x[0], x[1], x[2], x[3]: a 4 x 4 transpose of 128-bit lanes.
      const __m512 y0 = _mm512_shuffle_f32x4(x[0], x[1], 0x44), y1 = _mm512_shuffle_f32x4(x[0], x[1], 0xEE);
      const __m512 z0 = _mm512_shuffle_f32x4(x[2], x[3], 0x44), z1 = _mm512_shuffle_f32x4(x[2], x[3], 0xEE);
      const __m512 cols[4] = {_mm512_shuffle_f32x4(y0, z0, 0x88), _mm512_shuffle_f32x4(y0, z0, 0xDD),
                              _mm512_shuffle_f32x4(y1, z1, 0x88), _mm512_shuffle_f32x4(y1, z1, 0xDD)};
      float* o = acc + 64 * c;
      for (int L = 0; L < 4; ++L)
        _mm512_storeu_ps(o + 16 * L, _mm512_fmadd_ps(cols[L], sv, _mm512_loadu_ps(o + 16 * L)));
    }
  }
};

// ------------------------------------------------------------------------------------------ bf16
// NC = 32-column chunks of a row (1..8).
template <int NC>
struct Bf16Cache {
  static constexpr int64_t kCols = 32 * NC;
  struct Query {
    alignas(64) uint16_t hi[kCols], lo[kCols];  // q = hi + lo in bf16, zero past D
  };
  const DecodeArgs& a;
  const uint16_t *kc, *vc;
  // fp32 query and output: q and P as two bf16 terms (16 bits); bf16 ones: a bf16 q is exact as one
  // term and P is rounded to bf16, as torch does, for a bf16 result.
  const bool exact;
  const float smul;  // logit factor scale * log2 e, applied to the fp32 dot products (a bf16 q stays exact)
  int64_t tok0 = 0;
  __mmask32 cmask[NC];
  std::vector<Query> q;

  explicit Bf16Cache(const DecodeArgs& args)
      : a(args), kc(static_cast<const uint16_t*>(a.k)), vc(static_cast<const uint16_t*>(a.v)),
        exact(a.q_dtype == DType::f32), smul(a.scale * kLog2e), q(a.Hq / a.Hkv) {
    for (int c = 0; c < NC; ++c) cmask[c] = first_n32(a.D - 32 * c);
  }

  // x (16 fp32) -> hi = bf16(x), lo = bf16(x - hi).
  static void split16(__m512 x, uint16_t* hi, uint16_t* lo) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
    const __m512 hf = bf16x16_to_f32(h);
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi), h);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lo), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, hf)));
  }

  void set_query(int64_t g, const float* qf) {
    for (int64_t d = 0; d < kCols; d += 16) split16(_mm512_loadu_ps(qf + d), q[g].hi + d, q[g].lo + d);
  }

  void scores(int64_t g, int64_t j0, int64_t nk, float* s) const {
    if (exact) scores_terms<2>(g, j0, nk, s);
    else scores_terms<1>(g, j0, nk, s);
  }

  template <int TERMS>
  void scores_terms(int64_t g, int64_t j0, int64_t nk, float* s) const {
    const Query& qg = q[g];
    for (int64_t j = 0; j < KC; j += 8) {
      __m512 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
      if (j < nk) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const int64_t row = (tok0 + j0 + j + i) * a.D;
          if (g == 0) {
            prefetch_row(vc + row, 2 * a.D);
            prefetch_row(kc + row + KC * a.D, 2 * a.D);
          }
          for (int c = 0; c < NC; ++c) {
            const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(j + i < nk ? cmask[c] : 0, kc + row + 32 * c);
            acc[i] = _mm512_dpbf16_ps(acc[i], kv, (__m512bh)_mm512_load_si512(qg.hi + 32 * c));
            if constexpr (TERMS == 2)
              acc[i] = _mm512_dpbf16_ps(acc[i], kv, (__m512bh)_mm512_load_si512(qg.lo + 32 * c));
          }
        }
      }
      const __m256 x = _mm256_mul_ps(_mm512_castps512_ps256(hsum8(acc)), _mm256_set1_ps(smul));
      const __mmask8 live = static_cast<__mmask8>(first_n16(nk - j));
      _mm256_store_ps(s + j, _mm256_mask_blend_ps(live, _mm256_set1_ps(kNegInf), x));
    }
  }

  // acc (kCols) += sum_j p_j v_j over keys [j0, j0 + nk) (p zero past nk): two rows at a time, their
  // columns interleaved into pairs (vpunpck{l,h}wd, in-lane: the column order comes out permuted and is
  // undone once per chunk), times (p_j, p_j+1) as bf16 hi and lo terms.
  void weighted_sum(const float* p, int64_t j0, int64_t nk, float* acc) const {
    if (exact) weighted_sum_terms<2>(p, j0, nk, acc);
    else weighted_sum_terms<1>(p, j0, nk, acc);
  }

  template <int TERMS>
  void weighted_sum_terms(const float* p, int64_t j0, int64_t nk, float* acc) const {
    alignas(64) uint16_t ph[KC], pl[KC];
    for (int64_t j = 0; j < KC; j += 16) split16(_mm512_load_ps(p + j), ph + j, pl + j);
    __m512 o[2 * NC];
    for (int c = 0; c < 2 * NC; ++c) o[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; j += 2) {
      int32_t bh, bl;
      std::memcpy(&bh, ph + j, 4);
      std::memcpy(&bl, pl + j, 4);
      const __m512bh wh = (__m512bh)_mm512_set1_epi32(bh), wl = (__m512bh)_mm512_set1_epi32(bl);
      const uint16_t* r0 = vc + (tok0 + j0 + j) * a.D;
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        const __m512i x0 = _mm512_maskz_loadu_epi16(cmask[c], r0 + 32 * c);
        const __m512i x1 = _mm512_maskz_loadu_epi16(j + 1 < nk ? cmask[c] : 0, r0 + a.D + 32 * c);
        // 128-bit lane L of lo: columns 8 L .. 8 L + 3 of both rows as pairs; of hi: 8 L + 4 .. 8 L + 7.
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x0, x1), hi = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
        o[2 * c] = _mm512_dpbf16_ps(o[2 * c], lo, wh);
        o[2 * c + 1] = _mm512_dpbf16_ps(o[2 * c + 1], hi, wh);
        if constexpr (TERMS == 2) {
          o[2 * c] = _mm512_dpbf16_ps(o[2 * c], lo, wl);
          o[2 * c + 1] = _mm512_dpbf16_ps(o[2 * c + 1], hi, wl);
        }
      }
    }
    for (int c = 0; c < NC; ++c) {
      // Columns 32 c .. 32 c + 15 = lanes (lo 0, hi 0, lo 1, hi 1), then (lo 2, hi 2, lo 3, hi 3).
      const __m512 a01 = _mm512_shuffle_f32x4(o[2 * c], o[2 * c + 1], 0x44);  // lo 0, lo 1, hi 0, hi 1
      const __m512 a23 = _mm512_shuffle_f32x4(o[2 * c], o[2 * c + 1], 0xEE);
      float* out = acc + 32 * c;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_shuffle_f32x4(a01, a01, 0xD8)));
      _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), _mm512_shuffle_f32x4(a23, a23, 0xD8)));
    }
  }
};

// ------------------------------------------------------------------------------------------ driver
template <class Cache>
void decode_with(const DecodeArgs& a) {
  constexpr int64_t Dc = Cache::kCols;
  const DecodeSplit split(a, Dc);
  const int64_t G = split.G;
  struct Scratch {
    Cache cache;
    Buffer qf, acc;
  };
  PerThread scratch([&] { return Scratch{Cache(a), alloc_floats(Dc, true), alloc_floats(G * Dc)}; });
  parallel_for(split.tasks(), 1, [&](int64_t t0, int64_t t1) {
    Scratch& w = scratch.local();
    Cache& cache = w.cache;
    Buffer &qf = w.qf, &acc = w.acc;
    alignas(64) float s[KC];
    for (int64_t t = t0; t < t1; ++t) {
      int64_t bk, j_begin, j_end;
      split.range(a, t, &bk, &j_begin, &j_end);
      cache.tok0 = bk * a.Smax;
      const int64_t h0 = (bk / a.Hkv) * a.Hq + (bk % a.Hkv) * G;  // first query head (over B x Hq)
      for (int64_t g = 0; g < G; ++g) {
        load_row(a.q, a.q_dtype, (h0 + g) * a.D, a.D, qf.get());  // zeros past D stay
        cache.set_query(g, qf.get());
        split.state(t, g)[Dc] = kNegInf;
        split.state(t, g)[Dc + 1] = 0.f;
      }
      std::memset(acc.get(), 0, sizeof(float) * G * Dc);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += KC) {
        const int64_t nk = std::min(KC, j_end - j0);
        for (int64_t g = 0; g < G; ++g) {
          cache.scores(g, j0, nk, s);
          // Online softmax over the chunk: P (0 past nk) replaces the logits in s.
          float* st = split.state(t, g);
          __m512 mx = _mm512_load_ps(s);
          for (int64_t j = 16; j < KC; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j));
          const float m_new = std::max(st[Dc], _mm512_reduce_max_ps(mx));
          const float alpha = std::exp2(st[Dc] - m_new);  // 0 on the task's first chunk
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < KC; j += 16) {
            const __m512 pv = VecAvx512::exp2(_mm512_sub_ps(_mm512_load_ps(s + j), _mm512_set1_ps(m_new)));
            _mm512_store_ps(s + j, pv);
            sum = _mm512_add_ps(sum, pv);
          }
          st[Dc] = m_new;
          st[Dc + 1] = st[Dc + 1] * alpha + _mm512_reduce_add_ps(sum);
          float* ag = acc.get() + g * Dc;
          for (int64_t d = 0; d < Dc; d += 16)
            _mm512_storeu_ps(ag + d, _mm512_mul_ps(_mm512_loadu_ps(ag + d), _mm512_set1_ps(alpha)));
          cache.weighted_sum(s, j0, nk, ag);
        }
      }
      for (int64_t g = 0; g < G; ++g) split.finish(a, t, g, acc.get() + g * Dc);
    }
  });
  if (split.nsplit > 1) {
    parallel_for(a.B * a.Hq, 1, [&](int64_t bh0, int64_t bh1) {
      for (int64_t bh = bh0; bh < bh1; ++bh) split.merge(a, bh, scratch.local().acc.get());
    });
  }
}

}  // namespace

void decode_attention_avx512_bf16(const DecodeArgs& a) {
  if (a.kv_dtype == DType::i8) {
    switch ((a.D + 63) / 64) {
      case 1: return decode_with<I8Cache<1>>(a);
      case 2: return decode_with<I8Cache<2>>(a);
      case 3: return decode_with<I8Cache<3>>(a);
      default: return decode_with<I8Cache<4>>(a);
    }
  }
  switch ((a.D + 31) / 32) {
    case 1: return decode_with<Bf16Cache<1>>(a);
    case 2: return decode_with<Bf16Cache<2>>(a);
    case 3: return decode_with<Bf16Cache<3>>(a);
    case 4: return decode_with<Bf16Cache<4>>(a);
    case 5: return decode_with<Bf16Cache<5>>(a);
    case 6: return decode_with<Bf16Cache<6>>(a);
    case 7: return decode_with<Bf16Cache<7>>(a);
    default: return decode_with<Bf16Cache<8>>(a);
  }
}

}  // namespace quark
