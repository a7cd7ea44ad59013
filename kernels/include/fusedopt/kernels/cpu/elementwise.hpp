// The CPU elementwise kernel: one pass over a range of a tensor, applying an optimizer functor
// to param, grad and state, each element loaded once and stored once.
//
// `Io` supplies the value type (a SIMD register wrapper or float), its width, and loads and
// stores. The tail is processed with masked loads and stores through the same vector code,
// so an element's result never depends on where a range starts or ends: any split of a tensor
// across threads gives bitwise the same result.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/rowwise.hpp"

namespace fo::cpu {

/// Pointers of one dense step; states[k] is null where the optimizer keeps no state k.
struct DensePtrs {
  float* param;
  const float* grad;
  float* states[kMaxStates];
  float grad_multiplier = 1.0f;  // every gradient is multiplied by this first (exact when 1)
};

template <class Io, class Op>
inline void elementwise_range(const Op& op_in, const DensePtrs& t, std::int64_t begin,
                              std::int64_t end) {
  // A local copy: the loop's float stores cannot alias it, so its fields stay in registers
  // and its branches are loop-invariant (through the reference, every store could change
  // them, and each iteration reloaded and retested them).
  const Op op = op_in;
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  float* const p = t.param;
  const float* const g = t.grad;
  float* const s0 = t.states[0];
  float* const s1 = t.states[1];
  float* const s2 = t.states[2];
  const V scale(t.grad_multiplier);
  std::int64_t i = begin;
  for (; i + W <= end; i += W) {
    V pv = Io::load(p + i);
    V s[kMaxStates] = {s0 ? Io::load(s0 + i) : V(0.0f), s1 ? Io::load(s1 + i) : V(0.0f),
                       s2 ? Io::load(s2 + i) : V(0.0f)};
    op(pv, Io::load(g + i) * scale, s);
    Io::store(p + i, pv);
    if (s0) Io::store(s0 + i, s[0]);
    if (s1) Io::store(s1 + i, s[1]);
    if (s2) Io::store(s2 + i, s[2]);
  }
  if (i < end) {
    const auto m = Io::tail_mask(end - i);
    V pv = Io::load(p + i, m);
    V s[kMaxStates] = {s0 ? Io::load(s0 + i, m) : V(0.0f), s1 ? Io::load(s1 + i, m) : V(0.0f),
                       s2 ? Io::load(s2 + i, m) : V(0.0f)};
    op(pv, Io::load(g + i, m) * scale, s);
    Io::store(p + i, pv, m);
    if (s0) Io::store(s0 + i, s[0], m);
    if (s1) Io::store(s1 + i, s[1], m);
    if (s2) Io::store(s2 + i, s[2], m);
  }
}

}  // namespace fo::cpu

namespace fo::cpu {

/// One row of a row-wise step (RowwiseCapable): `row_states[k]` points to that row's value
/// of state k (null where the algorithm keeps none); the row's mean square gradient in the
/// order of kernels/rowwise.hpp, then RowOp::row, then the rate applied to the row's `dim`
/// elements through the same vector code as elementwise_range.
template <class Io, class RowOp>
inline void rowwise_row(const RowOp& op, float* p, const float* g, float* const* row_states,
                        std::int64_t dim) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  float s[kMaxStates];
  for (int k = 0; k < kMaxStates; ++k) s[k] = row_states[k] ? *row_states[k] : 0.0f;
  const float rate = op.row(s, row_mean_square(g, dim));
  for (int k = 0; k < kMaxStates; ++k)
    if (row_states[k]) *row_states[k] = s[k];
  std::int64_t i = 0;
  for (; i + W <= dim; i += W) {
    V pv = Io::load(p + i);
    op(pv, Io::load(g + i), rate);
    Io::store(p + i, pv);
  }
  if (i < dim) {
    const auto m = Io::tail_mask(dim - i);
    V pv = Io::load(p + i, m);
    op(pv, Io::load(g + i, m), rate);
    Io::store(p + i, pv, m);
  }
}

}  // namespace fo::cpu
