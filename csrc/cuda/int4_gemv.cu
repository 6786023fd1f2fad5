// int4 GEMV in CUDA C++: out (M, N) = x (M, K) . dequant(W)^T, M <= 8 (decode), weights in the
// quark.ops.quant int4 format (csrc/quant/qlinear.h). Memory-bound: the weights are the traffic.
//
// One warp per output row, 4 rows per block. Lane l of a warp takes packing block b = 32 i + l of
// the row: one 16-byte load (uint4) holds exactly one block, 32 nibbles, byte j = q[32b + j] (low)
// | q[32b + j + 16] (high), so a warp streams 512 contiguous bytes per step. A block never straddles
// a quantization group (G % 32 == 0), so each lane applies its group's scale and zero once:
//     sum_j (q_j - z) s x_j = s * (sum_j q_j x_j - z * sum_j x_j).
// x is read through the read-only cache (all rows of the grid share it). Per-lane sums are reduced
// with warp shuffles; lane 0 writes out[m, n] (+ bias).
#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/kernels.h"

namespace quark::cuda {
namespace {

constexpr int kRowsPerBlock = 4;

template <class T, int M>
__global__ void __launch_bounds__(kRowsPerBlock * 32) int4_gemv_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ data, const uint16_t* __restrict__ scales,
    const uint8_t* __restrict__ zeros, const float* __restrict__ bias, T* __restrict__ out, int64_t N, int64_t K,
    int64_t G) {
  const int lane = threadIdx.x % 32;
  const int64_t n = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const int64_t n_blocks = K / 32, n_groups = K / G;
  const uint4* row = reinterpret_cast<const uint4*>(data + n * (K / 2));
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t blk = lane; blk < n_blocks; blk += 32) {
    const uint4 packed = __ldg(row + blk);
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    const int64_t g = blk * 32 / G;
    const float s = __uint_as_float((uint32_t)__ldg(scales + n * n_groups + g) << 16);   // bf16 -> fp32
    const float z = (float)__ldg(zeros + n * n_groups + g);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const T* xb = x + m * K + blk * 32;
      float dot = 0.f, xsum = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int byte = 0; byte < 4; ++byte) {
          const uint32_t bits = words[w] >> (8 * byte);
          const int j = 4 * w + byte;
          const float xl = to_float(xb[j]), xh = to_float(xb[j + 16]);
          dot += (float)(bits & 15u) * xl + (float)((bits >> 4) & 15u) * xh;
          xsum += xl + xh;
        }
      }
      acc[m] += s * (dot - z * xsum);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0) out[m * N + n] = from_float<T>(total + (bias ? bias[n] : 0.f));
  }
}

template <class T, int M>
void launch_m(const Int4GemvArgs& a, cudaStream_t stream) {
  const unsigned blocks = (unsigned)((a.N + kRowsPerBlock - 1) / kRowsPerBlock);
  int4_gemv_kernel<T, M><<<blocks, kRowsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(a.x), a.data, a.scales, a.zeros, a.bias, static_cast<T*>(a.out), a.N, a.K, a.G);
}

template <class T>
std::string launch(const Int4GemvArgs& a, cudaStream_t stream) {
  switch (a.M) {
    case 1: launch_m<T, 1>(a, stream); break;
    case 2: launch_m<T, 2>(a, stream); break;
    case 3: launch_m<T, 3>(a, stream); break;
    case 4: launch_m<T, 4>(a, stream); break;
    case 5: launch_m<T, 5>(a, stream); break;
    case 6: launch_m<T, 6>(a, stream); break;
    case 7: launch_m<T, 7>(a, stream); break;
    case 8: launch_m<T, 8>(a, stream); break;
    default: return "the CUDA int4 GEMV takes 1 to 8 rows of x";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

std::string int4_gemv(const Int4GemvArgs& a, cudaStream_t stream) {
  if (a.G <= 0 || a.G % 32 || a.K % a.G) return "group size must be a multiple of 32 dividing K";
  if (a.N == 0) return {};
  switch (a.dt) {
    case DType::f32: return launch<float>(a, stream);
    case DType::f16: return launch<__half>(a, stream);
    case DType::bf16: return launch<__nv_bfloat16>(a, stream);
  }
  return "unsupported dtype";
}

}  // namespace quark::cuda
