// Shared pieces of the Python boundary. Only csrc/bindings.cpp and csrc/bindings/*.cpp include
// nanobind; kernels never see Python.
//
// Kernel arguments are typed as constrained nb::ndarray and declared .noconvert() so nanobind never
// makes a silent float32/contiguous copy; the Python wrappers in quark.ops check dtype, shape,
// layout and device first and raise errors that name the argument. The checks here are the last
// line of defence for direct callers of quark._C.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

namespace quark::py {

namespace nb = nanobind;

template <class... Ts>
using CArray = nb::ndarray<nb::device::cpu, nb::c_contig, Ts...>;

// DLPack's bfloat16 (nanobind has no nb::dtype<> for it).
inline const nb::dlpack::dtype kBf16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};

[[noreturn]] inline void value_error(const std::string& msg) { throw nb::value_error(msg.c_str()); }

inline void check(bool ok, const std::string& msg) {
  if (!ok) value_error(msg);
}

// Registration hooks, one per kernel family (csrc/bindings/<family>.cpp).
void bind_runtime(nb::module_& m);
void bind_distance(nb::module_& m);
void bind_attention(nb::module_& m);
void bind_text(nb::module_& m);
void bind_quant(nb::module_& m);
void bind_search(nb::module_& m);
void bind_layer(nb::module_& m);
#ifdef QUARK_WITH_CUDA
void bind_cuda(nb::module_& m);
#endif

}  // namespace quark::py
