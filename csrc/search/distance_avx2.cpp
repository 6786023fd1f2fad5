// AVX2 path: the shared 6 x 16 fp32 microkernel (common/gemm_f32_avx2.h) under the blocked
// distance driver.
#include "common/gemm_f32_avx2.h"
#include "search/distance_blocked.h"

namespace quark {

void pairwise_distance_avx2(const DistanceArgs& a) { run_blocked<GemmTileAvx2>(a); }

}  // namespace quark
