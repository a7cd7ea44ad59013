// Per-tensor trust ratios (lamb, lars): a step in two passes over each tensor, with the
// tensor's norms between them, and the one summation order both backends use for those norms.
//
// An algorithm with `static constexpr bool kTrustRatio = true` has an Op that provides, instead
// of the one-pass call operator:
//   template <class V> void advance(const V& p, V g, V* s) const;   // pass one: the states
//   template <class V> V direction(const V& p, V g, const V* s) const;  // the normed vector
//   FO_HOST_DEVICE float rate(double param_norm, double direction_norm) const;
//   template <class V> void apply(V& p, V g, V* s, V rate) const;   // pass two
//   bool needs_norms() const;   // false: rate() ignores the norms (the options alone decide)
//   static constexpr bool kAdvanceStates;    // advance() writes the states (else a no-op)
//   static constexpr bool kApplyReadsGrad;   // apply() uses g
//   static constexpr bool kApplyWritesStates;  // apply() writes the states
//
// Pass one runs advance() (its states are stored, and read back as stored: a bf16 state is
// rounded before direction() sees it, so the norm is of exactly the update pass two
// applies), then accumulates the squares of p and of direction() in double. Between the
// passes each tensor's two sums become norms and rate() turns them into one float. Pass two
// runs apply() with that rate. Where neither advance() nor the norms are needed, pass one is
// skipped.
//
// The order of the sums, on the CPU and on CUDA alike: a tensor is cut into chunks of
// kTrustChunk elements (element 0 starts chunk 0); within a chunk, element o (its offset in
// the chunk) goes to accumulator o % 1024, which adds its elements' squares (exact in double)
// in increasing o; then lane l of kTrustLanes takes (a[4l] + a[4l+1]) + (a[4l+2] + a[4l+3])
// and the lanes are summed by the fixed tree of trust_tree_sum. The chunks' sums are summed
// the same way: chunk c goes to lane c % kTrustLanes in increasing c, then the tree. On CUDA
// thread l owns accumulators 4l..4l+3 (its 4-wide loads), on the CPU they are vector lanes:
// neither needs a shuffle. One order for every thread count, ISA and launch plan, so the
// backends agree bitwise wherever their per-element math does.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/config.hpp"

namespace fo {

inline constexpr std::int64_t kTrustChunk = 8192;  // the CUDA step's elements per block
inline constexpr int kTrustLanes = 256;            // the CUDA step's threads per block
inline constexpr int kTrustRow = 4 * kTrustLanes;  // elements per round of the lanes

/// Whether algorithm A steps in two passes with a per-tensor trust ratio (A::kTrustRatio).
template <class A, class = void>
struct TrustRatioCapable : std::false_type {};
template <class A>
struct TrustRatioCapable<A, std::void_t<decltype(A::kTrustRatio)>>
    : std::bool_constant<A::kTrustRatio> {};

/// Sums v[0, kTrustLanes) by the fixed tree (v[l] += v[l + w] for w = 128, 64, ..., 1) and
/// returns v[0]; overwrites v. The CUDA kernels run the same tree across threads.
inline double trust_tree_sum(double* v) {
  for (int w = kTrustLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) v[l] += v[l + w];
  return v[0];
}

/// Adds the squares of x[0, count) (count <= kTrustRow; one round of a chunk, x[0] at a
/// multiple of kTrustRow) to the accumulators acc[0, count), in double.
inline void trust_add_row(const float* x, int count, double* acc) {
  for (int o = 0; o < count; ++o) {
    const double v = x[o];
    acc[o] += v * v;
  }
}

/// A chunk's sum from its kTrustRow accumulators (overwritten), in the order above.
inline double trust_chunk_sum(double* acc) {
  for (int l = 0; l < kTrustLanes; ++l)
    acc[l] = (acc[4 * l] + acc[4 * l + 1]) + (acc[4 * l + 2] + acc[4 * l + 3]);
  return trust_tree_sum(acc);
}

/// The sum of `count` chunk sums partial[c * stride] in the order above.
inline double trust_total(const double* partial, std::int64_t count, std::int64_t stride) {
  double lanes[kTrustLanes] = {};
  for (std::int64_t c = 0; c < count; ++c) lanes[c % kTrustLanes] += partial[c * stride];
  return trust_tree_sum(lanes);
}

}  // namespace fo
