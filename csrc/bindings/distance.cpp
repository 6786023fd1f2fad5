#include <nanobind/stl/string.h>

#include "bindings/common.h"
#include "search/distance.h"

namespace quark::py {

static Metric parse_metric(const std::string& s) {
  if (s == "l2") return Metric::l2;
  if (s == "ip") return Metric::ip;
  if (s == "cosine") return Metric::cosine;
  value_error("metric must be 'l2', 'ip' or 'cosine'; got '" + s + "'");
}

using Mat = CArray<const float, nb::ndim<2>>;
using OutMat = CArray<float, nb::ndim<2>>;

void bind_distance(nb::module_& m) {
  m.def(
      "pairwise_distance",
      [](Mat x, Mat y, OutMat out, const std::string& metric) {
        Metric mt = parse_metric(metric);
        check(x.shape(1) == y.shape(1), "x and y must have the same dim: x has " + std::to_string(x.shape(1)) +
                                            ", y has " + std::to_string(y.shape(1)));
        check(out.shape(0) == x.shape(0) && out.shape(1) == y.shape(0), "out must have shape (len(x), len(y))");
        DistanceArgs a{x.data(), (int64_t)x.shape(0), y.data(), (int64_t)y.shape(0), (int64_t)x.shape(1),
                       mt, nullptr, out.data(), (int64_t)out.shape(1)};
        nb::gil_scoped_release release;
        pairwise_distance(a);
      },
      nb::arg("x").noconvert(), nb::arg("y").noconvert(), nb::arg("out").noconvert(), nb::arg("metric"),
      "out[i, j] = distance(x[i], y[j]) for float32 C-contiguous x (nq, d), y (nb, d); out (nq, nb)");
}

}  // namespace quark::py
