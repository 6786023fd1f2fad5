// The per-token ops of a decode step (csrc/layer): rmsnorm and rope_store. Unlike the other
// bindings these take the addresses of tensors (Tensor.data_ptr()) and their sizes, not arrays:
// importing a torch tensor as an nb::ndarray goes through Tensor.__dlpack__, ~10 us of Python per
// tensor, 10-100x the work of these ops, and a decode step calls them 3 times a layer. The caller,
// quark/ops/layer.py, checks devices, dtypes, contiguity, shapes and cache positions first; nothing
// here can, so the functions are private (leading underscore). They keep the GIL: each runs for about
// a microsecond, and handing the GIL to another thread could cost the engine a switch interval (5 ms).
#include "bindings/common.h"
#include "layer/layer.h"

namespace quark::py {

static void* at(uintptr_t p) { return reinterpret_cast<void*>(p); }
static DType dt(int code) { return code == 1 ? DType::bf16 : code == 2 ? DType::i8 : DType::f32; }

void bind_layer(nb::module_& m) {
  m.def(
      "_rmsnorm",
      [](uintptr_t residual, uintptr_t x, uintptr_t weight, uintptr_t out, int dtype, int64_t M, int64_t d,
         float eps) { rmsnorm(at(residual), at(x), at(weight), at(out), dt(dtype), M, d, eps); },
      "quark.ops.layer.rmsnorm on checked tensors' addresses (residual 0: none); dtype 0 float32, 1 bfloat16");
  m.def(
      "_rope_store",
      [](uintptr_t qkv, int dtype, uintptr_t cos, uintptr_t sin, uintptr_t pos, int64_t n, int64_t H, int64_t Hkv,
         int64_t D, int64_t Smax, uintptr_t q_out, int q_dtype, uintptr_t k_cache, uintptr_t v_cache, int cache_dtype,
         uintptr_t k_scale, uintptr_t v_scale) {
        RopeStoreArgs a{at(qkv), dt(dtype), static_cast<const float*>(at(cos)), static_cast<const float*>(at(sin)),
                        static_cast<const int64_t*>(at(pos)), n, H, Hkv, D, Smax, at(q_out), dt(q_dtype),
                        at(k_cache), at(v_cache), dt(cache_dtype), static_cast<float*>(at(k_scale)),
                        static_cast<float*>(at(v_scale))};
        rope_store(a);
      },
      "quark.ops.layer.rope_store on checked tensors' addresses; dtypes 0 float32, 1 bfloat16, 2 int8");
}

}  // namespace quark::py
