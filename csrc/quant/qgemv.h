// Pieces of the quantized GEMV (small M: where it takes over, see qlinear.cpp) shared by the AVX2 and
// AVX-512 paths: the thread split over rows, the prefetch of the row streams, the int4 kernels' view of
// a packed row, and the driver (run_qgemv) over the row kernels each ISA file defines.
//
// Included by one .cpp per ISA (compiled with its own flags): everything is in an anonymous namespace.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/threading.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

// Both GEMVs stream R weight rows at once (R independent DRAM streams keep more misses in flight than
// one) and prefetch each stream kPrefetch bytes ahead (within or past the end of its row, see
// over_rows). 1 KiB per stream measured best on Sapphire Rapids (512 B to 4 KiB within a few percent;
// T1/T2 hints the same, NTA 40% slower); without prefetch int8 streams ~15% slower.
constexpr int64_t kPrefetch = 1024;

inline void prefetch_ahead(const uint8_t* row, int64_t pos, int64_t row_bytes, int64_t wrap_bytes) {
  const int64_t ahead = pos + kPrefetch;
  _mm_prefetch(reinterpret_cast<const char*>(row + (ahead < row_bytes ? ahead : ahead - row_bytes + wrap_bytes)),
               _MM_HINT_T0);
}

// Each of the R streams sweeps P consecutive rows, ~kStreamBytes of contiguous memory in ascending
// order: a block is R P rows, and pass p < P of a row kernel over it reads rows n0 + p + r P (r < R).
// The L2 hardware streamer follows such long runs across pages; with one row per stream (P = 1) the
// streams were short (2 KiB int4 rows at K = 4096) and several shared each 4 KiB page, and it did
// little. Measured at M = 1 with weights from DRAM, interleaved in one run against P = 1 and R = 8:
// int4 +4-28% (+20-28% in five of six cases), int8 +3-6%; R = 4 streams beat 2, 8 or 16. Stream
// length, re-measured after the AMX and wrapper work (M = 1, DRAM, the three shapes of bench_quant,
// two rounds): 64 KiB against 32 KiB int4 g128 +5-10%, g32 +1-7%, int8 +1-3%; 16 KiB is slower, and
// 128 KiB halves the speed at K = 11008 (fewer, longer blocks).
constexpr int64_t kStreamBytes = 64 << 10;

// Threads over N in blocks of R P rows, handed out as runs of consecutive blocks (threading.h), so a
// thread that lost time (another job on its core) leaves its unclaimed blocks to the others: an
// OpenMP guided schedule, which did the same, measured 5-15% faster than one static slab per thread at
// M = 1, quiet. P is capped to leave at least 32 blocks, enough to split. Below kParallelBytes of
// weights one thread finishes before the workers would start.
constexpr int64_t kParallelBytes = 1 << 17;

// rows(n0, stride, wrap): R rows n0 + r stride; a prefetch that runs past the end of a row continues
// `wrap` rows after it: the stream's next row, or after its last row the stream's first row in the
// next block (the block this thread usually reads next). tail_row(n): one of the N % (R P) rows left.
template <int R, class Rows, class Tail>
void over_rows(const QLinearArgs& a, int64_t row_bytes, Rows rows, Tail tail_row) {
  const int64_t N = a.w.n;
  const int64_t P = std::max<int64_t>(1, std::min(kStreamBytes / row_bytes, N / (32 * R)));
  const int64_t block = R * P, full = N / block, tasks = full + N % block;
  auto range = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < full) {
        for (int64_t p = 0; p < P; ++p) rows(t * block + p, P, p + 1 < P ? 1 : block - P + 1);
      } else {
        tail_row(full * block + (t - full));
      }
    }
  };
  if (N * row_bytes > kParallelBytes) parallel_for(tasks, 1, range);
  else range(0, tasks);
}

// int4: a row is read in 64-byte chunks of 128 weights (four blocks of 32, layout in qlinear.h). Taken
// as 16 dwords, lane d holds bytes 4d..4d+3 of block d/4, and nibble i of lane d, (dword >> 4i) & 15,
// is weight chunk_pos(i, d) of the chunk. A kernel therefore turns a chunk into eight 16-lane vectors
// (AVX2: two halves of 8 lanes) with one shift per vector and no shuffles, provided x is permuted into
// the same order once per call: xp[c + 16 i + d] = x[c + chunk_pos(i, d)].
//
// Zero points and scales stay outside the hot loop: per group g of a row,
//   sum_k (q - z) s x_k = s * (sum_k q x_k) - s z * xsum[g],   xsum[g] = sum of x over the group,
// so a kernel scales each chunk's lane sums by their group's scale and subtracts sum_g s z xsum[g] once
// per row (q >= 0 and z are small integers: the cancellation costs a few ulps at most).
constexpr int64_t kChunk = 128;   // weights per 64-byte chunk

constexpr int chunk_pos(int i, int d) { return 32 * (d / 4) + 4 * (d % 4) + i / 2 + 16 * (i % 2); }

// int4 scales and zero points (R rows x K/G each, beside the weights) are prefetched as well, worth a
// few percent at G = 32 where they are a sixth of the bytes. A row's scales are prefetched for the
// weights its weight prefetch reaches (kPrefetch bytes on, in this row or `wrap` rows on), twice per
// 64-byte line of 32 bf16 scales (every G/8 chunks). Prefetching them kPrefetch bytes on in the
// scales' own stream instead reached 16 rows on at G = 128 (64 bytes of scales per row at K = 4096),
// past the end of the stream's run of rows, and left the first rows of every run to demand misses.
// The zero points of the rows the next pass reads (`wrap` rows on) are prefetched at the start of a
// pass: the correction after the main loop then finds them in cache.
template <int G>
inline void prefetch_scales_ahead(const uint16_t* row_scales, int64_t c, int64_t ng, int64_t row_bytes,
                                  int64_t wrap) {
  if (c % (G / 8) != 0) return;
  const int64_t ahead = 64 * c + kPrefetch;   // byte of the packed row, 2 weights per byte
  const uint16_t* p =
      ahead < row_bytes ? row_scales + 2 * ahead / G : row_scales + wrap * ng + 2 * (ahead - row_bytes) / G;
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

template <int R>
inline void prefetch_next_zeros(const uint8_t* row_zeros, int64_t ng, int64_t stride, int64_t wrap) {
  for (int r = 0; r < R; ++r)
    for (int64_t b = 0; b < ng; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(row_zeros + (wrap + r * stride) * ng + b), _MM_HINT_T0);
}

// x (K) -> xp (K rounded up to kChunk, zero past K: the caller zero-fills it) in chunk order, and
// xsum (K / G) the group sums of x. With i = 2t + h and d = 4b + a, chunk_pos(i, d) = 32b + 16h + 4a + t
// and the output index is 32t + 16h + 4b + a: each 16-float run (b, h) of x is a 4 x 4 transpose.
inline void permute_x(const float* x, int64_t K, int64_t G, float* xp, float* xsum) {
  for (int64_t c = 0; c < K; c += kChunk) {
    const int64_t blocks = K - c >= kChunk ? 4 : (K - c) / 32;
    for (int64_t b = 0; b < blocks; ++b)
      for (int h = 0; h < 2; ++h) {
        const float* src = x + c + 32 * b + 16 * h;
        __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + 4), r2 = _mm_loadu_ps(src + 8),
               r3 = _mm_loadu_ps(src + 12);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        float* dst = xp + c + 16 * h + 4 * b;
        _mm_storeu_ps(dst, r0);
        _mm_storeu_ps(dst + 32, r1);
        _mm_storeu_ps(dst + 64, r2);
        _mm_storeu_ps(dst + 96, r3);
      }
  }
  for (int64_t g = 0; g < K / G; ++g) {
    __m128 s = _mm_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) s = _mm_add_ps(s, _mm_loadu_ps(x + k));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    xsum[g] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
}

// The row kernels, defined by the .cpp of each ISA, over the rows over_rows hands them: R weight rows
// n0 + r stride, M activation rows.
template <int M, int R>
void gemv_int8_rows(const QLinearArgs& a, int64_t n0, int64_t stride, int64_t wrap);
template <int M, int R, int G>
void gemv_int4_rows(const QLinearArgs& a, int64_t n0, int64_t stride, int64_t wrap, const float* xp, int64_t kc,
                    const float* xsum);

// R streams (weight rows per pass): R x M accumulators plus the x and weight vectors fit 16 ymm / 32
// zmm (at M = 8, AVX-512 only: 16 accumulators and a chunk's 8 partial sums); at M = 1, 4 streams
// measured better than 8 once each sweeps several rows (kStreamBytes).
template <int M>
constexpr int kGemvRows = M <= 2 ? 4 : 2;

template <int M, int G>
void gemv_int4(const QLinearArgs& a) {
  constexpr int R = kGemvRows<M>;
  const int64_t K = a.w.k, kc = (K + kChunk - 1) / kChunk * kChunk, ng = K / G;
  std::vector<float> xp(M * kc), xsum(M * ng);
  for (int m = 0; m < M; ++m) permute_x(a.x + m * K, K, G, xp.data() + m * kc, xsum.data() + m * ng);
  over_rows<R>(a, K / 2,
               [&](int64_t n0, int64_t stride, int64_t wrap) {
                 gemv_int4_rows<M, R, G>(a, n0, stride, wrap, xp.data(), kc, xsum.data());
               },
               [&](int64_t n) { gemv_int4_rows<M, 1, G>(a, n, 1, 1, xp.data(), kc, xsum.data()); });
}

template <int M>
void gemv(const QLinearArgs& a) {
  if (a.w.scheme == QScheme::int8) {
    constexpr int R = kGemvRows<M>;
    return over_rows<R>(a, a.w.k,
                        [&](int64_t n0, int64_t stride, int64_t wrap) { gemv_int8_rows<M, R>(a, n0, stride, wrap); },
                        [&](int64_t n) { gemv_int8_rows<M, 1>(a, n, 1, 1); });
  }
  switch (a.w.group) {
    case 32: return gemv_int4<M, 32>(a);
    case 64: return gemv_int4<M, 64>(a);
    default: return gemv_int4<M, 128>(a);
  }
}

// Picks gemv<M> for a.m in [M, MaxM].
template <int M, int MaxM>
void gemv_upto(const QLinearArgs& a) {
  if constexpr (M < MaxM) {
    if (a.m > M) return gemv_upto<M + 1, MaxM>(a);
  }
  gemv<M>(a);
}

// Any M, in passes of up to MaxM rows of x (each pass streams the weights again): MaxM is what the
// ISA's registers hold, R x M accumulators plus a chunk's M partial sums (AVX-512 8, AVX2 4). One
// pass of 8 rather than two of 4 at 11008x4096 from DRAM: int4 g32 M=6 4.4-4.9 -> 3.8-4.0 ms, M=8
// 6.4 -> 5.1-5.5; int8 M=5 3.7 -> 2.6-2.8, M=8 4.6-4.9 -> 4.2.
template <int MaxM>
void run_qgemv(const QLinearArgs& a) {
  for (int64_t m0 = 0; m0 < a.m; m0 += MaxM) {
    QLinearArgs p = a;
    p.m = std::min<int64_t>(MaxM, a.m - m0);
    p.x = a.x + m0 * a.w.k;
    p.out = a.out + m0 * a.w.n;
    gemv_upto<1, MaxM>(p);
  }
}

}  // namespace
}  // namespace quark
