// Pairwise distances between a query batch and a base matrix (fp32), the kernel under vector search.
// Convention: smaller is nearer for every metric.
//   l2:     ||x - y||^2
//   ip:     -<x, y>
//   cosine: 1 - <x, y> / (||x|| ||y||)   (a zero vector is at distance 1 from everything)
#pragma once
#include <cstdint>

namespace quark {

enum class Metric : int { l2 = 0, ip = 1, cosine = 2 };

struct DistanceArgs {
  const float* x;            // (nq, d) row-major queries
  int64_t nq;
  const float* y;            // (nb, d) row-major base vectors
  int64_t nb;
  int64_t d;
  Metric metric;
  const float* y_sqnorms;    // (nb,) ||y||^2 if the caller keeps them, else nullptr
  float* out;                // (nq, ldo) row-major, first nb columns written
  int64_t ldo;
};

void pairwise_distance(const DistanceArgs& a);  // dispatches on current_isa(); threads: common/threading.h

void pairwise_distance_scalar(const DistanceArgs& a);
void pairwise_distance_avx2(const DistanceArgs& a);
void pairwise_distance_avx512(const DistanceArgs& a);

}  // namespace quark
