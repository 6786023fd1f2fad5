// The per-token ops of a decode step (csrc/layer): rmsnorm, rope_store, silu_mul. quark/ops/layer.py
// checks first and names the argument; the checks here keep direct callers from writing out of bounds.
// They keep the GIL: each runs for about a microsecond, and handing the GIL to another thread could
// make the engine wait a whole switch interval (5 ms) to get it back.
#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings/common.h"
#include "layer/layer.h"

namespace quark::py {

using Any = CArray<>;

static DType dtype_of(const Any& x, const char* name, bool int8_ok = false) {
  if (x.dtype() == nb::dtype<float>()) return DType::f32;
  if (x.dtype() == kBf16) return DType::bf16;
  if (int8_ok && x.dtype() == nb::dtype<int8_t>()) return DType::i8;
  value_error(std::string(name) + (int8_ok ? " must be float32, bfloat16 or int8" : " must be float32 or bfloat16"));
}

static int64_t dim(const Any& x, size_t i) { return i < x.ndim() ? (int64_t)x.shape(i) : -1; }

void bind_layer(nb::module_& m) {
  m.def(
      "rmsnorm",
      [](std::optional<Any> residual, Any x, Any weight, Any out, float eps) {
        check(x.ndim() == 2, "x must be 2-D (M, d)");
        const int64_t M = dim(x, 0), d = dim(x, 1);
        const DType dt = dtype_of(x, "x");
        check(weight.ndim() == 1 && dim(weight, 0) == d && dtype_of(weight, "weight") == dt,
              "weight must be (d,) in x's dtype");
        check(out.ndim() == 2 && dim(out, 0) == M && dim(out, 1) == d && dtype_of(out, "out") == dt,
              "out must have x's shape and dtype");
        if (residual)
          check(residual->ndim() == 2 && dim(*residual, 0) == M && dim(*residual, 1) == d &&
                    dtype_of(*residual, "residual") == dt, "residual must have x's shape and dtype");
        const void* r = residual ? residual->data() : nullptr;
        rmsnorm(r, x.data(), weight.data(), out.data(), dt, M, d, eps);
      },
      nb::arg("residual").noconvert().none(), nb::arg("x").noconvert(), nb::arg("weight").noconvert(),
      nb::arg("out").noconvert(), nb::arg("eps"),
      "x += residual (when given), then out = x / sqrt(mean(x^2) + eps) * weight, rows of x");
  m.def(
      "rope_store",
      [](Any qkv, CArray<const float> cos, CArray<const float> sin, CArray<const int64_t, nb::ndim<1>> pos, Any q_out,
         Any k_cache, Any v_cache, std::optional<CArray<float>> k_scale, std::optional<CArray<float>> v_scale) {
        check(q_out.ndim() == 3 && k_cache.ndim() == 4 && qkv.ndim() == 2,
              "qkv must be (n, (H + 2 Hkv) D), q_out (n, H, D) and the caches (slots, Hkv, Smax, D)");
        const int64_t n = dim(q_out, 0), H = dim(q_out, 1), D = dim(q_out, 2);
        const int64_t slots = dim(k_cache, 0), Hkv = dim(k_cache, 1), Smax = dim(k_cache, 2);
        check(D > 0 && D % 2 == 0 && D <= 1024 && dim(k_cache, 3) == D, "head_dim must be even, <= 1024, and agree");
        check(v_cache.ndim() == 4 && dim(v_cache, 0) == slots && dim(v_cache, 1) == Hkv && dim(v_cache, 2) == Smax &&
                  dim(v_cache, 3) == D, "k_cache and v_cache must have the same shape");
        check(dim(qkv, 0) == n && dim(qkv, 1) == (H + 2 * Hkv) * D, "qkv must be (n, (H + 2 Hkv) D)");
        check(n <= slots, "more tokens than cache slots");
        check((int64_t)cos.size() == n * D / 2 && (int64_t)sin.size() == n * D / 2, "cos and sin must be (n, D/2)");
        check((int64_t)pos.shape(0) == n, "pos must have one position per token");
        for (int64_t b = 0; b < n; ++b) check(pos(b) >= 0 && pos(b) < Smax, "pos outside the cache");
        const DType dt = dtype_of(qkv, "qkv"), ct = dtype_of(k_cache, "k_cache", true);
        check(dtype_of(v_cache, "v_cache", true) == ct, "k_cache and v_cache must share a dtype");
        const bool i8 = ct == DType::i8;
        check(i8 == (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs k_scale and v_scale, others none");
        if (i8)
          check((int64_t)k_scale->size() == slots * Hkv * Smax && (int64_t)v_scale->size() == slots * Hkv * Smax,
                "k_scale and v_scale must be (slots, Hkv, Smax)");
        RopeStoreArgs a{qkv.data(), dt, cos.data(), sin.data(), pos.data(), n, H, Hkv, D, Smax,
                        q_out.data(), dtype_of(q_out, "q_out"), k_cache.data(), v_cache.data(), ct,
                        i8 ? k_scale->data() : nullptr, i8 ? v_scale->data() : nullptr};
        rope_store(a);
      },
      nb::arg("qkv").noconvert(), nb::arg("cos").noconvert(), nb::arg("sin").noconvert(), nb::arg("pos").noconvert(),
      nb::arg("q_out").noconvert(), nb::arg("k_cache").noconvert(), nb::arg("v_cache").noconvert(),
      nb::arg("k_scale").noconvert().none(), nb::arg("v_scale").noconvert().none(),
      "rotate q and k of each token; q -> q_out, k and v -> cache[b, :, pos[b]] (int8 with per-row scales)");
  m.def(
      "silu_mul",
      [](Any gu, Any out) {
        check(gu.ndim() == 2 && out.ndim() == 2 && dim(gu, 0) == dim(out, 0) && dim(gu, 1) == 2 * dim(out, 1),
              "gu must be (M, 2F) and out (M, F)");
        const DType dt = dtype_of(gu, "gu");
        check(dtype_of(out, "out") == dt, "out must have gu's dtype");
        silu_mul(gu.data(), out.data(), dt, dim(out, 0), dim(out, 1));
      },
      nb::arg("gu").noconvert(), nb::arg("out").noconvert(), "out = silu(gu[:, :F]) * gu[:, F:]");
}

}  // namespace quark::py
