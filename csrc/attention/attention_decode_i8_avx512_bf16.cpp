// int8 KV-cache decode on AVX512-VNNI: vpdpbusd multiplies 64 unsigned by 64 signed bytes and adds
// them in fours into 16 int32 lanes, so the cache bytes are used as they are, never widened to fp32
// (the AVX-512 path spends three instructions per 16 cached values on that).
//
//   q . k   q (scale * log2 e folded in) is rounded per (task, query head) to 24-bit fixed point
//           q24 = 65536 qh + 256 qm + ql with signed byte limbs; the key bytes become unsigned by
//           k + 128 (one xor), and q24 . k = 65536 (Kh - 128 sum qh) + (Kml - 128 sum (256 qm + ql))
//           with Kh = sum_d (k + 128) qh and Kml the same for 256 qm + ql: exact int32 sums (D <= 256).
//   p . V   per chunk of 64 keys, w_j = p_j * v_scale_j is rounded to 24-bit fixed point against the
//           chunk's largest w (three unsigned byte limbs); four key rows are interleaved bytewise (two
//           unpack levels) so one vpdpbusd adds w_j..w_j+3 times v_j..v_j+3 for 16 columns (the
//           columns come out in a fixed lane order, undone once per chunk); exact int32 sums per
//           limb, then scaled into fp32 accumulators.
// 24 bits, not 16: the rounding is relative to the largest entry, and a query channel 100x the
// others (common in LLMs) made 16-bit q cost 1e-3 relative error; at 24 bits the result is as exact
// as the fp32 paths (~3e-7 relative to float64 on the dequantized cache, < 1e-5 with such outliers).
// One core streams the cache faster with software prefetch (measured 1.3-1.6x at B = 8).
// Splits and merge: DecodeSplit (attention_blocked.h), like the other decode paths.
#include <immintrin.h>

#include "attention/attention_blocked.h"
#include "attention/attention_vec_avx512.h"

namespace quark {
namespace {

constexpr int64_t KC = 64;       // keys per chunk: one fixed-point scale for the chunk's weights
constexpr int kQMax = 8355711;   // 127 * (65536 + 256 + 1): q24 splits into three signed bytes
constexpr float kWMax = 16777215.f;  // 2^24 - 1: w24 splits into three unsigned bytes

inline __mmask64 first_n64(int64_t n) { return n <= 0 ? 0 : n >= 64 ? ~0ull : (1ull << n) - 1; }
inline __mmask16 first_n16(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// v[0..8) -> their horizontal sums, in order, as 8 int32.
inline __m256i reduce8(const __m512i v[8]) {
  __m512i t[4], u[2];
  for (int i = 0; i < 4; ++i)  // lane L of t[i]: sums of v[2i], v[2i+1] over two of L's four elements, twice
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // lane L of u[i]: v[4i..4i+3] summed over L's four elements
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i s = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x44), _mm512_shuffle_i32x4(u[0], u[1], 0xEE));
  const __m512i r = _mm512_shuffle_i32x4(s, s, 0xD8);  // lanes: u0 (L0+L2), u1 (L0+L2), u0 (L1+L3), u1 (L1+L3)
  return _mm256_add_epi32(_mm512_castsi512_si256(r), _mm512_extracti64x4_epi64(r, 1));
}

struct QueryI8 {
  alignas(64) int8_t hi[256], mid[256], lo[256];  // limbs of q24, zero past D
  int32_t corr_hi, corr_low;  // 128 * sum_d qh and 128 * sum_d (256 qm + ql)
  float scale;                // q ~ q24 * scale
};

// q row (fp32, scale * log2 e applied, zero past D) -> fixed-point limbs.
inline void quantize_query(const float* qf, int64_t Dc, QueryI8* out) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dc; d += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(qf + d)));
  const float m = _mm512_reduce_max_ps(amax);
  out->scale = m > 0.f ? m / kQMax : 0.f;
  const __m512 inv = _mm512_set1_ps(m > 0.f ? kQMax / m : 0.f);
  __m512i sum_hi = _mm512_setzero_si512(), sum_low = _mm512_setzero_si512();
  for (int64_t d = 0; d < Dc; d += 16) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(qf + d), inv));
    q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(kQMax)), _mm512_set1_epi32(-kQMax));
    // Signed byte limbs, lowest first: l = the low byte sign-extended, then (q - l) / 256 is exact.
    const __m512i lo = _mm512_srai_epi32(_mm512_slli_epi32(q, 24), 24);
    const __m512i r = _mm512_srai_epi32(_mm512_sub_epi32(q, lo), 8);
    const __m512i mid = _mm512_srai_epi32(_mm512_slli_epi32(r, 24), 24);
    const __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(r, mid), 8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out->hi + d), _mm512_cvtepi32_epi8(hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out->mid + d), _mm512_cvtepi32_epi8(mid));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out->lo + d), _mm512_cvtepi32_epi8(lo));
    sum_hi = _mm512_add_epi32(sum_hi, hi);
    sum_low = _mm512_add_epi32(sum_low, _mm512_add_epi32(_mm512_slli_epi32(mid, 8), lo));
  }
  out->corr_hi = 128 * _mm512_reduce_add_epi32(sum_hi);
  out->corr_low = 128 * _mm512_reduce_add_epi32(sum_low);
}

// NCH = 64-column chunks of a cache row (1..4), a template argument so the accumulators stay in registers.
template <int NCH>
struct Task {
  const DecodeArgs& a;
  const int8_t *kc, *vc;
  int64_t tok0;        // cache row of position 0 of this (batch, kv head)
  __mmask64 cmask[NCH];  // valid bytes of each chunk of a row

  // s[0, nk) = base-2 logits of keys [j0, j0 + nk), -inf up to KC.
  void scores(const QueryI8& q, int64_t j0, int64_t nk, float* s) const {
    alignas(64) int32_t dot_hi[KC] = {}, dot_low[KC] = {};
    const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t j = 0; j < nk; j += 8) {
      __m512i h[8], m[8], l[8];
      for (int i = 0; i < 8; ++i) h[i] = m[i] = l[i] = _mm512_setzero_si512();
#pragma GCC unroll 8  // keeps the 24 accumulators in registers
      for (int i = 0; i < 8; ++i) {
        const int8_t* row = kc + (tok0 + j0 + j + i) * a.D;
        // Prefetch this row of V (read right after the scores) and of K in the next chunk.
        for (int c = 0; c < NCH; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(row + KC * a.D + 64 * c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(vc + (row - kc) + 64 * c), _MM_HINT_T0);
        }
        for (int c = 0; c < NCH; ++c) {
          const __m512i ku = _mm512_xor_si512(_mm512_maskz_loadu_epi8(j + i < nk ? cmask[c] : 0, row + 64 * c), bias);
          h[i] = _mm512_dpbusd_epi32(h[i], ku, _mm512_load_si512(q.hi + 64 * c));
          m[i] = _mm512_dpbusd_epi32(m[i], ku, _mm512_load_si512(q.mid + 64 * c));
          l[i] = _mm512_dpbusd_epi32(l[i], ku, _mm512_load_si512(q.lo + 64 * c));
        }
      }
      for (int i = 0; i < 8; ++i) m[i] = _mm512_add_epi32(_mm512_slli_epi32(m[i], 8), l[i]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dot_hi + j), reduce8(h));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dot_low + j), reduce8(m));
    }
    // logit = q24 . k * q.scale * k_scale, q24 . k = 65536 (dot_hi - corr_hi) + (dot_low - corr_low): both
    // differences are exact int32 and 65536 times the first is exact in fp32.
    const __m512i corr_hi = _mm512_set1_epi32(q.corr_hi), corr_low = _mm512_set1_epi32(q.corr_low);
    const __m512 qs = _mm512_set1_ps(q.scale);
    for (int64_t j = 0; j < KC; j += 16) {
      const __mmask16 live = first_n16(nk - j);
      const __m512 ks = _mm512_maskz_loadu_ps(live, a.k_scale + tok0 + j0 + j);
      const __m512 dh = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(dot_hi + j), corr_hi));
      const __m512 dl = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(dot_low + j), corr_low));
      const __m512 x = _mm512_mul_ps(_mm512_fmadd_ps(dh, _mm512_set1_ps(65536.f), dl), _mm512_mul_ps(ks, qs));
      _mm512_store_ps(s + j, _mm512_mask_blend_ps(live, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), x));
    }
  }

  // acc (Dp) += scale * sum_j w_j v_j over keys [j0, j0 + nk), w as three byte limbs (zero past nk).
  void weighted_sum(const uint8_t* const w[3], float scale, int64_t j0, int64_t nk, float* acc) const {
    const __m512 sv = _mm512_set1_ps(scale);
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
        for (int x = 0; x < 3; ++x) std::memcpy(&b[x], w[x] + j, 4);
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
      for (int L = 0; L < 4; ++L) _mm512_storeu_ps(o + 16 * L, _mm512_fmadd_ps(cols[L], sv, _mm512_loadu_ps(o + 16 * L)));
    }
  }
};

template <int NCH>
void decode_i8(const DecodeArgs& a) {
  const int64_t D = a.D, Dc = 64 * NCH;
  const DecodeSplit split(a, Dc);
  const int64_t G = split.G;
  const float qmul = a.scale * kLog2e;
#pragma omp parallel
  {
    Buffer qf = alloc_floats(Dc), acc = alloc_floats(G * Dc);
    std::unique_ptr<QueryI8[]> q(new QueryI8[G]);
    alignas(64) float s[KC];
    alignas(64) uint8_t wb[3][KC];  // byte limbs of w, most significant first
    Task<NCH> task{a, static_cast<const int8_t*>(a.k), static_cast<const int8_t*>(a.v), 0, {}};
    for (int c = 0; c < NCH; ++c) task.cmask[c] = first_n64(D - 64 * c);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < split.tasks(); ++t) {
      int64_t bk, j_begin, j_end;
      split.range(a, t, &bk, &j_begin, &j_end);
      task.tok0 = bk * a.Smax;
      const int64_t h0 = (bk / a.Hkv) * a.Hq + (bk % a.Hkv) * G;  // first query head (over B x Hq)
      for (int64_t g = 0; g < G; ++g) {
        std::memset(qf.get(), 0, sizeof(float) * Dc);
        load_row(a.q, a.q_dtype, (h0 + g) * D, D, qf.get(), qmul);
        quantize_query(qf.get(), Dc, &q[g]);
        float* st = split.state(t, g);
        st[Dc] = kNegInf;
        st[Dc + 1] = 0.f;
      }
      std::memset(acc.get(), 0, sizeof(float) * G * Dc);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += KC) {
        const int64_t nk = std::min(KC, j_end - j0);
        for (int64_t g = 0; g < G; ++g) {
          task.scores(q[g], j0, nk, s);
          // Online softmax over the chunk, then w = p * v_scale in 16-bit fixed point.
          float* st = split.state(t, g);
          __m512 mx = _mm512_load_ps(s);
          for (int64_t j = 16; j < KC; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j));
          const float m_new = std::max(st[Dc], _mm512_reduce_max_ps(mx));
          const float alpha = std::exp2(st[Dc] - m_new);  // 0 on the task's first chunk
          __m512 sum = _mm512_setzero_ps(), wmax = _mm512_setzero_ps();
          for (int64_t j = 0; j < KC; j += 16) {
            const __m512 p = VecAvx512::exp2(_mm512_sub_ps(_mm512_load_ps(s + j), _mm512_set1_ps(m_new)));
            const __m512 w = _mm512_mul_ps(p, _mm512_maskz_loadu_ps(first_n16(nk - j), a.v_scale + task.tok0 + j0 + j));
            sum = _mm512_add_ps(sum, p);
            wmax = _mm512_max_ps(wmax, w);
            _mm512_store_ps(s + j, w);
          }
          st[Dc] = m_new;
          st[Dc + 1] = st[Dc + 1] * alpha + _mm512_reduce_add_ps(sum);
          float* ag = acc.get() + g * Dc;
          for (int64_t d = 0; d < Dc; d += 16)
            _mm512_storeu_ps(ag + d, _mm512_mul_ps(_mm512_loadu_ps(ag + d), _mm512_set1_ps(alpha)));
          const float w_max = _mm512_reduce_max_ps(wmax);
          if (w_max <= 0.f) continue;  // every v_scale of the chunk is 0
          const __m512 to_fixed = _mm512_set1_ps(kWMax / w_max);
          for (int64_t j = 0; j < KC; j += 16) {
            // The product can round up to 2^24 in fp32: clamp into [0, 2^24 - 1].
            const __m512i w24 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(s + j), to_fixed)),
                                                 _mm512_set1_epi32(0xffffff));
            _mm_store_si128(reinterpret_cast<__m128i*>(wb[0] + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w24, 16)));
            _mm_store_si128(reinterpret_cast<__m128i*>(wb[1] + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w24, 8)));
            _mm_store_si128(reinterpret_cast<__m128i*>(wb[2] + j), _mm512_cvtepi32_epi8(w24));
          }
          const uint8_t* const limbs[3] = {wb[0], wb[1], wb[2]};
          task.weighted_sum(limbs, w_max / kWMax, j0, nk, ag);
        }
      }
      for (int64_t g = 0; g < G; ++g) std::memcpy(split.state(t, g), acc.get() + g * Dc, sizeof(float) * Dc);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < a.B * a.Hq; ++bh) split.merge(a, bh, acc.get());
  }
}

}  // namespace

void decode_attention_i8_avx512_bf16(const DecodeArgs& a) {
  switch ((a.D + 63) / 64) {
    case 1: return decode_i8<1>(a);
    case 2: return decode_i8<2>(a);
    case 3: return decode_i8<3>(a);
    default: return decode_i8<4>(a);
  }
}

}  // namespace quark
