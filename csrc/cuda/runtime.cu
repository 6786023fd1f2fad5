// The smallest real round trip through the CUDA toolchain: allocate, launch, copy back, check.
// Real GPU kernels (decode attention, int4 GEMV) live beside this file.
#include <cuda_runtime.h>

#include <vector>

#include "cuda/runtime.h"

namespace quark::cuda {

__global__ void iota_kernel(int* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2 * i;
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

bool selftest(int n) {
  if (device_count() == 0 || n <= 0) return false;
  int* dev = nullptr;
  if (cudaMalloc(&dev, n * sizeof(int)) != cudaSuccess) return false;
  iota_kernel<<<(n + 255) / 256, 256>>>(dev, n);
  std::vector<int> host(n);
  bool ok = cudaMemcpy(host.data(), dev, n * sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(dev);
  for (int i = 0; ok && i < n; ++i) ok = host[i] == 2 * i;
  return ok;
}

}  // namespace quark::cuda
