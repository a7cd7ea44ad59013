// Launchers of the sparse row kernels (kernels/cuda/sparse_rows.cuh): block shapes, grids and
// the per-algorithm tables. sparse.cu sorts and run-length encodes the indices with CUB, then
// calls launch_sparse_rows. Also compiled as host C++ under FO_CUDA_HOST_EMULATION
// (tests/emulation), which feeds the row kernels a run list sorted on the host.
#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/cuda_check.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/cuda/sparse_quant_rows.cuh"
#include "fusedopt/kernels/cuda/sparse_rows.cuh"
#include "fusedopt/kernels/registry.hpp"
#include "sparse.hpp"

namespace fo::cuda {
FO_EMULATION_BEGIN
namespace {

using cuda_kernels::StatePtrs;

constexpr int kElementBlock = 256;  // threads per block of the elementwise kernels
constexpr int kRowBlock = 256;      // most threads per block of the row kernel
constexpr int kRowwiseWarps = 8;    // rows (warps) per block of the row-wise kernel

unsigned elementwise_grid(std::int64_t n) {
  return static_cast<unsigned>(
      std::clamp<std::int64_t>((n + kElementBlock - 1) / kElementBlock, 1, 65536));
}

// Threads over the columns: the row width rounded up to a power of two (<= 32) or to a warp
// multiple (<= kRowBlock); the rest of the block takes further rows.
dim3 row_block(std::int64_t dim) {
  int x = 1;
  if (dim <= 32) {
    while (x < dim) x *= 2;
  } else {
    x = static_cast<int>(std::min<std::int64_t>(kRowBlock, (dim + 31) / 32 * 32));
  }
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::max(1, kRowBlock / x)), 1);
}

// Enough blocks to fill the GPU once (the grid strides over the rows, whose number is known
// only on the device), and never more than the worst case of nnz distinct rows needs.
template <class Kernel>
unsigned rows_grid([[maybe_unused]] Kernel kernel, [[maybe_unused]] dim3 block, std::int64_t nnz) {
  const std::int64_t needed = (nnz + block.y - 1) / block.y;
#if defined(FO_CUDA_HOST_EMULATION)
  // No multiprocessors to fill: a grid of three, so that the grid-stride loop over rows runs.
  const std::int64_t cap = 3;
#else
  int device = 0, sms = 0, per_sm = 0;
  FO_CUDA_CHECK(cudaGetDevice(&device));
  FO_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FO_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, static_cast<int>(block.x * block.y), 0));
  const std::int64_t cap = static_cast<std::int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
#endif
  return static_cast<unsigned>(std::clamp<std::int64_t>(needed, 1, cap));
}

StatePtrs state_ptrs(const detail::SparseStep& s) {
  StatePtrs states{};
  for (int i = 0; i < kMaxStates; ++i) states.p[i] = s.states[i];
  return states;
}

template <class Op, class T>
void launch_rows(const Op& op, const detail::SparseStep& s, const SparseRuns& r,
                 cudaStream_t stream) {
  const auto kernel = &cuda_kernels::sparse_rows_kernel<Op, T>;
  const dim3 block = row_block(s.dim);
  FO_LAUNCH(rows_grid(kernel, block, s.nnz), block, stream, cuda_kernels::sparse_rows_kernel<Op, T>)
  (op, s.table, state_ptrs(s), s.dim, s.grad_rows, static_cast<const T*>(r.unique_rows), r.offsets,
   r.sorted_positions, r.num_runs, s.nnz);
  FO_CUDA_CHECK(cudaGetLastError());
}

template <class RowOp, class T>
void launch_rowwise(const RowOp& op, const detail::SparseStep& s, const SparseRuns& r,
                    cudaStream_t stream) {
  const auto kernel = &cuda_kernels::sparse_rowwise_kernel<RowOp, T>;
  const dim3 block(kRowLanes, kRowwiseWarps, 1);
  FO_LAUNCH(rows_grid(kernel, block, s.nnz), block, stream,
            cuda_kernels::sparse_rowwise_kernel<RowOp, T>)
  (op, s.table, state_ptrs(s), s.dim, s.grad_rows, static_cast<const T*>(r.unique_rows), r.offsets,
   r.sorted_positions, r.num_runs, s.nnz);
  FO_CUDA_CHECK(cudaGetLastError());
}

// Over states quantized to kBits (state dtype q8 / q4): one warp per (run, quantization
// block) pair, kSparseQuantWarps a block; the worst case is nnz distinct rows.
template <class Op, class T, int kBits>
void launch_quant_rows(const Op& op, const detail::SparseStep& s, const SparseRuns& r,
                       cudaStream_t stream) {
  if (s.dim % quant_block_size(kBits) != 0)  // the caller's to refuse; never a partial block
    throw Error(StatusCode::invalid_argument,
                "a sparse step over quantized states needs rows of whole blocks");
  const auto kernel = &cuda_kernels::sparse_quant_rows_kernel<Op, T, kBits>;
  const dim3 block(cuda_kernels::kSparseQuantThreads, 1, 1);
  const std::int64_t pairs = s.nnz * (s.dim / quant_block_size(kBits));
  const dim3 shape(32, cuda_kernels::kSparseQuantWarps, 1);  // rows_grid counts warps in y
  cuda_kernels::QuantStatePtrs states{};
  for (int i = 0; i < kMaxStates; ++i) states.p[i] = reinterpret_cast<unsigned char*>(s.states[i]);
  FO_LAUNCH(rows_grid(kernel, shape, pairs), block, stream,
            cuda_kernels::sparse_quant_rows_kernel<Op, T, kBits>)
  (op, s.table, states, s.non_negative_states, s.rows, s.dim, s.grad_rows,
   static_cast<const T*>(r.unique_rows), r.offsets, r.sorted_positions, r.num_runs, s.nnz);
  FO_CUDA_CHECK(cudaGetLastError());
}

// Kernels only for the algorithms that take sparse steps (SparseCapable), and the row-wise
// kernel only for those with a row-wise form; quantized states per element only.
template <class A, class T>
void launch_typed(const typename A::Options& o, std::int64_t step, const detail::SparseStep& s,
                  const SparseRuns& runs, cudaStream_t stream) {
  const bool quantized = s.state_dtype == DType::q8 || s.state_dtype == DType::q4;
  if constexpr (RowwiseCapable<A>::value)
    if (A::rowwise(o)) {
      if (quantized) throw Error(StatusCode::unsupported, "row-wise states cannot be quantized");
      return launch_rowwise<typename A::RowOp, T>(A::make_row_op(o, step), s, runs, stream);
    }
  if (s.state_dtype == DType::q8)
    return launch_quant_rows<typename A::Op, T, 8>(A::make_op(o, step), s, runs, stream);
  if (s.state_dtype == DType::q4)
    return launch_quant_rows<typename A::Op, T, 4>(A::make_op(o, step), s, runs, stream);
  launch_rows<typename A::Op, T>(A::make_op(o, step), s, runs, stream);
}

}  // namespace

template <class A>
void launch_sparse_rows(const typename A::Options& options, std::int64_t step,
                        const detail::SparseStep& s, const SparseRuns& runs, void* stream) {
  if constexpr (!SparseCapable<A>::value) {
    throw Error(StatusCode::unsupported, std::string(A::kName) + " takes no sparse steps");
  } else {
    const auto st = static_cast<cudaStream_t>(stream);
    if (s.index_dtype == DType::i64)
      launch_typed<A, std::int64_t>(options, step, s, runs, st);
    else
      launch_typed<A, std::int32_t>(options, step, s, runs, st);
  }
}

#define FO_INSTANTIATE(A)                                                      \
  template void launch_sparse_rows<fo::A>(const fo::A::Options&, std::int64_t, \
                                          const detail::SparseStep&, const SparseRuns&, void*);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

void launch_first_bad_index(const detail::SparseStep& s, unsigned long long* d_first,
                            void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  if (s.index_dtype == DType::i64)
    FO_LAUNCH(elementwise_grid(s.nnz), kElementBlock, st,
              cuda_kernels::first_bad_index_kernel<std::int64_t>)
  (static_cast<const std::int64_t*>(s.indices), s.nnz, s.rows, d_first);
  else FO_LAUNCH(elementwise_grid(s.nnz), kElementBlock, st,
                 cuda_kernels::first_bad_index_kernel<std::int32_t>)(
      static_cast<const std::int32_t*>(s.indices), s.nnz, s.rows, d_first);
  FO_CUDA_CHECK(cudaGetLastError());
}

void launch_iota(SparsePos* out, std::int64_t n, void* stream) {
  FO_LAUNCH(elementwise_grid(n), kElementBlock, static_cast<cudaStream_t>(stream),
            cuda_kernels::iota_kernel)
  (out, n);
  FO_CUDA_CHECK(cudaGetLastError());
}

FO_EMULATION_END
}  // namespace fo::cuda
