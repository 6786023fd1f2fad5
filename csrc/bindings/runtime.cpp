// Runtime facts for quark.info(): CPU features, ISA level, per-family paths, threads.
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>

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
    check(n >= 1 && n <= kMaxThreads, "n must be between 1 and " + std::to_string(kMaxThreads) + ", got " + std::to_string(n));
    set_num_threads(n);
  }, nb::arg("n"));
  // Test hook of the thread pool (tests/test_threading.py): parallel_for over n items in chunks of at
  // least `grain`. Item throw_at throws (ValueError); each chunk runs a nested parallel_for over `inner`
  // items; the first chunk a worker takes sleeps stall_ms. Returns the runs of each item, the chunks
  // as (begin, end, thread slot), and whether every nested call ran inline as one call over [0, inner).
  m.def("_parallel_for_probe", [](int64_t n, int64_t grain, int64_t throw_at, int64_t inner, int stall_ms) {
    constexpr int64_t kMaxItems = 1 << 24;
    check(n <= kMaxItems && inner <= kMaxItems, "n and inner must be at most 2^24");
    check(stall_ms >= 0 && stall_ms <= 1000, "stall_ms must be between 0 and 1000, got " + std::to_string(stall_ms));
    std::vector<std::atomic<int>> runs(std::max<int64_t>(n, 0));
    std::vector<std::tuple<int64_t, int64_t, int>> chunks;
    std::mutex mu;
    std::atomic<bool> stalled{false}, nested_inline{true};
    {
      nb::gil_scoped_release release;
      parallel_for(n, grain, [&](int64_t begin, int64_t end) {
        if (detail::thread_slot() != 0 && stall_ms > 0 && !stalled.exchange(true))
          std::this_thread::sleep_for(std::chrono::milliseconds(stall_ms));
        for (int64_t i = begin; i < end; ++i) {
          if (i == throw_at) throw std::invalid_argument("item " + std::to_string(i) + " failed");
          runs[i].fetch_add(1);
        }
        if (inner > 0) {
          const std::thread::id self = std::this_thread::get_id();
          int calls = 0;
          parallel_for(inner, 1, [&](int64_t b, int64_t e) {
            ++calls;
            if (std::this_thread::get_id() != self || b != 0 || e != inner) nested_inline = false;
          });
          if (calls != 1) nested_inline = false;
        }
        std::lock_guard<std::mutex> lock(mu);
        chunks.emplace_back(begin, end, detail::thread_slot());
      });
    }
    std::vector<int> counts(runs.size());
    for (size_t i = 0; i < runs.size(); ++i) counts[i] = runs[i].load();
    return std::make_tuple(counts, chunks, nested_inline.load());
  }, nb::arg("n"), nb::arg("grain") = 1, nb::arg("throw_at") = -1, nb::arg("inner") = 0, nb::arg("stall_ms") = 0);
  m.def("has_cuda", [] {
#ifdef QUARK_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build includes the CUDA C++ kernels (QUARK_CUDA=ON)");
}

}  // namespace quark::py
