// Host-side entry points of the optional CUDA C++ kernels (built with QUARK_CUDA=ON).
#pragma once

namespace quark::cuda {

int device_count();            // 0 when no driver or device is present
bool selftest(int n);          // launches a kernel and checks its result on the host

}  // namespace quark::cuda
