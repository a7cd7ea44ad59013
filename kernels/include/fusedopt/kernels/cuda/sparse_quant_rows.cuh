// The sparse row step over block-quantized states (state dtype q8 or q4; host/src/sparse.hpp
// gives the contract, docs/quantized-states.md "Sparse steps"): the per-element row kernel of
// sparse_rows.cuh with each state read as decode(map_k, code, absmax) and written back per
// quantization block, to nearest.
//
// dim is a multiple of the block size w (256 for 8 bits, 128 for 4), so each row owns
// dim / w whole blocks. One warp owns one (run, block) pair at a time: pair q is block
// q % (dim / w) of run q / (dim / w); the warps of the grid stride over runs * (dim / w) pairs
// (the number of runs is read from device memory). Lane l holds the block's w / 32 consecutive
// elements from l * w / 32 (quant_warp.cuh): it loads their codes in one vector access, decodes
// every present state, sums each column's gradient rows (summed_gradient: the one order of every
// sparse step), runs the functor in fp32 and stores the param; then, per state, the block's new
// absmax is reduced over the warp by __shfl_xor_sync (absmax_combine, from 0: the same bits in
// any order), each element is encoded to nearest and lane 0 stores the absmax. A block is read
// and written by its one warp only (distinct runs are distinct rows); rows not named are never
// touched, codes or absmax.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/cuda/quant_warp.cuh"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/cuda/sparse_rows.cuh"
#include "fusedopt/kernels/quantize.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

/// Threads per block of sparse_quant_rows_kernel (kSparseQuantWarps warps).
inline constexpr int kSparseQuantThreads = 256;
inline constexpr int kSparseQuantWarps = kSparseQuantThreads / 32;

/// The state buffers of a sparse step over quantized states: states[k] of the step as bytes
/// (null where the algorithm keeps none), each rows * dim elements (quantize.hpp's layout).
struct QuantStatePtrs {
  unsigned char* p[kMaxStates];
};

/// One sparse step of the per-element functor `op` over states quantized to kBits; bit k of
/// non_negative_states picks the unsigned map for state k. blockDim.x == kSparseQuantThreads.
template <class Op, class T, int kBits>
__global__ void __launch_bounds__(kSparseQuantThreads)
    sparse_quant_rows_kernel(Op op, float* table, QuantStatePtrs states,
                             unsigned non_negative_states, std::int64_t rows, std::int64_t dim,
                             const float* grad_rows, const T* unique_rows, const Pos* offsets,
                             const Pos* sorted_positions, const Pos* num_runs, std::int64_t nnz) {
  using W = QuantWarp<kBits>;
  constexpr int kPer = W::kPerLane;
  __shared__ QuantMap<kBits> s_maps[2];
  load_quant_maps<kBits>(s_maps);
  __syncthreads();
  const std::int64_t n = rows * dim;
  unsigned char* codes[kMaxStates];
  float* absmax[kMaxStates];
  bool cvec = true;
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k) {
    codes[k] = states.p[k];
    absmax[k] =
        codes[k] ? reinterpret_cast<float*>(codes[k] + quant_absmax_offset(n, kBits)) : nullptr;
    cvec = cvec && (!codes[k] || aligned_to(codes[k], W::kCodeAlign));
  }
  const auto map_of = [non_negative_states](int k) { return (non_negative_states >> k) & 1u; };
  const std::int64_t per_row = dim / W::kBlockSize;
  const std::int64_t pairs = static_cast<std::int64_t>(*num_runs) * per_row;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * kSparseQuantWarps;
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (std::int64_t q =
           static_cast<std::int64_t>(blockIdx.x) * kSparseQuantWarps + threadIdx.x / 32;
       q < pairs; q += warps) {  // uniform over the warp: q is the warp's
    const std::int64_t r = q / per_row;
    const std::int64_t col0 = (q % per_row) * W::kBlockSize + lane * kPer;  // the lane's first
    const std::int64_t begin = offsets[r];
    const std::int64_t end = r + 1 < *num_runs ? static_cast<std::int64_t>(offsets[r + 1]) : nnz;
    const std::int64_t row_base = static_cast<std::int64_t>(unique_rows[r]) * dim;
    const std::int64_t block = (row_base + col0) / W::kBlockSize;  // in the state's absmax
    const std::int64_t i0 = row_base + col0;
    float s[kMaxStates][kPer];
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k) {
      if (codes[k]) {
        decode_lane<kBits>(codes[k], i0, kPer, cvec, absmax[k][block], s_maps[map_of(k)], s[k]);
      } else {
#pragma unroll
        for (int j = 0; j < kPer; ++j) s[k][j] = 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const float g = summed_gradient(grad_rows, sorted_positions, begin, end, dim, col0 + j);
      float p = table[i0 + j];
      float sj[kMaxStates];
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k) sj[k] = s[k][j];
      op(p, g, sj);
      table[i0 + j] = p;
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k) s[k][j] = sj[k];
    }
#pragma unroll
    for (int k = 0; k < kMaxStates; ++k) {
      if (!codes[k]) continue;  // uniform: the same states for the whole launch
      float m = 0.0f;
#pragma unroll
      for (int j = 0; j < kPer; ++j) m = absmax_combine(m, fabsf(s[k][j]));
      const float a = stored_absmax(warp_absmax(m));
      int c[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) c[j] = nearest_code(s_maps[map_of(k)], normalized(s[k][j], a));
      store_codes<kBits>(codes[k], i0, kPer, cvec, c);
      if (lane == 0) absmax[k][block] = a;
    }
  }
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
