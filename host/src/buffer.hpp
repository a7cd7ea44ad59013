// StateBuffer: the RAII owner of one state tensor, in host memory (64-byte aligned) or in a
// GPU's memory. Constructed with its size; move-only; frees itself.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/types.hpp"

namespace fo::detail {

class StateBuffer {
 public:
  /// Allocates `n` floats on `device`; throws fo::Error (out_of_memory) on failure.
  StateBuffer(Device device, int device_index, std::int64_t n);
  ~StateBuffer();
  StateBuffer(StateBuffer&& o) noexcept;
  StateBuffer& operator=(StateBuffer&& o) noexcept;
  StateBuffer(const StateBuffer&) = delete;
  StateBuffer& operator=(const StateBuffer&) = delete;

  float* data() const noexcept { return data_; }
  std::int64_t size() const noexcept { return size_; }

 private:
  void release() noexcept;
  float* data_ = nullptr;
  std::int64_t size_ = 0;
  Device device_ = Device::cpu;
  int device_index_ = 0;
};

}  // namespace fo::detail
