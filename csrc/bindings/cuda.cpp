// Bindings of the CUDA C++ kernels; compiled to nothing unless QUARK_CUDA=ON.
//
// Arrays are nb::ndarray on device::cuda, C-contiguous, never converted (.noconvert()): a CPU tensor,
// a strided view or a wrong dtype is a TypeError from nanobind, not a silent copy. The caller passes
// its CUDA stream as an integer (torch.cuda.current_stream().cuda_stream) so the kernels are ordered
// with the surrounding torch work; launches are asynchronous and the GIL is released around them.
#ifdef QUARK_WITH_CUDA
#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings/common.h"
#include "cuda/kernels.h"
#include "cuda/runtime.h"

namespace quark::py {

template <class... Ts>
using CudaArray = nb::ndarray<nb::device::cuda, nb::c_contig, Ts...>;

static cuda::DType float_dtype(const CudaArray<>& a, const char* name) {
  if (a.dtype() == nb::dtype<float>()) return cuda::DType::f32;
  const nb::dlpack::dtype f16{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
  if (a.dtype() == f16) return cuda::DType::f16;
  if (a.dtype() == kBf16) return cuda::DType::bf16;
  value_error(std::string(name) + " must be float32, float16 or bfloat16");
}

static void check_cuda(const std::string& err) {
  if (!err.empty()) value_error("CUDA kernel failed: " + err);
}

static void decode_attention(CudaArray<> q, CudaArray<> k, CudaArray<> v, CudaArray<const int64_t, nb::ndim<1>> lengths,
                             CudaArray<> out, CudaArray<float, nb::ndim<1>> workspace, float scale, int splits,
                             uintptr_t stream) {
  check(q.ndim() == 3 && k.ndim() == 4 && v.ndim() == 4 && out.ndim() == 3,
        "q (B, Hq, D), k/v (B, Hkv, Smax, D), out (B, Hq, D)");
  const int64_t B = q.shape(0), Hq = q.shape(1), D = q.shape(2), Hkv = k.shape(1), Smax = k.shape(2);
  for (size_t i = 0; i < 4; ++i) check(k.shape(i) == v.shape(i), "k and v must have the same shape");
  check(k.shape(0) == (size_t)B && k.shape(3) == (size_t)D, "k must be (B, Hkv, Smax, D) matching q");
  check(Hkv > 0 && Hq % Hkv == 0, "q heads must be a multiple of cache heads");
  for (size_t i = 0; i < 3; ++i) check(out.shape(i) == q.shape(i), "out must have q's shape");
  check((int64_t)lengths.shape(0) == B, "lengths must have shape (B,)");
  const cuda::DType dt = float_dtype(q, "q");
  check(float_dtype(k, "k") == dt && float_dtype(v, "v") == dt && float_dtype(out, "out") == dt,
        "q, k, v, out must share a dtype");
  check(splits >= 1, "splits must be >= 1");
  check((int64_t)workspace.shape(0) >= cuda::decode_workspace_floats(B, Hq, D, splits), "workspace too small");
  cuda::DecodeArgs a{q.data(), k.data(), v.data(), lengths.data(), out.data(), workspace.data(),
                     B, Hq, Hkv, Smax, D, scale, splits, dt};
  std::string err;
  {
    nb::gil_scoped_release release;
    err = cuda::decode_attention(a, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err);
}

static void int4_gemv(CudaArray<> x, CudaArray<const uint8_t, nb::ndim<2>> data, CudaArray<nb::ro, nb::ndim<2>> scales,
                      CudaArray<const uint8_t, nb::ndim<2>> zeros, std::optional<CudaArray<const float, nb::ndim<1>>> bias,
                      CudaArray<> out, int64_t group_size, uintptr_t stream) {
  check(x.ndim() == 2 && out.ndim() == 2, "x (M, K) and out (M, N) must be 2-D");
  const int64_t M = x.shape(0), K = x.shape(1), N = data.shape(0);
  check((int64_t)data.shape(1) * 2 == K, "data must be (N, K/2) packed int4 matching x's K");
  check(group_size > 0 && K % group_size == 0, "group_size must divide K");
  check(scales.dtype() == kBf16, "scales must be bfloat16");
  check((int64_t)scales.shape(0) == N && (int64_t)scales.shape(1) == K / group_size, "scales must be (N, K/G)");
  check((int64_t)zeros.shape(0) == N && (int64_t)zeros.shape(1) == K / group_size, "zeros must be (N, K/G)");
  check((int64_t)out.shape(0) == M && (int64_t)out.shape(1) == N, "out must be (M, N)");
  check(!bias || (int64_t)bias->shape(0) == N, "bias must be (N,)");
  const cuda::DType dt = float_dtype(x, "x");
  check(float_dtype(out, "out") == dt, "out must have x's dtype");
  cuda::Int4GemvArgs a{x.data(), data.data(), static_cast<const uint16_t*>(scales.data()), zeros.data(), bias ? bias->data() : nullptr,
                       out.data(), M, N, K, group_size, dt};
  std::string err;
  {
    nb::gil_scoped_release release;
    err = cuda::int4_gemv(a, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err);
}

void bind_cuda(nb::module_& m) {
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_selftest", &cuda::selftest, nb::arg("n") = 1024,
        nb::call_guard<nb::gil_scoped_release>());
  m.def("cuda_decode_splits", &cuda::decode_splits, nb::arg("B"), nb::arg("Hq"), nb::arg("Smax"));
  m.def("cuda_decode_workspace_floats", &cuda::decode_workspace_floats, nb::arg("B"), nb::arg("Hq"), nb::arg("D"),
        nb::arg("splits"));
  m.def("cuda_decode_attention", &decode_attention, nb::arg("q").noconvert(), nb::arg("k_cache").noconvert(),
        nb::arg("v_cache").noconvert(), nb::arg("lengths").noconvert(), nb::arg("out").noconvert(),
        nb::arg("workspace").noconvert(), nb::arg("scale"), nb::arg("splits"), nb::arg("stream"));
  m.def("cuda_int4_gemv", &int4_gemv, nb::arg("x").noconvert(), nb::arg("data").noconvert(),
        nb::arg("scales").noconvert(), nb::arg("zeros").noconvert(), nb::arg("bias").noconvert().none(),
        nb::arg("out").noconvert(), nb::arg("group_size"), nb::arg("stream"));
}

}  // namespace quark::py
#endif
