// Per-tensor trust ratios (lamb, lars): a step in two passes over each tensor, with the
// tensor's norms between them.
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
// The sums' order is kernels/sum_order.hpp's, which the gradient norm shares.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/sum_order.hpp"

namespace fo {

/// Whether algorithm A steps in two passes with a per-tensor trust ratio (A::kTrustRatio).
template <class A, class = void>
struct TrustRatioCapable : std::false_type {};
template <class A>
struct TrustRatioCapable<A, std::void_t<decltype(A::kTrustRatio)>>
    : std::bool_constant<A::kTrustRatio> {};

}  // namespace fo
