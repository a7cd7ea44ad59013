// The weight EMA (step setting ema_decay, docs/optimizers.md "Weight EMA") on the CPU: against
// the double reference of tests/reference every step, across instruction sets and threads,
// swap and copy into the params, checkpoints, the refusals, the non-finite skip, and the
// stateless layer's EMA buffer. The CUDA kernel's EMA is compared with the CPU's bytewise in
// tests/emulation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // fp32 unit roundoff
const float kPoison = std::numeric_limits<float>::quiet_NaN();

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

/// One EMA update (three fp32 operations, and w = 1 - decay rounded once) against the double
/// formula from the same previous EMA and the same new param:
///   |got - want| <= 4u * (|want| + |param - ema_before|).
/// A wrong weight (decay for 1 - decay), a missed step or an EMA of the old param is off by
/// a large part of |param - ema_before|.
::testing::AssertionResult close_to_formula(const std::vector<float>& got,
                                            const std::vector<double>& want,
                                            const std::vector<double>& before,
                                            const std::vector<double>& param) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "sizes differ";
  int bad = 0;
  std::ostringstream msg;
  msg.precision(9);
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double tol = 4 * kU * (std::abs(want[i]) + std::abs(param[i] - before[i])) + 1e-37;
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol) && ++bad <= 5)  // NaN (a poisoned value never written) fails
      msg << "\n  ema[" << i << "]: got " << got[i] << ", want " << want[i] << " (was " << before[i]
          << ", param " << param[i] << ", tol " << tol << ")";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " mismatches" << msg.str();
}

/// get_state("ema") into a poisoned buffer: every element must be written.
std::vector<float> ema_of(const Optimizer& opt, const std::string& name) {
  std::vector<float> out(static_cast<std::size_t>(opt.numel(name)), kPoison);
  opt.get_state(name, "ema", out.data(), static_cast<std::int64_t>(out.size()));
  return out;
}

class WeightEma : public ::testing::Test {
 protected:
  void TearDown() override {
    cpu::set_isa(saved_isa_);
    cpu::set_num_threads(saved_threads_);
  }
  cpu::Isa saved_isa_ = cpu::isa();
  int saved_threads_ = cpu::num_threads();
};

const std::vector<std::int64_t> kSizes = {0, 1, 7, 8, 9, 16, 17, 70001};
const std::vector<std::string> kAlgorithms = {"adam",    "sgd",      "lion", "rmsprop",
                                              "adagrad", "ademamix", "lamb", "lars"};

TEST_F(WeightEma, EveryStepMatchesTheDoubleFormulaAndLeavesTheStepAlone) {
  auto rng = make_rng();
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    cpu::set_isa(isa);
    for (const std::string& algorithm : kAlgorithms)
      for (double decay : {0.999, 0.9, 0.3}) {  // 0.3: torch's other lerp branch
        const auto options = ref::richest_options(algorithm);
        for (std::int64_t n : kSizes) {
          SCOPED_TRACE(algorithm + " on " + cpu::isa_name(isa) + ", decay " +
                       std::to_string(decay) + ", n = " + std::to_string(n));
          const std::vector<float> p0 = random_floats(rng, static_cast<std::size_t>(n));
          TestTensor with(Device::cpu, p0), without(Device::cpu, p0);
          Optimizer ema(algorithm), plain(algorithm);
          for (const auto& [k, v] : options) {
            ema.set_option(k, v);
            plain.set_option(k, v);
          }
          ema.set_option("ema_decay", decay);
          ema.add_param("w", with.data(), DType::f32, {n});
          plain.add_param("w", without.data(), DType::f32, {n});
          // Before the first step the EMA is the param.
          ASSERT_TRUE(bitwise_equal(ema_of(ema, "w"), p0));
          std::vector<double> before = to_double(p0);
          for (int t = 1; t <= 8; ++t) {
            SCOPED_TRACE("step " + std::to_string(t));
            const std::vector<float> g = random_floats(rng, static_cast<std::size_t>(n));
            ema.step({g.data()});
            plain.step({g.data()});
            // The EMA changes nothing of the step itself.
            ASSERT_TRUE(bitwise_equal(with.values(), without.values()))
                << first_difference(with.values(), without.values());
            for (const auto& s : plain.state_names("w"))
              ASSERT_TRUE(bitwise_equal(ema.state("w", s), plain.state("w", s))) << s;
            ASSERT_TRUE(with.guards_intact());
            const std::vector<double> param = to_double(with.values());
            std::vector<double> want = before;
            ref::ema_update(want, param, decay);
            const std::vector<float> got = ema_of(ema, "w");
            ASSERT_TRUE(close_to_formula(got, want, before, param));
            before = to_double(got);  // the next step starts from the library's EMA
          }
        }
      }
  }
}

/// Steps of adam with an EMA over params that hit every tail, as bits: params and every state.
std::vector<std::vector<float>> run_adam_with_ema(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Optimizer opt("adamw");
  opt.set_option("ema_decay", 0.99);
  std::vector<std::vector<float>> params;
  const std::vector<std::int64_t> sizes = {1, 7, 9, 70001, 131075};
  params.reserve(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    params.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
    opt.add_param("p" + std::to_string(i), params.back().data(), DType::f32, {sizes[i]});
  }
  for (int t = 0; t < 5; ++t) {
    std::vector<std::vector<float>> g;
    std::vector<const void*> ptrs;
    for (auto n : sizes) g.push_back(random_floats(rng, static_cast<std::size_t>(n)));
    for (const auto& x : g) ptrs.push_back(x.data());
    opt.step(ptrs.data());
  }
  std::vector<std::vector<float>> all = params;
  for (std::size_t i = 0; i < sizes.size(); ++i)
    for (const auto& s : opt.state_names("p" + std::to_string(i)))
      all.push_back(opt.state("p" + std::to_string(i), s));
  return all;
}

TEST_F(WeightEma, ThreadsAndIsasGiveIdenticalBits) {
  const std::uint64_t seed = make_rng()();
  cpu::set_isa(cpu::Isa::scalar);
  cpu::set_num_threads(1);
  const auto want = run_adam_with_ema(seed);
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    cpu::set_isa(isa);
    for (int threads : {1, 2, 3}) {
      cpu::set_num_threads(threads);
      expect_same(run_adam_with_ema(seed), want,
                  std::string(cpu::isa_name(isa)) + ", " + std::to_string(threads) + " threads");
    }
  }
}

struct Stepped {
  std::vector<float> a, b, fresh;  // two stepped params and one never stepped
  Optimizer opt{"adam"};
  Stepped(std::mt19937_64& rng, int steps) {
    a = random_floats(rng, 37);
    b = random_floats(rng, 4099);
    fresh = random_floats(rng, 5);
    opt.set_option("ema_decay", 0.9);
    opt.add_param("a", a.data(), DType::f32, {37});
    opt.add_param("b", b.data(), DType::f32, {4099});
    opt.add_param("fresh", fresh.data(), DType::f32, {5});
    for (int t = 0; t < steps; ++t) {
      const auto ga = random_floats(rng, 37), gb = random_floats(rng, 4099);
      opt.step({ga.data(), gb.data(), nullptr});
    }
  }
};

TEST_F(WeightEma, SwapExchangesBitwiseAndTwiceRestores) {
  auto rng = make_rng();
  Stepped s(rng, 6);
  const auto a0 = s.a, b0 = s.b, fresh0 = s.fresh;
  const auto ea = ema_of(s.opt, "a"), eb = ema_of(s.opt, "b");
  ASSERT_FALSE(bitwise_equal(ea, a0)) << "six steps moved nothing: the test could not fail";
  s.opt.swap_ema();
  EXPECT_TRUE(bitwise_equal(s.a, ea)) << first_difference(s.a, ea);
  EXPECT_TRUE(bitwise_equal(s.b, eb)) << first_difference(s.b, eb);
  EXPECT_TRUE(bitwise_equal(ema_of(s.opt, "a"), a0));
  EXPECT_TRUE(bitwise_equal(ema_of(s.opt, "b"), b0));
  EXPECT_TRUE(bitwise_equal(s.fresh, fresh0)) << "a param that never stepped is its own EMA";
  s.opt.swap_ema();
  EXPECT_TRUE(bitwise_equal(s.a, a0)) << first_difference(s.a, a0);
  EXPECT_TRUE(bitwise_equal(s.b, b0)) << first_difference(s.b, b0);
  EXPECT_TRUE(bitwise_equal(ema_of(s.opt, "a"), ea));
  EXPECT_TRUE(bitwise_equal(ema_of(s.opt, "b"), eb));
}

TEST_F(WeightEma, CopyIntoTheParamsKeepsTheEma) {
  auto rng = make_rng();
  Stepped s(rng, 4);
  const auto ea = ema_of(s.opt, "a"), eb = ema_of(s.opt, "b"), fresh0 = s.fresh;
  ASSERT_FALSE(bitwise_equal(ea, s.a));
  s.opt.copy_ema_to_params();
  EXPECT_TRUE(bitwise_equal(s.a, ea)) << first_difference(s.a, ea);
  EXPECT_TRUE(bitwise_equal(s.b, eb)) << first_difference(s.b, eb);
  EXPECT_TRUE(bitwise_equal(ema_of(s.opt, "a"), ea));
  EXPECT_TRUE(bitwise_equal(ema_of(s.opt, "b"), eb));
  EXPECT_TRUE(bitwise_equal(s.fresh, fresh0));
}

TEST_F(WeightEma, CheckpointResumeEqualsNeverStopping) {
  auto rng = make_rng();
  const std::string path = ::testing::TempDir() + "fusedopt_ema_test.ckpt";
  std::mt19937_64 copy = rng;
  Stepped never(rng, 3), resumed(copy, 3);
  ASSERT_TRUE(bitwise_equal(never.b, resumed.b));
  resumed.opt.save(path);
  // A fresh optimizer without ema_decay: the checkpoint's settings come with it.
  std::vector<float> a = resumed.a, b = resumed.b, fresh = resumed.fresh;
  Optimizer loaded("adam");
  loaded.add_param("a", a.data(), DType::f32, {37});
  loaded.add_param("b", b.data(), DType::f32, {4099});
  loaded.add_param("fresh", fresh.data(), DType::f32, {5});
  loaded.load(path);
  EXPECT_EQ(loaded.option("ema_decay"), 0.9);
  EXPECT_EQ(loaded.state_names("a"), never.opt.state_names("a"));
  for (int t = 0; t < 4; ++t) {
    const auto ga = random_floats(rng, 37), gb = random_floats(rng, 4099),
               gf = random_floats(rng, 5);
    never.opt.step({ga.data(), gb.data(), gf.data()});
    loaded.step({ga.data(), gb.data(), gf.data()});
  }
  EXPECT_TRUE(bitwise_equal(a, never.a));
  EXPECT_TRUE(bitwise_equal(b, never.b));
  EXPECT_TRUE(bitwise_equal(fresh, never.fresh));
  for (const char* name : {"a", "b", "fresh"})
    for (const auto& s : never.opt.state_names(name))
      EXPECT_TRUE(bitwise_equal(loaded.state(name, s), never.opt.state(name, s)))
          << name << " " << s;
  // A checkpoint whose EMA tensor is missing is refused, and the optimizer keeps its own.
  Optimizer without("adam");
  std::vector<float> a2 = a, b2 = b, f2 = fresh;
  without.add_param("a", a2.data(), DType::f32, {37});
  without.add_param("b", b2.data(), DType::f32, {4099});
  without.add_param("fresh", f2.data(), DType::f32, {5});
  const auto g1 = random_floats(rng, 37);
  without.step({g1.data(), nullptr, nullptr});
  without.save(path);  // no EMA: no ema_decay in the file
  loaded.load(path);
  EXPECT_EQ(loaded.option("ema_decay"), 0.0);
  EXPECT_EQ(loaded.state_names("a"), without.state_names("a"));
  std::remove(path.c_str());
}

TEST_F(WeightEma, InvalidDecaysAreRefusedAndNothingChanges) {
  std::vector<float> w = {1.0f, 2.0f};
  Optimizer opt("adam");
  opt.set_option("ema_decay", 0.5);
  opt.add_param("w", w.data(), DType::f32, {2});
  for (double bad : {-0.1, 1.0, 1.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    try {
      opt.set_option("ema_decay", bad);
      ADD_FAILURE() << "ema_decay " << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("ema_decay"), std::string::npos) << e.what();
    }
    EXPECT_EQ(opt.option("ema_decay"), 0.5);
  }
  const std::vector<float> g = {0.5f, -0.5f};
  opt.step({g.data()});
  // After a step the decay may change, but the EMA may not go away (nor come, below).
  opt.set_option("ema_decay", 0.99);
  EXPECT_EQ(opt.option("ema_decay"), 0.99);
  EXPECT_THROW(opt.set_option("ema_decay", 0.0), Error);
  EXPECT_EQ(opt.option("ema_decay"), 0.99);
  EXPECT_EQ(opt.state_names("w"), (std::vector<std::string>{"exp_avg", "exp_avg_sq", "ema"}));

  std::vector<float> v = {1.0f};
  Optimizer off("adam");
  off.add_param("v", v.data(), DType::f32, {1});
  const float gv = 1.0f;
  off.step({&gv});
  EXPECT_THROW(off.set_option("ema_decay", 0.9), Error);
  EXPECT_EQ(off.option("ema_decay"), 0.0);
  EXPECT_EQ(off.state_names("v"), (std::vector<std::string>{"exp_avg", "exp_avg_sq"}));
  EXPECT_THROW(off.swap_ema(), Error);  // no EMA to swap with
  EXPECT_THROW(off.copy_ema_to_params(), Error);
}

TEST_F(WeightEma, ASkippedStepLeavesTheEmaAlone) {
  auto rng = make_rng();
  std::vector<float> w = random_floats(rng, 33);
  Optimizer opt("adam");
  opt.set_option("ema_decay", 0.9);
  opt.set_option("skip_nonfinite", 1);
  opt.add_param("w", w.data(), DType::f32, {33});
  auto g = random_floats(rng, 33);
  opt.step({g.data()});
  const auto w1 = w, e1 = ema_of(opt, "w");
  g[17] = std::numeric_limits<float>::infinity();
  opt.step({g.data()});
  EXPECT_EQ(opt.step_count("w"), 1);
  EXPECT_TRUE(bitwise_equal(w, w1));
  EXPECT_TRUE(bitwise_equal(ema_of(opt, "w"), e1));
  g[17] = 0.25f;
  opt.step({g.data()});
  EXPECT_FALSE(bitwise_equal(ema_of(opt, "w"), e1)) << "a finite step must move the EMA";
}

TEST_F(WeightEma, SparseStepsAreRefused) {
  std::vector<float> table(12, 1.0f), rows(3, 0.5f);
  Optimizer opt("lazyadam");
  opt.set_option("ema_decay", 0.9);
  opt.add_param("emb", table.data(), DType::f32, {4, 3});
  const std::int64_t index = 2;
  try {
    opt.step_sparse("emb", &index, DType::i64, 1, rows.data());
    ADD_FAILURE() << "a sparse step with an EMA was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("ema_decay"), std::string::npos) << e.what();
  }
  EXPECT_EQ(opt.step_count("emb"), 0);
  EXPECT_TRUE(bitwise_equal(table, std::vector<float>(12, 1.0f)));
}

TEST_F(WeightEma, TheStatelessLayerUpdatesTheCallersBufferAsTheOptimizerDoes) {
  auto rng = make_rng();
  for (std::int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const auto p0 = random_floats(rng, static_cast<std::size_t>(n));
    TestTensor param(Device::cpu, p0), ema(Device::cpu, p0);  // guards of canaries around both
    std::vector<float> m(static_cast<std::size_t>(n), 0.0f), v = m, w = p0;
    Optimizer opt("adam");
    opt.set_option("ema_decay", 0.95);
    opt.add_param("w", w.data(), DType::f32, {n});
    for (int t = 1; t <= 3; ++t) {
      const auto g = random_floats(rng, static_cast<std::size_t>(n));
      DenseTensors d;
      d.param = param.data();
      d.grad = g.data();
      d.states[0] = m.data();
      d.states[1] = v.data();
      d.ema = ema.data();
      d.numel = n;
      StepControls c;
      c.ema_decay = 0.95;
      fused_step<Adam>(Adam::Options{}, t, d, Exec{}, c);
      opt.step({g.data()});
    }
    EXPECT_TRUE(param.guards_intact());
    EXPECT_TRUE(ema.guards_intact());
    EXPECT_TRUE(bitwise_equal(ema.values(), ema_of(opt, "w")));
    StepControls bad;
    bad.ema_decay = 1.0;
    DenseTensors d;
    d.param = param.data();
    d.grad = p0.data();
    d.states[0] = m.data();
    d.states[1] = v.data();
    d.ema = ema.data();
    d.numel = n;
    const auto before = ema.values();
    EXPECT_THROW(fused_step<Adam>(Adam::Options{}, 4, d, Exec{}, bad), Error);
    EXPECT_TRUE(bitwise_equal(ema.values(), before));
  }
}

}  // namespace
}  // namespace fo::test
