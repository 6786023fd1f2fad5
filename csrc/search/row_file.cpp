// RowFile: fp32 rows in files, read back with pread (see row_file.h).
#include "search/row_file.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <algorithm>
#include <stdexcept>
#include <system_error>
#include <vector>

namespace quark {
namespace {

// A failed system call: std::system_error carries errno, and the binding raises it as OSError
// (the subclass errno names), as os.pread or open would.
[[noreturn]] void sys_error(const std::string& what) { throw std::system_error(errno, std::generic_category(), what); }

void pwrite_all(int fd, const void* src, size_t n, int64_t off) {
  const char* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t r = ::pwrite(fd, p, n, off);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) sys_error("writing fp32 rows to the scratch file failed");
    p += r;
    off += r;
    n -= static_cast<size_t>(r);
  }
}

// An anonymous file in `dir`: O_TMPFILE where the file system has it, else mkstemp + unlink.
int open_scratch(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) return fd;
  std::string tmpl = dir + "/.quark-rows-XXXXXX";
  fd = ::mkostemp(tmpl.data(), O_CLOEXEC);
  if (fd < 0) sys_error("cannot create a scratch file for fp32 rows in '" + dir + "'");
  ::unlink(tmpl.c_str());
  return fd;
}

}  // namespace

void read_exact(int fd, void* dst, size_t n, int64_t off) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {  // pread may return less than asked (a signal, a huge read): go on from there
    const ssize_t r = ::pread(fd, p, n, off);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) sys_error("reading the index file failed");
    // Bad contents, not a failed call (as numpy.memmap past the end of a file): ValueError.
    if (r == 0) throw std::invalid_argument("the index file ends before the index does: was it truncated?");
    p += r;
    off += r;
    n -= static_cast<size_t>(r);
  }
}

RowFile::RowFile(int64_t dim, std::string scratch_dir)
    : dim_(dim), row_bytes_(dim * static_cast<int64_t>(sizeof(float))), dir_(std::move(scratch_dir)) {}

RowFile::~RowFile() {
  if (saved_.fd >= 0) ::close(saved_.fd);
  if (scratch_.fd >= 0) ::close(scratch_.fd);
}

void RowFile::attach(int fd, int64_t offset, int64_t rows) {
  if (saved_.fd >= 0) ::close(saved_.fd);
  saved_ = {fd, offset};
  saved_rows_ = rows;
  // The rows are read at random, a few per query: read-ahead would only fetch rows nobody asked for.
  ::posix_fadvise(fd, offset, rows * row_bytes_, POSIX_FADV_RANDOM);
}

void RowFile::append(const float* x, int64_t first, int64_t n) {
  if (first < saved_rows_) throw std::logic_error("RowFile::append below the saved rows");
  if (n <= 0) return;
  if (scratch_.fd < 0) {
    scratch_.fd = open_scratch(dir_);
    ::posix_fadvise(scratch_.fd, 0, 0, POSIX_FADV_RANDOM);
  }
  pwrite_all(scratch_.fd, x, static_cast<size_t>(n * row_bytes_), (first - saved_rows_) * row_bytes_);
}

void RowFile::read(const uint32_t* rows, int n, float* out) const {
  thread_local std::vector<int> miss;
  miss.clear();
  for (int i = 0; i < n; ++i) {
    int64_t off;
    const Segment& s = locate(rows[i], off);
    if (nowait_.load(std::memory_order_relaxed)) {
      iovec v{out + static_cast<int64_t>(i) * dim_, static_cast<size_t>(row_bytes_)};
      const ssize_t r = ::preadv2(s.fd, &v, 1, off, RWF_NOWAIT);
      if (r == row_bytes_) continue;
      if (r < 0 && errno == EOPNOTSUPP) nowait_.store(false, std::memory_order_relaxed);
    }
    miss.push_back(i);
  }
  if (miss.size() > 1) {
    for (int i : miss) {
      int64_t off;
      const Segment& s = locate(rows[i], off);
      ::posix_fadvise(s.fd, off, row_bytes_, POSIX_FADV_WILLNEED);
    }
  }
  for (int i : miss) {
    int64_t off;
    const Segment& s = locate(rows[i], off);
    read_exact(s.fd, out + static_cast<int64_t>(i) * dim_, static_cast<size_t>(row_bytes_), off);
  }
}

void RowFile::read_range(int64_t first, int64_t n, float* out) const {
  // At most two preads: the part in the saved file, then the part in the scratch file.
  while (n > 0) {
    int64_t off;
    const Segment& s = locate(first, off);
    const int64_t m = first < saved_rows_ ? std::min(n, saved_rows_ - first) : n;
    read_exact(s.fd, out, static_cast<size_t>(m * row_bytes_), off);
    out += m * dim_;
    first += m;
    n -= m;
  }
}

}  // namespace quark
