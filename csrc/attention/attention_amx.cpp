// AMX prefill forward, bf16 and fp32 inputs: both GEMMs of a block on AMX tiles (TDPBF16PS: a
// 16x16 fp32 tile += 16x32 bf16 . 32x16 bf16, ~16x the fp32 FMA rate of AVX-512 on one core), the
// online softmax on AVX-512.
//
// Everything is computed transposed, queries along the columns of a tile:
//   S^T (keys, queries) = K (keys, d) . Q^T (d, queries)       A = K, B = Q^T packed per task
//   O^T (d, queries)   += V^T (d, keys) . P^T (keys, queries)  A = V^T, B = P^T written by the softmax
// so the softmax statistics of a query are one lane of a zmm, the reductions over keys (max, sum)
// are vertical vector ops, and P^T goes into the pair-interleaved B layout (word w of B row r holds
// rows 2r and 2r+1 of column w) with one shuffle per 32 values. K and V^T are packed once per call
// into whole 1 KiB tiles (rows of 64 bytes): strided A rows would put a 4 KiB-strided V^T tile's 16
// rows in one L1 set.
//
// fp32 inputs use three bf16 products (bf16x3, as oneDNN does for fp32 on AMX): x = hi + lo with
// hi = bf16(x), lo = bf16(x - hi) carries 16 significant bits, and x.y ~ hi.hi + hi.lo + lo.hi drops
// lo.lo and the rounding of lo, a relative error ~2^-17 per product, accumulated in fp32. The tests
// hold it to < 1e-4 relative against float64 like the fp32 AVX-512 path (measured 4e-6 to 2e-5 over
// odd shapes, S = 1..1000, D = 1..256). bf16 inputs use one product, with P rounded to bf16 as torch does.
//
// Online softmax in base 2; the O^T rescale pass runs only for blocks that raise some query's max.
// (A lazy rescale, keeping a stale max until a block exceeds it by a margin, measured no faster here
// and cost bf16 accuracy: the dominant weight of a peaked row is then no longer exactly 1 in bf16.)
//
// Blocks: BM = 32 queries per task (two tile columns), BN = 128 keys per block (the O^T tiles are
// loaded and stored once per 4 k-steps, which keeps TMUL busy); head dims are padded to
// Dr = round_up(D, 32) with zeros (one tile's reduction depth), keys to Skp = round_up(Sk, BN). Causal
// blocks stop at the last visible key, rounded up to 32 keys.
#include <immintrin.h>

#include "attention/attention_blocked.h"

namespace quark {
namespace {

constexpr int64_t BM = 32;  // queries per task: two 16-column tiles
constexpr int64_t BN = 128;  // keys per block: S^T is 128 x 32 fp32 = 16 KiB

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile state of the calling thread: tmm0-7 all 16 rows x 64 bytes; released on scope exit.
struct AmxTiles {
  AmxTiles() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) { c.colsb[t] = 64; c.rows[t] = 16; }
    _tile_loadconfig(&c);
  }
  ~AmxTiles() { _tile_release(); }
};

// Tile roles in both GEMMs: C = tmm0-3 (2 x 2 output tiles), A = tmm4-5, B = tmm6-7.
inline void dp2x2() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// An A operand: 16 x 32 bf16 tiles stored whole (1 KiB, rows of 64 bytes), hi and (T = 3) lo parts at
// the same offsets; tile 4 of k-step k at k * step, tile 5 at k * step + next.
struct TileA {
  const uint16_t *hi, *lo;
  int64_t step, next;
};

// C (32 rows, 32 columns) fp32 at c (ld BM) [+]= A (32, 32 nk) . B (32 nk, 32), T = 1 or 3 bf16 terms.
// B is (16 nk word rows, BM words) of pairs at b_hi / b_lo; its columns are the queries.
template <int T>
static void gemm32(bool load_c, float* c, const TileA& a, const uint32_t* b_hi, const uint32_t* b_lo, int64_t nk) {
  constexpr int64_t sc = BM * 4;
  if (load_c) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16, sc);
    _tile_loadd(2, c + 16 * BM, sc);
    _tile_loadd(3, c + 16 * BM + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < nk; ++k) {
    const uint16_t* ah = a.hi + k * a.step;
    const uint32_t* bh = b_hi + k * 16 * BM;
    _tile_loadd(4, ah, 64);
    _tile_loadd(5, ah + a.next, 64);
    _tile_loadd(6, bh, sc);
    _tile_loadd(7, bh + 16, sc);
    dp2x2();
    if constexpr (T == 3) {
      const uint16_t* al = a.lo + k * a.step;
      const uint32_t* bl = b_lo + k * 16 * BM;
      _tile_loadd(6, bl, sc);
      _tile_loadd(7, bl + 16, sc);
      dp2x2();  // hi . lo
      _tile_loadd(4, al, 64);
      _tile_loadd(5, al + a.next, 64);
      _tile_loadd(6, bh, sc);
      _tile_loadd(7, bh + 16, sc);
      dp2x2();  // lo . hi
    }
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  _tile_stored(2, c + 16 * BM, sc);
  _tile_stored(3, c + 16 * BM + 16, sc);
}

// 2^x for x <= 0, 0 for x = -inf: x = n + f, n = round(x), f = x - n in [-0.5, 0.5] (vreduceps,
// which gives f = 0 at -inf, where 2^n = 0), 2^f by a minimax polynomial of degree DEG (relative
// error 2.7e-6 for 4, 2.3e-7 for 5), scaled by 2^n (vscalefps).
template <int DEG>
inline __m512 exp2_block(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 p;
  if constexpr (DEG == 4) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(9.5699672e-3f), f, _mm512_set1_ps(5.5917513e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024744e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312185e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999928e-1f));
  } else {
    p = _mm512_fmadd_ps(_mm512_set1_ps(1.3276356e-3f), f, _mm512_set1_ps(9.6755084e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507135e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  }
  return _mm512_scalef_ps(p, n);
}

// 16 x 16 transpose of 32-bit elements: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3.
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                  y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

inline __mmask16 first_n(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }
inline __mmask32 first_n32(int64_t n) { return n <= 0 ? 0 : n >= 32 ? 0xffffffffu : (1u << n) - 1; }

// Two fp32 vectors -> 32 bf16 (x0 first): hi = bf16(x) and, for lo != nullptr, lo = bf16(x - hi).
inline __m512i split32(__m512 x0, __m512 x1, __m512i* lo) {
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
  if (lo) {
    const __m512 l0 = _mm512_sub_ps(x0, bf16x16_to_f32(_mm512_castsi512_si256(h)));
    const __m512 l1 = _mm512_sub_ps(x1, bf16x16_to_f32(_mm512_extracti64x4_epi64(h, 1)));
    *lo = (__m512i)_mm512_cvtne2ps_pbh(l1, l0);
  }
  return h;
}

// 32 consecutive elements of p (the first n, zeros after) as bf16: hi and, for float input, lo.
inline __m512i load32(const uint16_t* p, int64_t n, __m512i*) { return _mm512_maskz_loadu_epi16(first_n32(n), p); }
inline __m512i load32(const float* p, int64_t n, __m512i* lo) {
  return split32(_mm512_maskz_loadu_ps(first_n(n), p), _mm512_maskz_loadu_ps(first_n(n - 16), p + 16), lo);
}

// 32 bf16 (a in the low half, b in the high) -> 16 pairs (a[i], b[i]).
inline __m512i interleave_pairs(__m512i x) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, x);
}

// Two rows of 16 values -> 16 pairs (a[i], b[i]) as bf16: hi and, for T = 3, lo.
template <int T>
inline __m512i pair_rows(__m512 a, __m512 b, __m512i* lo) {
  __m512i l;
  const __m512i h = split32(a, b, T == 3 ? &l : nullptr);
  if constexpr (T == 3) *lo = interleave_pairs(l);
  return interleave_pairs(h);
}

// 16 values of pa and of pb (the first na / nb, zeros after) -> 16 pairs (pa[i], pb[i]).
inline __m512i load_pairs(const uint16_t* pa, const uint16_t* pb, int64_t na, int64_t nb, __m512i*) {
  const __m256i a = _mm256_maskz_loadu_epi16(first_n(na), pa), b = _mm256_maskz_loadu_epi16(first_n(nb), pb);
  return interleave_pairs(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}
inline __m512i load_pairs(const float* pa, const float* pb, int64_t na, int64_t nb, __m512i* lo) {
  return pair_rows<3>(_mm512_maskz_loadu_ps(first_n(na), pa), _mm512_maskz_loadu_ps(first_n(nb), pb), lo);
}

// In = float (T = 3 bf16 terms) or uint16_t holding bf16 (T = 1).
template <class In>
struct AmxForward {
  static constexpr int T = std::is_same_v<In, float> ? 3 : 1;
  static constexpr int kDeg = T == 3 ? 5 : 4;  // exp2 polynomial: P keeps ~16 bits (T = 3) or 8 (T = 1)
  const AttentionFwdArgs& a;
  const In *q, *k, *v;
  int64_t D, Dr, Skp, nbk, nqb, group;
  // Per kv head: K (Skp, Dr) and V^T (Dr, Skp) as whole tiles (pack_kv), bf16, hi and (T = 3) lo
  // parts, in the calling thread's scratch.
  uint16_t *k_hi, *k_lo = nullptr, *vt_hi, *vt_lo = nullptr;

  explicit AmxForward(const AttentionFwdArgs& args)
      : a(args), q(static_cast<const In*>(a.q)), k(static_cast<const In*>(a.k)), v(static_cast<const In*>(a.v)) {
    D = a.D;
    Dr = round_up(D, 32);
    Skp = round_up(a.Sk, BN);
    nbk = a.B * a.Hkv;
    nqb = (a.Sq + BM - 1) / BM;
    group = a.Hq / a.Hkv;
    const int64_t n = nbk * Skp * Dr;
    k_hi = static_cast<uint16_t*>(thread_scratch(sizeof(uint16_t) * n * 2 * T));
    vt_hi = k_hi + n;
    if (T == 3) {
      k_lo = vt_hi + n;
      vt_lo = k_lo + n;
    }
  }

  // Keys [j0, j0 + BN) of kv head bk, zero-padded, into whole tiles: K as (16 keys, 32 d) tiles,
  // key tile kt and d-step ds at (kt * Dr / 32 + ds) * 512; V^T as (16 d, 32 keys) tiles, d tile dt and
  // key step ks at (dt * Skp / 32 + ks) * 512. V^T is built 32 keys x 16 d at a time: key pairs
  // interleaved into words, then a 16 x 16 word transpose.
  void pack_kv(int64_t bk, int64_t j0) {
    const int64_t base = bk * Skp * Dr;
    const In* kh = k + bk * a.Sk * D;
    const In* vh = v + bk * a.Sk * D;
    for (int64_t j = j0; j < j0 + BN; ++j)
      for (int64_t c = 0; c < Dr; c += 32) {
        __m512i lo;
        const __m512i hi = load32(kh + j * D + c, j < a.Sk ? D - c : 0, &lo);
        const int64_t off = base + ((j / 16) * (Dr / 32) + c / 32) * 512 + (j % 16) * 32;
        _mm512_storeu_si512(k_hi + off, hi);
        if constexpr (T == 3) _mm512_storeu_si512(k_lo + off, lo);
      }
    for (int64_t jt = j0; jt < j0 + BN; jt += 32)
      for (int64_t d0 = 0; d0 < Dr; d0 += 16) {
        __m512i hi[16], lo[16];
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t j = jt + 2 * i;
          hi[i] = load_pairs(vh + j * D + d0, vh + (j + 1) * D + d0, j < a.Sk ? D - d0 : 0, j + 1 < a.Sk ? D - d0 : 0,
                             &lo[i]);
        }
        const int64_t off = base + ((d0 / 16) * (Skp / 32) + jt / 32) * 512;
        transpose16(hi);
        for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(vt_hi + off + i * 32, hi[i]);
        if constexpr (T == 3) {
          transpose16(lo);
          for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(vt_lo + off + i * 32, lo[i]);
        }
      }
  }

  struct Scratch {
    Array<uint32_t> qt_hi, qt_lo;  // (Dr / 2, BM) Q^T as B pairs
    Array<uint32_t> p_hi, p_lo;    // (BN / 2, BM) P^T as B pairs
    Buffer s, o;                   // S^T (BN, BM), O^T (Dr, BM)
    alignas(64) float m[BM], l[BM];
  };

  // Q rows [i0, i0 + mb) of query head bh -> Q^T pairs (rows past mb are zero): 16 rows x 32
  // columns (16 words) at a time, a 16 x 16 word transpose.
  void pack_q(Scratch& w, int64_t bh, int64_t i0, int64_t mb) const {
    for (int64_t qc = 0; qc < BM; qc += 16)
      for (int64_t c = 0; c < Dr; c += 32) {
        __m512i hi[16], lo[16];
        for (int64_t i = 0; i < 16; ++i)
          hi[i] = load32(q + (bh * a.Sq + i0 + qc + i) * D + c, qc + i < mb ? D - c : 0, &lo[i]);
        transpose16(hi);
        for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(w.qt_hi.get() + (c / 2 + i) * BM + qc, hi[i]);
        if constexpr (T == 3) {
          transpose16(lo);
          for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(w.qt_lo.get() + (c / 2 + i) * BM + qc, lo[i]);
        }
      }
  }

  // Online softmax of the block S^T (nkr keys from j0, BM queries from i0): scales and masks S^T,
  // raises the running maxima the block exceeds (rescaling O^T and l), writes P^T pairs, adds to l.
  void softmax(Scratch& w, int64_t i0, int64_t j0, int64_t nkr, float smul) const {
    const int64_t off = a.Sk - a.Sq;  // causal: query i sees keys j <= i + off
    const __m512 ninf = _mm512_set1_ps(kNegInf), mulv = _mm512_set1_ps(smul);
    float* s = w.s.get();
    for (int64_t qc = 0; qc < BM; qc += 16) {
      const bool mask = j0 + nkr > a.Sk || (a.causal && j0 + nkr - 1 - off > i0 + qc);
      const __m512i lane_q = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i0 + qc)),
                                              _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
      __m512 mx = ninf;
      for (int64_t r = 0; r < nkr; ++r) {
        float* row = s + r * BM + qc;
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row), mulv);
        if (mask) {
          const int64_t j = j0 + r;
          const __m512i first = _mm512_set1_epi32(static_cast<int>(j - off));  // first query that sees key j
          const __mmask16 vis = j >= a.Sk ? 0 : a.causal ? _mm512_cmpge_epi32_mask(lane_q, first) : 0xffff;
          x = _mm512_mask_blend_ps(vis, ninf, x);
        }
        _mm512_storeu_ps(row, x);
        mx = _mm512_max_ps(mx, x);
      }
      __m512 m = _mm512_load_ps(w.m + qc);
      __m512 l = _mm512_load_ps(w.l + qc);
      const __mmask16 move = _mm512_cmp_ps_mask(mx, m, _CMP_GT_OQ);
      if (move) {
        const __m512 m_new = _mm512_mask_blend_ps(move, m, mx);
        // 2^(m - m_new) is 0 where m was -inf (O^T and l are still 0 there) and 1 where m stays.
        const __m512 alpha = _mm512_mask_blend_ps(move, _mm512_set1_ps(1.f), exp2_block<5>(_mm512_sub_ps(m, m_new)));
        l = _mm512_mul_ps(l, alpha);
        m = m_new;
        float* o = w.o.get() + qc;
        for (int64_t d = 0; d < Dr; ++d)
          _mm512_storeu_ps(o + d * BM, _mm512_mul_ps(_mm512_loadu_ps(o + d * BM), alpha));
        _mm512_store_ps(w.m + qc, m);
      }
      // Lanes that have seen no key keep m = -inf and only -inf scores: subtract 0 there, not -inf.
      const __m512 m_use = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ), m, _mm512_setzero_ps());
      __m512 sum = _mm512_setzero_ps();
      for (int64_t r = 0; r < nkr; r += 2) {
        const __m512 p0 = exp2_block<kDeg>(_mm512_sub_ps(_mm512_loadu_ps(s + r * BM + qc), m_use));
        const __m512 p1 = exp2_block<kDeg>(_mm512_sub_ps(_mm512_loadu_ps(s + (r + 1) * BM + qc), m_use));
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        __m512i lo;
        _mm512_storeu_si512(w.p_hi.get() + (r / 2) * BM + qc, pair_rows<T>(p0, p1, &lo));
        if constexpr (T == 3) _mm512_storeu_si512(w.p_lo.get() + (r / 2) * BM + qc, lo);
      }
      _mm512_store_ps(w.l + qc, _mm512_add_ps(l, sum));
    }
  }

  // out rows [i0, i0 + mb) of head bh = O^T transposed / l; lse = (m + log2 l) ln 2, -inf if no key.
  void store(Scratch& w, int64_t bh, int64_t i0, int64_t mb) const {
    for (int64_t qc = 0; qc < mb; qc += 16) {
      const __m512 l = _mm512_load_ps(w.l + qc);
      const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(l, _mm512_setzero_ps(), _CMP_GT_OQ),
                                             _mm512_set1_ps(1.f), l);
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512i r[16];
        for (int64_t i = 0; i < 16; ++i)
          r[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(w.o.get() + (d0 + i) * BM + qc), inv));
        transpose16(r);
        const __mmask16 cols = first_n(D - d0);
        for (int64_t i = 0; i < std::min<int64_t>(16, mb - qc); ++i) {
          const int64_t off = (bh * a.Sq + i0 + qc + i) * D + d0;
          const __m512 x = _mm512_castsi512_ps(r[i]);
          if constexpr (T == 3) _mm512_mask_storeu_ps(static_cast<float*>(a.out) + off, cols, x);
          else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + off, cols, (__m256i)_mm512_cvtneps_pbh(x));
        }
      }
    }
    if (a.lse)
      for (int64_t r = 0; r < mb; ++r)
        a.lse[bh * a.Sq + i0 + r] = w.l[r] > 0.f ? (w.m[r] + std::log2(w.l[r])) * kLn2 : kNegInf;
  }

  void run() {
    const int64_t nkb = Skp / BN;
    const float smul = a.scale * kLog2e;
    parallel_for(nbk * nkb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) pack_kv(t / nkb, (t % nkb) * BN);
    });
    // Descending query blocks: under a causal mask the last ones cost most; start them first.
    parallel_for(a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
      AmxTiles tiles;
      Scratch w;
      w.qt_hi = alloc_array<uint32_t>(Dr / 2 * BM);
      w.p_hi = alloc_array<uint32_t>(BN / 2 * BM);
      if (T == 3) {
        w.qt_lo = alloc_array<uint32_t>(Dr / 2 * BM);
        w.p_lo = alloc_array<uint32_t>(BN / 2 * BM);
      }
      w.s = alloc_floats(BN * BM);
      w.o = alloc_floats(Dr * BM);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / nqb, i0 = (nqb - 1 - t % nqb) * BM, mb = std::min(BM, a.Sq - i0);
        const int64_t bk = (bh / a.Hq) * a.Hkv + (bh % a.Hq) / group;
        const int64_t base = bk * Skp * Dr;
        pack_q(w, bh, i0, mb);
        std::fill(w.m, w.m + BM, kNegInf);
        std::fill(w.l, w.l + BM, 0.f);
        std::memset(w.o.get(), 0, sizeof(float) * Dr * BM);
        const int64_t kend = visible_keys(i0 + mb - 1, a.Sq, a.Sk, a.causal);
        for (int64_t j0 = 0; j0 < kend; j0 += BN) {
          const int64_t nks = std::min<int64_t>(BN, round_up(kend - j0, 32)) / 32;  // 32-key steps
          for (int64_t ks = 0; ks < nks; ++ks) {  // S^T rows j0 + 32 ks ..: key tiles j0 / 16 + 2 ks, + 1
            const int64_t kt = base + ((j0 / 16 + 2 * ks) * (Dr / 32)) * 512;
            const TileA kk{k_hi + kt, T == 3 ? k_lo + kt : nullptr, 512, (Dr / 32) * 512};
            gemm32<T>(false, w.s.get() + 32 * ks * BM, kk, w.qt_hi.get(), w.qt_lo.get(), Dr / 32);
          }
          softmax(w, i0, j0, 32 * nks, smul);
          for (int64_t d0 = 0; d0 < Dr; d0 += 32) {  // O^T rows d0 ..: d tiles d0 / 16, + 1
            const int64_t vt = base + ((d0 / 16) * (Skp / 32) + j0 / 32) * 512;
            const TileA vv{vt_hi + vt, T == 3 ? vt_lo + vt : nullptr, 512, (Skp / 32) * 512};
            gemm32<T>(true, w.o.get() + d0 * BM, vv, w.p_hi.get(), w.p_lo.get(), nks);
          }
        }
        store(w, bh, i0, mb);
      }
    });
  }
};

}  // namespace

void attention_forward_amx(const AttentionFwdArgs& a) {
  if (a.dtype == DType::bf16) AmxForward<uint16_t>(a).run();
  else AmxForward<float>(a).run();
}

}  // namespace quark
