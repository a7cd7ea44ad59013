// Test hooks of the emulated device (cuda_runtime_emulated.cpp, fusedopt_emulated_device):
// its live allocations, and allocations made to fail as a full GPU's would.
#pragma once

#include <cstddef>

namespace fo::emulated_device {

/// Device allocations not yet freed (the library's and the tests' TestTensors).
std::size_t live_allocations();
/// The next n device allocations succeed and every later one fails (fo::Error out_of_memory)
/// until this is called again; n < 0: none fails.
void fail_allocations_after(long n);

}  // namespace fo::emulated_device
