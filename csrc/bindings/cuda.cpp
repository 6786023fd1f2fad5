// Bindings of the CUDA C++ kernels; compiled to nothing unless QUARK_CUDA=ON.
#ifdef QUARK_WITH_CUDA
#include "bindings/common.h"
#include "cuda/runtime.h"

namespace quark::py {

void bind_cuda(nb::module_& m) {
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_selftest", &cuda::selftest, nb::arg("n") = 1024,
        nb::call_guard<nb::gil_scoped_release>());
}

}  // namespace quark::py
#endif
