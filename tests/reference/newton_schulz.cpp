// Plain double-precision Newton-Schulz iteration; see newton_schulz.hpp.
#include "reference/newton_schulz.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace fo::ref {
namespace {

using Matrix = std::vector<double>;  // row-major

Matrix transpose(const Matrix& x, std::int64_t rows, std::int64_t cols) {
  Matrix t(x.size());
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) t[j * rows + i] = x[i * cols + j];
  return t;
}

// (p x q) times (q x r)
Matrix multiply(const Matrix& x, const Matrix& y, std::int64_t p, std::int64_t q, std::int64_t r) {
  Matrix z(static_cast<std::size_t>(p * r), 0.0);
  for (std::int64_t i = 0; i < p; ++i)
    for (std::int64_t k = 0; k < q; ++k) {
      const double xik = x[i * q + k];
      for (std::int64_t j = 0; j < r; ++j) z[i * r + j] += xik * y[k * r + j];
    }
  return z;
}

}  // namespace

std::vector<double> newton_schulz(const std::vector<double>& g, std::int64_t rows,
                                  std::int64_t cols, double a, double b, double c, int steps,
                                  double eps) {
  if (rows < 0 || cols < 0 || g.size() != static_cast<std::size_t>(rows * cols))
    throw std::invalid_argument("newton_schulz: g is not rows x cols");
  const bool tall = rows > cols;
  Matrix x = tall ? transpose(g, rows, cols) : g;
  const std::int64_t m = tall ? cols : rows, n = tall ? rows : cols;  // X is m x n

  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double norm = std::max(std::sqrt(ss), eps);
  for (double& v : x) v /= norm;

  for (int s = 0; s < steps; ++s) {
    const Matrix A = multiply(x, transpose(x, m, n), m, n, m);  // A = X X^T
    const Matrix AA = multiply(A, A, m, m, m);
    Matrix B(A.size());
    for (std::size_t i = 0; i < B.size(); ++i) B[i] = b * A[i] + c * AA[i];  // B = b A + c A A
    const Matrix BX = multiply(B, x, m, m, n);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = a * x[i] + BX[i];  // X = a X + B X
  }
  return tall ? transpose(x, m, n) : x;
}

}  // namespace fo::ref
