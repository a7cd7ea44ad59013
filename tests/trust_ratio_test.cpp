// lamb and lars: the trust ratio's edge cases (zero norms, zero gradients, tensors exempt
// from adaptation), its scale, per-param exemption in one optimizer, multi-chunk tensors
// against the double reference, and the same bits for every thread count and ISA.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

double norm(const std::vector<float>& v) {
  double s = 0.0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s);
}

/// One step of `algorithm` with `options` on one CPU param; returns the param after it.
std::vector<float> one_step(const std::string& algorithm, const ref::OptionMap& options,
                            std::vector<float> p, const std::vector<float>& g) {
  Optimizer opt(algorithm);
  for (const auto& [k, v] : options) opt.set_option(k, v);
  opt.add_param("w", p.data(), DType::f32, {static_cast<std::int64_t>(p.size())});
  opt.step({g.data()});
  return p;
}

// A zero param has no direction to trust: the ratio is 1, and the step is Adam's
// lr * m_hat / (sqrt(v_hat) + eps) = lr * g / (|g| + eps) on the first step.
TEST(Lamb, ZeroParamNormTakesRatioOne) {
  auto rng = make_rng();
  const std::vector<float> g = random_floats(rng, 9001);
  const std::vector<float> p = one_step("lamb", {{"adam_w_mode", 0}, {"weight_decay", 0.1}},
                                        std::vector<float>(g.size(), 0.0f), g);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double want = -1e-3 * g[i] / (std::fabs(g[i]) + 1e-6);
    ASSERT_NEAR(p[i], want, 1e-9) << "element " << i;
  }
}

// A zero gradient with decoupled decay: u = weight_decay * p, so the ratio is 1 / weight_decay
// and the step shrinks the param by exactly lr (in real arithmetic).
TEST(Lamb, ZeroGradientShrinksByLr) {
  auto rng = make_rng();
  const std::vector<float> p0 = random_floats(rng, 20011);
  const std::vector<float> p = one_step("lamb", {{"lr", 0.01}}, p0, std::vector<float>(p0.size()));
  for (std::size_t i = 0; i < p0.size(); ++i)
    ASSERT_NEAR(p[i], p0[i] * 0.99, 1e-6 * std::fabs(p0[i]) + 1e-12) << "element " << i;
}

// A zero update (zero gradient, no decay): ratio 1 and a step of zero, bitwise.
TEST(Lamb, ZeroUpdateLeavesTheParamBitwise) {
  auto rng = make_rng();
  const std::vector<float> p0 = random_floats(rng, 4097);
  const std::vector<float> p =
      one_step("lamb", {{"weight_decay", 0}, {"use_nvlamb", 1}}, p0, std::vector<float>(p0.size()));
  EXPECT_TRUE(bitwise_equal(p, p0)) << first_difference(p, p0);
}

// The point of the ratio: each adapted tensor moves by lr * ||p|| whatever its gradient's
// scale, while without decay (and no use_nvlamb) the step is Adam-like and scale-blind too,
// but not tied to ||p||.
TEST(Lamb, AdaptedStepIsLrTimesTheParamNorm) {
  auto rng = make_rng();
  for (float scale : {1e-3f, 1.0f, 1e3f}) {
    std::vector<float> p0 = random_floats(rng, 30001);
    for (float& x : p0) x *= scale;
    const std::vector<float> g = random_floats(rng, p0.size());
    const std::vector<float> p = one_step("lamb", {{"lr", 0.01}}, p0, g);
    std::vector<float> delta(p.size());
    for (std::size_t i = 0; i < p.size(); ++i) delta[i] = p[i] - p0[i];
    EXPECT_NEAR(norm(delta) / norm(p0), 0.01, 1e-4) << "param scale " << scale;
  }
}

// lars' ratio: trust_coefficient * ||p|| / ||g + wd p||, so the first step (momentum buffer
// = the step) moves the tensor by lr * trust_coefficient * ||p||.
TEST(Lars, AdaptedStepIsLrTimesTrustTimesTheParamNorm) {
  auto rng = make_rng();
  const std::vector<float> p0 = random_floats(rng, 16411);
  std::vector<float> g = random_floats(rng, p0.size());
  for (float& x : g) x *= 1e4f;  // the gradient's scale must not matter
  const std::vector<float> p =
      one_step("lars", {{"lr", 2.0}, {"trust_coefficient", 0.01}, {"weight_decay", 0.1}}, p0, g);
  std::vector<float> delta(p.size());
  for (std::size_t i = 0; i < p.size(); ++i) delta[i] = p[i] - p0[i];
  EXPECT_NEAR(norm(delta) / norm(p0), 0.02, 2e-6);
}

// adapt = 0 on one param of an optimizer: that param takes plain momentum SGD with the lr
// scaled into the buffer and no decay (p - lr * g on the first step, bitwise as fp32 computes
// it), while the other param keeps its trust ratio and decay.
TEST(Lars, ExemptParamTakesNeitherRatioNorDecay) {
  auto rng = make_rng();
  std::vector<float> w = random_floats(rng, 1000), b = random_floats(rng, 17);
  const std::vector<float> w0 = w, b0 = b;
  const std::vector<float> gw = random_floats(rng, w.size()), gb = random_floats(rng, b.size());
  Optimizer opt("lars");
  opt.set_option("lr", 0.5);
  opt.set_option("weight_decay", 0.1);
  opt.add_param("w", w.data(), DType::f32, {1000});
  opt.add_param("b", b.data(), DType::f32, {17});
  opt.set_param_option("b", "adapt", 0);
  opt.step({gw.data(), gb.data()});
  for (std::size_t i = 0; i < b.size(); ++i)
    ASSERT_EQ(b[i], b0[i] - 0.5f * gb[i]) << "element " << i;
  std::vector<double> want(w0.begin(), w0.end());
  ref::StateMap states{{"momentum_buffer", std::vector<double>(w.size(), 0.0)}};
  ref::step("lars", {{"lr", 0.5}, {"weight_decay", 0.1}}, 1, want,
            std::vector<double>(gw.begin(), gw.end()), states);
  for (std::size_t i = 0; i < w.size(); ++i)
    ASSERT_NEAR(w[i], want[i], 1e-6 * std::fabs(want[i]) + 1e-9) << "element " << i;
}

// Tensors of many chunks (the norms' partial sums across chunks and threads) over many steps,
// against the double reference; each step restarts the reference from the library's output.
TEST(TrustRatio, MultiChunkTensorsMatchTheReference) {
  auto rng = make_rng();
  for (const char* algorithm : {"lamb", "lars"}) {
    const ref::OptionMap options = ref::test_variants(algorithm).back();
    for (std::int64_t n : {8193, 65537 + 8 * 1024}) {
      std::vector<float> p = random_floats(rng, static_cast<std::size_t>(n));
      Optimizer opt(algorithm);
      for (const auto& [k, v] : options) opt.set_option(k, v);
      opt.add_param("w", p.data(), DType::f32, {n});
      const std::vector<std::string> names = ref::state_names(algorithm, options);
      ref::StateMap states;
      for (const auto& s : names) states[s].assign(static_cast<std::size_t>(n), 0.0);
      for (int t = 1; t <= 6; ++t) {
        std::vector<double> want(p.begin(), p.end());
        for (const auto& s : names) {
          const std::vector<float> got = opt.state("w", s);
          states[s].assign(got.begin(), got.end());
        }
        const std::vector<float> g = random_floats(rng, p.size());
        opt.step({g.data()});
        ref::step(algorithm, options, t, want, std::vector<double>(g.begin(), g.end()), states);
        for (std::size_t i = 0; i < p.size(); ++i)
          ASSERT_NEAR(p[i], want[i], 2e-6 * std::fabs(want[i]) + 1e-7)
              << algorithm << ", n " << n << ", step " << t << ", element " << i;
      }
    }
  }
}

// The norms are summed in one order for every thread count and instruction set: the same bits.
TEST(TrustRatio, ThreadsAndIsasGiveTheSameBits) {
  auto rng = make_rng();
  const std::int64_t n = 13 * 8192 + 77;  // over 4 chunks a thread: pass one splits
  const std::vector<float> p0 = random_floats(rng, static_cast<std::size_t>(n));
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 3; ++t) grads.push_back(random_floats(rng, p0.size()));
  const cpu::Isa saved_isa = cpu::isa();
  const int saved_threads = cpu::num_threads();
  for (const char* algorithm : {"lamb", "lars"}) {
    std::vector<float> first;
    for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
      if (!cpu::isa_supported(isa)) continue;
      for (int threads : {1, 2, 3}) {
        cpu::set_isa(isa);
        cpu::set_num_threads(threads);
        std::vector<float> p = p0;
        Optimizer opt(algorithm);
        opt.set_option("weight_decay", 0.05);
        opt.add_param("w", p.data(), DType::f32, {n});
        for (const auto& g : grads) opt.step({g.data()});
        if (first.empty())
          first = p;
        else
          EXPECT_TRUE(bitwise_equal(p, first))
              << algorithm << " on " << cpu::isa_name(isa) << " with " << threads
              << " threads: " << first_difference(p, first);
      }
    }
  }
  cpu::set_isa(saved_isa);
  cpu::set_num_threads(saved_threads);
}

}  // namespace
}  // namespace fo::test
