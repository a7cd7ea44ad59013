// The device-side form of learning-rate schedules, as the host-compiled code sees it. Defined
// in schedule.cu when the library is built with CUDA, and by schedule_stub.cpp (fo::Error
// unsupported) otherwise, so no host file needs the CUDA headers.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/schedule.hpp"
#include "fusedopt/types.hpp"

namespace fo::cuda {
FO_EMULATION_BEGIN

/// Enqueues on `stream` (a cudaStream_t) one thread that writes
/// float(schedule_lr(s, *d_step + 1)) to *d_lr_out. No validation (fo::schedule_to_device
/// does it); throws fo::Error if the launch fails.
void schedule_to_device(const Schedule& s, const std::int64_t* d_step, float* d_lr_out,
                        void* stream);

FO_EMULATION_END
}  // namespace fo::cuda
