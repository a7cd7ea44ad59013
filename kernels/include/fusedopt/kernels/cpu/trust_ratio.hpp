// The CPU kernels of a trust-ratio step (kernels/trust_ratio.hpp): pass one over whole chunks,
// giving each chunk's two sums of squares in the shared order, and pass two over any range.
// The same vector code and masked tails as elementwise.hpp.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/cpu/elementwise.hpp"
#include "fusedopt/kernels/trust_ratio.hpp"

namespace fo::cpu {

/// Pass one over chunks [chunk_begin, chunk_end) of a tensor of n elements: advance() into the
/// states (where the Op has it and `advance`; else the states are already advanced: the
/// storage layer's split pass, below), then the sums of squares of p and of direction(),
/// chunk c's into partial[2c] and partial[2c + 1].
template <class Io, class Op>
inline void trust_first_chunks(const Op& op_in, const DensePtrs& t, std::int64_t n,
                               std::int64_t chunk_begin, std::int64_t chunk_end, double* partial,
                               bool advance) {
  using V = typename Io::V;
  constexpr int W = static_cast<int>(sizeof(V) / sizeof(float));
  const Op op = op_in;
  float* const p = t.param;
  const float* const g = t.grad;
  float* const st[kMaxStates] = {t.states[0], t.states[1], t.states[2]};
  const V scale(t.grad_multiplier);
  alignas(64) float dir[kSumRow];
  // One element group of pass one at p + i, `count` wide (W, or a masked tail).
  auto group = [&](std::int64_t i, auto... mask) {
    const V pv = Io::load(p + i, mask...);
    V s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = st[k] ? Io::load(st[k] + i, mask...) : V(0.0f);
    const V gv = Io::load(g + i, mask...) * scale;
    if constexpr (Op::kAdvanceStates) {
      if (advance) {
        op.advance(pv, gv, s);
        for (int k = 0; k < kMaxStates; ++k)
          if (st[k]) Io::store(st[k] + i, s[k], mask...);
      }
    }
    return op.direction(pv, gv, s);
  };
  for (std::int64_t c = chunk_begin; c < chunk_end; ++c) {
    alignas(64) double acc_p[kSumRow] = {}, acc_u[kSumRow] = {};
    const std::int64_t end = n < (c + 1) * kSumChunk ? n : (c + 1) * kSumChunk;
    for (std::int64_t row = c * kSumChunk; row < end; row += kSumRow) {
      const int count = static_cast<int>(end - row < kSumRow ? end - row : kSumRow);
      int o = 0;
      for (; o + W <= count; o += W) Io::store(dir + o, group(row + o));
      if (o < count) {
        const auto m = Io::tail_mask(count - o);
        Io::store(dir + o, group(row + o, m), m);
      }
      add_squares(p + row, count, acc_p);
      add_squares(dir, count, acc_u);
    }
    partial[2 * c] = chunk_sum(acc_p);
    partial[2 * c + 1] = chunk_sum(acc_u);
  }
}

/// advance() alone over [begin, end): the first half of pass one where the states are stored
/// rounded (the storage layer rounds them between the halves, so that direction() sees what
/// the storage holds, as CUDA's pass one does).
template <class Io, class Op>
inline void trust_advance_range(const Op& op_in, const DensePtrs& t, std::int64_t begin,
                                std::int64_t end) {
  if constexpr (Op::kAdvanceStates) {
    using V = typename Io::V;
    constexpr std::int64_t W = sizeof(V) / sizeof(float);
    const Op op = op_in;
    float* const st[kMaxStates] = {t.states[0], t.states[1], t.states[2]};
    const V scale(t.grad_multiplier);
    auto group = [&](std::int64_t i, auto... mask) {
      V s[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k) s[k] = st[k] ? Io::load(st[k] + i, mask...) : V(0.0f);
      op.advance(Io::load(t.param + i, mask...), Io::load(t.grad + i, mask...) * scale, s);
      for (int k = 0; k < kMaxStates; ++k)
        if (st[k]) Io::store(st[k] + i, s[k], mask...);
    };
    std::int64_t i = begin;
    for (; i + W <= end; i += W) group(i);
    if (i < end) group(i, Io::tail_mask(end - i));
  } else {
    (void)op_in, (void)t, (void)begin, (void)end;
  }
}

/// Pass two over [begin, end) of a tensor: apply() with the tensor's rate. The grad is read
/// only where the Op's apply() uses it, the states written only where it writes them.
template <class Io, class Op>
inline void trust_second_block(const Op& op_in, const DensePtrs& t, float rate, std::int64_t begin,
                               std::int64_t end) {
  using V = typename Io::V;
  constexpr std::int64_t W = sizeof(V) / sizeof(float);
  const Op op = op_in;
  float* const p = t.param;
  const float* const g = t.grad;
  float* const st[kMaxStates] = {t.states[0], t.states[1], t.states[2]};
  const V scale(t.grad_multiplier), r(rate);
  auto group = [&](std::int64_t i, auto... mask) {
    V pv = Io::load(p + i, mask...);
    V s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = st[k] ? Io::load(st[k] + i, mask...) : V(0.0f);
    const V gv = Op::kApplyReadsGrad ? Io::load(g + i, mask...) * scale : V(0.0f);
    op.apply(pv, gv, s, r);
    Io::store(p + i, pv, mask...);
    if constexpr (Op::kApplyWritesStates)
      for (int k = 0; k < kMaxStates; ++k)
        if (st[k]) Io::store(st[k] + i, s[k], mask...);
  };
  std::int64_t i = begin;
  for (; i + W <= end; i += W) group(i);
  if (i < end) group(i, Io::tail_mask(end - i));
}

/// Pass two over [begin, end), and the weight EMA where t.ema is set (with_ema, as the
/// one-pass step).
template <class Io, class Op>
inline void trust_second_range(const Op& op, const DensePtrs& t, float rate, std::int64_t begin,
                               std::int64_t end) {
  with_ema<Io>(t, begin, end,
               [&](std::int64_t b, std::int64_t e) { trust_second_block<Io>(op, t, rate, b, e); });
}

}  // namespace fo::cpu
