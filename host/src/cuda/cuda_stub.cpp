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
ListPlan plan_list(const ListEntry*, std::size_t) { unsupported(); }
template <class A>
void multi_tensor_step(const typename A::Options&, const ListEntry*, std::size_t, const ListPlan&,
                       const ListSettings&, void*) {
  unsupported();
}
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_MULTI_TENSOR_STEP)
template <class A>
void eval_params(const typename A::Options&, const ListEntry&, DType, DType, void*) {
  unsupported();
}
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_EVAL_PARAMS)
void traffic_probe(const ListEntry*, std::size_t, void*) { unsupported(); }
std::int64_t grad_norm_workspace(const ListPlan&) { unsupported(); }
void grad_norm(const ListEntry*, const ListPlan&, DType, float, const float*, float, bool, float*,
               float*, float*, float*, void*) {
  unsupported();
}
void* allocate(std::size_t, int) { unsupported(); }
void deallocate(void*, int) noexcept {}
void* allocate_async(std::size_t, void*) { unsupported(); }
void deallocate_async(void*, void*) noexcept {}
void fill(void*, DType, float, std::int64_t, void*) { unsupported(); }
void widen(float*, const void*, DType, std::int64_t, void*) { unsupported(); }
void narrow(void*, DType, const float*, std::int64_t, void*) { unsupported(); }
void swap(float*, float*, std::int64_t, void*) { unsupported(); }
void convert(void*, DType, const void*, DType, std::int64_t, void*) { unsupported(); }
void quantize_state(void*, DType, bool, const float*, std::int64_t, void*) { unsupported(); }
void dequantize_state(float*, const void*, DType, bool, std::int64_t, void*) { unsupported(); }
void fill_quantized(void*, DType, bool, float, std::int64_t, void*) { unsupported(); }
void memset_zero(void*, std::size_t, void*) { unsupported(); }
void copy_to_host(void*, const void*, std::size_t) { unsupported(); }
void copy_from_host(void*, const void*, std::size_t, void*) { unsupported(); }
void copy_device(void*, const void*, std::size_t, void*) { unsupported(); }
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
template <class A>
void sparse_step(const typename A::Options&, std::int64_t, const detail::SparseStep&, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_CUDA_SPARSE_STEP)
}  // namespace fo::cuda

#include "cuda/newton_device.hpp"
#include "cuda/newton_schulz_device.hpp"

namespace fo::cuda {
void cholesky_solve_device(double*, double*, int, int, int*, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
void cholesky_solve_device(float*, float*, int, int, int*, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
void require_cusolver() { throw Error(StatusCode::unsupported, "fusedopt was built without CUDA"); }
void newton_schulz_device(const void*, void*, DType, std::int64_t, std::int64_t, std::int64_t,
                          const NsCoefficients&, int, double, void*, std::size_t, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}
void require_cublas() { throw Error(StatusCode::unsupported, "fusedopt was built without CUDA"); }
}  // namespace fo::cuda
