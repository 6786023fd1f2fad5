// quark._C: the only module that talks to Python. Each kernel family binds itself in
// csrc/bindings/<family>.cpp; this file only lists them.
#include <system_error>

#include "bindings/common.h"

NB_MODULE(_C, m) {
  m.doc() = "Quark compiled core: CPU kernels with runtime SIMD dispatch (and optional CUDA)";
  // A failed system call (reading an index file through a bad fd, say) raises OSError(errno, ...),
  // which Python maps to the subclass errno names, as os.pread's own failure would.
  nanobind::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const std::system_error& e) {
      PyObject* err = PyObject_CallFunction(PyExc_OSError, "is", e.code().value(), e.what());
      if (!err) return;   // the call set its own error
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err)), err);
      Py_DECREF(err);
    }
  });
  quark::py::bind_runtime(m);
  quark::py::bind_distance(m);
  quark::py::bind_attention(m);
  quark::py::bind_text(m);
  quark::py::bind_quant(m);
  quark::py::bind_search(m);
  quark::py::bind_layer(m);
#ifdef QUARK_WITH_CUDA
  quark::py::bind_cuda(m);
#endif
}
