// Damped Newton (fusedopt/newton.hpp): the Cholesky solve on known and random SPD systems,
// convergence on Rosenbrock, Beale and a quadratic, the damping's fallbacks, validation; and
// `fusedopt-demo paths` writing well-formed SVG. The test functions and their derivatives
// are written here again, not taken from the demo.
#include "fusedopt/newton.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../demo/paths.hpp"
#include "fusedopt/types.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

// ---- Cholesky solve

std::vector<double> mat_vec(const std::vector<double>& a, const std::vector<double>& x) {
  const std::size_t n = x.size();
  std::vector<double> y(n, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) y[i] += a[i * n + j] * x[j];
  return y;
}

double inf_norm(const std::vector<double>& v) {
  double m = 0.0;
  for (double e : v) m = std::max(m, std::fabs(e));
  return m;
}

double mat_inf_norm(const std::vector<double>& a, std::size_t n) {
  double m = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    double row = 0.0;
    for (std::size_t j = 0; j < n; ++j) row += std::fabs(a[i * n + j]);
    m = std::max(m, row);
  }
  return m;
}

/// A random SPD matrix M M^T + n I (eigenvalues in [n, ~5n]: condition number <= ~5).
std::vector<double> random_spd(std::mt19937_64& rng, std::size_t n) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> m(n * n), a(n * n, 0.0);
  for (double& e : m) e = normal(rng);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      for (std::size_t k = 0; k < n; ++k) a[i * n + j] += m[i * n + k] * m[j * n + k];
      if (i == j) a[i * n + j] += static_cast<double>(n);
    }
  return a;
}

TEST(Cholesky, SolvesAKnownSystemExactly) {
  // A = L L^T with L = [[2,0,0],[6,1,0],[-8,5,3]]: every intermediate is a small integer,
  // so the solve is exact in double.
  const std::vector<double> a = {4, 12, -16, 12, 37, -43, -16, -43, 98};
  const std::vector<double> b = {-20, -43, 192};  // A * (1, 2, 3)
  std::vector<double> x;
  ASSERT_TRUE(cholesky_solve(a, b, 3, x));
  ASSERT_EQ(x.size(), 3u);
  EXPECT_EQ(x[0], 1.0);
  EXPECT_EQ(x[1], 2.0);
  EXPECT_EQ(x[2], 3.0);

  std::vector<double> y;
  ASSERT_TRUE(cholesky_solve({4.0}, {2.0}, 1, y));  // n = 1
  EXPECT_EQ(y, std::vector<double>{0.5});
}

TEST(Cholesky, RandomSpdSystemsHaveTinyResiduals) {
  auto rng = make_rng();
  std::normal_distribution<double> normal(0.0, 1.0);
  for (std::size_t n : {1u, 2u, 3u, 5u, 8u, 17u, 32u, 64u}) {
    for (int rep = 0; rep < 4; ++rep) {
      const std::vector<double> a = random_spd(rng, n);
      std::vector<double> want(n), x;
      for (double& e : want) e = normal(rng);
      const std::vector<double> b = mat_vec(a, want);
      ASSERT_TRUE(cholesky_solve(a, b, static_cast<int>(n), x)) << "n=" << n;
      std::vector<double> r = mat_vec(a, x);
      for (std::size_t i = 0; i < n; ++i) r[i] -= b[i];
      // Cholesky is backward stable: ||Ax - b|| <~ n * eps * ||A|| ||x|| (~1e-14 at n = 64);
      // with cond(A) <= ~5 the forward error is as small. 1e-10 leaves 4 orders of margin.
      EXPECT_LE(inf_norm(r), 1e-10 * inf_norm(b)) << "n=" << n;
      for (std::size_t i = 0; i < n; ++i)
        EXPECT_NEAR(x[i], want[i], 1e-10 * (1.0 + std::fabs(want[i]))) << "n=" << n << " i=" << i;
    }
  }
}

TEST(Cholesky, BadlyScaledSpdSystemsAreBackwardStable) {
  // D A D with D spanning 1e-4..1e4: cond up to ~1e16 * 5, yet Cholesky's normwise backward
  // error stays near n * eps; the bound below allows 1e-10 relative to ||A|| ||x|| + ||b||.
  auto rng = make_rng();
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> expo(-4.0, 4.0);
  const std::size_t n = 12;
  for (int rep = 0; rep < 8; ++rep) {
    std::vector<double> a = random_spd(rng, n), d(n), b(n), x;
    for (double& e : d) e = std::pow(10.0, expo(rng));
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < n; ++j) a[i * n + j] *= d[i] * d[j];
    for (double& e : b) e = normal(rng);
    ASSERT_TRUE(cholesky_solve(a, b, static_cast<int>(n), x));
    std::vector<double> r = mat_vec(a, x);
    for (std::size_t i = 0; i < n; ++i) r[i] -= b[i];
    EXPECT_LE(inf_norm(r), 1e-10 * (mat_inf_norm(a, n) * inf_norm(x) + inf_norm(b)));
  }
}

TEST(Cholesky, ReadsOnlyTheLowerTriangle) {
  std::vector<double> a = {4, 12, -16, 12, 37, -43, -16, -43, 98};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  a[1] = a[2] = a[5] = nan;  // the strict upper triangle
  std::vector<double> x;
  ASSERT_TRUE(cholesky_solve(a, {-20, -43, 192}, 3, x));
  EXPECT_EQ(x, (std::vector<double>{1, 2, 3}));
}

TEST(Cholesky, RejectsMatricesThatAreNotPositiveDefinite) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<std::vector<double>> bad = {
      {1, 2, 2, 1},     // symmetric indefinite (eigenvalues 3, -1)
      {1, 1, 1, 1},     // singular positive semidefinite: second pivot exactly 0
      {-1, 0, 0, 1},    // negative diagonal
      {0, 0, 0, 1},     // zero first pivot
      {1, 0, nan, 1}};  // nan in the lower triangle
  for (const auto& a : bad) {
    std::vector<double> x = {42.0};
    EXPECT_FALSE(cholesky_solve(a, {1, 1}, 2, x)) << a[0] << " " << a[1] << " " << a[2];
    EXPECT_EQ(x, std::vector<double>{42.0}) << "x must be unchanged after a failed solve";
  }
}

TEST(Cholesky, BadSizesThrowInvalidArgument) {
  std::vector<double> x;
  auto code_of = [&](std::vector<double> a, std::vector<double> b, int n) {
    try {
      cholesky_solve(std::move(a), std::move(b), n, x);
    } catch (const Error& e) {
      return e.code();
    }
    return StatusCode::ok;
  };
  EXPECT_EQ(code_of({}, {}, 0), StatusCode::invalid_argument);
  EXPECT_EQ(code_of({1}, {1}, -1), StatusCode::invalid_argument);
  EXPECT_EQ(code_of({1, 0, 0}, {1, 1}, 2), StatusCode::invalid_argument);
  EXPECT_EQ(code_of({1, 0, 0, 1}, {1}, 2), StatusCode::invalid_argument);
  EXPECT_TRUE(x.empty());
}

// ---- newton_minimize

double rosenbrock(const double* v, double* g, double* h) {
  const double x = v[0], y = v[1];
  g[0] = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x);
  g[1] = 200.0 * (y - x * x);
  h[0] = 1200.0 * x * x - 400.0 * y + 2.0;
  h[1] = h[2] = -400.0 * x;
  h[3] = 200.0;
  return (1.0 - x) * (1.0 - x) + 100.0 * (y - x * x) * (y - x * x);
}

double beale(const double* v, double* g, double* h) {
  const double x = v[0], y = v[1];
  const double t1 = 1.5 - x + x * y, t2 = 2.25 - x + x * y * y, t3 = 2.625 - x + x * y * y * y;
  const double t1x = y - 1.0, t2x = y * y - 1.0, t3x = y * y * y - 1.0;
  const double t1y = x, t2y = 2.0 * x * y, t3y = 3.0 * x * y * y;
  g[0] = 2.0 * (t1 * t1x + t2 * t2x + t3 * t3x);
  g[1] = 2.0 * (t1 * t1y + t2 * t2y + t3 * t3y);
  h[0] = 2.0 * (t1x * t1x + t2x * t2x + t3x * t3x);
  h[1] = h[2] = 2.0 * (t1x * t1y + t1 + t2x * t2y + t2 * 2.0 * y + t3x * t3y + t3 * 3.0 * y * y);
  h[3] = 2.0 * (t1y * t1y + t2y * t2y + t2 * 2.0 * x + t3y * t3y + t3 * 6.0 * x * y);
  return t1 * t1 + t2 * t2 + t3 * t3;
}

TEST(Newton, ReachesRosenbrocksMinimumInFewSteps) {
  std::vector<double> x = {-1.5, 2.0};
  const NewtonResult r = newton_minimize(rosenbrock, x, NewtonOptions{});
  EXPECT_TRUE(r.converged);
  EXPECT_EQ(r.stop, NewtonStop::converged);
  EXPECT_NEAR(x[0], 1.0, 1e-8);
  EXPECT_NEAR(x[1], 1.0, 1e-8);
  EXPECT_LE(r.grad_norm, 1e-10);
  // Measured with GCC 12 -O2 and the default options: 31 accepted steps, 58 evaluations (the
  // damping doubles back after most good steps on the curved valley). The margin covers a
  // rounding difference flipping an accept/reject decision near the minimum; a larger count
  // means the damping logic changed. (Undamped Newton with a line search needs ~20-25.)
  EXPECT_LE(r.steps, 36);
  EXPECT_LE(r.evaluations, 70);
  EXPECT_GE(r.steps, 10) << "suspiciously few steps for a damped method on Rosenbrock";
}

TEST(Newton, TrajectoryRecordsEveryAcceptedStepAndFDecreasesAlongIt) {
  std::vector<double> x = {-1.5, 2.0};
  const NewtonResult r = newton_minimize(rosenbrock, x, NewtonOptions{});
  ASSERT_EQ(r.trajectory.size(), static_cast<std::size_t>(r.steps));
  ASSERT_FALSE(r.trajectory.empty());
  EXPECT_EQ(r.trajectory.back(), x);
  double g[2], h[4];
  const double start[2] = {-1.5, 2.0};
  double prev = rosenbrock(start, g, h);
  for (std::size_t k = 0; k < r.trajectory.size(); ++k) {
    ASSERT_EQ(r.trajectory[k].size(), 2u);
    const double f = rosenbrock(r.trajectory[k].data(), g, h);
    EXPECT_LE(f, prev) << "step " << k + 1 << " raised f";
    prev = f;
  }
  EXPECT_EQ(prev, r.f);
}

TEST(Newton, UndampedNewtonFallsBackToDampingOnRosenbrock) {
  // damping 0: pure Newton steps; a step that raises f restarts lambda from a tiny value.
  std::vector<double> x = {-1.5, 2.0};
  NewtonOptions o;
  o.damping = 0.0;
  const NewtonResult r = newton_minimize(rosenbrock, x, o);
  EXPECT_TRUE(r.converged);
  EXPECT_NEAR(x[0], 1.0, 1e-8);
  EXPECT_NEAR(x[1], 1.0, 1e-8);
  EXPECT_LE(r.steps, 32);  // measured: 27 (same margin reasoning as above)
}

// ---- the cuSOLVER solve (a GPU only)

TEST(CholeskyGpu, MatchesTheCpuSolveAndRejectsWhatItRejects) {
  if (cuda_devices() == 0) {
    // Without a GPU (or without CUDA) asking for one is an error, not a silent CPU solve.
    std::vector<double> x;
    EXPECT_THROW(cholesky_solve({4.0}, {2.0}, 1, x, Device::cuda), Error);
    NewtonOptions o;
    o.device = Device::cuda;
    std::vector<double> v = {-1.5, 2.0};
    EXPECT_THROW(newton_minimize(rosenbrock, v, o), Error);
    EXPECT_EQ(v, (std::vector<double>{-1.5, 2.0}));
    GTEST_SKIP() << "no CUDA device on this machine";
  }
  auto rng = make_rng();
  std::normal_distribution<double> normal(0.0, 1.0);
  // n from 1 to past cuSOLVER's blocking (its potrf switches to blocked code near 64-128).
  for (std::size_t n : {1u, 2u, 17u, 64u, 200u, 513u}) {
    const std::vector<double> a = random_spd(rng, n);
    std::vector<double> want(n), x_cpu, x_gpu;
    for (double& e : want) e = normal(rng);
    const std::vector<double> b = mat_vec(a, want);
    ASSERT_TRUE(cholesky_solve(a, b, static_cast<int>(n), x_cpu)) << "n=" << n;
    ASSERT_TRUE(cholesky_solve(a, b, static_cast<int>(n), x_gpu, Device::cuda)) << "n=" << n;
    // Both backward stable on a matrix of condition <= ~5: each within ~n eps of want
    // (1e-10 relative, as the CPU test), whatever order cuSOLVER sums in.
    for (std::size_t i = 0; i < n; ++i)
      ASSERT_NEAR(x_gpu[i], x_cpu[i], 1e-10 * (1.0 + std::fabs(want[i]))) << "n=" << n;
  }
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto& bad : std::vector<std::vector<double>>{
           {1, 2, 2, 1},       // indefinite
           {inf, 0, 0, 1},     // an infinite pivot, which LAPACK alone would accept
           {1, 0, inf, 1}}) {  // inf in the lower triangle
    std::vector<double> x = {42.0};
    EXPECT_FALSE(cholesky_solve(bad, {1, 1}, 2, x, Device::cuda)) << bad[0] << " " << bad[2];
    EXPECT_EQ(x, std::vector<double>{42.0});
  }
}

TEST(NewtonGpu, TheCuSolverSolveReachesTheSameMinima) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  for (auto* f : {&rosenbrock, &beale}) {
    std::vector<double> start =
        f == &rosenbrock ? std::vector<double>{-1.5, 2.0} : std::vector<double>{1.0, 1.0};
    std::vector<double> x_cpu = start, x_gpu = start;
    NewtonOptions o;
    const NewtonResult cpu = newton_minimize(f, x_cpu, o);
    o.device = Device::cuda;
    const NewtonResult gpu = newton_minimize(f, x_gpu, o);
    EXPECT_TRUE(gpu.converged);
    // The two solves round differently, which may flip an accept/reject decision near the
    // minimum: a step or two either way, the same point to far below the tolerance.
    EXPECT_LE(std::abs(gpu.steps - cpu.steps), 2);
    EXPECT_NEAR(x_gpu[0], x_cpu[0], 1e-8);
    EXPECT_NEAR(x_gpu[1], x_cpu[1], 1e-8);
  }
}

TEST(Newton, ReachesBealesMinimum) {
  std::vector<double> x = {1.0, 1.5};
  const NewtonResult r = newton_minimize(beale, x, NewtonOptions{});
  EXPECT_TRUE(r.converged);
  EXPECT_NEAR(x[0], 3.0, 1e-8);
  EXPECT_NEAR(x[1], 0.5, 1e-8);
  EXPECT_LE(r.steps, 14);  // measured: 10 steps, 11 evaluations
  EXPECT_LT(r.f, 1e-16);
}

TEST(Newton, ConvexQuadraticInExactlyOneUndampedStep) {
  // f = 0.5 x^T A x - b^T x with a random SPD A: the Newton step lands on A^-1 b.
  auto rng = make_rng();
  const std::size_t n = 6;
  const std::vector<double> a = random_spd(rng, n);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> b(n), x(n);
  for (double& e : b) e = normal(rng);
  for (double& e : x) e = 10.0 * normal(rng);
  const auto quad = [&](const double* v, double* g, double* h) {
    double f = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      double av = 0.0;
      for (std::size_t j = 0; j < n; ++j) av += a[i * n + j] * v[j];
      g[i] = av - b[i];
      f += 0.5 * v[i] * av - b[i] * v[i];
    }
    std::copy(a.begin(), a.end(), h);
    return f;
  };
  NewtonOptions o;
  o.damping = 0.0;
  const NewtonResult r = newton_minimize(quad, x, o);
  EXPECT_EQ(r.steps, 1);
  EXPECT_EQ(r.evaluations, 2);
  EXPECT_TRUE(r.converged);
  std::vector<double> want;
  ASSERT_TRUE(cholesky_solve(a, b, static_cast<int>(n), want));
  for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(x[i], want[i], 1e-12) << i;
}

TEST(Newton, StopsAtMaxItersAndAtAStartThatIsAlreadyAMinimum) {
  std::vector<double> x = {-1.5, 2.0};
  NewtonOptions o;
  o.max_iters = 3;
  NewtonResult r = newton_minimize(rosenbrock, x, o);
  EXPECT_EQ(r.steps, 3);
  EXPECT_EQ(r.stop, NewtonStop::max_iters);
  EXPECT_FALSE(r.converged);
  EXPECT_EQ(r.trajectory.size(), 3u);

  x = {1.0, 1.0};
  r = newton_minimize(rosenbrock, x, NewtonOptions{});
  EXPECT_EQ(r.steps, 0);
  EXPECT_EQ(r.evaluations, 1);
  EXPECT_TRUE(r.converged);
  EXPECT_EQ(x, (std::vector<double>{1.0, 1.0}));

  o.max_iters = 0;
  x = {-1.5, 2.0};
  r = newton_minimize(rosenbrock, x, o);
  EXPECT_EQ(r.steps, 0);
  EXPECT_EQ(x, (std::vector<double>{-1.5, 2.0}));
}

TEST(Newton, StallsWhenNoStepLowersF) {
  // A gradient of the wrong sign: every step of (H + lambda I) d = -g climbs f = x^2.
  const auto liar = [](const double* v, double* g, double* h) {
    g[0] = -2.0 * v[0];
    h[0] = 2.0;
    return v[0] * v[0];
  };
  std::vector<double> x = {1.0};
  NewtonOptions o;
  o.max_damping = 1e6;
  const NewtonResult r = newton_minimize(liar, x, o);
  EXPECT_EQ(r.stop, NewtonStop::stalled);
  EXPECT_EQ(r.steps, 0);
  EXPECT_FALSE(r.converged);
  EXPECT_EQ(x, std::vector<double>{1.0});
  EXPECT_GT(r.damping, 1e6);
}

TEST(Newton, NonFiniteTrialPointsAreRejectedLikeUphillSteps) {
  // f = x^2, nan where |x| > 1.5, and a Hessian ten times too small: the undamped step from
  // 1.4 lands at -12.6, where f is nan. That trial must be rejected and the damping raised
  // until the step stays inside, and the iteration must still converge.
  const auto f = [](const double* v, double* g, double* h) {
    g[0] = 2.0 * v[0];
    h[0] = 0.2;  // a tenth of the true curvature: the undamped step goes to -12.6
    return std::fabs(v[0]) > 1.5 ? std::numeric_limits<double>::quiet_NaN() : v[0] * v[0];
  };
  std::vector<double> x = {1.4};
  NewtonOptions o;
  o.damping = 0.0;
  o.max_iters = 200;
  const NewtonResult r = newton_minimize(f, x, o);
  EXPECT_TRUE(r.converged) << "stop " << static_cast<int>(r.stop) << " x " << x[0];
  EXPECT_NEAR(x[0], 0.0, 1e-9);
}

TEST(Newton, InvalidInputThrowsAndLeavesXUnchanged) {
  const std::vector<double> start = {-1.5, 2.0};
  auto expect_invalid = [&](const NewtonOptions& o, const std::string& what) {
    std::vector<double> x = start;
    try {
      newton_minimize(rosenbrock, x, o);
      ADD_FAILURE() << what << ": no exception";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::invalid_argument) << what;
      EXPECT_NE(std::string(e.what()).find("newton"), std::string::npos) << e.what();
    }
    EXPECT_EQ(x, start) << what;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  NewtonOptions o;
  o.damping = -1e-3;
  expect_invalid(o, "negative damping");
  o = {};
  o.damping = nan;
  expect_invalid(o, "nan damping");
  o = {};
  o.damping_up = 1.0;
  expect_invalid(o, "damping_up 1");
  o = {};
  o.damping_up = inf;
  expect_invalid(o, "damping_up inf");
  o = {};
  o.damping_down = 0.0;
  expect_invalid(o, "damping_down 0");
  o = {};
  o.damping_down = 1.5;
  expect_invalid(o, "damping_down 1.5");
  o = {};
  o.max_damping = 0.0;
  expect_invalid(o, "max_damping 0");
  o = {};
  o.damping = 10.0;
  o.max_damping = 1.0;
  expect_invalid(o, "max_damping below damping");
  o = {};
  o.max_iters = -1;
  expect_invalid(o, "negative max_iters");
  o = {};
  o.grad_tol = -1e-10;
  expect_invalid(o, "negative grad_tol");

  std::vector<double> empty;
  EXPECT_THROW(newton_minimize(rosenbrock, empty, NewtonOptions{}), Error);
  std::vector<double> x = start;
  EXPECT_THROW(newton_minimize(NewtonObjective{}, x, NewtonOptions{}), Error);
  const auto nan_start = [](const double*, double* g, double* h) {
    g[0] = 0.0;
    h[0] = 1.0;
    return std::numeric_limits<double>::quiet_NaN();
  };
  std::vector<double> one = {1.0};
  try {
    newton_minimize(nan_start, one, NewtonOptions{});
    ADD_FAILURE() << "a nan start was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
  }
  EXPECT_EQ(one, std::vector<double>{1.0});
}

TEST(Newton, AnObjectiveThatThrowsLeavesXUnchanged) {
  int calls = 0;
  const auto flaky = [&](const double* v, double* g, double* h) {
    if (++calls == 3) throw std::runtime_error("objective failed");
    return rosenbrock(v, g, h);
  };
  std::vector<double> x = {-1.5, 2.0};
  EXPECT_THROW(newton_minimize(flaky, x, NewtonOptions{}), std::runtime_error);
  EXPECT_EQ(x, (std::vector<double>{-1.5, 2.0}));
}

// ---- fusedopt-demo paths

/// Checks that `xml` is well-formed enough for a viewer: every tag closed in order, one root
/// element, quotes balanced inside tags, no stray '<' or '&' in text. Returns "" or a reason.
std::string check_xml(const std::string& xml) {
  std::vector<std::string> stack;
  int roots = 0;
  std::size_t i = 0;
  while (i < xml.size()) {
    if (xml[i] == '&') {
      const std::size_t semi = xml.find(';', i);
      if (semi == std::string::npos || semi - i > 6) return "bare '&' at " + std::to_string(i);
      i = semi + 1;
      continue;
    }
    if (xml[i] != '<') {
      ++i;
      continue;
    }
    if (xml.compare(i, 4, "<!--") == 0) {
      const std::size_t end = xml.find("-->", i);
      if (end == std::string::npos) return "unclosed comment";
      i = end + 3;
      continue;
    }
    if (xml.compare(i, 2, "<?") == 0) {
      const std::size_t end = xml.find("?>", i);
      if (end == std::string::npos || i != 0) return "bad XML declaration";
      i = end + 2;
      continue;
    }
    // A tag: find its '>' outside quotes.
    std::size_t j = i + 1;
    char quote = 0;
    for (; j < xml.size(); ++j) {
      const char c = xml[j];
      if (quote) {
        if (c == quote)
          quote = 0;
        else if (c == '<')
          return "'<' inside an attribute at " + std::to_string(j);
      } else if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '>') {
        break;
      } else if (c == '<') {
        return "'<' inside a tag at " + std::to_string(j);
      }
    }
    if (j >= xml.size()) return "unterminated tag at " + std::to_string(i);
    const std::string body = xml.substr(i + 1, j - i - 1);
    i = j + 1;
    if (body.empty()) return "empty tag";
    if (body[0] == '/') {
      const std::string name = body.substr(1);
      if (stack.empty() || stack.back() != name)
        return "</" + name + "> closes " +
               (stack.empty() ? std::string("nothing") : "<" + stack.back() + ">");
      stack.pop_back();
      continue;
    }
    const std::string name = body.substr(0, body.find_first_of(" \t\n/"));
    if (name.empty()) return "tag without a name";
    if (stack.empty() && ++roots > 1) return "a second root element <" + name + ">";
    if (body.back() != '/') stack.push_back(name);
  }
  if (!stack.empty()) return "<" + stack.back() + "> is never closed";
  if (roots != 1) return "no root element";
  return "";
}

TEST(PathsDemo, TheXmlCheckerCatchesBrokenDocuments) {
  EXPECT_EQ(check_xml("<?xml version=\"1.0\"?>\n<svg a=\"x>y\"><g><p/></g></svg>\n"), "");
  EXPECT_NE(check_xml("<svg><g></svg>"), "");
  EXPECT_NE(check_xml("<svg><g></g>"), "");
  EXPECT_NE(check_xml("<svg></svg><svg></svg>"), "");
  EXPECT_NE(check_xml("<svg a=\"1></svg>"), "");
  EXPECT_NE(check_xml("<svg>a & b</svg>"), "");
  EXPECT_EQ(check_xml("<svg>a &amp; b</svg>"), "");
}

TEST(PathsDemo, WritesOneWellFormedSvgPerFunction) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) /
      ("fusedopt_paths_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
       "_" + std::to_string(std::random_device{}()));
  std::filesystem::remove_all(dir);
  std::string out = dir.string();
  char a0[] = "paths", a1[] = "--out";
  char* argv[] = {a0, a1, out.data(), nullptr};
  ASSERT_EQ(demo::run_paths(3, argv), 0);
  for (const char* fn : {"rosenbrock", "beale", "saddle"}) {
    const std::filesystem::path p = dir / (std::string("paths_") + fn + ".svg");
    ASSERT_TRUE(std::filesystem::exists(p)) << p;
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string svg = ss.str();
    EXPECT_EQ(check_xml(svg), "") << p;
    EXPECT_NE(svg.find("<svg"), std::string::npos);
    // One path per optimizer (8) and Newton's, plus the legend's labels.
    std::size_t polylines = 0;
    for (std::size_t at = svg.find("<polyline"); at != std::string::npos;
         at = svg.find("<polyline", at + 1))
      ++polylines;
    EXPECT_EQ(polylines, 9u) << p;
    for (const char* name :
         {"sgd", "rmsprop", "adagrad", "adam", "adamw", "lion", "rprop", "adadelta", "newton"})
      EXPECT_NE(svg.find(">" + std::string(name) + " ("), std::string::npos) << p << " " << name;
    EXPECT_NE(svg.find("<path stroke="), std::string::npos) << p << ": no iso-lines";
  }
  std::filesystem::remove_all(dir);
}

TEST(PathsDemo, RejectsUnknownArguments) {
  char a0[] = "paths", a1[] = "--frobnicate";
  char* argv[] = {a0, a1, nullptr};
  EXPECT_EQ(demo::run_paths(2, argv), 2);
}

}  // namespace
}  // namespace fo::test
