// Blocked attention driver shared by the SIMD paths (FlashAttention-2 on a CPU), templated on a
// vector-traits class V (VecAvx2 / VecAvx512) so every ISA runs the same algorithm.
//
// Forward: K is packed once per call into transposed blocks Kt[kb] = (D, BN) and V into zero-padded
// rows (Sk_pad, Dp), converting bf16 to fp32 on the way. One task per (batch, q head, query block of
// BM rows) keeps a (BM, Dp) output accumulator and the running max / sum of each row; per key block:
//   S = Qb . Kt[kb]                    register-tiled GEMM (MR x NVMAX*W tile, broadcast A, load B)
//   online softmax on S (base 2: Q is pre-scaled by scale*log2(e)), P overwrites S
//   O = alpha * O + P . V[kb]          same microkernel, the rescale folded into the accumulator load
// Memory is O(S*D): the (BM, BN) score tile is the only quadratic object, and it is 16 KiB.
// Causal runs skip key blocks wholly above the diagonal and mask inside the diagonal ones.
//
// Backward (recompute, no S^2 buffer): one task per (batch, kv head) owns dK/dV of that head and dQ
// of the query heads that read it, so threads never share a gradient. Per key block and query block:
//   P = exp2(Q.Kt * scale*log2e - lse*log2e), dP = dO . Vt, dS = P * (dP - rowsum(dO*O)) * scale
//   dV += P^T dO, dK += dS^T Q, dQ += dS K    (the transposed operands are read with swapped strides)
//
// Decode: q (B, Hq, D) over a ragged cache. One task per (batch, kv head, split of the length)
// reads each cached key/value once for all the query heads of its group (GQA), keeps a partial
// (max, sum, accumulator), and a final pass merges the splits (flash-decoding), so a batch of one
// still spreads over every thread. bf16 and int8 caches are widened to fp32 in registers.
//
// Every loop runs on the thread pool (threading.h), packing included: on a shared, oversubscribed
// machine a descheduled thread must not hold a share of the work while the others wait for it.
//
// Everything here is in an anonymous namespace: each ISA translation unit compiles its own copy.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention/attention_common.h"
#include "common/threading.h"

namespace quark {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using Array = std::unique_ptr<T[], FreeDeleter>;
using Buffer = Array<float>;

// n elements of T, 64-byte aligned (a cache line, and the row of an AMX tile).
template <class T>
inline Array<T> alloc_array(int64_t n, bool zero = false) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  if (zero) std::memset(p, 0, bytes);
  return Array<T>(p);
}

inline Buffer alloc_floats(int64_t n, bool zero = false) { return alloc_array<float>(n, zero); }

// Grow-only scratch of the calling thread, reused across calls (one user at a time): packed operands of
// a long sequence take tens of MiB, which a fresh allocation gets from the OS as new pages at one fault
// per 4 KiB (measured: a quarter of an fp32 AMX forward's time at (1, 32, 2048, 128)).
inline void* thread_scratch(size_t bytes) {
  static thread_local Array<char> buf;
  static thread_local size_t capacity = 0;
  if (bytes > capacity) {
    buf.reset();
    buf = alloc_array<char>(static_cast<int64_t>(bytes));
    capacity = bytes;
  }
  return buf.get();
}

// C (M, N) [= cscale[r] * C +] A (M, K) . B (K, N). A is read at A[r*rs + k*ks] (so a transposed
// operand costs nothing), B row-major with leading dimension ldb, N a multiple of V::W.
struct Gemm {
  int64_t K;
  const float* A;
  int64_t rs, ks;
  const float* B;
  int64_t ldb;
  float* C;
  int64_t ldc;
  const float* cscale;  // per-row factor on the loaded C (online-softmax rescale), or nullptr
  bool load_c;          // false: C = A.B
};

template <class V, int R, int NV>
static void tile(const Gemm& g) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const reg s = g.cscale ? V::set1(g.cscale[r]) : V::set1(1.f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (!g.load_c) c[r][v] = V::zero();
      else if (g.cscale) c[r][v] = V::mul(V::load(g.C + r * g.ldc + v * W), s);
      else c[r][v] = V::load(g.C + r * g.ldc + v * W);
    }
  }
  const float* A = g.A;
  const float* B = g.B;
  for (int64_t k = 0; k < g.K; ++k, A += g.ks, B += g.ldb) {
    reg b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::load(B + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const reg av = V::set1(A[r * g.rs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = V::fma(av, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) V::store(g.C + r * g.ldc + v * W, c[r][v]);
}

template <class V, int R, int NV>
static void tile_rows(int rows, const Gemm& g) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<V, R - 1, NV>(rows, g);
  }
  tile<V, R, NV>(g);
}

template <class V, int NV>
static void tile_any(int rows, int nv, const Gemm& g) {
  if constexpr (NV > 1) {
    if (nv < NV) return tile_any<V, NV - 1>(rows, nv, g);
  }
  tile_rows<V, V::MR, NV>(rows, g);
}

template <class V>
static void gemm(int64_t M, int64_t N, const Gemm& g) {
  constexpr int W = V::W, MR = V::MR, NVMAX = V::NVMAX;
  for (int64_t n0 = 0; n0 < N; n0 += NVMAX * W) {
    const int nv = static_cast<int>(std::min<int64_t>(NVMAX, (N - n0) / W));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      Gemm t = g;
      t.A = g.A + m0 * g.rs;
      t.B = g.B + n0;
      t.C = g.C + m0 * g.ldc + n0;
      t.cscale = g.cscale ? g.cscale + m0 : nullptr;
      tile_any<V, NVMAX>(static_cast<int>(std::min<int64_t>(MR, M - m0)), nv, t);
    }
  }
}

// Flash-decoding work split shared by the decode kernels. One task per (batch, kv head, split of the
// length) keeps, for each of the G query heads of its group, a partial row [acc (Dp), max, sum] (base-2
// max, unnormalized acc and sum); merge() combines the splits of one (batch, query head). The length is
// split so there are >= 4 tasks per thread, each >= 256 keys, so a batch of one spreads over every
// thread.
struct DecodeSplit {
  int64_t G, nbk, nsplit, Dp, row;
  Buffer parts;

  DecodeSplit(const DecodeArgs& a, int64_t Dp_) : G(a.Hq / a.Hkv), nbk(a.B * a.Hkv), Dp(Dp_), row(Dp_ + 2) {
    int64_t maxlen = 0;
    for (int64_t b = 0; b < a.B; ++b) maxlen = std::max(maxlen, a.lengths[b]);
    const int64_t want = (4 * num_threads() + nbk - 1) / nbk;
    nsplit = std::max<int64_t>(1, std::min(want, (maxlen + 255) / 256));
    parts = alloc_floats(nbk * nsplit * G * row);
  }

  int64_t tasks() const { return nbk * nsplit; }

  // Task t reads keys [*begin, *end) of kv head bk (over B x Hkv); its splits start at multiples of 16.
  void range(const DecodeArgs& a, int64_t t, int64_t* bk, int64_t* begin, int64_t* end) const {
    *bk = t / nsplit;
    const int64_t n = a.lengths[*bk / a.Hkv], per = round_up((n + nsplit - 1) / nsplit, 16);
    *begin = std::min(n, (t % nsplit) * per);
    *end = std::min(n, *begin + per);
  }

  float* state(int64_t t, int64_t g) const { return parts.get() + (t * G + g) * row; }

  // End of task t: query head g's accumulator (Dp) goes to its partial row, or, when the length is not
  // split, straight to the output (no merge pass, one barrier less).
  void finish(const DecodeArgs& a, int64_t t, int64_t g, const float* acc) const {
    float* st = state(t, g);
    if (nsplit > 1) {
      std::memcpy(st, acc, sizeof(float) * Dp);
      return;
    }
    const int64_t bk = t, bh = (bk / a.Hkv) * a.Hq + (bk % a.Hkv) * G + g;
    store_row(a.out, a.q_dtype, bh * a.D, a.D, acc, st[Dp + 1] > 0.f ? 1.f / st[Dp + 1] : 0.f);
  }

  // out row bh (over B x Hq) = sum_splits 2^(m_s - M) acc_s / sum_splits 2^(m_s - M) l_s; zeros if no key.
  void merge(const DecodeArgs& a, int64_t bh, float* o) const {
    const int64_t bk = (bh / a.Hq) * a.Hkv + (bh % a.Hq) / G, g = (bh % a.Hq) % G;
    float M = kNegInf;
    for (int64_t sp = 0; sp < nsplit; ++sp) M = std::max(M, state(bk * nsplit + sp, g)[Dp]);
    float L = 0.f;
    std::memset(o, 0, sizeof(float) * Dp);
    if (M != kNegInf) {
      for (int64_t sp = 0; sp < nsplit; ++sp) {
        const float* st = state(bk * nsplit + sp, g);
        if (st[Dp] == kNegInf) continue;
        const float w = std::exp2(st[Dp] - M);
        L += st[Dp + 1] * w;
        for (int64_t d = 0; d < Dp; ++d) o[d] += st[d] * w;
      }
    }
    store_row(a.out, a.q_dtype, bh * a.D, a.D, o, L > 0.f ? 1.f / L : 0.f);
  }
};

template <class V>
struct Blocked {
  using reg = typename V::reg;
  static constexpr int W = V::W;
  static constexpr int64_t BM = 64;  // query rows per task: 64 x 64 fp32 score tile = 16 KiB (L1)
  static constexpr int64_t BN = 64;  // keys per block, a multiple of every V::NVMAX * W

  // Kt: for each key block, (D, BN) with Kt[d * BN + j] = k[j0 + j][d] (zero past Sk).
  static void pack_kt(const void* src, DType t, int64_t off, int64_t S, int64_t D, float* dst, float* tmp) {
    const int64_t nkb = (S + BN - 1) / BN;
    std::memset(dst, 0, sizeof(float) * nkb * D * BN);
    for (int64_t j = 0; j < S; ++j) {
      load_row(src, t, off + j * D, D, tmp);
      float* blk = dst + (j / BN) * D * BN + (j % BN);
      for (int64_t d = 0; d < D; ++d) blk[d * BN] = tmp[d];
    }
  }

  // Rows padded to Dp columns (zeros) and to rows_pad rows, optionally scaled.
  static void pack_rows(const void* src, DType t, int64_t off, int64_t S, int64_t D, int64_t Dp, int64_t rows_pad,
                        float* dst, float mul = 1.f) {
    std::memset(dst, 0, sizeof(float) * rows_pad * Dp);
    for (int64_t j = 0; j < S; ++j) load_row(src, t, off + j * D, D, dst + j * Dp, mul);
  }

  // ---------------------------------------------------------------- forward
  static void forward(const AttentionFwdArgs& a) {
    const int64_t D = a.D, Dp = round_up(D, W), group = a.Hq / a.Hkv;
    const int64_t nkb = (a.Sk + BN - 1) / BN, Skp = nkb * BN, nqb = (a.Sq + BM - 1) / BM;
    const int64_t nbk = a.B * a.Hkv;
    float* kt = static_cast<float*>(thread_scratch(sizeof(float) * nbk * Skp * (D + Dp)));
    float* vp = kt + nbk * Skp * D;
    parallel_for(nbk, 1, [&](int64_t bk0, int64_t bk1) {
      Buffer tmp = alloc_floats(D);
      for (int64_t bk = bk0; bk < bk1; ++bk) {
        pack_kt(a.k, a.dtype, bk * a.Sk * D, a.Sk, D, kt + bk * Skp * D, tmp.get());
        pack_rows(a.v, a.dtype, bk * a.Sk * D, a.Sk, D, Dp, Skp, vp + bk * Skp * Dp);
      }
    });
    // Tasks in descending query-block order: under a causal mask the last blocks cost most, and
    // starting them first balances the dynamic schedule.
    parallel_for(a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
      Buffer qb = alloc_floats(BM * D), s = alloc_floats(BM * BN), o = alloc_floats(BM * Dp);
      float m[BM], l[BM], alpha[BM];
      const float qmul = a.scale * kLog2e;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / nqb, ib = nqb - 1 - t % nqb;
        const int64_t bk = (bh / a.Hq) * a.Hkv + (bh % a.Hq) / group;
        const int64_t i0 = ib * BM, mb = std::min(BM, a.Sq - i0);
        const float* ktb = kt + bk * Skp * D;
        const float* vpb = vp + bk * Skp * Dp;
        for (int64_t r = 0; r < mb; ++r) load_row(a.q, a.dtype, (bh * a.Sq + i0 + r) * D, D, qb.get() + r * D, qmul);
        for (int64_t r = 0; r < mb; ++r) { m[r] = kNegInf; l[r] = 0.f; }
        std::memset(o.get(), 0, sizeof(float) * BM * Dp);
        const int64_t kend = visible_keys(i0 + mb - 1, a.Sq, a.Sk, a.causal);
        for (int64_t j0 = 0; j0 < kend; j0 += BN) {
          gemm<V>(mb, BN, Gemm{D, qb.get(), D, 1, ktb + (j0 / BN) * D * BN, BN, s.get(), BN, nullptr, false});
          online_softmax(a, s.get(), mb, i0, j0, 1.f, m, l, alpha);
          gemm<V>(mb, Dp, Gemm{BN, s.get(), BN, 1, vpb + j0 * Dp, Dp, o.get(), Dp, alpha, true});
        }
        store_rows(a, o.get(), Dp, bh, i0, mb, m, l);
      }
    });
  }

  // One key block of the online softmax on the (mb, BN) score tile s (base-2 logits after the factor
  // smul): masks what row i0 + r may not see, updates its running max m and sum l, leaves P in s and
  // the factor alpha that rescales the row's accumulator.
  static void online_softmax(const AttentionFwdArgs& a, float* s, int64_t mb, int64_t i0, int64_t j0, float smul,
                             float* m, float* l, float* alpha) {
    const reg mulv = V::set1(smul);
    for (int64_t r = 0; r < mb; ++r) {
      float* row = s + r * BN;
      const int64_t nv = std::min(BN, visible_keys(i0 + r, a.Sq, a.Sk, a.causal) - j0);
      if (nv <= 0) {  // this row sees nothing in the block (causal top rows)
        std::memset(row, 0, sizeof(float) * BN);
        alpha[r] = 1.f;
        continue;
      }
      for (int64_t j = nv; j < BN; ++j) row[j] = kNegInf;
      reg mx = V::set1(kNegInf);
      for (int64_t c = 0; c < BN; c += W) {
        const reg x = V::mul(V::load(row + c), mulv);
        V::store(row + c, x);
        mx = V::max(mx, x);
      }
      const float m_new = std::max(m[r], V::hmax(mx));
      alpha[r] = std::exp2(m[r] - m_new);  // 0 on the first visible block (m = -inf)
      const reg mv = V::set1(m_new);
      reg sum = V::zero();
      for (int64_t c = 0; c < BN; c += W) {
        const reg p = V::exp2(V::sub(V::load(row + c), mv));
        V::store(row + c, p);
        sum = V::add(sum, p);
      }
      // One rounding, as the compiler's FMA contraction always made this sum; explicit, so it does not
      // depend on how the loop body is inlined.
      l[r] = std::fma(l[r], alpha[r], V::hsum(sum));
      m[r] = m_new;
    }
  }

  // out rows = O / l, and lse = ln(sum exp) = (m + log2 l) * ln 2; zeros / -inf for rows that saw no key.
  static void store_rows(const AttentionFwdArgs& a, const float* o, int64_t ldo, int64_t bh, int64_t i0, int64_t mb,
                         const float* m, const float* l) {
    for (int64_t r = 0; r < mb; ++r) {
      const int64_t row = bh * a.Sq + i0 + r;
      store_row(a.out, a.dtype, row * a.D, a.D, o + r * ldo, l[r] > 0.f ? 1.f / l[r] : 0.f);
      if (a.lse) a.lse[row] = l[r] > 0.f ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
    }
  }

  // ---------------------------------------------------------------- backward
  static void backward(const AttentionBwdArgs& a) {
    const int64_t D = a.D, Dp = round_up(D, W), group = a.Hq / a.Hkv;
    const int64_t nkb = (a.Sk + BN - 1) / BN, Skp = nkb * BN;
    const float c2 = a.scale * kLog2e;
    parallel_for(a.B * a.Hkv, 1, [&](int64_t bk0, int64_t bk1) {
      Buffer tmp = alloc_floats(D);
      Buffer p = alloc_floats(BM * BN), ds = alloc_floats(BM * BN);
      Buffer dkb = alloc_floats(BN * Dp), dvb = alloc_floats(BN * Dp);
      for (int64_t bk = bk0; bk < bk1; ++bk) {
        const int64_t kv_off = bk * a.Sk * D;
        Buffer kt = alloc_floats(Skp * D), vt = alloc_floats(Skp * D), kp = alloc_floats(Skp * Dp);
        pack_kt(a.k, a.dtype, kv_off, a.Sk, D, kt.get(), tmp.get());
        pack_kt(a.v, a.dtype, kv_off, a.Sk, D, vt.get(), tmp.get());
        pack_rows(a.k, a.dtype, kv_off, a.Sk, D, Dp, Skp, kp.get());
        // The query heads of this group: Q and dO as padded rows, Di = rowsum(dO * O), dQ accumulators.
        const int64_t h0 = (bk / a.Hkv) * a.Hq + (bk % a.Hkv) * group;  // first (b, hq) row block
        const int64_t rows = group * a.Sq;
        Buffer qp = alloc_floats(rows * Dp), dop = alloc_floats(rows * Dp), dq = alloc_floats(rows * Dp, true);
        std::vector<float> di(rows), lse2(rows);
        pack_rows(a.q, a.dtype, h0 * a.Sq * D, rows, D, Dp, rows, qp.get());
        pack_rows(a.dout, a.dtype, h0 * a.Sq * D, rows, D, Dp, rows, dop.get());
        for (int64_t r = 0; r < rows; ++r) {
          load_row(a.out, a.dtype, (h0 * a.Sq + r) * D, D, tmp.get());
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += tmp[d] * dop[r * Dp + d];
          di[r] = acc;
          lse2[r] = a.lse[h0 * a.Sq + r] * kLog2e;
        }
        for (int64_t j0 = 0; j0 < a.Sk; j0 += BN) {
          std::memset(dkb.get(), 0, sizeof(float) * BN * Dp);
          std::memset(dvb.get(), 0, sizeof(float) * BN * Dp);
          // First query row that sees key j0: i + (Sk - Sq) >= j0.
          const int64_t i_first = a.causal ? std::max<int64_t>(0, j0 - (a.Sk - a.Sq)) : 0;
          for (int64_t g = 0; g < group; ++g) {
            for (int64_t i0 = (i_first / BM) * BM; i0 < a.Sq; i0 += BM) {
              const int64_t mb = std::min(BM, a.Sq - i0), r0 = g * a.Sq + i0;
              gemm<V>(mb, BN, Gemm{D, qp.get() + r0 * Dp, Dp, 1, kt.get() + j0 * D, BN, p.get(), BN, nullptr, false});
              gemm<V>(mb, BN, Gemm{D, dop.get() + r0 * Dp, Dp, 1, vt.get() + j0 * D, BN, ds.get(), BN, nullptr, false});
              for (int64_t r = 0; r < mb; ++r) {
                float* pr = p.get() + r * BN;
                float* dr = ds.get() + r * BN;
                const int64_t nv = std::min(BN, visible_keys(i0 + r, a.Sq, a.Sk, a.causal) - j0);
                if (nv <= 0) {
                  std::memset(pr, 0, sizeof(float) * BN);
                  std::memset(dr, 0, sizeof(float) * BN);
                  continue;
                }
                const reg cv = V::set1(c2), lv = V::set1(lse2[r0 + r]), dv = V::set1(di[r0 + r]), sv = V::set1(a.scale);
                for (int64_t c = 0; c < BN; c += W) {
                  const reg pv = V::exp2(V::sub(V::mul(V::load(pr + c), cv), lv));
                  V::store(pr + c, pv);
                  V::store(dr + c, V::mul(V::mul(pv, V::sub(V::load(dr + c), dv)), sv));
                }
                for (int64_t j = nv; j < BN; ++j) pr[j] = dr[j] = 0.f;
              }
              gemm<V>(BN, Dp, Gemm{mb, p.get(), 1, BN, dop.get() + r0 * Dp, Dp, dvb.get(), Dp, nullptr, true});
              gemm<V>(BN, Dp, Gemm{mb, ds.get(), 1, BN, qp.get() + r0 * Dp, Dp, dkb.get(), Dp, nullptr, true});
              gemm<V>(mb, Dp, Gemm{BN, ds.get(), BN, 1, kp.get() + j0 * Dp, Dp, dq.get() + r0 * Dp, Dp, nullptr, true});
            }
          }
          const int64_t nb = std::min(BN, a.Sk - j0);
          for (int64_t j = 0; j < nb; ++j) {
            std::memcpy(a.dk + kv_off + (j0 + j) * D, dkb.get() + j * Dp, sizeof(float) * D);
            std::memcpy(a.dv + kv_off + (j0 + j) * D, dvb.get() + j * Dp, sizeof(float) * D);
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(a.dq + (h0 * a.Sq + r) * D, dq.get() + r * Dp, sizeof(float) * D);
      }
    });
  }

  // ---------------------------------------------------------------- decode
  template <class T>
  static reg load_kv(const T* p) {
    if constexpr (std::is_same_v<T, float>) return V::load(p);
    else if constexpr (std::is_same_v<T, uint16_t>) return V::load_bf16(p);
    else return V::load_i8(p);
  }

  // Widen a cache row segment shorter than W through a zero-padded stack buffer.
  template <class T>
  static reg load_kv_tail(const T* p, int64_t n) {
    alignas(64) float buf[W] = {};
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<T, float>) buf[i] = p[i];
      else if constexpr (std::is_same_v<T, uint16_t>) buf[i] = bf16_to_f32(p[i]);
      else buf[i] = static_cast<float>(p[i]);
    }
    return V::load(buf);
  }

  static constexpr int64_t KC = 64;  // keys per chunk: scores of a chunk stay in one small stack array

  template <class T>
  static void decode_typed(const DecodeArgs& a) {
    const int64_t D = a.D, Dp = round_up(D, W), nfull = D / W, tail = D % W, nvec = Dp / W;
    const T* kc = static_cast<const T*>(a.k);
    const T* vc = static_cast<const T*>(a.v);
    const DecodeSplit split(a, Dp);
    const int64_t G = split.G;
    const float qmul = a.scale * kLog2e;
    struct Scratch {
      Buffer q, acc;
    };
    PerThread scratch([&] { return Scratch{alloc_floats(G * Dp), alloc_floats(G * Dp)}; });
    parallel_for(split.tasks(), 1, [&](int64_t t0, int64_t t1) {
      Buffer& q = scratch.local().q;
      Buffer& acc = scratch.local().acc;
      alignas(64) float s[KC];
      for (int64_t t = t0; t < t1; ++t) {
        int64_t bk, j_begin, j_end;
        split.range(a, t, &bk, &j_begin, &j_end);
        const int64_t b = bk / a.Hkv, tok0 = bk * a.Smax;  // cache row of position 0 for this (batch, kv head)
        std::memset(q.get(), 0, sizeof(float) * G * Dp);
        for (int64_t g = 0; g < G; ++g) load_row(a.q, a.q_dtype, (b * a.Hq + (bk % a.Hkv) * G + g) * D, D, q.get() + g * Dp, qmul);
        std::memset(acc.get(), 0, sizeof(float) * G * Dp);
        for (int64_t g = 0; g < G; ++g) { split.state(t, g)[Dp] = kNegInf; split.state(t, g)[Dp + 1] = 0.f; }
        for (int64_t jc = j_begin; jc < j_end; jc += KC) {
          const int64_t nk = std::min(KC, j_end - jc);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = q.get() + g * Dp;
            // Scores, four keys at a time: four independent FMA chains hide the FMA latency and each
            // q vector load serves four keys.
            int64_t j = 0;
            for (; j + 4 <= nk; j += 4) {
              const T* k0 = kc + (tok0 + jc + j) * D;
              // Fetch the V rows of these keys now: P . V reads them right after this chunk's scores,
              // and the hardware streamer restarts at each 4 KiB page when the reads switch from K to V.
              if (g == 0) prefetch_row(vc + (tok0 + jc + j) * D, 4 * D * sizeof(T));
              reg s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
              for (int64_t c = 0; c < nfull; ++c) {
                const reg qv = V::load(qg + c * W);
                s0 = V::fma(qv, load_kv(k0 + c * W), s0);
                s1 = V::fma(qv, load_kv(k0 + D + c * W), s1);
                s2 = V::fma(qv, load_kv(k0 + 2 * D + c * W), s2);
                s3 = V::fma(qv, load_kv(k0 + 3 * D + c * W), s3);
              }
              if (tail) {
                const reg qv = V::load(qg + nfull * W);
                s0 = V::fma(qv, load_kv_tail(k0 + nfull * W, tail), s0);
                s1 = V::fma(qv, load_kv_tail(k0 + D + nfull * W, tail), s1);
                s2 = V::fma(qv, load_kv_tail(k0 + 2 * D + nfull * W, tail), s2);
                s3 = V::fma(qv, load_kv_tail(k0 + 3 * D + nfull * W, tail), s3);
              }
              s[j] = V::hsum(s0); s[j + 1] = V::hsum(s1); s[j + 2] = V::hsum(s2); s[j + 3] = V::hsum(s3);
            }
            for (; j < nk; ++j) {
              const T* k0 = kc + (tok0 + jc + j) * D;
              reg s0 = V::zero();
              for (int64_t c = 0; c < nfull; ++c) s0 = V::fma(V::load(qg + c * W), load_kv(k0 + c * W), s0);
              if (tail) s0 = V::fma(V::load(qg + nfull * W), load_kv_tail(k0 + nfull * W, tail), s0);
              s[j] = V::hsum(s0);
            }
            if (a.k_scale)
              for (int64_t jj = 0; jj < nk; ++jj) s[jj] *= a.k_scale[tok0 + jc + jj];
            // Online softmax over the chunk.
            float* st = split.state(t, g);
            float mx = st[Dp];
            for (int64_t jj = 0; jj < nk; ++jj) mx = std::max(mx, s[jj]);
            const float alpha = std::exp2(st[Dp] - mx);
            for (int64_t jj = nk; jj < KC; ++jj) s[jj] = kNegInf;
            reg sum = V::zero();
            const reg mv = V::set1(mx);
            for (int64_t c = 0; c < KC; c += W) {
              const reg pv = V::exp2(V::sub(V::load(s + c), mv));
              V::store(s + c, pv);
              sum = V::add(sum, pv);
            }
            st[Dp] = mx;
            st[Dp + 1] = std::fma(st[Dp + 1], alpha, V::hsum(sum));   // one rounding, as in online_softmax
            if (a.v_scale)
              for (int64_t jj = 0; jj < nk; ++jj) s[jj] *= a.v_scale[tok0 + jc + jj];
            // acc = alpha * acc + P . V, up to 8 accumulator vectors of the row in registers at once.
            float* ag = acc.get() + g * Dp;
            for (int64_t c0 = 0; c0 < nvec; c0 += 8) {
              const int64_t cn = std::min<int64_t>(8, nvec - c0);
              reg o[8];
              const reg av = V::set1(alpha);
              for (int64_t c = 0; c < cn; ++c) o[c] = V::mul(V::load(ag + (c0 + c) * W), av);
              for (int64_t jj = 0; jj < nk; ++jj) {
                const T* vr = vc + (tok0 + jc + jj) * D;
                const reg pv = V::set1(s[jj]);
                for (int64_t c = 0; c < cn; ++c) {
                  const int64_t col = (c0 + c) * W;
                  const reg vv = col + W <= D ? load_kv(vr + col) : load_kv_tail(vr + col, D - col);
                  o[c] = V::fma(pv, vv, o[c]);
                }
              }
              for (int64_t c = 0; c < cn; ++c) V::store(ag + (c0 + c) * W, o[c]);
            }
          }
        }
        for (int64_t g = 0; g < G; ++g) split.finish(a, t, g, acc.get() + g * Dp);
      }
    });
    // Merge the splits of every (batch, query head); acc is free again and holds the merged row.
    if (split.nsplit > 1) {
      parallel_for(a.B * a.Hq, 1, [&](int64_t bh0, int64_t bh1) {
        for (int64_t bh = bh0; bh < bh1; ++bh) split.merge(a, bh, scratch.local().acc.get());
      });
    }
  }

  static void decode(const DecodeArgs& a) {
    if (a.kv_dtype == DType::f32) decode_typed<float>(a);
    else if (a.kv_dtype == DType::bf16) decode_typed<uint16_t>(a);
    else decode_typed<int8_t>(a);
  }
};

}  // namespace
}  // namespace quark
