// bf16 <-> fp32 element conversions shared by the kernel families (attention caches, quantized linear
// I/O). In an anonymous namespace: the header is compiled with different -m flags in each ISA
// translation unit, and the linker must never merge those copies.
#pragma once
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

}  // namespace
}  // namespace quark
