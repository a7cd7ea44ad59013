// Damped Newton's method for small dense problems, in double precision: each iteration
// solves (H + lambda*I) d = -g by Cholesky, on the CPU or on a GPU through cuSOLVER, and takes
// x + d if it lowers f.
// Levenberg-Marquardt damping: lambda grows (and the step is retried) when H + lambda*I is
// not positive definite or the step does not lower f, and shrinks after every good step, so
// the method is a cautious gradient step far from a minimum and pure Newton near one.
//
// Meant for problems of a few to a few hundred unknowns (the Cholesky is O(n^3), the Hessian
// n*n doubles), and as a second-order reference next to the fused first-order optimizers.
#pragma once

#include <functional>
#include <vector>

#include "fusedopt/types.hpp"

namespace fo {

/// Options of newton_minimize. Invalid values throw fo::Error (invalid_argument).
struct NewtonOptions {
  double damping = 1e-3;      // initial lambda, >= 0 (0: pure Newton until a step fails)
  double damping_up = 10.0;   // lambda *= damping_up after a failed attempt (> 1)
  double damping_down = 0.1;  // lambda *= damping_down after a good step, in (0, 1]
  double max_damping = 1e16;  // give up (stalled) when lambda would exceed this (> 0)
  int max_iters = 100;        // accepted steps at most, >= 0
  double grad_tol = 1e-10;    // converged when max_i |g_i| <= grad_tol (>= 0)
  /// Where the damped systems are solved: the CPU, or CUDA device `device_index` through
  /// cuSOLVER (potrf + potrs in double; the Hessian goes to the GPU once per attempt). The
  /// objective always runs on the host. Without CUDA, Device::cuda is an error.
  Device device = Device::cpu;
  int device_index = 0;
};

/// Why newton_minimize returned.
enum class NewtonStop : int {
  converged = 0,  // max |g| <= grad_tol
  max_iters = 1,  // max_iters accepted steps taken
  stalled = 2,    // no step lowered f even with lambda at max_damping
};

struct NewtonResult {
  int steps = 0;           // accepted steps (Newton iterations that moved x)
  int evaluations = 0;     // calls of f, the start point included
  double f = 0.0;          // f at the returned x
  double grad_norm = 0.0;  // max |g_i| at the returned x
  double damping = 0.0;    // lambda at return
  NewtonStop stop = NewtonStop::max_iters;
  bool converged = false;  // stop == NewtonStop::converged
  /// x after each accepted step: trajectory[k] is x after step k + 1, so size() == steps
  /// (the start point is not included).
  std::vector<std::vector<double>> trajectory;
};

/// The objective: returns f(x) and writes its gradient grad[n] and its Hessian hess[n*n]
/// (row-major; only symmetric information is used: the solver takes (H + H^T)/2). x, grad
/// and hess are never null. Called once at the start point and once per trial step.
using NewtonObjective = std::function<double(const double* x, double* grad, double* hess)>;

/// Minimizes f from x (n = x.size() unknowns), writing the last accepted point back into x.
/// Throws fo::Error (invalid_argument) for an empty x, an empty f, invalid options, or a
/// non-finite f, gradient or Hessian at the start point; x is then unchanged (as it is if f
/// throws). Trial points where f is not finite are rejected like steps that raise f.
///
///   std::vector<double> x = {-1.5, 2.0};
///   fo::NewtonResult r = fo::newton_minimize(rosenbrock, x, {});  // x -> (1, 1)
NewtonResult newton_minimize(const NewtonObjective& f, std::vector<double>& x,
                             const NewtonOptions& options = {});

/// Solves A x = b for a symmetric positive definite A (n x n, row-major; only its lower
/// triangle is read) by Cholesky factorization A = L L^T and two triangular solves. Returns
/// false, leaving x unchanged, if A is not positive definite (a pivot <= 0 or not finite).
/// Throws fo::Error (invalid_argument) if n <= 0, a.size() != n*n or b.size() != n.
/// With Device::cuda the solve runs on GPU `device_index` through cuSOLVER (potrf + potrs,
/// double); a build without CUDA throws fo::Error (unsupported).
///
///   std::vector<double> x;
///   bool ok = fo::cholesky_solve({4, 2, 2, 3}, {2, 1}, 2, x);  // x = (0.5, 0)
bool cholesky_solve(std::vector<double> a, std::vector<double> b, int n, std::vector<double>& x,
                    Device device = Device::cpu, int device_index = 0);

}  // namespace fo
