// The optimizer-wide step settings on the CPU (CUDA has its own in cuda_test.cpp): loss
// scaling, global-norm clipping and the non-finite skip, checked against plain computations
// and against optimizers fed pre-processed gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

struct Model {
  std::vector<std::vector<float>> params;
  std::vector<std::int64_t> sizes = {37, 1000, 1, 4099};
  Optimizer opt;

  Model(const std::string& algorithm, const std::vector<std::pair<std::string, double>>& opts,
        std::uint64_t seed)
      : opt(algorithm) {
    std::mt19937_64 rng(seed);
    for (const auto& [k, v] : opts) opt.set_option(k, v);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      params.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
      opt.add_param("p" + std::to_string(i), params.back().data(), DType::f32, {sizes[i]});
    }
  }
  void step(const std::vector<std::vector<float>>& grads) {
    std::vector<const void*> g;
    for (const auto& x : grads) g.push_back(x.data());
    opt.step(g.data());
  }
  /// Params, then every state, then step counts: everything the optimizer holds.
  std::vector<std::vector<float>> everything() const {
    std::vector<std::vector<float>> all = params;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      for (const auto& s : opt.state_names(name)) all.push_back(opt.state(name, s));
      all.push_back({static_cast<float>(opt.step_count(name))});
    }
    return all;
  }
};

std::vector<std::vector<float>> random_grads(std::mt19937_64& rng, const Model& m, float scale) {
  std::vector<std::vector<float>> g;
  for (auto n : m.sizes) {
    g.push_back(random_floats(rng, static_cast<std::size_t>(n)));
    for (auto& x : g.back()) x *= scale;
  }
  return g;
}

double norm_of(const std::vector<std::vector<float>>& grads, double scale) {
  double s = 0.0;
  for (const auto& g : grads)
    for (float x : g) s += (x * scale) * (x * scale);
  return std::sqrt(s);
}

TEST(StepSettings, PowerOfTwoLossScaleIsExact) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  Model plain("adam", {{"amsgrad", 1}}, seed), scaled("adam", {{"amsgrad", 1}}, seed);
  scaled.opt.set_option("grad_scale", 1024);
  for (int t = 0; t < 5; ++t) {
    auto g = random_grads(rng, plain, 1.0f);
    plain.step(g);
    for (auto& v : g)
      for (auto& x : v) x *= 1024.0f;
    scaled.step(g);
  }
  expect_same(scaled.everything(), plain.everything(), "grad_scale 1024");
}

TEST(StepSettings, ClippingScalesByTheGlobalNorm) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  Model clipped("sgd", {{"lr", 0.1}, {"momentum", 0.9}}, seed);
  Model manual("sgd", {{"lr", 0.1}, {"momentum", 0.9}}, seed);
  clipped.opt.set_option("max_grad_norm", 0.5);
  for (int t = 0; t < 3; ++t) {
    auto g = random_grads(rng, clipped, 1.0f);
    clipped.step(g);
    const double norm = norm_of(g, 1.0);
    // The library sums in double over fixed chunks, then rounds the norm to float.
    EXPECT_NEAR(clipped.opt.grad_norm(), norm, 1e-6 * norm);
    const float coef = std::min(1.0f, 0.5f / (static_cast<float>(norm) + 1e-6f));
    for (auto& v : g)
      for (auto& x : v) x *= coef;
    manual.step(g);
    const auto a = clipped.everything(), b = manual.everything();
    for (std::size_t i = 0; i < a.size(); ++i)
      for (std::size_t j = 0; j < a[i].size(); ++j)  // coef may differ in its last bit
        ASSERT_NEAR(a[i][j], b[i][j], 1e-6 + 1e-5 * std::abs(b[i][j]))
            << "item " << i << "[" << j << "]";
  }
}

TEST(StepSettings, ClippingAboveTheNormChangesNothing) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  Model loose("adamw", {}, seed), none("adamw", {}, seed);
  loose.opt.set_option("max_grad_norm", 1e6);
  for (int t = 0; t < 3; ++t) {
    const auto g = random_grads(rng, loose, 1.0f);
    loose.step(g);
    none.step(g);
  }
  expect_same(loose.everything(), none.everything(), "max_grad_norm far above the norm");
}

class SkipNonFinite : public ::testing::TestWithParam<float> {};

TEST_P(SkipNonFinite, ABadGradientSkipsTheWholeStep) {
  const float bad = GetParam();
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  for (const std::string algorithm : {"sgd", "adam", "rmsprop"}) {
    SCOPED_TRACE(algorithm);
    const std::vector<std::pair<std::string, double>> opts =
        algorithm == "sgd" ? std::vector<std::pair<std::string, double>>{{"momentum", 0.9}}
                           : std::vector<std::pair<std::string, double>>{};
    Model m(algorithm, opts, seed), good_only(algorithm, opts, seed);
    m.opt.set_option("skip_nonfinite", 1);
    // A bad step first: the very first step is skipped, and the next one is a first step.
    auto g = random_grads(rng, m, 1.0f);
    g[1][123] = bad;
    const auto before = m.everything();
    m.step(g);
    expect_same(m.everything(), before, "after a skipped first step");
    EXPECT_EQ(m.opt.step_count("p1"), 0);
    EXPECT_FALSE(std::isfinite(m.opt.grad_norm()));
    for (int t = 0; t < 3; ++t) {
      const auto good = random_grads(rng, m, 1.0f);
      m.step(good);
      good_only.step(good);
      expect_same(m.everything(), good_only.everything(), "good steps after the skip");
      auto worse = random_grads(rng, m, 1.0f);
      worse[static_cast<std::size_t>(t) % worse.size()][0] = bad;
      const auto snapshot = m.everything();
      m.step(worse);
      expect_same(m.everything(), snapshot, "a skipped later step");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(NanAndInf, SkipNonFinite,
                         ::testing::Values(std::numeric_limits<float>::quiet_NaN(),
                                           std::numeric_limits<float>::infinity(),
                                           -std::numeric_limits<float>::infinity()),
                         [](const auto& param_info) {
                           return std::isnan(param_info.param) ? std::string("nan")
                                  : param_info.param > 0       ? std::string("inf")
                                                               : std::string("minus_inf");
                         });

TEST(StepSettings, WithoutTheSkipANanReachesTheParams) {
  Model m("sgd", {}, 1);
  auto g =
      std::vector<std::vector<float>>{std::vector<float>(37, 1.0f), std::vector<float>(1000, 1.0f),
                                      std::vector<float>(1, 1.0f), std::vector<float>(4099, 1.0f)};
  g[0][5] = std::numeric_limits<float>::quiet_NaN();
  m.step(g);
  EXPECT_TRUE(std::isnan(m.params[0][5]));
  EXPECT_FALSE(std::isnan(m.params[0][4]));
}

TEST(StepSettings, SettingsAreValidatedAndFixedWhereStorageDependsOnThem) {
  Model m("adam", {}, 2);
  auto expect_invalid = [&](const char* key, double v) {
    const double before = m.opt.option(key);
    EXPECT_THROW(m.opt.set_option(key, v), Error) << key << " = " << v;
    EXPECT_EQ(m.opt.option(key), before);
  };
  expect_invalid("grad_scale", 0.0);
  expect_invalid("grad_scale", 1e-40);  // 1/grad_scale would be an infinite float multiplier
  expect_invalid("grad_scale", 1e300);  // ... or zero
  expect_invalid("grad_scale", std::numeric_limits<double>::infinity());
  expect_invalid("max_grad_norm", -1.0);
  expect_invalid("skip_nonfinite", 2.0);
  expect_invalid("state_dtype", 1.0);
  expect_invalid("seed", -1.0);
  expect_invalid("seed", 0.5);
  m.opt.set_option("state_dtype", 2);  // bf16 states, on the CPU too (before any step)
  EXPECT_EQ(m.opt.option("state_dtype"), 2.0);
  m.opt.set_option("state_dtype", 0);
  EXPECT_THROW(m.opt.set_param_option("p0", "grad_scale", 2.0), Error);
  m.opt.set_option("fp32_grads", 1);  // before any step: fine
  m.opt.set_option("fp32_grads", 0);
  m.step(random_grads(*std::make_unique<std::mt19937_64>(3), m, 1.0f));
  EXPECT_THROW(m.opt.set_option("master_weights", 1), Error);
  m.opt.set_option("grad_scale", 8);  // not a storage setting: may change any time
  EXPECT_EQ(m.opt.option("grad_scale"), 8.0);
}

}  // namespace
}  // namespace fo::test
