// The CPU kernels of a factored step (kernels/factored.hpp): the statistics pass over whole
// segments of kColSegment rows (plain double loops, which each ISA's translation unit
// vectorizes without reassociating: every ISA gives the same bits), the sums pass over whole
// chunks of the shared order and the apply pass over any range (the ISA's vectors, masked
// tails, as elementwise.hpp).
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cpu/elementwise.hpp"
#include "fusedopt/kernels/factored.hpp"
#include "fusedopt/kernels/sum_order.hpp"

namespace fo::cpu {

/// Statistics pass over segments [seg_begin, seg_end) of a factored tensor (segment s: matrix
/// s / per_matrix, rows (s % per_matrix) * kColSegment onwards): each row's sum of g^2 into
/// row_sq[matrix * rows + row], each column's sum over the segment into
/// col_partial[s * cols + col].
template <class Io>  // a template on the ISA: each ISA's unit its own copy, as the others
inline void factored_stats_segments(const DensePtrs& t, std::int64_t seg_begin,
                                    std::int64_t seg_end, double* row_sq, double* col_partial) {
  const std::int64_t rows = t.view.rows, cols = t.view.cols;
  const std::int64_t per_matrix = (rows + kColSegment - 1) / kColSegment;
  const float scale = t.grad_multiplier;
  for (std::int64_t s = seg_begin; s < seg_end; ++s) {
    const std::int64_t b = s / per_matrix, r0 = (s % per_matrix) * kColSegment;
    const std::int64_t r1 = r0 + kColSegment < rows ? r0 + kColSegment : rows;
    double* const col = col_partial + s * cols;
    for (std::int64_t c = 0; c < cols; ++c) col[c] = 0.0;
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* const g = t.grad + (b * rows + r) * cols;
      double lanes[kRowLanes] = {};
      std::int64_t c = 0;
      for (; c + kRowLanes <= cols; c += kRowLanes)
        for (int l = 0; l < kRowLanes; ++l) {
          const double x = g[c + l] * scale;
          lanes[l] += x * x;
          col[c + l] += x * x;
        }
      for (int l = 0; c + l < cols; ++l) {
        const double x = g[c + l] * scale;
        lanes[l] += x * x;
        col[c + l] += x * x;
      }
      row_sq[b * rows + r] = row_lane_sum(lanes);
    }
  }
}

/// Calls run(i, j, stat) for the pieces [i, j) of [begin, end) that lie in one row of a
/// factored tensor (stat: the row's index over all matrices), or once with stat -1 for an
/// unfactored one.
template <class Run>
inline void for_row_pieces(const MatrixView& v, std::int64_t begin, std::int64_t end,
                           const Run& run) {
  if (!v.factored()) return run(begin, end, std::int64_t{-1});
  while (begin < end) {
    const std::int64_t row = begin / v.cols;
    const std::int64_t stop = (row + 1) * v.cols < end ? (row + 1) * v.cols : end;
    run(begin, stop, row);
    begin = stop;
  }
}

/// The update direction u of elements [begin, end) (one row piece, or unfactored) into
/// out[0, end - begin), through the ISA's vectors (a masked tail). Unfactored with `blend`:
/// the per-element statistic is blended and stored first (the sums pass).
template <class Io, class Op>
inline void factored_direction(const Op& op, const DensePtrs& t, const float* norms,
                               std::int64_t begin, std::int64_t end, std::int64_t row, bool blend,
                               float* out) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  const float* const g = t.grad;
  const V scale(t.grad_multiplier);
  if (row < 0) {
    float* const var = t.states[2];
    auto group = [&](std::int64_t i, auto... mask) {
      const V x = Io::load(g + i, mask...) * scale;
      V s = Io::load(var + i, mask...);
      if (blend) {
        s = op.blend(s, x * x);
        Io::store(var + i, s, mask...);
      }
      return op.direction(x, s);
    };
    std::int64_t i = begin;
    for (; i + W <= end; i += W) Io::store(out + (i - begin), group(i));
    if (i < end) {
      const auto m = Io::tail_mask(end - i);
      Io::store(out + (i - begin), group(i, m), m);
    }
    return;
  }
  const MatrixView& v = t.view;
  const std::int64_t b = row / v.rows;
  const V rv(t.states[0][row]), nb(norms[b]);
  const float* const col = t.states[1] + b * v.cols + (begin - row * v.cols) - begin;
  auto group = [&](std::int64_t i, auto... mask) {
    const V x = Io::load(g + i, mask...) * scale;
    return op.direction(x, op.estimate(rv, Io::load(col + i, mask...), nb));
  };
  std::int64_t i = begin;
  for (; i + W <= end; i += W) Io::store(out + (i - begin), group(i));
  if (i < end) {
    const auto m = Io::tail_mask(end - i);
    Io::store(out + (i - begin), group(i, m), m);
  }
}

/// Sums pass over chunks [chunk_begin, chunk_end) of a tensor of n elements: chunk c's sums of
/// p^2 and u^2 into partial[2c] and partial[2c + 1]. `blend`: an unfactored tensor's
/// per-element statistic is blended and stored first (false where the storage layer has
/// blended and rounded it already).
template <class Io, class Op>
inline void factored_sums_chunks(const Op& op, const DensePtrs& t, const float* norms,
                                 std::int64_t n, std::int64_t chunk_begin, std::int64_t chunk_end,
                                 double* partial, bool blend) {
  alignas(64) float dir[kSumRow];
  for (std::int64_t c = chunk_begin; c < chunk_end; ++c) {
    alignas(64) double acc_p[kSumRow] = {}, acc_u[kSumRow] = {};
    const std::int64_t end = n < (c + 1) * kSumChunk ? n : (c + 1) * kSumChunk;
    for (std::int64_t round = c * kSumChunk; round < end; round += kSumRow) {
      const std::int64_t stop = end - round < kSumRow ? end : round + kSumRow;
      for_row_pieces(t.view, round, stop, [&](std::int64_t i, std::int64_t j, std::int64_t row) {
        factored_direction<Io>(op, t, norms, i, j, row, blend, dir + (i - round));
      });
      add_squares(t.param + round, static_cast<int>(stop - round), acc_p);
      add_squares(dir, static_cast<int>(stop - round), acc_u);
    }
    partial[2 * c] = chunk_sum(acc_p);
    partial[2 * c + 1] = chunk_sum(acc_u);
  }
}

/// Apply pass over [begin, end): p <- apply(p, u, rate), and the weight EMA where t.ema is set.
template <class Io, class Op>
inline void factored_apply_range(const Op& op, const DensePtrs& t, const float* norms, float rate,
                                 std::int64_t begin, std::int64_t end) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  with_ema<Io>(t, begin, end, [&](std::int64_t b0, std::int64_t e0) {
    alignas(64) float dir[kSumRow];
    float* const p = t.param;
    const V r(rate);
    for (std::int64_t piece = b0; piece < e0; piece += kSumRow) {
      const std::int64_t stop = e0 - piece < kSumRow ? e0 : piece + kSumRow;
      for_row_pieces(t.view, piece, stop, [&](std::int64_t i, std::int64_t j, std::int64_t row) {
        factored_direction<Io>(op, t, norms, i, j, row, false, dir + (i - piece));
      });
      const float* const u = dir - piece;
      std::int64_t i = piece;
      for (; i + W <= stop; i += W) Io::store(p + i, op.apply(Io::load(p + i), Io::load(u + i), r));
      if (i < stop) {
        const auto m = Io::tail_mask(stop - i);
        Io::store(p + i, op.apply(Io::load(p + i, m), Io::load(u + i, m), r), m);
      }
    }
  });
}

}  // namespace fo::cpu
