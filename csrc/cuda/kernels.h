// Host entry points of the CUDA C++ kernels (built with QUARK_CUDA=ON). Pointers are device memory,
// `stream` is the caller's CUDA stream (torch.cuda.current_stream().cuda_stream), every launch is
// asynchronous on it. Each returns an empty string on success or the CUDA error text.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace quark::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Decode attention, one new token per sequence, split-K over the cache (flash-decoding):
//   q (B, Hq, D), k/v caches (B, Hkv, Smax, D) all of dtype `dt`, lengths (B,) int64,
//   out (B, Hq, D) of dtype `dt`, workspace >= decode_workspace_floats(...) fp32.
//   D in {64, 128, 256}; Hq % Hkv == 0; a sequence of length 0 gets zeros.
struct DecodeArgs {
  const void* q;
  const void* k;
  const void* v;
  const int64_t* lengths;
  void* out;
  float* workspace;
  int64_t B, Hq, Hkv, Smax, D;
  float scale;
  int splits;
  DType dt;
};
int decode_splits(int64_t B, int64_t Hq, int64_t Smax);   // split count that fills the device
int64_t decode_workspace_floats(int64_t B, int64_t Hq, int64_t D, int splits);
std::string decode_attention(const DecodeArgs& a, cudaStream_t stream);

// int4 GEMV: out (M, N) = x (M, K) . dequant(W)^T (+ bias), M <= 8, in the format of
// quark.ops.quant / csrc/quant/qlinear.h: data (N, K/2) uint8 packed in blocks of 32 along K (byte
// 16b + j = q[32b + j] | q[32b + j + 16] << 4), scales (N, K/G) fp32, zeros (N, K/G) uint8,
// W[n, k] = (q - z) * s. x and out of dtype `dt`, bias (N,) fp32 or null. G % 32 == 0, K % G == 0.
struct Int4GemvArgs {
  const void* x;
  const uint8_t* data;
  const uint16_t* scales;   // (N, K/G) bf16 bits
  const uint8_t* zeros;
  const float* bias;
  void* out;
  int64_t M, N, K, G;
  DType dt;
};
std::string int4_gemv(const Int4GemvArgs& a, cudaStream_t stream);

}  // namespace quark::cuda
