// The CUDA backend's runtime side: devices, device memory, fills of raw bytes, copies and
// pointer queries. The launchers are in cuda_backend.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "cuda/cuda_backend.hpp"
#include "cuda/cuda_check.hpp"

namespace fo::cuda {

bool built_with_cuda() noexcept { return true; }

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the "no driver" error
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

void* allocate(std::size_t bytes, int device) {
  DeviceGuard guard(device);
  void* p = nullptr;
  FO_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)));
  return p;
}

void deallocate(void* p, int device) noexcept {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (device >= 0 && previous != device) FO_CUDA_CHECK_NOTHROW(cudaSetDevice(device));
  FO_CUDA_CHECK_NOTHROW(cudaFree(p));
  if (device >= 0 && previous >= 0 && previous != device)
    FO_CUDA_CHECK_NOTHROW(cudaSetDevice(previous));
}

namespace {
bool pools_supported() {
  int device = 0, pools = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return pools != 0;
}
}  // namespace

void* allocate_async(std::size_t bytes, void* stream) {
  void* p = nullptr;
  if (pools_supported())
    FO_CUDA_CHECK(
        cudaMallocAsync(&p, std::max<std::size_t>(bytes, 1), static_cast<cudaStream_t>(stream)));
  else
    FO_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)));
  return p;
}

void deallocate_async(void* p, void* stream) noexcept {
  if (!p) return;
  if (pools_supported())
    FO_CUDA_CHECK_NOTHROW(cudaFreeAsync(p, static_cast<cudaStream_t>(stream)));
  else
    FO_CUDA_CHECK_NOTHROW(cudaFree(p));
}

void memset_zero(void* p, std::size_t bytes, void* stream) {
  FO_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, static_cast<cudaStream_t>(stream)));
}

void copy_to_host(void* h_dst, const void* d_src, std::size_t bytes) {
  if (bytes == 0) return;
  FO_CUDA_CHECK(cudaDeviceSynchronize());  // the source may still be written on any stream
  FO_CUDA_CHECK(cudaMemcpy(h_dst, d_src, bytes, cudaMemcpyDeviceToHost));
}

void copy_from_host(void* d_dst, const void* h_src, std::size_t bytes, void* stream) {
  if (bytes == 0) return;
  FO_CUDA_CHECK(cudaMemcpyAsync(d_dst, h_src, bytes, cudaMemcpyHostToDevice,
                                static_cast<cudaStream_t>(stream)));
}

void copy_device(void* d_dst, const void* d_src, std::size_t bytes, void* stream) {
  if (bytes == 0) return;
  FO_CUDA_CHECK(cudaMemcpyAsync(d_dst, d_src, bytes, cudaMemcpyDeviceToDevice,
                                static_cast<cudaStream_t>(stream)));
}

void synchronize() { FO_CUDA_CHECK(cudaDeviceSynchronize()); }

bool is_device_pointer(const void* p, int device) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) &&
         (device < 0 || attr.device == device);
}

}  // namespace fo::cuda
