#include "search/gather_distance.h"

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("gather_distance", Isa::avx512);

const GatherKernels& gather_kernels() {
#if QUARK_X86
  switch (family_isa(Isa::avx512)) {
    case Isa::scalar: return gather_kernels_scalar();
    case Isa::avx2: return gather_kernels_avx2();
    default: return gather_kernels_avx512();
  }
#else
  return gather_kernels_scalar();
#endif
}

}  // namespace quark
