// The CUDA kernels of a matrix step's two elementwise passes (kernels/matrix_step.hpp), launched
// per tensor around the Newton-Schulz iteration (cuBLAS, host/src/cuda/newton_schulz.cu), in
// stream order with no host sync between them:
//   matrix_prepare_kernel   states advance from the scaled gradient; the iteration's input X
//                           is written to the workspace (float32, or bfloat16 rounded to
//                           nearest where the algorithm iterates in bf16)
//   matrix_apply_kernel     p <- apply(p, O, rate(rows, cols)), master weights, rounding, the
//                           weight EMA
// Per element the same fp32 operations as the CPU's kernels/cpu/matrix_step.hpp, so both give
// the same bits for the same O. Storage, device scalars, skips and stochastic rounding as in
// multi_tensor.cuh (counters: 4i for the param, 4i + 1 + k for state k). Bytes per element:
// pass 1 reads g and the states and writes them and X; pass 2 reads p and O and writes p.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cuda/factored.cuh"  // FactoredTensor, factored_scalars: per tensor
#include "fusedopt/kernels/matrix_step.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

/// One tensor of a matrix step: the factored step's per-tensor record (its view is the batch
/// of matrices).
using MatrixTensor = FactoredTensor;

template <class A>
__global__ void __launch_bounds__(kBlock)
    matrix_prepare_kernel(const typename A::Options options, const typename A::Op host_op,
                          const MatrixTensor t, const StepConfig cfg, void* x, int x_storage) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const std::uint64_t seed = factored_seed(cfg, t.key);
  const auto ustep = static_cast<std::uint64_t>(s.step);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kBlock;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < t.numel;
       i += stride) {
    float st[kMaxStates];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k)
      st[k] = t.state[k] ? load_as_float(t.state[k], cfg.state_storage, i) : 0.0f;
    const float g = load_as_float(t.grad, cfg.grad_storage, i) * s.gscale;
    store_from_float(x, x_storage, i, s.op.prepare(g, st), false, 0, 0, 0);
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k)
      if (t.state[k])
        store_from_float(t.state[k], cfg.state_storage, i, st[k], cfg.stochastic, seed, ustep,
                         4 * static_cast<std::uint64_t>(i) + 1 + k);
  }
}

template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    matrix_apply_kernel(const typename A::Options options, const typename A::Op host_op,
                        const MatrixTensor t, const StepConfig cfg, const void* o, int o_storage) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const std::uint64_t seed = factored_seed(cfg, t.key);
  const auto ustep = static_cast<std::uint64_t>(s.step);
  const float rate = s.op.rate(t.view.rows, t.view.cols);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kBlock;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < t.numel;
       i += stride) {
    float p = t.master ? t.master[i] : load_as_float(t.param, kParamStorage, i);
    p = s.op.apply(p, load_as_float(o, o_storage, i), rate);
    if (t.ema) t.ema[i] = ema_lerp(t.ema[i], p, cfg.ema_weight);
    if (t.master) t.master[i] = p;
    store_from_float(t.param, kParamStorage, i, p, cfg.stochastic, seed, ustep,
                     4 * static_cast<std::uint64_t>(i));
  }
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
