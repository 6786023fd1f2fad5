// Quark's thread pool: the parallel loops of the kernels run on it.
//
// Why not OpenMP: an OpenMP loop ends at a barrier that waits for every thread of the team, and its
// work is handed out when the region starts. On a shared machine a thread whose core another process
// holds wakes up late, or loses its core mid-loop, and every kernel call then waits a scheduler time
// slice for it (decode kernels of ~30 us measured 20-60 ms with two threads and one busy core).
//
// parallel_for(n, grain, fn) calls fn(begin, end) on chunks that cover [0, n) exactly once. The
// calling thread claims chunks from one atomic counter beside the workers, so whatever a worker has
// not claimed yet is done by the threads that are running; the call returns as soon as every chunk is
// claimed and every claimed chunk is done: a worker that has not woken up is never waited for, and one
// that loses its core mid-chunk holds up that one chunk. Chunks are small (about kChunksPerThread per
// thread, at least `grain` items) to keep that chunk short. Chunk c covers items
// [c * chunk, (c + 1) * chunk): any split gives the same result as long as each item's own work does
// not depend on it, which every caller keeps (no reduction crosses items).
//
// Workers spin briefly after a job (a decode step issues kernels tens of microseconds apart) and then
// sleep on a condition variable. A parallel_for called from a chunk the workers share, or while
// another thread's parallel_for holds the workers, runs inline in the calling thread as fn(0, n).
// The first exception a chunk throws is rethrown by parallel_for once every claimed chunk is done;
// chunks claimed after it are skipped. After fork() the child starts with no workers and makes new
// ones on first use.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

namespace quark {

constexpr int kMaxThreads = 256;

int num_threads();             // threads a parallel_for uses, the calling thread included
void set_num_threads(int n);   // 1 <= n <= kMaxThreads; the workers follow at the next parallel_for

namespace detail {
using ChunkFn = void (*)(void* fn, int64_t begin, int64_t end);
void parallel_for(int64_t n, int64_t grain, ChunkFn call, void* fn);
int thread_slot();   // 0 outside the pool (any calling thread), i in worker i (1 <= i < num_threads())
}  // namespace detail

template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  using Fn = std::remove_reference_t<F>;
  detail::parallel_for(
      n, grain, [](void* f, int64_t begin, int64_t end) { (*static_cast<Fn*>(f))(begin, end); },
      const_cast<void*>(static_cast<const void*>(&fn)));
}

// One object per thread that runs chunks of a kernel's parallel_for calls, made by make() on the
// thread's first use: the scratch an OpenMP region declares before its loop. A worker that claims no
// chunk makes none. Threads running one job have distinct slots, so local() needs no lock.
template <class Make>
class PerThread {
 public:
  using T = std::invoke_result_t<Make&>;
  explicit PerThread(Make make) : make_(std::move(make)) {}

  T& local() {
    std::unique_ptr<T>& p = slots_[detail::thread_slot()];
    if (!p) p.reset(new T(make_()));
    return *p;
  }

 private:
  Make make_;
  std::array<std::unique_ptr<T>, kMaxThreads> slots_{};
};

}  // namespace quark
