// Factored second moments (Adafactor): a param is viewed as a batch of matrices [batch, rows,
// cols] over its last two dimensions (every leading dimension is batch), and its second-moment
// statistics are kept per row and per column instead of per element. A param of fewer than two
// dimensions keeps them per element.
//
// An algorithm with `static constexpr bool kFactored = true` has three states, in this order:
// one value per row (batch * rows, StateShape::factor_rows), one per column (batch * cols,
// StateShape::factor_cols), one per element for a param of fewer than two dimensions
// (StateShape::unfactored); a param keeps either the first two or the third. Its Op provides:
//   FO_HOST_DEVICE float blend(float state, float mean_square) const;
//       a statistic's new value from its value and this step's mean of g^2 over its row or
//       column (or g^2 itself, per element)
//   FO_HOST_DEVICE float normalizer(double row_mean) const;
//       what divides row * col: from the mean of a matrix's (blended) row statistics
//   template <class V> V estimate(V row, V col, V normalizer) const;
//       the factored second moment of one element
//   template <class V> V direction(V g, V second_moment) const;   // the update direction u
//   FO_HOST_DEVICE float rate(double param_sum_sq, double direction_sum_sq,
//                             std::int64_t numel) const;           // per tensor
//   template <class V> V apply(V p, V u, V rate) const;            // the new param
//
// A step takes three passes over each tensor, in the same order of operations on the CPU and
// CUDA, so both give the same bits:
//   statistics  factored: the sums of g^2 of each row and of each column, in double, in the
//               orders below; each row and column statistic blended with its mean (the sum
//               divided by cols or rows, in double, rounded once); each matrix's normalizer
//               from the mean of its blended row statistics (summed in the row order below)
//   sums        the sums of p^2 and of u^2 over the tensor, in double, in the order of
//               kernels/sum_order.hpp; u from the blended statistics (unfactored: this pass
//               blends the per-element statistic first and stores it)
//   apply       p <- apply(p, u, rate), u recomputed bitwise as the sums pass had it
// Orders:
//   a row's sum (and the normalizer's sum over a matrix's row statistics): the lanes of
//   kernels/rowwise.hpp in double: element c goes to lane c % kRowLanes, which adds in
//   increasing c; lanes are then summed by the fixed tree v[l] += v[l + w] for w = 16, 8, 4,
//   2, 1 (on CUDA: one warp per row, a shuffle tree).
//   a column's sum: its rows in segments of kColSegment (row 0 starts segment 0); within a
//   segment rows add in increasing order from 0.0, and the segments' sums add in increasing
//   segment order from 0.0.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/rowwise.hpp"  // kRowLanes: the row-wise mean square's lanes

namespace fo {

inline constexpr int kColSegment = 32;  // rows per segment of a column sum

/// Whether algorithm A keeps factored second moments (A::kFactored).
template <class A, class = void>
struct FactoredCapable : std::false_type {};
template <class A>
struct FactoredCapable<A, std::void_t<decltype(A::kFactored)>> : std::bool_constant<A::kFactored> {
};

/// Sums lanes v[0, kRowLanes) by the fixed tree of a row sum and returns v[0]; overwrites v.
/// Internal linkage: each CPU ISA's unit compiles its own copy.
static inline double row_lane_sum(double* v) {
  for (int w = kRowLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) v[l] += v[l + w];
  return v[0];
}

/// The matrix view of a tensor: batch * rows * cols == numel; rows == 0 for a tensor of fewer
/// than two dimensions (not factored).
struct MatrixView {
  std::int64_t batch = 0, rows = 0, cols = 0;
  FO_HOST_DEVICE bool factored() const { return rows > 0; }
};

}  // namespace fo
