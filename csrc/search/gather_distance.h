// Distances from one query to a gathered list of stored rows: the inner loop of graph search.
// pairwise_distance (distance.h) is the right kernel for many queries against a contiguous block;
// graph traversal instead visits a few dozen scattered rows per step, so this kernel takes row
// numbers, prefetches the rows ahead of use and computes each distance in SIMD registers.
//
// Rows are fp32 (d floats) or sq8 codes (d bytes, x_k ~ vmin_k + scale_k * c_k). For sq8 the query
// is mapped once per search into code space, so the per-row work is a convert and two FMAs:
//   l2_f32: ||q - y||^2                   (GatherQuery.q = the query)
//   ip_f32: -<q, y>
//   l2_sq8: sum_k w_k (q_k - c_k)^2       (q_k = (x_k - vmin_k) / scale_k, w_k = scale_k^2)
//   ip_sq8: -(sum_k q_k c_k + bias)       (q_k = x_k * scale_k, bias = <x, vmin>)
// Smaller is nearer, as everywhere in quark.search.
#pragma once
#include <cstdint>

namespace quark {

struct GatherQuery {
  const float* q;  // (d,)
  const float* w;  // (d,) sq8 l2 only
  float bias;      // sq8 ip only
};

// out[i] = distance(query, row idx[i] of base) for i < n; base is (rows, d) fp32 or uint8.
using GatherFn = void (*)(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out);

struct GatherKernels {
  GatherFn l2_f32, ip_f32, l2_sq8, ip_sq8;
};

const GatherKernels& gather_kernels();  // the table for the current ISA level; read once per call

const GatherKernels& gather_kernels_scalar();
const GatherKernels& gather_kernels_avx2();
const GatherKernels& gather_kernels_avx512();

}  // namespace quark
