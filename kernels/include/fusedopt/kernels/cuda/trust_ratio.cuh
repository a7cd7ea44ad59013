// The CUDA kernels of a trust-ratio step (kernels/trust_ratio.hpp), one launch each per planned
// group of tensors, with no host sync between them:
//   trust_first_kernel     pass one: per block (one chunk of one tensor) the sums of squares
//                          of p and of the update direction, in the shared order
//   trust_norms_kernel     per tensor (one block each): its two norms from its blocks' sums
//   trust_second_kernel    pass two: apply() with the rate of each tensor's norms
// Storage, master weights, rounding, device scalars, skips and the weight EMA (pass two) as in
// multi_tensor.cuh.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/cuda/multi_tensor.cuh"
#include "fusedopt/kernels/trust_ratio.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

static_assert(kSumChunk % 4 == 0 && kSumLanes == kBlock,
              "the shared order puts one lane on each thread");

/// The value a state of `storage` holds after storing x (rounded as the store rounds).
__device__ __forceinline__ float stored_value(float x, int storage, bool stochastic,
                                              std::uint64_t seed, std::uint64_t step,
                                              std::uint64_t counter) {
  if (storage == kBF16) return to_float(round_to<bf16>(x, stochastic, seed, step, counter));
  return x;  // states are f32 or bf16
}

/// The sums of a and of b over the block's threads by the tree of tree_sum, into
/// out[0] and out[1] by thread 0.
__device__ __forceinline__ void block_sum2(double a, double b, double* out) {
  __shared__ double s_sum[2][kBlock];
  s_sum[0][threadIdx.x] = a;
  s_sum[1][threadIdx.x] = b;
  __syncthreads();
  for (unsigned w = kBlock / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      s_sum[0][threadIdx.x] += s_sum[0][threadIdx.x + w];
      s_sum[1][threadIdx.x] += s_sum[1][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = s_sum[0][0];
    out[1] = s_sum[1][0];
  }
}

/// What a block of a trust-ratio pass starts from: its tensor and range, the functor (from the
/// host, or built from the device step count and lr), its step, the gradient multiplier.
struct TrustBlock {
  int t;
  std::int64_t begin, end, step;
  float gscale;
  std::uint64_t seed;
};

template <class A>
__device__ __forceinline__ TrustBlock trust_block(const typename A::Options& options,
                                                  const TensorList& list, const StepConfig& cfg,
                                                  typename A::Op* s_op, std::int64_t* s_step,
                                                  float* s_gscale) {
  TrustBlock b{};
  b.t = find_tensor(list, blockIdx.x);
  b.begin = (blockIdx.x - list.block_start[b.t]) * cfg.chunk;
  b.end = b.begin + cfg.chunk < list.numel[b.t] ? b.begin + cfg.chunk : list.numel[b.t];
  if (threadIdx.x == 0) {
    const std::int64_t step_taken = cfg.d_steps ? cfg.d_steps[list.key[b.t]] + 1 : list.step[b.t];
    if (cfg.device_scalars) {
      typename A::Options o = options;
      if (cfg.d_lr) o.lr *= static_cast<double>(*cfg.d_lr);
      static_assert(ScalarList<A>::count == 0, "trust-ratio steps keep no scalar states");
      *s_op = A::make_op(o, step_taken);
    }
    float gs = cfg.grad_multiplier;
    if (cfg.d_grad_multiplier) gs *= *cfg.d_grad_multiplier;
    if (cfg.d_clip) gs *= *cfg.d_clip;
    *s_step = step_taken;
    *s_gscale = gs;
  }
  __syncthreads();
  b.step = *s_step;
  b.gscale = *s_gscale;
  b.seed = cfg.seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(list.key[b.t] + 1));
  return b;
}

/// Pass one. Thread l takes the groups of four elements l, l + 256, ... of its chunk (its
/// accumulators 4l..4l+3 of the shared order); partial[2 * blockIdx.x] and [+ 1] get the
/// block's two sums.
template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    trust_first_kernel(const typename A::Options options, const typename A::Op host_op,
                       const TensorList list, const StepConfig cfg, double* partial) {
  using Op = typename A::Op;
  if (cfg.d_found_inf && *cfg.d_found_inf != 0.0f) return;
  static_assert(alignof(Op) <= 8, "the functor's shared copy is 8-byte aligned");
  __shared__ unsigned long long s_op[(sizeof(Op) + 7) / 8];
  __shared__ std::int64_t s_step;
  __shared__ float s_gscale;
  const TrustBlock b =
      trust_block<A>(options, list, cfg, reinterpret_cast<Op*>(s_op), &s_step, &s_gscale);
  const Op op = cfg.device_scalars ? *reinterpret_cast<const Op*>(s_op) : host_op;
  const void* const param = list.param[b.t];
  const void* const grad = list.grad[b.t];
  const float* const master = list.master[b.t];
  void* const states[kMaxStates] = {list.state[0][b.t], list.state[1][b.t], list.state[2][b.t]};
  const auto ustep = static_cast<std::uint64_t>(b.step);

  bool vec = aligned_for4(param, kParamStorage) && aligned_for4(grad, cfg.grad_storage) &&
             (!master || aligned_for4(master, kF32));
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k)
    vec = vec && (!states[k] || aligned_for4(states[k], cfg.state_storage));

  double acc_p[4] = {}, acc_u[4] = {};  // accumulators 4l..4l+3 of the shared order
  const std::int64_t groups = (b.end - b.begin + 3) / 4;
  for (std::int64_t v = threadIdx.x; v < groups; v += kBlock) {
    const std::int64_t i = b.begin + 4 * v;
    const int count = b.end - i < 4 ? static_cast<int>(b.end - i) : 4;
    float p[4] = {}, g[4] = {}, s[kMaxStates][4] = {};
    if (vec && count == 4) {
      if (master)
        load4(master, kF32, i, p);
      else
        load4(param, kParamStorage, i, p);
      load4(grad, cfg.grad_storage, i, g);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k)
        if (Op::kAdvanceStates && states[k]) load4(states[k], cfg.state_storage, i, s[k]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j >= count) break;
        p[j] = master ? master[i + j] : load_as_float(param, kParamStorage, i + j);
        g[j] = load_as_float(grad, cfg.grad_storage, i + j);
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k)
          if (Op::kAdvanceStates && states[k])
            s[k][j] = load_as_float(states[k], cfg.state_storage, i + j);
      }
    }
    float u[4] = {};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= count) break;
      float sj[kMaxStates] = {s[0][j], s[1][j], s[2][j]};
      const float gj = g[j] * b.gscale;
      if constexpr (Op::kAdvanceStates) {
        op.advance(p[j], gj, sj);
        const auto counter = static_cast<std::uint64_t>(i + j) * 4;
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k)
          if (states[k])
            sj[k] = s[k][j] = stored_value(sj[k], cfg.state_storage, cfg.stochastic, b.seed, ustep,
                                           counter + 1 + k);
      }
      u[j] = op.direction(p[j], gj, sj);
    }
    if constexpr (Op::kAdvanceStates) {
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k) {
        if (!states[k]) continue;
        if (vec && count == 4)  // exact: each value is already what the storage holds
          store4(states[k], cfg.state_storage, i, s[k], false, 0, 0, 0);
        else
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (j < count)
              store_from_float(states[k], cfg.state_storage, i + j, s[k][j], false, 0, 0, 0);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= count) break;
      acc_p[j] += static_cast<double>(p[j]) * static_cast<double>(p[j]);
      acc_u[j] += static_cast<double>(u[j]) * static_cast<double>(u[j]);
    }
  }
  block_sum2((acc_p[0] + acc_p[1]) + (acc_p[2] + acc_p[3]),
             (acc_u[0] + acc_u[1]) + (acc_u[2] + acc_u[3]), partial + 2 * blockIdx.x);
}

/// One block per tensor of the launch (`blocks` in all): norms[2t] = ||p||, norms[2t + 1] =
/// ||direction||, from its blocks' sums in the shared order.
__global__ void __launch_bounds__(kBlock)
    trust_norms_kernel(const TensorList list, std::int64_t blocks, const StepConfig cfg,
                       const double* partial, double* norms) {
  if (cfg.d_found_inf && *cfg.d_found_inf != 0.0f) return;
  const int t = static_cast<int>(blockIdx.x);
  const std::int64_t b0 = list.block_start[t];
  const std::int64_t nb = (t + 1 < list.count ? list.block_start[t + 1] : blocks) - b0;
  double sum_p = 0.0, sum_u = 0.0;
  for (std::int64_t c = threadIdx.x; c < nb; c += kBlock) {
    sum_p += partial[2 * (b0 + c)];
    sum_u += partial[2 * (b0 + c) + 1];
  }
  double sums[2];
  block_sum2(sum_p, sum_u, sums);
  if (threadIdx.x == 0) {
    norms[2 * t] = sqrt(sums[0]);
    norms[2 * t + 1] = sqrt(sums[1]);
  }
}

/// Pass two: each block's tensor's rate from its norms (or from the options alone where the
/// functor needs none; `norms` is then not read), then apply() per element.
template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    trust_second_kernel(const typename A::Options options, const typename A::Op host_op,
                        const TensorList list, const StepConfig cfg, const double* norms) {
  using Op = typename A::Op;
  if (cfg.d_found_inf && *cfg.d_found_inf != 0.0f) return;
  __shared__ unsigned long long s_op[(sizeof(Op) + 7) / 8];
  __shared__ std::int64_t s_step;
  __shared__ float s_gscale;
  const TrustBlock b =
      trust_block<A>(options, list, cfg, reinterpret_cast<Op*>(s_op), &s_step, &s_gscale);
  const Op op = cfg.device_scalars ? *reinterpret_cast<const Op*>(s_op) : host_op;
  const float rate =
      op.needs_norms() ? op.rate(norms[2 * b.t], norms[2 * b.t + 1]) : op.rate(0.0, 0.0);
  void* const param = list.param[b.t];
  const void* const grad = list.grad[b.t];
  float* const master = list.master[b.t];
  float* const ema = list.ema[b.t];
  const float ew = cfg.ema_weight;
  void* const states[kMaxStates] = {list.state[0][b.t], list.state[1][b.t], list.state[2][b.t]};
  const auto ustep = static_cast<std::uint64_t>(b.step);
  constexpr bool kGrad = Op::kApplyReadsGrad, kWrite = Op::kApplyWritesStates;

  bool vec = aligned_for4(param, kParamStorage) &&
             (!kGrad || aligned_for4(grad, cfg.grad_storage)) &&
             (!master || aligned_for4(master, kF32)) && (!ema || aligned_for4(ema, kF32));
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k)
    vec = vec && (!states[k] || aligned_for4(states[k], cfg.state_storage));

  std::int64_t i0 = b.begin;
  if (vec) {
    const std::int64_t nvec = (b.end - b.begin) / 4;
    for (std::int64_t v = threadIdx.x; v < nvec; v += kBlock) {
      const std::int64_t i = b.begin + 4 * v;
      float p[4], g[4] = {}, s[kMaxStates][4] = {};
      if (master)
        load4(master, kF32, i, p);
      else
        load4(param, kParamStorage, i, p);
      if (kGrad) load4(grad, cfg.grad_storage, i, g);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k)
        if (states[k]) load4(states[k], cfg.state_storage, i, s[k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sj[kMaxStates] = {s[0][j], s[1][j], s[2][j]};
        op.apply(p[j], g[j] * b.gscale, sj, rate);
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k) s[k][j] = sj[k];
      }
      if (ema) ema_update4(ema, i, p, ew);
      const auto counter = static_cast<std::uint64_t>(i) * 4;
      if (master) store4(master, kF32, i, p, false, 0, 0, 0);
      store4(param, kParamStorage, i, p, cfg.stochastic, b.seed, ustep, counter);
      if (kWrite)
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k)
          if (states[k])
            store4(states[k], cfg.state_storage, i, s[k], cfg.stochastic, b.seed, ustep,
                   counter + 1 + k);
    }
    i0 = b.begin + 4 * nvec;
  }
  for (std::int64_t i = i0 + threadIdx.x; i < b.end; i += kBlock) {
    float p = master ? master[i] : load_as_float(param, kParamStorage, i);
    float s[kMaxStates];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k)
      s[k] = states[k] ? load_as_float(states[k], cfg.state_storage, i) : 0.0f;
    const float g = kGrad ? load_as_float(grad, cfg.grad_storage, i) * b.gscale : 0.0f;
    op.apply(p, g, s, rate);
    if (ema) ema[i] = ema_lerp(ema[i], p, ew);
    const auto counter = static_cast<std::uint64_t>(i) * 4;
    if (master) master[i] = p;
    store_from_float(param, kParamStorage, i, p, cfg.stochastic, b.seed, ustep, counter);
    if (kWrite)
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k)
        if (states[k])
          store_from_float(states[k], cfg.state_storage, i, s[k], cfg.stochastic, b.seed, ustep,
                           counter + 1 + k);
  }
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
