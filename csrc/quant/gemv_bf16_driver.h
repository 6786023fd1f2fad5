// The SIMD drivers of the bf16 GEMV (gemv_bf16.h), over one ISA's vector operations V:
//   V::kStep            bf16 elements per step along K
//   V::Acc              an fp32 accumulator; V::zero(), V::sum(acc) -> float
//   V::X                x's step in the form V::madd takes; V::load_x(p, n) reads n <= kStep values
//   V::madd(acc, w, xv, n)   acc += the products of the n <= kStep weights at w with xv
// Reads past K never happen: the last step of a row loads its n < kStep values masked or padded.
// Included by one .cpp per ISA (compiled with its own flags): everything is in an anonymous namespace.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/bf16.h"
#include "common/threading.h"
#include "quant/gemv_bf16.h"

namespace quark {
namespace {

// Streams and prefetch as in the quantized GEMV (qgemv.h, measured there on Sapphire Rapids): each of
// the R streams sweeps P consecutive rows, about kStreamBytes of contiguous memory (a bf16 row is short,
// 1.5 KiB at K = 768, and R streams that each jump to a new row every step leave the L2 streamer
// little to follow), and prefetches kPrefetch bytes ahead, which runs on into the stream's next row.
// Below kParallelBytes of weights one thread finishes before the workers would start.
constexpr int64_t kStreamBytes = 64 << 10, kPrefetch = 1024, kParallelBytes = 1 << 17;

// R weight rows n0 + r stride at once, one accumulator per (weight row, x row): R x M independent
// chains, each x step loaded once and used R times.
template <class V, int M, int R>
void bf16_rows(const GemvBf16Args& a, int64_t n0, int64_t stride) {
  const int64_t K = a.k, N = a.n;
  const uint16_t* w[R];
  typename V::Acc acc[R][M];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    w[r] = a.w + (n0 + r * stride) * K;
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = V::zero();
  }
  for (int64_t k = 0; k < K; k += V::kStep) {
    const int n = K - k >= V::kStep ? V::kStep : static_cast<int>(K - k);
    typename V::X xv[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) xv[m] = V::load_x(a.x + m * K + k, n);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + k) + kPrefetch, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = V::madd(acc[r][m], w[r] + k, xv[m], n);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const int64_t row = n0 + r * stride;
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float y = V::sum(acc[r][m]);
      a.out[m * N + row] = f32_to_bf16(a.bias ? y + bf16_to_f32(a.bias[row]) : y);
    }
  }
}

// Threads over N in blocks of R P rows (pass p of a block reads rows n0 + p + r P), handed out as runs
// of consecutive blocks (threading.h); the N % (R P) rows left go one at a time. R = 8 streams at one
// to four rows of x, as gemv_f32.
template <class V, int M>
void bf16_gemv(const GemvBf16Args& a) {
  constexpr int R = M <= 4 ? V::kRows : V::kRows / 2;
  const int64_t row_bytes = a.k * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t P = std::max<int64_t>(1, std::min(kStreamBytes / row_bytes, a.n / (32 * R)));
  const int64_t block = R * P, full = a.n / block, tasks = full + a.n % block;
  auto range = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < full) {
        for (int64_t p = 0; p < P; ++p) bf16_rows<V, M, R>(a, t * block + p, P);
      } else {
        bf16_rows<V, M, 1>(a, full * block + (t - full), 1);
      }
    }
  };
  if (a.n * row_bytes > kParallelBytes) parallel_for(tasks, 1, range);
  else range(0, tasks);
}

template <class V>
void run_gemv_bf16(const GemvBf16Args& a) {
  switch (a.m) {
    case 1: return bf16_gemv<V, 1>(a);
    case 2: return bf16_gemv<V, 2>(a);
    case 3: return bf16_gemv<V, 3>(a);
    case 4: return bf16_gemv<V, 4>(a);
    case 5: return bf16_gemv<V, 5>(a);
    case 6: return bf16_gemv<V, 6>(a);
    case 7: return bf16_gemv<V, 7>(a);
    default: return bf16_gemv<V, 8>(a);
  }
}

}  // namespace
}  // namespace quark
