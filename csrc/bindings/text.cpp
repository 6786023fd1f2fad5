// Text kernels: MinHash signatures of a list of str/bytes documents.
//
// The UTF-8 bytes of each str are read in place (PyUnicode_AsUTF8AndSize: zero-copy for ASCII,
// cached inside the str object otherwise) while the GIL is held; a strong reference to every
// item is kept so the buffers outlive the GIL-free kernel even if the caller's list is mutated
// from another thread meanwhile.
#include <nanobind/stl/string.h>

#include <vector>

#include "bindings/common.h"
#include "text/minhash.h"

namespace quark::py {

using OutSig = CArray<uint64_t, nb::ndim<2>>;

void bind_text(nb::module_& m) {
  m.def(
      "minhash",
      [](nb::list texts, OutSig out, int num_perm, int ngram, const std::string& unit, uint64_t seed) {
        ShingleUnit u;
        if (unit == "word") u = ShingleUnit::word;
        else if (unit == "char") u = ShingleUnit::chr;
        else value_error("unit must be 'word' or 'char'; got '" + unit + "'");
        check(num_perm >= 1, "num_perm must be >= 1");
        check(ngram >= 1, "ngram must be >= 1");
        const size_t n = nb::len(texts);
        check(out.shape(0) == n && out.shape(1) == (size_t)num_perm, "out must have shape (len(texts), num_perm)");
        std::vector<nb::object> keep;
        std::vector<const char*> ptrs(n);
        std::vector<int64_t> lens(n);
        keep.reserve(n);
        for (size_t i = 0; i < n; ++i) {
          nb::object item = texts[i];
          Py_ssize_t len = 0;
          const char* p = nullptr;
          if (PyUnicode_Check(item.ptr())) {
            p = PyUnicode_AsUTF8AndSize(item.ptr(), &len);
            if (!p) throw nb::python_error();  // e.g. a lone surrogate: not encodable as UTF-8
          } else if (PyBytes_Check(item.ptr())) {
            p = PyBytes_AS_STRING(item.ptr());
            len = PyBytes_GET_SIZE(item.ptr());
          } else {
            throw nb::type_error(("texts[" + std::to_string(i) + "] must be str or bytes, got " +
                                  std::string(nb::type_name(item.type()).c_str())).c_str());
          }
          ptrs[i] = p;
          lens[i] = (int64_t)len;
          keep.push_back(std::move(item));
        }
        MinhashArgs a{ptrs.data(), lens.data(), (int64_t)n, num_perm, ngram, u, seed, out.data()};
        nb::gil_scoped_release release;
        minhash(a);
      },
      nb::arg("texts"), nb::arg("out").noconvert(), nb::arg("num_perm"), nb::arg("ngram"), nb::arg("unit"),
      nb::arg("seed"),
      "out[d] = MinHash signature of texts[d] (list of str/bytes); out uint64 (len(texts), num_perm)");
}

}  // namespace quark::py
