// VectorIndex bookkeeping shared by both kinds: ids, tombstones, storage growth, sq8 codes,
// persistence state. The searches live in flat.cpp and hnsw.cpp.
#include "search/index.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include <unistd.h>

#include "common/threading.h"

namespace quark {

VectorIndex::VectorIndex(const IndexConfig& cfg)
    : cfg_(cfg),
      inner_(cfg.metric == Metric::l2 ? Metric::l2 : Metric::ip),
      vectors_(cfg.dim),
      codes_(cfg.dim),
      ids_(1),
      deleted_(1),
      levels_(1),
      links0_(2 * cfg.M + 1) {
  if (cfg.dim < 1) throw std::invalid_argument("dim must be >= 1, got " + std::to_string(cfg.dim));
  if (cfg.M < 2 || cfg.M > 128) throw std::invalid_argument("M must be in [2, 128], got " + std::to_string(cfg.M));
  if (cfg.ef_construction < 1)
    throw std::invalid_argument("ef_construction must be >= 1, got " + std::to_string(cfg.ef_construction));
  if (cfg.kind == IndexKind::flat && cfg.storage == Storage::sq8)
    throw std::invalid_argument("a flat index is exact and stores fp32 only; use storage='fp32' or kind='hnsw'");
  if (cfg.rows_in_file && cfg.storage != Storage::sq8)
    throw std::invalid_argument("rows='file' needs storage='sq8' (the graph runs on the in-memory codes)");
  if (cfg.rows_in_file) rows_file_ = std::make_unique<RowFile>(cfg.dim, cfg.rows_dir);
}

void VectorIndex::ensure_capacity(int64_t rows) {
  const bool views = vectors_.is_view() || codes_.is_view() || links0_.is_view();
  if (rows <= row_capacity() && !views) return;
  std::unique_lock<std::shared_mutex> g(grow_mu_);  // waits for running searches, blocks new ones
  const int64_t keep = slots_.load();
  const int64_t cap = std::max<int64_t>({rows, row_capacity() * 3 / 2, 1024});
  if (rows > std::numeric_limits<uint32_t>::max() - 1)
    throw std::invalid_argument("an index holds at most 2^32 - 2 rows");
  if (!rows_file_) vectors_.reserve(cap, keep);
  if (cfg_.storage == Storage::sq8) codes_.reserve(cap, keep);
  ids_.reserve(cap, keep);
  deleted_.reserve(cap, keep);
  if (cfg_.kind == IndexKind::hnsw) {
    levels_.reserve(cap, keep);
    links0_.reserve(cap, keep);
    upper_.resize(cap);
    locks_.reset(new std::atomic<uint8_t>[cap]());  // no insert runs during growth: all unlocked
  }
}

const float* VectorIndex::stored_form(const float* in, float* buf) const {
  if (cfg_.metric != Metric::cosine) return in;
  double s = 0;
  for (int64_t k = 0; k < cfg_.dim; ++k) s += double(in[k]) * in[k];
  const float inv = s > 0 ? static_cast<float>(1.0 / std::sqrt(s)) : 1.f;
  for (int64_t k = 0; k < cfg_.dim; ++k) buf[k] = in[k] * inv;
  return buf;
}

void VectorIndex::fit_sq8(const float* x, int64_t n) {
  const int64_t d = cfg_.dim;
  std::vector<float> lo(d, INFINITY), hi(d, -INFINITY), buf(d);
  for (int64_t i = 0; i < n; ++i) {
    const float* v = stored_form(x + i * d, buf.data());
    for (int64_t k = 0; k < d; ++k) {
      lo[k] = std::min(lo[k], v[k]);
      hi[k] = std::max(hi[k], v[k]);
    }
  }
  set_sq8_range(lo.data(), hi.data());
}

void VectorIndex::set_sq8_range(const float* lo, const float* hi) {
  const int64_t d = cfg_.dim;
  for (int64_t k = 0; k < d; ++k)
    if (!std::isfinite(lo[k]) || !std::isfinite(hi[k]) || lo[k] > hi[k])
      throw std::invalid_argument("sq8 range of dimension " + std::to_string(k) + " is not a finite [lo, hi]");
  sq8_min_.assign(lo, lo + d);
  sq8_scale_.resize(d);
  sq8_w_.resize(d);
  for (int64_t k = 0; k < d; ++k) {
    // A constant dimension gets scale 1 so decode is exact for the fitted value and stays finite.
    float range = hi[k] - lo[k];
    sq8_scale_[k] = range > 0.f ? range / 255.f : 1.f;
    sq8_w_[k] = sq8_scale_[k] * sq8_scale_[k];
  }
  sq8_fitted_ = true;
}

void VectorIndex::encode_sq8(int64_t row, const float* v) {
  uint8_t* c = codes_.row(row);
  for (int64_t k = 0; k < cfg_.dim; ++k) {
    float t = std::nearbyint((v[k] - sq8_min_[k]) / sq8_scale_[k]);
    c[k] = static_cast<uint8_t>(std::clamp(t, 0.f, 255.f));
  }
}

GatherQuery VectorIndex::sq8_query(const float* x, float* buf) const {
  // Code space (gather_distance.h): l2 needs q_k = (x_k - vmin_k) / scale_k with weights scale_k^2,
  // ip needs q_k = x_k * scale_k and the bias <x, vmin>.
  float bias = 0.f;
  for (int64_t k = 0; k < cfg_.dim; ++k) {
    if (inner_ == Metric::l2) {
      buf[k] = (x[k] - sq8_min_[k]) / sq8_scale_[k];
    } else {
      buf[k] = x[k] * sq8_scale_[k];
      bias += x[k] * sq8_min_[k];
    }
  }
  return {buf, sq8_w_.data(), bias};
}

GatherQuery VectorIndex::build_query(const float* v, float* buf) const {
  return cfg_.storage == Storage::sq8 ? sq8_query(v, buf) : GatherQuery{v, nullptr, 0.f};
}

GatherQuery VectorIndex::row_query(uint32_t row, float* buf) const {
  if (cfg_.storage != Storage::sq8) return {vectors_.row(row), nullptr, 0.f};
  // The row's decoded values x_k = vmin_k + scale_k * c_k mapped into code space: for l2 that is
  // c_k itself; for ip, x_k * scale_k with the bias <x, vmin>.
  const uint8_t* c = codes_.row(row);
  float bias = 0.f;
  for (int64_t k = 0; k < cfg_.dim; ++k) {
    if (inner_ == Metric::l2) {
      buf[k] = c[k];
    } else {
      const float x = sq8_min_[k] + sq8_scale_[k] * c[k];
      buf[k] = x * sq8_scale_[k];
      bias += x * sq8_min_[k];
    }
  }
  return {buf, sq8_w_.data(), bias};
}

static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

int VectorIndex::draw_level(int64_t row) const {
  // u uniform in (0, 1]; level = floor(-ln(u) / ln(M)) gives P(level >= l) = M^-l (the paper's mL).
  double u = (static_cast<double>(splitmix64(cfg_.seed * 0x100000001b3ull + row) >> 11) + 1.0) * 0x1.0p-53;
  int level = static_cast<int>(-std::log(u) / std::log(static_cast<double>(cfg_.M)));
  return std::min(level, 30);
}

void VectorIndex::lock_row(uint32_t row) {
  while (locks_[row].exchange(1, std::memory_order_acquire)) {
    while (locks_[row].load(std::memory_order_relaxed)) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      __asm__ volatile("yield");
#endif
    }
  }
}

void VectorIndex::unlock_row(uint32_t row) { locks_[row].store(0, std::memory_order_release); }

void VectorIndex::add(const float* x, int64_t n, const int64_t* ids, int64_t* ids_out) {
  if (n <= 0) return;
  const int64_t d = cfg_.dim;
  std::lock_guard<std::mutex> serial(add_mu_);
  for (int64_t i = 0; i < n * d; ++i)
    if (!std::isfinite(x[i]))
      throw std::invalid_argument("vectors row " + std::to_string(i / d) + " contains NaN or inf");
  {
    std::lock_guard<std::mutex> g(ids_mu_);
    if (ids) {
      std::unordered_set<int64_t> batch;
      batch.reserve(n * 2);
      for (int64_t i = 0; i < n; ++i) {
        if (row_of_.count(ids[i]))
          throw std::invalid_argument("id " + std::to_string(ids[i]) + " is already in the index; remove() it first");
        if (!batch.insert(ids[i]).second)
          throw std::invalid_argument("id " + std::to_string(ids[i]) + " appears twice in ids");
      }
      for (int64_t i = 0; i < n; ++i) ids_out[i] = ids[i];
    } else {
      for (int64_t i = 0; i < n; ++i) ids_out[i] = next_id_ + i;
    }
  }

  const int64_t n0 = slots_.load();
  ensure_capacity(n0 + n);
  std::shared_lock<std::shared_mutex> g(grow_mu_);
  // The rows in their stored form: into memory, or appended to the row file (first, so that a
  // failed write leaves the index as it was).
  std::vector<float> buf(d);
  if (!rows_file_) {
    for (int64_t i = 0; i < n; ++i) {
      float* v = vectors_.row(n0 + i);
      std::memcpy(v, x + i * d, d * sizeof(float));
      stored_form(v, v);
    }
  } else if (cfg_.metric != Metric::cosine) {
    rows_file_->append(x, n0, n);
  } else {
    constexpr int64_t kChunk = 4096;  // rows normalised and written per pwrite
    buf.resize(std::min(n, kChunk) * d);
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t m = std::min(kChunk, n - i0);
      for (int64_t i = 0; i < m; ++i) stored_form(x + (i0 + i) * d, buf.data() + i * d);
      rows_file_->append(buf.data(), n0 + i0, m);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    *ids_.row(n0 + i) = ids_out[i];
    *deleted_.row(n0 + i) = 0;
  }
  // The stored form of batch row i (normalised into tmp for cosine when the rows are in the file).
  auto row_of_batch = [&](int64_t i, float* tmp) {
    return rows_file_ ? stored_form(x + i * d, tmp) : static_cast<const float*>(vectors_.row(n0 + i));
  };
  if (cfg_.storage == Storage::sq8) {
    if (!sq8_fitted_) fit_sq8(x, n);
    for (int64_t i = 0; i < n; ++i) encode_sq8(n0 + i, row_of_batch(i, buf.data()));
  }
  if (cfg_.kind == IndexKind::hnsw) {
    for (int64_t i = 0; i < n; ++i) {
      int level = draw_level(n0 + i);
      *levels_.row(n0 + i) = static_cast<int8_t>(level);
      std::memset(links0_.row(n0 + i), 0, links0_.width() * sizeof(uint32_t));
      upper_[n0 + i].reset(level > 0 ? new uint32_t[level * (cfg_.M + 1)]() : nullptr);
    }
    const GatherKernels& K = gather_kernels();
    const GatherFn fn = cfg_.storage == Storage::sq8 ? (inner_ == Metric::l2 ? K.l2_sq8 : K.ip_sq8)
                                                     : (inner_ == Metric::l2 ? K.l2_f32 : K.ip_f32);
    // The first row alone makes the entry point; the rest insert in parallel (hnswlib's scheme:
    // per-row locks on link lists, the entry-point lock held only by a row that raises the top level).
    int64_t start = 0;
    if (entry_.load() >> 32 == 0xffffffffu) {
      VisitedList* vis = acquire_visited();
      InsertScratch scratch;
      insert(static_cast<uint32_t>(n0), row_of_batch(0, buf.data()), fn, *vis, scratch);
      release_visited(vis);
      start = 1;
    }
    auto run = [&](int64_t i0, int64_t i1) {
      VisitedList* vis = acquire_visited();
      InsertScratch scratch;
      std::vector<float> tmp(d);
      for (int64_t i = start + i0; i < start + i1; ++i)
        insert(static_cast<uint32_t>(n0 + i), row_of_batch(i, tmp.data()), fn, *vis, scratch);
      release_visited(vis);
    };
    if (n - start > 64) parallel_for(n - start, 8, run);
    else run(0, n - start);
  }
  slots_.store(n0 + n, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lk(ids_mu_);
    for (int64_t i = 0; i < n; ++i) row_of_[ids_out[i]] = static_cast<uint32_t>(n0 + i);
    for (int64_t i = 0; i < n; ++i) next_id_ = std::max(next_id_, ids_out[i] + 1);
    live_.fetch_add(n, std::memory_order_release);
  }
}

int64_t VectorIndex::remove(const int64_t* ids, int64_t n) {
  std::shared_lock<std::shared_mutex> g(grow_mu_);
  std::lock_guard<std::mutex> lk(ids_mu_);
  int64_t removed = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto it = row_of_.find(ids[i]);
    if (it == row_of_.end()) continue;
    __atomic_store_n(deleted_.row(it->second), uint8_t(1), __ATOMIC_RELAXED);
    row_of_.erase(it);
    ++removed;
  }
  live_.fetch_sub(removed, std::memory_order_release);
  removed_.fetch_add(removed, std::memory_order_release);
  return removed;
}

void VectorIndex::search(const float* q, int64_t nq, int64_t k, int ef, int rerank, const uint8_t* allow,
                         int64_t allow_len, float* dist, int64_t* ids) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  for (int64_t i = 0; i < nq * cfg_.dim; ++i)
    if (!std::isfinite(q[i]))
      throw std::invalid_argument("queries row " + std::to_string(i / cfg_.dim) + " contains NaN or inf");
  std::fill(dist, dist + nq * k, INFINITY);
  std::fill(ids, ids + nq * k, int64_t(-1));
  std::shared_lock<std::shared_mutex> g(grow_mu_);
  const int64_t n = slots_.load(std::memory_order_acquire);
  if (n == 0 || nq == 0) return;
  if (cfg_.kind == IndexKind::flat) search_flat(q, nq, k, allow, allow_len, n, dist, ids);
  else search_hnsw(q, nq, k, ef, rerank, allow, allow_len, n, dist, ids);
}

int64_t VectorIndex::memory_bytes() const {
  // Every array counts as allocated, not by its row count: reserve() zero-fills the whole
  // allocation (capacity, rounded up), so all of it is resident (mapped views count what they map).
  std::shared_lock<std::shared_mutex> g(grow_mu_);
  const int64_t n = slots_.load(), cap = row_capacity();
  int64_t b = vectors_.bytes() + ids_.bytes() + deleted_.bytes();  // vectors_ is empty with rows="file"
  if (cfg_.storage == Storage::sq8) b += codes_.bytes() + 3 * cfg_.dim * 4;
  if (cfg_.kind == IndexKind::hnsw) {
    b += levels_.bytes() + links0_.bytes() + cap * (1 + 8);  // + a lock byte and an upper-list pointer per row
    // Upper-level lists: one heap block each, with malloc's 16-byte header and rounding.
    for (int64_t i = 0; i < n; ++i)
      if (const int L = *levels_.row(i)) b += (L * (cfg_.M + 1) * 4 + 8 + 15) / 16 * 16;
  }
  {
    std::lock_guard<std::mutex> lk(pool_mu_);  // visited marks kept for reuse: 2 bytes a row each
    for (const auto& v : pool_) b += static_cast<int64_t>(v->tag.capacity()) * 2;
  }
  // id -> row hash map: a node per entry (key, value, next pointer, cached hash) plus the bucket array.
  std::lock_guard<std::mutex> lk(ids_mu_);
  b += static_cast<int64_t>(row_of_.size()) * 32 + static_cast<int64_t>(row_of_.bucket_count()) * 8;
  return b;
}

std::vector<int64_t> VectorIndex::slot_ids() const {
  std::shared_lock<std::shared_mutex> g(grow_mu_);
  const int64_t n = slots_.load(std::memory_order_acquire);
  return std::vector<int64_t>(ids_.data(), ids_.data() + n);
}

void VectorIndex::read_rows(int64_t first, int64_t n, float* out) const {
  std::shared_lock<std::shared_mutex> g(grow_mu_);
  if (first < 0 || n < 0 || first + n > slots_.load())
    throw std::invalid_argument("read_rows: rows [" + std::to_string(first) + ", " + std::to_string(first + n) +
                                ") are not all stored");
  if (rows_file_) rows_file_->read_range(first, n, out);
  else if (n) std::memcpy(out, vectors_.row(first), n * cfg_.dim * sizeof(float));
}

std::vector<uint32_t> VectorIndex::upper_links() const {
  std::vector<uint32_t> out;
  const int64_t n = slots_.load();
  for (int64_t i = 0; i < n; ++i) {
    int L = *levels_.row(i);
    if (L > 0) out.insert(out.end(), upper_[i].get(), upper_[i].get() + L * (cfg_.M + 1));
  }
  return out;
}

void VectorIndex::restore(const IndexState& s) {
  std::lock_guard<std::mutex> serial(add_mu_);
  std::unique_lock<std::shared_mutex> g(grow_mu_);
  const int64_t n = s.slots, d = cfg_.dim;
  const bool hnsw = cfg_.kind == IndexKind::hnsw, sq8 = cfg_.storage == Storage::sq8;
  // From the file at `offset`, else a view of src (mapped sections), else a copy of src.
  auto fill = [&](auto& rows, const auto* src, int64_t offset, bool may_view) {
    const size_t bytes = n * rows.width() * sizeof(*src);
    if (offset >= 0) {
      rows.reserve(std::max<int64_t>(n, 1), 0);
      if (n) read_exact(s.fd, rows.data(), bytes, offset);
    } else if (may_view && s.view) {
      rows.view(src, n);
    } else {
      rows.reserve(std::max<int64_t>(n, 1), 0);
      if (n) std::memcpy(rows.data(), src, bytes);
    }
  };
  if (cfg_.rows_in_file) {
    if (n > 0 && (s.fd < 0 || s.vectors_offset < 0))
      throw std::invalid_argument("an index with rows in a file needs the file (fd, vectors_offset) to restore from");
    rows_file_ = std::make_unique<RowFile>(d, cfg_.rows_dir);
    if (n > 0) {
      const int own = ::dup(s.fd);
      if (own < 0) throw std::runtime_error("cannot duplicate the index file descriptor");
      rows_file_->attach(own, s.vectors_offset, n);
    }
  } else {
    fill(vectors_, s.vectors, s.vectors_offset, true);
  }
  fill(ids_, s.ids, -1, false);
  fill(deleted_, s.deleted, -1, false);
  if (sq8) {
    fill(codes_, s.codes, s.codes_offset, true);
    sq8_min_.assign(s.sq8_min, s.sq8_min + d);
    sq8_scale_.assign(s.sq8_scale, s.sq8_scale + d);
    sq8_w_.resize(d);
    for (int64_t k = 0; k < d; ++k) sq8_w_[k] = sq8_scale_[k] * sq8_scale_[k];
    sq8_fitted_ = n > 0;
  }
  row_of_.clear();
  row_of_.reserve(n);
  int64_t live = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (s.deleted[i]) continue;
    if (!row_of_.emplace(s.ids[i], static_cast<uint32_t>(i)).second)
      throw std::invalid_argument("index state holds id " + std::to_string(s.ids[i]) + " twice");
    ++live;
  }
  if (hnsw) {
    fill(levels_, s.levels, -1, false);
    fill(links0_, s.links0, s.links0_offset, true);
    upper_.clear();
    upper_.resize(std::max<int64_t>(n, 1));
    locks_.reset(new std::atomic<uint8_t>[std::max<int64_t>(n, 1)]());
    int64_t off = 0;
    for (int64_t i = 0; i < n; ++i) {
      int L = s.levels[i];
      if (L < 0 || L > 30) throw std::invalid_argument("index state has a level out of range at row " + std::to_string(i));
      if (L == 0) continue;
      const int64_t len = L * (cfg_.M + 1);
      if (off + len > s.upper_len) throw std::invalid_argument("index state: upper-level links are shorter than the levels say");
      upper_[i].reset(new uint32_t[len]);
      std::memcpy(upper_[i].get(), s.upper + off, len * sizeof(uint32_t));
      off += len;
    }
    if (off != s.upper_len) throw std::invalid_argument("index state: upper-level links are longer than the levels say");
    // Every stored link must name an existing row: a file that passed its checksum but was written
    // by a buggy producer must still not make search read out of bounds.
    for (int64_t i = 0; i < n; ++i) {
      const int L = s.levels[i];
      for (int l = 0; l <= L; ++l) {
        const uint32_t* ln = links(static_cast<uint32_t>(i), l);
        if (ln[0] > static_cast<uint32_t>(max_links(l)))
          throw std::invalid_argument("index state: row " + std::to_string(i) + " has too many links");
        for (uint32_t j = 0; j < ln[0]; ++j)
          if (ln[1 + j] >= n) throw std::invalid_argument("index state: a link points past the last row");
      }
    }
    if (n > 0 && (s.entry >= n || s.max_level != s.levels[s.entry]))
      throw std::invalid_argument("index state: the entry point is inconsistent with the levels");
    entry_.store(n > 0 ? (uint64_t(uint32_t(s.max_level)) << 32) | s.entry : (kNone | (uint64_t(kNone) << 32)));
  }
  next_id_ = s.next_id;
  live_.store(live);
  removed_.store(n - live);
  slots_.store(n);
}

}  // namespace quark
