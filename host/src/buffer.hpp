// Buffer: the RAII owner of one block of memory (a state tensor, step counters, a workspace),
// in host memory (64-byte aligned) or in a GPU's memory. Constructed with its size in bytes;
// move-only; frees itself.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/types.hpp"

namespace fo::detail {

class Buffer {
 public:
  /// Allocates `bytes` on `device`; throws fo::Error (out_of_memory) on failure.
  Buffer(Device device, int device_index, std::size_t bytes);
  ~Buffer();
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const noexcept { return data_; }
  float* f32() const noexcept { return static_cast<float*>(data_); }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  void release() noexcept;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_ = Device::cpu;
  int device_index_ = 0;
};

}  // namespace fo::detail
