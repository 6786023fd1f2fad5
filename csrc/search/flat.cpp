// Exact search: the foundation's blocked pairwise_distance kernel on (query tile x row block)
// pieces, each followed by a top-k heap update per query.
//
// Work items are (query tile, stripe of row blocks): the rows are cut into enough stripes that
// every thread gets several items (dynamic scheduling then absorbs a thread slowed by other load),
// and the per-stripe top-k lists are merged at the end. Each item calls pairwise_distance from
// inside a chunk of the pool, where it runs on the calling thread (threading.h: nested calls run
// inline).
#include <algorithm>
#include <cmath>

#include "common/threading.h"
#include "search/index.h"

namespace quark {

namespace {
// Queries per item: pairwise_distance packs each block of rows once per 256 queries, so a smaller
// tile repacks the rows more often. The (kTile, kBlock) distance buffer is 512 KiB, L2-sized.
constexpr int64_t kTile = 256;
constexpr int64_t kBlock = 512;  // rows per pairwise_distance call
constexpr int64_t kItemsPerThread = 4;
inline bool nearer(const Cand& a, const Cand& b) { return a.d < b.d; }
}  // namespace

void VectorIndex::search_flat(const float* q, int64_t nq, int64_t k, const uint8_t* allow, int64_t allow_len,
                              int64_t n, float* dist, int64_t* ids) {
  const int64_t d = cfg_.dim;
  const bool cosine = cfg_.metric == Metric::cosine;
  const bool has_deleted = removed_.load(std::memory_order_acquire) > 0;
  std::vector<float> qn;
  if (cosine) {  // rows are stored normalised; normalise the queries and rank by -dot
    qn.assign(q, q + nq * d);
    for (int64_t i = 0; i < nq; ++i) {
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += double(qn[i * d + j]) * qn[i * d + j];
      const float inv = s > 0 ? static_cast<float>(1.0 / std::sqrt(s)) : 0.f;
      for (int64_t j = 0; j < d; ++j) qn[i * d + j] *= inv;
    }
    q = qn.data();
  }
  const int threads = num_threads();
  const int64_t k_out = k;
  k = std::min(k, n);  // heaps hold at most n rows; the output rows past n stay (+inf, -1)
  const int64_t tiles = (nq + kTile - 1) / kTile, blocks = (n + kBlock - 1) / kBlock;
  const int64_t stripes = std::clamp<int64_t>((kItemsPerThread * threads + tiles - 1) / tiles, 1, blocks);
  std::vector<Cand> part(static_cast<size_t>(stripes * nq * k), Cand{INFINITY, 0xffffffffu});
  std::vector<int32_t> filled(static_cast<size_t>(stripes * nq), 0);

  parallel_for(tiles * stripes, 1, [&](int64_t it0, int64_t it1) {
    std::vector<float> buf(static_cast<size_t>(kTile * kBlock));
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t t = it / stripes, s = it % stripes;
      const int64_t i0 = t * kTile, m = std::min(kTile, nq - i0);
      for (int64_t b = s * blocks / stripes; b < (s + 1) * blocks / stripes; ++b) {
        const int64_t j0 = b * kBlock, nb = std::min(kBlock, n - j0);
        pairwise_distance(DistanceArgs{q + i0 * d, m, vectors_.row(j0), nb, d, inner_, nullptr, buf.data(), kBlock});
        for (int64_t r = 0; r < m; ++r) {
          Cand* h = &part[static_cast<size_t>((s * nq + i0 + r) * k)];
          int32_t& hs = filled[static_cast<size_t>(s * nq + i0 + r)];
          const float* row = buf.data() + r * kBlock;
          float thr = hs < k ? INFINITY : h[0].d;
          for (int64_t j = 0; j < nb; ++j) {
            if (!(row[j] < thr)) continue;
            const uint32_t id = static_cast<uint32_t>(j0 + j);
            if ((allow && (id >= allow_len || !allow[id])) || (has_deleted && is_deleted(id))) continue;
            if (hs < k) {
              h[hs++] = {row[j], id};
              std::push_heap(h, h + hs, nearer);
            } else {
              std::pop_heap(h, h + k, nearer);
              h[k - 1] = {row[j], id};
              std::push_heap(h, h + k, nearer);
            }
            thr = hs < k ? INFINITY : h[0].d;
          }
        }
      }
    }
  });

  auto merge = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      std::vector<Cand> all;
      all.reserve(static_cast<size_t>(stripes * k));
      for (int64_t s = 0; s < stripes; ++s) {
        const Cand* h = &part[static_cast<size_t>((s * nq + i) * k)];
        all.insert(all.end(), h, h + filled[static_cast<size_t>(s * nq + i)]);
      }
      const size_t kk = std::min<size_t>(k, all.size());
      std::partial_sort(all.begin(), all.begin() + kk, all.end(), nearer);
      for (size_t j = 0; j < kk; ++j) {
        dist[i * k_out + j] = cosine ? 1.f + all[j].d : all[j].d;
        ids[i * k_out + j] = *ids_.row(all[j].id);
      }
    }
  };
  if (nq > 64) parallel_for(nq, 1, merge);
  else merge(0, nq);
}

}  // namespace quark
