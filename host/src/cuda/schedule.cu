// The device-side form of learning-rate schedules: one thread computes the lr of the next
// step from a device step counter, so a captured CUDA graph advances the lr on every replay.
// Also compiled as host C++ under FO_CUDA_HOST_EMULATION (tests/emulation).
#include <cstdint>

#include "cuda/cuda_check.hpp"
#include "cuda/schedule_device.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"

namespace fo::cuda {
FO_EMULATION_BEGIN
namespace {

// The schedule travels by value in the kernel parameters: a graph keeps the one it captured.
__global__ void schedule_kernel(Schedule s, const std::int64_t* d_step, float* d_lr_out) {
  const std::int64_t taken = *d_step;
  const std::int64_t next = taken < INT64_MAX ? taken + 1 : taken;  // no signed overflow
  *d_lr_out = static_cast<float>(schedule_lr(s, next));
}

}  // namespace

void schedule_to_device(const Schedule& s, const std::int64_t* d_step, float* d_lr_out,
                        void* stream) {
  FO_LAUNCH(1, 1, static_cast<cudaStream_t>(stream), schedule_kernel)(s, d_step, d_lr_out);
  FO_CUDA_CHECK(cudaGetLastError());
}

FO_EMULATION_END
}  // namespace fo::cuda
