// The one check of a (device, device index) pair that every entry point taking a device makes.
#pragma once

#include <string>

#include "cuda/cuda_backend.hpp"
#include "fusedopt/types.hpp"

namespace fo::detail {

/// Throws fo::Error unless `device_index` names a device that exists: 0 for the CPU, a
/// visible GPU for CUDA (unsupported in a build without CUDA). `who` prefixes the message.
inline void check_device(const std::string& who, Device device, int device_index) {
  const std::string at = who.empty() ? "" : who + ": ";
  if (device == Device::cpu) {
    if (device_index != 0)
      throw Error(StatusCode::invalid_argument,
                  at + "the CPU device index must be 0, got " + std::to_string(device_index));
    return;
  }
  if (device != Device::cuda)
    throw Error(StatusCode::invalid_argument,
                at + "unknown device " + std::to_string(static_cast<int>(device)));
  if (!cuda::built_with_cuda())
    throw Error(StatusCode::unsupported, at + "fusedopt was built without CUDA");
  const int n = cuda::device_count();
  if (device_index < 0 || device_index >= n)
    throw Error(StatusCode::invalid_argument, at + "CUDA device " + std::to_string(device_index) +
                                                  " does not exist (" + std::to_string(n) +
                                                  " visible)");
}

}  // namespace fo::detail
