// The Newton-Schulz iteration that Muon orthogonalizes its update with (docs/newton-schulz.md;
// torch.optim.Muon's _zeropower_via_newtonschulz), in one place for every backend: the
// coefficients and defaults, the transpose rule, the scale, and the order of the GEMMs as
// column-major BLAS calls. host/src/matrix/newton_schulz.cpp runs the plan with OpenBLAS,
// host/src/cuda/newton_schulz.cu with cuBLAS; neither decides any of it again.
//
// For one matrix G (rows x cols, row-major):
//   X = G, or G^T when rows > cols, so that X is m x n with m = min(rows, cols) <= n and the
//       Gram matrix X X^T is the small side (m x m)
//   X = X / max(||X||_F, eps)                     (||.||_F accumulated in double, in the
//                                                  order of kernels/sum_order.hpp)
//   steps times:
//     A = X X^T                                   (gram)
//     B = b A + c A A                             (poly)
//     X = a X + B X                               (update)
//   out = X, or X^T when transposed
//
// Storage: no transpose is ever done. A row-major rows x cols buffer read column-major is the
// cols x rows matrix G^T. So, column-major throughout: when rows > cols the buffer *is* X
// (m = cols, n = rows, leading dimension m); otherwise it is X^T (n x m, leading dimension n),
// and each GEMM below is the transpose of the one written above (A and B are symmetric, so
// only the update changes its form). The output is written in the input's layout.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"

namespace fo {

/// The quintic's coefficients: X <- a X + (b A + c A^2) X with A = X X^T.
struct NsCoefficients {
  double a, b, c;
};

/// torch.optim.Muon's defaults (torch 2.15, optim/_muon.py): coefficients, steps, eps.
inline constexpr NsCoefficients kNsDefaultCoefficients{3.4445, -4.7750, 2.0315};
inline constexpr int kNsDefaultSteps = 5;
inline constexpr double kNsDefaultEps = 1e-7;
/// torch refuses ns_steps >= 100 ("for computational efficiency"); so does fusedopt.
inline constexpr int kNsMaxSteps = 99;

/// The four matrices of one iteration, per matrix of a batch. x and next are m x n and swap
/// roles after each step (the caller's output buffer is one of them); gram and poly are m x m.
enum class NsOperand : int { x = 0, next = 1, gram = 2, poly = 3 };

/// One column-major GEMM: c = alpha * op(a) * op(b) + beta * c, where c first holds a copy
/// of `init` when beta != 0 (B = A before poly's GEMM, next = X before update's).
struct NsGemm {
  NsOperand a, b, c, init;
  bool trans_a, trans_b;
  std::int64_t m, n, k;        // op(a): m x k, op(b): k x n, c: m x n
  std::int64_t lda, ldb, ldc;  // leading dimensions (column-major)
  double alpha, beta;
};

/// The whole iteration for one shape: its three GEMMs in the order they run.
struct NsPlan {
  bool transposed;    // rows > cols: X = G^T
  std::int64_t m, n;  // X is m x n, m = min(rows, cols)
  std::int64_t ld_x;  // leading dimension of x and next in column-major storage
  NsGemm gram, poly, update;
};

/// The transpose rule: work on the side with fewer rows, so the Gram matrix is m x m.
FO_HOST_DEVICE constexpr bool ns_transposed(std::int64_t rows, std::int64_t cols) {
  return rows > cols;
}

/// Elements of the operand per matrix (m*n for x and next, m*m for gram and poly).
constexpr std::int64_t ns_operand_size(const NsPlan& p, NsOperand o) {
  return o == NsOperand::x || o == NsOperand::next ? p.m * p.n : p.m * p.m;
}

/// The plan for a rows x cols row-major matrix (rows, cols >= 1).
///   const NsPlan plan = ns_plan(rows, cols, kNsDefaultCoefficients);
constexpr NsPlan ns_plan(std::int64_t rows, std::int64_t cols, const NsCoefficients& k) {
  const bool t = ns_transposed(rows, cols);
  const std::int64_t m = t ? cols : rows, n = t ? rows : cols;
  using O = NsOperand;
  NsPlan p{t, m, n, t ? m : n, {}, {}, {}};
  // poly: B = c * A * A + b * B, B holding a copy of A; A symmetric, the same in both layouts.
  p.poly = NsGemm{O::gram, O::gram, O::poly, O::gram, false, false, m, m, m, m, m, m, k.c, k.b};
  if (t) {
    // Storage holds X (m x n, ld m).
    // gram: A = X * X^T
    p.gram = NsGemm{O::x, O::x, O::gram, O::gram, false, true, m, m, n, m, m, m, 1.0, 0.0};
    // update: next = 1 * B * X + a * next, next holding a copy of X
    p.update = NsGemm{O::poly, O::x, O::next, O::x, false, false, m, n, m, m, m, m, 1.0, k.a};
  } else {
    // Storage holds X^T (n x m, ld n).
    // gram: A = (X^T)^T * X^T = X X^T
    p.gram = NsGemm{O::x, O::x, O::gram, O::gram, true, false, m, m, n, n, n, m, 1.0, 0.0};
    // update: next^T = 1 * X^T * B^T + a * next^T  (the transpose of a X + B X)
    p.update = NsGemm{O::x, O::poly, O::next, O::x, false, true, n, m, m, n, m, n, 1.0, k.a};
  }
  return p;
}

/// What X is divided by before the first step: max(||G||_F, eps), from the sum of squares in
/// double (summed in the order of kernels/sum_order.hpp on both backends); rounded to float,
/// and every element divided by it in float (torch: X.div_(norm)).
FO_HOST_DEVICE float ns_norm_divisor(double sum_of_squares, double eps) {
  const double norm = sqrt(sum_of_squares);
  return static_cast<float>(norm > eps ? norm : eps);
}

/// Floating-point operations of the iteration for one matrix, as the benchmarks count them:
/// per step 2 m^2 n (gram) + 2 m^3 (poly) + 2 m^2 n (update).
constexpr double ns_flops(std::int64_t rows, std::int64_t cols, int steps) {
  const double m = static_cast<double>(rows < cols ? rows : cols);
  const double n = static_cast<double>(rows < cols ? cols : rows);
  return steps * (4.0 * m * m * n + 2.0 * m * m * m);
}

}  // namespace fo
