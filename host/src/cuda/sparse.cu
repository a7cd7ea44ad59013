// Sparse row steps on the GPU (docs/optimizers.md, "Sparse steps"): index validation, and one step
// of an optimizer's functor over the distinct rows named by nnz indices.
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
// Rows not named are never read or written. The kernels are in kernels/cuda/sparse_rows.cuh,
// their launchers in sparse_launch.cu (which the host emulation also runs); this file holds
// the CUB passes and the memory. No host synchronization except
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
#include <optional>
#include <string>

#include "cuda/cuda_check.hpp"
#include "sparse.hpp"

namespace fo::cuda {
namespace {

using Pos = SparsePos;

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

// Bits that hold every index in [0, rows): of rows - 1, at least 1, at most the key's width.
template <class T>
int key_bits(std::int64_t rows) {
  int bits = 1;
  while (bits < 63 && (std::int64_t{1} << bits) < rows) ++bits;
  return std::min(bits, static_cast<int>(sizeof(T) * 8));
}

std::size_t align_up(std::size_t n) { return (n + 255) / 256 * 256; }

// Sorts and run-length encodes the indices into `arena` (allocated here): the runs the row
// kernels walk. The indices are sorted as they are (int32 or int64): validated, hence
// non-negative, so the low key_bits bits order them (CUB flips only the sign bit of signed
// keys).
template <class T>
SparseRuns sort_runs(const detail::SparseStep& s, std::optional<StreamBuffer>& arena,
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
  arena.emplace(total, stream);
  char* at = arena->get();
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

  launch_iota(positions, n, stream);

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

  return SparseRuns{unique_rows, counts, sorted_positions, num_runs};
}

}  // namespace

std::int64_t sparse_first_bad_index(const detail::SparseStep& s, void* stream) {
  if (s.nnz == 0) return -1;
  const auto st = static_cast<cudaStream_t>(stream);
  StreamBuffer first(sizeof(unsigned long long), st);
  auto* d_first = reinterpret_cast<unsigned long long*>(first.get());
  FO_CUDA_CHECK(cudaMemsetAsync(d_first, 0xFF, sizeof(unsigned long long), st));  // ULLONG_MAX
  launch_first_bad_index(s, d_first, st);
  unsigned long long h_first = ULLONG_MAX;
  FO_CUDA_CHECK(cudaMemcpyAsync(&h_first, d_first, sizeof(h_first), cudaMemcpyDeviceToHost, st));
  FO_CUDA_CHECK(cudaStreamSynchronize(st));
  return h_first == ULLONG_MAX ? -1 : static_cast<std::int64_t>(h_first);
}

template <class A>
void sparse_step(const typename A::Options& options, std::int64_t step, const detail::SparseStep& s,
                 void* stream) {
  if constexpr (!SparseCapable<A>::value) {
    throw Error(StatusCode::unsupported, std::string(A::kName) + " takes no sparse steps");
  } else {
    if (s.nnz == 0) return;
    if (s.nnz > INT_MAX)
      throw Error(StatusCode::invalid_argument, "sparse step: " + std::to_string(s.nnz) +
                                                    " indices; the CUDA backend takes at most " +
                                                    std::to_string(INT_MAX) + " per step");
    const auto st = static_cast<cudaStream_t>(stream);
    std::optional<StreamBuffer> arena;  // freed on the stream after the row kernel
    const SparseRuns runs = s.index_dtype == DType::i64 ? sort_runs<std::int64_t>(s, arena, st)
                                                        : sort_runs<std::int32_t>(s, arena, st);
    launch_sparse_rows<A>(options, step, s, runs, st);
  }
}

FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_CUDA_SPARSE_STEP)

}  // namespace fo::cuda
