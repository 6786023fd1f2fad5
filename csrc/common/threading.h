// OpenMP thread count shared by every kernel. Python sets it at import from QUARK_NUM_THREADS,
// else torch's thread count, so Quark and torch never oversubscribe each other.
#pragma once
#include <omp.h>

namespace quark {

inline int num_threads() { return omp_get_max_threads(); }
// OpenMP allocates per-thread state for every thread of a team: a count far past any machine's
// cores (2^31) aborts the process in the next parallel region instead of failing the call.
constexpr int kMaxThreads = 1024;

inline void set_num_threads(int n) { omp_set_num_threads(n); }   // 1 <= n <= kMaxThreads (the binding checks)

}  // namespace quark
