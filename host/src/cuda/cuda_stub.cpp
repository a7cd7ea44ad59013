// The CUDA backend of a build without CUDA: every operation reports that it is unsupported.
#include "cuda/cuda_backend.hpp"

namespace fo::cuda {
namespace {
[[noreturn]] void unsupported() {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
}  // namespace

bool built_with_cuda() noexcept { return false; }
int device_count() noexcept { return 0; }
void multi_tensor_step(int, const void*, const ListEntry*, std::size_t, const ListSettings&,
                       void*) {
  unsupported();
}
void traffic_probe(const ListEntry*, std::size_t, void*) { unsupported(); }
std::int64_t grad_norm_workspace(const ListEntry*, std::size_t) { unsupported(); }
void grad_norm(const ListEntry*, std::size_t, DType, float, const float*, float, bool, float*,
               float*, float*, float*, void*) {
  unsupported();
}
void* allocate(std::size_t, int) { unsupported(); }
void deallocate(void*, int) noexcept {}
void fill(void*, DType, float, std::int64_t, void*) { unsupported(); }
void widen(float*, const void*, DType, std::int64_t, void*) { unsupported(); }
void memset_zero(void*, std::size_t, void*) { unsupported(); }
void copy_to_host(void*, const void*, std::size_t) { unsupported(); }
void copy_from_host(void*, const void*, std::size_t, void*) { unsupported(); }
bool is_device_pointer(const void*, int) { return false; }
void synchronize() { unsupported(); }
DeviceGuard::DeviceGuard(int) {}
DeviceGuard::~DeviceGuard() = default;

}  // namespace fo::cuda

#include "sparse.hpp"

namespace fo::cuda {
std::int64_t sparse_first_bad_index(const detail::SparseStep&, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
void sparse_step(int, const void*, const detail::SparseStep&, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
}  // namespace fo::cuda

#include "cuda/newton_device.hpp"

namespace fo::cuda {
void cholesky_solve_device(double*, double*, int, int, int*, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
void cholesky_solve_device(float*, float*, int, int, int*, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
}  // namespace fo::cuda
