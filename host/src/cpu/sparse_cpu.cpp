// The CPU sparse step: a stable sort of the indices, each distinct row's gradient summed in
// fp32 in original order starting from its first row (as the GPU does: the two agree
// bitwise, and a row named once is stepped exactly as a dense step would), then the
// algorithm's SIMD kernel over that row (a row-wise algorithm's row kernel: its mean square
// in the order of kernels/rowwise.hpp, the GPU's order). Threads take distinct rows, so no
// two write one.
#include <omp.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "sparse.hpp"

namespace fo::cpu {
namespace {

std::int64_t index_at(const detail::SparseStep& s, std::int64_t k) {
  return s.index_dtype == DType::i32 ? static_cast<const std::int32_t*>(s.indices)[k]
                                     : static_cast<const std::int64_t*>(s.indices)[k];
}

}  // namespace

std::int64_t sparse_first_bad_index(const detail::SparseStep& s) {
  for (std::int64_t k = 0; k < s.nnz; ++k) {
    const std::int64_t r = index_at(s, k);
    if (r < 0 || r >= s.rows) return k;
  }
  return -1;
}

void sparse_step(int algorithm_index, const void* op, const detail::SparseStep& s) {
  // (index, position) pairs sorted by both: the order of a stable sort by index. The scratch
  // vectors keep their capacity across steps: allocated afresh, their pages were faulted in
  // and zeroed on every step (a fifth of a 64K-row step's time).
  struct Entry {
    std::int64_t row, pos;
  };
  thread_local std::vector<Entry> order;
  thread_local std::vector<std::int64_t> run_start;  // into order
  thread_local std::vector<float> sums;              // a gradient row per thread
  order.resize(static_cast<std::size_t>(s.nnz));
  for (std::int64_t k = 0; k < s.nnz; ++k) order[k] = {index_at(s, k), k};
  std::sort(order.begin(), order.end(), [](const Entry& a, const Entry& b) {
    return a.row != b.row ? a.row < b.row : a.pos < b.pos;
  });
  run_start.clear();
  for (std::int64_t k = 0; k < s.nnz; ++k)
    if (k == 0 || order[k].row != order[k - 1].row) run_start.push_back(k);
  run_start.push_back(s.nnz);
  const auto runs = static_cast<std::int64_t>(run_start.size()) - 1;
  const RangeKernel kernel = active_table().step[algorithm_index];
  const RowKernel row_kernel = active_table().row_step[algorithm_index];
  const int threads =
      static_cast<int>(std::min<std::int64_t>(num_threads(), std::max<std::int64_t>(1, runs / 64)));
  // Allocated here: an exception may not leave an OpenMP region.
  sums.resize(static_cast<std::size_t>(threads * s.dim));
  const Entry* const sorted = order.data();
  const std::int64_t* const start = run_start.data();
  float* const scratch = sums.data();
#pragma omp parallel num_threads(threads)
  {
    float* const g = scratch + omp_get_thread_num() * s.dim;
#pragma omp for schedule(dynamic, 64)
    for (std::int64_t r = 0; r < runs; ++r) {
      // A row named once steps on its gradient row as it is; duplicates are summed in
      // position order starting from the first (the GPU's order: the same bits).
      const float* grad = s.grad_rows + sorted[start[r]].pos * s.dim;
      if (start[r + 1] - start[r] > 1) {
        std::copy(grad, grad + s.dim, g);
        for (std::int64_t k = start[r] + 1; k < start[r + 1]; ++k) {
          const float* src = s.grad_rows + sorted[k].pos * s.dim;
          for (std::int64_t j = 0; j < s.dim; ++j) g[j] += src[j];
        }
        grad = g;
      }
      const std::int64_t row = sorted[start[r]].row, offset = row * s.dim;
      if (s.rowwise) {
        float* row_states[kMaxStates];
        for (int k = 0; k < kMaxStates; ++k)
          row_states[k] = s.states[k] ? s.states[k] + row : nullptr;
        row_kernel(op, s.table + offset, grad, row_states, s.dim);
        continue;
      }
      DensePtrs t{s.table + offset, grad, {nullptr, nullptr, nullptr}};
      for (int k = 0; k < kMaxStates; ++k)
        if (s.states[k]) t.states[k] = s.states[k] + offset;
      kernel(op, t, 0, s.dim);
    }
  }
}

}  // namespace fo::cpu
