// Every dense optimizer x every option that changes the math x every backend and CPU
// instruction set x sizes that hit every vector tail, 25 steps each, against the
// double-precision reference of tests/reference (written from docs/optimizers.md, sharing no code).
//
// Each step starts the reference from the library's own previous output (converted exactly
// to double), so the comparison measures one step's rounding and nothing accumulated:
// tolerances can then be tight enough that a wrong constant shows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using ref::OptionMap;

struct Case {
  std::string algorithm;
  int variant;
  Device device;
  cpu::Isa isa;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.algorithm << " variant " << c.variant << " on "
      << (c.device == Device::cuda ? "cuda" : cpu::isa_name(c.isa));
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return c.algorithm + "_v" + std::to_string(c.variant) + "_" +
         (c.device == Device::cuda ? std::string("cuda") : cpu::isa_name(c.isa));
}

std::vector<Case> all_cases(Device device) {
  std::vector<Case> cases;
  for (const auto& algo : dense_algorithms()) {
    // Matrix-only algorithms step no vectors: muon_test.cpp holds them to their reference on
    // matrices (DenseReferenceCoverage.MatrixOnlyAlgorithmsHaveTheirOwnTest checks the list).
    if (algo.matrix_only) continue;
    const int nv = static_cast<int>(ref::test_variants(algo.name).size());
    for (int v = 0; v < nv; ++v) {
      if (device == Device::cuda) {
#if defined(FUSEDOPT_EMULATED_DEVICE)
        // On the emulated device (tests/emulation), whose subject is the host code above the
        // kernels (the kernels' option subsets are emulation_test's, bytewise): each
        // algorithm's richest variant, every state on.
        if (v + 1 != nv) continue;
#endif
        cases.push_back({algo.name, v, device, cpu::Isa::scalar});
        continue;
      }
      for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512})
        cases.push_back({algo.name, v, device, isa});
    }
  }
  return cases;
}

// One step of each state's and the param's comparison. With u = 2^-24 (fp32 unit roundoff),
// an output of one step is a chain of at most ~12 fp32 operations whose only cancellation is
// one addition (old value + change): its error is at most a few u of the result plus a few
// u of the change's terms. Hence
//   |got - want| <= 8u*|want| + 16u*max_j|want_j - old_j| + |want - want_rounded|,
// the largest change of the step standing in for the size of the terms, and the last term
// the spread between the reference under exact and under fp32-rounded hyperparameters
// (see the test). A wrong constant
// (a decay of 0.1 * lr applied or not, a bias correction off by one step) moves results by
// orders of magnitude more than this.
constexpr double kU = 1.0 / (1 << 24);

::testing::AssertionResult close_to_reference(const std::string& what,
                                              const std::vector<float>& got,
                                              const std::vector<double>& want,
                                              const std::vector<double>& old,
                                              const std::vector<double>& want_rounded,
                                              const std::vector<unsigned char>* skip) {
  double max_change = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i)
    max_change = std::max(max_change, std::abs(want[i] - old[i]));
  int bad = 0;
  std::ostringstream msg;
  msg.precision(9);
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (skip && (*skip)[i]) continue;
    const double tol = 8 * kU * std::abs(want[i]) + 16 * kU * max_change +
                       std::abs(want[i] - want_rounded[i]) + 1e-37;
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol)) {  // NaN fails
      if (++bad <= 5)
        msg << "\n  " << what << "[" << i << "]: got " << got[i] << ", want " << want[i] << " (was "
            << old[i] << ", err " << err << ", tol " << tol << ")";
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " mismatches in " << what << msg.str();
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

class DenseReference : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const Case& c = GetParam();
    if (c.device == Device::cuda && cuda_devices() == 0)
      GTEST_SKIP() << "no CUDA device on this machine";
    if (c.device == Device::cpu && !cpu::isa_supported(c.isa))
      GTEST_SKIP() << "this CPU lacks " << cpu::isa_name(c.isa);
    saved_isa_ = cpu::isa();
    if (c.device == Device::cpu) cpu::set_isa(c.isa);
  }
  void TearDown() override { cpu::set_isa(saved_isa_); }

  cpu::Isa saved_isa_ = cpu::Isa::scalar;
};

/// Twenty-five steps of case `c` at each size in `sizes`, each against the double reference.
void check_against_reference(const Case& c, const std::vector<std::int64_t>& sizes) {
  const OptionMap options = ref::test_variants(c.algorithm)[static_cast<std::size_t>(c.variant)];
  // The kernel computes with fp32 hyperparameters, some rounded from the double options and
  // some derived in double first (1 - beta2 is exact, 1 - fp32(beta2) is not). Both readings
  // are legitimate, so the reference runs under each and the spread between them joins the
  // tolerance: it is how far the rounding of a constant like wd = 0.1 can move a result that
  // a cancellation (g + wd*p -> 0) then amplifies.
  OptionMap rounded;
  for (const auto& algo : dense_algorithms())
    if (algo.name == c.algorithm)
      for (std::size_t k = 0; k < algo.options.size(); ++k) {
        auto it = options.find(algo.options[k]);
        const double v = it != options.end() ? it->second : algo.defaults[k];
        rounded[algo.options[k]] = algo.is_flag[k] ? v : static_cast<double>(static_cast<float>(v));
      }
  auto rng = make_rng();
  constexpr int kSteps = 25;
  for (std::int64_t n : sizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    TestTensor param(c.device, random_floats(rng, static_cast<std::size_t>(n)));
    Optimizer opt(c.algorithm, c.device);
    for (const auto& [key, value] : options) opt.set_option(key, value);
    opt.add_param("w", param.data(), DType::f32, {n});

    const std::vector<std::string> names = ref::state_names(c.algorithm, options);
    ASSERT_EQ(opt.state_names("w"), names);
    std::vector<double> cur_p = to_double(param.values());
    ref::StateMap cur_s;
    for (const auto& s : names) {
      const bool from_param = ref::state_starts_as_param(c.algorithm, s);  // Schedule-Free's z
      cur_s[s] = from_param
                     ? cur_p
                     : std::vector<double>(n, ref::state_initial_value(c.algorithm, options, s));
      const std::vector<double> init_r =
          from_param ? cur_p
                     : std::vector<double>(n, ref::state_initial_value(c.algorithm, rounded, s));
      ASSERT_TRUE(close_to_reference(s + " (initial)", opt.state("w", s), cur_s[s], cur_s[s],
                                     init_r, nullptr));
    }

    for (int t = 1; t <= kSteps; ++t) {
      SCOPED_TRACE("step " + std::to_string(t));
      TestTensor grad(c.device, random_floats(rng, static_cast<std::size_t>(n)));
      opt.step({grad.data()});
      ASSERT_EQ(opt.step_count("w"), t);

      std::vector<double> want_p = cur_p;
      ref::StateMap want_s = cur_s;
      std::vector<unsigned char> ambiguous;
      const std::vector<double> g = to_double(grad.values());
      ref::step(c.algorithm, options, t, want_p, g, want_s, &ambiguous);
      std::vector<double> want_p_r = cur_p;
      ref::StateMap want_s_r = cur_s;
      ref::step(c.algorithm, rounded, t, want_p_r, g, want_s_r);
      const auto n_ambiguous = std::count(ambiguous.begin(), ambiguous.end(), 1);
      ASSERT_LE(n_ambiguous, n / 1000 + 2) << "too many sign decisions at rounding level";

      const std::vector<float> got_p = param.values();
      ASSERT_TRUE(close_to_reference("param", got_p, want_p, cur_p, want_p_r, &ambiguous));
      for (const auto& s : names) {
        std::vector<float> got(static_cast<std::size_t>(n), std::nanf(""));  // poisoned
        opt.get_state("w", s, got.data(), n);
        ASSERT_TRUE(close_to_reference(s, got, want_s[s], cur_s[s], want_s_r[s], &ambiguous));
        cur_s[s] = to_double(got);
      }
      cur_p = to_double(got_p);
      ASSERT_TRUE(grad.guards_intact()) << "the grad was written";
    }
    ASSERT_TRUE(param.guards_intact()) << "a write landed outside the param";
  }
}

// Every tail of every width (1, 8, 16) and a medium odd size that spans many vectors, on one
// thread (below the threading threshold).
TEST_P(DenseReference, TwentyFiveStepsMatchDoubleReference) {
#if defined(FUSEDOPT_EMULATED_DEVICE)
  // On the emulated device: an empty tensor, one element, a tail and many vectors (the
  // kernels' every tail is emulation_test's, bytewise).
  if (GetParam().device == Device::cuda)
    return check_against_reference(GetParam(), {0, 1, 9, 4099});
#endif
  check_against_reference(GetParam(), {0, 1, 2, 7, 8, 9, 15, 16, 17, 4099});
}

// A large odd size, split over threads, on the GPU and the CPU's best ISA (the other ISAs are
// held bitwise to it at that size by determinism_test), for the cases large_cases() picks. Tens of
// seconds per case on two cores: ctest runs these under the label `large` (CI runs them; the
// README's test command leaves them out). FUSEDOPT_TEST_LARGE_N shrinks the size where every access
// costs more (the sanitizer presets set it); it stays large and odd.
using DenseReferenceLarge = DenseReference;
TEST_P(DenseReferenceLarge, TwentyFiveStepsMatchDoubleReference) {
  const char* env = std::getenv("FUSEDOPT_TEST_LARGE_N");
  check_against_reference(GetParam(), {env ? std::strtoll(env, nullptr, 10) | 1 : 1000003});
}

std::vector<Case> large_cases(Device device) {
  std::vector<Case> out;
  // On the CPU: the best ISA, and each algorithm's richest variant (every state on). What the
  // large size adds is the split over threads and blocks, which is the same for every option
  // set; each variant's own loop is held to the reference at every tail by the small sizes.
  // On CUDA (the GPU suite): every variant, each one's launch and state subset.
  for (const Case& c : all_cases(device)) {
    const bool richest = c.variant + 1 == static_cast<int>(ref::test_variants(c.algorithm).size());
    if (c.device == Device::cuda || (c.isa == cpu::best_isa() && richest)) out.push_back(c);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cpu, DenseReference, ::testing::ValuesIn(all_cases(Device::cpu)),
                         case_name);
INSTANTIATE_TEST_SUITE_P(Cuda, DenseReference, ::testing::ValuesIn(all_cases(Device::cuda)),
                         case_name);
INSTANTIATE_TEST_SUITE_P(Cpu, DenseReferenceLarge, ::testing::ValuesIn(large_cases(Device::cpu)),
                         case_name);
INSTANTIATE_TEST_SUITE_P(Cuda, DenseReferenceLarge, ::testing::ValuesIn(large_cases(Device::cuda)),
                         case_name);

TEST(DenseReferenceCoverage, EveryOptionIsExercised) {
  for (const auto& algo : dense_algorithms()) {
    SCOPED_TRACE(algo.name);
    const std::vector<OptionMap>* variants = nullptr;
    ASSERT_NO_THROW(variants = &ref::test_variants(algo.name))
        << "give " << algo.name << " a reference with test variants (tests/reference)";
    for (std::size_t k = 0; k < algo.options.size(); ++k) {
      // Row-wise forms have no dense step: sparse_test.cpp runs them against the reference.
      if (algo.options[k] == "rowwise") continue;
      bool exercised = false;
      for (const auto& v : *variants) {
        auto o = v.find(algo.options[k]);
        exercised = exercised || (o != v.end() && o->second != algo.defaults[k]);
      }
      EXPECT_TRUE(exercised) << "option " << algo.options[k] << " never leaves its default";
    }
    // The last variant switches on every state the library lists (tests that need all of
    // an algorithm's states use it).
    std::size_t states = ref::state_names(algo.name, variants->back()).size();
    try {  // an algorithm with factored states keeps others on matrices (adafactor_test.cpp)
      states += ref::factored_state_names(algo.name, {2, 2}).size();
    } catch (const std::invalid_argument&) {
    }
    EXPECT_EQ(states, algo.states.size());
  }
}

// The algorithms all_cases() leaves out, each with the test that steps it instead: a new
// matrix-only algorithm fails here until it has one.
TEST(DenseReferenceCoverage, MatrixOnlyAlgorithmsHaveTheirOwnTest) {
  const std::map<std::string, std::string> own = {{"muon", "muon_test.cpp"}};
  for (const auto& algo : dense_algorithms())
    if (algo.matrix_only) {
      EXPECT_TRUE(own.count(algo.name)) << algo.name << " steps matrices only: give it a test";
    }
}

TEST(DenseReferenceCoverage, DefaultsMatchSpec) {
  for (const auto& algo : dense_algorithms()) {
    const OptionMap spec = ref::defaults(algo.name);
    ASSERT_EQ(spec.size(), algo.options.size()) << algo.name;
    for (std::size_t k = 0; k < algo.options.size(); ++k)
      EXPECT_EQ(spec.at(algo.options[k]), algo.defaults[k]) << algo.name << "." << algo.options[k];
  }
}

}  // namespace
}  // namespace fo::test
