#include "search/gather_distance.h"

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("gather_distance", Isa::avx512);

const GatherKernels& gather_kernels() {
  switch (family_isa(Isa::avx512)) {
    case Isa::scalar: return gather_kernels_scalar();
    case Isa::avx2: return gather_kernels_avx2();
    default: return gather_kernels_avx512();
  }
}

}  // namespace quark
