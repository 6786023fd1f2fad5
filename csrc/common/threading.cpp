// The thread pool of threading.h.
//
// One job at a time, owned by the thread that holds owner_. The job's chunks are claimed by
// decrementing next_ = epoch << kLeftBits | chunks not yet claimed, with a compare-exchange that also
// checks the epoch: a worker that read an old value (it slept through the job) cannot claim a chunk of
// a later one. The job's fields are written before next_ publishes it and read only by a thread that
// has claimed one of its chunks, when the owner is still waiting for that chunk, so they are valid.
// The owner counts finished chunks in done_ and returns when it reaches the job's chunk count.
#include "common/threading.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace quark {
namespace {

thread_local int t_slot = 0;         // see detail::thread_slot
thread_local bool t_inside = false;  // running a chunk (or a worker): a nested parallel_for runs inline

// About 8 chunks per thread: a chunk a preempted worker holds is then ~1/8 of its share, and claiming
// one costs one atomic operation on a shared line (~100 ns), small beside a chunk of a ~30 us kernel.
constexpr int64_t kChunksPerThread = 8;
constexpr int kLeftBits = 24;
constexpr uint64_t kLeftMask = (uint64_t{1} << kLeftBits) - 1;
constexpr int64_t kMaxChunks = 1 << 20;
// Spin this long before sleeping: workers between jobs, the owner waiting for a claimed chunk. A decode
// step calls its kernels tens of microseconds apart; a futex wake-up costs about as much again.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Calls until() every few pauses while it returns false, for at most kSpin; returns its last answer.
template <class Until>
bool spin(Until until) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (until()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() > deadline) return until();
  }
}

class Pool {
 public:
  explicit Pool(int threads) : want_(threads) {}

  int threads() const { return want_.load(std::memory_order_relaxed); }
  void set_threads(int n) { want_.store(n, std::memory_order_relaxed); }

  void run(int64_t n, int64_t grain, detail::ChunkFn call, void* fn) {
    const int64_t threads = want_.load(std::memory_order_relaxed);
    int64_t chunk = std::max<int64_t>(
        {grain, 1, (n + kChunksPerThread * threads - 1) / (kChunksPerThread * threads), (n + kMaxChunks - 1) / kMaxChunks});
    if (threads == 1 || chunk >= n || t_inside) return call(fn, 0, n);
    std::unique_lock<std::mutex> owner(owner_, std::try_to_lock);
    if (!owner.owns_lock()) return call(fn, 0, n);   // another thread's job holds the workers
    resize(static_cast<int>(threads) - 1);

    call_ = call, fn_ = fn, n_ = n, chunk_ = chunk, chunks_ = (n + chunk - 1) / chunk;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = (next_.load(std::memory_order_relaxed) >> kLeftBits) + 1;
    next_.store(epoch << kLeftBits | static_cast<uint64_t>(chunks_), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }

    t_inside = true;
    work(epoch << kLeftBits | static_cast<uint64_t>(chunks_));
    t_inside = false;
    const int64_t chunks = chunks_;
    if (!spin([&] { return done_.load(std::memory_order_acquire) == chunks; })) {
      std::unique_lock<std::mutex> lock(mu_);
      owner_waiting_.store(true, std::memory_order_seq_cst);
      cv_.wait(lock, [&] { return done_.load(std::memory_order_seq_cst) == chunks; });
      owner_waiting_.store(false, std::memory_order_relaxed);
    }
    std::exception_ptr error = std::move(error_);
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    owner.unlock();
    if (error) std::rethrow_exception(error);
  }

 private:
  // Claims and runs chunks of the job published as v until none is left or a later job replaced it.
  void work(uint64_t v) {
    const uint64_t epoch = v >> kLeftBits;
    while ((v >> kLeftBits) == epoch && (v & kLeftMask) != 0) {
      if (!next_.compare_exchange_weak(v, v - 1, std::memory_order_acquire, std::memory_order_relaxed)) continue;
      const int64_t chunks = chunks_, c = chunks - static_cast<int64_t>(v & kLeftMask);
      run_chunk(c);
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == chunks &&
          owner_waiting_.load(std::memory_order_seq_cst)) {
        { std::lock_guard<std::mutex> lock(mu_); }
        cv_.notify_all();
      }
      v = next_.load(std::memory_order_acquire);
    }
  }

  void run_chunk(int64_t c) {
    if (failed_.load(std::memory_order_relaxed)) return;
    const int64_t begin = c * chunk_, end = std::min(n_, begin + chunk_);
    try {
      call_(fn_, begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }

  void worker(int slot, uint64_t seen) {
    t_slot = slot;
    t_inside = true;
    for (;;) {
      auto fresh = [&] { return (next_.load(std::memory_order_seq_cst) >> kLeftBits) != seen || stop_.load(); };
      if (!spin(fresh)) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lock, fresh);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      if (stop_.load()) return;
      const uint64_t v = next_.load(std::memory_order_acquire);
      seen = v >> kLeftBits;
      work(v);
    }
  }

  // Called by the owner between jobs.
  void resize(int workers) {
    if (static_cast<int>(workers_.size()) == workers) return;
    stop_.store(true);
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
    const uint64_t seen = next_.load(std::memory_order_relaxed) >> kLeftBits;
    for (int i = 1; i <= workers; ++i) workers_.emplace_back(&Pool::worker, this, i, seen);
  }

  std::atomic<int> want_;
  std::mutex owner_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};

  // The job (see the file comment).
  detail::ChunkFn call_ = nullptr;
  void* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 0, chunks_ = 0;
  std::exception_ptr error_;
  std::mutex error_mu_;
  std::atomic<bool> failed_{false};
  // The claim and done counters take a cache line each: every thread writes them.
  alignas(64) std::atomic<uint64_t> next_{0};
  alignas(64) std::atomic<int64_t> done_{0};

  alignas(64) std::mutex mu_;   // with cv_: sleeping workers, and the owner waiting for a preempted chunk
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> owner_waiting_{false};
};

int default_threads() { return std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, kMaxThreads); }

// Never destroyed: at exit the workers may still be asleep in it, and the process ends them.
Pool* g_pool = nullptr;

// A forked child has only the thread that forked: it drops the parent's pool (its workers do not
// exist there) and its next parallel_for starts new ones.
void reset_after_fork() { g_pool = new Pool(g_pool ? g_pool->threads() : default_threads()); }

Pool& pool() {
  static const bool once = [] {
    g_pool = new Pool(default_threads());
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, reset_after_fork);
#endif
    return true;
  }();
  (void)once;
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().threads(); }
void set_num_threads(int n) { pool().set_threads(std::clamp(n, 1, kMaxThreads)); }

namespace detail {
void parallel_for(int64_t n, int64_t grain, ChunkFn call, void* fn) { pool().run(n, grain, call, fn); }
int thread_slot() { return t_slot; }
}  // namespace detail

}  // namespace quark
