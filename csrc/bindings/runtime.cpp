// Runtime facts for quark.info(): CPU features, ISA level, per-family paths, threads.
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings/common.h"
#include "common/dispatch.h"
#include "common/threading.h"

namespace quark::py {

void bind_runtime(nb::module_& m) {
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512dq"] = f.avx512dq; d["avx512vl"] = f.avx512vl;
    d["avx512_vnni"] = f.avx512_vnni; d["avx512_bf16"] = f.avx512_bf16;
    d["amx_tile"] = f.amx_tile; d["amx_int8"] = f.amx_int8; d["amx_bf16"] = f.amx_bf16;
    d["os_avx"] = f.os_avx; d["os_avx512"] = f.os_avx512; d["os_amx"] = f.os_amx;
    return d;
  }, "CPUID feature bits and whether the OS enables their register state");
  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); });
  m.def("current_isa", [] { return std::string(isa_name(current_isa())); });
  m.def("set_isa", [](const std::string& name) {
    Isa isa;
    if (!parse_isa(name, &isa))
      value_error("isa must be one of scalar, avx2, avx512, avx512_bf16, amx; got '" + name + "'");
    set_isa(isa);
  }, nb::arg("isa"), "Cap the ISA level (tests use it to reach every path); cannot exceed detected_isa()");
  m.def("kernel_paths", [] {
    nb::dict d;
    for (auto& [family, max_isa] : registered_families()) d[family.c_str()] = isa_name(family_isa(max_isa));
    return d;
  }, "The ISA path each kernel family runs now");
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
    check(n >= 1 && n <= kMaxThreads,
          "n must be a thread count in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(n));
    set_num_threads(n);
  }, nb::arg("n"), "OpenMP threads of every kernel");
  m.def("has_cuda", [] {
#ifdef QUARK_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build includes the CUDA C++ kernels (QUARK_CUDA=ON)");
}

}  // namespace quark::py
