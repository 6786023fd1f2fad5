// AVX-512 path: 32 dimensions per step in two zmm accumulators and a masked tail (any d, no scalar
// loop), the rows ahead prefetched whole. sq8 codes widen with vpmovzxbd (16 bytes -> 16 ints).
#include <immintrin.h>

#include <algorithm>

#include "search/gather_distance.h"

namespace quark {
namespace {

// Rows are prefetched ahead of use, about 1 KiB of them (16 lines in flight: what one core's miss
// buffers sustain), at least 2 rows: 2 fp32 rows at d=128, 8 sq8 rows.
inline int rows_ahead(int64_t row_bytes) { return static_cast<int>(std::max<int64_t>(2, 1024 / row_bytes)); }

inline void prefetch_row(const void* base, int64_t row_bytes, uint32_t row) {
  const char* p = static_cast<const char*>(base) + row * row_bytes;
  for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

inline __m512 codes16(const uint8_t* c) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
}

inline __m512 codes16_masked(const uint8_t* c, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, c)));
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

inline __mmask16 tail_mask(int64_t rem) { return static_cast<__mmask16>((1u << rem) - 1); }

void l2_f32(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const float* b = static_cast<const float*>(base);
  gather(base, d * 4, idx, n, out, [&](uint32_t r) {
    const float* y = b + r * d;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
      __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(q.q + k), _mm512_loadu_ps(y + k));
      __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(q.q + k + 16), _mm512_loadu_ps(y + k + 16));
      a0 = _mm512_fmadd_ps(t0, t0, a0);
      a1 = _mm512_fmadd_ps(t1, t1, a1);
    }
    for (; k < d; k += 16) {
      __mmask16 m = d - k >= 16 ? __mmask16(0xffff) : tail_mask(d - k);
      __m512 t0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, q.q + k), _mm512_maskz_loadu_ps(m, y + k));
      a0 = _mm512_fmadd_ps(t0, t0, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  });
}

void ip_f32(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const float* b = static_cast<const float*>(base);
  gather(base, d * 4, idx, n, out, [&](uint32_t r) {
    const float* y = b + r * d;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q.q + k), _mm512_loadu_ps(y + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q.q + k + 16), _mm512_loadu_ps(y + k + 16), a1);
    }
    for (; k < d; k += 16) {
      __mmask16 m = d - k >= 16 ? __mmask16(0xffff) : tail_mask(d - k);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q.q + k), _mm512_maskz_loadu_ps(m, y + k), a0);
    }
    return -_mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  });
}

void l2_sq8(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  gather(base, d, idx, n, out, [&](uint32_t r) {
    const uint8_t* c = b + r * d;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
      __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(q.q + k), codes16(c + k));
      __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(q.q + k + 16), codes16(c + k + 16));
      a0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(q.w + k), t0), t0, a0);
      a1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(q.w + k + 16), t1), t1, a1);
    }
    for (; k < d; k += 16) {
      __mmask16 m = d - k >= 16 ? __mmask16(0xffff) : tail_mask(d - k);
      __m512 t0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, q.q + k), codes16_masked(c + k, m));
      a0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, q.w + k), t0), t0, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  });
}

void ip_sq8(const GatherQuery& q, const void* base, int64_t d, const uint32_t* idx, int n, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  gather(base, d, idx, n, out, [&](uint32_t r) {
    const uint8_t* c = b + r * d;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q.q + k), codes16(c + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q.q + k + 16), codes16(c + k + 16), a1);
    }
    for (; k < d; k += 16) {
      __mmask16 m = d - k >= 16 ? __mmask16(0xffff) : tail_mask(d - k);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q.q + k), codes16_masked(c + k, m), a0);
    }
    return -(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + q.bias);
  });
}

}  // namespace

const GatherKernels& gather_kernels_avx512() {
  static const GatherKernels k{l2_f32, ip_f32, l2_sq8, ip_sq8};
  return k;
}

}  // namespace quark
