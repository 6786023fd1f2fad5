// Runtime ISA dispatch (faiss-style): one private header, one source file per ISA per kernel,
// the level chosen once at run time from CPUID, fallback chain down to scalar.
//
// Levels form a chain; a higher level implies every lower one:
//   scalar < avx2 (AVX2+FMA+F16C) < avx512 (F/BW/DQ/VL) < avx512_bf16 (+VNNI+BF16) < amx (+AMX tiles)
// QUARK_ISA=<level> caps the level (it can only lower what the CPU has), so tests reach every path.
//
// Only x86-64 builds have the SIMD variants (CMakeLists.txt compiles the *_avx2/_avx512/_amx sources
// there alone); elsewhere (aarch64, ...) QUARK_X86 is 0, every dispatcher calls its scalar variant and
// detected_isa() is scalar.
#pragma once
#include <string>
#include <vector>

#if defined(__x86_64__)
#define QUARK_X86 1
#else
#define QUARK_X86 0
#endif

namespace quark {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool avx512_vnni = false, avx512_bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 / arch_prctl say the OS saves the state
};

const CpuFeatures& cpu_features();
Isa detected_isa();      // best level this CPU and OS support
Isa current_isa();       // detected, capped by QUARK_ISA or set_isa(); read once per kernel call
void set_isa(Isa isa);   // cap for tests; raises ValueError above detected_isa()
const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

// Each kernel family registers the highest level it has a variant for, so info() can report the
// path every family actually runs: min(current_isa(), family max).
struct FamilyRegistration {
  FamilyRegistration(const char* family, Isa max_isa);
};
std::vector<std::pair<std::string, Isa>> registered_families();
Isa family_isa(Isa family_max);

}  // namespace quark
