// The CPU kernels of a matrix step's two elementwise passes (kernels/matrix_step.hpp), around
// the Newton-Schulz iteration: compiled by each ISA's translation unit through the same Io
// layer as the elementwise step (masked tails, so any split gives the same bits).
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cpu/elementwise.hpp"

namespace fo::cpu {

/// Pass 1 over [begin, end): the states advance from the scaled gradient and the iteration's
/// input goes to x[i].
template <class Io, class Op>
inline void matrix_prepare_range(const Op& op_in, const DensePtrs& t, float* x, std::int64_t begin,
                                 std::int64_t end) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  const Op op = op_in;  // a local copy: its fields stay in registers (elementwise.hpp)
  const V scale(t.grad_multiplier);
  float* const s0 = t.states[0];
  float* const s1 = t.states[1];
  float* const s2 = t.states[2];
  std::int64_t i = begin;
  for (; i + W <= end; i += W) {
    V s[kMaxStates] = {s0 ? Io::load(s0 + i) : V(0.0f), s1 ? Io::load(s1 + i) : V(0.0f),
                       s2 ? Io::load(s2 + i) : V(0.0f)};
    Io::store(x + i, op.prepare(Io::load(t.grad + i) * scale, s));
    if (s0) Io::store(s0 + i, s[0]);
    if (s1) Io::store(s1 + i, s[1]);
    if (s2) Io::store(s2 + i, s[2]);
  }
  if (i < end) {
    const auto m = Io::tail_mask(end - i);
    V s[kMaxStates] = {s0 ? Io::load(s0 + i, m) : V(0.0f), s1 ? Io::load(s1 + i, m) : V(0.0f),
                       s2 ? Io::load(s2 + i, m) : V(0.0f)};
    Io::store(x + i, op.prepare(Io::load(t.grad + i, m) * scale, s), m);
    if (s0) Io::store(s0 + i, s[0], m);
    if (s1) Io::store(s1 + i, s[1], m);
    if (s2) Io::store(s2 + i, s[2], m);
  }
}

/// Pass 2 over [begin, end): p <- apply(p, o[i], rate), and the weight EMA where t.ema is set.
template <class Io, class Op>
inline void matrix_apply_range(const Op& op_in, const DensePtrs& t, const float* o, float rate,
                               std::int64_t begin, std::int64_t end) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  const Op op = op_in;
  with_ema<Io>(t, begin, end, [&](std::int64_t b, std::int64_t e) {
    float* const p = t.param;
    const V r(rate);
    std::int64_t i = b;
    for (; i + W <= e; i += W) Io::store(p + i, op.apply(Io::load(p + i), Io::load(o + i), r));
    if (i < e) {
      const auto m = Io::tail_mask(e - i);
      Io::store(p + i, op.apply(Io::load(p + i, m), Io::load(o + i, m), r), m);
    }
  });
}

}  // namespace fo::cpu
