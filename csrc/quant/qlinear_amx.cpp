// AMX path of the quantized GEMM (weight-only M > 8, or > 5 with bf16 compute; W8A8 M > 4).
//
// Weight-only int4 / int8 with fp32 activations, on AMX-BF16 (TDPBF16PS multiplies bf16 pairs exactly
// and accumulates in fp32), exact like every other path:
//   - weights: (q - z) for int4 and q for int8 are integers of at most 8 bits, exact in bf16;
//   - activations: x = x1 + x2 + x3 with bf16 parts: x1 = x with its low 16 bits cleared, x2 the same
//     of r = x - x1, x3 = r - x2. Each step takes 8 of the 24 significand bits, so the sum is exact and
//     sum_k w_k x_k = sum_p sum_k w_k x_p,k up to fp32 accumulation, as on the fp32 FMA paths. The
//     kernel counts the parts x needs once per call (1 when x holds bf16 values, 2 for fp16-like
//     ones), so such activations run fewer tile products. (AMX treats bf16 denormals as zero: parts
//     below 2^-126 drop out, an absolute error under 2^-126 |w| per product.)
//   - scales: the tile sums of int8 get their row scale once per k block; int4 needs its scale per
//     group of 32..128 k, i.e. after every one to four tile products: the rotating kernel below.
// int4 with bf16 activations (bf16_compute, the result is rounded to bf16 anyway): the dequantized
// weights (q - z) * s are rounded to bf16 like torch's bf16 linear does, and run through the plain
// 2 x 2 kernel without per-group scaling: twice the speed, at the precision of bf16 compute.
// W8A8 on AMX-INT8 (TDPBSSD, int8 x int8 into int32): the exact int32 dots of every other path.
//
// Orientation: out^T = W . x^T. The weights are the A operand: an A tile is 16 weight rows x 64 bytes
// of consecutive k, the order the weights are stored in, so the big operand is never transposed. The
// activations are the B operand in VNNI order (tile row r = 16 tokens x one k pair (bf16) or quad
// (int8)), packed once per call with 16 x 16 dword transposes; so is the (N x M) result on the way out.
// Blocking: tokens in chunks of 256, whose activations are packed once (all of K). A task is 256
// weight rows: per k block it unpacks the rows' weight panel (<= 512 KiB, L2) and sweeps the chunk's
// activations for that k block (<= 512 KiB) over it, so the weights stream from DRAM exactly once.
// Threads take tasks (the pool of common/threading.h, over N).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/bf16.h"
#include "common/threading.h"
#include "quant/qlinear.h"

namespace quark {
namespace {

constexpr int64_t kTaskRows = 256;   // weight rows per task: 8 blocks of 32
constexpr int64_t kMChunk = 256;     // tokens per pass: a multiple of the 32-token block
constexpr int kTileBytes = 1024;     // 16 rows x 64 bytes

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Scratch that grows and is reused by the calling thread: a fresh multi-MiB allocation per call
// would be paid again in page faults every time.
uint8_t* scratch(std::vector<uint8_t>& buf, size_t bytes) {
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

// In-place transpose of a 16 x 16 matrix of dwords held as 16 rows.
void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(u[i + j], u[i + 4 + j], 0x88);
      t[i + 4 + j] = _mm512_shuffle_i32x4(u[i + j], u[i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

__mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }
__mmask64 mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : n <= 0 ? __mmask64(0) : (__mmask64(1) << n) - 1; }

// 32 bf16 words from the high halves of two vectors of 16 fp32 whose low halves are zero (exact).
__m512i high_halves(__m512i lo, __m512i hi) {
  const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                       25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(lo, odd, hi);
}

// x = x1 + x2 + x3 exactly, each part an fp32 with zero low 16 bits (see the top of the file).
void split3(__m512 x, __m512i parts[3]) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  parts[0] = _mm512_and_si512(_mm512_castps_si512(x), top);
  const __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(parts[0]));
  parts[1] = _mm512_and_si512(_mm512_castps_si512(r), top);
  parts[2] = _mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(parts[1])));
}

// How a kernel groups tiles: rb weight-row tiles x tb token tiles per block (2 x 2 for the shared
// 32 x 32 kernel, 1 x 1 for the rotating int4 kernel). Layouts follow the order the kernels read,
// so each block streams one contiguous run of A tiles and one of B tiles.
struct Grid {
  int64_t rb, tb;
  // A panel of a task for one k block of sc steps: row tile r, step s.
  int64_t a_tile(int64_t r, int64_t s, int64_t sc) const { return (r / rb * sc + s) * rb + r % rb; }
  // acc of a task (rtiles x ttiles tiles of 16 x 16): blocks of 16 rb x 16 tb values, row-major
  // inside; offset of tile (r, t), whose rows are acc_stride() apart.
  int64_t acc_tile(int64_t r, int64_t t, int64_t ttiles) const {
    return (r / rb * (ttiles / tb) + t / tb) * 256 * rb * tb + r % rb * 256 * tb + t % tb * 16;
  }
  int64_t acc_stride() const { return 16 * tb; }
};

// B (activations of a chunk, all of K): k blocks of spb steps (the last one possibly shorter); within
// one, token block (tb tiles), step, part, tile.
struct BLayout {
  int64_t ksteps, spb, parts, mtiles, tb;
  int64_t block_base(int64_t kb) const { return kb * spb * parts * mtiles; }
  int64_t steps_in(int64_t kb) const { return std::min(spb, ksteps - kb * spb); }
  int64_t tile(int64_t s, int64_t p, int64_t mt) const {
    const int64_t kb = s / spb;
    return block_base(kb) + ((mt / tb * steps_in(kb) + s % spb) * parts + p) * tb + mt % tb;
  }
};

void prefetch_l2(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T1);
}

// A panel of rows weight rows [n0, n0 + rows) for `steps` k steps: row_step(n, s) gives the 64 bytes
// of row n < N at step s; rows past N are zero. Each row's k block is a short run in DRAM, too short
// for the hardware prefetchers: prefetch_row(n) requests all of row n's bytes one row tile ahead.
template <class RowStep, class PrefetchRow>
void pack_rows(int64_t n0, int64_t rows, int64_t N, int64_t steps, const Grid& grid, uint8_t* dst, RowStep row_step,
               PrefetchRow prefetch_row) {
  for (int64_t n = n0; n < std::min(n0 + 16, N); ++n) prefetch_row(n);
  for (int64_t rt = 0; rt < rows / 16; ++rt) {
    for (int64_t n = n0 + 16 * (rt + 1); n < std::min(n0 + 16 * (rt + 2), N); ++n) prefetch_row(n);
    for (int64_t s = 0; s < steps; ++s) {
      uint8_t* tile = dst + grid.a_tile(rt, s, steps) * kTileBytes;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t n = n0 + 16 * rt + j;
        _mm512_store_si512(tile + 64 * j, n < N ? row_step(n, s) : _mm512_setzero_si512());
      }
    }
  }
}

// 32 x 32 blocks (2 x 2 grid) over a whole k block: C0..C3 += A4 x B6, A4 x B7, A5 x B6, A5 x B7 for
// every step and activation part, then one store and kind.flush(cbuf, scale of the block's rows,
// acc block, first). Used where the sums need no per-group scaling (int8 weight-only, W8A8, int4
// with bf16-rounded weights).
template <class Kind, class Acc>
void sweep_2x2(const Kind& kind, const uint8_t* apanel, const uint8_t* bk, int64_t sc, int parts, int64_t rtiles,
               int64_t ttiles, const float* scale, Acc* acc, bool first, Acc* cbuf) {
  for (int64_t blk = 0; blk < rtiles / 2; ++blk)
    for (int64_t tp = 0; tp < ttiles / 2; ++tp) {
      const uint8_t* a = apanel + blk * sc * 2 * kTileBytes;
      const uint8_t* b = bk + tp * sc * parts * 2 * kTileBytes;
      Acc* out = acc + (blk * (ttiles / 2) + tp) * 1024;
      if (!first)   // the next block's sums, fetched while this block runs
        for (int j = 0; j < 64; ++j) _mm_prefetch(reinterpret_cast<const char*>(out + 1024 + 16 * j), _MM_HINT_T0);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < sc; ++s, a += 2 * kTileBytes) {
        _tile_loadd(4, a, 64);
        _tile_loadd(5, a + kTileBytes, 64);
        for (int p = 0; p < parts; ++p, b += 2 * kTileBytes) {
          _tile_loadd(6, b, 64);
          _tile_loadd(7, b + kTileBytes, 64);
          Kind::dot();
        }
      }
      _tile_stored(0, cbuf, 64);
      _tile_stored(1, cbuf + 256, 64);
      _tile_stored(2, cbuf + 512, 64);
      _tile_stored(3, cbuf + 768, 64);
      kind.flush(cbuf, scale + 32 * blk, out, first);
    }
}

// The rotating int4 kernel (1 x 1 grid). The work of a k block is a stream of items (row tile r,
// token tile t, group g), one tile product chain each, whose results rotate through C0..C3: item i's
// tile is stored two items later and scaled into the fp32 sums of its 16 x 16 block (acc, in L1
// while its groups pass) three items later, so the stores wait on nothing and the FMAs overlap the
// next products; the stream never drains between blocks. (Holding the block's sums in zmm instead
// measured no faster.) GCC's tile intrinsics need literal tile numbers, hence the if constexpr and
// the unrolled items.
#define QUARK_INLINE inline __attribute__((always_inline))

template <int C>
QUARK_INLINE void zero_c() {
  if constexpr (C == 0) _tile_zero(0);
  else if constexpr (C == 1) _tile_zero(1);
  else if constexpr (C == 2) _tile_zero(2);
  else _tile_zero(3);
}

// C += A x B with A in tmm4 or tmm5 and B in tmm6 or tmm7. Tile registers are not renamed: a load into
// the tile the previous product still reads waits for it, and the product then waits for the load.
// Alternating the A tile per step and the B tile per product (see product() below) lets each load
// overlap a product.
template <int A>
QUARK_INLINE void load_a(const uint8_t* a) {
  if constexpr (A == 4) _tile_loadd(4, a, 64);
  else _tile_loadd(5, a, 64);
}

template <int B>
QUARK_INLINE void load_b(const uint8_t* b) {
  if constexpr (B == 6) _tile_loadd(6, b, 64);
  else _tile_loadd(7, b, 64);
}

template <int C, int A, int B>
QUARK_INLINE void dot_c() {
  if constexpr (A == 4 && B == 6) {
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (C == 1) _tile_dpbf16ps(1, 4, 6);
    else if constexpr (C == 2) _tile_dpbf16ps(2, 4, 6);
    else _tile_dpbf16ps(3, 4, 6);
  } else if constexpr (A == 4) {
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 7);
    else if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (C == 2) _tile_dpbf16ps(2, 4, 7);
    else _tile_dpbf16ps(3, 4, 7);
  } else if constexpr (B == 6) {
    if constexpr (C == 0) _tile_dpbf16ps(0, 5, 6);
    else if constexpr (C == 1) _tile_dpbf16ps(1, 5, 6);
    else if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
    else _tile_dpbf16ps(3, 5, 6);
  } else {
    if constexpr (C == 0) _tile_dpbf16ps(0, 5, 7);
    else if constexpr (C == 1) _tile_dpbf16ps(1, 5, 7);
    else if constexpr (C == 2) _tile_dpbf16ps(2, 5, 7);
    else _tile_dpbf16ps(3, 5, 7);
  }
}

template <int C>
QUARK_INLINE void store_c(float* cbuf) {
  if constexpr (C == 0) _tile_stored(0, cbuf, 64);
  else if constexpr (C == 1) _tile_stored(1, cbuf + 256, 64);
  else if constexpr (C == 2) _tile_stored(2, cbuf + 512, 64);
  else _tile_stored(3, cbuf + 768, 64);
}

// Product j of an item whose C tile is C: step j / NP (a new A tile per step), activation part j % NP.
// A tiles alternate per step and B tiles per product, counted over the four items of a rotation (a
// whole number of pairs), so consecutive loads never target the tile the previous product reads.
template <int C, int NP, int GS, int J>
QUARK_INLINE void product(const uint8_t* a, const uint8_t* b) {
  constexpr int A = 4 + ((C * GS + J / NP) & 1), B = 6 + ((C * NP * GS + J) & 1);
  if constexpr (J % NP == 0) load_a<A>(a + J / NP * kTileBytes);
  load_b<B>(b + J * kTileBytes);
  dot_c<C, A, B>();
}

template <int C, int NP, int GS, int... J>
QUARK_INLINE void item_products(const uint8_t* a, const uint8_t* b, std::integer_sequence<int, J...>) {
  zero_c<C>();
  (product<C, NP, GS, J>(a, b), ...);
}

struct Rotation {
  const uint8_t* apanel;
  const uint8_t* bk;
  int64_t sc, gsteps, groups, rtiles, ttiles;
  int parts;
  const float* scale;   // spanel: scale[g * kTaskRows + row]
  float* acc;           // tile (r, t) at (r * ttiles + t) * 256
  bool first;           // first k block: the sums start at zero, not from acc
  float* cbuf;

  // Items in the order (t, r, g): a token tile's B tiles for the block (steps x parts KiB, <= 32)
  // stay in L1 while every row tile passes, so only the A tiles (one per step, shared by the parts)
  // come from L2. The other order, reading a B tile from L2 for every product, was 5-15% slower
  // at M = 256. The parts (1..3) and steps per group (1, 2, 4) are template arguments, so every
  // item's products unroll with literal tile numbers and no branches. The fields are copied into
  // locals first: every tile store clobbers memory, which would make the compiler reload them from
  // *this after each one.
  void run() const {
    auto by_gs = [&](auto np) {
      if (gsteps == 1) run_fixed<decltype(np)::value, 1>();
      else if (gsteps == 2) run_fixed<decltype(np)::value, 2>();
      else run_fixed<decltype(np)::value, 4>();
    };
    if (parts == 1) by_gs(std::integral_constant<int, 1>());
    else if (parts == 2) by_gs(std::integral_constant<int, 2>());
    else by_gs(std::integral_constant<int, 3>());
  }

  template <int NP, int GS>
  void run_fixed() const {
    const uint8_t* const ap = apanel;
    const uint8_t* const bp = bk;
    const int64_t steps = sc, ng = groups, nr = rtiles, nt = ttiles, n = nr * nt * groups;
    const float* const sp = scale;
    float* const sums = acc;
    float* const cb = cbuf;
    const bool zero = first;
    int64_t pr = 0, pt = 0, pg = 0;   // products cursor
    int64_t fr = 0, ft = 0, fg = 0;   // scaling cursor, three items behind
    // Item i: products of the p cursor into C; store of item i - 2; scaling of item i - 3.
    auto step = [&](int64_t i, auto c) {
      constexpr int C = decltype(c)::value;
      if (i < n) {
        item_products<C, NP, GS>(ap + (pr * steps + pg * GS) * kTileBytes, bp + (pt * steps + pg * GS) * NP * kTileBytes,
                                 std::make_integer_sequence<int, NP * GS>());
        if (++pg == ng) {
          pg = 0;
          if (++pr == nr) pr = 0, ++pt;
        }
      }
      if (i >= 2 && i - 2 < n) store_c<(C + 2) & 3>(cb);
      if (i >= 3 && i - 3 < n) {
        float* out = sums + (fr * nt + ft) * 256;
        const bool start = zero && fg == 0;   // the first k block's first group: the sums start at zero
        if (fg == 0 && !zero)   // the next block's sums, fetched while this block runs
          for (int j = 0; j < 16; ++j) _mm_prefetch(reinterpret_cast<const char*>(out + nt * 256 + 16 * j), _MM_HINT_T0);
        const float* cg = cb + ((C + 1) & 3) * 256;
        const float* sg = sp + fg * kTaskRows + 16 * fr;
        for (int j = 0; j < 16; ++j) {
          const __m512 sum = start ? _mm512_setzero_ps() : _mm512_load_ps(out + 16 * j);
          _mm512_store_ps(out + 16 * j, _mm512_fmadd_ps(_mm512_load_ps(cg + 16 * j), _mm512_set1_ps(sg[j]), sum));
        }
        if (++fg == ng) {
          fg = 0;
          if (++fr == nr) fr = 0, ++ft;
        }
      }
    };
    for (int64_t i = 0; i < n + 3; i += 4) {
      step(i, std::integral_constant<int, 0>());
      step(i + 1, std::integral_constant<int, 1>());
      step(i + 2, std::integral_constant<int, 2>());
      step(i + 3, std::integral_constant<int, 3>());
    }
  }
};

// The loop around the kernels, shared by the bf16 and int8 kinds. Kind provides:
//   Acc, kStepK (k per tile row), grid(), block_steps(parts) (k steps per k block)
//   pack_a(n0, rows, k0, kc, grid, dst, sdst)  rows weight rows (zero past N) as A tiles, and their
//                                       scales for the k block (sdst[g * kTaskRows + row], g = group
//                                       within the block)
//   sweep(apanel, bk, sc, parts, rtiles, ttiles, spanel, acc, first, cbuf)   the products of one k
//                                       block added into acc (or stored there, for the first)
// Threads take whole tasks (dynamic schedule, k blocks inside), so a thread that the OS preempts on
// a busy machine holds back only the task it is running; a task's sums stay in its thread's acc.
template <class Kind>
struct TileGemm {
  using Acc = typename Kind::Acc;
  const Kind& kind;
  int64_t N, K, ksteps;     // ksteps: K rounded up to kStepK, in steps
  int parts;                // B tiles per k step (activation parts)

  // Writes out rows [0, rows) x columns [0, nb) of a task's acc transposed, via write(m, n, mask, values).
  template <class Write>
  static void transpose_out(const Grid& grid, const Acc* acc, int64_t ttiles, int64_t rows, int64_t nb, Write write) {
    for (int64_t nt = 0; nt * 16 < nb; ++nt)
      for (int64_t mt = 0; mt * 16 < rows; ++mt) {
        const Acc* src = acc + grid.acc_tile(nt, mt, ttiles);
        __m512i r[16];
        for (int j = 0; j < 16; ++j) r[j] = _mm512_load_si512(src + j * grid.acc_stride());
        transpose16(r);
        for (int j = 0; j < 16 && mt * 16 + j < rows; ++j) write(mt * 16 + j, nt * 16, mask16(nb - nt * 16), r[j]);
      }
  }

  // pack_b(m0, rows, layout, bpanel): the chunk's activations as B tiles; write(m, n, mask, values).
  template <class PackB, class Write>
  void run(int64_t M, PackB pack_b, Write write) const {
    const Grid grid = kind.grid();
    const int64_t spb = kind.block_steps(parts), nkb = (ksteps + spb - 1) / spb;
    const int64_t ntasks = (N + kTaskRows - 1) / kTaskRows;
    const int64_t mtiles_max = (std::min(M, kMChunk) + 16 * grid.tb - 1) / (16 * grid.tb) * grid.tb;
    static thread_local std::vector<uint8_t> bbuf;
    uint8_t* bpanel = scratch(bbuf, static_cast<size_t>(ksteps) * parts * mtiles_max * kTileBytes);
    for (int64_t c0 = 0; c0 < M; c0 += kMChunk) {
      const int64_t rows = std::min(kMChunk, M - c0);
      const int64_t ttiles = (rows + 16 * grid.tb - 1) / (16 * grid.tb) * grid.tb;
      const BLayout bl{ksteps, spb, parts, ttiles, grid.tb};
      pack_b(c0, rows, bl, bpanel);   // a parallel_for inside
      parallel_for(ntasks, 1, [&](int64_t t0, int64_t t1) {
        static thread_local std::vector<uint8_t> abuf, sbuf, accbuf;
        uint8_t* apanel = scratch(abuf, static_cast<size_t>(spb) * (kTaskRows / 16) * kTileBytes);
        float* spanel = reinterpret_cast<float*>(scratch(sbuf, spb * kTaskRows * sizeof(float)));
        Acc* acc = reinterpret_cast<Acc*>(scratch(accbuf, kTaskRows * mtiles_max * 16 * sizeof(Acc)));
        alignas(64) Acc cbuf[4 * 256];
        configure_tiles();
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * kTaskRows, nb = std::min(kTaskRows, N - n0);
          const int64_t rtiles = (nb + 16 * grid.rb - 1) / (16 * grid.rb) * grid.rb;
          for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t sc = bl.steps_in(kb);
            kind.pack_a(n0, 16 * rtiles, kb * spb * Kind::kStepK, sc * Kind::kStepK, grid, apanel, spanel);
            // GCC's tile loads are asm without a memory clobber: keep the panel's stores before them.
            asm volatile("" ::: "memory");
            kind.sweep(apanel, bpanel + bl.block_base(kb) * kTileBytes, sc, parts, rtiles, ttiles, spanel, acc, kb == 0,
                       cbuf);
          }
          transpose_out(grid, acc, ttiles, rows, nb,
                        [&](int64_t m, int64_t n, __mmask16 mk, __m512i v) { write(c0 + m, n0 + n, mk, v); });
        }
        _tile_release();
      });
    }
  }
};

// Weight-only int4 / int8 on AMX-BF16.
struct Bf16Kind {
  using Acc = float;
  static constexpr int64_t kStepK = 32;
  const QWeight& w;
  bool round_w;      // int4 for bf16 activations: dequantized weights rounded to bf16 (see the top)
  __m512i lut[16];   // lut[z] word i = bf16(i - z), i < 16: int4 (q - z) by one vpermw

  Bf16Kind(const QWeight& w_, bool round_w_) : w(w_), round_w(round_w_) {
    for (int z = 0; z < 16; ++z) {
      alignas(64) uint16_t t[32] = {};
      for (int i = 0; i < 16; ++i) {
        const float v = static_cast<float>(i - z);
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        t[i] = static_cast<uint16_t>(bits >> 16);
      }
      lut[z] = _mm512_load_si512(t);
    }
  }

  static void dot() {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }

  // k blocks of 1024 / 512 / 256: a block's activations (256 tokens x parts bf16) take at most
  // 512 KiB, as does its weight panel; each holds whole int4 groups.
  static int64_t block_steps(int parts) { return parts == 1 ? 32 : parts == 2 ? 16 : 8; }

  // Exact int4 needs its sums scaled per group: the rotating kernel; int8 (one scale per row) and
  // rounded int4 (scales inside the weights) the 2 x 2 one.
  Grid grid() const { return w.scheme == QScheme::int4 && !round_w ? Grid{1, 1} : Grid{2, 2}; }

  void sweep(const uint8_t* apanel, const uint8_t* bk, int64_t sc, int parts, int64_t rtiles, int64_t ttiles,
             const float* spanel, float* acc, bool first, float* cbuf) const {
    if (w.scheme == QScheme::int4 && !round_w)
      Rotation{apanel, bk, sc, w.group / kStepK, sc * kStepK / w.group, rtiles, ttiles, parts, spanel, acc, first, cbuf}.run();
    else sweep_2x2(*this, apanel, bk, sc, parts, rtiles, ttiles, spanel, acc, first, cbuf);
  }

  void pack_a(int64_t n0, int64_t rows, int64_t k0, int64_t kc, const Grid& grid, uint8_t* dst, float* sdst) const {
    const int64_t K = w.k;
    if (w.scheme == QScheme::int8) {
      for (int64_t i = 0; i < rows; ++i) sdst[i] = n0 + i < w.n ? w.scales[n0 + i] : 0.f;
      pack_rows(n0, rows, w.n, kc / kStepK, grid, dst, [&](int64_t n, int64_t s) {
        const int64_t k = k0 + s * kStepK;
        const int8_t* src = reinterpret_cast<const int8_t*>(w.data) + n * K + k;
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask16(K - k), src)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask16(K - k - 16), src + 16)));
        return high_halves(_mm512_castps_si512(lo), _mm512_castps_si512(hi));   // |q| <= 127: exact in bf16
      }, [&](int64_t n) { prefetch_l2(w.data + n * K + k0, std::min(kc, K - k0)); });
      return;
    }
    // int4: group indices by shifts (a division per row and step would cost more than the unpacking).
    const int gs = __builtin_ctzll(w.group);   // log2 of the group, a power of two (32, 64, 128)
    const int64_t ng = K >> gs, g0 = k0 >> gs, groups = kc >> gs;
    auto prefetch_row = [&](int64_t n) {
      prefetch_l2(w.data + n * (K / 2) + k0 / 2, kc / 2);
      prefetch_l2(w.scales16 + n * ng + g0, groups * 2);
      prefetch_l2(w.zeros + n * ng + g0, groups);
    };
    if (round_w) {
      for (int64_t i = 0; i < rows; ++i) sdst[i] = 1.f;
      pack_rows(n0, rows, w.n, kc / kStepK, grid, dst, [&](int64_t n, int64_t s) {
        const int64_t k = k0 + s * kStepK, g = n * ng + (k >> gs);
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + n * (K / 2) + k / 2)));
        const __m512i z = _mm512_set1_epi32(w.zeros[g]);
        const __m512 sg = _mm512_set1_ps(bf16_to_f32(w.scales16[g]));
        // (q - z) * s in fp32, as dequantize() computes it, then rounded to nearest bf16.
        const __m512 wa = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(q, _mm512_set1_epi32(15)), z)), sg);
        const __m512 wb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), z)), sg);
        return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(wb, wa));
      }, prefetch_row);
      return;
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t g = 0; g < groups; ++g) sdst[g * kTaskRows + i] = n0 + i < w.n ? bf16_to_f32(w.scales16[(n0 + i) * ng + g0 + g]) : 0.f;
    pack_rows(n0, rows, w.n, kc / kStepK, grid, dst, [&](int64_t n, int64_t s) {
      const int64_t k = k0 + s * kStepK;
      const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + n * (K / 2) + k / 2)));
      const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, _mm256_set1_epi16(15))),
                                             _mm256_srli_epi16(q, 4), 1);
      return _mm512_permutexvar_epi16(idx, lut[w.zeros[n * ng + (k >> gs)]]);
    }, prefetch_row);
  }


  // acc[j, m] (+)= C[j, m] * scale[j] for the 32 rows j of a 2 x 2 block.
  void flush(const float* c, const float* scale, float* acc, bool first) const {
    for (int j = 0; j < 32; ++j) {
      const __m512 sj = _mm512_set1_ps(scale[j]);
      float* r = acc + 32 * j;
      const float* cj = c + (j < 16 ? 16 * j : 512 + 16 * (j - 16));
      const __m512 r0 = first ? _mm512_setzero_ps() : _mm512_load_ps(r);
      const __m512 r1 = first ? _mm512_setzero_ps() : _mm512_load_ps(r + 16);
      _mm512_store_ps(r, _mm512_fmadd_ps(_mm512_load_ps(cj), sj, r0));
      _mm512_store_ps(r + 16, _mm512_fmadd_ps(_mm512_load_ps(cj + 256), sj, r1));
    }
  }
};

// W8A8 on AMX-INT8.
struct Int8Kind {
  using Acc = int32_t;
  static constexpr int64_t kStepK = 64;
  const QWeight& w;
  int64_t block_steps(int) const { return 32; }   // k blocks of 2048: 512 KiB of activations

  static void dot() {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }

  Grid grid() const { return Grid{2, 2}; }

  void sweep(const uint8_t* apanel, const uint8_t* bk, int64_t sc, int parts, int64_t rtiles, int64_t ttiles,
             const float* spanel, int32_t* acc, bool first, int32_t* cbuf) const {
    sweep_2x2(*this, apanel, bk, sc, parts, rtiles, ttiles, spanel, acc, first, cbuf);
  }

  void pack_a(int64_t n0, int64_t rows, int64_t k0, int64_t kc, const Grid& grid, uint8_t* dst, float*) const {
    const int64_t K = w.k;
    pack_rows(n0, rows, w.n, kc / kStepK, grid, dst, [&](int64_t n, int64_t s) {
      const int64_t k = k0 + s * kStepK;
      return _mm512_maskz_loadu_epi8(mask64(K - k), w.data + n * K + k);
    }, [&](int64_t n) { prefetch_l2(w.data + n * K + k0, std::min(kc, K - k0)); });
  }


  void flush(const int32_t* c, const float*, int32_t* acc, bool first) const {
    for (int j = 0; j < 32; ++j) {
      int32_t* r = acc + 32 * j;
      const int32_t* cj = c + (j < 16 ? 16 * j : 512 + 16 * (j - 16));
      const __m512i r0 = first ? _mm512_setzero_si512() : _mm512_load_si512(r);
      const __m512i r1 = first ? _mm512_setzero_si512() : _mm512_load_si512(r + 16);
      _mm512_store_si512(r, _mm512_add_epi32(_mm512_load_si512(cj), r0));
      _mm512_store_si512(r + 16, _mm512_add_epi32(_mm512_load_si512(cj + 256), r1));
    }
  }
};

// Activation parts fp32 x (M, K) needs: 1 if every x is a bf16 value, 2 if x - x1 is, else 3. Serial:
// general fp32 activations stop at the first vector, and a parallel region costs a fork and a join.
int count_parts(const float* x, int64_t n) {
  __m512i any2 = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    __m512i p[3];
    split3(_mm512_maskz_loadu_ps(mask16(n - i), x + i), p);
    if (_mm512_test_epi32_mask(p[2], p[2])) return 3;
    any2 = _mm512_or_si512(any2, p[1]);
  }
  return _mm512_test_epi32_mask(any2, any2) ? 2 : 1;
}

// 16 fp32 -> bf16 as f32_to_bf16 (common/bf16.h) rounds them: to nearest even, NaN quieted, denormals
// kept, like torch (vcvtneps2bf16 would flush denormals).
__m256i round_bf16(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y), high = _mm512_srli_epi32(bits, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __m512i nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), nan));
}

}  // namespace

void qgemm_f32_amx(const QLinearArgs& a) {
  const int64_t K = a.w.k, ksteps = (K + 31) / 32;
  const int parts = a.x16 ? 1 : count_parts(a.x, a.m * K);   // bf16 x is its own single part
  const Bf16Kind kind(a.w, a.w.scheme == QScheme::int4 && a.bf16_compute);
  const TileGemm<Bf16Kind> gemm{kind, a.w.n, K, ksteps, parts};
  // B tile (step s, part p, token tile mt): row r, dword j = (x_p[m, 32 s + 2 r], x_p[m, 32 s + 2 r + 1]).
  auto pack_b = [&](int64_t m0, int64_t rows, const BLayout& bl, uint8_t* dst) {
    parallel_for(ksteps * bl.mtiles, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = i / bl.mtiles, mt = i % bl.mtiles;
        __m512i r[3][16];
        for (int j = 0; j < 16; ++j) {
          const int64_t m = mt * 16 + j, k = s * 32;
          const bool in = m < rows;
          if (a.x16) {   // 32 bf16 of row m at k: already the one part, in order
            r[0][j] = _mm512_maskz_loadu_epi16(in ? __mmask32(mask64(K - k)) : 0, in ? a.x16 + (m0 + m) * K + k : a.x16);
            continue;
          }
          const float* src = a.x + (m0 + m) * K + k;
          __m512i lo[3], hi[3];
          split3(_mm512_maskz_loadu_ps(in ? mask16(K - k) : 0, in ? src : a.x), lo);
          split3(_mm512_maskz_loadu_ps(in ? mask16(K - k - 16) : 0, in ? src + 16 : a.x), hi);
          for (int p = 0; p < parts; ++p) r[p][j] = high_halves(lo[p], hi[p]);
        }
        for (int p = 0; p < parts; ++p) {
          transpose16(r[p]);
          uint8_t* t = dst + bl.tile(s, p, mt) * kTileBytes;
          for (int j = 0; j < 16; ++j) _mm512_store_si512(t + 64 * j, r[p][j]);
        }
      }
    });
  };
  const int64_t N = a.w.n;
  gemm.run(a.m, pack_b, [&](int64_t m, int64_t n, __mmask16 mk, __m512i v) {
    __m512 y = _mm512_castsi512_ps(v);
    if (a.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, a.bias + n));
    if (a.out16) _mm256_mask_storeu_epi16(a.out16 + m * N + n, mk, round_bf16(y));
    else _mm512_mask_storeu_ps(a.out + m * N + n, mk, y);
  });
}

void w8a8_dots_amx(const W8A8Args& a) {
  const Int8Kind kind{a.w};
  const TileGemm<Int8Kind> gemm{kind, a.w.n, a.w.k, a.kp / 64, 1};
  // B tile (step s, token tile mt): row r, dword j = xq[m, 64 s + 4 r .. 64 s + 4 r + 4].
  auto pack_b = [&](int64_t m0, int64_t rows, const BLayout& bl, uint8_t* dst) {
    parallel_for(bl.ksteps * bl.mtiles, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = i / bl.mtiles, mt = i % bl.mtiles;
        __m512i r[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t m = mt * 16 + j;
          r[j] = m < rows ? _mm512_loadu_si512(a.xq + (m0 + m) * a.kp + s * 64) : _mm512_setzero_si512();
        }
        transpose16(r);
        uint8_t* t = dst + bl.tile(s, 0, mt) * kTileBytes;
        for (int j = 0; j < 16; ++j) _mm512_store_si512(t + 64 * j, r[j]);
      }
    });
  };
  const int64_t N = a.w.n;
  gemm.run(a.m, pack_b, [&](int64_t m, int64_t n, __mmask16 mk, __m512i v) {
    _mm512_mask_storeu_epi32(a.dots + m * N + n, mk, v);
  });
}

}  // namespace quark
