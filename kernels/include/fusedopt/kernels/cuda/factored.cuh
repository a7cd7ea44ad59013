// The CUDA kernels of a factored step (kernels/factored.hpp), launched per tensor in stream
// order with no host sync between them:
//   factored_rows_kernel    one warp per matrix row: its sum of g^2 (the row lanes' order)
//   factored_cols_kernel    one thread per column and segment of kColSegment rows
//   factored_blend_kernel   each row and column statistic blended with its mean
//   factored_norm_kernel    one warp per matrix: the normalizer from its row statistics
//   factored_sums_kernel    one block per chunk of the shared order: sums of p^2 and u^2
//                           (unfactored: the per-element statistic blended and stored first)
//   factored_rate_kernel    one block: the tensor's rate from its chunks' sums
//   factored_apply_kernel   p <- apply(p, u, rate), master weights, rounding, the weight EMA
// The same orders and fp32 operations as the CPU's kernels/cpu/factored.hpp, so both give the
// same bits. Storage, device scalars, skips and rounding counters as in multi_tensor.cuh.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cuda/multi_tensor.cuh"
#include "fusedopt/kernels/cuda/trust_ratio.cuh"
#include "fusedopt/kernels/factored.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

static_assert(kRowLanes == 32, "a row's lanes are one warp");

/// One tensor of a factored step.
struct FactoredTensor {
  void* param;
  const void* grad;
  float* master;  // or null
  float* ema;     // or null
  void* state[kMaxStates];
  std::int64_t numel;
  std::int64_t step;  // host-counted step, where cfg.d_steps is null
  int key;
  MatrixView view;
};

/// The device scalars of tensor `t`'s step: skipped (found_inf), the gradient multiplier,
/// the step taken and its functor (from the host, or built here from the device step count
/// and lr). Every thread computes them: a handful of double operations.
template <class A>
struct FactoredScalars {
  bool skip;
  float gscale;
  std::int64_t step;
  typename A::Op op;
};
template <class A>
__device__ __forceinline__ FactoredScalars<A> factored_scalars(const typename A::Options& options,
                                                               const typename A::Op& host_op,
                                                               const FactoredTensor& t,
                                                               const StepConfig& cfg) {
  FactoredScalars<A> s{};
  s.skip = cfg.d_found_inf && *cfg.d_found_inf != 0.0f;
  s.step = cfg.d_steps ? cfg.d_steps[t.key] + 1 : t.step;
  s.op = host_op;
  if (cfg.device_scalars) {
    typename A::Options o = options;
    if (cfg.d_lr) o.lr *= static_cast<double>(*cfg.d_lr);
    s.op = A::make_op(o, s.step);
  }
  s.gscale = cfg.grad_multiplier;
  if (cfg.d_grad_multiplier) s.gscale *= *cfg.d_grad_multiplier;
  if (cfg.d_clip) s.gscale *= *cfg.d_clip;
  return s;
}

/// The sum over a warp's lanes by the row lanes' tree (lane 0 holds it).
__device__ __forceinline__ double warp_tree_sum(double v) {
  for (int w = kRowLanes / 2; w > 0; w /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, w);
  return v;
}

__device__ __forceinline__ std::uint64_t factored_seed(const StepConfig& cfg, int key) {
  return cfg.seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(key + 1));
}

template <class A>
__global__ void __launch_bounds__(kBlock)
    factored_rows_kernel(const typename A::Options options, const typename A::Op host_op,
                         const FactoredTensor t, const StepConfig cfg, double* row_sq) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const std::int64_t rows = t.view.batch * t.view.rows, cols = t.view.cols;
  const std::int64_t row =
      static_cast<std::int64_t>(blockIdx.x) * (kBlock / kRowLanes) + threadIdx.x / kRowLanes;
  const int lane = static_cast<int>(threadIdx.x % kRowLanes);
  if (row >= rows) return;  // whole warps leave together
  double acc = 0.0;
  for (std::int64_t c = lane; c < cols; c += kRowLanes) {
    const double x = load_as_float(t.grad, cfg.grad_storage, row * cols + c) * s.gscale;
    acc += x * x;
  }
  acc = warp_tree_sum(acc);
  if (lane == 0) row_sq[row] = acc;
}

template <class A>
__global__ void __launch_bounds__(kBlock)
    factored_cols_kernel(const typename A::Options options, const typename A::Op host_op,
                         const FactoredTensor t, const StepConfig cfg, double* col_partial) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const MatrixView& v = t.view;
  const std::int64_t col_blocks = (v.cols + kBlock - 1) / kBlock;
  const std::int64_t seg = blockIdx.x / col_blocks;
  const std::int64_t c = (blockIdx.x % col_blocks) * kBlock + threadIdx.x;
  if (c >= v.cols) return;
  const std::int64_t per_matrix = (v.rows + kColSegment - 1) / kColSegment;
  const std::int64_t b = seg / per_matrix, r0 = (seg % per_matrix) * kColSegment;
  const std::int64_t r1 = r0 + kColSegment < v.rows ? r0 + kColSegment : v.rows;
  double acc = 0.0;
  for (std::int64_t r = r0; r < r1; ++r) {
    const double x =
        load_as_float(t.grad, cfg.grad_storage, (b * v.rows + r) * v.cols + c) * s.gscale;
    acc += x * x;
  }
  col_partial[seg * v.cols + c] = acc;
}

template <class A>
__global__ void __launch_bounds__(kBlock)
    factored_blend_kernel(const typename A::Options options, const typename A::Op host_op,
                          const FactoredTensor t, const StepConfig cfg, const double* row_sq,
                          const double* col_partial) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const MatrixView& v = t.view;
  const std::int64_t rows = v.batch * v.rows, cols = v.batch * v.cols;
  const std::int64_t per_matrix = (v.rows + kColSegment - 1) / kColSegment;
  const std::uint64_t seed = factored_seed(cfg, t.key);
  const auto ustep = static_cast<std::uint64_t>(s.step);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kBlock;
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kBlock + threadIdx.x;
       j < rows + cols; j += stride) {
    if (j < rows) {
      const float mean = static_cast<float>(row_sq[j] / static_cast<double>(v.cols));
      const float x = s.op.blend(load_as_float(t.state[0], cfg.state_storage, j), mean);
      store_from_float(t.state[0], cfg.state_storage, j, x, cfg.stochastic, seed, ustep,
                       4 * static_cast<std::uint64_t>(j) + 1);
    } else {
      const std::int64_t k = j - rows, b = k / v.cols, c = k % v.cols;
      double sum = 0.0;
      for (std::int64_t g = b * per_matrix; g < (b + 1) * per_matrix; ++g)
        sum += col_partial[g * v.cols + c];
      const float mean = static_cast<float>(sum / static_cast<double>(v.rows));
      const float x = s.op.blend(load_as_float(t.state[1], cfg.state_storage, k), mean);
      store_from_float(t.state[1], cfg.state_storage, k, x, cfg.stochastic, seed, ustep,
                       4 * static_cast<std::uint64_t>(k) + 2);
    }
  }
}

template <class A>
__global__ void __launch_bounds__(kBlock)
    factored_norm_kernel(const typename A::Options options, const typename A::Op host_op,
                         const FactoredTensor t, const StepConfig cfg, float* norms) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const MatrixView& v = t.view;
  const std::int64_t b =
      static_cast<std::int64_t>(blockIdx.x) * (kBlock / kRowLanes) + threadIdx.x / kRowLanes;
  const int lane = static_cast<int>(threadIdx.x % kRowLanes);
  if (b >= v.batch) return;
  double acc = 0.0;
  for (std::int64_t r = lane; r < v.rows; r += kRowLanes)
    acc += static_cast<double>(load_as_float(t.state[0], cfg.state_storage, b * v.rows + r));
  acc = warp_tree_sum(acc);
  if (lane == 0) norms[b] = s.op.normalizer(acc / static_cast<double>(v.rows));
}

/// Element i's update direction u from its scaled gradient x (factored: from the blended row
/// and column statistics; unfactored: from its own statistic, which `blend` first blends and
/// stores).
template <class A>
__device__ __forceinline__ float factored_direction(const typename A::Op& op,
                                                    const FactoredTensor& t, const StepConfig& cfg,
                                                    const float* norms, std::int64_t i, float x,
                                                    bool blend, std::uint64_t seed,
                                                    std::uint64_t ustep) {
  const MatrixView& v = t.view;
  if (!v.factored()) {
    float st = load_as_float(t.state[2], cfg.state_storage, i);
    if (blend) {
      st = stored_value(op.blend(st, x * x), cfg.state_storage, cfg.stochastic, seed, ustep,
                        4 * static_cast<std::uint64_t>(i) + 3);
      store_from_float(t.state[2], cfg.state_storage, i, st, false, 0, 0, 0);
    }
    return op.direction(x, st);
  }
  const std::int64_t row = i / v.cols, c = i - row * v.cols, b = row / v.rows;
  const float rv = load_as_float(t.state[0], cfg.state_storage, row);
  const float cv = load_as_float(t.state[1], cfg.state_storage, b * v.cols + c);
  return op.direction(x, op.estimate(rv, cv, norms[b]));
}

/// Thread l takes elements 4l..4l+3 of each round of kSumRow of its block's chunk: its
/// accumulators of the shared order. partial[2 * blockIdx.x] and [+ 1] get the chunk's sums.
template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    factored_sums_kernel(const typename A::Options options, const typename A::Op host_op,
                         const FactoredTensor t, const StepConfig cfg, const float* norms,
                         double* partial) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const std::uint64_t seed = factored_seed(cfg, t.key);
  const auto ustep = static_cast<std::uint64_t>(s.step);
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.x) * kSumChunk;
  const std::int64_t end = begin + kSumChunk < t.numel ? begin + kSumChunk : t.numel;
  double acc_p[4] = {}, acc_u[4] = {};
  for (std::int64_t round = begin; round < end; round += kSumRow)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t i = round + 4 * threadIdx.x + j;
      if (i >= end) break;
      const float p = t.master ? t.master[i] : load_as_float(t.param, kParamStorage, i);
      const float x = load_as_float(t.grad, cfg.grad_storage, i) * s.gscale;
      const float u = factored_direction<A>(s.op, t, cfg, norms, i, x, true, seed, ustep);
      acc_p[j] += static_cast<double>(p) * static_cast<double>(p);
      acc_u[j] += static_cast<double>(u) * static_cast<double>(u);
    }
  block_sum2((acc_p[0] + acc_p[1]) + (acc_p[2] + acc_p[3]),
             (acc_u[0] + acc_u[1]) + (acc_u[2] + acc_u[3]), partial + 2 * blockIdx.x);
}

/// One block: the chunks' sums in the shared order (chunk c on lane c % kSumLanes, then the
/// tree), and the tensor's rate into *rate.
template <class A>
__global__ void __launch_bounds__(kBlock)
    factored_rate_kernel(const typename A::Options options, const typename A::Op host_op,
                         const FactoredTensor t, const StepConfig cfg, const double* partial,
                         float* rate) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const std::int64_t chunks = (t.numel + kSumChunk - 1) / kSumChunk;
  double sum_p = 0.0, sum_u = 0.0;
  for (std::int64_t c = threadIdx.x; c < chunks; c += kBlock) {
    sum_p += partial[2 * c];
    sum_u += partial[2 * c + 1];
  }
  double sums[2];
  block_sum2(sum_p, sum_u, sums);
  if (threadIdx.x == 0) *rate = s.op.rate(sums[0], sums[1], t.numel);
}

template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    factored_apply_kernel(const typename A::Options options, const typename A::Op host_op,
                          const FactoredTensor t, const StepConfig cfg, const float* norms,
                          const float* rate_in) {
  const FactoredScalars<A> s = factored_scalars<A>(options, host_op, t, cfg);
  if (s.skip) return;
  const std::uint64_t seed = factored_seed(cfg, t.key);
  const auto ustep = static_cast<std::uint64_t>(s.step);
  const float rate = *rate_in;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kBlock;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < t.numel;
       i += stride) {
    float p = t.master ? t.master[i] : load_as_float(t.param, kParamStorage, i);
    const float x = load_as_float(t.grad, cfg.grad_storage, i) * s.gscale;
    p = s.op.apply(p, factored_direction<A>(s.op, t, cfg, norms, i, x, false, 0, 0), rate);
    if (t.ema) t.ema[i] = ema_lerp(t.ema[i], p, cfg.ema_weight);
    if (t.master) t.master[i] = p;
    store_from_float(t.param, kParamStorage, i, p, cfg.stochastic, seed, ustep,
                     4 * static_cast<std::uint64_t>(i));
  }
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
