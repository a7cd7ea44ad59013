// The "matrix" kind of algorithm (Muon's shape of step): a param is a batch of matrices over
// its last two dimensions ([batch, rows, cols], every leading dimension is batch), and each
// step orthogonalizes a per-element quantity of it with the Newton-Schulz iteration
// (kernels/newton_schulz.hpp) before applying it. Params of fewer than two dimensions are
// refused (AlgorithmDescription::matrix_only).
//
// An algorithm with `static constexpr bool kMatrix = true` declares
//   static NsConfig ns_config(const Options&);      // the iteration's coefficients, steps,
//                                                   // eps, and whether it runs in bf16
// and its Op provides:
//   template <class V> V prepare(V g, V* s) const;  // pass 1: advances the states s (in
//                                                   // kStates order) from the scaled gradient
//                                                   // g and returns the iteration's input
//   FO_HOST_DEVICE float rate(std::int64_t rows, std::int64_t cols) const;
//                                                   // the multiplier of the output (per
//                                                   // matrix shape; the same for a batch)
//   template <class V> V apply(V p, V o, V rate) const;   // pass 2: the new param from the
//                                                   // iteration's output o
//
// A step of one tensor, the same on every backend:
//   prepare     elementwise: the states advance, the input X is written to a workspace
//               (float32, or bfloat16 rounded to nearest where ns_bf16: CUDA only)
//   iterate     X <- NS(X) for each matrix of the batch, in place (OpenBLAS on the CPU,
//               cuBLAS on CUDA)
//   apply       elementwise: p <- apply(p, X, rate(rows, cols)), then the weight EMA
// The elementwise passes are plain fp32 operations, so the CPU and CUDA give the same bits for
// the same X; the iteration's GEMMs are not bitwise alike across BLAS libraries
// (docs/newton-schulz.md).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/factored.hpp"  // MatrixView
#include "fusedopt/kernels/newton_schulz.hpp"

namespace fo {

/// What an algorithm of the matrix kind asks of the Newton-Schulz iteration.
struct NsConfig {
  NsCoefficients coefficients;
  int steps;
  double eps;
  bool bf16;  // bf16 operands with fp32 accumulation (CUDA only); else float32 throughout
};

/// Whether algorithm A is of the matrix kind (A::kMatrix).
template <class A, class = void>
struct MatrixCapable : std::false_type {};
template <class A>
struct MatrixCapable<A, std::void_t<decltype(A::kMatrix)>> : std::bool_constant<A::kMatrix> {};

/// Whether a tensor of `numel` elements viewed as `v` is a well-formed batch of matrices:
/// every side set and their product numel (a 0-size matrix included).
FO_HOST_DEVICE bool is_matrix_batch(const MatrixView& v, std::int64_t numel) {
  return v.batch >= 0 && v.rows >= 0 && v.cols >= 0 && (v.rows > 0 || v.cols > 0 || v.batch > 0) &&
         v.batch * v.rows * v.cols == numel;
}

}  // namespace fo
