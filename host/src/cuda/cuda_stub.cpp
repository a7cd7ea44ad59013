// The CUDA backend of a build without CUDA: every operation reports that it is unsupported.
#include "cuda/cuda_backend.hpp"
#include "fusedopt/types.hpp"

namespace fo::cuda {
namespace {
[[noreturn]] void unsupported() {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
}  // namespace

bool built_with_cuda() noexcept { return false; }
int device_count() noexcept { return 0; }
void dense_step(int, const void*, const DensePtrs&, std::int64_t, int, void*) { unsupported(); }
float* allocate(std::int64_t, int) { unsupported(); }
void deallocate(float*, int) noexcept {}
void fill(float*, float, std::int64_t, int, void*) { unsupported(); }
void copy_to_host(float*, const float*, std::int64_t, int, void*) { unsupported(); }
bool is_device_pointer(const void*, int) { return false; }

}  // namespace fo::cuda

fo::cuda::DeviceGuard::DeviceGuard(int) {}
fo::cuda::DeviceGuard::~DeviceGuard() = default;
