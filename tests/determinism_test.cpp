// Bitwise reproducibility: every thread count, every CPU instruction set and any alignment
// of the tensor give exactly the same params and state.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
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
  // A matrix-only algorithm (muon) takes the same elements as one row (shape_for): its
  // elementwise passes split over threads as any step's do.
  opt.add_param("w", p, DType::f32, shape_for(algorithm, {static_cast<std::int64_t>(p0.size())}));
  for (const auto& g : grads) opt.step({g.data()});
  StepResult r;
  r.param.assign(p, p + p0.size());
  for (const auto& s : opt.state_names("w")) r.states.push_back(opt.state("w", s));
  return r;
}

// Options that switch on every state of each algorithm: its reference's richest variant.
std::vector<std::pair<std::string, double>> rich_options(const std::string& algorithm) {
  return ref::richest_options(algorithm);
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

// Sparse steps (every sparse algorithm, and adagrad row-wise): duplicates summed and rows
// stepped identically on every thread count and instruction set. Dims 37 and 130 leave
// vector tails and, row-wise, several 32-lane passes.
TEST(SparseDeterminism, ThreadsAndIsasGiveIdenticalBits) {
  const cpu::Isa saved_isa = cpu::isa();
  const int saved_threads = cpu::num_threads();
  auto rng = make_rng();
  std::vector<std::pair<std::string, double>> variants;  // (algorithm, rowwise)
  for (const auto& a : dense_algorithms()) {
    if (!a.sparse) continue;
    variants.emplace_back(a.name, 0.0);
    if (std::find(a.options.begin(), a.options.end(), "rowwise") != a.options.end())
      variants.emplace_back(a.name, 1.0);
  }
  for (const auto& [algorithm, rowwise] : variants) {
    for (std::int64_t dim : {37, 130}) {
      SCOPED_TRACE(algorithm + (rowwise != 0 ? " rowwise" : "") + " dim " + std::to_string(dim));
      const std::int64_t rows = 2000, nnz = 5000;
      const std::vector<float> t0 = random_floats(rng, static_cast<std::size_t>(rows * dim));
      std::vector<std::vector<std::int64_t>> idx(3);
      std::vector<std::vector<float>> g(3);
      for (int t = 0; t < 3; ++t) {
        idx[t].resize(static_cast<std::size_t>(nnz));
        for (auto& i : idx[t]) i = std::uniform_int_distribution<std::int64_t>(0, 499)(rng) * 4;
        g[t] = random_floats(rng, static_cast<std::size_t>(nnz * dim));
      }
      auto run = [&] {
        std::vector<float> table = t0;
        Optimizer opt(algorithm);
        if (rowwise != 0) opt.set_option("rowwise", 1);
        opt.add_param("t", table.data(), DType::f32, {rows, dim});
        for (int t = 0; t < 3; ++t)
          opt.step_sparse("t", idx[t].data(), DType::i64, nnz, g[t].data());
        std::vector<std::vector<float>> all{table};
        for (const auto& st : opt.state_names("t")) all.push_back(opt.state("t", st));
        return all;
      };
      cpu::set_isa(cpu::best_isa());
      cpu::set_num_threads(1);
      const auto base = run();
      for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
        if (!cpu::isa_supported(isa)) continue;
        cpu::set_isa(isa);
        for (int threads : {1, 2, 3}) {
          cpu::set_num_threads(threads);
          const auto got = run();
          for (std::size_t k = 0; k < got.size(); ++k)
            EXPECT_TRUE(bitwise_equal(got[k], base[k]))
                << cpu::isa_name(isa) << ", " << threads << " threads, item " << k << ": "
                << first_difference(got[k], base[k]);
        }
      }
    }
  }
  cpu::set_isa(saved_isa);
  cpu::set_num_threads(saved_threads);
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
