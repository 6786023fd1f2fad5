// HNSW graph: parallel insertion and search (Malkov & Yashunin, arXiv:1603.09320; the neighbour
// heuristic and the concurrency scheme follow hnswlib). See index.h for the threading rules.
//
// Search cost is dominated by cache misses on the rows of the neighbours of each expanded node, so
// the unvisited neighbours of a node are collected first and their distances computed in one
// gather_distance call, which prefetches rows ahead of use. With sq8 storage a hop fetches d bytes
// instead of 4d (the graph is built on the codes too), and the best candidates are re-ranked with
// exact fp32 distances at the end (read back from the row file with rows="file").
#include <algorithm>
#include <cmath>
#include <exception>
#include <mutex>
#include <numeric>

#include "common/threading.h"
#include "search/index.h"

namespace quark {
namespace {

constexpr int kMaxDeg = 2 * 128;  // 2M for the largest M the constructor accepts

inline bool nearer(const Cand& a, const Cand& b) { return a.d < b.d; }   // heap: furthest on top
inline bool further(const Cand& a, const Cand& b) { return a.d > b.d; }  // heap: nearest on top

// Every cache line of a link list (count + cap entries; a level-0 list spans 2-3 lines).
inline void prefetch_links(const uint32_t* ln, int cap) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(ln + 1 + cap);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(ln) & ~uintptr_t(63); a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a));
}

// Copies a link list; acquire loads pair with the writers' release stores (index.h).
inline int read_links(const uint32_t* ln, int cap, uint32_t* out) {
  const int n = std::min<int>(static_cast<int>(__atomic_load_n(ln, __ATOMIC_ACQUIRE)), cap);
  for (int i = 0; i < n; ++i) out[i] = __atomic_load_n(ln + 1 + i, __ATOMIC_ACQUIRE);
  return n;
}

// Best-first search of one level from ep: returns in `top` (a heap, furthest first) up to ef rows
// that pass `allowed`; every reached row guides the walk whether allowed or not, so tombstones and
// filters cost recall only through the longer walk, never through a broken graph.
template <class LinksOf, class Prefetch, class Dist, class Allowed>
void search_layer(const LinksOf& links_of, const Prefetch& prefetch, const Dist& dist, const Allowed& allowed, Cand ep, int ef,
                  VisitedList& vis, size_t rows, std::vector<Cand>& top, std::vector<Cand>& cand) {
  vis.start(rows);
  vis.test_and_set(ep.id);
  top.clear();
  cand.clear();
  cand.push_back(ep);
  if (allowed(ep.id)) top.push_back(ep);
  uint32_t nb[kMaxDeg], fresh[kMaxDeg];
  float fd[kMaxDeg];
  while (!cand.empty()) {
    const Cand c = cand.front();
    if (static_cast<int>(top.size()) >= ef && c.d > top.front().d) break;
    std::pop_heap(cand.begin(), cand.end(), further);
    cand.pop_back();
    // The next expansion's link list is a likely cache miss: start it now, behind this one's distances.
    if (!cand.empty()) prefetch(cand.front().id);
    const int m = links_of(c.id, nb);
    int f = 0;
    for (int i = 0; i < m; ++i)
      if (!vis.test_and_set(nb[i])) fresh[f++] = nb[i];
    dist(fresh, f, fd);
    for (int i = 0; i < f; ++i) {
      if (static_cast<int>(top.size()) < ef || fd[i] < top.front().d) {
        cand.push_back({fd[i], fresh[i]});
        std::push_heap(cand.begin(), cand.end(), further);
        prefetch(fresh[i]);  // a new candidate is likely expanded soon: fetch its links meanwhile
        if (allowed(fresh[i])) {
          top.push_back({fd[i], fresh[i]});
          std::push_heap(top.begin(), top.end(), nearer);
          if (static_cast<int>(top.size()) > ef) {
            std::pop_heap(top.begin(), top.end(), nearer);
            top.pop_back();
          }
        }
      }
    }
  }
}

// Greedy descent on an upper level: move to the nearest neighbour until none is nearer.
template <class LinksOf, class Dist>
Cand greedy(const LinksOf& links_of, const Dist& dist, Cand cur) {
  uint32_t nb[kMaxDeg];
  float nd[kMaxDeg];
  for (bool moved = true; moved;) {
    moved = false;
    const int m = links_of(cur.id, nb);
    dist(nb, m, nd);
    for (int i = 0; i < m; ++i)
      if (nd[i] < cur.d) {
        cur = {nd[i], nb[i]};
        moved = true;
      }
  }
  return cur;
}

}  // namespace

VisitedList* VectorIndex::acquire_visited() {
  std::lock_guard<std::mutex> lk(pool_mu_);
  if (pool_.empty()) return new VisitedList();
  VisitedList* v = pool_.back().release();
  pool_.pop_back();
  return v;
}

void VectorIndex::release_visited(VisitedList* v) {
  std::lock_guard<std::mutex> lk(pool_mu_);
  pool_.emplace_back(v);
}

// hnswlib's heuristic: keep a candidate only if it is nearer to the base row than to every row
// already kept, which spreads the links over directions instead of one dense cluster.
// qbuf: (dim,) room for a candidate's query.
void VectorIndex::select_neighbors(const std::vector<Cand>& sorted, int m, GatherFn fn, float* qbuf,
                                   std::vector<Cand>& out) const {
  out.clear();
  if (static_cast<int>(sorted.size()) <= m) {
    out = sorted;
    return;
  }
  const void* base = build_base();
  for (const Cand& e : sorted) {
    const GatherQuery gq = row_query(e.id, qbuf);
    bool good = true;
    for (const Cand& s : out) {
      float dd;
      fn(gq, base, cfg_.dim, &s.id, 1, &dd);
      if (dd < e.d) {
        good = false;
        break;
      }
    }
    if (good) {
      out.push_back(e);
      if (static_cast<int>(out.size()) >= m) break;
    }
  }
}

// Adds `to` to the level-`level` list of `from` (d = their distance), pruning with the heuristic when full.
void VectorIndex::connect(uint32_t from, uint32_t to, float d, int level, GatherFn fn, InsertScratch& s) {
  std::vector<Cand>&cands = s.cands, &kept = s.kept;
  const int mmax = max_links(level);
  lock_row(from);
  uint32_t* ln = links(from, level);
  const uint32_t cnt = ln[0];
  if (static_cast<int>(cnt) < mmax) {
    __atomic_store_n(ln + 1 + cnt, to, __ATOMIC_RELEASE);
    __atomic_store_n(ln, cnt + 1, __ATOMIC_RELEASE);
  } else {
    float dd[kMaxDeg];
    fn(row_query(from, s.q2.data()), build_base(), cfg_.dim, ln + 1, static_cast<int>(cnt), dd);
    cands.clear();
    cands.push_back({d, to});
    for (uint32_t i = 0; i < cnt; ++i) cands.push_back({dd[i], ln[1 + i]});
    std::sort(cands.begin(), cands.end(), nearer);
    select_neighbors(cands, mmax, fn, s.q2.data(), kept);
    for (size_t i = 0; i < kept.size(); ++i) __atomic_store_n(ln + 1 + i, kept[i].id, __ATOMIC_RELEASE);
    __atomic_store_n(ln, static_cast<uint32_t>(kept.size()), __ATOMIC_RELEASE);
  }
  unlock_row(from);
}

// v: the row's stored form; fn: the build distance (fp32, or code space for sq8).
void VectorIndex::insert(uint32_t row, const float* v, GatherFn fn, VisitedList& vis, InsertScratch& s) {
  const int64_t d = cfg_.dim;
  const int L = *levels_.row(row);
  const void* base = build_base();
  s.q.resize(d);
  s.q2.resize(d);
  const GatherQuery gq = build_query(v, s.q.data());
  auto dist = [&](const uint32_t* idx, int n, float* out) { fn(gq, base, d, idx, n, out); };

  // Hold the entry lock through the insertion only if this row will become the new top.
  std::unique_lock<std::mutex> lk(entry_mu_);
  const uint64_t e = entry_.load();
  if ((e >> 32) == kNone) {
    entry_.store((uint64_t(L) << 32) | row);
    return;
  }
  const int top_level = static_cast<int>(e >> 32);
  if (L <= top_level) lk.unlock();

  Cand cur{0.f, static_cast<uint32_t>(e)};
  dist(&cur.id, 1, &cur.d);
  for (int l = top_level; l > L; --l)
    cur = greedy([&](uint32_t r, uint32_t* out) { return read_links(links(r, l), cfg_.M, out); }, dist, cur);

  // The row's own lists are written level by level first; the reverse links that make it reachable
  // are added only afterwards, so a concurrent search never descends into a row whose lower lists
  // are still empty.
  std::vector<Cand>&top = s.top, &cand = s.cand;
  std::vector<std::vector<Cand>>& sel = s.sel;
  if (sel.size() < static_cast<size_t>(L + 1)) sel.resize(L + 1);
  auto any = [](uint32_t) { return true; };
  const int lmax = std::min(L, top_level);
  for (int l = lmax; l >= 0; --l) {
    const int cap = max_links(l);
    search_layer([&](uint32_t r, uint32_t* out) { return read_links(links(r, l), cap, out); },
                 [&](uint32_t r) { prefetch_links(links(r, l), cap); }, dist, any, cur,
                 cfg_.ef_construction, vis, row_capacity(), top, cand);
    std::sort(top.begin(), top.end(), nearer);
    select_neighbors(top, cfg_.M, fn, s.q2.data(), sel[l]);
    uint32_t* mine = links(row, l);
    lock_row(row);
    for (size_t i = 0; i < sel[l].size(); ++i) __atomic_store_n(mine + 1 + i, sel[l][i].id, __ATOMIC_RELEASE);
    __atomic_store_n(mine, static_cast<uint32_t>(sel[l].size()), __ATOMIC_RELEASE);
    unlock_row(row);
    if (!sel[l].empty()) cur = sel[l][0];
  }
  for (int l = lmax; l >= 0; --l)
    for (const Cand& c : sel[l]) connect(c.id, row, c.d, l, fn, s);
  if (L > top_level) entry_.store((uint64_t(L) << 32) | row);
}

// top: candidates with code (sq8) distances -> its best `depth` by those, with exact distances.
void VectorIndex::rerank(const GatherQuery& q, size_t depth, std::vector<Cand>& top, std::vector<uint32_t>& rows,
                         std::vector<float>& buf) const {
  const GatherKernels& K = gather_kernels();
  const GatherFn exact = inner_ == Metric::l2 ? K.l2_f32 : K.ip_f32;
  const int64_t d = cfg_.dim;
  if (depth < top.size()) {
    std::nth_element(top.begin(), top.begin() + depth, top.end(), nearer);
    top.resize(depth);
  }
  const int m = static_cast<int>(top.size());
  rows.resize(m);
  for (int j = 0; j < m; ++j) rows[j] = top[j].id;
  if (rows_file_) {
    // The rows come back packed in buf, followed by room for the m distances.
    buf.resize(static_cast<size_t>(m) * (d + 1));
    rows_file_->read(rows.data(), m, buf.data());
    std::iota(rows.begin(), rows.end(), 0u);
    exact(q, buf.data(), d, rows.data(), m, buf.data() + static_cast<size_t>(m) * d);
    for (int j = 0; j < m; ++j) top[j].d = buf[static_cast<size_t>(m) * d + j];
  } else {
    buf.resize(m);
    exact(q, vectors_.data(), d, rows.data(), m, buf.data());
    for (int j = 0; j < m; ++j) top[j].d = buf[j];
  }
}

void VectorIndex::search_hnsw(const float* q, int64_t nq, int64_t k, int ef, int rerank_depth, const uint8_t* allow,
                              int64_t allow_len, int64_t n, float* dist, int64_t* ids) {
  const GatherKernels& K = gather_kernels();
  const int64_t d = cfg_.dim;
  const bool sq8 = cfg_.storage == Storage::sq8, cosine = cfg_.metric == Metric::cosine;
  const bool has_deleted = removed_.load(std::memory_order_acquire) > 0;
  const int ef_eff = static_cast<int>(std::max<int64_t>(ef, k));
  // Candidates given exact distances (sq8): the best `depth` by code distance, never fewer than k.
  const size_t depth = rerank_depth > 0 ? static_cast<size_t>(std::max<int64_t>(rerank_depth, k)) : SIZE_MAX;
  auto allowed = [&](uint32_t r) {
    return (!allow || (r < allow_len && allow[r])) && (!has_deleted || !is_deleted(r));
  };

  // With a filter or tombstones, the walk must pass ~ef/s rows to collect ef allowed ones (s: the
  // allowed fraction), while scanning the allowed rows costs s*n: scan when (s*n)^2 <= 32*ef*n,
  // i.e. when the scan is cheaper than the walk (a walk costs ~32 distance evaluations per ef).
  std::vector<uint32_t> subset;
  bool scan = false;
  if (allow || has_deleted) {
    for (int64_t r = 0; r < n; ++r)
      if (allowed(static_cast<uint32_t>(r))) subset.push_back(static_cast<uint32_t>(r));
    scan = double(subset.size()) * double(subset.size()) <= 32.0 * ef_eff * double(n);
  }
  const GatherFn exact = inner_ == Metric::l2 ? K.l2_f32 : K.ip_f32;
  const GatherFn coarse = sq8 ? (inner_ == Metric::l2 ? K.l2_sq8 : K.ip_sq8) : exact;
  const void* coarse_base = sq8 ? static_cast<const void*>(codes_.data()) : vectors_.data();
  // A scan runs on the fp32 rows when they are in memory, else on the codes, keeping enough
  // candidates for the re-rank.
  const bool scan_exact = !rows_file_;
  const size_t scan_keep = scan_exact ? static_cast<size_t>(k) : std::max<size_t>(k, std::min<size_t>(depth, ef_eff));
  std::exception_ptr error;  // a failed row read: rethrown once the threads are done
  std::mutex error_mu;

  parallel_for(nq, 4, [&](int64_t i0, int64_t i1) {
    VisitedList* vis = acquire_visited();
    std::vector<float> qn(d), qc(d), buf(256);
    std::vector<Cand> top, cand;
    std::vector<uint32_t> rows;
    for (int64_t i = i0; i < i1; ++i) {
      try {
        const float* qi = q + i * d;
        if (cosine) qi = stored_form(qi, qn.data());
        const GatherQuery gexact{qi, nullptr, 0.f};
        const GatherQuery gq = sq8 ? sq8_query(qi, qc.data()) : gexact;
        top.clear();
        if (scan) {
          // Scan of the allowed rows, keeping the best in a heap.
          const GatherFn fn = scan_exact ? exact : coarse;
          const GatherQuery& sq = scan_exact ? gexact : gq;
          const void* base = scan_exact ? static_cast<const void*>(vectors_.data()) : coarse_base;
          buf.resize(256);
          for (size_t off = 0; off < subset.size(); off += buf.size()) {
            const int m = static_cast<int>(std::min(buf.size(), subset.size() - off));
            fn(sq, base, d, subset.data() + off, m, buf.data());
            for (int j = 0; j < m; ++j) {
              if (top.size() < scan_keep) {
                top.push_back({buf[j], subset[off + j]});
                std::push_heap(top.begin(), top.end(), nearer);
              } else if (buf[j] < top.front().d) {
                std::pop_heap(top.begin(), top.end(), nearer);
                top.back() = {buf[j], subset[off + j]};
                std::push_heap(top.begin(), top.end(), nearer);
              }
            }
          }
          if (!scan_exact) rerank(gexact, depth, top, rows, buf);
        } else {
          auto dcoarse = [&](const uint32_t* idx, int m, float* out) { coarse(gq, coarse_base, d, idx, m, out); };
          const uint64_t e = entry_.load(std::memory_order_acquire);
          Cand cur{0.f, static_cast<uint32_t>(e)};
          dcoarse(&cur.id, 1, &cur.d);
          for (int l = static_cast<int>(e >> 32); l > 0; --l)
            cur = greedy([&](uint32_t r, uint32_t* out) { return read_links(links(r, l), cfg_.M, out); }, dcoarse, cur);
          const int cap0 = max_links(0);
          search_layer([&](uint32_t r, uint32_t* out) { return read_links(links0_.row(r), cap0, out); },
                       [&](uint32_t r) { prefetch_links(links0_.row(r), cap0); },
                       dcoarse, allowed, cur, ef_eff, *vis, row_capacity(), top, cand);
          if (sq8) rerank(gexact, depth, top, rows, buf);
        }
        const size_t kk = std::min<size_t>(k, top.size());
        std::partial_sort(top.begin(), top.begin() + kk, top.end(), nearer);
        for (size_t j = 0; j < kk; ++j) {
          dist[i * k + j] = cosine ? 1.f + top[j].d : top[j].d;
          ids[i * k + j] = *ids_.row(top[j].id);
        }
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu);
        if (!error) error = std::current_exception();
      }
    }
    release_visited(vis);
  });
  if (error) std::rethrow_exception(error);
}

}  // namespace quark
