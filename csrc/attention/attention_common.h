// Element conversions shared by every attention variant (rows of fp32 / bf16 / int8; the bf16 <-> fp32
// element conversions are common/bf16.h).
// Everything sits in an anonymous namespace: this header is compiled with different -m flags in
// each ISA translation unit, and the linker must never merge those copies.
#pragma once
#include <cmath>
#include <cstdint>

#include "attention/attention.h"
#include "common/bf16.h"

namespace quark {
namespace {

// bytes from p into L1, one prefetch per 64-byte line (prefetcht0; never faults past the end).
inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i);
}

inline int64_t elem_size(DType t) { return t == DType::f32 ? 4 : t == DType::bf16 ? 2 : 1; }

// dst[0:n] = fp32 value of src[off : off + n] (elements of type t), times mul.
inline void load_row(const void* src, DType t, int64_t off, int64_t n, float* dst, float mul = 1.f) {
  if (t == DType::f32) {
    const float* s = static_cast<const float*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mul;
  } else if (t == DType::bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]) * mul;
  } else {
    const int8_t* s = static_cast<const int8_t*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * mul;
  }
}

// dst[off : off + n] = src[0:n] * mul, stored as type t (f32 or bf16).
inline void store_row(void* dst, DType t, int64_t off, int64_t n, const float* src, float mul = 1.f) {
  if (t == DType::f32) {
    float* d = static_cast<float*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i] * mul);
  }
}

// Last key (exclusive) that query row i may see: causal aligns the last query with the last key.
inline int64_t visible_keys(int64_t i, int64_t Sq, int64_t Sk, bool causal) {
  if (!causal) return Sk;
  int64_t lim = i + (Sk - Sq) + 1;
  return lim < 0 ? 0 : (lim > Sk ? Sk : lim);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace
}  // namespace quark
