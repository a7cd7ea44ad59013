// Sparse row steps of embedding tables (docs/optimizers.md, "Sparse steps"): the buffers of one
// step, and the CPU and CUDA implementations. Both sort the indices stably, sum the gradient rows
// of each distinct row in their original order (fp32), and apply the algorithm's functor once to
// each distinct row; rows not named are never read or written. Same order, same bits: the
// CPU and the GPU agree bitwise, on any thread count or launch configuration.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/types.hpp"

namespace fo::detail {

/// One sparse step: a [rows x dim] float32 table and its states (null where the algorithm
/// keeps none; [rows x dim], or [rows] under options that make the algorithm row-wise), nnz
/// indices (int32 or int64) and their [nnz x dim] float32 gradient rows. All on one device.
/// Offsets are computed in 64 bits.
///
/// Quantized states (state_dtype q8 or q4, docs/quantized-states.md): states[k] points to the
/// state's one buffer (codes, then absmax values) of rows * dim elements, reinterpreted; dim is
/// a multiple of the block size (quant_block_size), so each row owns whole blocks and a step
/// re-encodes only the blocks of the rows it names, each to nearest. Per-element states only
/// (never row-wise ones). Bit k of non_negative_states: state k takes the unsigned map.
struct SparseStep {
  float* table;
  float* states[kMaxStates];
  std::int64_t rows;
  std::int64_t dim;
  const void* indices;
  DType index_dtype;
  std::int64_t nnz;
  const float* grad_rows;
  DType state_dtype = DType::f32;  // f32, q8 or q4
  unsigned non_negative_states = 0;
};

}  // namespace fo::detail

namespace fo::cpu {
/// Position of the first index outside [0, rows), or -1.
std::int64_t sparse_first_bad_index(const detail::SparseStep& s);
/// The step of algorithm A (SparseCapable) under valid options at step count `step`, row-wise
/// where the options say so (kernels/rowwise.hpp); indices already validated.
template <class A>
void sparse_step(const typename A::Options& options, std::int64_t step,
                 const detail::SparseStep& s);
}  // namespace fo::cpu

namespace fo::cuda {
FO_EMULATION_BEGIN

/// Positions in a step's index list: 32-bit (CUB's run-length encoder counts in int).
using SparsePos = int;

/// The indices of a sparse step, sorted (stably) and run-length encoded: the distinct rows in
/// ascending order, the offset of each one's run in the sorted order, the original positions
/// in sorted order, and the number of runs. Device memory.
struct SparseRuns {
  const void* unique_rows;  // the index dtype
  const SparsePos* offsets;
  const SparsePos* sorted_positions;
  const SparsePos* num_runs;
};

// The kernels' launchers (sparse_launch.cu; also compiled for the host emulation).
/// The row kernel of algorithm A (SparseCapable; its RowOp's where the options make it
/// row-wise) at step count `step`, over the runs.
template <class A>
void launch_sparse_rows(const typename A::Options& options, std::int64_t step,
                        const detail::SparseStep& s, const SparseRuns& runs, void* stream);
/// atomicMin into *d_first of every position whose index is outside [0, s.rows).
void launch_first_bad_index(const detail::SparseStep& s, unsigned long long* d_first, void* stream);
/// out[i] = i for i < n.
void launch_iota(SparsePos* out, std::int64_t n, void* stream);

FO_EMULATION_END

/// Position of the first index outside [0, rows), or -1. Waits for `stream`.
std::int64_t sparse_first_bad_index(const detail::SparseStep& s, void* stream);
/// The step of algorithm A (SparseCapable) under valid options at step count `step`;
/// indices already validated. Stream-ordered; its temporary memory comes from the
/// stream-ordered allocator.
template <class A>
void sparse_step(const typename A::Options& options, std::int64_t step, const detail::SparseStep& s,
                 void* stream);
// Its explicit instantiation for algorithm A (sparse.cu, and the CPU-only stub).
#define FO_INSTANTIATE_CUDA_SPARSE_STEP(A)                                                         \
  template void sparse_step<fo::A>(const fo::A::Options&, std::int64_t, const detail::SparseStep&, \
                                   void*);
}  // namespace fo::cuda
