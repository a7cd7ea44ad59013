// The CUDA kernels of a step: a multi-tensor elementwise kernel over any optimizer functor,
// the deterministic gradient-norm pass that feeds clipping and the non-finite check, and the
// device-side step counter of capturable steps.
//
// One launch updates up to kMaxListTensors tensors: block b finds its tensor by binary search
// in block_start and works on one chunk of it, so tensors of any mix of sizes share a launch.
// Storage: params f32, bf16 or f16 (template), grads the param type or f32 and states f32 or
// bf16 (uniform runtime codes), optional f32 master weights. All math is fp32 in the functor;
// low-precision writes round to nearest even, or stochastically with a counter-based draw
// keyed by (seed, param, step, element): reproducible. An optional f32 weight EMA per tensor
// is updated in the same pass (kernels/ema.hpp) from the f32 value the functor produced:
// the master weight where there is one, else the param's value before it is rounded.
// Bytes per element: param r+w, grad r, each state r+w, master r+w, ema r+w; nothing else.
// States quantized to 8 or 4 bits (kQ8, kQ4) take their own kernel, quantized_step.cuh, with
// the same prologue (step_prologue below).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/ema.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

inline constexpr int kBlock = 256;
// Kernel parameters of up to 32 KB (CUDA 12.1+, sm_70+) hold this many tensors per launch.
inline constexpr int kMaxListTensors = 256;

/// Storage codes, numbered as fo::DType. kQ8 and kQ4: block-quantized states only
/// (quantize.hpp's state contract; quantized_step.cuh), never a param, grad or master.
enum Storage : int { kF32 = 0, kF16 = 1, kBF16 = 2, kQ8 = 5, kQ4 = 6 };

struct TensorList {
  void* param[kMaxListTensors];
  const void* grad[kMaxListTensors];
  float* master[kMaxListTensors];  // null: no master weights
  float* ema[kMaxListTensors];     // f32 weight EMA, or null (every tensor or none: see cfg)
  void* state[kMaxStates][kMaxListTensors];
  std::int64_t numel[kMaxListTensors];
  std::int64_t block_start[kMaxListTensors];  // first block of each tensor in this launch
  std::int64_t step[kMaxListTensors];         // the step being taken (host-counted)
  int key[kMaxListTensors];                   // stable param id: RNG stream, device step slot
  double* scalars[kMaxListTensors];           // the algorithm's scalar states (ScalarList), or null
  int count;
};

struct StepConfig {
  int grad_storage;              // kF32, or the param's storage
  int state_storage;             // kF32 or kBF16; kQ8 or kQ4 (quantized_step.cuh's kernel only)
  unsigned non_negative_states;  // bit k: a quantized state k takes the unsigned map
  bool stochastic;               // stochastic rounding of low-precision writes
  std::uint64_t seed;
  float grad_multiplier;           // host multiplier of every gradient (1/loss scale)
  float ema_weight;                // 1 - decay of the weight EMA (list.ema), when present
  bool device_scalars;             // build the functor on the device (d_lr, d_steps or the
                                   // algorithm's scalar states live there)
  const float* d_lr;               // capturable: lr in device memory, or null
  const std::int64_t* d_steps;     // capturable: steps taken, per key, or null
  const float* d_grad_multiplier;  // device multiplier of every gradient, or null
  const float* d_clip;             // clipping coefficient from the norm pass, or null
  const float* d_found_inf;        // non-zero: skip the whole step; or null
  std::int64_t chunk;              // elements per block
};

// ----------------------------------------------------------------------- loads and stores

__device__ __forceinline__ float load_as_float(const void* p, int storage, std::int64_t i) {
  switch (storage) {
    case kBF16: return to_float(static_cast<const bf16*>(p)[i]);
    case kF16: return to_float(static_cast<const f16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

template <class T>
__device__ __forceinline__ T round_to(float x, bool stochastic, std::uint64_t seed,
                                      std::uint64_t step, std::uint64_t counter) {
  if (stochastic) return from_float_stochastic<T>(x, random_bits(seed, step, counter));
  return from_float<T>(x);
}

__device__ __forceinline__ void store_from_float(void* p, int storage, std::int64_t i, float x,
                                                 bool stochastic, std::uint64_t seed,
                                                 std::uint64_t step, std::uint64_t counter) {
  switch (storage) {
    case kBF16:
      static_cast<bf16*>(p)[i] = round_to<bf16>(x, stochastic, seed, step, counter);
      break;
    case kF16: static_cast<f16*>(p)[i] = round_to<f16>(x, stochastic, seed, step, counter); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

// Four consecutive elements; the caller guarantees 4-element alignment of the pointer.
__device__ __forceinline__ void load4(const void* p, int storage, std::int64_t i, float* out) {
  if (storage == kF32) {
    const float4 v = static_cast<const float4*>(p)[i / 4];
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    return;
  }
  const uint2 v = static_cast<const uint2*>(p)[i / 4];  // four 16-bit values
  const std::uint16_t h[4] = {
      static_cast<std::uint16_t>(v.x & 0xFFFFu), static_cast<std::uint16_t>(v.x >> 16),
      static_cast<std::uint16_t>(v.y & 0xFFFFu), static_cast<std::uint16_t>(v.y >> 16)};
  for (int j = 0; j < 4; ++j)
    out[j] = storage == kBF16 ? to_float(bf16{h[j]}) : to_float(f16{h[j]});
}

__device__ __forceinline__ void store4(void* p, int storage, std::int64_t i, const float* x,
                                       bool stochastic, std::uint64_t seed, std::uint64_t step,
                                       std::uint64_t counter0) {
  if (storage == kF32) {
    static_cast<float4*>(p)[i / 4] = make_float4(x[0], x[1], x[2], x[3]);
    return;
  }
  std::uint16_t h[4];
  for (int j = 0; j < 4; ++j)
    h[j] = storage == kBF16 ? round_to<bf16>(x[j], stochastic, seed, step, counter0 + 4 * j).bits
                            : round_to<f16>(x[j], stochastic, seed, step, counter0 + 4 * j).bits;
  static_cast<uint2*>(p)[i / 4] = make_uint2(h[0] | (static_cast<std::uint32_t>(h[1]) << 16),
                                             h[2] | (static_cast<std::uint32_t>(h[3]) << 16));
}

/// The weight EMA of four consecutive elements (4-aligned), from the f32 values p a step
/// produced, before a 16-bit param rounds them.
__device__ __forceinline__ void ema_update4(float* ema, std::int64_t i, const float* p, float w) {
  float e[4];
  load4(ema, kF32, i, e);
#pragma unroll
  for (int j = 0; j < 4; ++j) e[j] = ema_lerp(e[j], p[j], w);
  store4(ema, kF32, i, e, false, 0, 0, 0);
}

__device__ __forceinline__ bool aligned_for4(const void* p, int storage) {
  const unsigned bytes = storage == kF32 ? 16u : 8u;
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

/// The tensor of block `b`: the last t with block_start[t] <= b.
__device__ __forceinline__ int find_tensor(const TensorList& list, std::int64_t b) {
  int lo = 0, hi = list.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (list.block_start[mid] <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// ------------------------------------------------------------------------------ the step

/// What a block of a step starts from (step_prologue): its tensor t and its range [begin, end)
/// of it, the functor, the step being taken, the multiplier of every gradient and the random
/// stream's seed of the tensor.
template <class A>
struct StepBlock {
  typename A::Op op;
  int t;
  std::int64_t begin, end;
  std::uint64_t step;
  float gscale;
  std::uint64_t seed;
};

/// The prologue every thread of a step's block runs (it holds a __syncthreads: all of them,
/// after the found_inf check). The functor's step scalars (make_op: powers and a square root
/// in double) are computed once, never per thread: by the host, which passes them in
/// `host_op`, when the step count and the lr are host values (every tensor of the launch then
/// takes the same step); when either lives in device memory (capturable steps), or the
/// algorithm keeps scalar states (which live there), by thread 0 of each block into shared
/// memory, from its tensor's device step count and scalars. The scalars are only read here:
/// advance_scalars_kernel writes their next values after the launch.
template <class A>
__device__ __forceinline__ StepBlock<A> step_prologue(const typename A::Options& options,
                                                      const typename A::Op& host_op,
                                                      const TensorList& list,
                                                      const StepConfig& cfg) {
  using Op = typename A::Op;
  static_assert(std::is_trivially_copyable<Op>::value, "a functor travels by bytes");
  StepBlock<A> b{};
  b.t = find_tensor(list, blockIdx.x);
  const int t = b.t;
  b.begin = (blockIdx.x - list.block_start[t]) * cfg.chunk;
  b.end = b.begin + cfg.chunk < list.numel[t] ? b.begin + cfg.chunk : list.numel[t];

  static_assert(alignof(Op) <= 8, "the functor's shared copy is 8-byte aligned");
  __shared__ unsigned long long s_op[(sizeof(Op) + 7) / 8];
  __shared__ std::int64_t s_step;
  __shared__ float s_gscale;
  if (threadIdx.x == 0) {
    const std::int64_t step_taken = cfg.d_steps ? cfg.d_steps[list.key[t]] + 1 : list.step[t];
    if (cfg.device_scalars) {
      typename A::Options o = options;
      if (cfg.d_lr) o.lr *= static_cast<double>(*cfg.d_lr);  // a schedule's factor
      double next[kMaxScalars];
      *reinterpret_cast<Op*>(s_op) = make_step_op<A>(o, step_taken, list.scalars[t], next);
    }
    float gs = cfg.grad_multiplier;  // the multiplier of every gradient
    if (cfg.d_grad_multiplier) gs *= *cfg.d_grad_multiplier;
    if (cfg.d_clip) gs *= *cfg.d_clip;
    s_step = step_taken;
    s_gscale = gs;
  }
  __syncthreads();
  b.op = cfg.device_scalars ? *reinterpret_cast<const Op*>(s_op) : host_op;
  b.step = static_cast<std::uint64_t>(s_step);
  b.gscale = s_gscale;
  b.seed = cfg.seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(list.key[t] + 1));
  return b;
}

/// Random-draw counters: element i's param uses 4i, its state k uses 4i + 1 + k.
template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    multi_tensor_step_kernel(const typename A::Options options, const typename A::Op host_op,
                             const TensorList list, const StepConfig cfg) {
  using Op = typename A::Op;
  if (cfg.d_found_inf && *cfg.d_found_inf != 0.0f) return;
  const StepBlock<A> b = step_prologue<A>(options, host_op, list, cfg);
  const Op op = b.op;
  const int t = b.t;
  const std::int64_t begin = b.begin, end = b.end;
  const float gscale = b.gscale;

  void* const param = list.param[t];
  const void* const grad = list.grad[t];
  float* const master = list.master[t];
  float* const ema = list.ema[t];
  const float ew = cfg.ema_weight;
  void* const s0 = list.state[0][t];
  void* const s1 = list.state[1][t];
  void* const s2 = list.state[2][t];
  void* const states[kMaxStates] = {s0, s1, s2};
  const std::uint64_t seed = b.seed;
  const std::uint64_t ustep = b.step;

  bool vec = aligned_for4(param, kParamStorage) && aligned_for4(grad, cfg.grad_storage) &&
             (!master || aligned_for4(master, kF32)) && (!ema || aligned_for4(ema, kF32));
  for (int k = 0; k < kMaxStates; ++k)
    vec = vec && (!states[k] || aligned_for4(states[k], cfg.state_storage));

  std::int64_t i0 = begin;
  if (vec) {
    const std::int64_t nvec = (end - begin) / 4;
    for (std::int64_t v = threadIdx.x; v < nvec; v += kBlock) {
      const std::int64_t i = begin + 4 * v;
      float p[4], g[4], s[kMaxStates][4];
      if (master)
        load4(master, kF32, i, p);
      else
        load4(param, kParamStorage, i, p);
      load4(grad, cfg.grad_storage, i, g);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k) {
        if (states[k])
          load4(states[k], cfg.state_storage, i, s[k]);
        else
          s[k][0] = s[k][1] = s[k][2] = s[k][3] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sj[kMaxStates] = {s[0][j], s[1][j], s[2][j]};
        op(p[j], g[j] * gscale, sj);
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k) s[k][j] = sj[k];
      }
      if (ema) ema_update4(ema, i, p, ew);
      const auto counter = static_cast<std::uint64_t>(i) * 4;
      if (master) store4(master, kF32, i, p, false, 0, 0, 0);
      store4(param, kParamStorage, i, p, cfg.stochastic, seed, ustep, counter);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k)
        if (states[k])
          store4(states[k], cfg.state_storage, i, s[k], cfg.stochastic, seed, ustep,
                 counter + 1 + k);
    }
    i0 = begin + 4 * nvec;
  }
  for (std::int64_t i = i0 + threadIdx.x; i < end; i += kBlock) {
    float p = master ? master[i] : load_as_float(param, kParamStorage, i);
    float s[kMaxStates];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k)
      s[k] = states[k] ? load_as_float(states[k], cfg.state_storage, i) : 0.0f;
    op(p, load_as_float(grad, cfg.grad_storage, i) * gscale, s);
    if (ema) ema[i] = ema_lerp(ema[i], p, ew);
    const auto counter = static_cast<std::uint64_t>(i) * 4;
    if (master) master[i] = p;
    store_from_float(param, kParamStorage, i, p, cfg.stochastic, seed, ustep, counter);
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k)
      if (states[k])
        store_from_float(states[k], cfg.state_storage, i, s[k], cfg.stochastic, seed, ustep,
                         counter + 1 + k);
  }
}

// ------------------------------------------------------------------- gradient norm pass

/// Per block: the sum of squares of its chunk of scaled gradients, accumulated in double (a
/// sum of float squares overflows fp32 long before any gradient is non-finite), in a fixed
/// order: each thread a fixed stride, then a fixed tree. partial[2 * (offset + b)] = sum,
/// partial[2 * (offset + b) + 1] = 1 if the block saw a non-finite value.
__global__ void __launch_bounds__(kBlock)
    grad_sumsq_kernel(const TensorList list, int grad_storage, float grad_multiplier,
                      const float* d_grad_multiplier, std::int64_t chunk, double* partial,
                      std::int64_t offset) {
  const int t = find_tensor(list, blockIdx.x);
  const std::int64_t begin = (blockIdx.x - list.block_start[t]) * chunk;
  const std::int64_t end = begin + chunk < list.numel[t] ? begin + chunk : list.numel[t];
  float scale = grad_multiplier;
  if (d_grad_multiplier) scale *= *d_grad_multiplier;
  double sum = 0.0;
  bool bad = false;
  for (std::int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
    const float g = load_as_float(list.grad[t], grad_storage, i) * scale;
    bad = bad || !isfinite(g);
    sum = fma(static_cast<double>(g), static_cast<double>(g), sum);
  }
  __shared__ double s_sum[kBlock];
  __shared__ int s_bad[kBlock];
  s_sum[threadIdx.x] = sum;
  s_bad[threadIdx.x] = bad;
  __syncthreads();
  for (unsigned w = kBlock / 2; w > 0; w /= 2) {  // a fixed tree: the same bits every run
    if (threadIdx.x < w) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + w];
      s_bad[threadIdx.x] |= s_bad[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[2 * (offset + blockIdx.x)] = s_sum[0];
    partial[2 * (offset + blockIdx.x) + 1] = s_bad[0] ? 1.0 : 0.0;
  }
}

/// One block: the global norm from the partials (fixed order), the clipping coefficient
/// min(1, max_norm / (norm + 1e-6)) (1 when max_norm <= 0), and found_inf (OR-ed in when
/// check_finite, never cleared: a caller's found_inf from elsewhere is kept).
__global__ void __launch_bounds__(kBlock)
    finalize_norm_kernel(const double* partial, std::int64_t blocks, float max_norm,
                         bool check_finite, float* d_norm, float* d_clip, float* d_found_inf) {
  __shared__ double s_sum[kBlock];
  __shared__ int s_bad[kBlock];
  double sum = 0.0;
  int bad = 0;
  for (std::int64_t b = threadIdx.x; b < blocks; b += kBlock) {
    sum += partial[2 * b];
    bad |= partial[2 * b + 1] != 0.0;
  }
  s_sum[threadIdx.x] = sum;
  s_bad[threadIdx.x] = bad;
  __syncthreads();
  for (unsigned w = kBlock / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + w];
      s_bad[threadIdx.x] |= s_bad[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const auto norm = static_cast<float>(sqrt(s_sum[0]));
    if (d_norm) *d_norm = norm;
    if (d_clip) *d_clip = max_norm > 0.0f ? fminf(1.0f, max_norm / (norm + 1e-6f)) : 1.0f;
    if (d_found_inf && check_finite && s_bad[0]) *d_found_inf = 1.0f;
  }
}

/// After a launch's step, before its step counts go up: each tensor's scalar states take
/// the values its step's functor was built from (make_step_op's `next`), unless the step was
/// skipped (found_inf). One thread per tensor; the same double arithmetic as the blocks'.
template <class A>
__global__ void advance_scalars_kernel(const typename A::Options options, const TensorList list,
                                       const StepConfig cfg) {
  if (cfg.d_found_inf && *cfg.d_found_inf != 0.0f) return;
  for (int i = static_cast<int>(threadIdx.x); i < list.count; i += static_cast<int>(blockDim.x)) {
    const std::int64_t step_taken = cfg.d_steps ? cfg.d_steps[list.key[i]] + 1 : list.step[i];
    typename A::Options o = options;
    if (cfg.d_lr) o.lr *= static_cast<double>(*cfg.d_lr);
    double next[kMaxScalars];
    (void)make_step_op<A>(o, step_taken, list.scalars[i], next);
    for (int k = 0; k < ScalarList<A>::count; ++k) list.scalars[i][k] = next[k];
  }
}

/// eval(): param <- op(param, states) elementwise (EvalCapable), from and into the master
/// weights where there are some (the param then takes them rounded to nearest).
template <class A, int kParamStorage>
__global__ void __launch_bounds__(kBlock)
    eval_kernel(const typename A::EvalOp op, void* param, float* master, void* s0, void* s1,
                void* s2, int state_storage, std::int64_t n) {
  void* const states[kMaxStates] = {s0, s1, s2};
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float s[kMaxStates];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k)
      s[k] = states[k] ? load_as_float(states[k], state_storage, i) : 0.0f;
    const float x = op(master ? master[i] : load_as_float(param, kParamStorage, i), s);
    if (master) master[i] = x;
    store_from_float(param, kParamStorage, i, x, false, 0, 0, 0);
  }
}

/// After a launch's step: the device step count of each of its tensors goes up by one,
/// unless the step was skipped (found_inf).
__global__ void increment_steps_kernel(std::int64_t* d_steps, const TensorList list,
                                       const float* d_found_inf) {
  if (d_found_inf && *d_found_inf != 0.0f) return;
  for (int i = static_cast<int>(threadIdx.x); i < list.count; i += static_cast<int>(blockDim.x))
    d_steps[list.key[i]] += 1;
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
