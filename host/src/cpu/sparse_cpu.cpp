// The CPU sparse step: a stable sort of the indices, each distinct row's gradient summed in
// fp32 in original order starting from its first row (as the GPU does: the two agree
// bitwise, and a row named once is stepped exactly as a dense step would), then the
// algorithm's SIMD kernel over that row. Threads take distinct rows, so no two write one.
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
  std::vector<std::int64_t> order(static_cast<std::size_t>(s.nnz));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return index_at(s, a) < index_at(s, b); });
  std::vector<std::int64_t> run_start;  // into order
  for (std::int64_t k = 0; k < s.nnz; ++k)
    if (k == 0 || index_at(s, order[k]) != index_at(s, order[k - 1])) run_start.push_back(k);
  run_start.push_back(s.nnz);
  const auto runs = static_cast<std::int64_t>(run_start.size()) - 1;
  const RangeKernel kernel = active_table().step[algorithm_index];
  const int threads =
      static_cast<int>(std::min<std::int64_t>(num_threads(), std::max<std::int64_t>(1, runs / 64)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> g(static_cast<std::size_t>(s.dim));
#pragma omp for schedule(dynamic, 16)
    for (std::int64_t r = 0; r < runs; ++r) {
      const float* first = s.grad_rows + order[run_start[r]] * s.dim;
      std::copy(first, first + s.dim, g.begin());
      for (std::int64_t k = run_start[r] + 1; k < run_start[r + 1]; ++k) {
        const float* src = s.grad_rows + order[k] * s.dim;
        for (std::int64_t j = 0; j < s.dim; ++j) g[j] += src[j];
      }
      const std::int64_t offset = index_at(s, order[run_start[r]]) * s.dim;
      DensePtrs t{s.table + offset, g.data(), {nullptr, nullptr, nullptr}};
      for (int k = 0; k < kMaxStates; ++k)
        if (s.states[k]) t.states[k] = s.states[k] + offset;
      kernel(op, t, 0, s.dim);
    }
  }
}

}  // namespace fo::cpu
