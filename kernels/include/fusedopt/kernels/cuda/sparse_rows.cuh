// The CUDA kernels of sparse row steps (host/src/cuda/sparse.cu sorts the indices and
// launches these; docs/sparse.md and host/src/sparse.hpp give the contract): index
// validation, the per-element row kernel and the row-wise (warp per row) kernel.
//
// Precision: gradient rows are summed in fp32 in ascending original position, starting from
// the first (no added +0); the functor runs in fp32. Traffic per touched element (c =
// occurrences of its row): c gradient floats read, param and each state read and written once.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/rowwise.hpp"

namespace fo::cuda_kernels {
FO_EMULATION_BEGIN

/// The first position i with indices[i] outside [0, rows), by atomicMin into *first (which
/// starts at ULLONG_MAX).
template <class T>
__global__ void first_bad_index_kernel(const T* indices, std::int64_t nnz, std::int64_t rows,
                                       unsigned long long* first) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nnz;
       i += stride) {
    const std::int64_t v = static_cast<std::int64_t>(indices[i]);
    if (v < 0 || v >= rows) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

// Positions are 32-bit: CUB's run-length encoder counts items in int, so nnz <= INT_MAX.
using Pos = int;

__global__ void iota_kernel(Pos* out, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    out[i] = static_cast<Pos>(i);
}

struct StatePtrs {
  float* p[kMaxStates];
};

// Column j of a distinct row's gradient: its gradient rows sorted_positions[begin, end) summed
// in fp32 in ascending k = ascending original position (the stable sort), starting from the
// first (no added +0). The one order every sparse kernel, and the CPU, sums in.
__device__ __forceinline__ float summed_gradient(const float* grad_rows,
                                                 const Pos* sorted_positions, std::int64_t begin,
                                                 std::int64_t end, std::int64_t dim,
                                                 std::int64_t j) {
  float g = grad_rows[static_cast<std::int64_t>(sorted_positions[begin]) * dim + j];
  for (std::int64_t k = begin + 1; k < end; ++k)
    g += grad_rows[static_cast<std::int64_t>(sorted_positions[k]) * dim + j];
  return g;
}

// blockDim.y rows per block, blockDim.x threads over the columns of each. The number of
// distinct rows is read from device memory; the grid strides over them.
template <class Op, class T>
__global__ void sparse_rows_kernel(Op op, float* table, StatePtrs states, std::int64_t dim,
                                   const float* grad_rows, const T* unique_rows, const Pos* offsets,
                                   const Pos* sorted_positions, const Pos* num_runs,
                                   std::int64_t nnz) {
  const std::int64_t runs = *num_runs;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.y;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < runs;
       r += stride) {
    const std::int64_t begin = offsets[r];
    const std::int64_t end = r + 1 < runs ? static_cast<std::int64_t>(offsets[r + 1]) : nnz;
    const std::int64_t base = static_cast<std::int64_t>(unique_rows[r]) * dim;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const float g = summed_gradient(grad_rows, sorted_positions, begin, end, dim, j);
      const std::int64_t e = base + j;
      float p = table[e];
      float s[kMaxStates];
#pragma unroll
      for (int i = 0; i < kMaxStates; ++i) s[i] = states.p[i] ? states.p[i][e] : 0.0f;
      op(p, g, s);
      table[e] = p;
#pragma unroll
      for (int i = 0; i < kMaxStates; ++i)
        if (states.p[i]) states.p[i][e] = s[i];
    }
  }
}

// Row-wise algorithms (kernels/rowwise.hpp): one warp per distinct row, blockDim.y rows
// per block. Lane l sums the row's gradient rows (ascending position, as above) at columns
// l, l + 32, ... and adds their squares; the lanes fold by __shfl_down_sync in the header's
// order; lane 0 applies RowOp::row to the row's states; every lane then sums its columns'
// gradient again (the same order: the same bits, from L1/L2) and applies the rate. The loop
// over rows is uniform across a warp, so the full-mask shuffles are safe.
template <class RowOp, class T>
__global__ void sparse_rowwise_kernel(RowOp op, float* table, StatePtrs states, std::int64_t dim,
                                      const float* grad_rows, const T* unique_rows,
                                      const Pos* offsets, const Pos* sorted_positions,
                                      const Pos* num_runs, std::int64_t nnz) {
  constexpr unsigned kAll = 0xffffffffu;
  const std::int64_t runs = *num_runs;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.y;
  const auto lane = static_cast<std::int64_t>(threadIdx.x);
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < runs;
       r += stride) {
    const std::int64_t begin = offsets[r];
    const std::int64_t end = r + 1 < runs ? static_cast<std::int64_t>(offsets[r + 1]) : nnz;
    const auto row = static_cast<std::int64_t>(unique_rows[r]);
    const auto summed = [&](std::int64_t j) {
      return summed_gradient(grad_rows, sorted_positions, begin, end, dim, j);
    };
    float squares = 0.0f;
    for (std::int64_t j = lane; j < dim; j += kRowLanes) {
      const float g = summed(j);
      squares = squares + g * g;  // --fmad=false: rounded product, then the sum
    }
    for (int w = kRowLanes / 2; w > 0; w /= 2)
      squares = squares + __shfl_down_sync(kAll, squares, w);
    float rate = 0.0f;
    if (lane == 0) {
      float s[kMaxStates];
#pragma unroll
      for (int i = 0; i < kMaxStates; ++i) s[i] = states.p[i] ? states.p[i][row] : 0.0f;
      rate = op.row(s, squares / static_cast<float>(dim));
#pragma unroll
      for (int i = 0; i < kMaxStates; ++i)
        if (states.p[i]) states.p[i][row] = s[i];
    }
    rate = __shfl_sync(kAll, rate, 0);
    float* const p_row = table + row * dim;
    for (std::int64_t j = lane; j < dim; j += kRowLanes) {
      float p = p_row[j];
      op(p, summed(j), rate);
      p_row[j] = p;
    }
  }
}

FO_EMULATION_END
}  // namespace fo::cuda_kernels
