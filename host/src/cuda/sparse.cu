// Sparse row steps on the GPU (SPEC.md "Sparse updates"): index validation, and one step of
// an optimizer's functor over the distinct rows named by nnz indices.
//
// The step sorts (index, position) pairs by index with CUB's LSD radix sort (stable: equal
// indices keep their positions in ascending order), run-length encodes the sorted indices
// into distinct rows and their counts, and scans the counts into offsets. One thread per
// (distinct row, column) then sums that row's gradient rows in fp32 in ascending position,
// starting from the first (no added +0), and applies the functor once. The summation order is
// fixed by the data alone, never by the launch configuration or thread timing: the same bits
// on every run, and the CPU's bits as long as the CPU sums the same way (sparse.hpp).
//
// Row-wise algorithms (kernels/rowwise.hpp) take a warp per distinct row instead: the same
// sums, then the row's mean square, one RowOp::row per row and the rate over its elements.
//
// Traffic per touched element (c = occurrences of its row): c gradient floats read; param and
// each state read and written once. Per index: the index and a 32-bit position through the
// sort (a few passes of key + value bytes, end_bit = bits of rows - 1), the RLE and the scan.
// Rows not named are never read or written. No host synchronization except
// sparse_first_bad_index, whose answer the host needs; temporaries come from the
// stream-ordered allocator.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>
#include <string>

#include "algorithm_index.hpp"
#include "cuda/cuda_check.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/kernels/rowwise.hpp"
#include "sparse.hpp"

namespace fo::cuda {
namespace {

constexpr int kElementBlock = 256;  // threads per block of the elementwise kernels
constexpr int kRowBlock = 256;      // most threads per block of the row kernel

// Stream-ordered device memory, freed on the stream when it goes out of scope (also when an
// exception unwinds through it).
class StreamBuffer {
 public:
  StreamBuffer(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    FO_CUDA_CHECK(cudaMallocAsync(&p_, std::max<std::size_t>(bytes, 1), stream_));
  }
  ~StreamBuffer() {
    if (p_) FO_CUDA_CHECK_NOTHROW(cudaFreeAsync(p_, stream_));
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  char* get() const { return static_cast<char*>(p_); }

 private:
  void* p_ = nullptr;
  cudaStream_t stream_;
};

unsigned elementwise_grid(std::int64_t n) {
  return static_cast<unsigned>(
      std::clamp<std::int64_t>((n + kElementBlock - 1) / kElementBlock, 1, 65536));
}

// ---- validation ------------------------------------------------------------------------

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

// ---- the step --------------------------------------------------------------------------

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

struct RowLaunch {
  const float* grad_rows;
  const void* unique_rows;
  const Pos* offsets;
  const Pos* sorted_positions;
  const Pos* num_runs;
};

using RowLauncher = void (*)(const void* op, const detail::SparseStep& s, const RowLaunch& l,
                             cudaStream_t stream);

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
unsigned rows_grid(Kernel kernel, dim3 block, std::int64_t nnz) {
  int device = 0, sms = 0, per_sm = 0;
  FO_CUDA_CHECK(cudaGetDevice(&device));
  FO_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FO_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, static_cast<int>(block.x * block.y), 0));
  const std::int64_t needed = (nnz + block.y - 1) / block.y;
  const std::int64_t cap = static_cast<std::int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  return static_cast<unsigned>(std::clamp<std::int64_t>(needed, 1, cap));
}

StatePtrs state_ptrs(const detail::SparseStep& s) {
  StatePtrs states{};
  for (int i = 0; i < kMaxStates; ++i) states.p[i] = s.states[i];
  return states;
}

template <class Op, class T>
void launch_rows(const void* op, const detail::SparseStep& s, const RowLaunch& l,
                 cudaStream_t stream) {
  const auto kernel = &sparse_rows_kernel<Op, T>;
  const dim3 block = row_block(s.dim);
  kernel<<<rows_grid(kernel, block, s.nnz), block, 0, stream>>>(
      *static_cast<const Op*>(op), s.table, state_ptrs(s), s.dim, l.grad_rows,
      static_cast<const T*>(l.unique_rows), l.offsets, l.sorted_positions, l.num_runs, s.nnz);
  FO_CUDA_CHECK(cudaPeekAtLastError());
}

// Row-wise algorithms (kernels/rowwise.hpp): one warp per distinct row, kRowwiseWarps rows
// per block. Lane l sums the row's gradient rows (ascending position, as above) at columns
// l, l + 32, ... and adds their squares; the lanes fold by __shfl_down_sync in the header's
// order; lane 0 applies RowOp::row to the row's states; every lane then sums its columns'
// gradient again (the same order: the same bits, from L1/L2) and applies the rate. The loop
// over rows is uniform across a warp, so the full-mask shuffles are safe.
constexpr int kRowwiseWarps = 8;

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

template <class RowOp, class T>
void launch_rowwise(const void* op, const detail::SparseStep& s, const RowLaunch& l,
                    cudaStream_t stream) {
  const auto kernel = &sparse_rowwise_kernel<RowOp, T>;
  const dim3 block(kRowLanes, kRowwiseWarps, 1);
  kernel<<<rows_grid(kernel, block, s.nnz), block, 0, stream>>>(
      *static_cast<const RowOp*>(op), s.table, state_ptrs(s), s.dim, l.grad_rows,
      static_cast<const T*>(l.unique_rows), l.offsets, l.sorted_positions, l.num_runs, s.nnz);
  FO_CUDA_CHECK(cudaPeekAtLastError());
}

template <class A, class T>
constexpr RowLauncher rowwise_launcher() {
  if constexpr (RowwiseCapable<A>::value)
    return &launch_rowwise<typename A::RowOp, T>;
  else
    return nullptr;
}

// [algorithm][index dtype: i32, i64]
constexpr RowLauncher kRowLaunchers[][2] = {
#define FO_LAUNCHERS(A) \
  {&launch_rows<fo::A::Op, std::int32_t>, &launch_rows<fo::A::Op, std::int64_t>},
    FO_FOR_EACH_DENSE_ALGORITHM(FO_LAUNCHERS)
#undef FO_LAUNCHERS
};
static_assert(sizeof(kRowLaunchers) / sizeof(kRowLaunchers[0]) == detail::kNumDenseAlgorithms);

// The same for row-wise steps; null where an algorithm has no row-wise form.
constexpr RowLauncher kRowwiseLaunchers[][2] = {
#define FO_LAUNCHERS(A) \
  {rowwise_launcher<fo::A, std::int32_t>(), rowwise_launcher<fo::A, std::int64_t>()},
    FO_FOR_EACH_DENSE_ALGORITHM(FO_LAUNCHERS)
#undef FO_LAUNCHERS
};
static_assert(sizeof(kRowwiseLaunchers) / sizeof(kRowwiseLaunchers[0]) ==
              detail::kNumDenseAlgorithms);

// Bits that hold every index in [0, rows): of rows - 1, at least 1, at most the key's width.
template <class T>
int key_bits(std::int64_t rows) {
  int bits = 1;
  while (bits < 63 && (std::int64_t{1} << bits) < rows) ++bits;
  return std::min(bits, static_cast<int>(sizeof(T) * 8));
}

std::size_t align_up(std::size_t n) { return (n + 255) / 256 * 256; }

// The indices are sorted as they are (int32 or int64): validated, hence non-negative, so the
// low key_bits bits order them (CUB flips only the sign bit of signed keys).
template <class T>
void sparse_step_typed(int algorithm_index, const void* op, const detail::SparseStep& s,
                       cudaStream_t stream) {
  const auto* indices = static_cast<const T*>(s.indices);
  const int n = static_cast<int>(s.nnz);
  const int end_bit = key_bits<T>(s.rows);

  // Temporary storage of the three CUB algorithms (null pointers: sizes only).
  std::size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
  FO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, indices, static_cast<T*>(nullptr), static_cast<const Pos*>(nullptr),
      static_cast<Pos*>(nullptr), n, 0, end_bit, stream));
  FO_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(
      nullptr, rle_bytes, static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
      static_cast<Pos*>(nullptr), static_cast<Pos*>(nullptr), n, stream));
  FO_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<Pos*>(nullptr),
                                              static_cast<Pos*>(nullptr), n, stream));
  const std::size_t cub_bytes = std::max({sort_bytes, rle_bytes, scan_bytes});

  // One allocation: sorted keys, positions (then counts, then offsets, scanned in place),
  // sorted positions, distinct rows, the number of runs, CUB's temporary storage.
  const std::size_t keys_bytes = align_up(sizeof(T) * static_cast<std::size_t>(n));
  const std::size_t pos_bytes = align_up(sizeof(Pos) * static_cast<std::size_t>(n));
  const std::size_t total = 2 * keys_bytes + 2 * pos_bytes + align_up(sizeof(Pos)) + cub_bytes;
  StreamBuffer arena(total, stream);
  char* at = arena.get();
  T* sorted_keys = reinterpret_cast<T*>(at);
  at += keys_bytes;
  T* unique_rows = reinterpret_cast<T*>(at);
  at += keys_bytes;
  Pos* positions = reinterpret_cast<Pos*>(at);
  at += pos_bytes;
  Pos* sorted_positions = reinterpret_cast<Pos*>(at);
  at += pos_bytes;
  Pos* num_runs = reinterpret_cast<Pos*>(at);
  at += align_up(sizeof(Pos));
  void* cub_temp = at;

  iota_kernel<<<elementwise_grid(n), kElementBlock, 0, stream>>>(positions, n);
  FO_CUDA_CHECK(cudaPeekAtLastError());

  std::size_t bytes = sort_bytes;
  FO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_temp, bytes, indices, sorted_keys, positions,
                                                sorted_positions, n, 0, end_bit, stream));

  // The unsorted positions are dead: their buffer holds the counts, zeroed past the runs so
  // that the scan over all n items stays defined, then the offsets.
  Pos* counts = positions;
  FO_CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(Pos) * static_cast<std::size_t>(n), stream));
  bytes = rle_bytes;
  FO_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(cub_temp, bytes, sorted_keys, unique_rows,
                                                   counts, num_runs, n, stream));
  bytes = scan_bytes;
  FO_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(cub_temp, bytes, counts, counts, n, stream));

  const RowLaunch l{s.grad_rows, unique_rows, counts, sorted_positions, num_runs};
  const auto& launchers = s.rowwise ? kRowwiseLaunchers : kRowLaunchers;
  launchers[algorithm_index][sizeof(T) == 8 ? 1 : 0](op, s, l, stream);
}

}  // namespace

std::int64_t sparse_first_bad_index(const detail::SparseStep& s, void* stream) {
  if (s.nnz == 0) return -1;
  const auto st = static_cast<cudaStream_t>(stream);
  StreamBuffer first(sizeof(unsigned long long), st);
  auto* d_first = reinterpret_cast<unsigned long long*>(first.get());
  FO_CUDA_CHECK(cudaMemsetAsync(d_first, 0xFF, sizeof(unsigned long long), st));  // ULLONG_MAX
  if (s.index_dtype == DType::i64)
    first_bad_index_kernel<<<elementwise_grid(s.nnz), kElementBlock, 0, st>>>(
        static_cast<const std::int64_t*>(s.indices), s.nnz, s.rows, d_first);
  else
    first_bad_index_kernel<<<elementwise_grid(s.nnz), kElementBlock, 0, st>>>(
        static_cast<const std::int32_t*>(s.indices), s.nnz, s.rows, d_first);
  FO_CUDA_CHECK(cudaPeekAtLastError());
  unsigned long long h_first = ULLONG_MAX;
  FO_CUDA_CHECK(cudaMemcpyAsync(&h_first, d_first, sizeof(h_first), cudaMemcpyDeviceToHost, st));
  FO_CUDA_CHECK(cudaStreamSynchronize(st));
  return h_first == ULLONG_MAX ? -1 : static_cast<std::int64_t>(h_first);
}

void sparse_step(int algorithm_index, const void* op, const detail::SparseStep& s, void* stream) {
  if (s.nnz == 0) return;
  if (s.nnz > INT_MAX)
    throw Error(StatusCode::invalid_argument, "sparse step: " + std::to_string(s.nnz) +
                                                  " indices; the CUDA backend takes at most " +
                                                  std::to_string(INT_MAX) + " per step");
  const auto st = static_cast<cudaStream_t>(stream);
  if (s.index_dtype == DType::i64)
    sparse_step_typed<std::int64_t>(algorithm_index, op, s, st);
  else
    sparse_step_typed<std::int32_t>(algorithm_index, op, s, st);
}

}  // namespace fo::cuda
