// The CUDA backend as the host-compiled code sees it. Defined in cuda_backend.cu when the
// library is built with CUDA, and by cuda_stub.cpp (every call: fo::Error unsupported)
// otherwise, so no host file needs the CUDA headers.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cpu/elementwise.hpp"

namespace fo::cuda {

using DensePtrs = fo::cpu::DensePtrs;

bool built_with_cuda() noexcept;
/// GPUs visible to this process; 0 without CUDA or without a driver.
int device_count() noexcept;

/// Launches the fused step of algorithm `algorithm_index` (detail::AlgorithmIndex) on
/// `stream`; `op` points to its functor. Throws fo::Error on a launch failure.
void dense_step(int algorithm_index, const void* op, const DensePtrs& t, std::int64_t n, int device,
                void* stream);

float* allocate(std::int64_t n, int device);     // throws out_of_memory / device_error
void deallocate(float* p, int device) noexcept;  // never throws; logs a failure
void fill(float* p, float value, std::int64_t n, int device, void* stream);
void copy_to_host(float* h_dst, const float* d_src, std::int64_t n, int device, void* stream);
/// True if `p` is device (or managed) memory of `device`.
bool is_device_pointer(const void* p, int device);

}  // namespace fo::cuda

namespace fo::cuda {
/// Makes `device` current for the guard's lifetime (no-op without CUDA or for device < 0).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};
}  // namespace fo::cuda
