// Vocabulary types of the host API: element types, devices, and the exception it throws.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fo {

/// Element types; the numbering matches the C ABI's fo_dtype. q8 and q4 are optimizer-state
/// storages only (state_dtype): block-wise quantized codes of 8 and 4 bits with one float32
/// scale per block (docs/quantized-states.md); their dtype_size is 1, the byte of their codes.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, i64 = 4, q8 = 5, q4 = 6 };

/// Where tensors live; the numbering matches the C ABI's fo_device.
enum class Device : int { cpu = 0, cuda = 1 };

/// Error categories; the numbering matches the C ABI's fo_status.
enum class StatusCode : int {
  ok = 0,
  invalid_argument = 1,
  unsupported = 2,
  out_of_memory = 3,
  device_error = 4,
  io_error = 5,
  corrupt_data = 6,
};

/// Thrown by every fallible host call. A call that throws has changed nothing the caller owns.
class Error : public std::runtime_error {
 public:
  Error(StatusCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  StatusCode code() const noexcept { return code_; }

 private:
  StatusCode code_;
};

const char* dtype_name(DType t) noexcept;
std::size_t dtype_size(DType t) noexcept;

/// CUDA GPUs this process can use: 0 when the library was built without its CUDA backend, or
/// where no driver or device is present. Never throws.
///   const fo::Device d = fo::cuda_device_count() > 0 ? fo::Device::cuda : fo::Device::cpu;
int cuda_device_count() noexcept;

}  // namespace fo
