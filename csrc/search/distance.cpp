#include "search/distance.h"

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("distance", Isa::avx512);

void pairwise_distance(const DistanceArgs& a) {
  if (a.nq == 0 || a.nb == 0) return;
#if QUARK_X86
  switch (family_isa(Isa::avx512)) {
    case Isa::scalar: return pairwise_distance_scalar(a);
    case Isa::avx2: return pairwise_distance_avx2(a);
    default: return pairwise_distance_avx512(a);
  }
#else
  return pairwise_distance_scalar(a);
#endif
}

}  // namespace quark
