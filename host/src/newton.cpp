// Damped Newton's method (fusedopt/newton.hpp): Levenberg-Marquardt damping over a dense
// Cholesky solve in double, on the CPU or through cuSOLVER (cuda/newton_cusolver.cu).
#include "fusedopt/newton.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>

#include "buffer.hpp"
#include "cuda/cuda_backend.hpp"
#include "cuda/newton_device.hpp"
#include "device_check.hpp"
#include "fusedopt/types.hpp"
#include "messages.hpp"

namespace fo {
namespace {

using detail::invalid;
const auto& fmt = detail::format_number;

void validate(const NewtonOptions& o) {
  const std::pair<const char*, double> reals[] = {{"damping", o.damping},
                                                  {"damping_up", o.damping_up},
                                                  {"damping_down", o.damping_down},
                                                  {"max_damping", o.max_damping},
                                                  {"grad_tol", o.grad_tol}};
  for (const auto& [name, v] : reals)
    if (!std::isfinite(v))
      invalid(std::string("newton: ") + name + " must be finite, got " + fmt(v));
  if (!(o.damping >= 0.0)) invalid("newton: damping must be >= 0, got " + fmt(o.damping));
  if (!(o.damping_up > 1.0)) invalid("newton: damping_up must be > 1, got " + fmt(o.damping_up));
  if (!(o.damping_down > 0.0 && o.damping_down <= 1.0))
    invalid("newton: damping_down must be in (0, 1], got " + fmt(o.damping_down));
  if (!(o.max_damping > 0.0 && o.max_damping >= o.damping))
    invalid("newton: max_damping must be > 0 and >= damping, got " + fmt(o.max_damping));
  if (o.max_iters < 0)
    invalid("newton: max_iters must be >= 0, got " + std::to_string(o.max_iters));
  if (!(o.grad_tol >= 0.0)) invalid("newton: grad_tol must be >= 0, got " + fmt(o.grad_tol));
}

bool all_finite(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double e) { return std::isfinite(e); });
}

/// Solves on a GPU with buffers kept across calls of one size (a Newton run's attempts).
class DeviceSolver {
 public:
  DeviceSolver(int device_index, std::size_t n)
      : index_(device_index),
        n_(n),
        a_(Device::cuda, device_index, n * n * sizeof(double)),
        b_(Device::cuda, device_index, n * sizeof(double)),
        info_(Device::cuda, device_index, sizeof(int)) {}

  /// a: n*n row-major (lower triangle read), b: n. False if not positive definite.
  bool solve(const std::vector<double>& a, const std::vector<double>& b, std::vector<double>& x) {
    // LAPACK's potrf flags a pivot <= 0 or NaN, not an infinite one: refuse what the CPU
    // solve refuses, a non-finite lower triangle or right-hand side, before the GPU sees it.
    for (std::size_t i = 0; i < n_; ++i)
      for (std::size_t j = 0; j <= i; ++j)
        if (!std::isfinite(a[i * n_ + j])) return false;
    if (!all_finite(b)) return false;
    cuda::DeviceGuard guard(index_);
    cuda::copy_from_host(a_.data(), a.data(), n_ * n_ * sizeof(double), nullptr);
    cuda::copy_from_host(b_.data(), b.data(), n_ * sizeof(double), nullptr);
    cuda::cholesky_solve_device(static_cast<double*>(a_.data()), static_cast<double*>(b_.data()),
                                static_cast<int>(n_), 1, static_cast<int*>(info_.data()), nullptr);
    int info = 0;
    cuda::copy_to_host(&info, info_.data(), sizeof info);  // waits for the solve
    if (info != 0) return false;
    std::vector<double> out(n_);
    cuda::copy_to_host(out.data(), b_.data(), n_ * sizeof(double));
    if (!all_finite(out)) return false;
    x = std::move(out);
    return true;
  }

 private:
  int index_;
  std::size_t n_;
  detail::Buffer a_, b_, info_;
};

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double e : v) m = std::max(m, std::fabs(e));
  return m;
}

// One evaluation of the objective, the Hessian symmetrized (the solver reads one triangle,
// so an asymmetric user Hessian would otherwise be half ignored).
struct Point {
  std::vector<double> x, g, h;
  double f = 0.0;
  bool finite = false;
};

void evaluate(const NewtonObjective& fn, Point& p, std::size_t n) {
  p.g.assign(n, 0.0);
  p.h.assign(n * n, 0.0);
  p.f = fn(p.x.data(), p.g.data(), p.h.data());
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < i; ++j) {
      const double s = 0.5 * (p.h[i * n + j] + p.h[j * n + i]);
      p.h[i * n + j] = s;
      p.h[j * n + i] = s;
    }
  p.finite = std::isfinite(p.f) && all_finite(p.g) && all_finite(p.h);
}

}  // namespace

bool cholesky_solve(std::vector<double> a, std::vector<double> b, int n, std::vector<double>& x,
                    Device device, int device_index) {
  if (n <= 0) invalid("cholesky_solve: n must be > 0, got " + std::to_string(n));
  const std::size_t un = static_cast<std::size_t>(n);
  if (a.size() != un * un)
    invalid("cholesky_solve: a has " + std::to_string(a.size()) +
            " elements, n*n = " + std::to_string(un * un));
  if (b.size() != un)
    invalid("cholesky_solve: b has " + std::to_string(b.size()) +
            " elements, n = " + std::to_string(n));
  detail::check_device("cholesky_solve", device, device_index);
  if (device == Device::cuda) return DeviceSolver(device_index, un).solve(a, b, x);

  // A = L L^T, L stored over the lower triangle of a (Cholesky-Banachiewicz, row by row).
  for (std::size_t i = 0; i < un; ++i) {
    for (std::size_t j = 0; j <= i; ++j) {
      double s = a[i * un + j];
      for (std::size_t k = 0; k < j; ++k) s -= a[i * un + k] * a[j * un + k];
      if (i == j) {
        if (!(s > 0.0) || !std::isfinite(s)) return false;  // not positive definite (or nan)
        a[i * un + i] = std::sqrt(s);
      } else {
        a[i * un + j] = s / a[j * un + j];
      }
    }
  }
  // L y = b, then L^T x = y, both in place in b.
  for (std::size_t i = 0; i < un; ++i) {
    double s = b[i];
    for (std::size_t k = 0; k < i; ++k) s -= a[i * un + k] * b[k];
    b[i] = s / a[i * un + i];
  }
  for (std::size_t i = un; i-- > 0;) {
    double s = b[i];
    for (std::size_t k = i + 1; k < un; ++k) s -= a[k * un + i] * b[k];
    b[i] = s / a[i * un + i];
  }
  if (!all_finite(b)) return false;
  x = std::move(b);
  return true;
}

NewtonResult newton_minimize(const NewtonObjective& f, std::vector<double>& x,
                             const NewtonOptions& options) {
  if (!f) invalid("newton: the objective is empty");
  if (x.empty()) invalid("newton: x is empty");
  if (x.size() > static_cast<std::size_t>(INT_MAX / 2))
    invalid("newton: x has " + std::to_string(x.size()) +
            " elements, too many for a dense Hessian");
  validate(options);
  detail::check_device("newton", options.device, options.device_index);
  const std::size_t n = x.size();
  const int ni = static_cast<int>(n);
  std::optional<DeviceSolver> gpu;  // its buffers serve every attempt
  if (options.device == Device::cuda) gpu.emplace(options.device_index, n);

  NewtonResult r;
  Point cur;
  cur.x = x;  // x is written back only at the end: if f throws, the caller's x is unchanged
  evaluate(f, cur, n);
  r.evaluations = 1;
  if (!cur.finite)
    invalid("newton: f, its gradient or its Hessian is not finite at the start point");

  double lambda = options.damping;
  Point trial;
  std::vector<double> neg_g(n), d;
  r.stop = NewtonStop::max_iters;
  for (;;) {
    const double gnorm = max_abs(cur.g);
    if (gnorm <= options.grad_tol) {
      r.stop = NewtonStop::converged;
      break;
    }
    if (r.steps >= options.max_iters) break;

    // lambda is relative to nothing when it reaches 0 (pure Newton); a failure from there
    // restarts it at a tiny fraction of the Hessian's scale.
    double scale = 0.0;
    for (std::size_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(cur.h[i * n + i]));
    if (!(scale > 0.0)) scale = 1.0;
    const double tiny = 1e-10 * scale;

    for (std::size_t i = 0; i < n; ++i) neg_g[i] = -cur.g[i];
    bool accepted = false;
    for (;;) {
      std::vector<double> a = cur.h;
      for (std::size_t i = 0; i < n; ++i) a[i * n + i] += lambda;
      const bool solved =
          gpu ? gpu->solve(a, neg_g, d) : cholesky_solve(std::move(a), neg_g, ni, d);
      if (solved) {
        trial.x.resize(n);
        for (std::size_t i = 0; i < n; ++i) trial.x[i] = cur.x[i] + d[i];
        evaluate(f, trial, n);
        ++r.evaluations;
        // A step must lower f. At a minimum resolved to rounding, f can stay equal while the
        // gradient still shrinks: that step is taken too, so grad_tol stays reachable.
        accepted =
            trial.finite && (trial.f < cur.f || (trial.f == cur.f && max_abs(trial.g) < gnorm));
      }
      if (accepted) break;
      lambda = lambda < tiny ? tiny : lambda * options.damping_up;
      if (lambda > options.max_damping) break;
    }
    if (!accepted) {
      r.stop = NewtonStop::stalled;
      break;
    }
    std::swap(cur, trial);
    ++r.steps;
    r.trajectory.push_back(cur.x);
    lambda *= options.damping_down;
    if (lambda < tiny) lambda = 0.0;  // pure Newton near the minimum: quadratic convergence
  }

  r.f = cur.f;
  r.grad_norm = max_abs(cur.g);
  r.damping = lambda;
  r.converged = r.stop == NewtonStop::converged;
  x = std::move(cur.x);
  return r;
}

}  // namespace fo
