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
  float* master = nullptr;  // f32 master weights of a low-precision param (CUDA), or null
  std::int64_t numel = 0;
  DType param_dtype = DType::f32;  // f32; bf16 and f16 on CUDA
  // grad_dtype: the param's, or f32. state_dtype: f32, or bf16 on CUDA.
  DType grad_dtype = DType::f32;
  DType state_dtype = DType::f32;
};

/// Where a step runs: the CPU (threads, see cpu.hpp) or a CUDA stream (null: default stream).
struct Exec {
  Device device = Device::cpu;
  void* stream = nullptr;  // cudaStream_t
};

/// Extras of a step. The CPU takes grad_multiplier; the rest needs CUDA.
struct StepControls {
  float grad_multiplier = 1.0f;      // every gradient is multiplied by this (1 / loss scale)
  bool stochastic_rounding = false;  // low-precision writes round stochastically
  std::uint64_t seed = 0;            // with `key`, keys the draws (with step and element)
  int key = 0;
  const float* d_lr = nullptr;               // a device-side factor on lr (a schedule's)
  const float* d_grad_multiplier = nullptr;  // a device-side gradient multiplier
  const float* d_found_inf = nullptr;        // where non-zero, the step does nothing
};

/// One fused step of algorithm A (fo::Sgd, fo::Adam, ... from the registry) at step count
/// `step` (1 on the first step). Validates the options and buffers first and throws fo::Error
/// without writing anything if they are bad. On CUDA the step is asynchronous on the stream,
/// and every buffer must be CUDA device (or managed) memory: checked by a pointer query per
/// buffer, about a microsecond each (fo::Optimizer checks a grad buffer once, not per step).
template <class A>
void fused_step(const typename A::Options& options, std::int64_t step, const DenseTensors& t,
                const Exec& exec = {}, const StepControls& controls = {});

#define FO_DECLARE_FUSED_STEP(A)                                                           \
  extern template void fused_step<A>(const A::Options&, std::int64_t, const DenseTensors&, \
                                     const Exec&, const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_DECLARE_FUSED_STEP)
#undef FO_DECLARE_FUSED_STEP

}  // namespace fo
