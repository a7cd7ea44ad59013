// The warp-level pieces of the kernels over block-quantized states (state storage q8 / q4;
// docs/quantized-states.md): the maps in __constant__ memory and their copy into shared memory,
// a lane's codes loaded and stored in one vector access, and a block's absmax reduced over the
// warp. One warp owns one quantization block: lane l holds its w / 32 consecutive elements.
// Shared by the dense step (quantized_step.cuh, cuda_backend.cu) and the sparse row step over
// quantized states (sparse_quant_rows.cuh, sparse_launch.cu): separate translation units, each
// with its own `static` copy of the maps.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/quantize.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

/// The maps on the device: [0] signed, [1] unsigned (the kernels never read quantize.hpp's
/// host objects). `static`: each translation unit that includes this header has its own copy.
static __constant__ QuantMap<8> c_quant_maps8[2] = {kQuantMap8Signed, kQuantMap8Unsigned};
static __constant__ QuantMap<4> c_quant_maps4[2] = {kQuantMap4Signed, kQuantMap4Unsigned};

/// The geometry of a warp's quantization block of kBits states.
template <int kBits>
struct QuantWarp {
  static_assert(kBits == 8 || kBits == 4, "quantized states are 8 or 4 bits");
  static constexpr int kBlockSize = static_cast<int>(quant_block_size(kBits));
  static constexpr int kPerLane = kBlockSize / 32;  // 8 or 4 consecutive elements a lane
  static constexpr unsigned kCodeAlign = kBits == 8 ? 8u : 2u;  // bytes of a lane's codes
  static_assert(kPerLane % 4 == 0, "a lane's elements are whole groups of four");
};

template <int kBits>
__device__ __forceinline__ const QuantMap<kBits>* constant_quant_maps() {
  if constexpr (kBits == 8)
    return c_quant_maps8;
  else
    return c_quant_maps4;
}

/// Copies the two maps of kBits into `s_maps` (shared memory), all threads of the block
/// together; the caller's next __syncthreads publishes them.
template <int kBits>
__device__ __forceinline__ void load_quant_maps(QuantMap<kBits>* s_maps) {
  constexpr int kWords = static_cast<int>(2 * sizeof(QuantMap<kBits>) / sizeof(float));
  const float* const src = reinterpret_cast<const float*>(constant_quant_maps<kBits>());
  float* const dst = reinterpret_cast<float*>(s_maps);
  for (int w = static_cast<int>(threadIdx.x); w < kWords; w += static_cast<int>(blockDim.x))
    dst[w] = src[w];
}

/// Lane's elements of a block: how many of [i0, i0 + kPerLane) are below `end`.
template <int kBits>
__device__ __forceinline__ int lane_count(std::int64_t i0, std::int64_t end) {
  const std::int64_t left = end - i0;
  return left <= 0                           ? 0
         : left < QuantWarp<kBits>::kPerLane ? static_cast<int>(left)
                                             : QuantWarp<kBits>::kPerLane;
}

/// The codes of elements [i0, i0 + count) (i0 a multiple of kPerLane) into c[0, kPerLane);
/// one 8- or 2-byte access for a whole lane when `vec` (the code array is aligned for it).
template <int kBits>
__device__ __forceinline__ void load_codes(const unsigned char* codes, std::int64_t i0, int count,
                                           bool vec, int* c) {
  constexpr int kPer = QuantWarp<kBits>::kPerLane;
  if constexpr (kBits == 8) {
    if (vec && count == kPer) {
      const uint2 v = *reinterpret_cast<const uint2*>(codes + i0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        c[j] = static_cast<int>((v.x >> (8 * j)) & 0xFFu);
        c[4 + j] = static_cast<int>((v.y >> (8 * j)) & 0xFFu);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j) c[j] = j < count ? codes[i0 + j] : 0;
    }
  } else {
    const unsigned char* const bytes = codes + i0 / 2;
    unsigned bits = 0;
    if (vec && count == kPer) {
      bits = *reinterpret_cast<const std::uint16_t*>(bytes);
    } else {
#pragma unroll
      for (int j = 0; j < kPer / 2; ++j)
        if (2 * j < count) bits |= static_cast<unsigned>(bytes[j]) << (8 * j);
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) c[j] = static_cast<int>((bits >> (4 * j)) & 0xFu);
  }
}

/// Stores codes c[0, count) of elements [i0, i0 + count); c[j] is 0 for j >= count (a 4-bit
/// odd tail's high nibble).
template <int kBits>
__device__ __forceinline__ void store_codes(unsigned char* codes, std::int64_t i0, int count,
                                            bool vec, const int* c) {
  constexpr int kPer = QuantWarp<kBits>::kPerLane;
  if constexpr (kBits == 8) {
    if (vec && count == kPer) {
      unsigned lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        lo |= static_cast<unsigned>(c[j]) << (8 * j);
        hi |= static_cast<unsigned>(c[4 + j]) << (8 * j);
      }
      *reinterpret_cast<uint2*>(codes + i0) = make_uint2(lo, hi);
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (j < count) codes[i0 + j] = static_cast<unsigned char>(c[j]);
    }
  } else {
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) bits |= static_cast<unsigned>(c[j]) << (4 * j);
    unsigned char* const bytes = codes + i0 / 2;
    if (vec && count == kPer) {
      *reinterpret_cast<std::uint16_t*>(bytes) = static_cast<std::uint16_t>(bits);
    } else {
#pragma unroll
      for (int j = 0; j < kPer / 2; ++j)
        if (2 * j < count) bytes[j] = static_cast<unsigned char>((bits >> (8 * j)) & 0xFFu);
    }
  }
}

/// The largest magnitude over the warp's lanes' `m` (every lane gets it). Full mask: every
/// caller's loop is uniform over the warp.
__device__ __forceinline__ float warp_absmax(float m) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) m = absmax_combine(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

/// A lane's values of one state: its codes of elements [i0, i0 + count) (load_codes) decoded
/// with `map` and the block's absmax `a` into out[0, kPerLane).
template <int kBits>
__device__ __forceinline__ void decode_lane(const unsigned char* codes, std::int64_t i0, int count,
                                            bool vec, float a, const QuantMap<kBits>& map,
                                            float* out) {
  int c[QuantWarp<kBits>::kPerLane];
  load_codes<kBits>(codes, i0, count, vec, c);
#pragma unroll
  for (int j = 0; j < QuantWarp<kBits>::kPerLane; ++j) out[j] = decode(map, c[j], a);
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
