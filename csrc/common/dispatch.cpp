// CPU feature detection with CPUID/XGETBV (x86-64) and the process-wide ISA level.
#include "common/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#if QUARK_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace quark {

#if QUARK_X86

static unsigned long long read_xcr0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((unsigned long long)edx << 32) | eax;
}

static bool request_amx_permission() {
  // Linux >= 5.16 keeps AMX tile state off until a process asks for it (ARCH_REQ_XCOMP_PERM).
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (osxsave) {
    unsigned long long xcr0 = read_xcr0();
    f.os_avx = (xcr0 & 0x6) == 0x6;                 // SSE + AVX state
    f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM state
    f.os_amx = (xcr0 & 0x60000) == 0x60000;         // XTILECFG + XTILEDATA
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = b & (1u << 5);
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    f.amx_bf16 = d & (1u << 22);
    f.amx_tile = d & (1u << 24);
    f.amx_int8 = d & (1u << 25);
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
  if (f.amx_tile && f.os_amx) f.os_amx = request_amx_permission();
  return f;
}
#else
static CpuFeatures detect() { return {}; }  // no x86 feature: the scalar path
#endif

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa detected_isa() {
  const CpuFeatures& f = cpu_features();
  if (!(f.os_avx && f.avx2 && f.fma && f.f16c)) return Isa::scalar;
  if (!(f.os_avx512 && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl)) return Isa::avx2;
  if (!(f.avx512_vnni && f.avx512_bf16)) return Isa::avx512;
  if (!(f.os_amx && f.amx_tile && f.amx_int8 && f.amx_bf16)) return Isa::avx512_bf16;
  return Isa::amx;
}

static const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

bool parse_isa(const std::string& name, Isa* out) {
  for (int i = 0; i < 5; ++i)
    if (name == kNames[i]) { *out = static_cast<Isa>(i); return true; }
  return false;
}

static Isa initial_isa() {
  Isa isa = detected_isa();
  if (const char* env = std::getenv("QUARK_ISA")) {
    Isa forced;
    // An unknown or too-high value is reported by the Python layer at import; here it is ignored.
    if (parse_isa(env, &forced) && forced < isa) isa = forced;
  }
  return isa;
}

static std::atomic<int>& isa_cell() {
  static std::atomic<int> cell{static_cast<int>(initial_isa())};
  return cell;
}

Isa current_isa() { return static_cast<Isa>(isa_cell().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (isa > detected_isa())
    throw std::invalid_argument(std::string("isa '") + isa_name(isa) + "' is not supported by this CPU (best: " +
                                isa_name(detected_isa()) + ")");
  isa_cell().store(static_cast<int>(isa));
}

static std::vector<std::pair<std::string, Isa>>& families() {
  static std::vector<std::pair<std::string, Isa>> list;
  return list;
}

static std::mutex& families_mutex() {
  static std::mutex m;
  return m;
}

FamilyRegistration::FamilyRegistration(const char* family, Isa max_isa) {
  std::lock_guard<std::mutex> lock(families_mutex());
  families().emplace_back(family, max_isa);
}

std::vector<std::pair<std::string, Isa>> registered_families() {
  std::lock_guard<std::mutex> lock(families_mutex());
  return families();
}

Isa family_isa(Isa family_max) {
  Isa cur = current_isa();
  return cur < family_max ? cur : family_max;
}

}  // namespace quark
