// Plain double-precision reference for Muon's Newton-Schulz iteration, written from
// torch.optim.Muon's _zeropower_via_newtonschulz (torch 2.15) and docs/newton-schulz.md,
// independently of the library's plan (kernels/newton_schulz.hpp): explicit transposes,
// triple loops, every intermediate in double.
#pragma once
#include <cstdint>
#include <vector>

namespace fo::ref {

/// NS(G) for one row-major rows x cols matrix: X = G (G^T when rows > cols);
/// X /= max(||X||_F, eps); `steps` times { A = X X^T; B = b A + c A A; X = a X + B X };
/// transposed back. Throws std::invalid_argument if g.size() != rows * cols.
std::vector<double> newton_schulz(const std::vector<double>& g, std::int64_t rows,
                                  std::int64_t cols, double a, double b, double c, int steps,
                                  double eps);

}  // namespace fo::ref
