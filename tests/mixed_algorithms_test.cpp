// Several algorithms in one fo::Optimizer (add_param's algorithm, "adamw.lr" option keys): each
// param steps exactly as it would in an optimizer of its own algorithm, every bit, and the
// whole mix saves to and resumes from one checkpoint. Muon for the hidden matrices with AdamW
// for the rest is the mix users run; the first test mixes every registered algorithm.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using Shape = std::vector<std::int64_t>;

std::int64_t numel(const Shape& s) {
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

// The richest options of `algorithm` that the CPU steps (muon's ns_bf16 is CUDA's).
std::vector<std::pair<std::string, double>> cpu_options(const std::string& algorithm) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& kv : ref::richest_options(algorithm))
    if (kv.first != "ns_bf16") out.push_back(kv);
  return out;
}

std::string temp_path(const std::string& stem) {
  return ::testing::TempDir() + stem + "_" + std::to_string(::getpid()) + ".ckpt";
}

// Every registered algorithm steps two params of one optimizer (a matrix and a batch of
// matrices, which every algorithm takes), its options set through "name.key"; beside it each
// algorithm steps copies of them in an optimizer of its own. Six steps, every bit of the
// params and states equal.
TEST(MixedAlgorithms, EveryAlgorithmInOneOptimizerEqualsEachOnItsOwn) {
  auto rng = make_rng();
  const std::vector<Shape> shapes = {{7, 13}, {2, 9, 5}};
  const auto& algorithms = dense_algorithms();
  Optimizer mixed(algorithms.front().name);
  std::vector<std::unique_ptr<Optimizer>> alone;
  std::vector<std::vector<float>> mixed_p, alone_p;  // both: by algorithm, then shape
  for (const AlgorithmDescription& a : algorithms) {
    alone.push_back(std::make_unique<Optimizer>(a.name));
    for (const auto& [key, value] : cpu_options(a.name)) {
      mixed.set_option(a.name + "." + key, value);
      alone.back()->set_option(key, value);
    }
  }
  for (std::size_t i = 0; i < algorithms.size(); ++i)
    for (std::size_t s = 0; s < shapes.size(); ++s) {
      mixed_p.push_back(random_floats(rng, static_cast<std::size_t>(numel(shapes[s]))));
      alone_p.push_back(mixed_p.back());
    }
  // Added after every option is set, interleaved across algorithms.
  for (std::size_t i = 0; i < algorithms.size(); ++i)
    for (std::size_t s = 0; s < shapes.size(); ++s) {
      const std::string name = algorithms[i].name + "_" + std::to_string(s);
      const std::size_t j = i * shapes.size() + s;
      mixed.add_param(name, mixed_p[j].data(), DType::f32, shapes[s],
                      i == 0 ? "" : algorithms[i].name);
      alone[i]->add_param(name, alone_p[j].data(), DType::f32, shapes[s]);
      EXPECT_EQ(mixed.param_algorithm(name), algorithms[i].name);
    }
  for (int t = 1; t <= 6; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    std::vector<std::vector<float>> grads;
    std::vector<const void*> all;
    for (const auto& p : mixed_p) {
      grads.push_back(random_floats(rng, p.size()));
      all.push_back(grads.back().data());
    }
    mixed.step(all.data());
    for (std::size_t i = 0; i < algorithms.size(); ++i)
      alone[i]->step(all.data() + i * shapes.size());
    for (std::size_t j = 0; j < mixed_p.size(); ++j) {
      const std::string name =
          algorithms[j / shapes.size()].name + "_" + std::to_string(j % shapes.size());
      ASSERT_TRUE(bitwise_equal(mixed_p[j], alone_p[j]))
          << name << ": " << first_difference(mixed_p[j], alone_p[j]);
      const Optimizer& own = *alone[j / shapes.size()];
      ASSERT_EQ(mixed.state_names(name), own.state_names(name)) << name;
      for (const std::string& state : own.state_names(name))
        ASSERT_TRUE(bitwise_equal(mixed.state(name, state), own.state(name, state)))
            << name << " " << state;
    }
  }
}

// A model's params as a Muon + AdamW optimizer holds them: the hidden matrices (one a batch)
// by muon, the embedding and the biases by adamw.
struct MuonAdamW {
  std::vector<std::vector<float>> values;
  std::unique_ptr<Optimizer> opt;
  static inline const std::vector<Shape> kShapes = {{16, 24}, {2, 8, 5}, {50, 8}, {24}};
  static inline const char* kNames[] = {"hidden", "heads", "embedding", "bias"};
  static inline const char* kAlgorithms[] = {"", "", "adamw", "adamw"};

  explicit MuonAdamW(const std::vector<std::vector<float>>& start) : values(start) {
    opt = std::make_unique<Optimizer>("muon");
    opt->set_option("lr", 0.02);
    opt->set_option("adamw.lr", 3e-3);  // before any adamw param: its default
    opt->set_option("adamw.beta2", 0.95);
    for (std::size_t i = 0; i < kShapes.size(); ++i)
      opt->add_param(kNames[i], values[i].data(), DType::f32, kShapes[i], kAlgorithms[i]);
    opt->set_param_option("bias", "weight_decay", 0.0);
    opt->set_option("adamw.eps", 1e-10);  // after: reaches the adamw params only
  }
  void step(const std::vector<std::vector<float>>& grads) {
    std::vector<const void*> g;
    for (const auto& x : grads) g.push_back(x.data());
    opt->step(g.data());
  }
};

std::vector<std::vector<float>> random_like(std::mt19937_64& rng,
                                            const std::vector<Shape>& shapes) {
  std::vector<std::vector<float>> out;
  for (const Shape& s : shapes)
    out.push_back(random_floats(rng, static_cast<std::size_t>(numel(s))));
  return out;
}

TEST(MixedAlgorithms, MuonWithAdamWOptionsReachTheirOwnParams) {
  auto rng = make_rng();
  MuonAdamW m(random_like(rng, MuonAdamW::kShapes));
  Optimizer& o = *m.opt;
  EXPECT_EQ(o.algorithm(), "muon");
  EXPECT_EQ(o.param_algorithm("hidden"), "muon");
  EXPECT_EQ(o.param_algorithm("bias"), "adamw");
  EXPECT_EQ(o.param_option("hidden", "lr"), 0.02);
  EXPECT_EQ(o.param_option("embedding", "lr"), 3e-3);
  EXPECT_EQ(o.param_option("embedding", "beta2"), 0.95);
  EXPECT_EQ(o.param_option("embedding", "eps"), 1e-10);
  EXPECT_EQ(o.param_option("embedding", "weight_decay"), 1e-2);  // adamw's registered default
  EXPECT_EQ(o.param_option("bias", "weight_decay"), 0.0);        // its override
  EXPECT_EQ(o.option("adamw.lr"), 3e-3);
  EXPECT_EQ(o.option("muon.lr"), 0.02);  // the constructor's algorithm by name: the plain key
  EXPECT_EQ(o.option("lion.lr"), 1e-4);  // an algorithm without params: its registered default
  o.set_option("lr", 0.05);
  EXPECT_EQ(o.param_option("hidden", "lr"), 0.05);
  EXPECT_EQ(o.param_option("embedding", "lr"), 3e-3);
  EXPECT_EQ(o.state_names("hidden"), std::vector<std::string>{"momentum_buffer"});
  EXPECT_EQ(o.state_names("bias"), (std::vector<std::string>{"exp_avg", "exp_avg_sq"}));
}

TEST(MixedAlgorithms, MuonWithAdamWResumesFromOneCheckpoint) {
  auto rng = make_rng();
  const auto start = random_like(rng, MuonAdamW::kShapes);
  std::vector<std::vector<std::vector<float>>> grads;
  for (int t = 0; t < 8; ++t) grads.push_back(random_like(rng, MuonAdamW::kShapes));
  MuonAdamW a(start), b(start);
  for (int t = 0; t < 4; ++t) a.step(grads[t]), b.step(grads[t]);
  const std::string path = temp_path("mixed_resume");
  a.opt->save(path);
  MuonAdamW c(a.values);
  c.opt->set_option("adamw.lr", 1.0);  // replaced by the checkpoint's
  c.opt->set_param_option("bias", "lr", 5);
  c.opt->load(path);
  EXPECT_EQ(c.opt->param_option("embedding", "lr"), 3e-3);
  EXPECT_EQ(c.opt->param_option("bias", "lr"), 3e-3);
  EXPECT_EQ(c.opt->param_option("bias", "weight_decay"), 0.0);
  EXPECT_EQ(c.opt->step_count("embedding"), 4);
  for (int t = 4; t < 8; ++t) b.step(grads[t]), c.step(grads[t]);
  for (std::size_t i = 0; i < start.size(); ++i) {
    const char* name = MuonAdamW::kNames[i];
    EXPECT_TRUE(bitwise_equal(b.values[i], c.values[i]))
        << name << ": " << first_difference(c.values[i], b.values[i]);
    for (const std::string& s : b.opt->state_names(name))
      EXPECT_TRUE(bitwise_equal(b.opt->state(name, s), c.opt->state(name, s))) << name << " " << s;
  }
  std::remove(path.c_str());
}

TEST(MixedAlgorithms, ACheckpointOfAnotherMixIsRefusedAndChangesNothing) {
  auto rng = make_rng();
  const auto start = random_like(rng, MuonAdamW::kShapes);
  const auto grads = random_like(rng, MuonAdamW::kShapes);
  MuonAdamW a(start);
  a.step(grads);
  const std::string path = temp_path("mixed_other");
  a.opt->save(path);
  // The same params, but the embedding by muon: the file's embedding state is adamw's.
  auto values = start;
  Optimizer other("muon");
  for (std::size_t i = 0; i < values.size(); ++i)
    other.add_param(MuonAdamW::kNames[i], values[i].data(), DType::f32, MuonAdamW::kShapes[i],
                    i == 3 ? "adamw" : "");
  std::vector<const void*> g;
  for (const auto& x : grads) g.push_back(x.data());
  other.step(g.data());
  const auto momentum = other.state("embedding", "momentum_buffer");
  try {
    other.load(path);
    ADD_FAILURE() << "a checkpoint of another mix loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("'embedding' is stepped by muon, in the checkpoint by "
                                         "adamw"),
              std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(bitwise_equal(other.state("embedding", "momentum_buffer"), momentum));
  EXPECT_EQ(other.step_count("embedding"), 1);
  // A single-algorithm muon optimizer of the 2-D params refuses it too (no adamw there).
  Optimizer plain("muon");
  for (std::size_t i = 0; i < 3; ++i)
    plain.add_param(MuonAdamW::kNames[i], values[i].data(), DType::f32, MuonAdamW::kShapes[i]);
  EXPECT_THROW(plain.load(path), Error);
  std::remove(path.c_str());
}

TEST(MixedAlgorithms, BadInputIsRefusedAndChangesNothing) {
  std::vector<float> w(12, 1.0f), v(4, 1.0f);
  Optimizer o("muon");
  o.add_param("w", w.data(), DType::f32, {3, 4});
  auto expect_invalid = [](auto&& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "accepted; expected an error naming '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::invalid_argument) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  // A vector by muon: refused, pointing at a second algorithm for it.
  expect_invalid([&] { o.add_param("v", v.data(), DType::f32, {4}); }, "\"adamw\"");
  expect_invalid([&] { o.add_param("v", v.data(), DType::f32, {4}, "nosuch"); }, "nosuch");
  EXPECT_EQ(o.num_params(), 1u);
  expect_invalid([&] { o.set_option("nosuch.lr", 1e-3); }, "nosuch");
  expect_invalid([&] { o.set_option("adamw.momentum", 0.9); }, "momentum");
  expect_invalid([&] { o.set_option("adamw.lr", -1.0); }, "lr");
  EXPECT_EQ(o.option("adamw.lr"), 1e-3);
  o.add_param("v", v.data(), DType::f32, {4}, "adamw");
  expect_invalid([&] { o.set_option("adamw.beta1", 1.5); }, "beta1");
  expect_invalid([&] { o.set_param_option("v", "momentum", 0.5); }, "momentum");  // muon's
  expect_invalid([&] { o.set_param_option("w", "beta1", 0.5); }, "beta1");        // adamw's
  EXPECT_EQ(o.param_option("v", "beta1"), 0.9);
  EXPECT_EQ(o.param_option("w", "momentum"), 0.95);
  EXPECT_EQ(o.param_algorithm("v"), "adamw");
  // Schedule-Free's eval() needs every algorithm to have an evaluation form.
  Optimizer sf("adamw_schedule_free");
  sf.add_param("v", v.data(), DType::f32, {4}, "adamw");
  EXPECT_THROW(sf.eval(), Error);
  EXPECT_TRUE(sf.training());
}

}  // namespace
}  // namespace fo::test
