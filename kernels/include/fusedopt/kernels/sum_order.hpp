// Deterministic sums of squares in double: the order both backends use, so that norms (and
// what depends on them: clipping, trust ratios) are the same bits on the CPU and the GPU.
//
// One fixed order of sums of squares, on the CPU and on CUDA alike, for the trust ratios'
// norms (kernels/trust_ratio.hpp) and the Newton-Schulz iteration's norm of each matrix
// (kernels/newton_schulz.hpp). (The global gradient norm, grad_sumsq_kernel and the
// optimizer's cpu_norm, has lanes of one element, l, l + 256, ...: the same on both
// backends, but not this order; its chunks and tree are these.) A tensor is cut into chunks of
// kSumChunk elements (element 0 starts chunk 0); within a chunk, element o (its offset in
// the chunk) goes to accumulator o % 1024, which adds its elements' squares (exact in double)
// in increasing o; then lane l of kSumLanes takes (a[4l] + a[4l+1]) + (a[4l+2] + a[4l+3])
// and the lanes are summed by the fixed tree of tree_sum. The chunks' sums are summed
// the same way: chunk c goes to lane c % kSumLanes in increasing c, then the tree. On CUDA
// thread l owns accumulators 4l..4l+3 (its 4-wide loads), on the CPU they are vector lanes:
// neither needs a shuffle. One order for every thread count, ISA and launch plan, so the
// backends agree bitwise wherever their per-element math does.
#pragma once

#include <cstdint>

namespace fo {

inline constexpr std::int64_t kSumChunk = 8192;  // the CUDA step's elements per block
inline constexpr int kSumLanes = 256;            // the CUDA step's threads per block
inline constexpr int kSumRow = 4 * kSumLanes;    // elements per round of the lanes

/// Chunks of a tensor of n elements (n >= 0).
constexpr std::int64_t sum_chunks(std::int64_t n) { return (n + kSumChunk - 1) / kSumChunk; }

/// Sums v[0, kSumLanes) by the fixed tree (v[l] += v[l + w] for w = 128, 64, ..., 1) and
/// returns v[0]; overwrites v. The CUDA kernels run the same tree across threads.
inline double tree_sum(double* v) {
  for (int w = kSumLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) v[l] += v[l + w];
  return v[0];
}

/// Adds the squares of x[0, count) (count <= kSumRow; one round of a chunk, x[0] at a
/// multiple of kSumRow) to the accumulators acc[0, count), in double.
inline void add_squares(const float* x, int count, double* acc) {
  for (int o = 0; o < count; ++o) {
    const double v = x[o];
    acc[o] += v * v;
  }
}

/// A chunk's sum from its kSumRow accumulators (overwritten), in the order above.
inline double chunk_sum(double* acc) {
  for (int l = 0; l < kSumLanes; ++l)
    acc[l] = (acc[4 * l] + acc[4 * l + 1]) + (acc[4 * l + 2] + acc[4 * l + 3]);
  return tree_sum(acc);
}

/// The sum of `count` chunk sums partial[c * stride] in the order above.
inline double sum_of_chunks(const double* partial, std::int64_t count, std::int64_t stride) {
  double lanes[kSumLanes] = {};
  for (std::int64_t c = 0; c < count; ++c) lanes[c % kSumLanes] += partial[c * stride];
  return tree_sum(lanes);
}

/// The sum of squares of x[0, n) in the order above, on one thread: each chunk's sum as
/// add_squares and chunk_sum give it, and the chunks' sums as sum_of_chunks adds them.
inline double sum_of_squares(const float* x, std::int64_t n) {
  double lanes[kSumLanes] = {};
  for (std::int64_t c = 0; c < sum_chunks(n); ++c) {
    double acc[kSumRow] = {};
    const std::int64_t end = n < (c + 1) * kSumChunk ? n : (c + 1) * kSumChunk;
    for (std::int64_t row = c * kSumChunk; row < end; row += kSumRow)
      add_squares(x + row, static_cast<int>(end - row < kSumRow ? end - row : kSumRow), acc);
    lanes[c % kSumLanes] += chunk_sum(acc);
  }
  return tree_sum(lanes);
}

}  // namespace fo
