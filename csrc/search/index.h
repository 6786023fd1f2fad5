// Vector index over caller-chosen int64 ids, the engine behind quark.search.Index.
//
//   kind flat:  exact search. Blocks of stored rows go through the foundation's pairwise_distance
//               kernel (GEMM-style tiles) and a per-query top-k heap; threads split the queries and,
//               for few queries, the stored rows.
//   kind hnsw:  Hierarchical Navigable Small World graph (Malkov & Yashunin, arXiv:1603.09320), with
//               the neighbour-selection heuristic and the layout ideas of hnswlib: M links per node on
//               upper levels, 2M on level 0, levels drawn with P(level >= l) = M^-l.
//   storage fp32: rows kept as float32; sq8: also one byte per dimension (per-dimension min/scale
//               fitted on the first add() batch, later values clipped); the graph is built and
//               traversed on the codes (4x fewer bytes fetched per hop; recall measured equal to a
//               graph built on fp32) and the best candidates are re-ranked on fp32.
//   rows file:  (sq8 only) the fp32 rows stay out of memory, in a file (row_file.h): only the
//               re-rank reads rows back, with pread.
//   metric:     l2 (squared), ip (-dot), cosine (rows and queries normalised, then 1 - dot).
//
// Concurrency (searches from many threads while one thread adds):
//   - add() calls are serialised by add_mu_; inside one call the pool's threads insert in parallel.
//   - Capacity grows (arrays reallocated) only under an exclusive grow_mu_; searches and inserts
//     hold it shared, so no reader ever sees a freed array.
//   - A row's vector, code, id and level are written before the row is linked into the graph, and
//     link lists are published with release stores and read with acquire loads: readers take no
//     lock and always read valid row numbers. Writers of one list serialise on a per-row spinlock.
//   - remove() flips a tombstone byte (atomic); removed rows stay in the graph for navigation and
//     are never returned. compact() (Python side) rebuilds without them.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <sys/mman.h>
#include <string>
#include <unordered_map>
#include <vector>

#include "search/distance.h"
#include "search/gather_distance.h"
#include "search/row_file.h"

namespace quark {

enum class IndexKind : int { flat = 0, hnsw = 1 };
enum class Storage : int { fp32 = 0, sq8 = 1 };

struct IndexConfig {
  int64_t dim = 0;
  Metric metric = Metric::l2;
  IndexKind kind = IndexKind::hnsw;
  Storage storage = Storage::fp32;
  int M = 16;                  // links per node on upper levels (2M on level 0)
  int ef_construction = 200;   // candidate list size while inserting
  uint64_t seed = 0;           // level draws are a hash of (seed, row): reproducible single-threaded
  bool rows_in_file = false;   // sq8 only: fp32 rows in a file (row_file.h), not in memory
  std::string rows_dir;        // where the scratch file of rows added in that mode goes
};

// (rows, width) storage that either owns a 64-byte-aligned buffer or views external memory (a
// memory-mapped file). Nothing writes into a view: add() first turns every view into an owned copy.
template <class T>
class Rows {
 public:
  explicit Rows(int64_t width = 1) : width_(width) {}
  T* row(int64_t i) { return data_ + i * width_; }
  const T* row(int64_t i) const { return data_ + i * width_; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t width() const { return width_; }
  int64_t capacity() const { return cap_; }
  // Bytes held: the allocation (rounded up, zero-filled: all resident) or the mapped view.
  int64_t bytes() const { return owned_ ? alloc_bytes_ : cap_ * width_ * int64_t(sizeof(T)); }
  bool is_view() const { return data_ != nullptr && !owned_; }

  // Owned storage for `rows` rows holding the first `keep` rows of the current data; the rest zero.
  // Large arrays are asked for transparent huge pages: the graph reads them at random, and with
  // 4 KiB pages nearly every access of a search also misses the TLB.
  void reserve(int64_t rows, int64_t keep) {
    constexpr size_t kHuge = size_t(2) << 20;
    size_t bytes = static_cast<size_t>(rows * width_) * sizeof(T);
    const size_t align = bytes >= kHuge ? kHuge : 64;
    bytes = (bytes + align - 1) / align * align;
    T* p = static_cast<T*>(std::aligned_alloc(align, bytes ? bytes : 64));
    if (!p) throw std::bad_alloc();
    if (align == kHuge) madvise(p, bytes, MADV_HUGEPAGE);
    std::memset(p, 0, bytes);
    if (keep > 0) std::memcpy(p, data_, static_cast<size_t>(keep * width_) * sizeof(T));
    owned_.reset(p);
    data_ = p;
    cap_ = rows;
    alloc_bytes_ = static_cast<int64_t>(bytes);
  }
  void view(const T* ext, int64_t rows) {
    owned_.reset();
    data_ = const_cast<T*>(ext);
    cap_ = rows;
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> owned_;
  T* data_ = nullptr;
  int64_t width_, cap_ = 0, alloc_bytes_ = 0;
};

struct Cand {
  float d;
  uint32_t id;
};

// Per-search "seen" marks: a uint16 tag per row compared with a per-use epoch, so starting a new
// search costs one increment instead of clearing n bytes (hnswlib's VisitedList).
struct VisitedList {
  std::vector<uint16_t> tag;
  uint16_t epoch = 0;
  void start(size_t n) {
    if (tag.size() < n) tag.resize(n, 0);
    if (++epoch == 0) {
      std::fill(tag.begin(), tag.end(), 0);
      epoch = 1;
    }
  }
  bool test_and_set(uint32_t i) {
    if (tag[i] == epoch) return true;
    tag[i] = epoch;
    return false;
  }
};

// Per-thread buffers of an insertion, reused from row to row (no allocation, no thread_local
// lookup on the build's hot path).
struct InsertScratch {
  std::vector<Cand> top, cand, cands, kept;
  std::vector<std::vector<Cand>> sel;  // the row's chosen links per level
  std::vector<float> q, q2;            // (dim,): the row's query; another row's (connect, heuristic)
};

// Everything save()/load() moves, as plain arrays (the Python layer writes the file).
struct IndexState {
  int64_t slots = 0, next_id = 0;
  uint32_t entry = 0xffffffffu;
  int32_t max_level = -1;
  const float* vectors = nullptr;   // (slots, dim)
  const uint8_t* codes = nullptr;   // (slots, dim) sq8 only
  const float* sq8_min = nullptr;   // (dim,) sq8 only
  const float* sq8_scale = nullptr; // (dim,)
  const int64_t* ids = nullptr;     // (slots,)
  const uint8_t* deleted = nullptr; // (slots,)
  const int8_t* levels = nullptr;   // (slots,) hnsw only
  const uint32_t* links0 = nullptr; // (slots, 2M + 1) hnsw only
  const uint32_t* upper = nullptr;  // concatenated upper-level lists, levels[i] * (M + 1) per row
  int64_t upper_len = 0;
  bool view = false;                // keep pointers to vectors/codes/links0 instead of copying
  // The saved index file, open during restore(): a section with an offset >= 0 is read from it
  // straight into the index's storage (no intermediate copy) instead of from its pointer above.
  // With rows_in_file the rows stay in the file, read at vectors_offset through a dup of fd.
  int fd = -1;
  int64_t vectors_offset = -1, codes_offset = -1, links0_offset = -1;
};

class VectorIndex {
 public:
  explicit VectorIndex(const IndexConfig& cfg);

  const IndexConfig& config() const { return cfg_; }
  int64_t size() const { return live_.load(std::memory_order_acquire); }   // live (not removed) rows
  int64_t slots() const { return slots_.load(std::memory_order_acquire); } // stored rows, removed included
  int64_t next_id() const { return next_id_; }
  void reserve_ids(int64_t next) {  // assigned ids continue from at least `next` (compact keeps the sequence)
    std::lock_guard<std::mutex> lk(ids_mu_);
    next_id_ = std::max(next_id_, next);
  }

  // x: (n, dim); ids: (n,) or nullptr to assign next_id() onward; ids_out: (n,) the ids used.
  // Throws std::invalid_argument (and adds nothing) on non-finite values or on an id that is
  // repeated in the batch or already present.
  void add(const float* x, int64_t n, const int64_t* ids, int64_t* ids_out);
  // Tombstones the given ids; unknown or already removed ids are skipped. Returns how many went.
  int64_t remove(const int64_t* ids, int64_t n);
  // q: (nq, dim) -> dist, ids: (nq, k) nearest first; rows past the available results hold
  // (+inf, -1). allow: (allow_len,) one byte per stored row (nonzero: may be returned), or nullptr.
  // rerank (sq8): how many of the best candidates by code distance get their exact distance
  // (at least k); 0: all of them (ef).
  void search(const float* q, int64_t nq, int64_t k, int ef, int rerank, const uint8_t* allow, int64_t allow_len,
              float* dist, int64_t* ids);
  // Bytes the index holds in memory: every array at its allocated capacity (mapped views included),
  // upper link lists, pooled visited marks, the id map. Not the rows file's page cache (reclaimable).
  int64_t memory_bytes() const;
  std::vector<int64_t> slot_ids() const;  // id of every stored row (removed ones included), row order
  // Fixes the sq8 ranges (per dimension, of the rows as stored) instead of fitting the first add().
  void set_sq8_range(const float* lo, const float* hi);
  // out (n, dim) <- the stored fp32 rows [first, first + n), wherever they live.
  void read_rows(int64_t first, int64_t n, float* out) const;

  // Persistence: read the arrays of the current state (slots() rows; the fp32 rows through
  // read_rows) / rebuild from them.
  const Rows<uint8_t>& codes() const { return codes_; }
  const std::vector<float>& sq8_min() const { return sq8_min_; }
  const std::vector<float>& sq8_scale() const { return sq8_scale_; }
  const Rows<int64_t>& ids() const { return ids_; }
  const Rows<uint8_t>& deleted() const { return deleted_; }
  const Rows<int8_t>& levels() const { return levels_; }
  const Rows<uint32_t>& links0() const { return links0_; }
  std::vector<uint32_t> upper_links() const;
  uint32_t entry() const { return static_cast<uint32_t>(entry_.load()); }
  int32_t max_level() const { return static_cast<int32_t>(entry_.load() >> 32); }
  void restore(const IndexState& s);

 private:
  static constexpr uint32_t kNone = 0xffffffffu;
  int max_links(int level) const { return level == 0 ? 2 * cfg_.M : cfg_.M; }
  uint32_t* links(uint32_t row, int level) {
    return level == 0 ? links0_.row(row) : upper_[row].get() + (level - 1) * (cfg_.M + 1);
  }
  const uint32_t* links(uint32_t row, int level) const {
    return level == 0 ? links0_.row(row) : upper_[row].get() + (level - 1) * (cfg_.M + 1);
  }
  bool is_deleted(int64_t row) const { return __atomic_load_n(deleted_.row(row), __ATOMIC_RELAXED) != 0; }

  void ensure_capacity(int64_t rows);
  // The row as stored: `in` itself, or for cosine its normalised copy in buf (dim,).
  const float* stored_form(const float* in, float* buf) const;
  void fit_sq8(const float* x, int64_t n);
  void encode_sq8(int64_t row, const float* v);
  // Distance queries (gather_distance.h) for the graph's distances: exact on the fp32 rows, or on
  // the codes for sq8. buf: (dim,) floats the query may point into.
  GatherQuery sq8_query(const float* x, float* buf) const;  // x mapped into code space
  GatherQuery build_query(const float* v, float* buf) const;  // a row not yet stored, v: stored form
  GatherQuery row_query(uint32_t row, float* buf) const;      // a stored row
  const void* build_base() const {
    return cfg_.storage == Storage::sq8 ? static_cast<const void*>(codes_.data()) : vectors_.data();
  }
  int64_t row_capacity() const { return ids_.capacity(); }
  int draw_level(int64_t row) const;
  void lock_row(uint32_t row);
  void unlock_row(uint32_t row);

  // flat.cpp
  void search_flat(const float* q, int64_t nq, int64_t k, const uint8_t* allow, int64_t allow_len, int64_t n,
                   float* dist, int64_t* ids);
  // hnsw.cpp
  void insert(uint32_t row, const float* v, GatherFn fn, VisitedList& vis, InsertScratch& s);
  void select_neighbors(const std::vector<Cand>& sorted, int m, GatherFn fn, float* qbuf, std::vector<Cand>& out) const;
  void connect(uint32_t from, uint32_t to, float d, int level, GatherFn fn, InsertScratch& s);
  void search_hnsw(const float* q, int64_t nq, int64_t k, int ef, int rerank, const uint8_t* allow,
                   int64_t allow_len, int64_t n, float* dist, int64_t* ids);
  void rerank(const GatherQuery& q, size_t depth, std::vector<Cand>& top, std::vector<uint32_t>& rows,
              std::vector<float>& buf) const;
  VisitedList* acquire_visited();
  void release_visited(VisitedList* v);

  IndexConfig cfg_;
  Metric inner_;  // l2 or ip: cosine runs as ip on normalised rows

  mutable std::shared_mutex grow_mu_;
  std::mutex add_mu_, entry_mu_;
  mutable std::mutex pool_mu_;
  mutable std::mutex ids_mu_;
  std::atomic<int64_t> slots_{0}, live_{0}, removed_{0};  // removed_: tombstones present
  int64_t next_id_ = 0;

  Rows<float> vectors_;                   // empty with rows_in_file
  std::unique_ptr<RowFile> rows_file_;    // rows_in_file only
  Rows<uint8_t> codes_;
  std::vector<float> sq8_min_, sq8_scale_, sq8_w_;  // w = scale^2 (l2 in code space)
  bool sq8_fitted_ = false;
  Rows<int64_t> ids_;
  Rows<uint8_t> deleted_;
  std::unordered_map<int64_t, uint32_t> row_of_;

  Rows<int8_t> levels_;
  Rows<uint32_t> links0_;                           // (rows, 2M + 1): count, then links
  std::vector<std::unique_ptr<uint32_t[]>> upper_;  // levels 1..L of a row: L * (M + 1)
  std::unique_ptr<std::atomic<uint8_t>[]> locks_;
  std::atomic<uint64_t> entry_{kNone | (uint64_t(0xffffffffu) << 32)};  // (max_level << 32) | entry row
  std::vector<std::unique_ptr<VisitedList>> pool_;
};

}  // namespace quark
