// AVX-512 path: the shared 8 x 32 fp32 microkernel (common/gemm_f32_avx512.h) under the blocked
// distance driver.
#include "common/gemm_f32_avx512.h"
#include "search/distance_blocked.h"

namespace quark {

void pairwise_distance_avx512(const DistanceArgs& a) { run_blocked<GemmTileAvx512>(a); }

}  // namespace quark
