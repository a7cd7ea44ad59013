// adafactor's factored second moments (kernels/factored.hpp) on params of two and more
// dimensions: 30 steps against the double reference written from torch.optim.Adafactor, for
// shapes that hit the row lanes' and column segments' tails, batches of matrices, every
// option variant and every CPU instruction set; bits across ISAs and thread counts; zero
// gradients; checkpoints; refusals. (Vector params, the unfactored form, are in
// dense_reference_test with every other algorithm.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using Shape = std::vector<std::int64_t>;

// Shapes: one element, a single row and a single column, row tails of the 32 lanes (31, 33),
// column segments' tails (rows 31, 33, 65), batches of matrices (3-D, 4-D) and one large
// enough to be split over threads.
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> all = {{1, 1},       {1, 37},    {37, 1},   {7, 13},
                                         {31, 33},     {33, 31},   {65, 100}, {3, 40, 70},
                                         {2, 3, 5, 9}, {257, 1031}};
  return all;
}

std::int64_t numel(const Shape& s) {
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

std::string shape_name(const Shape& s) {
  std::string out;
  for (auto d : s) out += (out.empty() ? "" : "x") + std::to_string(d);
  return out;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The tolerance of one step started from the library's previous output (as in
// dense_reference_test): each output is a short fp32 chain (the blend: 3 roundings; the
// estimate: 2; the direction: 2; the param: the decay product and one fma) around sums and
// ratios taken in double, whose own error is far below 2^-24. Hence
//   |got - want| <= 16u |want| + 32u max_j |want_j - old_j|.
// A wrong constant (the clip threshold, rho's min, the eps1 clamp of the row mean, a lerp
// weight of t^-0.8 instead of 1 - t^-0.8) moves results by far more.
constexpr double kU = 1.0 / (1 << 24);

::testing::AssertionResult close(const std::string& what, const std::vector<float>& got,
                                 const std::vector<double>& want, const std::vector<double>& old) {
  double max_change = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i)
    max_change = std::max(max_change, std::abs(want[i] - old[i]));
  int bad = 0;
  std::ostringstream msg;
  msg.precision(9);
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double tol = 16 * kU * std::abs(want[i]) + 32 * kU * max_change + 1e-37;
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol) && ++bad <= 5)
      msg << "\n  " << what << "[" << i << "]: got " << got[i] << ", want " << want[i] << " (err "
          << err << ", tol " << tol << ")";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " mismatches in " << what << msg.str();
}

class AdafactorIsa : public ::testing::TestWithParam<cpu::Isa> {
 protected:
  void SetUp() override {
    if (!cpu::isa_supported(GetParam()))
      GTEST_SKIP() << "this CPU lacks " << cpu::isa_name(GetParam());
    saved_ = cpu::isa();
    cpu::set_isa(GetParam());
  }
  void TearDown() override { cpu::set_isa(saved_); }
  cpu::Isa saved_ = cpu::Isa::scalar;
};

TEST_P(AdafactorIsa, ThirtyStepsMatchDoubleReference) {
  auto rng = make_rng();
  const auto& variants = ref::test_variants("adafactor");
  for (std::size_t v = 0; v < variants.size(); ++v) {
    for (const Shape& shape : shapes()) {
      SCOPED_TRACE("variant " + std::to_string(v) + ", shape " + shape_name(shape));
      const std::int64_t n = numel(shape);
      std::vector<float> param = random_floats(rng, static_cast<std::size_t>(n));
      Optimizer opt("adafactor");
      for (const auto& [key, value] : variants[v]) opt.set_option(key, value);
      opt.add_param("w", param.data(), DType::f32, shape);
      const std::vector<std::string> names = ref::factored_state_names("adafactor", shape);
      ASSERT_EQ(opt.state_names("w"), names);
      std::vector<double> cur_p = to_double(param);
      ref::StateMap cur_s;
      for (const auto& s : names) {
        const auto size = ref::factored_state_size(s, shape);
        ASSERT_EQ(opt.state_numel("w", s), size) << s;
        cur_s[s].assign(static_cast<std::size_t>(size), 0.0);
      }
      for (int t = 1; t <= 30; ++t) {
        SCOPED_TRACE("step " + std::to_string(t));
        // Gradients of a scale that varies from step to step and from row to row.
        std::vector<float> grad = random_floats(rng, static_cast<std::size_t>(n));
        if (t % 7 == 3)
          for (std::size_t i = 0; i < grad.size(); i += 3) grad[i] *= 100.0f;
        opt.step({grad.data()});
        std::vector<double> want_p = cur_p;
        ref::StateMap want_s = cur_s;
        ref::factored_step("adafactor", variants[v], t, shape, want_p, to_double(grad), want_s);
        ASSERT_TRUE(close("param", param, want_p, cur_p));
        for (const auto& s : names) {
          std::vector<float> got(want_s[s].size(), std::nanf(""));  // poisoned
          opt.get_state("w", s, got.data(), static_cast<std::int64_t>(got.size()));
          ASSERT_TRUE(close(s, got, want_s[s], cur_s[s]));
          cur_s[s] = to_double(got);
        }
        cur_p = to_double(param);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, AdafactorIsa,
                         ::testing::Values(cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512),
                         [](const auto& i) { return std::string(cpu::isa_name(i.param)); });

// Params, row_var and col_var after 5 steps of a batch of matrices large enough to be split
// over threads.
std::vector<std::vector<float>> run_five(const Shape& shape, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> param = random_floats(rng, static_cast<std::size_t>(numel(shape)));
  Optimizer opt("adafactor");
  opt.set_option("weight_decay", 0.01);
  opt.add_param("w", param.data(), DType::f32, shape);
  for (int t = 0; t < 5; ++t) {
    const std::vector<float> grad = random_floats(rng, param.size());
    opt.step({grad.data()});
  }
  return {param, opt.state("w", "row_var"), opt.state("w", "col_var")};
}

TEST(Adafactor, SameBitsOnEveryIsaAndThreadCount) {
  const std::uint64_t seed = run_seed();
  const Shape shape{3, 97, 1500};  // each matrix over 2^17 elements: threads split the passes
  const cpu::Isa saved = cpu::isa();
  const int saved_threads = cpu::num_threads();
  cpu::set_isa(cpu::Isa::scalar);
  cpu::set_num_threads(1);
  const auto want = run_five(shape, seed);
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    for (int threads : {1, 2, 3}) {
      SCOPED_TRACE(std::string(cpu::isa_name(isa)) + ", " + std::to_string(threads) + " threads");
      cpu::set_isa(isa);
      cpu::set_num_threads(threads);
      expect_same(run_five(shape, seed), want, "params and factored states");
    }
  }
  cpu::set_isa(saved);
  cpu::set_num_threads(saved_threads);
}

TEST(Adafactor, ZeroGradientsOnlyDecayTheParam) {
  std::vector<float> param = {1.0f, -2.0f, 3.0f, 0.5f, 0.25f, -1.0f};
  const std::vector<float> before = param;
  Optimizer opt("adafactor");
  opt.set_option("weight_decay", 0.5);
  opt.set_option("lr", 0.1);
  opt.add_param("w", param.data(), DType::f32, {2, 3});
  const std::vector<float> zeros(6, 0.0f);
  opt.step({zeros.data()});
  // u = 0 / sqrt(eps1^2) = 0: the step is the decay alone, p * (1 - lr * wd).
  for (std::size_t i = 0; i < param.size(); ++i)
    EXPECT_EQ(param[i], before[i] * static_cast<float>(1.0 - 0.1 * 0.5)) << i;
  for (const char* s : {"row_var", "col_var"})
    for (float x : opt.state("w", s)) EXPECT_EQ(x, 0.0f) << s;
}

TEST(Adafactor, ResumeFromCheckpointEqualsNeverStopping) {
  auto rng = make_rng();
  const Shape shape{4, 9, 33};
  const std::vector<float> p0 = random_floats(rng, static_cast<std::size_t>(numel(shape)));
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 6; ++t) grads.push_back(random_floats(rng, p0.size()));
  std::vector<float> a = p0, b = p0;
  Optimizer oa("adafactor"), ob("adafactor");
  oa.add_param("w", a.data(), DType::f32, shape);
  ob.add_param("w", b.data(), DType::f32, shape);
  for (int t = 0; t < 3; ++t) oa.step({grads[t].data()}), ob.step({grads[t].data()});
  const std::string path =
      ::testing::TempDir() + "adafactor_resume_" + std::to_string(::getpid()) + ".ckpt";
  oa.save(path);
  std::vector<float> c = b;
  Optimizer oc("adafactor");
  oc.add_param("w", c.data(), DType::f32, shape);
  oc.load(path);
  for (int t = 3; t < 6; ++t) ob.step({grads[t].data()}), oc.step({grads[t].data()});
  EXPECT_TRUE(bitwise_equal(b, c)) << first_difference(c, b);
  for (const char* s : {"row_var", "col_var"})
    EXPECT_TRUE(bitwise_equal(ob.state("w", s), oc.state("w", s))) << s;

  // The same param with its last two dimensions swapped: the factored states would not fit.
  std::vector<float> d = p0;
  Optimizer od("adafactor");
  od.add_param("w", d.data(), DType::f32, {4, 33, 9});
  EXPECT_THROW(od.load(path), Error);
  EXPECT_EQ(od.step_count("w"), 0);
  EXPECT_TRUE(bitwise_equal(d, p0));
  std::remove(path.c_str());
}

TEST(Adafactor, OptionsOutOfRangeAreRefusedAndChangeNothing) {
  Optimizer opt("adafactor");
  std::vector<float> param(12, 1.0f);
  opt.add_param("w", param.data(), DType::f32, {3, 4});
  for (const auto& [key, value] :
       std::vector<std::pair<const char*, double>>{{"lr", -1e-3},
                                                   {"beta2_decay", 0.1},
                                                   {"eps1", -1e-30},
                                                   {"eps2", -1.0},
                                                   {"d", 0.5},
                                                   {"weight_decay", -0.1},
                                                   {"maximize", 2.0}}) {
    SCOPED_TRACE(key);
    const double before = opt.option(key);
    EXPECT_THROW(opt.set_option(key, value), Error);
    EXPECT_EQ(opt.option(key), before);
    EXPECT_THROW(opt.set_param_option("w", key, value), Error);
    EXPECT_EQ(opt.param_option("w", key), before);
  }
}

}  // namespace
}  // namespace fo::test
