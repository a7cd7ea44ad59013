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
#include "fusedopt/kernels/ema.hpp"
#include "fusedopt/kernels/factored.hpp"
#include "fusedopt/kernels/rowwise.hpp"

namespace fo::cpu {

/// Pointers of one dense step; states[k] is null where the optimizer keeps no state k.
struct DensePtrs {
  float* param;
  const float* grad;
  float* states[kMaxStates];
  float grad_multiplier = 1.0f;  // every gradient is multiplied by this first (exact when 1)
  float* ema = nullptr;          // weight EMA (float32), updated from the stored param; or null
  float ema_weight = 0.0f;       // its weight, 1 - decay (ema_weight())
  MatrixView view{};             // the tensor as matrices (factored algorithms), or unset
};

/// The loop of elementwise_range for one set of present states (bit k of kPresent: state k),
/// so that the loop tests no pointer: fewer instructions per vector keep more loads in flight.
template <class Io, int kPresent, class Op>
inline void elementwise_loop(const Op& op, const DensePtrs& t, std::int64_t begin,
                             std::int64_t end) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  constexpr bool k0 = kPresent & 1, k1 = kPresent & 2, k2 = kPresent & 4;
  float* const p = t.param;
  const float* const g = t.grad;
  float* const s0 = t.states[0];
  float* const s1 = t.states[1];
  float* const s2 = t.states[2];
  const V scale(t.grad_multiplier);
  std::int64_t i = begin;
  for (; i + W <= end; i += W) {
    V pv = Io::load(p + i);
    V s[kMaxStates] = {k0 ? Io::load(s0 + i) : V(0.0f), k1 ? Io::load(s1 + i) : V(0.0f),
                       k2 ? Io::load(s2 + i) : V(0.0f)};
    op(pv, Io::load(g + i) * scale, s);
    Io::store(p + i, pv);
    if constexpr (k0) Io::store(s0 + i, s[0]);
    if constexpr (k1) Io::store(s1 + i, s[1]);
    if constexpr (k2) Io::store(s2 + i, s[2]);
  }
  if (i < end) {
    const auto m = Io::tail_mask(end - i);
    V pv = Io::load(p + i, m);
    V s[kMaxStates] = {k0 ? Io::load(s0 + i, m) : V(0.0f), k1 ? Io::load(s1 + i, m) : V(0.0f),
                       k2 ? Io::load(s2 + i, m) : V(0.0f)};
    op(pv, Io::load(g + i, m) * scale, s);
    Io::store(p + i, pv, m);
    if constexpr (k0) Io::store(s0 + i, s[0], m);
    if constexpr (k1) Io::store(s1 + i, s[1], m);
    if constexpr (k2) Io::store(s2 + i, s[2], m);
  }
}

/// The weight EMA over [begin, end), from the params stored there (kernels/ema.hpp). Not
/// inlined: one copy per instruction set, not one per algorithm and state subset. (Each ISA's
/// Io is its own type, so no two ISAs share this symbol.)
template <class Io>
__attribute__((noinline)) void ema_range(const float* p, float* e, float w, std::int64_t begin,
                                         std::int64_t end) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  std::int64_t i = begin;
  for (; i + W <= end; i += W) Io::store(e + i, ema_lerp(Io::load(e + i), Io::load(p + i), w));
  if (i < end) {
    const auto m = Io::tail_mask(end - i);
    Io::store(e + i, ema_lerp(Io::load(e + i, m), Io::load(p + i, m), w), m);
  }
}

/// The step over [begin, end): the loop for the states present, chosen once. Not inlined, so
/// that elementwise_range's two calls of it (with and without an EMA) share one copy.
template <class Io, class Op>
__attribute__((noinline)) void step_range(const Op& op_in, const DensePtrs& t, std::int64_t begin,
                                          std::int64_t end) {
  // A local copy: the loop's float stores cannot alias it, so its fields stay in registers
  // and its branches are loop-invariant (through the reference, every store could change
  // them, and each iteration reloaded and retested them).
  const Op op = op_in;
  const int present = (t.states[0] ? 1 : 0) | (t.states[1] ? 2 : 0) | (t.states[2] ? 4 : 0);
  static_assert(kMaxStates == 3, "one loop per subset of the states");
  switch (present) {
    case 0: return elementwise_loop<Io, 0>(op, t, begin, end);
    case 1: return elementwise_loop<Io, 1>(op, t, begin, end);
    case 2: return elementwise_loop<Io, 2>(op, t, begin, end);
    case 3: return elementwise_loop<Io, 3>(op, t, begin, end);
    case 4: return elementwise_loop<Io, 4>(op, t, begin, end);
    case 5: return elementwise_loop<Io, 5>(op, t, begin, end);
    case 6: return elementwise_loop<Io, 6>(op, t, begin, end);
    default: return elementwise_loop<Io, 7>(op, t, begin, end);
  }
}

/// Elements per block of a step with a weight EMA: the step over a block, then the EMA over
/// it while the block's params are still in L1 (2 KiB of them), so memory sees one pass.
inline constexpr std::int64_t kEmaBlock = 512;

/// pass(b, e) over [begin, end), and the weight EMA where t.ema is set: then in blocks of
/// kEmaBlock elements, each block's EMA right after its step. The EMA stays out of the
/// step's loop: a test in it made GCC unswitch every loop (twice the code and the compile
/// time of each ISA's kernels); an element's result does not depend on where a block ends.
template <class Io, class Pass>
inline void with_ema(const DensePtrs& t, std::int64_t begin, std::int64_t end, const Pass& pass) {
  if (!t.ema) return pass(begin, end);
  for (std::int64_t b = begin; b < end; b += kEmaBlock) {
    const std::int64_t stop = end - b > kEmaBlock ? b + kEmaBlock : end;
    pass(b, stop);
    ema_range<Io>(t.param, t.ema, t.ema_weight, b, stop);
  }
}

/// The step over [begin, end), and the weight EMA where t.ema is set.
template <class Io, class Op>
inline void elementwise_range(const Op& op, const DensePtrs& t, std::int64_t begin,
                              std::int64_t end) {
  with_ema<Io>(t, begin, end, [&](std::int64_t b, std::int64_t e) { step_range<Io>(op, t, b, e); });
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
