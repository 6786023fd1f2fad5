// Decode attention in CUDA C++ (flash-decoding), the hand-written twin of
// python/quark/ops/triton/decode_attention.py.
//
// Stage 1, grid (B * Hq, splits), 4 warps: a block owns one query head and one slice of the cache.
// Each warp walks every 4th key of the slice; a key row is read by the 32 lanes together (lane l
// holds D/32 contiguous elements: 8 B per lane for bf16 D=128, one coalesced 256 B row per warp),
// the score is a warp reduction, and the warp keeps its own online softmax (max m, sum l, output
// acc in registers). The 4 warps merge through shared memory into a partial output normalised by
// its own sum, plus its log-sum-exp. Stage 2, grid (B * Hq): merge the slices by log-sum-exp.
// GQA: query heads of one group re-read the same K/V rows, which L2 serves.
#include <algorithm>
#include <cfloat>

#include "cuda/dtype.cuh"
#include "cuda/kernels.h"

namespace quark::cuda {
namespace {

constexpr int kWarps = 4;

template <class T, int EPL>   // EPL = D / 32 elements per lane
__global__ void __launch_bounds__(kWarps * 32) decode_split_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int64_t* __restrict__ lengths,
    float* __restrict__ part_o, float* __restrict__ part_lse, int64_t Hq, int64_t Hkv, int64_t Smax, int splits,
    int64_t split_len, float scale_log2) {
  constexpr int D = EPL * 32;
  const int64_t bh = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t len = lengths[b];
  const int64_t lo = split * split_len;
  const int64_t hi = min(lo + split_len, len);

  float qr[EPL];
  const T* qp = q + bh * D + lane * EPL;
#pragma unroll
  for (int e = 0; e < EPL; ++e) qr[e] = to_float(qp[e]) * scale_log2;     // scores in the log2 domain

  const T* kb = k + (b * Hkv + hk) * Smax * D + lane * EPL;
  const T* vb = v + (b * Hkv + hk) * Smax * D + lane * EPL;
  float m = -INFINITY, l = 0.f, acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  for (int64_t s = lo + warp; s < hi; s += kWarps) {
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) dot += qr[e] * to_float(kb[s * D + e]);
    dot = warp_sum(dot);
    const float m_new = fmaxf(m, dot);
    const float alpha = exp2f(m - m_new), p = exp2f(dot - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * alpha + p * to_float(vb[s * D + e]);
    m = m_new;
  }

  // Merge the warps: shared max, rescale, sum.
  __shared__ float sm_m[kWarps], sm_l[kWarps], sm_acc[kWarps][D];
  if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
#pragma unroll
  for (int e = 0; e < EPL; ++e) sm_acc[warp][lane * EPL + e] = acc[e];
  __syncthreads();
  if (warp == 0) {
    float mt = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mt = fmaxf(mt, sm_m[w]);
    const float ms = mt == -INFINITY ? 0.f : mt;
    float lt = 0.f, out[EPL];
#pragma unroll
    for (int e = 0; e < EPL; ++e) out[e] = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(sm_m[w] - ms);      // 0 for a warp that saw no key
      lt += sm_l[w] * f;
#pragma unroll
      for (int e = 0; e < EPL; ++e) out[e] += sm_acc[w][lane * EPL + e] * f;
    }
    const int64_t row = bh * splits + split;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) part_o[row * D + lane * EPL + e] = out[e] * inv;
    if (lane == 0) part_lse[row] = lt > 0.f ? ms + log2f(lt) : -INFINITY;
  }
}

template <class T>
__global__ void decode_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                      T* __restrict__ out, int splits, int D) {
  const int64_t row = blockIdx.x;
  const float* lse = part_lse + row * splits;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, lse[s]);
  const float ms = m == -INFINITY ? 0.f : m;
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += exp2f(lse[s] - ms);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += part_o[(row * splits + s) * D + d] * exp2f(lse[s] - ms);
    out[row * D + d] = from_float<T>(o * inv);
  }
}

template <class T>
std::string launch(const DecodeArgs& a, cudaStream_t stream) {
  const int64_t split_len = (a.Smax + a.splits - 1) / a.splits;
  const dim3 grid((unsigned)(a.B * a.Hq), (unsigned)a.splits);
  float* part_o = a.workspace;
  float* part_lse = a.workspace + a.B * a.Hq * a.splits * a.D;
  const float sl2 = a.scale * 1.4426950408889634f;
  auto args = [&](auto kernel) {
    kernel<<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                              static_cast<const T*>(a.v), a.lengths, part_o, part_lse, a.Hq, a.Hkv,
                                              a.Smax, a.splits, split_len, sl2);
  };
  switch (a.D) {
    case 64: args(decode_split_kernel<T, 2>); break;
    case 128: args(decode_split_kernel<T, 4>); break;
    case 256: args(decode_split_kernel<T, 8>); break;
    default: return "head_dim must be 64, 128 or 256 for the CUDA decode kernel";
  }
  decode_combine_kernel<T><<<(unsigned)(a.B * a.Hq), 128, 0, stream>>>(part_o, part_lse, static_cast<T*>(a.out),
                                                                        a.splits, (int)a.D);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

int decode_splits(int64_t B, int64_t Hq, int64_t Smax) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // ~2 blocks per SM in total, slices of at least 64 keys, at most 64 slices.
  const int64_t want = (2 * sms + B * Hq - 1) / (B * Hq);
  const int64_t by_len = (Smax + 63) / 64;
  return (int)std::max<int64_t>(1, std::min<int64_t>({want, by_len, 64}));
}

int64_t decode_workspace_floats(int64_t B, int64_t Hq, int64_t D, int splits) {
  return B * Hq * splits * (D + 1);
}

std::string decode_attention(const DecodeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.Hq == 0) return {};
  switch (a.dt) {
    case DType::f32: return launch<float>(a, stream);
    case DType::f16: return launch<__half>(a, stream);
    case DType::bf16: return launch<__nv_bfloat16>(a, stream);
  }
  return "unsupported dtype";
}

}  // namespace quark::cuda
