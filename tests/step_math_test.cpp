// The double-precision helpers that build step scalars (kernels/algorithm.hpp, ops/nadam.hpp)
// against the C library and against plain loops. They use only +, -, *, / and exact scaling,
// so the device computes the very bits the host does; here their accuracy is what is tested.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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
