// Attention kernels: prefill forward/backward and KV-cache decode. The Python layer
// (quark/ops/attention.py) validates first and raises errors naming the argument; the checks here
// keep direct callers of quark._C from crashing.
#include <nanobind/stl/optional.h>

#include <optional>

#include "attention/attention.h"
#include "bindings/common.h"

namespace quark::py {

using Any = CArray<>;                               // fp32 or bf16, checked below
using F32 = CArray<float>;
using CF32 = CArray<const float>;

static DType float_dtype(const Any& x, const char* name) {
  if (x.dtype() == nb::dtype<float>()) return DType::f32;
  if (x.dtype() == kBf16) return DType::bf16;
  value_error(std::string(name) + " must be float32 or bfloat16");
}

static std::string shape_str(const Any& x) {
  std::string s = "(";
  for (size_t i = 0; i < x.ndim(); ++i) s += (i ? ", " : "") + std::to_string(x.shape(i));
  return s + ")";
}

static void check_shape(const Any& x, const char* name, std::initializer_list<int64_t> want) {
  bool ok = x.ndim() == want.size();
  size_t i = 0;
  for (int64_t w : want) ok = ok && (int64_t)x.shape(i++) == w;
  if (!ok) value_error(std::string(name) + " has shape " + shape_str(x) + ", which does not match q/k/v");
}

template <class A>
static void check_len(const A& x, const char* name, int64_t n) {
  check((int64_t)x.size() == n, std::string(name) + " has " + std::to_string(x.size()) + " elements, expected " +
                                    std::to_string(n));
}

struct Dims {
  int64_t B, Hq, Hkv, Sq, Sk, D;
};

static Dims qkv_dims(const Any& q, const Any& k, const Any& v, DType* dt) {
  check(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "q, k, v must be 4-D (B, H, S, D)");
  Dims d{(int64_t)q.shape(0), (int64_t)q.shape(1), (int64_t)k.shape(1), (int64_t)q.shape(2), (int64_t)k.shape(2),
         (int64_t)q.shape(3)};
  check_shape(k, "k", {d.B, d.Hkv, d.Sk, d.D});
  check_shape(v, "v", {d.B, d.Hkv, d.Sk, d.D});
  check(d.Hkv > 0 && d.Hq % d.Hkv == 0, "q heads must be a multiple of k/v heads");
  *dt = float_dtype(q, "q");
  check(float_dtype(k, "k") == *dt && float_dtype(v, "v") == *dt, "q, k, v must share a dtype");
  return d;
}

void bind_attention(nb::module_& m) {
  m.def(
      "attention_forward",
      [](Any q, Any k, Any v, Any out, std::optional<F32> lse, float scale, bool causal) {
        DType dt;
        Dims d = qkv_dims(q, k, v, &dt);
        check_shape(out, "out", {d.B, d.Hq, d.Sq, d.D});
        check(float_dtype(out, "out") == dt, "out must have the dtype of q");
        if (lse) check_len(*lse, "lse", d.B * d.Hq * d.Sq);
        AttentionFwdArgs a{q.data(), k.data(), v.data(), dt, d.B, d.Hq, d.Hkv, d.Sq, d.Sk, d.D, scale, causal,
                           out.data(), lse ? lse->data() : nullptr};
        nb::gil_scoped_release release;
        attention_forward(a);
      },
      nb::arg("q").noconvert(), nb::arg("k").noconvert(), nb::arg("v").noconvert(), nb::arg("out").noconvert(),
      nb::arg("lse").noconvert().none(), nb::arg("scale"), nb::arg("causal"),
      "out = softmax(scale * q k^T [causal mask]) v; lse (B, Hq, Sq) float32 receives the row log-sum-exp");
  m.def(
      "attention_backward",
      [](Any q, Any k, Any v, Any out, Any dout, CF32 lse, F32 dq, F32 dk, F32 dv, float scale, bool causal) {
        DType dt;
        Dims d = qkv_dims(q, k, v, &dt);
        check_shape(out, "out", {d.B, d.Hq, d.Sq, d.D});
        check_shape(dout, "dout", {d.B, d.Hq, d.Sq, d.D});
        check(float_dtype(out, "out") == dt && float_dtype(dout, "dout") == dt, "out and dout must have the dtype of q");
        check_len(lse, "lse", d.B * d.Hq * d.Sq);
        check_len(dq, "dq", d.B * d.Hq * d.Sq * d.D);
        check_len(dk, "dk", d.B * d.Hkv * d.Sk * d.D);
        check_len(dv, "dv", d.B * d.Hkv * d.Sk * d.D);
        AttentionBwdArgs a{q.data(), k.data(), v.data(), out.data(), dout.data(), dt, lse.data(),
                           d.B, d.Hq, d.Hkv, d.Sq, d.Sk, d.D, scale, causal, dq.data(), dk.data(), dv.data()};
        nb::gil_scoped_release release;
        attention_backward(a);
      },
      nb::arg("q").noconvert(), nb::arg("k").noconvert(), nb::arg("v").noconvert(), nb::arg("out").noconvert(),
      nb::arg("dout").noconvert(), nb::arg("lse").noconvert(), nb::arg("dq").noconvert(), nb::arg("dk").noconvert(),
      nb::arg("dv").noconvert(), nb::arg("scale"), nb::arg("causal"),
      "float32 gradients dq, dk, dv of attention_forward (recomputes the scores; no S^2 buffer)");
  m.def(
      "decode_attention",
      [](Any q, Any k_cache, Any v_cache, std::optional<CF32> k_scale, std::optional<CF32> v_scale,
         CArray<const int64_t, nb::ndim<1>> lengths, Any out, float scale) {
        check(q.ndim() == 3 && k_cache.ndim() == 4, "q must be (B, Hq, D) and the caches (B, Hkv, Smax, D)");
        const int64_t B = q.shape(0), Hq = q.shape(1), D = q.shape(2);
        const int64_t Hkv = k_cache.shape(1), Smax = k_cache.shape(2);
        check_shape(k_cache, "k_cache", {B, Hkv, Smax, D});
        check_shape(v_cache, "v_cache", {B, Hkv, Smax, D});
        check(Hkv > 0 && Hq % Hkv == 0, "q heads must be a multiple of cache heads");
        check_shape(out, "out", {B, Hq, D});
        const DType qt = float_dtype(q, "q");
        check(float_dtype(out, "out") == qt, "out must have the dtype of q");
        DType ct;
        if (k_cache.dtype() == nb::dtype<int8_t>()) {
          ct = DType::i8;
          check(v_cache.dtype() == nb::dtype<int8_t>(), "k_cache and v_cache must share a dtype");
          check(k_scale.has_value() && v_scale.has_value(), "an int8 cache needs k_scale and v_scale");
          check_len(*k_scale, "k_scale", B * Hkv * Smax);
          check_len(*v_scale, "v_scale", B * Hkv * Smax);
        } else {
          ct = float_dtype(k_cache, "k_cache");
          check(float_dtype(v_cache, "v_cache") == ct, "k_cache and v_cache must share a dtype");
          check(!k_scale && !v_scale, "k_scale / v_scale apply to int8 caches only");
        }
        check_len(lengths, "cache_seqlens", B);
        for (int64_t b = 0; b < B; ++b)
          check(lengths(b) >= 0 && lengths(b) <= Smax,
                "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(lengths(b)) +
                    " is outside [0, " + std::to_string(Smax) + "]");
        DecodeArgs a{q.data(), qt, k_cache.data(), v_cache.data(), ct,
                     k_scale ? k_scale->data() : nullptr, v_scale ? v_scale->data() : nullptr, lengths.data(),
                     B, Hq, Hkv, Smax, D, scale, out.data()};
        nb::gil_scoped_release release;
        decode_attention(a);
      },
      nb::arg("q").noconvert(), nb::arg("k_cache").noconvert(), nb::arg("v_cache").noconvert(),
      nb::arg("k_scale").noconvert().none(), nb::arg("v_scale").noconvert().none(),
      nb::arg("cache_seqlens").noconvert(), nb::arg("out").noconvert(), nb::arg("scale"),
      "one query per sequence over a KV cache (float32 / bfloat16 / int8 with per-token scales)");
}

}  // namespace quark::py
