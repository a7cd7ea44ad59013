// The CUDA step over block-quantized optimizer states (state storage kQ8 / kQ4; the state
// contract at the end of kernels/quantize.hpp, docs/quantized-states.md), and the whole-tensor
// conversions of such a state (quantize, dequantize, fill).
//
// A state of n elements is one buffer: its codes (one byte per element, or two 4-bit codes a
// byte, low nibble first), then, 16-byte aligned, one float32 absmax per block of w elements
// (w = 256 for 8 bits, 128 for 4; the last block may be shorter).
//
// The step kernel (multi_tensor_quant_step_kernel) takes the same launches, lists, prologue
// (step_prologue), functor, param / grad / master / EMA loads and stores, and random-draw
// counters as multi_tensor_step_kernel: a thread block owns one 8192-element chunk of one
// tensor, which is a whole number of quantization blocks (the chunk is a multiple of both w).
// Inside it, one warp owns one quantization block at a time (warp j of the thread block takes
// blocks j, j + 8, ... of the chunk): lane l holds its w / 32 consecutive elements (8 for 8-bit
// states, 4 for 4-bit), loads their codes in one vector access (8 bytes, or 2), decodes every
// state (value[code] * absmax), runs the functor in fp32, stores param, master and EMA as the
// elementwise kernel does, and then, per state, reduces the block's new absmax over the warp
// by __shfl_xor_sync (absmax_combine: NaN-propagating, so the bits do not depend on the order)
// before encoding each element (step_code: to nearest, or stochastically with the draw of
// counter 4i + 1 + k) and storing the codes in one vector access; lane 0 stores the absmax.
// A block's codes and absmax are read before, and written after, the warp's shuffles, by the
// one warp that owns it: no other thread touches them in the launch. Every loop over a lane's
// elements runs over all kPerLane of them, unrolled, with a test against `count` in the tail
// (a loop bounded by `count` would index the lane's arrays dynamically: local memory).
//
// The maps (values and decision thresholds) live in __constant__ copies built at compile time
// (quant_warp.cuh, with the lane's code loads and stores and the warp's absmax reduction)
// from quantize.hpp's constexpr tables; each thread block copies the two maps of its width
// (signed, unsigned; 4 KB for 8 bits, 248 bytes for 4) into shared memory before its
// prologue's barrier, since the code lookups are data-dependent (a __constant__ read by lanes
// at different addresses is serialized). StepConfig::non_negative_states (bit k) picks the
// unsigned map for state k.
//
// Bytes per element moved by a step (r: read, w: written): param r+w, grad r, master r+w and
// EMA r+w where present (as in multi_tensor.cuh), and per state r+w of its codes (1 + 1 byte
// for 8 bits, 0.5 + 0.5 for 4) plus r+w of its block's absmax (8 / 256 or 8 / 128 bytes).
// Adam (two states, f32 param and grad): 12 + 2 * (2 + 1/32) = 16.06 bytes (8-bit states) and
// 12 + 2 * (1 + 1/16) = 14.13 (4-bit), against 28 with f32 states; with bf16 param and grad
// and no master: 6 + 4.06 = 10.06 and 6 + 2.13 = 8.13, against 22 and 14 with f32 and bf16
// states.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cuda/multi_tensor.cuh"
#include "fusedopt/kernels/cuda/quant_warp.cuh"
#include "fusedopt/kernels/quantize.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

/// Warps of a thread block of the kernels below (one quantization block a warp at a time).
inline constexpr int kQuantWarps = kBlock / 32;

// ------------------------------------------------------------------------------ the step

/// One step of algorithm A over a list whose states are quantized to kBits (cfg.state_storage
/// kQ8 or kQ4): the semantics of multi_tensor_step_kernel with each state read as
/// decode(map_k, code, absmax) and written per quantization block (the file's header).
template <class A, int kParamStorage, int kBits>
__global__ void __launch_bounds__(kBlock)
    multi_tensor_quant_step_kernel(const typename A::Options options, const typename A::Op host_op,
                                   const TensorList list, const StepConfig cfg) {
  using Op = typename A::Op;
  using Map = QuantMap<kBits>;
  using W = QuantWarp<kBits>;
  constexpr int kPer = W::kPerLane;
  if (cfg.d_found_inf && *cfg.d_found_inf != 0.0f) return;
  __shared__ Map s_maps[2];
  load_quant_maps<kBits>(s_maps);  // published by the prologue's barrier
  const StepBlock<A> b = step_prologue<A>(options, host_op, list, cfg);
  const Op op = b.op;
  const int t = b.t;
  const std::int64_t n = list.numel[t];
  const float gscale = b.gscale;
  const std::uint64_t seed = b.seed, step = b.step;

  void* const param = list.param[t];
  const void* const grad = list.grad[t];
  float* const master = list.master[t];
  float* const ema = list.ema[t];
  const float ew = cfg.ema_weight;
  // Only A's own states are looked at (StateList: known at compile time, so an algorithm with
  // fewer than kMaxStates states compiles no code for the others); the rest read as 0.
  constexpr int kStates = StateList<A>::count;
  unsigned char* codes[kMaxStates] = {};
  float* absmax[kMaxStates] = {};
  bool cvec = true;
#pragma unroll
  for (int k = 0; k < kStates; ++k) {
    codes[k] = static_cast<unsigned char*>(list.state[k][t]);
    absmax[k] =
        codes[k] ? reinterpret_cast<float*>(codes[k] + quant_absmax_offset(n, kBits)) : nullptr;
    cvec = cvec && (!codes[k] || aligned_to(codes[k], W::kCodeAlign));
  }
  const bool vec = aligned_for4(param, kParamStorage) && aligned_for4(grad, cfg.grad_storage) &&
                   (!master || aligned_for4(master, kF32)) && (!ema || aligned_for4(ema, kF32));

  // State k's map: s_maps[1] (unsigned) where bit k of non_negative_states is set.
  const auto map_of = [&cfg](int k) { return (cfg.non_negative_states >> k) & 1u; };
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  for (std::int64_t q = b.begin + warp * W::kBlockSize; q < b.end;
       q += kQuantWarps * W::kBlockSize) {  // uniform over the warp: q is the warp's
    const std::int64_t block = q / W::kBlockSize;
    const std::int64_t i0 = q + lane * kPer;
    const int count = lane_count<kBits>(i0, b.end);
    const bool full = count == kPer;
    float p[kPer], g[kPer], s[kMaxStates][kPer];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k) {
      if (k < kStates && codes[k]) {
        decode_lane<kBits>(codes[k], i0, count, cvec, absmax[k][block], s_maps[map_of(k)], s[k]);
      } else {
#pragma unroll
        for (int j = 0; j < kPer; ++j) s[k][j] = 0.0f;
      }
    }
    if (vec && full) {
#pragma unroll
      for (int j = 0; j < kPer; j += 4) {
        if (master)
          load4(master, kF32, i0 + j, p + j);
        else
          load4(param, kParamStorage, i0 + j, p + j);
        load4(grad, cfg.grad_storage, i0 + j, g + j);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        p[j] = g[j] = 0.0f;
        if (j < count) {
          p[j] = master ? master[i0 + j] : load_as_float(param, kParamStorage, i0 + j);
          g[j] = load_as_float(grad, cfg.grad_storage, i0 + j);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (j >= count) continue;
      float sj[kMaxStates] = {s[0][j], s[1][j], s[2][j]};
      op(p[j], g[j] * gscale, sj);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k) s[k][j] = sj[k];
    }
    if (vec && full) {
#pragma unroll
      for (int j = 0; j < kPer; j += 4) {
        if (ema) ema_update4(ema, i0 + j, p + j, ew);
        if (master) store4(master, kF32, i0 + j, p + j, false, 0, 0, 0);
        store4(param, kParamStorage, i0 + j, p + j, cfg.stochastic, seed, step,
               static_cast<std::uint64_t>(i0 + j) * 4);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        if (j >= count) continue;
        const std::int64_t i = i0 + j;
        if (ema) ema[i] = ema_lerp(ema[i], p[j], ew);
        if (master) master[i] = p[j];
        store_from_float(param, kParamStorage, i, p[j], cfg.stochastic, seed, step,
                         static_cast<std::uint64_t>(i) * 4);
      }
    }
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      if (!codes[k]) continue;  // uniform: the same tensor for the whole block
      float m = 0.0f;
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (j < count) m = absmax_combine(m, fabsf(s[k][j]));
      const float a = stored_absmax(warp_absmax(m));
      int c[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        c[j] = j < count ? step_code(s_maps[map_of(k)], normalized(s[k][j], a), cfg.stochastic,
                                     seed, step, static_cast<std::uint64_t>(i0 + j) * 4 + 1 + k)
                         : 0;
      store_codes<kBits>(codes[k], i0, count, cvec, c);
      if (lane == 0) absmax[k][block] = a;
    }
  }
}

// ------------------------------------------------------------ whole-tensor conversions

/// What a thread of a whole-tensor conversion starts from: its map, whether the state's codes
/// take a lane's vector access, its lane, and its warp's walk over the state's quantization
/// blocks (one warp per block, grid-stride: blocks first, first + stride, ... below `blocks`;
/// uniform over the warp).
template <int kBits>
struct QuantConversion {
  const QuantMap<kBits>& map;
  bool cvec;
  int lane;
  std::int64_t first, stride, blocks;
};

/// The conversions' shared prologue, called by every thread of the block: copies the two maps
/// of kBits into the block's shared `s_maps` and publishes them (the barrier), then picks the
/// signed or the unsigned one. `codes`: the state buffer of n elements.
template <int kBits>
__device__ __forceinline__ QuantConversion<kBits> quant_conversion(QuantMap<kBits>* s_maps,
                                                                   bool non_negative,
                                                                   const void* codes,
                                                                   std::int64_t n) {
  load_quant_maps<kBits>(s_maps);
  __syncthreads();
  return {s_maps[non_negative ? 1 : 0],
          aligned_to(codes, QuantWarp<kBits>::kCodeAlign),
          static_cast<int>(threadIdx.x % 32),
          static_cast<std::int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / 32,
          static_cast<std::int64_t>(gridDim.x) * kQuantWarps,
          quant_blocks(n, kBits)};
}

/// The state buffer `dst` of n elements <- src[0, n) (float32), or n copies of `value` where
/// src is null, quantized to nearest (step_code without stochastic rounding, which is
/// quantize_block8/4 with NearestRounding). One warp per quantization block, grid-stride. The
/// whole buffer is written, the padding between the codes and the absmax included (zeros).
template <int kBits>
__global__ void __launch_bounds__(kBlock)
    quantize_state_kernel(void* dst, bool non_negative, const float* src, float value,
                          std::int64_t n) {
  using W = QuantWarp<kBits>;
  constexpr int kPer = W::kPerLane;
  __shared__ QuantMap<kBits> s_maps[2];
  auto* const codes = static_cast<unsigned char*>(dst);
  const QuantConversion<kBits> cv = quant_conversion<kBits>(s_maps, non_negative, codes, n);
  float* const absmax = reinterpret_cast<float*>(codes + quant_absmax_offset(n, kBits));
  const bool svec = src && aligned_for4(src, kF32);
  if (blockIdx.x == 0) {
    // The padding (under 16 bytes, which no code store reaches) is zero, as the CPU writes it
    // (zero_quant_padding): a checkpoint saves the whole buffer, the same bytes from either
    // backend, never what the allocation held before.
    const std::int64_t pad = quant_code_bytes(n, kBits) + threadIdx.x;
    if (pad < quant_absmax_offset(n, kBits)) codes[pad] = 0;
  }
  for (std::int64_t block = cv.first; block < cv.blocks; block += cv.stride) {
    const std::int64_t i0 = block * W::kBlockSize + cv.lane * kPer;
    const int count = lane_count<kBits>(i0, n);
    float x[kPer];
    if (svec && count == kPer) {
#pragma unroll
      for (int j = 0; j < kPer; j += 4) load4(src, kF32, i0 + j, x + j);
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j) x[j] = j < count ? (src ? src[i0 + j] : value) : 0.0f;
    }
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (j < count) m = absmax_combine(m, fabsf(x[j]));
    const float a = stored_absmax(warp_absmax(m));
    int c[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) c[j] = j < count ? nearest_code(cv.map, normalized(x[j], a)) : 0;
    store_codes<kBits>(codes, i0, count, cv.cvec, c);
    if (cv.lane == 0) absmax[block] = a;
  }
}

/// dst[0, n) <- the state buffer `src` of n elements decoded (value[code] * absmax).
template <int kBits>
__global__ void __launch_bounds__(kBlock)
    dequantize_state_kernel(float* dst, const void* src, bool non_negative, std::int64_t n) {
  using W = QuantWarp<kBits>;
  constexpr int kPer = W::kPerLane;
  __shared__ QuantMap<kBits> s_maps[2];
  const auto* const codes = static_cast<const unsigned char*>(src);
  const QuantConversion<kBits> cv = quant_conversion<kBits>(s_maps, non_negative, codes, n);
  const float* const absmax = reinterpret_cast<const float*>(codes + quant_absmax_offset(n, kBits));
  const bool dvec = aligned_for4(dst, kF32);
  for (std::int64_t block = cv.first; block < cv.blocks; block += cv.stride) {
    const std::int64_t i0 = block * W::kBlockSize + cv.lane * kPer;
    const int count = lane_count<kBits>(i0, n);
    if (count == 0) continue;  // no shuffle below: lanes may leave
    int c[kPer];
    load_codes<kBits>(codes, i0, count, cv.cvec, c);
    const float a = absmax[block];
    float x[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) x[j] = decode(cv.map, c[j], a);
    if (dvec && count == kPer) {
#pragma unroll
      for (int j = 0; j < kPer; j += 4) store4(dst, kF32, i0 + j, x + j, false, 0, 0, 0);
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (j < count) dst[i0 + j] = x[j];
    }
  }
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
