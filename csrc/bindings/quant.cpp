// Bindings of the quantized linear family (csrc/quant). quark.ops.qlinear checks and shapes the
// arguments first; the checks here keep direct callers of quark._C from reading out of bounds.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "bindings/common.h"
#include "quant/gemv_bf16.h"
#include "quant/gemv_f32.h"
#include "quant/qlinear.h"

namespace quark::py {

using Mat = CArray<const float, nb::ndim<2>>;
using OutMat = CArray<float, nb::ndim<2>>;
using Vec = CArray<const float, nb::ndim<1>>;

static std::string shape_str(int64_t a, int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

// x (..., K) and out (..., N) with the same leading dims, read as (M, K) and (M, N): callers pass a
// decode step's (B, T, K) activations as they are, without a reshape on the Python side. Each is
// float32 or bfloat16.
using Rows = CArray<nb::ro>;
using OutRows = CArray<>;

static bool is_bf16(const nb::dlpack::dtype& t, const char* name) {
  if (t == nb::dtype<float>()) return false;
  check(t == kBf16, std::string(name) + " must be float32 or bfloat16");
  return true;
}

static QLinearArgs make_args(const Rows& x, QWeight w, const std::optional<Vec>& bias, OutRows& out) {
  const bool x16 = is_bf16(x.dtype(), "x"), out16 = is_bf16(out.dtype(), "out");
  const size_t nd = x.ndim();
  check(nd >= 1 && x.shape(nd - 1) == static_cast<size_t>(w.k),
        "x must have last dimension K=" + std::to_string(w.k));
  bool same_lead = out.ndim() == nd && out.shape(nd - 1) == static_cast<size_t>(w.n);
  int64_t m = 1;
  for (size_t d = 0; d + 1 < nd; ++d) {
    same_lead = same_lead && out.shape(d) == x.shape(d);
    m *= static_cast<int64_t>(x.shape(d));
  }
  check(same_lead, "out must have x's leading dimensions and last dimension N=" + std::to_string(w.n));
  if (bias) check(bias->shape(0) == static_cast<size_t>(w.n), "bias must have shape (" + std::to_string(w.n) + ",)");
  QLinearArgs a{x16 ? nullptr : static_cast<const float*>(x.data()), m, w, bias ? bias->data() : nullptr,
                out16 ? nullptr : static_cast<float*>(out.data())};
  if (x16) a.x16 = static_cast<const uint16_t*>(x.data());
  if (out16) a.out16 = static_cast<uint16_t*>(out.data());
  return a;
}

// A QuantizedTensor's packed arrays, checked and imported once: quark.ops.quant keeps one per
// QuantizedTensor, so a call converts only x, out and bias. Each array import goes through torch's
// __dlpack__ (~2 us warm; ~10 us cold, and a decode step's GEMV runs cold: the previous layer has
// just streamed megabytes through the caches). The arrays held here keep the tensors alive.
using Mat2 = CArray<nb::ro, nb::ndim<2>>;

struct PackedWeight {
  Mat2 data;
  CArray<nb::ro> scales;
  std::optional<Mat2> zeros;
  QWeight w;
  bool w8a8;
};

static PackedWeight pack_weight(const std::string& scheme, Mat2 data, CArray<nb::ro> scales, std::optional<Mat2> zeros,
                                int64_t group) {
  const int64_t N = data.shape(0);
  // The kernels divide by the row length and by the group (K itself for int8): no empty rows.
  check(data.shape(1) >= 1, "data must have at least one column (K >= 1), got shape " + shape_str(N, 0));
  if (scheme == "int8" || scheme == "w8a8") {
    const int64_t K = data.shape(1);
    check(data.dtype() == nb::dtype<int8_t>(), "int8 data must be int8");
    check(scales.dtype() == nb::dtype<float>() && scales.ndim() == 1 && scales.shape(0) == static_cast<size_t>(N),
          "int8 scales must be float32 of shape (" + std::to_string(N) + ",)");
    check(!zeros, "int8 has no zero points");
    QWeight w{QScheme::int8, static_cast<const uint8_t*>(data.data()), static_cast<const float*>(scales.data()),
              nullptr, nullptr, N, K, K};
    return {data, scales, std::nullopt, w, scheme == "w8a8"};
  }
  check(scheme == "int4", "scheme must be int8, w8a8 or int4");
  const int64_t K = 2 * static_cast<int64_t>(data.shape(1));
  check(data.dtype() == nb::dtype<uint8_t>(), "int4 data must be uint8 (two values per byte)");
  check(group == 32 || group == 64 || group == 128, "group must be 32, 64 or 128");
  check(K % group == 0, "K=" + std::to_string(K) + " is not a multiple of group " + std::to_string(group));
  check(scales.dtype() == kBf16, "int4 scales must be bfloat16");
  check(scales.ndim() == 2 && scales.shape(0) == static_cast<size_t>(N) && scales.shape(1) == static_cast<size_t>(K / group),
        "scales must have shape " + shape_str(N, K / group));
  check(zeros && zeros->dtype() == nb::dtype<uint8_t>(), "int4 zeros must be uint8");
  check(zeros->shape(0) == scales.shape(0) && zeros->shape(1) == scales.shape(1),
        "zeros must have shape " + shape_str(N, K / group));
  QWeight w{QScheme::int4, static_cast<const uint8_t*>(data.data()), nullptr,
            static_cast<const uint16_t*>(scales.data()), static_cast<const uint8_t*>(zeros->data()), N, K, group};
  return {data, scales, zeros, w, false};
}

void bind_quant(nb::module_& m) {
  nb::class_<PackedWeight>(m, "PackedWeight",
                           "Packed quantized weights checked once for qlinear (made by quark.ops.quant; use that)")
      .def(nb::new_(&pack_weight), nb::arg("scheme"), nb::arg("data").noconvert(), nb::arg("scales").noconvert(),
           nb::arg("zeros").noconvert().none(), nb::arg("group"))
      .def_prop_ro("shape", [](const PackedWeight& p) { return nb::make_tuple(p.w.n, p.w.k); });
  m.def(
      "qlinear",
      [](Rows x, const PackedWeight& w, std::optional<Vec> bias, OutRows out, bool bf16_compute) {
        QLinearArgs a = make_args(x, w.w, bias, out);
        a.bf16_compute = bf16_compute;
        nb::gil_scoped_release release;
        if (w.w8a8) qlinear_w8a8(a);
        else qlinear_f32(a);
      },
      nb::arg("x").noconvert(), nb::arg("w"), nb::arg("bias").noconvert().none(), nb::arg("out").noconvert(),
      nb::arg("bf16_compute") = false,
      "out (..., N) = x (..., K) . dequant(w)^T + bias, x and out float32 or bfloat16 (w8a8 also quantizes x per "
      "row to int8); bf16_compute: x holds bf16 values and out will be rounded to bf16, so the AMX GEMM may round "
      "int4 weights to bf16");
  m.def(
      "gemv_f32",
      [](Mat x, Mat weight, std::optional<Vec> bias, OutMat out) {
        const int64_t N = weight.shape(0), K = weight.shape(1);
        check(x.shape(1) == static_cast<size_t>(K),
              "x has K=" + std::to_string(x.shape(1)) + " but the weight has K=" + std::to_string(K));
        check(out.shape(0) == x.shape(0) && out.shape(1) == static_cast<size_t>(N),
              "out must have shape " + shape_str(x.shape(0), N));
        if (bias) check(bias->shape(0) == static_cast<size_t>(N), "bias must have shape (" + std::to_string(N) + ",)");
        GemvF32Args a{x.data(), weight.data(), bias ? bias->data() : nullptr, out.data(),
                      static_cast<int64_t>(x.shape(0)), N, K};
        nb::gil_scoped_release release;
        gemv_f32(a);
      },
      nb::arg("x").noconvert(), nb::arg("weight").noconvert(), nb::arg("bias").noconvert().none(),
      nb::arg("out").noconvert(), "out (M, N) = x (M, K) . weight (N, K)^T + bias, streamed for small M");
  m.def(
      "gemv_bf16",
      [](CArray<nb::ro, nb::ndim<2>> x, CArray<nb::ro, nb::ndim<2>> weight, std::optional<CArray<nb::ro, nb::ndim<1>>> bias,
         CArray<nb::ndim<2>> out) {
        check(x.dtype() == kBf16, "x must be bfloat16");
        check(weight.dtype() == kBf16, "weight must be bfloat16");
        check(out.dtype() == kBf16, "out must be bfloat16");
        const int64_t N = weight.shape(0), K = weight.shape(1);
        check(x.shape(1) == static_cast<size_t>(K),
              "x has K=" + std::to_string(x.shape(1)) + " but the weight has K=" + std::to_string(K));
        check(out.shape(0) == x.shape(0) && out.shape(1) == static_cast<size_t>(N),
              "out must have shape " + shape_str(x.shape(0), N));
        if (bias) {
          check(bias->dtype() == kBf16, "bias must be bfloat16");
          check(bias->shape(0) == static_cast<size_t>(N), "bias must have shape (" + std::to_string(N) + ",)");
        }
        GemvBf16Args a{static_cast<const uint16_t*>(x.data()), static_cast<const uint16_t*>(weight.data()),
                       bias ? static_cast<const uint16_t*>(bias->data()) : nullptr, static_cast<uint16_t*>(out.data()),
                       static_cast<int64_t>(x.shape(0)), N, K};
        nb::gil_scoped_release release;
        gemv_bf16(a);
      },
      nb::arg("x").noconvert(), nb::arg("weight").noconvert(), nb::arg("bias").noconvert().none(),
      nb::arg("out").noconvert(),
      "out (M, N) = x (M, K) . weight (N, K)^T + bias, all bfloat16 (fp32 sums, one rounding), streamed for small M");
}

}  // namespace quark::py
