// Checkpoints written by an earlier release load into this one, bitwise: tests/data holds
// files written by fusedopt 0.1.0 (commit b3163a9) from the recipes below. A recipe's params
// and grads are exact small binary fractions, so its steps give the same bits on every
// machine, ISA and thread count; this release must (1) write the very same bytes after the
// same steps (the format and the arithmetic unchanged), and (2) load the old file into
// exactly the state it reaches itself.
//
// To write the fixtures again (only when the format version changes, with a new file name):
//   FUSEDOPT_WRITE_FIXTURES=tests/data build/default/tests/fusedopt_tests
//       --gtest_filter='CheckpointCompat.*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "test_util.hpp"

#ifndef FUSEDOPT_TEST_DATA_DIR
#error "FUSEDOPT_TEST_DATA_DIR must name tests/data"
#endif

namespace fo::test {
namespace {

std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

/// One optimizer's recipe: its options, dense params and the steps they take.
struct Recipe {
  const char* file;
  const char* algorithm;
  std::vector<std::pair<std::string, double>> options;
  std::vector<std::pair<std::string, double>> first_param_options;
  bool sparse_rowwise = false;  // a [rows x dim] table stepped sparsely, row-wise
};

const std::vector<Recipe>& recipes() {
  static const std::vector<Recipe> r = {
      {"adam_v1.ckpt", "adam", {{"amsgrad", 1}, {"weight_decay", 0.01}}, {{"lr", 0.003}}},
      {"sgd_v1.ckpt", "sgd", {{"momentum", 0.9}, {"nesterov", 1}}, {{"weight_decay", 0.1}}},
      {"rmsprop_v1.ckpt", "rmsprop", {{"momentum", 0.5}, {"centered", 1}}, {}},
      {"adagrad_rowwise_v1.ckpt", "adagrad", {{"rowwise", 1}}, {}, true},
  };
  return r;
}

float exact_value(std::int64_t i, std::int64_t salt) {  // a multiple of 1/64 in [-0.5, 0.5)
  return static_cast<float>((i * 7 + salt * 13) % 64 - 32) / 64.0f;
}

struct RecipeRun {
  std::vector<std::vector<float>> params;
  Optimizer opt;
  explicit RecipeRun(const Recipe& r) : opt(r.algorithm) {
    for (const auto& [k, v] : r.options) opt.set_option(k, v);
    const std::vector<std::vector<std::int64_t>> shapes =
        r.sparse_rowwise ? std::vector<std::vector<std::int64_t>>{{6, 5}}
                         : std::vector<std::vector<std::int64_t>>{{37}, {4, 3}};
    params.resize(shapes.size());
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      std::int64_t n = 1;
      for (auto d : shapes[i]) n *= d;
      for (std::int64_t j = 0; j < n; ++j)
        params[i].push_back(exact_value(j, static_cast<std::int64_t>(i)));
      opt.add_param("p" + std::to_string(i), params[i].data(), DType::f32, shapes[i]);
    }
    for (const auto& [k, v] : r.first_param_options) opt.set_param_option("p0", k, v);
  }
  void steps(const Recipe& r, int count) {
    for (int t = 1; t <= count; ++t) {
      if (r.sparse_rowwise) {
        const std::int64_t idx[] = {4, 1, 4, 0};
        std::vector<float> g(4 * 5);
        for (std::size_t j = 0; j < g.size(); ++j)
          g[j] = exact_value(static_cast<std::int64_t>(j), t);
        opt.step_sparse("p0", idx, DType::i64, 4, g.data());
        continue;
      }
      std::vector<std::vector<float>> g(params.size());
      std::vector<const void*> ptrs;
      for (std::size_t i = 0; i < params.size(); ++i) {
        for (std::size_t j = 0; j < params[i].size(); ++j)
          g[i].push_back(exact_value(static_cast<std::int64_t>(j), t + 3));
        ptrs.push_back(g[i].data());
      }
      opt.step(ptrs.data());
    }
  }
  std::vector<std::vector<float>> everything() const {
    std::vector<std::vector<float>> out = params;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      for (const auto& s : opt.state_names(name)) out.push_back(opt.state(name, s));
      out.push_back({static_cast<float>(opt.step_count(name))});
    }
    return out;
  }
};

std::string fixture(const Recipe& r) { return std::string(FUSEDOPT_TEST_DATA_DIR) + "/" + r.file; }

TEST(CheckpointCompat, ThisReleaseWritesTheSameBytesAfterTheSameSteps) {
  const char* write_to = std::getenv("FUSEDOPT_WRITE_FIXTURES");
  for (const Recipe& r : recipes()) {
    RecipeRun run(r);
    run.steps(r, 3);
    const std::string mine = ::testing::TempDir() + "compat_" + r.file;
    run.opt.save(mine);
    if (write_to) {
      run.opt.save(std::string(write_to) + "/" + r.file);
      continue;
    }
    const std::vector<char> old = read_all(fixture(r));
    ASSERT_FALSE(old.empty()) << "missing fixture " << fixture(r);
    EXPECT_TRUE(read_all(mine) == old) << r.file << ": the bytes differ from the earlier release's";
  }
}

TEST(CheckpointCompat, AnEarlierReleasesFileLoadsIntoTheSameStateAndGoesOn) {
  for (const Recipe& r : recipes()) {
    RecipeRun straight(r), resumed(r);
    straight.steps(r, 3);
    resumed.opt.load(fixture(r));
    // The params are the training loop's: the recipe's own after three steps.
    for (std::size_t i = 0; i < straight.params.size(); ++i)
      std::copy(straight.params[i].begin(), straight.params[i].end(), resumed.params[i].begin());
    expect_same(resumed.everything(), straight.everything(), std::string(r.file) + " loaded");
    straight.steps(r, 2);
    resumed.steps(r, 2);
    expect_same(resumed.everything(), straight.everything(),
                std::string(r.file) + ": two steps after loading");
  }
}

}  // namespace
}  // namespace fo::test
