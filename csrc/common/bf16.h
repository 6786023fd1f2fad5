// bf16 <-> fp32 conversions shared by the kernel families (attention caches, quantized linear I/O and
// int4 scales): elements, and vectors where the translation unit's -m flags have them. In an anonymous
// namespace: the header is compiled with different -m flags in each ISA translation unit, and the
// linker must never merge those copies.
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace quark {
namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, like torch's .to(torch.bfloat16); NaN stays NaN (sign kept, quieted).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// bf16 -> fp32 is exact: the bits move to the high half of each 32-bit lane.
#ifdef __AVX2__
inline __m256 bf16x8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif
#ifdef __AVX512F__
inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

}  // namespace
}  // namespace quark
