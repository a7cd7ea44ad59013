// The CPU sparse step: a stable sort of the indices, each distinct row's gradient summed in
// fp32 in original order starting from its first row (as the GPU does: the two agree
// bitwise, and a row named once is stepped exactly as a dense step would), then the
// algorithm's SIMD kernel over that row (a row-wise algorithm's row kernel: its mean square
// in the order of kernels/rowwise.hpp, the GPU's order). Threads take distinct rows, so no
// two write one.
#include <omp.h>

#include <algorithm>
#include <numeric>
#include <string>
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

namespace {

struct Entry {
  std::int64_t row, pos;
};

/// The runs of a step's indices: (index, position) pairs sorted by both (the order of a
/// stable sort by index), and where each distinct row's run starts, with an end marker.
struct Runs {
  const Entry* sorted;
  const std::int64_t* start;
  std::int64_t count;
};

// The scratch vectors keep their capacity across steps: allocated afresh, their pages were
// faulted in and zeroed on every step (a fifth of a 64K-row step's time).
thread_local std::vector<Entry> g_order;
thread_local std::vector<std::int64_t> g_run_start;
thread_local std::vector<float> g_sums;     // a gradient row per thread
thread_local std::vector<float> g_decoded;  // a row of each quantized state per thread

Runs sort_runs(const detail::SparseStep& s) {
  g_order.resize(static_cast<std::size_t>(s.nnz));
  for (std::int64_t k = 0; k < s.nnz; ++k) g_order[k] = {index_at(s, k), k};
  std::sort(g_order.begin(), g_order.end(), [](const Entry& a, const Entry& b) {
    return a.row != b.row ? a.row < b.row : a.pos < b.pos;
  });
  g_run_start.clear();
  for (std::int64_t k = 0; k < s.nnz; ++k)
    if (k == 0 || g_order[k].row != g_order[k - 1].row) g_run_start.push_back(k);
  g_run_start.push_back(s.nnz);
  return {g_order.data(), g_run_start.data(), static_cast<std::int64_t>(g_run_start.size()) - 1};
}

/// Calls apply(row, grad) once per distinct row, on threads that take distinct rows, with
/// the row's gradient: its one gradient row, or the sum of its rows in position order
/// starting from the first (the GPU's order: the same bits).
template <class Apply>
void for_each_row(const detail::SparseStep& s, const Runs& runs, const Apply& apply) {
  const int threads = static_cast<int>(
      std::min<std::int64_t>(num_threads(), std::max<std::int64_t>(1, runs.count / 64)));
  // Allocated here: an exception may not leave an OpenMP region.
  g_sums.resize(static_cast<std::size_t>(threads * s.dim));
  float* const scratch = g_sums.data();
#pragma omp parallel num_threads(threads)
  {
    float* const g = scratch + omp_get_thread_num() * s.dim;
#pragma omp for schedule(dynamic, 64)
    for (std::int64_t r = 0; r < runs.count; ++r) {
      const std::int64_t first = runs.start[r], last = runs.start[r + 1];
      const float* grad = s.grad_rows + runs.sorted[first].pos * s.dim;
      if (last - first > 1) {
        std::copy(grad, grad + s.dim, g);
        for (std::int64_t k = first + 1; k < last; ++k) {
          const float* src = s.grad_rows + runs.sorted[k].pos * s.dim;
          for (std::int64_t j = 0; j < s.dim; ++j) g[j] += src[j];
        }
        grad = g;
      }
      apply(runs.sorted[first].row, grad);
    }
  }
}

}  // namespace

template <class A>
void sparse_step(const typename A::Options& options, std::int64_t step,
                 const detail::SparseStep& s) {
  if constexpr (!SparseCapable<A>::value) {
    throw Error(StatusCode::unsupported, std::string(A::kName) + " takes no sparse steps");
  } else {
    const Runs runs = sort_runs(s);
    const Kernels<A>& kernels = active_kernels<A>();
    if constexpr (RowwiseCapable<A>::value) {
      if (A::rowwise(options)) {
        const typename A::RowOp op = A::make_row_op(options, step);
        for_each_row(s, runs, [&](std::int64_t row, const float* grad) {
          float* row_states[kMaxStates];
          for (int k = 0; k < kMaxStates; ++k)
            row_states[k] = s.states[k] ? s.states[k] + row : nullptr;
          kernels.row(op, s.table + row * s.dim, grad, row_states, s.dim);
        });
        return;
      }
    }
    const typename A::Op op = A::make_op(options, step);
    if (is_quantized(s.state_dtype)) {
      // Quantized states (sparse.hpp): each row owns whole blocks; decode its states into this
      // thread's scratch, step, encode them back to nearest. Other rows' blocks stay as they are.
      const std::int64_t n = s.rows * s.dim;
      g_decoded.resize(static_cast<std::size_t>(num_threads() * kMaxStates * s.dim));
      float* const scratch = g_decoded.data();
      for_each_row(s, runs, [&](std::int64_t row, const float* grad) {
        float* const mine = scratch + omp_get_thread_num() * kMaxStates * s.dim;
        const std::int64_t offset = row * s.dim;
        DensePtrs t{s.table + offset, grad, {nullptr, nullptr, nullptr}};
        for (int k = 0; k < kMaxStates; ++k) {
          if (!s.states[k]) continue;
          t.states[k] = mine + k * s.dim;
          dequantize_state_range(t.states[k], s.states[k], s.state_dtype,
                                 (s.non_negative_states >> k) & 1u, n, offset, s.dim);
        }
        kernels.range(op, t, 0, s.dim);
        for (int k = 0; k < kMaxStates; ++k)
          if (s.states[k])
            quantize_state_range(s.states[k], s.state_dtype, (s.non_negative_states >> k) & 1u, n,
                                 offset, s.dim, t.states[k]);
      });
      return;
    }
    for_each_row(s, runs, [&](std::int64_t row, const float* grad) {
      const std::int64_t offset = row * s.dim;
      DensePtrs t{s.table + offset, grad, {nullptr, nullptr, nullptr}};
      for (int k = 0; k < kMaxStates; ++k)
        if (s.states[k]) t.states[k] = s.states[k] + offset;
      kernels.range(op, t, 0, s.dim);
    });
  }
}

#define FO_INSTANTIATE(A) \
  template void sparse_step<fo::A>(const fo::A::Options&, std::int64_t, const detail::SparseStep&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

}  // namespace fo::cpu
