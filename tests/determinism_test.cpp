// Bitwise reproducibility: every thread count, every CPU instruction set and any alignment
// of the tensor give exactly the same params and state.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

struct StepResult {
  std::vector<float> param;
  std::vector<std::vector<float>> states;
};

// Five steps of `algorithm` with its options, the tensor placed `offset` floats into its
// allocation, on the current ISA and thread count.
StepResult run_steps(const std::string& algorithm,
                     const std::vector<std::pair<std::string, double>>& opts,
                     const std::vector<float>& p0, const std::vector<std::vector<float>>& grads,
                     std::size_t offset) {
  std::vector<float> storage(p0.size() + offset);
  std::copy(p0.begin(), p0.end(), storage.begin() + static_cast<std::ptrdiff_t>(offset));
  float* p = storage.data() + offset;
  Optimizer opt(algorithm);
  for (const auto& [k, v] : opts) opt.set_option(k, v);
  opt.add_param("w", p, DType::f32, {static_cast<std::int64_t>(p0.size())});
  for (const auto& g : grads) opt.step({g.data()});
  StepResult r;
  r.param.assign(p, p + p0.size());
  for (const auto& s : opt.state_names("w")) r.states.push_back(opt.state("w", s));
  return r;
}

// Options that switch on every state of each algorithm.
std::vector<std::pair<std::string, double>> rich_options(const std::string& algorithm) {
  if (algorithm == "sgd") return {{"momentum", 0.9}, {"nesterov", 1}, {"weight_decay", 0.01}};
  if (algorithm == "rmsprop") return {{"momentum", 0.9}, {"centered", 1}};
  if (algorithm == "adam" || algorithm == "adamw") return {{"amsgrad", 1}, {"weight_decay", 0.01}};
  if (algorithm == "lion") return {{"weight_decay", 0.1}};
  return {};
}

class Determinism : public ::testing::TestWithParam<std::string> {
 protected:
  void TearDown() override {
    cpu::set_isa(saved_isa_);
    cpu::set_num_threads(saved_threads_);
  }
  cpu::Isa saved_isa_ = cpu::isa();
  int saved_threads_ = cpu::num_threads();
};

TEST_P(Determinism, ThreadsIsasAndAlignmentGiveIdenticalBits) {
  const std::string algorithm = GetParam();
  auto rng = make_rng();
  const char* env = std::getenv("FUSEDOPT_TEST_LARGE_N");  // see dense_reference_test.cpp
  const std::size_t n =
      env ? static_cast<std::size_t>(std::strtoll(env, nullptr, 10) | 1) : 1000003;
  const std::vector<float> p0 = random_floats(rng, n);
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 5; ++t) grads.push_back(random_floats(rng, n));
  const auto opts = rich_options(algorithm);

  cpu::set_isa(cpu::best_isa());
  cpu::set_num_threads(1);
  const StepResult base = run_steps(algorithm, opts, p0, grads, 0);
  auto expect_same = [&](const StepResult& r, const std::string& what) {
    EXPECT_TRUE(bitwise_equal(r.param, base.param))
        << what << ": param " << first_difference(r.param, base.param);
    ASSERT_EQ(r.states.size(), base.states.size());
    for (std::size_t k = 0; k < r.states.size(); ++k)
      EXPECT_TRUE(bitwise_equal(r.states[k], base.states[k]))
          << what << ": state " << k << " " << first_difference(r.states[k], base.states[k]);
  };
  for (int threads : {2, 3}) {
    cpu::set_num_threads(threads);
    expect_same(run_steps(algorithm, opts, p0, grads, 0), std::to_string(threads) + " threads");
  }
  cpu::set_num_threads(2);
  expect_same(run_steps(algorithm, opts, p0, grads, 1), "offset by one float");
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    cpu::set_isa(isa);
    expect_same(run_steps(algorithm, opts, p0, grads, 3), cpu::isa_name(isa));
  }
}

std::vector<std::string> algorithm_names() {
  std::vector<std::string> v;
  for (const auto& a : dense_algorithms()) v.push_back(a.name);
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, Determinism, ::testing::ValuesIn(algorithm_names()),
                         [](const auto& param_info) { return param_info.param; });

}  // namespace
}  // namespace fo::test
