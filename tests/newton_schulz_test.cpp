// Muon's Newton-Schulz iteration (matrix/newton_schulz.hpp): the CPU path against the double
// reference (tests/reference/newton_schulz.cpp) on square, wide, tall (transposed), 1 x n,
// n x 1, batched and zero matrices; the singular values it produces against the quintic's
// own map; validation. And the cuBLAS path (cuda/newton_schulz_device.hpp), f32 and bf16,
// against the same reference and the CPU: those tests skip without a GPU, and no GPU has run
// them yet.
#include "matrix/newton_schulz.hpp"

#include <gtest/gtest.h>

#if defined(FUSEDOPT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "buffer.hpp"
#include "cuda/cuda_backend.hpp"
#include "cuda/newton_schulz_device.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/types.hpp"
#include "reference/newton_schulz.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using detail::newton_schulz_cpu;
using detail::newton_schulz_cpu_workspace_floats;
using detail::NsGram;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Shape {
  std::int64_t batch, rows, cols;
};
std::string name(const Shape& s) {
  return std::to_string(s.batch) + "x" + std::to_string(s.rows) + "x" + std::to_string(s.cols);
}

// The torch defaults, written out again here (not kNsDefaultCoefficients) for the reference.
constexpr double kA = 3.4445, kB = -4.7750, kC = 2.0315;

/// The reference for each matrix of a batch, from the float input.
std::vector<double> reference(const std::vector<float>& in, const Shape& s, int steps, double eps) {
  const std::int64_t size = s.rows * s.cols;
  std::vector<double> out;
  for (std::int64_t i = 0; i < s.batch; ++i) {
    const std::vector<double> g(in.begin() + i * size, in.begin() + (i + 1) * size);
    const std::vector<double> r = ref::newton_schulz(g, s.rows, s.cols, kA, kB, kC, steps, eps);
    out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

std::vector<float> run_cpu(const std::vector<float>& in, const Shape& s, int steps = 5,
                           double eps = 1e-7) {
  std::vector<float> out(in.size(), kNaN);  // poisoned: every element must be written
  std::vector<float> ws(
      static_cast<std::size_t>(newton_schulz_cpu_workspace_floats(s.rows, s.cols)), kNaN);
  newton_schulz_cpu(in.data(), out.data(), s.batch, s.rows, s.cols, kNsDefaultCoefficients, steps,
                    eps, ws.data(), static_cast<std::int64_t>(ws.size()));
  return out;
}

/// Element by element |got - want| <= atol + rtol |want|; prints the first mismatches.
void expect_close(const std::vector<float>& got, const std::vector<double>& want, double atol,
                  double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int shown = 0;
  std::size_t bad = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    worst = std::max(worst, err);
    if (!(err <= atol + rtol * std::fabs(want[i]))) {  // NaN fails
      ++bad;
      if (shown++ < 5)
        ADD_FAILURE() << what << ": index " << i << ": got " << got[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " elements outside the tolerance; largest error " << worst;
}

// Tolerance of the float32 iteration against the double one. Each GEMM is a float32 inner
// product of length k <= n (160 here): relative error <= k 2^-24 |x||y| in the worst case,
// ~sqrt(k) 2^-24 typically, so ~1e-5 per product at most. Over 5 steps the iteration can
// amplify an error by the slope of the quintic, at most a = 3.4445 per step near a zero
// singular value: 3.4445^5 ~ 490, so the worst case is ~5e-3 of the largest element (~1 /
// sqrt(m)); what the random inputs show is 1e-7 to 1e-6 (printed by the test). 1e-4 of the
// largest element, and 1e-3 relative, sit between the two: far above what float32 rounding
// gives on these inputs, far below any mistake in the order of operations, a coefficient or a
// transpose (those change elements by O(1)).
constexpr double kF32Atol = 1e-4, kF32Rtol = 1e-3;

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {{1, 64, 64},   // square
                                       {1, 64, 160},  // wide
                                       {1, 160, 64},  // tall: transposed
                                       {1, 1, 37},    // 1 x n: the Gram matrix is 1 x 1
                                       {1, 37, 1},    // n x 1
                                       {3, 48, 80},   // a batch
                                       {2, 33, 17},   // a tall batch
                                       {1, 1, 1}};
  return s;
}

class NewtonSchulzCpu : public ::testing::TestWithParam<NsGram> {
 protected:
  void SetUp() override { detail::set_newton_schulz_cpu_gram(GetParam()); }
  void TearDown() override { detail::set_newton_schulz_cpu_gram(saved_); }
  NsGram saved_ = detail::newton_schulz_cpu_gram();
};

TEST_P(NewtonSchulzCpu, MatchesTheDoubleReference) {
  auto rng = make_rng();
  for (const Shape& s : shapes()) {
    const std::vector<float> in = random_floats(rng, s.batch * s.rows * s.cols);
    const std::vector<double> want = reference(in, s, 5, 1e-7);
    const std::vector<float> got = run_cpu(in, s);
    expect_close(got, want, kF32Atol * max_abs(want), kF32Rtol, name(s));
    double worst = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i)
      worst = std::max(worst, std::fabs(got[i] - want[i]));
    std::printf("  %-10s largest |cpu - reference| = %.3g (max |reference| %.3g)\n",
                name(s).c_str(), worst, max_abs(want));
  }
}

TEST_P(NewtonSchulzCpu, OtherStepCountsAndCoefficients) {
  auto rng = make_rng();
  const Shape s{2, 24, 40};
  const std::vector<float> in = random_floats(rng, s.batch * s.rows * s.cols);
  for (int steps : {0, 1, 2, 7}) {  // even counts end in `out` without a copy; 0: only the scale
    const std::vector<double> want = reference(in, s, steps, 1e-7);
    expect_close(run_cpu(in, s, steps), want, kF32Atol * max_abs(want), kF32Rtol,
                 "steps " + std::to_string(steps));
  }
  // The cubic Newton-Schulz (a, b, c) = (1.5, -0.5, 0): converges to the orthogonal factor.
  const NsCoefficients cubic{1.5, -0.5, 0.0};
  const std::vector<float> ws0(
      static_cast<std::size_t>(newton_schulz_cpu_workspace_floats(24, 40)));
  std::vector<float> ws = ws0, out(in.size(), kNaN);
  newton_schulz_cpu(in.data(), out.data(), s.batch, s.rows, s.cols, cubic, 3, 1e-7, ws.data(),
                    static_cast<std::int64_t>(ws.size()));
  std::vector<double> want;
  for (std::int64_t i = 0; i < s.batch; ++i) {
    const std::int64_t n = s.rows * s.cols;
    const std::vector<double> g(in.begin() + i * n, in.begin() + (i + 1) * n);
    const std::vector<double> r = ref::newton_schulz(g, s.rows, s.cols, 1.5, -0.5, 0.0, 3, 1e-7);
    want.insert(want.end(), r.begin(), r.end());
  }
  expect_close(out, want, kF32Atol * max_abs(want), kF32Rtol, "cubic coefficients");
}

TEST_P(NewtonSchulzCpu, InPlaceAndBatchedEqualOneAtATime) {
  auto rng = make_rng();
  for (const Shape& s : {Shape{3, 20, 50}, Shape{3, 50, 20}}) {
    const std::int64_t n = s.rows * s.cols;
    const std::vector<float> in = random_floats(rng, s.batch * n);
    const std::vector<float> batched = run_cpu(in, s);
    for (std::int64_t i = 0; i < s.batch; ++i) {
      const std::vector<float> one(in.begin() + i * n, in.begin() + (i + 1) * n);
      const std::vector<float> alone = run_cpu(one, {1, s.rows, s.cols});
      const std::vector<float> part(batched.begin() + i * n, batched.begin() + (i + 1) * n);
      EXPECT_TRUE(bitwise_equal(part, alone))
          << name(s) << " matrix " << i << ": " << first_difference(part, alone);
    }
    for (int steps : {4, 5}) {  // both parities of the ping-pong
      std::vector<float> inplace = in;
      std::vector<float> ws(
          static_cast<std::size_t>(newton_schulz_cpu_workspace_floats(s.rows, s.cols)));
      newton_schulz_cpu(inplace.data(), inplace.data(), s.batch, s.rows, s.cols,
                        kNsDefaultCoefficients, steps, 1e-7, ws.data(),
                        static_cast<std::int64_t>(ws.size()));
      const std::vector<float> separate = run_cpu(in, s, steps);
      EXPECT_TRUE(bitwise_equal(inplace, separate))
          << name(s) << " steps " << steps << ": " << first_difference(inplace, separate);
    }
  }
}

TEST_P(NewtonSchulzCpu, ZeroMatrixGivesZero) {
  for (const Shape& s : {Shape{1, 8, 8}, Shape{2, 5, 12}, Shape{1, 12, 5}}) {
    const std::vector<float> in(static_cast<std::size_t>(s.batch * s.rows * s.cols), 0.0f);
    const std::vector<float> out = run_cpu(in, s);  // eps guards the division: 0 / eps
    for (float x : out) ASSERT_EQ(x, 0.0f) << name(s);
  }
  // Below eps the norm is replaced by eps: a tiny matrix stays tiny (torch's clamp).
  const std::vector<float> tiny = {1e-9f, 0.0f, 0.0f, 1e-9f};
  const std::vector<double> want = reference(tiny, {1, 2, 2}, 5, 1e-7);
  expect_close(run_cpu(tiny, {1, 2, 2}), want, 1e-12, 1e-5, "below eps");
}

// ---- Singular values

// Random orthogonal n x n (Gram-Schmidt of a Gaussian matrix, twice for stability), row-major.
std::vector<double> random_orthogonal(std::mt19937_64& rng, std::int64_t n) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> q(static_cast<std::size_t>(n * n));
  for (double& x : q) x = normal(rng);
  for (std::int64_t i = 0; i < n; ++i)  // rows
    for (int pass = 0; pass < 2; ++pass) {
      for (std::int64_t j = 0; j < i; ++j) {
        double d = 0.0;
        for (std::int64_t k = 0; k < n; ++k) d += q[i * n + k] * q[j * n + k];
        for (std::int64_t k = 0; k < n; ++k) q[i * n + k] -= d * q[j * n + k];
      }
      double norm = 0.0;
      for (std::int64_t k = 0; k < n; ++k) norm += q[i * n + k] * q[i * n + k];
      for (std::int64_t k = 0; k < n; ++k) q[i * n + k] /= std::sqrt(norm);
    }
  return q;
}

// Eigenvalues of a symmetric n x n matrix by cyclic Jacobi rotations, ascending.
std::vector<double> symmetric_eigenvalues(std::vector<double> a, std::int64_t n) {
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = i + 1; j < n; ++j) off += a[i * n + j] * a[i * n + j];
    if (off < 1e-26) break;
    for (std::int64_t p = 0; p < n; ++p)
      for (std::int64_t q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (std::fabs(apq) < 1e-300) continue;
        const double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1.0 / std::sqrt(t * t + 1), s = t * c;
        for (std::int64_t k = 0; k < n; ++k) {  // columns p, q
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (std::int64_t k = 0; k < n; ++k) {  // rows p, q
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
      }
  }
  std::vector<double> e(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) e[i] = a[i * n + i];
  std::sort(e.begin(), e.end());
  return e;
}

// For G = U diag(s) V^T the iteration gives U diag(p^5(s / ||s||)) V^T, p the quintic: its
// singular values can be predicted without the reference. For well-conditioned inputs (here
// s in [1, 4]: s / ||s|| >= ~0.04 for n = 64, which 5 steps bring into the fixed band) they
// land in [p(1.050), p(0.5545)] = [0.682, 1.202], the band where the quintic's two critical
// points send them: the known "roughly [0.7, 1.2]" of these coefficients.
TEST_P(NewtonSchulzCpu, SingularValuesFollowTheQuinticIntoItsBand) {
  auto rng = make_rng();
  const std::int64_t n = 64;
  const std::vector<double> u = random_orthogonal(rng, n), v = random_orthogonal(rng, n);
  std::uniform_real_distribution<double> sv(1.0, 4.0);
  std::vector<double> s(static_cast<std::size_t>(n));
  for (double& x : s) x = sv(rng);
  std::vector<float> g(static_cast<std::size_t>(n * n));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double x = 0.0;
      for (std::int64_t k = 0; k < n; ++k) x += u[i * n + k] * s[k] * v[j * n + k];
      g[i * n + j] = static_cast<float>(x);
    }
  const std::vector<float> out = run_cpu(g, {1, n, n});

  std::vector<double> oto(static_cast<std::size_t>(n * n), 0.0);  // O^T O
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t k = 0; k < n; ++k)
        oto[i * n + j] += static_cast<double>(out[k * n + i]) * out[k * n + j];
  std::vector<double> got = symmetric_eigenvalues(oto, n);
  for (double& x : got) x = std::sqrt(std::max(x, 0.0));

  double ss = 0.0;
  for (double x : s) ss += x * x;
  std::vector<double> want;
  for (double x : s) {
    double y = x / std::sqrt(ss);
    for (int t = 0; t < 5; ++t) y = y * (kA + kB * y * y + kC * y * y * y * y);
    want.push_back(y);
  }
  std::sort(want.begin(), want.end());
  for (std::int64_t i = 0; i < n; ++i) {
    EXPECT_GE(got[i], 0.68) << "singular value " << i;
    EXPECT_LE(got[i], 1.21) << "singular value " << i;
    // float32 GEMMs (kF32Atol's reasoning; the slope of p^5 is modest at these inputs) and
    // the float rounding of G itself: 1e-3 is ample.
    EXPECT_NEAR(got[i], want[i], 1e-3) << "singular value " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Gram, NewtonSchulzCpu, ::testing::Values(NsGram::gemm, NsGram::syrk),
                         [](const auto& p) {
                           return std::string(p.param == NsGram::gemm ? "sgemm" : "ssyrk");
                         });

StatusCode code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return StatusCode::ok;
}

TEST(NewtonSchulzValidation, RejectsBadArguments) {
  std::vector<float> in(64, 1.0f), out(64),
      ws(static_cast<std::size_t>(newton_schulz_cpu_workspace_floats(8, 8)));
  const auto wsn = static_cast<std::int64_t>(ws.size());
  const auto call = [&](std::int64_t b, std::int64_t r, std::int64_t c, int steps, double eps,
                        std::int64_t wsf, NsCoefficients k = kNsDefaultCoefficients) {
    return code_of(
        [&] { newton_schulz_cpu(in.data(), out.data(), b, r, c, k, steps, eps, ws.data(), wsf); });
  };
  EXPECT_EQ(call(1, 8, 8, 5, 1e-7, wsn), StatusCode::ok);
  EXPECT_EQ(call(-1, 8, 8, 5, 1e-7, wsn), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, -8, 8, 5, 1e-7, wsn), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, 8, 8, -1, 1e-7, wsn), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, 8, 8, 100, 1e-7, wsn), StatusCode::invalid_argument);  // torch: < 100
  EXPECT_EQ(call(1, 8, 8, 5, std::nan(""), wsn), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, 8, 8, 5, -1.0, wsn), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, 8, 8, 5, 1e-7, wsn - 1), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, 8, 8, 5, 1e-7, wsn, {std::nan(""), 0, 0}), StatusCode::invalid_argument);
  EXPECT_EQ(call(1, std::int64_t{1} << 32, 1, 5, 1e-7, wsn), StatusCode::invalid_argument);
  EXPECT_EQ(code_of([&] {
              newton_schulz_cpu(nullptr, out.data(), 1, 8, 8, kNsDefaultCoefficients, 5, 1e-7,
                                ws.data(), wsn);
            }),
            StatusCode::invalid_argument);
  // Nothing to do: no pointer is read.
  EXPECT_EQ(code_of([&] {
              newton_schulz_cpu(nullptr, nullptr, 0, 8, 8, kNsDefaultCoefficients, 5, 1e-7, nullptr,
                                0);
            }),
            StatusCode::ok);
  EXPECT_EQ(newton_schulz_cpu_workspace_floats(64, 160), 64 * 160 + 2 * 64 * 64);
  EXPECT_EQ(newton_schulz_cpu_workspace_floats(160, 64), 64 * 160 + 2 * 64 * 64);
}

// ---- The cuBLAS path: skips without a GPU (none has run it yet).

// bf16 tolerance: every GEMM's result is rounded to bf16 (relative 2^-9 ~ 2e-3) and the
// operands are bf16, so each step adds errors of ~1e-3 of the largest element, amplified as
// for float32 by up to the quintic's slope. torch's own bf16 iteration on the CPU
// (bench/torch_newton_schulz_cpu.py, 20 random matrices per shape) lands within 2.3e-2 to
// 3.3e-2 of the largest element of the double iteration on these shapes; 8e-2 is allowed
// (2.5 times that), which still catches a wrong coefficient, transpose or order (errors of
// O(1)).
constexpr double kBf16Atol = 8e-2, kBf16Rtol = 0.0;

std::vector<float> run_device(const std::vector<float>& in, const Shape& s, DType dtype,
                              bool in_place = false) {
  const std::size_t n = in.size(), elem = dtype == DType::bf16 ? 2 : 4;
  std::vector<unsigned char> host(n * elem);
  if (dtype == DType::bf16) {
    auto* b = reinterpret_cast<bf16*>(host.data());
    for (std::size_t i = 0; i < n; ++i) b[i] = to_bf16(in[i]);
  } else {
    std::memcpy(host.data(), in.data(), n * 4);
  }
  detail::Buffer d_in(Device::cuda, 0, n * elem), d_out(Device::cuda, 0, n * elem);
  const std::size_t ws_bytes = cuda::newton_schulz_workspace_bytes(dtype, s.batch, s.rows, s.cols);
  detail::Buffer d_ws(Device::cuda, 0, ws_bytes);
  cuda::copy_from_host(d_in.data(), host.data(), host.size(), nullptr);
  std::vector<unsigned char> poison(n * elem, 0xFF);  // NaN in f32 and bf16
  cuda::copy_from_host(d_out.data(), poison.data(), poison.size(), nullptr);
  void* const out = in_place ? d_in.data() : d_out.data();
  cuda::newton_schulz_device(d_in.data(), out, dtype, s.batch, s.rows, s.cols,
                             kNsDefaultCoefficients, kNsDefaultSteps, kNsDefaultEps, d_ws.data(),
                             ws_bytes, nullptr);
  cuda::copy_to_host(host.data(), out, host.size());
  std::vector<float> result(n);
  if (dtype == DType::bf16) {
    const auto* b = reinterpret_cast<const bf16*>(host.data());
    for (std::size_t i = 0; i < n; ++i) result[i] = to_float(b[i]);
  } else {
    std::memcpy(result.data(), host.data(), n * 4);
  }
  return result;
}

TEST(NewtonSchulzGpu, F32MatchesTheReferenceAndTheCpu) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  for (const Shape& s : shapes()) {
    const std::vector<float> in = random_floats(rng, s.batch * s.rows * s.cols);
    const std::vector<double> want = reference(in, s, 5, 1e-7);
    const std::vector<float> got = run_device(in, s, DType::f32);
    expect_close(got, want, kF32Atol * max_abs(want), kF32Rtol, "cuda f32 " + name(s));
    // Against the CPU: both within the tolerance of the reference, so within twice it.
    const std::vector<float> cpu = run_cpu(in, s);
    const std::vector<double> cpu_d(cpu.begin(), cpu.end());
    expect_close(got, cpu_d, 2 * kF32Atol * max_abs(want), 2 * kF32Rtol,
                 "cuda f32 vs cpu " + name(s));
    EXPECT_TRUE(bitwise_equal(run_device(in, s, DType::f32, true), got)) << "in place " << name(s);
  }
}

TEST(NewtonSchulzGpu, Bf16MatchesTheReferenceWithinBf16Rounding) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  for (const Shape& s : shapes()) {
    std::vector<float> in = random_floats(rng, s.batch * s.rows * s.cols);
    for (float& x : in) x = to_float(to_bf16(x));  // the reference starts from the bf16 input
    const std::vector<double> want = reference(in, s, 5, 1e-7);
    const std::vector<float> got = run_device(in, s, DType::bf16);
    expect_close(got, want, kBf16Atol * max_abs(want), kBf16Rtol, "cuda bf16 " + name(s));
  }
}

TEST(NewtonSchulzGpu, ZeroMatrixGivesZero) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  for (DType dtype : {DType::f32, DType::bf16}) {
    const Shape s{2, 12, 5};
    const std::vector<float> out = run_device(std::vector<float>(120, 0.0f), s, dtype);
    for (float x : out) ASSERT_EQ(x, 0.0f) << dtype_name(dtype);
  }
}

TEST(NewtonSchulzGpu, RejectsBadArguments) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  detail::Buffer d(Device::cuda, 0, 4096);
  const auto call = [&](DType dtype, std::size_t ws_bytes) {
    return code_of([&] {
      cuda::newton_schulz_device(d.data(), d.data(), dtype, 1, 4, 4, kNsDefaultCoefficients, 5,
                                 1e-7, d.data(), ws_bytes, nullptr);
    });
  };
  EXPECT_EQ(call(DType::f16, 1u << 30), StatusCode::invalid_argument);
  EXPECT_EQ(call(DType::f32, 4096), StatusCode::invalid_argument);  // workspace too small
}

#if defined(FUSEDOPT_WITH_CUDA)
// cuBLAS is loaded on first use, not linked (as cuSOLVER: a program that steps only on the
// CPU must not need it): it must load, GPU or not, from the toolkit this build was made with,
// with every entry point newton_schulz.cu binds.
TEST(CudaLibraries, CuBlasLoadsWhenFirstNeededWithoutAGpu) {
  EXPECT_NO_THROW(cuda::require_cublas());
  EXPECT_NO_THROW(cuda::require_cublas());
}

// Capturable: after a first call (which creates the thread's cuBLAS handle), a call captured
// in a graph and replayed gives the eager result, bitwise.
TEST(NewtonSchulzGpu, CapturedInAGraphEqualsEager) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Shape s{3, 96, 40};
  const std::vector<float> in = random_floats(rng, s.batch * s.rows * s.cols);
  const std::size_t bytes = in.size() * 4;
  const std::size_t ws_bytes =
      cuda::newton_schulz_workspace_bytes(DType::f32, s.batch, s.rows, s.cols);
  detail::Buffer d_in(Device::cuda, 0, bytes), d_out(Device::cuda, 0, bytes),
      d_ws(Device::cuda, 0, ws_bytes);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cuda::copy_from_host(d_in.data(), in.data(), bytes, stream);
  const auto call = [&] {
    cuda::newton_schulz_device(d_in.data(), d_out.data(), DType::f32, s.batch, s.rows, s.cols,
                               kNsDefaultCoefficients, 5, 1e-7, d_ws.data(), ws_bytes, stream);
  };
  call();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<float> eager(in.size()), replayed(in.size(), kNaN);
  cuda::copy_to_host(eager.data(), d_out.data(), bytes);
  std::vector<float> poison(in.size(), kNaN);
  cuda::copy_from_host(d_out.data(), poison.data(), bytes, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);

  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  std::string error;
  try {
    call();
  } catch (const std::exception& e) {
    error = e.what();
  }
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  ASSERT_TRUE(error.empty()) << "threw while capturing: " << error;
  ASSERT_EQ(end, cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiateWithFlags(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cuda::copy_to_host(replayed.data(), d_out.data(), bytes);
  EXPECT_TRUE(bitwise_equal(replayed, eager)) << first_difference(replayed, eager);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
#endif

}  // namespace
}  // namespace fo::test
