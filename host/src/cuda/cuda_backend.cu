// The CUDA backend: launchers for the dense kernels (grid from the SM count, vector width
// from alignment), device memory, fills and copies. Every launch is checked.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "algorithm_index.hpp"
#include "cuda/cuda_backend.hpp"
#include "cuda/cuda_check.hpp"
#include "fusedopt/kernels/cuda/elementwise.cuh"
#include "fusedopt/kernels/registry.hpp"

namespace fo::cuda {
namespace {

constexpr int kBlock = 256;

int current_device() {
  int d = 0;
  FO_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

/// Resident blocks of `kernel` on the current device: enough warps in flight to cover HBM
/// latency, without a tail of blocks that start late. Queried once per kernel and device.
template <class Op, bool kVec4>
std::int64_t max_resident_blocks() {
  constexpr int kMaxDevices = 64;
  static std::int64_t cache[kMaxDevices] = {};  // 0: not yet known
  const int device = current_device();
  std::int64_t* slot = device < kMaxDevices ? &cache[device] : nullptr;
  if (slot && *slot > 0) return *slot;
  int sms = 0, per_sm = 0;
  FO_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FO_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, cuda_kernels::dense_step_kernel<Op, kVec4>, kBlock, 0));
  const std::int64_t blocks = static_cast<std::int64_t>(sms) * std::max(per_sm, 1);
  if (slot) *slot = blocks;
  return blocks;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class Op, bool kVec4>
void launch_as(const Op& op, const cuda_kernels::DensePtrs& d, std::int64_t n,
               cudaStream_t stream) {
  const std::int64_t work = kVec4 ? (n + 3) / 4 : n;
  const std::int64_t blocks = std::max<std::int64_t>(
      1, std::min((work + kBlock - 1) / kBlock, max_resident_blocks<Op, kVec4>()));
  cuda_kernels::dense_step_kernel<Op, kVec4>
      <<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(op, d, n);
  FO_CUDA_CHECK(cudaPeekAtLastError());
}

template <class Op>
void launch(const void* op_ptr, const DensePtrs& t, std::int64_t n, cudaStream_t stream) {
  const Op& op = *static_cast<const Op*>(op_ptr);
  const cuda_kernels::DensePtrs d{t.param, t.grad, {t.states[0], t.states[1], t.states[2]}};
  bool vec4 = aligned16(t.param) && aligned16(t.grad);
  for (float* s : t.states) vec4 = vec4 && aligned16(s);
  if (vec4)
    launch_as<Op, true>(op, d, n, stream);
  else
    launch_as<Op, false>(op, d, n, stream);
}

using Launcher = void (*)(const void*, const DensePtrs&, std::int64_t, cudaStream_t);
constexpr Launcher kLaunchers[] = {
#define FO_LAUNCHER(A) &launch<fo::A::Op>,
    FO_FOR_EACH_DENSE_ALGORITHM(FO_LAUNCHER)
#undef FO_LAUNCHER
};
static_assert(sizeof(kLaunchers) / sizeof(kLaunchers[0]) == detail::kNumDenseAlgorithms);

__global__ void fill_kernel(float* p, float value, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    p[i] = value;
}

}  // namespace

bool built_with_cuda() noexcept { return true; }

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  FO_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ == device) {
    previous_ = -1;
    return;
  }
  FO_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) FO_CUDA_CHECK_NOTHROW(cudaSetDevice(previous_));
}

void dense_step(int algorithm_index, const void* op, const DensePtrs& t, std::int64_t n, int device,
                void* stream) {
  DeviceGuard guard(device);
  kLaunchers[algorithm_index](op, t, n, static_cast<cudaStream_t>(stream));
}

float* allocate(std::int64_t n, int device) {
  DeviceGuard guard(device);
  void* p = nullptr;
  FO_CUDA_CHECK(cudaMalloc(&p, static_cast<std::size_t>(n) * sizeof(float)));
  return static_cast<float*>(p);
}

void deallocate(float* p, int device) noexcept {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (device >= 0 && previous != device) FO_CUDA_CHECK_NOTHROW(cudaSetDevice(device));
  FO_CUDA_CHECK_NOTHROW(cudaFree(p));
  if (device >= 0 && previous >= 0 && previous != device)
    FO_CUDA_CHECK_NOTHROW(cudaSetDevice(previous));
}

void fill(float* p, float value, std::int64_t n, int device, void* stream) {
  if (n == 0) return;
  DeviceGuard guard(device);
  const std::int64_t blocks = std::min<std::int64_t>((n + kBlock - 1) / kBlock, 4096);
  fill_kernel<<<static_cast<unsigned>(blocks), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      p, value, n);
  FO_CUDA_CHECK(cudaPeekAtLastError());
}

void copy_to_host(float* h_dst, const float* d_src, std::int64_t n, int device, void*) {
  if (n == 0) return;
  DeviceGuard guard(device);
  FO_CUDA_CHECK(cudaDeviceSynchronize());  // the state may still be written on any stream
  FO_CUDA_CHECK(cudaMemcpy(h_dst, d_src, static_cast<std::size_t>(n) * sizeof(float),
                           cudaMemcpyDeviceToHost));
}

bool is_device_pointer(const void* p, int device) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) &&
         attr.device == device;
}

}  // namespace fo::cuda
