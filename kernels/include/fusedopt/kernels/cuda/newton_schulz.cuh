// The CUDA kernels of the Newton-Schulz iteration's scale (kernels/newton_schulz.hpp),
// X = G / max(||G||_F, eps) for each matrix of a batch, launched by newton_schulz_normalize
// (host/src/cuda/cuda_backend.cu) before the cuBLAS GEMMs (newton_schulz.cu), in stream
// order with no host sync between them:
//   ns_sum_squares_kernel  one block per chunk of kSumChunk elements of one matrix: the
//                          chunk's sum of squares in double
//   ns_scale_kernel        each block sums its matrix's chunk sums, then divides its share
//                          of the matrix by ns_norm_divisor
// Both sums are in the shared order of kernels/sum_order.hpp, which the CPU's iteration
// (host/src/matrix/newton_schulz.cpp: sum_of_squares) follows too, and the division is the
// same float one: the two give the same bits. Storage: f32 or bf16 (template), widened to
// float; a bf16 X is the float quotient rounded to nearest even. Bytes per element: the sum
// reads G, the scale reads G and writes X.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cuda/multi_tensor.cuh"  // kBlock, the loads and stores
#include "fusedopt/kernels/newton_schulz.hpp"
#include "fusedopt/kernels/sum_order.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

static_assert(kSumLanes == kBlock && kSumRow == 4 * kBlock,
              "the shared order puts one lane, four accumulators, on each thread");

/// The sum of v over the block's threads by the tree of tree_sum (v[l] += v[l + w] for
/// w = 128, ..., 1). Every thread gets it; one call per block (the shared array is reused).
__device__ __forceinline__ double ns_block_sum(double v) {
  __shared__ double s_sum[kBlock];
  s_sum[threadIdx.x] = v;
  __syncthreads();
  for (unsigned w = kBlock / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s_sum[threadIdx.x] += s_sum[threadIdx.x + w];
    __syncthreads();
  }
  return s_sum[0];
}

/// Where matrix `m` of `size` elements starts in a batch of `kStorage` elements.
template <int kStorage>
__device__ __forceinline__ std::int64_t ns_matrix_bytes(std::int64_t m, std::int64_t size) {
  return m * size * (kStorage == kF32 ? 4 : 2);
}

/// partials[blockIdx.y * chunks + blockIdx.x]: the sum of squares of chunk blockIdx.x of
/// matrix blockIdx.y (`size` elements each, `chunks` chunks), in the shared order: thread l
/// adds the squares of elements 4l..4l+3 of each round of kSumRow (its accumulators), then
/// its lane, (a0 + a1) + (a2 + a3), goes into the tree. Grid: (chunks, matrices).
template <int kStorage>
__global__ void __launch_bounds__(kBlock)
    ns_sum_squares_kernel(const void* in, std::int64_t size, std::int64_t chunks,
                          double* partials) {
  const void* const x = static_cast<const char*>(in) + ns_matrix_bytes<kStorage>(blockIdx.y, size);
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.x) * kSumChunk;
  const std::int64_t end = begin + kSumChunk < size ? begin + kSumChunk : size;
  const bool vec = aligned_for4(x, kStorage);  // rounds start at multiples of 4 elements
  double acc[4] = {};
  for (std::int64_t i = begin + 4 * static_cast<std::int64_t>(threadIdx.x); i < end; i += kSumRow) {
    const int count = end - i < 4 ? static_cast<int>(end - i) : 4;
    float v[4] = {};
    if (vec && count == 4) {
      load4(x, kStorage, i, v);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < count) v[j] = load_as_float(x, kStorage, i + j);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < count) acc[j] += static_cast<double>(v[j]) * static_cast<double>(v[j]);
  }
  const double sum = ns_block_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  if (threadIdx.x == 0) partials[blockIdx.y * chunks + blockIdx.x] = sum;
}

/// x = in / ns_norm_divisor(sum, eps) for matrix blockIdx.y, its sum from its `chunks` chunk
/// sums in the shared order (thread l adds chunks l, l + 256, ... from 0.0: lane l; then the
/// tree). Grid: (blocks, matrices), the matrix's elements grid-strided over its blocks. `in`
/// and `x` may be the same buffer (each element is read, then written, by one thread).
template <int kStorage>
__global__ void __launch_bounds__(kBlock)
    ns_scale_kernel(const void* in, void* x, std::int64_t size, std::int64_t chunks,
                    const double* partials, double eps) {
  const double* const part = partials + blockIdx.y * chunks;
  double lane = 0.0;
  for (std::int64_t c = threadIdx.x; c < chunks; c += kBlock) lane += part[c];
  const float divisor = ns_norm_divisor(ns_block_sum(lane), eps);
  const std::int64_t offset = ns_matrix_bytes<kStorage>(blockIdx.y, size);
  const void* const g = static_cast<const char*>(in) + offset;
  void* const out = static_cast<char*>(x) + offset;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < size;
       i += static_cast<std::int64_t>(gridDim.x) * kBlock)
    store_from_float(out, kStorage, i, load_as_float(g, kStorage, i) / divisor, false, 0, 0, 0);
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
