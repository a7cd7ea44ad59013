// The double-precision helpers that build step scalars (kernels/algorithm.hpp, ops/nadam.hpp,
// ops/ademamix.hpp)
// against the C library and against plain loops. They use only +, -, *, / and exact scaling,
// so the device computes the very bits the host does; here their accuracy is what is tested.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fusedopt/kernels/ops/ademamix.hpp"
#include "fusedopt/kernels/ops/nadam.hpp"

namespace fo::test {
namespace {

TEST(StepMath, PortableExpIsWithinFourUlpOfExp) {
  for (double x = -740.0; x <= 709.0; x += 0.0137) {
    const double want = std::exp(x);
    const double ulp = std::nextafter(want, HUGE_VAL) - want;
    ASSERT_LE(std::fabs(fo::portable_exp(x) - want), 4 * ulp) << "x = " << x;
  }
  for (double x : {0.0, -0.0, 1e-300, -1e-300, 0.5, -0.5, 1.0, 700.0}) {
    const double want = std::exp(x);
    EXPECT_LE(std::fabs(fo::portable_exp(x) - want), 4 * (std::nextafter(want, HUGE_VAL) - want))
        << "x = " << x;
  }
  EXPECT_EQ(fo::portable_exp(-800.0), 0.0);
  EXPECT_EQ(fo::portable_exp(-HUGE_VAL), 0.0);
  EXPECT_EQ(fo::portable_exp(710.0), HUGE_VAL);
  EXPECT_TRUE(std::isnan(fo::portable_exp(std::numeric_limits<double>::quiet_NaN())));
}

TEST(StepMath, PortableExpm1KeepsItsRelativeAccuracyNearZero) {
  for (double x :
       {1e-300, 1e-20, -1e-12, 3e-9, -1.6e-4, 0.01, -0.2, 0.339, -0.341, 0.5, -3.0, 20.0}) {
    const double want = std::expm1(x);
    EXPECT_LE(std::fabs(fo::portable_expm1(x) - want), 1e-15 * std::fabs(want)) << "x = " << x;
  }
}

// Over the whole range of double: subnormals, around 1 (where ln x ~ x - 1 and the result's
// ulp is tiny), and either side of the sqrt(1/2) switch of the range reduction.
TEST(StepMath, PortableLogIsWithinFourUlpOfLog) {
  std::vector<double> xs = {1.0,
                            2.0,
                            0.5,
                            0.1,
                            0.9,
                            0.999,
                            0.9999,
                            1e-300,
                            4.9e-324,
                            2.2250738585072014e-308,
                            1e300,
                            1.7e308,
                            0.70710678118654752440,
                            0.7071067811865475,
                            1.4142135623730951};
  for (double x = 1e-320; x < 1e308; x *= 1.0137) xs.push_back(x);
  for (double x = 0.5; x < 2.0; x += 1.0 / 4096 + 1e-9) xs.push_back(x);
  for (double d = 1e-300; d < 0.1; d *= 1.7) {
    xs.push_back(1.0 + d);
    xs.push_back(1.0 - d);
  }
  for (double x : xs) {
    const double want = std::log(x);
    const double ulp = std::fabs(std::nextafter(want, HUGE_VAL) - want);
    ASSERT_LE(std::fabs(fo::portable_log(x) - want), 4 * ulp) << "x = " << x;
  }
  EXPECT_EQ(fo::portable_log(1.0), 0.0);
  EXPECT_EQ(fo::portable_log(0.0), -HUGE_VAL);
  EXPECT_EQ(fo::portable_log(HUGE_VAL), HUGE_VAL);
  EXPECT_TRUE(std::isnan(fo::portable_log(-1.0)));
  EXPECT_TRUE(std::isnan(fo::portable_log(-HUGE_VAL)));
  EXPECT_TRUE(std::isnan(fo::portable_log(std::numeric_limits<double>::quiet_NaN())));
}

// AdEMAMix's beta3 warm-up against the paper's form in libm, exp(ln b1 ln b3 / ((1 - s) ln b3
// + s ln b1)): it starts at beta1 and reaches beta3 at s = 1; beta1 = 0 gives the limit
// beta3^(1/s).
TEST(StepMath, AdEMAMixBeta3WarmupEqualsThePapersFormula) {
  for (double b1 : {0.5, 0.9, 0.95}) {
    for (double b3 : {0.99, 0.999, 0.9999, 0.99999}) {
      for (double s : {1e-4, 0.01, 0.3, 0.5, 0.99, 1.0, 1.5}) {
        const double l1 = std::log(b1), l3 = std::log(b3);
        const double want = std::exp(l1 * l3 / ((1.0 - s) * l3 + s * l1));
        EXPECT_NEAR(fo::ademamix_beta3_warmup(b1, b3, s), want, 1e-14 * want)
            << "beta1 " << b1 << " beta3 " << b3 << " s " << s;
      }
      EXPECT_NEAR(fo::ademamix_beta3_warmup(b1, b3, 0.0), b1, 1e-15);
    }
  }
  EXPECT_NEAR(fo::ademamix_beta3_warmup(0.0, 0.999, 0.25), std::pow(0.999, 4.0), 1e-15);
  EXPECT_EQ(fo::ademamix_beta3_warmup(0.0, 0.0, 0.5), 0.0);
}

// P_t = prod_{k <= t} beta1 * (1 - 0.96^(k * momentum_decay) / 2), in constant time, against
// the running product (itself within ~t ulp): 1e-12 relative, ~1e4 times finer than the
// float32 coefficient it feeds.
TEST(StepMath, NAdamMuProductEqualsTheRunningProduct) {
  const std::vector<std::int64_t> checkpoints = {1, 2, 3, 10, 100, 1000, 10000, 100000};
  for (double beta1 : {0.0, 0.5, 0.9, 0.99, 0.999}) {
    for (double md : {0.0, 1e-12, 1e-6, 4e-3, 0.1, 1.0, 50.0}) {
      double product = 1.0;
      std::size_t next = 0;
      for (std::int64_t t = 1; t <= checkpoints.back(); ++t) {
        product *= beta1 * (1.0 - 0.5 * std::pow(0.96, double(t) * md));
        if (t != checkpoints[next]) continue;
        ++next;
        const double got = fo::nadam_mu_product(beta1, md, t);
        if (product < 1e-290) {  // past double's range of interest: 1 - P_t is 1 either way
          EXPECT_LT(got, 1e-280) << "beta1 " << beta1 << " md " << md << " t " << t;
          continue;
        }
        EXPECT_NEAR(got, product, 1e-12 * product)
            << "beta1 " << beta1 << " momentum_decay " << md << " t " << t;
      }
    }
  }
  EXPECT_EQ(fo::nadam_mu_product(0.9, 4e-3, 0), 1.0);
}

}  // namespace
}  // namespace fo::test
