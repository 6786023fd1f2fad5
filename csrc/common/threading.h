// OpenMP thread count shared by every kernel. Python sets it at import from QUARK_NUM_THREADS,
// else torch's thread count, so Quark and torch never oversubscribe each other.
#pragma once
#include <omp.h>

namespace quark {

inline int num_threads() { return omp_get_max_threads(); }
inline void set_num_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }

}  // namespace quark
