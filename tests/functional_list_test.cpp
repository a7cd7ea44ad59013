// fused_step_list, typed and by name, against fused_step on each tensor: bitwise the same params
// and states for every registered algorithm, with tensors at different step counts (params that
// skipped steps), empty tensors and sizes that hit every vector tail; and a rejected list leaves
// every buffer as it was. On CUDA (where a GPU is present) the list is one multi-tensor launch
// sequence; that it equals the CPU's bits is cuda_test's and the emulation tests' subject.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "messages.hpp"  // fusedopt::internal: format_number
#include "test_util.hpp"

namespace fo::test {
namespace {

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

/// Whether a one-element dense step on the CPU takes `named` (muon's ns_bf16 is CUDA's).
bool cpu_takes(const AlgorithmDescription& d, const NamedOptions& named) {
  float p = 1.0f, g = 0.5f, s[kMaxStates] = {};
  double scalars[kMaxScalars] = {};
  DenseTensors t;
  t.param = &p;
  t.grad = &g;
  for (int k = 0; k < kMaxStates; ++k) t.states[k] = &s[k];
  t.numel = 1;
  t.scalars = scalars;
  if (d.matrix_only) t.view = MatrixView{1, 1, 1};
  const std::int64_t step = 1;
  try {
    check_step_list(d.name, named, &t, &step, 1);
    return true;
  } catch (const Error&) {
    return false;
  }
}

/// Options that use as much of an algorithm as a dense CPU step takes: starting from the
/// defaults, each option in turn is switched on (a flag to 1, a zero to 0.1) and kept where
/// the options stay valid for a dense CPU step (nesterov needs dampening 0, rowwise is
/// sparse-only, muon's ns_bf16 is CUDA-only, ...).
NamedOptions rich_options(const AlgorithmDescription& d) {
  NamedOptions named;
  for (std::size_t i = 0; i < d.options.size(); ++i) {
    if (d.options[i] == "lr") continue;
    double value = d.is_flag[i] ? 1.0 : (d.defaults[i] == 0.0 ? 0.1 : d.defaults[i]);
    if (value == d.defaults[i]) continue;
    named.emplace_back(d.options[i], value);
    try {
      step_states(d.name, named);
      if (!cpu_takes(d, named)) named.pop_back();
    } catch (const Error&) {
      named.pop_back();
    }
  }
  return named;
}

struct Buffers {
  std::vector<std::vector<float>> params, grads;
  std::vector<std::vector<float>> states[kMaxStates];
  std::vector<std::vector<double>> scalars;  // per tensor, where the algorithm keeps them
  bool matrix_only = false;                  // muon: each tensor is one row [1, numel]

  std::vector<std::vector<float>> all() const {
    std::vector<std::vector<float>> v = params;
    for (const auto& s : states) v.insert(v.end(), s.begin(), s.end());
    return v;
  }
  DenseTensors tensors(std::size_t i) {
    DenseTensors t;
    t.param = params[i].data();
    t.grad = grads[i].data();
    for (int k = 0; k < kMaxStates; ++k)
      t.states[k] = states[k].empty() ? nullptr : states[k][i].data();
    t.numel = static_cast<std::int64_t>(params[i].size());
    t.scalars = scalars.empty() ? nullptr : scalars[i].data();
    if (matrix_only) t.view = MatrixView{1, 1, t.numel};
    return t;
  }
};

// Sizes: empty, scalar, every tail of 8- and 16-wide vectors, and one large enough for threads.
const std::vector<std::size_t> kSizes = {0, 1, 7, 17, 64, 1000, 4099, 300001};

Buffers make_buffers(std::mt19937_64& rng, const std::string& algorithm,
                     const std::vector<StateSpec>& specs) {
  Buffers b;
  for (const auto& d : dense_algorithms())
    b.matrix_only = b.matrix_only || (d.name == algorithm && d.matrix_only);
  for (std::size_t n : kSizes) {
    b.params.push_back(random_floats(rng, n));
    b.grads.push_back(random_floats(rng, n));
  }
  for (const StateSpec& s : specs)
    for (std::size_t i = 0; i < kSizes.size(); ++i)
      b.states[s.index].push_back(
          s.from_param ? b.params[i] : std::vector<float>(kSizes[i], static_cast<float>(s.init)));
  const std::vector<ScalarSpec> scalars = step_scalars(algorithm);
  if (!scalars.empty())
    for (std::size_t i = 0; i < kSizes.size(); ++i) {
      std::vector<double> v(kMaxScalars, 0.0);
      for (std::size_t k = 0; k < scalars.size(); ++k) v[k] = scalars[k].init;
      b.scalars.push_back(v);
    }
  return b;
}

template <class A>
typename A::Options typed(const NamedOptions& named) {
  typename A::Options o;
  for (const auto& [name, value] : named)
    for (const auto& f : A::kOptions)
      if (name == f.name) f.set(o, value);
  return o;
}

const AlgorithmDescription& describe(const std::string& name) {
  for (const auto& d : dense_algorithms())
    if (d.name == name) return d;
  throw std::runtime_error("no algorithm " + name);
}

template <class A>
void list_matches_fused_step() {
  const AlgorithmDescription& d = describe(A::kName);
  for (const NamedOptions& named : {NamedOptions{}, rich_options(d)}) {
    std::string label = d.name;
    for (const auto& [k, v] : named) label += " " + k + "=" + detail::format_number(v);
    SCOPED_TRACE(label);
    const typename A::Options o = typed<A>(named);
    auto rng = make_rng(label);
    const std::vector<StateSpec> specs = step_states(d.name, named);
    Buffers mine = make_buffers(rng, d.name, specs);
    Buffers by_name = mine, each = mine;
    std::vector<std::int64_t> steps = {1, 1, 3, 2, 1, 5, 1, 2};  // as if some params skipped
    ASSERT_EQ(steps.size(), kSizes.size());
    for (int round = 0; round < 3; ++round) {
      for (std::size_t i = 0; i < kSizes.size(); ++i) {
        mine.grads[i] = random_floats(rng, kSizes[i]);
        by_name.grads[i] = each.grads[i] = mine.grads[i];
      }
      std::vector<DenseTensors> a, b;
      for (std::size_t i = 0; i < kSizes.size(); ++i) {
        a.push_back(mine.tensors(i));
        b.push_back(by_name.tensors(i));
        fused_step<A>(o, steps[i], each.tensors(i));
      }
      fused_step_list<A>(o, a.data(), steps.data(), a.size());
      fused_step_list(d.name, named, b.data(), steps.data(), b.size());
      expect_same(mine.all(), each.all(),
                  "typed list vs fused_step, round " + std::to_string(round));
      expect_same(by_name.all(), each.all(),
                  "list by name vs fused_step, round " + std::to_string(round));
      EXPECT_EQ(mine.scalars, each.scalars) << "scalar states, round " << round;
      EXPECT_EQ(by_name.scalars, each.scalars) << "scalar states, round " << round;
      for (auto& s : steps) ++s;
    }
  }
}

#define FO_LIST_TEST(A) \
  TEST(FusedStepList, A##MatchesFusedStepBitwise) { list_matches_fused_step<A>(); }
FO_FOR_EACH_DENSE_ALGORITHM(FO_LIST_TEST)
#undef FO_LIST_TEST

TEST(FusedStepList, RejectedListChangesNothing) {
  auto rng = make_rng();
  const std::vector<StateSpec> specs = step_states("adam", {});
  Buffers b = make_buffers(rng, "adam", specs);
  const auto before = b.all();
  const std::vector<std::int64_t> steps(kSizes.size(), 1);
  auto list = [&] {
    std::vector<DenseTensors> t;
    for (std::size_t i = 0; i < kSizes.size(); ++i) t.push_back(b.tensors(i));
    return t;
  };
  // Each fault sits in the last tensor, after tensors that would have been stepped.
  const std::size_t last = kSizes.size() - 1;
  {
    auto t = list();
    t[last].states[1] = nullptr;
    expect_error([&] { fused_step_list("adam", {}, t.data(), steps.data(), t.size()); },
                 StatusCode::invalid_argument, "tensor 7: state exp_avg_sq is null");
  }
  {
    auto bad_steps = steps;
    bad_steps[last] = 0;
    auto t = list();
    expect_error([&] { fused_step_list("adam", {}, t.data(), bad_steps.data(), t.size()); },
                 StatusCode::invalid_argument, "tensor 7: step must be >= 1");
  }
  {
    auto t = list();
    t[last].param_dtype = t[last].grad_dtype = t[last].state_dtype = DType::bf16;
    expect_error([&] { fused_step_list("adam", {}, t.data(), steps.data(), t.size()); },
                 StatusCode::invalid_argument, "one list takes one combination");
  }
  {
    auto t = list();
    t[last].grad = reinterpret_cast<const char*>(t[last].grad) + 2;
    expect_error([&] { fused_step_list("adam", {}, t.data(), steps.data(), t.size()); },
                 StatusCode::invalid_argument, "grad is not aligned");
  }
  {
    auto t = list();
    expect_error(
        [&] {
          fused_step_list("adam", {{"beta2", 1.0}}, t.data(), steps.data(), 8);
        },
        StatusCode::invalid_argument, "beta2");
    expect_error(
        [&] {
          fused_step_list("adam", {{"betas", 0.5}}, t.data(), steps.data(), 8);
        },
        StatusCode::invalid_argument, "unknown option 'betas'");
    expect_error(
        [&] {
          fused_step_list("adam", {{"amsgrad", 2}}, t.data(), steps.data(), 8);
        },
        StatusCode::invalid_argument, "flag and takes 0 or 1");
    expect_error([&] { fused_step_list("adamm", {}, t.data(), steps.data(), 8); },
                 StatusCode::invalid_argument, "unknown algorithm 'adamm' (known: sgd");
    expect_error(
        [&] {
          fused_step_list("adagrad", {{"rowwise", 1}}, t.data(), steps.data(), 8);
        },
        StatusCode::unsupported, "rowwise");
  }
  {
    auto t = list();
    t[last].states[0] = nullptr;
    expect_error([&] { check_step_list("adam", {}, t.data(), steps.data(), t.size()); },
                 StatusCode::invalid_argument, "tensor 7: state exp_avg is null");
    auto good = list();
    check_step_list("adam", {}, good.data(), steps.data(), good.size());  // checks, steps nothing
  }
  expect_same(b.all(), before, "after the rejected lists");
}

TEST(StepStates, AreTheStatesTheOptionsUse) {
  auto names = [](const std::vector<StateSpec>& specs) {
    std::string s;
    for (const auto& x : specs)
      s += x.name + "@" + std::to_string(x.index) + "=" + detail::format_number(x.init) + " ";
    return s;
  };
  EXPECT_EQ(names(step_states("adam", {})), "exp_avg@0=0 exp_avg_sq@1=0 ");
  EXPECT_EQ(names(step_states("adam", {{"amsgrad", 1}})),
            "exp_avg@0=0 exp_avg_sq@1=0 max_exp_avg_sq@2=0 ");
  EXPECT_EQ(names(step_states("sgd", {})), "");
  EXPECT_EQ(names(step_states("sgd", {{"momentum", 0.9}})), "momentum_buffer@0=0 ");
  EXPECT_EQ(names(step_states("rmsprop", {{"centered", 1}})), "square_avg@0=0 grad_avg@2=0 ");
  EXPECT_EQ(names(step_states("rprop", {{"lr", 0.25}})), "prev@0=0 step_size@1=0.25 ");
  EXPECT_EQ(names(step_states("adagrad", {{"initial_accumulator_value", 0.5}})), "sum@0=0.5 ");
  EXPECT_EQ(names(step_states("signsgd", {})), "");
  expect_error([] { step_states("adam", {{"lr", -1}}); }, StatusCode::invalid_argument, "lr");
}

}  // namespace
}  // namespace fo::test
