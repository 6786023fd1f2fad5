// fp32 rows kept in files instead of memory (quark.search.Index(storage="sq8", rows="file")).
//
// The graph is built and walked on the int8 codes held in memory; only the final exact re-rank of
// a few candidates per query reads fp32 rows back, with pread (the split of DiskANN, Subramanya et
// al., NeurIPS 2019: compressed vectors in RAM, full vectors on disk). Resident memory is then the
// codes and the graph; the rows occupy the page cache, which the kernel may reclaim.
//
// Rows live in up to two segments: rows [0, saved) in the vectors section of the index file they
// were loaded from (read-only), rows [saved, ...) in a scratch file for rows added since. The
// scratch file is unlinked as soon as it is created, so it disappears with the index.
//
// Concurrency: one writer (VectorIndex::add, serialised) appends rows, and makes them visible to
// readers only afterwards (the index publishes its row count with a release store), so readers
// never read a row that is still being written. Reads are independent preads: any number of threads.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace quark {

// Reads exactly n bytes at byte `off` of fd into dst; throws std::system_error if a read fails
// (a bad fd, EIO) and std::invalid_argument if the file ends first.
void read_exact(int fd, void* dst, size_t n, int64_t off);

class RowFile {
 public:
  RowFile(int64_t dim, std::string scratch_dir);
  ~RowFile();
  RowFile(const RowFile&) = delete;
  RowFile& operator=(const RowFile&) = delete;

  // Rows [0, rows) are the float32 (rows, dim) array at byte `offset` of the open file `fd` (a
  // saved index, checked by the caller); the RowFile owns fd from here on and closes it.
  void attach(int fd, int64_t offset, int64_t rows);
  // Writes rows [first, first + n) (first = every row so far) to the scratch file.
  void append(const float* x, int64_t first, int64_t n);
  // out (n, dim) <- rows[0..n). Tries the page cache without blocking first, then announces every
  // missing row (POSIX_FADV_WILLNEED) so a cold device fetches them in parallel, then reads them.
  void read(const uint32_t* rows, int n, float* out) const;
  // out (n, dim) <- the contiguous rows [first, first + n).
  void read_range(int64_t first, int64_t n, float* out) const;

 private:
  struct Segment {
    int fd = -1;
    int64_t offset = 0;  // byte offset of the segment's row 0 in the file
  };
  // The segment holding `row` and the byte offset of the row in its file.
  const Segment& locate(int64_t row, int64_t& off) const {
    const Segment& s = row < saved_rows_ ? saved_ : scratch_;
    off = s.offset + (row < saved_rows_ ? row : row - saved_rows_) * row_bytes_;
    return s;
  }

  int64_t dim_, row_bytes_;
  std::string dir_;
  Segment saved_, scratch_;
  int64_t saved_rows_ = 0;
  mutable std::atomic<bool> nowait_{true};  // cleared if the kernel refuses RWF_NOWAIT reads
};

}  // namespace quark
