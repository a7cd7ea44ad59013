// Schedule-Free (sgd_schedule_free, adamw_schedule_free; docs/optimizers.md) beyond the
// per-step comparison with the double reference that dense_reference_test makes: the
// evaluation form (eval() against the double formula, train() restoring the params bitwise),
// the scalar states against the package's running formula, z's start, checkpoints (resume
// equals never stopping, in either mode), skipped steps, the stateless layer and the
// refusals. Each runs on the CPU and, where a GPU is present, on CUDA (the GPU suite); the
// CUDA kernels' bytes against the CPU's are tests/emulation's subject.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // fp32 unit roundoff
const std::vector<std::int64_t> kSizes = {0, 1, 7, 17, 4099};

struct Case {
  std::string algorithm;
  Device device;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.algorithm << (c.device == Device::cuda ? " on cuda" : " on cpu");
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return info.param.algorithm + (info.param.device == Device::cuda ? "_cuda" : "_cpu");
}

std::vector<Case> all_cases() {
  std::vector<Case> out;
  for (Device d : {Device::cpu, Device::cuda})
    for (const char* a : {"sgd_schedule_free", "adamw_schedule_free"}) out.push_back({a, d});
  return out;
}

/// Params of every size in kSizes, with their optimizer (the algorithm's richest test options:
/// decay, warm-up, r, weight_lr_power off their defaults in one variant or another).
struct Training {
  Training(const Case& c, std::mt19937_64& rng, int variant = 1)
      : opt(c.algorithm, c.device), device(c.device) {
    options = ref::test_variants(c.algorithm)[static_cast<std::size_t>(variant)];
    for (const auto& [k, v] : options) opt.set_option(k, v);
    for (std::size_t i = 0; i < kSizes.size(); ++i) {
      params.emplace_back(std::make_unique<TestTensor>(
          device, random_floats(rng, static_cast<std::size_t>(kSizes[i]))));
      opt.add_param("p" + std::to_string(i), params.back()->data(), DType::f32, {kSizes[i]});
    }
  }
  /// One step with fresh gradients from `rng`.
  void step(std::mt19937_64& rng) {
    std::vector<std::unique_ptr<TestTensor>> grads;
    std::vector<const void*> ptrs;
    for (std::int64_t n : kSizes) {
      grads.emplace_back(
          std::make_unique<TestTensor>(device, random_floats(rng, static_cast<std::size_t>(n))));
      ptrs.push_back(grads.back()->data());
    }
    opt.step(ptrs.data());
  }
  /// Every param, state and scalar state, as floats (scalars split into two floats' bits).
  std::vector<std::vector<float>> snapshot() const {
    std::vector<std::vector<float>> out;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      out.push_back(params[i]->values());
      for (const auto& s : opt.state_names(name)) out.push_back(opt.state(name, s));
      for (const auto& s : {"lr_max", "weight_sum"}) {
        const double v = opt.scalar_state(name, s);
        std::vector<float> bits(2);
        std::memcpy(bits.data(), &v, sizeof v);
        out.push_back(bits);
      }
    }
    return out;
  }
  std::vector<std::vector<float>> param_values() const {
    std::vector<std::vector<float>> out;
    for (const auto& p : params) out.push_back(p->values());
    return out;
  }

  ref::OptionMap options;
  Optimizer opt;
  Device device;
  std::vector<std::unique_ptr<TestTensor>> params;
};

class ScheduleFree : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (GetParam().device == Device::cuda && cuda_devices() == 0)
      GTEST_SKIP() << "no CUDA device on this machine";
  }
};

// eval() writes x = lerp(y, z, 1 - 1/beta) (three fp32 operations from y and z: within
// 4u (|x| + |w| |z - y|) of the double formula); a second eval() changes nothing; train()
// puts y back bitwise, a second train() changes nothing; and the run then goes on exactly as
// one that never switched.
TEST_P(ScheduleFree, EvalGivesXAndTrainRestoresYBitwise) {
  const Case& c = GetParam();
  for (int variant : {0, 1, 2}) {
    SCOPED_TRACE("variant " + std::to_string(variant));
    auto rng = make_rng(std::to_string(variant));
    std::mt19937_64 rng2 = rng;
    Training run(c, rng, variant), twin(c, rng2, variant);
    for (int t = 0; t < 5; ++t) {
      std::mt19937_64 g2 = rng;
      run.step(rng);
      twin.step(g2);
    }
    ASSERT_TRUE(run.opt.training());
    const auto y = run.param_values();
    run.opt.eval();
    EXPECT_FALSE(run.opt.training());
    const auto x = run.param_values();
    const ref::OptionMap o = run.options;
    for (std::size_t i = 0; i < kSizes.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      std::vector<double> want(y[i].begin(), y[i].end());
      const std::vector<float> z = run.opt.state(name, "z");
      ref::StateMap states{{"z", std::vector<double>(z.begin(), z.end())}};
      ref::schedule_free_eval(c.algorithm, o, want, states);
      const double beta = c.algorithm == "sgd_schedule_free"
                              ? (o.count("momentum") ? o.at("momentum") : 0.9)
                              : (o.count("beta1") ? o.at("beta1") : 0.9);
      const double w = std::abs(1.0 - 1.0 / beta);
      for (std::size_t j = 0; j < want.size(); ++j) {
        const double tol = 4 * kU * (std::abs(want[j]) + w * std::abs(double(z[j]) - y[i][j]));
        ASSERT_LE(std::abs(double(x[i][j]) - want[j]), tol) << name << "[" << j << "]";
      }
    }
    run.opt.eval();  // already in eval mode: nothing moves
    expect_same(run.param_values(), x, "a second eval()");
    run.opt.train();
    EXPECT_TRUE(run.opt.training());
    expect_same(run.param_values(), y, "train() after eval()");
    run.opt.train();
    expect_same(run.param_values(), y, "a second train()");
    for (int t = 0; t < 3; ++t) {
      std::mt19937_64 g2 = rng;
      run.step(rng);
      twin.step(g2);
    }
    expect_same(run.snapshot(), twin.snapshot(), "steps after eval() and train()");
  }
}

TEST_P(ScheduleFree, AStepInEvalModeIsRefusedAndChangesNothing) {
  auto rng = make_rng();
  Training run(GetParam(), rng);
  run.step(rng);
  run.opt.eval();
  const auto before = run.snapshot();
  try {
    run.step(rng);
    ADD_FAILURE() << "a step in eval mode was taken";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("train()"), std::string::npos) << e.what();
  }
  expect_same(run.snapshot(), before, "a refused step");
  EXPECT_EQ(run.opt.step_count("p1"), 1);
}

// lr_max and weight_sum against the package's per-step formula replayed in double (its
// Python floats): the same operations but t^r and lr^p, which fusedopt computes with its
// portable exp/log (a few ulp).
TEST_P(ScheduleFree, ScalarStatesFollowThePackagesFormula) {
  auto rng = make_rng();
  Training run(GetParam(), rng, 0);
  const double lr = 0.03, warmup = 4, r = 0.5, power = 1.5;
  run.opt.set_option("lr", lr);
  run.opt.set_option("warmup_steps", warmup);
  run.opt.set_option("r", r);
  run.opt.set_option("weight_lr_power", power);
  EXPECT_EQ(run.opt.scalar_state("p2", "lr_max"), -1.0);
  EXPECT_EQ(run.opt.scalar_state("p2", "weight_sum"), 0.0);
  double lr_max = -1.0, weight_sum = 0.0;
  for (int t = 1; t <= 8; ++t) {
    run.step(rng);
    const double lr_t = lr * (t - 1 < warmup ? t / warmup : 1.0);
    lr_max = std::max(lr_max, lr_t);
    weight_sum += std::pow(double(t), r) * std::pow(lr_max, power);
    for (const char* name : {"p0", "p2", "p4"}) {  // the empty param's advance too
      EXPECT_NEAR(run.opt.scalar_state(name, "lr_max"), lr_max, 1e-15 * lr_max) << name << t;
      EXPECT_NEAR(run.opt.scalar_state(name, "weight_sum"), weight_sum, 1e-13 * weight_sum)
          << name << t;
    }
  }
  EXPECT_THROW(run.opt.scalar_state("p0", "exp_avg"), Error);
}

// z starts as the param; the first step averages with weight c = 1, so y becomes z: the
// param equals its z bitwise after that step (y = z0 + (-lr) u and z = z0 - lr u).
TEST_P(ScheduleFree, ZStartsAsTheParamAndTheFirstStepLandsOnIt) {
  auto rng = make_rng();
  Training run(GetParam(), rng, 0);
  for (std::size_t i = 0; i < kSizes.size(); ++i) {
    const std::string name = "p" + std::to_string(i);
    EXPECT_TRUE(bitwise_equal(run.opt.state(name, "z"), run.params[i]->values())) << name;
  }
  run.step(rng);
  for (std::size_t i = 0; i < kSizes.size(); ++i) {
    const std::string name = "p" + std::to_string(i);
    const std::vector<float> z = run.opt.state(name, "z"), p = run.params[i]->values();
    EXPECT_TRUE(bitwise_equal(z, p)) << name << ": " << first_difference(p, z);
  }
}

TEST_P(ScheduleFree, ASkippedStepLeavesTheScalarStates) {
  auto rng = make_rng();
  Training run(GetParam(), rng);
  run.opt.set_option("skip_nonfinite", 1);
  run.step(rng);
  const auto before = run.snapshot();
  std::vector<std::unique_ptr<TestTensor>> grads;
  std::vector<const void*> ptrs;
  for (std::int64_t n : kSizes) {
    std::vector<float> g(static_cast<std::size_t>(n), 1.0f);
    if (n == 7) g[3] = std::numeric_limits<float>::infinity();
    grads.emplace_back(std::make_unique<TestTensor>(run.device, g));
    ptrs.push_back(grads.back()->data());
  }
  run.opt.step(ptrs.data());
  expect_same(run.snapshot(), before, "a skipped step");
}

// Save after some steps (in training mode, and in eval mode), load into a new optimizer over
// copies of the params, and go on: every param, state and scalar state equals, bitwise, a run
// that never stopped.
TEST_P(ScheduleFree, ResumeFromACheckpointEqualsNeverStopping) {
  const Case& c = GetParam();
  for (bool in_eval : {false, true}) {
    SCOPED_TRACE(in_eval ? "saved in eval mode" : "saved in training mode");
    auto rng = make_rng(in_eval ? "eval" : "train");
    std::mt19937_64 rng2 = rng;
    Training run(c, rng), resumed(c, rng2);
    for (int t = 0; t < 4; ++t) run.step(rng);
    if (in_eval) run.opt.eval();
    // One file per process: ctest runs the cases (and the emulated device's) side by side.
    const std::string path = ::testing::TempDir() + "fusedopt_schedule_free_" +
                             std::to_string(::getpid()) + "_" + std::to_string(in_eval) + ".ckpt";
    run.opt.save(path);
    // The resumed run's params: what the user saved with the checkpoint (x in eval mode).
    for (std::size_t i = 0; i < kSizes.size(); ++i) {
      const std::vector<float> v = run.params[i]->values();
      resumed.params[i] = std::make_unique<TestTensor>(c.device, v);
    }
    Optimizer fresh(c.algorithm, c.device);
    for (std::size_t i = 0; i < kSizes.size(); ++i)
      fresh.add_param("p" + std::to_string(i), resumed.params[i]->data(), DType::f32, {kSizes[i]});
    fresh.load(path);
    std::remove(path.c_str());
    resumed.opt = std::move(fresh);
    EXPECT_EQ(resumed.opt.training(), !in_eval);
    expect_same(resumed.snapshot(), run.snapshot(), "right after the load");
    if (in_eval) {
      run.opt.train();
      resumed.opt.train();
      expect_same(resumed.param_values(), run.param_values(), "train() after the load");
    }
    for (int t = 0; t < 4; ++t) {
      std::mt19937_64 g2 = rng;
      run.step(rng);
      resumed.step(g2);
    }
    expect_same(resumed.snapshot(), run.snapshot(), "four steps after the load");
  }
}

INSTANTIATE_TEST_SUITE_P(All, ScheduleFree, ::testing::ValuesIn(all_cases()), case_name);

TEST(ScheduleFreeRefusals, OtherAlgorithmsHaveOneForm) {
  float w[4] = {1, 2, 3, 4};
  Optimizer opt("adam");
  opt.add_param("w", w, DType::f32, {4});
  try {
    opt.eval();
    ADD_FAILURE() << "adam took eval()";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::unsupported);
  }
  EXPECT_THROW(opt.train(), Error);
  EXPECT_TRUE(opt.training());
}

TEST(ScheduleFreeRefusals, InvalidOptionsAreRejected) {
  const std::vector<std::tuple<std::string, std::string, double>> bad = {
      {"sgd_schedule_free", "momentum", 0.0},
      {"sgd_schedule_free", "momentum", 1.0},
      {"sgd_schedule_free", "lr", -1.0},
      {"sgd_schedule_free", "warmup_steps", -1.0},
      {"adamw_schedule_free", "beta1", 0.0},
      {"adamw_schedule_free", "beta2", 1.0},
      {"adamw_schedule_free", "eps", 0.0},
      {"adamw_schedule_free", "r", -0.5},
      {"adamw_schedule_free", "weight_lr_power", -1.0},
      {"adamw_schedule_free", "weight_decay", -1}};
  for (const auto& [algorithm, key, value] : bad) {
    Optimizer opt(algorithm);
    EXPECT_THROW(opt.set_option(key, value), Error) << algorithm << " " << key << "=" << value;
  }
}

// The stateless layer: the scalar states are the caller's (step_scalars names them), z's
// StateSpec says it starts as the param, eval_params by name gives Optimizer::eval()'s bits,
// and a step without its scalars is refused before anything is written.
TEST(ScheduleFreeFunctional, ScalarsStatesAndEvalMatchTheOptimizer) {
  auto rng = make_rng();
  const std::size_t n = 1001;
  const std::vector<float> p0 = random_floats(rng, n);
  const NamedOptions named = {{"weight_decay", 0.1}, {"warmup_steps", 3}};
  const std::vector<ScalarSpec> scalars = step_scalars("adamw_schedule_free");
  ASSERT_EQ(scalars.size(), 2u);
  EXPECT_EQ(scalars[0].name, "lr_max");
  EXPECT_EQ(scalars[0].init, -1.0);
  EXPECT_EQ(scalars[1].name, "weight_sum");
  EXPECT_TRUE(step_scalars("adam").empty());
  const std::vector<StateSpec> specs = step_states("adamw_schedule_free", named);
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_TRUE(specs[0].from_param);
  EXPECT_FALSE(specs[1].from_param);

  std::vector<float> p = p0, z = p0, v(n, 0.0f), q = p0;
  double sc[kMaxScalars] = {scalars[0].init, scalars[1].init};
  Optimizer opt("adamw_schedule_free");
  for (const auto& [k, val] : named) opt.set_option(k, val);
  opt.add_param("w", q.data(), DType::f32, {static_cast<std::int64_t>(n)});
  for (std::int64_t t = 1; t <= 4; ++t) {
    const std::vector<float> g = random_floats(rng, n);
    DenseTensors d;
    d.param = p.data();
    d.grad = g.data();
    d.states[0] = z.data();
    d.states[1] = v.data();
    d.numel = static_cast<std::int64_t>(n);
    d.scalars = sc;
    fused_step_list("adamw_schedule_free", named, &d, &t, 1);
    opt.step({g.data()});
  }
  EXPECT_TRUE(bitwise_equal(p, q)) << first_difference(p, q);
  EXPECT_EQ(sc[1], opt.scalar_state("w", "weight_sum"));

  DenseTensors d;
  d.param = p.data();
  d.states[0] = z.data();
  d.states[1] = v.data();
  d.numel = static_cast<std::int64_t>(n);
  eval_params("adamw_schedule_free", named, &d, 1);
  opt.eval();
  EXPECT_TRUE(bitwise_equal(p, q)) << first_difference(p, q);
  EXPECT_THROW(eval_params("adam", {}, &d, 1), Error);

  const std::vector<float> before = p;
  const std::vector<float> g(n, 1.0f);
  DenseTensors bad = d;
  bad.grad = g.data();
  bad.scalars = nullptr;
  const std::int64_t step = 5;
  try {
    fused_step_list("adamw_schedule_free", named, &bad, &step, 1);
    ADD_FAILURE() << "a step without its scalar states was taken";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("scalar"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(bitwise_equal(p, before));
}

}  // namespace
}  // namespace fo::test
