// AVX2 path: 16 dimensions per step in two ymm accumulators, a scalar tail for d % 8, and the
// rows ahead prefetched whole (graph search is bound by these cache misses, not by FLOPs).
#include <immintrin.h>

#include <algorithm>

#include "search/gather_distance.h"

namespace quark {
namespace {

// Rows are prefetched ahead of use, about 1 KiB of them (16 lines in flight: what one core's miss
// buffers sustain), at least 2 rows: 2 fp32 rows at d=128, 8 sq8 rows.
inline int rows_ahead(int64_t row_bytes) { return static_cast<int>(std::max<int64_t>(2, 1024 / row_bytes)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void prefetch_row(const void* base, int64_t row_bytes, uint32_t row) {
  const char* p = static_cast<const char*>(base) + row * row_bytes;
  for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

inline __m256 load_codes8(const uint8_t* c) {  // 8 codes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}

template <class Row>
void gather(const void* base, int64_t row_bytes, const uint32_t* idx, int n, float* out, Row row) {
  const int ahead = rows_ahead(row_bytes);
  for (int i = 0; i < n && i < ahead; ++i) prefetch_row(base, row_bytes, idx[i]);
  for (int i = 0; i < n; ++i) {
    if (i + ahead < n) prefetch_row(base, row_bytes, idx[i + ahead]);
    out[i] = row(idx[i]);
  }
}

void l2_f32(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const float* b = static_cast<const float*>(base);
  gather(base, d * 4, idx, n, out, [&](uint32_t r) {
    const float* y = b + r * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
      __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(q.q + k), _mm256_loadu_ps(y + k));
      __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(q.q + k + 8), _mm256_loadu_ps(y + k + 8));
      a0 = _mm256_fmadd_ps(t0, t0, a0);
      a1 = _mm256_fmadd_ps(t1, t1, a1);
    }
    for (; k + 8 <= d; k += 8) {
      __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(q.q + k), _mm256_loadu_ps(y + k));
      a0 = _mm256_fmadd_ps(t0, t0, a0);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < d; ++k) { float t = q.q[k] - y[k]; s += t * t; }
    return s;
  });
}

void ip_f32(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const float* b = static_cast<const float*>(base);
  gather(base, d * 4, idx, n, out, [&](uint32_t r) {
    const float* y = b + r * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.q + k), _mm256_loadu_ps(y + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.q + k + 8), _mm256_loadu_ps(y + k + 8), a1);
    }
    for (; k + 8 <= d; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.q + k), _mm256_loadu_ps(y + k), a0);
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < d; ++k) s += q.q[k] * y[k];
    return -s;
  });
}

void l2_sq8(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  gather(base, d, idx, n, out, [&](uint32_t r) {
    const uint8_t* c = b + r * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
      __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(q.q + k), load_codes8(c + k));
      __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(q.q + k + 8), load_codes8(c + k + 8));
      a0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(q.w + k), t0), t0, a0);
      a1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(q.w + k + 8), t1), t1, a1);
    }
    for (; k + 8 <= d; k += 8) {
      __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(q.q + k), load_codes8(c + k));
      a0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(q.w + k), t0), t0, a0);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < d; ++k) { float t = q.q[k] - float(c[k]); s += q.w[k] * t * t; }
    return s;
  });
}

void ip_sq8(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  gather(base, d, idx, n, out, [&](uint32_t r) {
    const uint8_t* c = b + r * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.q + k), load_codes8(c + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.q + k + 8), load_codes8(c + k + 8), a1);
    }
    for (; k + 8 <= d; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.q + k), load_codes8(c + k), a0);
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < d; ++k) s += q.q[k] * float(c[k]);
    return -(s + q.bias);
  });
}

}  // namespace

const GatherKernels& gather_kernels_avx2() {
  static const GatherKernels k{l2_f32, ip_f32, l2_sq8, ip_sq8};
  return k;
}

}  // namespace quark
