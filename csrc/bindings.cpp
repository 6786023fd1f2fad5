// quark._C: the only module that talks to Python. Each kernel family binds itself in
// csrc/bindings/<family>.cpp; this file only lists them.
#include "bindings/common.h"

NB_MODULE(_C, m) {
  m.doc() = "Quark compiled core: CPU kernels with runtime SIMD dispatch (and optional CUDA)";
  quark::py::bind_runtime(m);
  quark::py::bind_distance(m);
  quark::py::bind_attention(m);
  quark::py::bind_text(m);
  quark::py::bind_quant(m);
#ifdef QUARK_WITH_CUDA
  quark::py::bind_cuda(m);
#endif
}
