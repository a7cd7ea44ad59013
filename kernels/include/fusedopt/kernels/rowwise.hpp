// Row-wise optimizers (RowwiseCapable, algorithm.hpp) reduce each touched row's gradient to
// one number, its mean square, before RowOp::row. Every backend reduces in the one order
// below, so the CPU and the GPU agree bitwise:
//
//   32 lanes, each starting at +0; lane l adds g[j] * g[j] for j = l, l + 32, l + 64, ... in
//   ascending j (each product rounded to float, then added: no FMA); then, for w = 16, 8, 4,
//   2, 1, lane[l] = lane[l] + lane[l + w] for every l < w; the result is lane[0] / dim.
//
// On the GPU that is one warp per row: lane l of the warp, then __shfl_down_sync by w.
// Accuracy: lane[0] sums dim squares (all >= 0) through at most ceil(dim / 32) + 5 roundings,
// so its relative error is below (ceil(dim / 32) + 6) * 2^-24.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"

namespace fo {

inline constexpr int kRowLanes = 32;

/// The row's mean square gradient in the order above (host code; the GPU's is in its kernel).
/// Internal linkage: each CPU ISA's translation unit compiles its own copy, which the linker
/// must never hand to another.
static inline float row_mean_square(const float* g, std::int64_t dim) {
  float lane[kRowLanes] = {};
  std::int64_t j = 0;
  for (; j + kRowLanes <= dim; j += kRowLanes)
    for (int l = 0; l < kRowLanes; ++l) lane[l] = lane[l] + g[j + l] * g[j + l];
  for (int l = 0; j + l < dim; ++l) lane[l] = lane[l] + g[j + l] * g[j + l];
  for (int w = kRowLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] = lane[l] + lane[l + w];
  return lane[0] / static_cast<float>(dim);
}

}  // namespace fo
