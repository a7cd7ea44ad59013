// The CUDA backend: launchers of the multi-tensor step and the gradient-norm pass (launch
// plans from multi_tensor_plan, one kernel per algorithm and param storage), device memory,
// fills and copies. Every launch is checked; nothing here synchronizes with the host except
// copy_to_host.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "algorithm_index.hpp"
#include "cuda/cuda_backend.hpp"
#include "cuda/cuda_check.hpp"
#include "fusedopt/kernels/cuda/multi_tensor.cuh"
#include "fusedopt/kernels/probe.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "multi_tensor_plan.hpp"

namespace fo::cuda {
namespace {

using cuda_kernels::kBlock;
using cuda_kernels::kMaxListTensors;
using cuda_kernels::StepConfig;
using cuda_kernels::TensorList;

static_assert(sizeof(TensorList) + sizeof(StepConfig) + 512 <= 32764,
              "kernel parameters over the 32 KB limit of CUDA 12.1+");

// Elements per block: 32 per thread, enough work to amortize a block's setup (finding its
// tensor, building the functor) while a 2^20-element tensor still spreads over 128 blocks.
constexpr std::int64_t kChunk = 8192;
constexpr std::int64_t kMaxGrid = 0x7FFFFFFF;

int storage_code(DType t) { return static_cast<int>(t); }

TensorList make_list(const ListEntry* entries, const detail::LaunchGroup& g) {
  TensorList list{};
  list.count = static_cast<int>(g.tensors.size());
  for (int j = 0; j < list.count; ++j) {
    const ListEntry& e = entries[g.tensors[j]];
    list.param[j] = e.param;
    list.grad[j] = e.grad;
    list.master[j] = e.master;
    for (int k = 0; k < kMaxStates; ++k) list.state[k][j] = e.states[k];
    list.numel[j] = e.numel;
    list.block_start[j] = g.block_start[j];
    list.step[j] = e.step;
    list.key[j] = e.key;
  }
  return list;
}

std::vector<detail::LaunchGroup> plan(const ListEntry* entries, std::size_t n) {
  std::vector<std::int64_t> numels(n);
  for (std::size_t i = 0; i < n; ++i) numels[i] = entries[i].numel;
  return detail::plan_launches(numels, kChunk, kMaxListTensors, kMaxGrid);
}

using StepLauncher = void (*)(const void* options, const TensorList& list, std::int64_t blocks,
                              const StepConfig& cfg, cudaStream_t stream);

template <class A, int kParam>
void launch_step(const void* options, const TensorList& list, std::int64_t blocks,
                 const StepConfig& cfg, cudaStream_t stream) {
  cuda_kernels::multi_tensor_step_kernel<A, kParam>
      <<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
          *static_cast<const typename A::Options*>(options), list, cfg);
  FO_CUDA_CHECK(cudaPeekAtLastError());
}

// [algorithm][param storage: f32, f16, bf16]
constexpr StepLauncher kStepLaunchers[][3] = {
#define FO_LAUNCHERS(A)                                                              \
  {&launch_step<fo::A, cuda_kernels::kF32>, &launch_step<fo::A, cuda_kernels::kF16>, \
   &launch_step<fo::A, cuda_kernels::kBF16>},
    FO_FOR_EACH_DENSE_ALGORITHM(FO_LAUNCHERS)
#undef FO_LAUNCHERS
};
static_assert(sizeof(kStepLaunchers) / sizeof(kStepLaunchers[0]) == detail::kNumDenseAlgorithms);

template <class T>
__global__ void fill_kernel(T* p, T value, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    p[i] = value;
}

__global__ void widen_kernel(float* dst, const void* src, int storage, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    dst[i] = cuda_kernels::load_as_float(src, storage, i);
}

unsigned elementwise_grid(std::int64_t n) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((n + kBlock - 1) / kBlock, 1, 65536));
}

}  // namespace

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

void multi_tensor_step(int algorithm_index, const void* options, const ListEntry* entries,
                       std::size_t n, const ListSettings& s, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  StepConfig cfg{};
  cfg.grad_storage = storage_code(s.grad_dtype);
  cfg.state_storage = storage_code(s.state_dtype);
  cfg.stochastic = s.stochastic;
  cfg.seed = s.seed;
  cfg.grad_scale = s.grad_scale;
  cfg.d_lr = s.d_lr;
  cfg.d_steps = s.d_steps;
  cfg.d_grad_scale = s.d_grad_scale;
  cfg.d_clip = s.d_clip;
  cfg.d_found_inf = s.d_found_inf;
  cfg.chunk = kChunk;
  const StepLauncher launch = kStepLaunchers[algorithm_index][storage_code(s.param_dtype)];
  for (const auto& g : plan(entries, n)) {
    const TensorList list = make_list(entries, g);
    launch(options, list, g.blocks, cfg, st);
    if (s.d_steps) {
      cuda_kernels::increment_steps_kernel<<<1, kBlock, 0, st>>>(s.d_steps, list, s.d_found_inf);
      FO_CUDA_CHECK(cudaPeekAtLastError());
    }
  }
  // Empty tensors get no blocks in any launch, but their steps count all the same.
  if (s.d_steps) {
    TensorList empty{};
    for (std::size_t i = 0; i < n; ++i) {
      if (entries[i].numel != 0) continue;
      empty.key[empty.count++] = entries[i].key;
      if (empty.count == kMaxListTensors) {
        cuda_kernels::increment_steps_kernel<<<1, kBlock, 0, st>>>(s.d_steps, empty, s.d_found_inf);
        FO_CUDA_CHECK(cudaPeekAtLastError());
        empty.count = 0;
      }
    }
    if (empty.count > 0) {
      cuda_kernels::increment_steps_kernel<<<1, kBlock, 0, st>>>(s.d_steps, empty, s.d_found_inf);
      FO_CUDA_CHECK(cudaPeekAtLastError());
    }
  }
}

void traffic_probe(const ListEntry* entries, std::size_t n, void* stream) {
  StepConfig cfg{};
  cfg.grad_scale = 1.0f;
  cfg.chunk = kChunk;
  const TrafficProbe::Options options{};
  for (const auto& g : plan(entries, n))
    launch_step<TrafficProbe, cuda_kernels::kF32>(&options, make_list(entries, g), g.blocks, cfg,
                                                  static_cast<cudaStream_t>(stream));
}

std::int64_t grad_norm_workspace(const ListEntry* entries, std::size_t n) {
  std::int64_t blocks = 0;
  for (const auto& g : plan(entries, n)) blocks += g.blocks;
  return 4 * std::max<std::int64_t>(blocks, 1);  // two doubles per block, in floats
}

void grad_norm(const ListEntry* entries, std::size_t n, DType grad_dtype, float grad_scale,
               const float* d_grad_scale, float max_norm, bool check_finite, float* d_workspace,
               float* d_norm, float* d_clip, float* d_found_inf, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  std::int64_t offset = 0;
  for (const auto& g : plan(entries, n)) {
    cuda_kernels::grad_sumsq_kernel<<<static_cast<unsigned>(g.blocks), kBlock, 0, st>>>(
        make_list(entries, g), storage_code(grad_dtype), grad_scale, d_grad_scale, kChunk,
        reinterpret_cast<double*>(d_workspace), offset);
    FO_CUDA_CHECK(cudaPeekAtLastError());
    offset += g.blocks;
  }
  cuda_kernels::finalize_norm_kernel<<<1, kBlock, 0, st>>>(
      reinterpret_cast<const double*>(d_workspace), offset, max_norm, check_finite, d_norm, d_clip,
      d_found_inf);
  FO_CUDA_CHECK(cudaPeekAtLastError());
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

void fill(void* p, DType storage, float value, std::int64_t n, void* stream) {
  if (n == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  switch (storage) {
    case DType::bf16:
      fill_kernel<<<elementwise_grid(n), kBlock, 0, st>>>(static_cast<bf16*>(p), to_bf16(value), n);
      break;
    case DType::f16:
      fill_kernel<<<elementwise_grid(n), kBlock, 0, st>>>(static_cast<f16*>(p), to_f16(value), n);
      break;
    default: fill_kernel<<<elementwise_grid(n), kBlock, 0, st>>>(static_cast<float*>(p), value, n);
  }
  FO_CUDA_CHECK(cudaPeekAtLastError());
}

void widen(float* dst, const void* src, DType storage, std::int64_t n, void* stream) {
  if (n == 0) return;
  widen_kernel<<<elementwise_grid(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      dst, src, storage_code(storage), n);
  FO_CUDA_CHECK(cudaPeekAtLastError());
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
