// The stateless layer: one call is one fused optimizer step over one tensor, with the caller
// owning every buffer. The optimizer objects (optimizer.hpp) are built on it.
//
//   fo::Adam::Options opt;  opt.lr = 3e-4;
//   fo::fused_step<fo::Adam>(opt, step, {param, grad, {exp_avg, exp_avg_sq}, n});
#pragma once

#include <cstdint>

#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/types.hpp"

namespace fo {

/// The buffers of one dense step. states[k] is the algorithm's k-th state (A::kStates order);
/// an entry the options do not use is ignored. Every pointer is on the Exec's device.
struct DenseTensors {
  void* param = nullptr;
  const void* grad = nullptr;
  void* states[kMaxStates] = {nullptr, nullptr, nullptr};
  std::int64_t numel = 0;
  DType param_dtype = DType::f32;
  DType grad_dtype = DType::f32;
  DType state_dtype = DType::f32;
};

/// Where a step runs: the CPU (threads, see cpu.hpp) or a CUDA stream (null: default stream).
struct Exec {
  Device device = Device::cpu;
  void* stream = nullptr;  // cudaStream_t
};

/// One fused step of algorithm A (fo::Sgd, fo::Adam, ... from the registry) at step count
/// `step` (1 on the first step). Validates the options and buffers first and throws fo::Error
/// without writing anything if they are bad. On CUDA the step is asynchronous on the stream.
template <class A>
void fused_step(const typename A::Options& options, std::int64_t step, const DenseTensors& t,
                const Exec& exec = {});

#define FO_DECLARE_FUSED_STEP(A)                                                           \
  extern template void fused_step<A>(const A::Options&, std::int64_t, const DenseTensors&, \
                                     const Exec&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_DECLARE_FUSED_STEP)
#undef FO_DECLARE_FUSED_STEP

}  // namespace fo
