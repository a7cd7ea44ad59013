// fused_sparse_step (typed and by name) against fo::Optimizer::step_sparse: bitwise the same
// table and states for every algorithm that takes sparse steps (adagrad also row-wise), over
// several steps with duplicate indices, int32 and int64 indices; a rejected step (a bad index,
// a missing state, an algorithm without sparse steps) changes nothing.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

struct Case {
  std::string algorithm;
  NamedOptions options;
};

std::vector<Case> sparse_cases() {
  std::vector<Case> cases;
  for (const AlgorithmDescription& d : dense_algorithms()) {
    if (!d.sparse) continue;
    cases.push_back({d.name, {}});
    if (d.name == "adagrad") {  // the row-wise form has states of one value per row
      cases.push_back({d.name, {{"rowwise", 1}}});
      cases.push_back({d.name, {{"lr_decay", 0.1}, {"initial_accumulator_value", 0.3}}});
    } else {
      cases.push_back({d.name, {{"maximize", 1}, {"lr", 0.01}}});
    }
  }
  return cases;
}

TEST(FusedSparseStep, EqualsTheOptimizersSparseStepBitwise) {
  auto rng = make_rng("fused_sparse_step");
  const std::int64_t rows = 37, dim = 9;  // dim: a vector width's tail
  for (const Case& c : sparse_cases()) {
    for (DType index_dtype : {DType::i32, DType::i64}) {
      SCOPED_TRACE(c.algorithm + (index_dtype == DType::i32 ? " int32" : " int64"));
      const std::vector<float> start = random_floats(rng, rows * dim);
      std::vector<float> mine = start, theirs = start;
      Optimizer opt(c.algorithm);
      for (const auto& [key, value] : c.options) opt.set_option(key, value);
      opt.add_param("table", theirs.data(), DType::f32, {rows, dim});
      const std::vector<StateSpec> specs = sparse_step_states(c.algorithm, c.options);
      std::vector<std::vector<float>> states;
      SparseTensors t;
      t.table = mine.data();
      t.rows = rows;
      t.dim = dim;
      t.index_dtype = index_dtype;
      for (const StateSpec& s : specs)
        states.emplace_back(s.per_row ? rows : rows * dim, static_cast<float>(s.init));
      for (std::size_t k = 0; k < specs.size(); ++k) t.states[specs[k].index] = states[k].data();
      std::uniform_int_distribution<std::int64_t> row(0, rows - 1);
      for (std::int64_t step = 1; step <= 5; ++step) {
        const std::int64_t nnz = 3 + 7 * step;  // duplicates certain past rows / 2
        std::vector<std::int64_t> idx64(nnz);
        for (auto& i : idx64) i = row(rng);
        std::vector<std::int32_t> idx32(idx64.begin(), idx64.end());
        const std::vector<float> grads = random_floats(rng, nnz * dim);
        const void* idx = index_dtype == DType::i32 ? static_cast<const void*>(idx32.data())
                                                    : static_cast<const void*>(idx64.data());
        t.indices = idx;
        t.nnz = nnz;
        t.grad_rows = grads.data();
        fused_sparse_step(c.algorithm, c.options, step, t);
        opt.step_sparse("table", idx, index_dtype, nnz, grads.data());
        ASSERT_TRUE(bitwise_equal(mine, theirs))
            << "step " << step << ": " << first_difference(mine, theirs);
        for (std::size_t k = 0; k < specs.size(); ++k)
          ASSERT_TRUE(bitwise_equal(states[k], opt.state("table", specs[k].name)))
              << "step " << step << " state " << specs[k].name;
      }
    }
  }
}

TEST(FusedSparseStep, TypedEntryEqualsTheNamedOne) {
  auto rng = make_rng("fused_sparse_step typed");
  const std::int64_t rows = 8, dim = 17;
  const std::vector<float> start = random_floats(rng, rows * dim);
  std::vector<float> a = start, b = start, ma(rows * dim, 0), va(rows * dim, 0), mb(rows * dim, 0),
                     vb(rows * dim, 0);
  const std::vector<std::int64_t> idx = {3, 0, 3, 7};
  const std::vector<float> g = random_floats(rng, idx.size() * dim);
  SparseTensors ta{a.data(), {ma.data(), va.data()}, rows, dim, idx.data(), DType::i64, 4,
                   g.data()};
  SparseTensors tb{b.data(), {mb.data(), vb.data()}, rows, dim, idx.data(), DType::i64, 4,
                   g.data()};
  LazyAdam::Options o;
  o.lr = 0.05;
  fused_sparse_step<LazyAdam>(o, 1, ta);
  fused_sparse_step("lazyadam", {{"lr", 0.05}}, 1, tb);
  EXPECT_TRUE(bitwise_equal(a, b));
  EXPECT_TRUE(bitwise_equal(ma, mb));
  EXPECT_TRUE(bitwise_equal(va, vb));
  EXPECT_NE(a, start);
}

TEST(FusedSparseStep, RejectedStepsChangeNothing) {
  auto rng = make_rng("fused_sparse_step bad");
  const std::int64_t rows = 5, dim = 4;
  std::vector<float> table = random_floats(rng, rows * dim), m(rows * dim, 0.5f),
                     v(rows * dim, 0.25f);
  const auto table0 = table, m0 = m, v0 = v;
  const std::vector<float> g = random_floats(rng, 3 * dim);
  std::vector<std::int64_t> idx = {1, 4, 5};  // 5 is outside [0, 5)
  SparseTensors t{table.data(), {m.data(), v.data()}, rows, dim,
                  idx.data(),   DType::i64,           3,    g.data()};
  auto expect_unchanged = [&](const char* what) {
    EXPECT_EQ(table, table0) << what;
    EXPECT_EQ(m, m0) << what;
    EXPECT_EQ(v, v0) << what;
  };
  const auto code_of = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.code();
    }
    return StatusCode::ok;
  };
  EXPECT_EQ(code_of([&] { fused_sparse_step("lazyadam", {}, 1, t); }),
            StatusCode::invalid_argument);
  expect_unchanged("index out of range");
  idx[2] = -1;
  EXPECT_EQ(code_of([&] { fused_sparse_step("lazyadam", {}, 1, t); }),
            StatusCode::invalid_argument);
  expect_unchanged("negative index");
  idx[2] = 2;
  t.states[1] = nullptr;
  EXPECT_EQ(code_of([&] { fused_sparse_step("lazyadam", {}, 1, t); }),
            StatusCode::invalid_argument);
  expect_unchanged("a missing state");
  t.states[1] = v.data();
  EXPECT_EQ(code_of([&] { fused_sparse_step("adam", {}, 1, t); }), StatusCode::unsupported);
  expect_unchanged("adam has no sparse step");
  EXPECT_EQ(code_of([&] { fused_sparse_step("lazyadam", {}, 0, t); }),
            StatusCode::invalid_argument);
  EXPECT_EQ(code_of([&] {
              fused_sparse_step("lazyadam", {{"beta1", 1.5}}, 1, t);
            }),
            StatusCode::invalid_argument);
  EXPECT_EQ(code_of([&] {
              fused_sparse_step("adagrad", {{"weight_decay", 0.1}}, 1, t);
            }),
            StatusCode::invalid_argument);  // sparse adagrad refuses weight decay, as torch
  expect_unchanged("invalid options");
  EXPECT_EQ(code_of([&] { fused_sparse_step("lazyadam", {}, 1, t); }), StatusCode::ok);
  EXPECT_NE(table, table0);
}

}  // namespace
}  // namespace fo::test
