// Bad input gets a clear error and changes nothing: after each rejected call the params, the
// state, the step counts and the options are exactly what they were.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

/// An optimizer with two stepped params, and a snapshot of everything it holds.
class Stepped {
 public:
  explicit Stepped(const std::string& algorithm,
                   const std::vector<std::pair<std::string, double>>& opts = {})
      : opt(algorithm) {
    auto rng = make_rng(algorithm);
    a = random_floats(rng, 37);
    b = random_floats(rng, 1000);
    ga = random_floats(rng, 37);
    gb = random_floats(rng, 1000);
    for (const auto& [k, v] : opts) opt.set_option(k, v);
    opt.add_param("a", a.data(), DType::f32, shape_for(algorithm, {37}));
    opt.add_param("b", b.data(), DType::f32, {10, 100});
    opt.step({ga.data(), gb.data()});
    opt.step({ga.data(), gb.data()});
    before = snapshot();
  }

  std::vector<std::vector<float>> snapshot() const {
    std::vector<std::vector<float>> s = {a, b};
    for (const char* name : {"a", "b"}) {
      for (const auto& st : opt.state_names(name)) s.push_back(opt.state(name, st));
      s.push_back({static_cast<float>(opt.step_count(name))});
    }
    for (const auto& key : options()) s.push_back({static_cast<float>(opt.option(key))});
    return s;
  }
  std::vector<std::string> options() const {
    for (const auto& d : dense_algorithms())
      if (d.name == opt.algorithm()) return d.options;
    return {};
  }
  void expect_unchanged(const std::string& what) const {
    const auto now = snapshot();
    ASSERT_EQ(now.size(), before.size()) << what;
    for (std::size_t i = 0; i < now.size(); ++i)
      EXPECT_TRUE(bitwise_equal(now[i], before[i]))
          << what << ": item " << i << " changed, " << first_difference(now[i], before[i]);
  }

  Optimizer opt;
  std::vector<float> a, b, ga, gb;
  std::vector<std::vector<float>> before;
};

template <class F>
void expect_error(F&& f, StatusCode code, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not mention '" << needle << "'";
  }
}

struct BadOption {
  std::string algorithm, key;
  double value;
  std::string needle;
};

TEST(Validation, InvalidOptionsAreRejectedAndChangeNothing) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<BadOption> cases = {
      {"sgd", "lr", -1e-3, "lr"},
      {"sgd", "momentum", -0.1, "momentum"},
      {"sgd", "weight_decay", -1, "weight_decay"},
      {"sgd", "nesterov", 1, "nesterov"},  // momentum is 0
      {"sgd", "nesterov", 0.5, "flag"},
      {"sgd", "beta1", 0.9, "no option 'beta1'"},
      {"adagrad", "lr_decay", -1, "lr_decay"},
      {"adagrad", "eps", -1e-10, "eps"},
      {"adagrad", "initial_accumulator_value", -1, "initial_accumulator_value"},
      {"adadelta", "rho", 1.0, "rho"},
      {"adadelta", "rho", -0.1, "rho"},
      {"rmsprop", "alpha", 1.0, "alpha"},
      {"rmsprop", "momentum", -1, "momentum"},
      {"adam", "beta1", 1.0, "beta1"},
      {"adam", "beta2", -0.5, "beta2"},
      {"adam", "eps", -1, "eps"},
      {"adam", "lr", nan, "finite"},
      {"adam", "lr", inf, "finite"},
      {"adam", "amsgrad", 2, "flag"},
      {"adamw", "weight_decay", -0.01, "weight_decay"},
      {"adamw", "momentum", 0.9, "no option"},
      {"rprop", "eta_minus", 1.0, "eta_minus"},
      {"rprop", "eta_minus", 0.0, "eta_minus"},
      {"rprop", "eta_plus", 1.0, "eta_plus"},
      {"rprop", "step_size_min", 100, "step_size_min"},
      {"rprop", "step_size_max", -inf, "finite"},
      {"lion", "beta2", 1.5, "beta2"},
      {"lion", "lr", -1, "lr"},
  };
  // Every algorithm rejects non-finite values of each real option and unknown keys.
  for (const auto& d : dense_algorithms()) {
    cases.push_back({d.name, "no_such_option", 1.0, "no option"});
    for (std::size_t k = 0; k < d.options.size(); ++k)
      if (!d.is_flag[k]) cases.push_back({d.name, d.options[k], nan, "finite"});
  }
  for (const auto& c : cases) {
    SCOPED_TRACE(c.algorithm + "." + c.key + " = " + std::to_string(c.value));
    Stepped s(c.algorithm);
    expect_error([&] { s.opt.set_option(c.key, c.value); }, StatusCode::invalid_argument, c.needle);
    expect_error([&] { s.opt.set_param_option("b", c.key, c.value); }, StatusCode::invalid_argument,
                 c.needle);
    s.expect_unchanged("after the rejected option");
  }
}

TEST(Validation, NesterovNeedsMomentumWithoutDampening) {
  Stepped s("sgd", {{"momentum", 0.9}, {"dampening", 0.1}});
  expect_error([&] { s.opt.set_option("nesterov", 1); }, StatusCode::invalid_argument,
               "nesterov requires momentum > 0 and dampening == 0");
  s.expect_unchanged("nesterov with dampening");
}

TEST(Validation, StateLayoutIsFixedOnceAParamHasStepped) {
  Stepped s("adam");
  expect_error([&] { s.opt.set_option("amsgrad", 1); }, StatusCode::invalid_argument,
               "max_exp_avg_sq");
  s.expect_unchanged("amsgrad after stepping");
  // Before any step the layout may still change.
  Optimizer fresh("sgd");
  std::vector<float> w(8, 1.0f), g(8, 0.5f);
  fresh.add_param("w", w.data(), DType::f32, {8});
  fresh.set_option("momentum", 0.9);
  EXPECT_EQ(fresh.state_names("w"), std::vector<std::string>{"momentum_buffer"});
  fresh.step({g.data()});
  EXPECT_EQ(fresh.state("w", "momentum_buffer"), g);  // first step: the buffer is g
}

TEST(Validation, BadParamsAreRejected) {
  Stepped s("adam");
  std::vector<float> buf(64);
  auto add = [&](const std::string& name, void* data, DType dtype,
                 std::vector<std::int64_t> shape) {
    return [&s, name, data, dtype, shape] { s.opt.add_param(name, data, dtype, shape); };
  };
  expect_error(add("a", buf.data(), DType::f32, {4}), StatusCode::invalid_argument, "already");
  expect_error(add("", buf.data(), DType::f32, {4}), StatusCode::invalid_argument, "empty");
  expect_error(add("c", nullptr, DType::f32, {4}), StatusCode::invalid_argument, "null");
  expect_error(add("c", buf.data(), DType::f32, {4, -1}), StatusCode::invalid_argument, "negative");
  expect_error(add("c", reinterpret_cast<char*>(buf.data()) + 1, DType::f32, {4}),
               StatusCode::invalid_argument, "aligned");
  expect_error(add("c", buf.data(), DType::i32, {4}), StatusCode::invalid_argument,
               "not a floating type");
  expect_error(add("c", buf.data(), static_cast<DType>(42), {4}), StatusCode::invalid_argument,
               "unknown dtype");
  expect_error(add("c", buf.data(), DType::f32, {1LL << 40, 1LL << 40}),
               StatusCode::invalid_argument, "overflows");
  expect_error(add(std::string(5000, 'x'), buf.data(), DType::f32, {4}),
               StatusCode::invalid_argument, "at most 4096 bytes");
  expect_error(add("c", buf.data(), DType::f32, std::vector<std::int64_t>(17, 1)),
               StatusCode::invalid_argument, "at most 16 dimensions");
  EXPECT_EQ(s.opt.num_params(), 2u);
  expect_error([&] { s.opt.step_count("c"); }, StatusCode::invalid_argument, "no param named");
  s.expect_unchanged("after rejected params");
}

TEST(Validation, BadStepsChangeNothing) {
  Stepped s("rmsprop", {{"momentum", 0.9}, {"centered", 1}});
  std::vector<float> g(1001);
  const float* misaligned =
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(g.data()) + 2);
  // The first param's grad is fine; the second's is misaligned: neither param moves.
  expect_error([&] { s.opt.step({s.ga.data(), misaligned}); }, StatusCode::invalid_argument, "'b'");
  expect_error([&] { s.opt.step({s.ga.data()}); }, StatusCode::invalid_argument, "1 grads for 2");
  expect_error([&] { s.opt.step(static_cast<const void* const*>(nullptr)); },
               StatusCode::invalid_argument, "null");
  s.expect_unchanged("after rejected steps");
}

TEST(Validation, BadStateQueriesAreRejected) {
  Stepped s("adam");
  std::vector<float> out(37, 7.0f);
  expect_error([&] { s.opt.get_state("a", "max_exp_avg_sq", out.data(), 37); },
               StatusCode::invalid_argument, "no state 'max_exp_avg_sq'");
  expect_error([&] { s.opt.get_state("a", "exp_avg", out.data(), 36); },
               StatusCode::invalid_argument, "37 values");
  expect_error([&] { s.opt.get_state("a", "exp_avg", nullptr, 37); }, StatusCode::invalid_argument,
               "null");
  expect_error([&] { s.opt.get_state("zz", "exp_avg", out.data(), 37); },
               StatusCode::invalid_argument, "no param named 'zz'");
  EXPECT_EQ(out, std::vector<float>(37, 7.0f));
  s.expect_unchanged("after rejected queries");
}

TEST(Validation, NullGradSkipsParamStateAndStepCount) {
  Stepped s("adamw");
  s.opt.step({nullptr, s.gb.data()});
  const auto now = s.snapshot();
  EXPECT_TRUE(bitwise_equal(now[0], s.before[0])) << "param a moved";
  EXPECT_EQ(s.opt.step_count("a"), 2);
  EXPECT_EQ(s.opt.step_count("b"), 3);
  EXPECT_FALSE(bitwise_equal(now[1], s.before[1])) << "param b did not move";
}

TEST(Validation, PerParamOverridesAffectOnlyThatParam) {
  auto rng = make_rng();
  const auto p = random_floats(rng, 100), g = random_floats(rng, 100);
  std::vector<float> x = p, y = p, z = p;
  Optimizer both("adam");
  both.set_option("lr", 0.01);
  both.add_param("x", x.data(), DType::f32, {100});
  both.add_param("y", y.data(), DType::f32, {100});
  both.set_param_option("y", "lr", 0.5);
  both.set_option("beta1", 0.8);  // a default set later still reaches both params
  both.step({g.data(), g.data()});
  EXPECT_EQ(both.param_option("y", "lr"), 0.5);
  EXPECT_EQ(both.param_option("y", "beta1"), 0.8);
  EXPECT_EQ(both.param_option("x", "lr"), 0.01);

  Optimizer alone("adam");
  alone.set_option("lr", 0.5);
  alone.set_option("beta1", 0.8);
  alone.add_param("z", z.data(), DType::f32, {100});
  alone.step({g.data()});
  EXPECT_TRUE(bitwise_equal(y, z)) << first_difference(y, z);
  EXPECT_FALSE(bitwise_equal(x, z));
}

TEST(Validation, UnknownAlgorithmAndMissingDevice) {
  expect_error([] { Optimizer("no_such_optimizer"); }, StatusCode::invalid_argument, "known: sgd");
  if (test::cuda_devices() == 0) {  // nothing to reject where a GPU exists
    try {
      Optimizer("adam", Device::cuda);
      ADD_FAILURE() << "a CUDA optimizer was created without a GPU";
    } catch (const Error& e) {
      EXPECT_TRUE(e.code() == StatusCode::unsupported || e.code() == StatusCode::invalid_argument)
          << e.what();
    }
  }
  expect_error([] { Optimizer("adam", Device::cpu, 1); }, StatusCode::invalid_argument,
               "device index");
  expect_error([] { cpu::set_num_threads(0); }, StatusCode::invalid_argument, "thread count");
}

TEST(Validation, FusedStepChecksItsBuffers) {
  std::vector<float> p(16, 1.0f), g(16, 1.0f), m(16, 0.0f), v(16, 0.0f);
  const std::vector<float> p0 = p;
  Adam::Options o;
  auto call = [&](DenseTensors t, std::int64_t step = 1) {
    return [t, step, o] { fused_step<Adam>(o, step, t); };
  };
  DenseTensors good;
  good.param = p.data();
  good.grad = g.data();
  good.states[0] = m.data();
  good.states[1] = v.data();
  good.numel = 16;
  DenseTensors t = good;
  t.param = nullptr;
  expect_error(call(t), StatusCode::invalid_argument, "param is null");
  t = good;
  t.states[1] = nullptr;
  expect_error(call(t), StatusCode::invalid_argument, "state exp_avg_sq is null");
  t = good;
  t.numel = -1;
  expect_error(call(t), StatusCode::invalid_argument, "numel");
  t = good;
  t.grad_dtype = DType::bf16;
  expect_error(call(t), StatusCode::invalid_argument, "grads must be float32 or the param's");
  t = good;
  t.state_dtype = DType::f16;
  expect_error(call(t), StatusCode::invalid_argument, "states must be float32 or bfloat16");
  t = good;
  t.master = m.data();
  expect_error(call(t), StatusCode::invalid_argument, "master weights belong to");
  expect_error(call(good, 0), StatusCode::invalid_argument, "step must be >= 1");
  Adam::Options bad;
  bad.beta2 = 1.0;
  expect_error([&] { fused_step<Adam>(bad, 1, good); }, StatusCode::invalid_argument, "beta2");
  EXPECT_EQ(p, p0);
  EXPECT_EQ(m, std::vector<float>(16, 0.0f));
  fused_step<Adam>(o, 1, good);  // and the good call works: adam's first step moves by ~lr
  for (float x : p) EXPECT_NEAR(x, 1.0f - 1e-3f, 1e-6f);
}

}  // namespace
}  // namespace fo::test
