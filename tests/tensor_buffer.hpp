// TestTensor: a float tensor on the CPU or a GPU with guard regions of canary values on both
// sides, so an out-of-bounds write anywhere (a vector tail, a wrong index) is caught. In
// fusedopt_emulated_device_test (FUSEDOPT_EMULATED_DEVICE) the GPU is the emulated device of
// tests/emulation/cuda_runtime_emulated.cpp, one device whose memory is host memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fusedopt/types.hpp"
#if defined(FUSEDOPT_WITH_CUDA)
#include <cuda_runtime_api.h>
#elif defined(FUSEDOPT_EMULATED_DEVICE)
#include "cuda/cuda_backend.hpp"
#endif

namespace fo::test {

inline int cuda_devices() {
#if defined(FUSEDOPT_WITH_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
#elif defined(FUSEDOPT_EMULATED_DEVICE)
  return cuda::device_count();
#else
  return 0;
#endif
}

class TestTensor {
 public:
  static constexpr std::int64_t kGuard = 16;  // 64 bytes: keeps the data 64-byte aligned
  static constexpr float kCanary = -12345.678f;

  TestTensor(Device device, const std::vector<float>& values) : device_(device), n_(values.size()) {
    std::vector<float> host(n_ + 2 * kGuard, kCanary);
    std::copy(values.begin(), values.end(), host.begin() + kGuard);
    if (device_ == Device::cpu) {
      host_ = std::move(host);
      return;
    }
#if defined(FUSEDOPT_WITH_CUDA)
    void* p = nullptr;
    if (cudaMalloc(&p, host.size() * sizeof(float)) != cudaSuccess) throw std::bad_alloc();
    dev_ = static_cast<float*>(p);
    cudaMemcpy(dev_, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
#elif defined(FUSEDOPT_EMULATED_DEVICE)
    dev_ = static_cast<float*>(cuda::allocate(host.size() * sizeof(float), 0));
    cuda::copy_from_host(dev_, host.data(), host.size() * sizeof(float), nullptr);
#endif
  }
  ~TestTensor() {
#if defined(FUSEDOPT_WITH_CUDA)
    if (dev_) cudaFree(dev_);
#elif defined(FUSEDOPT_EMULATED_DEVICE)
    if (dev_) cuda::deallocate(dev_, 0);
#endif
  }
  TestTensor(const TestTensor&) = delete;
  TestTensor& operator=(const TestTensor&) = delete;

  float* data() { return (device_ == Device::cpu ? host_.data() : dev_) + kGuard; }
  std::int64_t size() const { return static_cast<std::int64_t>(n_); }

  /// The whole allocation, guards included.
  std::vector<float> all() const {
    if (device_ == Device::cpu) return host_;
    std::vector<float> h(n_ + 2 * kGuard);
#if defined(FUSEDOPT_WITH_CUDA)
    cudaDeviceSynchronize();
    cudaMemcpy(h.data(), dev_, h.size() * sizeof(float), cudaMemcpyDeviceToHost);
#elif defined(FUSEDOPT_EMULATED_DEVICE)
    cuda::copy_to_host(h.data(), dev_, h.size() * sizeof(float));
#endif
    return h;
  }
  std::vector<float> values() const {
    const std::vector<float> a = all();
    return std::vector<float>(a.begin() + kGuard,
                              a.begin() + kGuard + static_cast<std::ptrdiff_t>(n_));
  }
  bool guards_intact() const {
    const std::vector<float> a = all();
    for (std::int64_t i = 0; i < kGuard; ++i)
      if (a[i] != kCanary || a[a.size() - 1 - i] != kCanary) return false;
    return true;
  }

 private:
  Device device_;
  std::size_t n_;
  std::vector<float> host_;
  float* dev_ = nullptr;
};

}  // namespace fo::test
