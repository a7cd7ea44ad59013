// Sparse row steps of embedding tables (lazyadam, adagrad, row-wise adagrad) on the CPU and,
// where present, a GPU: against the double reference, and the properties docs/optimizers.md
// promises exactly (duplicates summed deterministically, untouched rows bitwise unchanged, bad
// indices rejected with nothing changed).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using Options = std::vector<std::pair<std::string, double>>;

struct Case {
  std::string algorithm;
  Device device;
  Options options;  // e.g. {{"rowwise", 1}}
  std::string variant;

  bool rowwise() const { return !options.empty() && options[0].first == "rowwise"; }
  ref::OptionMap option_map() const { return {options.begin(), options.end()}; }
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.algorithm << (c.variant.empty() ? "" : " " + c.variant)
      << (c.device == Device::cuda ? " on cuda" : " on cpu");
}

/// A table in an optimizer, with its indices and gradient rows staged on the same device.
class Table {
 public:
  Table(const Case& c, std::int64_t rows, std::int64_t dim, std::mt19937_64& rng,
        const Options& options = {})
      : device_(c.device),
        rows_(rows),
        dim_(dim),
        data_(c.device, random_floats(rng, static_cast<std::size_t>(rows * dim))),
        opt_(c.algorithm, c.device) {
    for (const auto& [k, v] : c.options) opt_.set_option(k, v);
    for (const auto& [k, v] : options) opt_.set_option(k, v);
    opt_.add_param("table", data_.data(), DType::f32, {rows, dim});
  }

  /// One sparse step; indices as int64 or int32.
  void step(const std::vector<std::int64_t>& idx, const std::vector<float>& grad_rows,
            bool int32 = false) {
    std::vector<float> idx_bits;  // indices travel through a float TestTensor, bit for bit
    if (idx.empty()) {
      // nothing to copy (memcpy from a null pointer is undefined even for 0 bytes)
    } else if (int32) {
      std::vector<std::int32_t> v(idx.begin(), idx.end());
      idx_bits.resize(v.size());
      std::memcpy(idx_bits.data(), v.data(), v.size() * 4);
    } else {
      idx_bits.resize(idx.size() * 2);
      std::memcpy(idx_bits.data(), idx.data(), idx.size() * 8);
    }
    TestTensor i(device_, idx_bits), g(device_, grad_rows);
    opt_.step_sparse("table", idx.empty() ? nullptr : i.data(), int32 ? DType::i32 : DType::i64,
                     static_cast<std::int64_t>(idx.size()), idx.empty() ? nullptr : g.data());
  }

  std::vector<float> values() const { return data_.values(); }
  std::vector<float> state(const std::string& s) const { return opt_.state("table", s); }
  std::vector<std::string> states() const { return opt_.state_names("table"); }
  /// Table, then every state: all the optimizer holds.
  std::vector<std::vector<float>> everything() const {
    std::vector<std::vector<float>> all{values()};
    for (const auto& s : states()) all.push_back(state(s));
    all.push_back({static_cast<float>(opt_.step_count("table"))});
    return all;
  }
  Optimizer& opt() { return opt_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t rows() const { return rows_; }

 private:
  Device device_;
  std::int64_t rows_, dim_;
  TestTensor data_;
  Optimizer opt_;
};

class Sparse : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (GetParam().device == Device::cuda && cuda_devices() == 0)
      GTEST_SKIP() << "no CUDA device on this machine";
  }
};

/// Every sparse algorithm on both devices, plus each row-wise form (an algorithm with the
/// option "rowwise") as its own case.
std::vector<Case> cases() {
  std::vector<Case> v;
  for (const auto& a : dense_algorithms()) {
    if (!a.sparse) continue;
    const bool has_rowwise =
        std::find(a.options.begin(), a.options.end(), "rowwise") != a.options.end();
    for (Device d : {Device::cpu, Device::cuda}) {
      v.push_back({a.name, d, {}, ""});
      if (has_rowwise) v.push_back({a.name, d, {{"rowwise", 1}}, "rowwise"});
    }
  }
  return v;
}

std::vector<float> rows_of(std::mt19937_64& rng, std::size_t nnz, std::int64_t dim) {
  return random_floats(rng, nnz * static_cast<std::size_t>(dim));
}

// Against the reference: 20 steps of random row subsets with duplicates, over dims that hit
// every vector tail. The summation of duplicates is held to the library's exact fp32 order by
// DuplicatesEqualOneIndexWithTheirFp32Sum; here the reference gets those fp32 sums, and each
// step starts from the library's previous output, so the tolerance is one step's rounding
// (see dense_reference_test.cpp).
TEST_P(Sparse, MatchesTheReferenceAndLeavesOtherRowsAlone) {
  const Case& c = GetParam();
  auto rng = make_rng();
  constexpr double kU = 1.0 / (1 << 24);
  for (std::int64_t dim : {1, 7, 16, 17, 33}) {
    SCOPED_TRACE("dim " + std::to_string(dim));
    const std::int64_t rows = 257;
    Table table(c, rows, dim, rng);
    const std::vector<float> initial = table.values();
    std::vector<double> ref_table(initial.begin(), initial.end());
    ref::StateMap ref_states;
    for (const auto& s : table.states())
      ref_states[s].assign(static_cast<std::size_t>(table.opt().state_numel("table", s)),
                           ref::state_initial_value(c.algorithm, c.option_map(), s));
    // Row-wise: the mean square's fp32 sum adds up to ceil(dim / 32) + 6 roundings
    // (kernels/rowwise.hpp) to the rate, hence to every change and to the accumulator.
    const double extra = c.rowwise() ? static_cast<double>((dim + 31) / 32 + 6) : 0.0;
    for (int t = 1; t <= 20; ++t) {
      SCOPED_TRACE("step " + std::to_string(t));
      std::vector<std::int64_t> idx(std::uniform_int_distribution<int>(0, 300)(rng));
      for (auto& i : idx) i = std::uniform_int_distribution<std::int64_t>(0, rows / 2)(rng) * 2;
      const std::vector<float> g = rows_of(rng, idx.size(), dim);
      const auto before = table.everything();
      table.step(idx, g);
      // Each distinct row's gradient summed in fp32: its first row, then the others in order.
      std::map<std::int64_t, std::vector<float>> sums;
      for (std::size_t k = 0; k < idx.size(); ++k) {
        const auto row = g.begin() + static_cast<std::ptrdiff_t>(k * dim);
        auto [it, fresh] = sums.try_emplace(idx[k], row, row + dim);
        if (!fresh)
          for (std::int64_t j = 0; j < dim; ++j) it->second[j] += row[j];
      }
      std::vector<std::int64_t> distinct;
      std::vector<double> summed;
      for (const auto& [r, v] : sums) {
        distinct.push_back(r);
        summed.insert(summed.end(), v.begin(), v.end());
      }
      std::vector<double> want_table = ref_table;
      ref::StateMap want_states = ref_states;
      ref::sparse_step(c.algorithm, c.option_map(), t, want_table, rows, dim, distinct, summed,
                       want_states);
      // `item`: the index of this buffer in everything() (0 the table, then the states).
      auto check = [&](const std::string& what, std::size_t item, const std::vector<float>& got,
                       const std::vector<double>& want, const std::vector<double>& old) {
        const std::size_t per_row = want.size() / static_cast<std::size_t>(rows);
        double max_change = 0.0;
        for (std::size_t i = 0; i < want.size(); ++i)
          max_change = std::max(max_change, std::abs(want[i] - old[i]));
        int bad = 0;
        for (std::size_t i = 0; i < want.size(); ++i) {
          const auto row = static_cast<std::int64_t>(i / per_row);
          if (std::find(idx.begin(), idx.end(), row) == idx.end()) {  // untouched: as before
            if (std::memcmp(&got[i], &before[item][i], 4) != 0 && ++bad <= 3)
              ADD_FAILURE() << what << "[" << i << "] of an untouched row changed";
            continue;
          }
          const double tol =
              (8 + extra) * kU * std::abs(want[i]) + (16 + extra) * kU * max_change + 1e-37;
          if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 3)
            ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i]
                          << ", tol " << tol;
        }
        EXPECT_EQ(bad, 0) << what;
      };
      check("table", 0, table.values(), want_table, ref_table);
      std::size_t item = 1;
      for (const auto& s : table.states())
        check(s, item++, table.state(s), want_states[s], ref_states[s]);
      // Odd rows are never touched: bitwise as before in the table and every state.
      const auto after = table.everything();
      for (std::size_t k = 0; k + 1 < after.size(); ++k) {
        const std::size_t per_row = after[k].size() / static_cast<std::size_t>(rows);
        for (std::size_t i = per_row; i < after[k].size(); i += 2 * per_row)
          for (std::size_t j = i; j < i + per_row; ++j)
            ASSERT_EQ(std::memcmp(&after[k][j], &before[k][j], 4), 0)
                << "item " << k << " of untouched row " << i / per_row << " changed";
      }
      EXPECT_EQ(table.opt().step_count("table"), t);
      const auto v = table.values();
      ref_table.assign(v.begin(), v.end());
      for (const auto& s : table.states()) {
        const auto x = table.state(s);
        ref_states[s].assign(x.begin(), x.end());
      }
    }
  }
}

TEST_P(Sparse, DuplicatesEqualOneIndexWithTheirFp32Sum) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  std::mt19937_64 r1(seed), r2(seed);
  Table dup(GetParam(), 50, 17, r1), single(GetParam(), 50, 17, r2);
  const std::int64_t dim = 17;
  for (std::size_t repeats : {2u, 3u, 100000u}) {  // 10^5: one hot row
    SCOPED_TRACE("repeats " + std::to_string(repeats));
    const std::vector<float> g = rows_of(rng, repeats, dim);
    std::vector<float> sum(g.begin(), g.begin() + dim);  // the library's order: first row,
    for (std::size_t k = 1; k < repeats; ++k)            // then the others by position
      for (std::int64_t j = 0; j < dim; ++j) sum[j] += g[k * dim + j];
    dup.step(std::vector<std::int64_t>(repeats, 13), g);
    single.step({13}, sum);
    expect_same(dup.everything(), single.everything(), "duplicates vs their sum");
  }
}

TEST_P(Sparse, OrderOfDistinctIndicesAndIndexWidthDoNotMatter) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  std::vector<std::int64_t> idx(40);
  std::iota(idx.begin(), idx.end(), 0);
  for (auto& i : idx) i *= 3;
  const std::vector<float> g = rows_of(rng, idx.size(), 9);
  auto permuted = [&](std::vector<std::size_t> order) {
    std::vector<std::int64_t> i2;
    std::vector<float> g2;
    for (std::size_t k : order) {
      i2.push_back(idx[k]);
      g2.insert(g2.end(), g.begin() + static_cast<std::ptrdiff_t>(k * 9),
                g.begin() + static_cast<std::ptrdiff_t>(k * 9 + 9));
    }
    return std::make_pair(i2, g2);
  };
  std::vector<std::size_t> sorted(idx.size()), reversed(idx.size()), shuffled(idx.size());
  std::iota(sorted.begin(), sorted.end(), 0);
  reversed.assign(sorted.rbegin(), sorted.rend());
  shuffled = sorted;
  std::shuffle(shuffled.begin(), shuffled.end(), rng);
  std::mt19937_64 r0(seed);
  Table base(GetParam(), 130, 9, r0);
  base.step(idx, g);
  for (const auto& order : {reversed, shuffled}) {
    std::mt19937_64 r(seed);
    Table t(GetParam(), 130, 9, r);
    const auto [i2, g2] = permuted(order);
    t.step(i2, g2);
    expect_same(t.everything(), base.everything(), "a permutation of distinct indices");
  }
  std::mt19937_64 r32(seed);
  Table narrow(GetParam(), 130, 9, r32);
  narrow.step(idx, g, /*int32=*/true);
  expect_same(narrow.everything(), base.everything(), "int32 indices vs int64");
}

TEST_P(Sparse, BadIndicesAreRejectedWithNothingChanged) {
  auto rng = make_rng();
  Table t(GetParam(), 100, 5, rng);
  t.step({1, 2, 3}, rows_of(rng, 3, 5));
  const auto before = t.everything();
  const std::vector<std::int64_t> bad_values = {100, -1, std::numeric_limits<std::int32_t>::max(),
                                                (std::int64_t{1} << 31) + 7,
                                                -(std::int64_t{1} << 40)};
  for (std::int64_t bad : bad_values) {
    for (bool int32 : {false, true}) {
      if (int32 && (bad > std::numeric_limits<std::int32_t>::max() ||
                    bad < std::numeric_limits<std::int32_t>::min()))
        continue;
      SCOPED_TRACE("bad index " + std::to_string(bad) + (int32 ? " (int32)" : " (int64)"));
      try {
        t.step({4, 5, bad, 6, bad}, rows_of(rng, 5, 5), int32);
        ADD_FAILURE() << "accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), StatusCode::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("at position 2"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(std::to_string(bad)), std::string::npos) << e.what();
      }
      expect_same(t.everything(), before, "after a rejected step");
    }
  }
  // Null pointers, a bad index dtype, negative nnz, and a dense-only algorithm.
  EXPECT_THROW(t.opt().step_sparse("table", nullptr, DType::i64, 3, nullptr), Error);
  std::vector<std::int64_t> one{1};
  EXPECT_THROW(t.opt().step_sparse("table", one.data(), DType::f32, 1, nullptr), Error);
  EXPECT_THROW(t.opt().step_sparse("table", one.data(), DType::i64, -1, nullptr), Error);
  expect_same(t.everything(), before, "after rejected arguments");
  Optimizer sgd("sgd");
  std::vector<float> w(10);
  sgd.add_param("w", w.data(), DType::f32, {2, 5});
  try {
    sgd.step_sparse("w", one.data(), DType::i64, 1, w.data());
    ADD_FAILURE() << "sgd took a sparse step";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::unsupported);
  }
}

TEST_P(Sparse, NoIndicesStillCountsTheStep) {
  auto rng = make_rng();
  Table t(GetParam(), 20, 4, rng);
  const auto before = t.values();
  t.step({}, {});
  EXPECT_EQ(t.opt().step_count("table"), 1);
  EXPECT_TRUE(bitwise_equal(t.values(), before));
  t.step({3}, rows_of(rng, 1, 4));
  EXPECT_EQ(t.opt().step_count("table"), 2);
}

TEST_P(Sparse, ANanInOneRowDoesNotSpread) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  std::mt19937_64 r1(seed), r2(seed);
  Table with_nan(GetParam(), 64, 8, r1), clean(GetParam(), 64, 8, r2);
  std::vector<std::int64_t> idx = {3, 10, 11, 40};
  std::vector<float> g = rows_of(rng, idx.size(), 8);
  clean.step(idx, g);
  g[1 * 8 + 5] = std::numeric_limits<float>::quiet_NaN();  // row 10, column 5
  with_nan.step(idx, g);
  const auto a = with_nan.everything(), b = clean.everything();
  for (std::size_t k = 0; k + 1 < a.size(); ++k)
    for (std::size_t i = 0; i < a[k].size(); ++i) {
      if (i / (a[k].size() / 64) == 10) continue;  // row 10, per element or per row
      ASSERT_EQ(std::memcmp(&a[k][i], &b[k][i], 4), 0) << "item " << k << "[" << i << "]";
    }
  EXPECT_TRUE(std::isnan(with_nan.values()[10 * 8 + 5]));
}

TEST(SparseLazyAdam, EveryRowOnceEqualsTheDenseStep) {
  auto rng = make_rng();
  const std::int64_t rows = 33, dim = 19;
  std::vector<float> dense_p = random_floats(rng, rows * dim);
  std::vector<float> sparse_p = dense_p;
  Optimizer dense("lazyadam"), sparse("lazyadam");
  dense.add_param("t", dense_p.data(), DType::f32, {rows, dim});
  sparse.add_param("t", sparse_p.data(), DType::f32, {rows, dim});
  std::vector<std::int64_t> idx(rows);
  std::iota(idx.begin(), idx.end(), 0);
  std::shuffle(idx.begin(), idx.end(), rng);
  for (int t = 0; t < 5; ++t) {
    const std::vector<float> g = random_floats(rng, rows * dim);
    std::vector<float> g_rows;  // row idx[k] of g at position k
    for (std::int64_t r : idx)
      g_rows.insert(g_rows.end(), g.begin() + r * dim, g.begin() + (r + 1) * dim);
    dense.step({g.data()});
    sparse.step_sparse("t", idx.data(), DType::i64, rows, g_rows.data());
  }
  EXPECT_TRUE(bitwise_equal(sparse_p, dense_p)) << first_difference(sparse_p, dense_p);
  for (const char* s : {"exp_avg", "exp_avg_sq"})
    EXPECT_TRUE(bitwise_equal(sparse.state("t", s), dense.state("t", s))) << s;
}

TEST(SparseAdagrad, WeightDecayIsRejectedForSparseSteps) {
  Optimizer opt("adagrad");
  std::vector<float> w(10), g(5);
  std::vector<std::int64_t> idx{1};
  opt.set_option("weight_decay", 0.1);
  opt.add_param("w", w.data(), DType::f32, {2, 5});
  EXPECT_THROW(opt.step_sparse("w", idx.data(), DType::i64, 1, g.data()), Error);
}

// Row-wise AdaGrad's exact arithmetic, bit for bit, on many rows of dims that take one
// partial, one full and several 32-lane passes. The expected mean square is computed as a CUDA
// warp computes it (kernels/rowwise.hpp): lane l sums the squares of columns l, l + 32, ...;
// then __shfl_down_sync by 16, 8, 4, 2, 1, a lane whose partner is past the warp keeping its
// value; lane 0 divided by dim. The library with a plain sequential sum instead fails this at
// every dim from 5 up (tried once, by mutation).
float warp_mean_square(const float* g, std::int64_t dim) {
  float lane[32] = {};
  for (std::int64_t j = 0; j < dim; ++j) lane[j % 32] = lane[j % 32] + g[j] * g[j];
  for (int w = 16; w >= 1; w /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = l + w < 32 ? lane[l] + lane[l + w] : lane[l];
    std::copy(next, next + 32, lane);
  }
  return lane[0] / static_cast<float>(dim);
}

TEST(SparseRowwiseAdagrad, FollowsTheDocumentedOrderBitwise) {
  auto rng = make_rng();
  const std::int64_t rows = 200;
  for (std::int64_t dim : {1, 5, 31, 32, 33, 64, 130, 1000}) {
    SCOPED_TRACE("dim " + std::to_string(dim));
    std::vector<float> table = random_floats(rng, static_cast<std::size_t>(rows * dim));
    const std::vector<float> p0 = table;
    Optimizer opt("adagrad");
    opt.set_option("rowwise", 1);
    opt.set_option("lr", 0.5);
    opt.set_option("initial_accumulator_value", 0.25);
    opt.add_param("t", table.data(), DType::f32, {rows, dim});
    std::vector<std::int64_t> idx(static_cast<std::size_t>(rows));
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), rng);
    idx.resize(static_cast<std::size_t>(rows - 7));  // seven rows stay untouched
    const std::vector<float> g = rows_of(rng, idx.size(), dim);
    opt.step_sparse("t", idx.data(), DType::i64, static_cast<std::int64_t>(idx.size()), g.data());
    const std::vector<float> sums = opt.state("t", "sum");
    std::vector<float> want_sums(static_cast<std::size_t>(rows), 0.25f), want = p0;
    for (std::size_t k = 0; k < idx.size(); ++k) {
      const float* gk = g.data() + k * static_cast<std::size_t>(dim);
      const std::int64_t r = idx[k];
      const float sum = 0.25f + warp_mean_square(gk, dim);
      want_sums[static_cast<std::size_t>(r)] = sum;
      const float rate = 0.5f / (std::sqrt(sum) + 1e-10f);
      for (std::int64_t j = 0; j < dim; ++j)
        want[r * dim + j] = std::fma(-rate, gk[j], p0[r * dim + j]);
    }
    EXPECT_TRUE(bitwise_equal(sums, want_sums)) << first_difference(sums, want_sums);
    EXPECT_TRUE(bitwise_equal(table, want)) << first_difference(table, want);
  }
}

TEST(SparseRowwiseAdagrad, StateIsOnePerRowAndDenseStepsAreRejected) {
  auto rng = make_rng();
  const Case c{"adagrad", Device::cpu, {{"rowwise", 1}}, "rowwise"};
  Table t(c, 40, 7, rng);
  EXPECT_EQ(t.opt().state_numel("table", "sum"), 40);
  EXPECT_EQ(t.opt().state("table", "sum").size(), 40u);  // before the first step too
  t.step({3, 9, 3}, rows_of(rng, 3, 7));
  const auto before = t.everything();
  std::vector<float> g = random_floats(rng, 40 * 7);
  std::vector<float> wrong(40 * 7);
  auto expect = [&](auto&& f, StatusCode code, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "accepted; expected an error mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    expect_same(t.everything(), before, "after a rejected call");
  };
  expect([&] { t.opt().step({g.data()}); }, StatusCode::unsupported, "sparse steps");
  expect([&] { t.opt().get_state("table", "sum", wrong.data(), 40 * 7); },
         StatusCode::invalid_argument, "40 values");
  expect([&] { t.opt().set_option("rowwise", 0); }, StatusCode::invalid_argument, "row-wise");
  expect([&] { t.opt().set_param_option("table", "rowwise", 0); }, StatusCode::invalid_argument,
         "row-wise");
  // The stateless API has no rows: it refuses the option outright.
  Adagrad::Options o;
  o.rowwise = true;
  std::vector<float> p(8), grad(8), sum(8);
  DenseTensors dense;
  dense.param = p.data();
  dense.grad = grad.data();
  dense.states[0] = sum.data();
  dense.numel = 8;
  expect([&] { fused_step<Adagrad>(o, 1, dense); }, StatusCode::unsupported, "rowwise");
  // Before a param has stepped, rowwise may still change.
  std::vector<float> fresh(12);
  Optimizer other("adagrad");
  other.set_option("rowwise", 1);
  other.add_param("w", fresh.data(), DType::f32, {3, 4});
  other.set_option("rowwise", 0);
  EXPECT_EQ(other.state_numel("w", "sum"), 12);
}

TEST(SparseGpu, GpuEqualsCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  for (const auto& c : cases()) {
    if (c.device != Device::cpu) continue;
    // dim 33: one full warp-wide pass plus a tail; 130: four passes plus a tail of two.
    for (std::int64_t dim : {33, 130}) {
      const std::string what = c.algorithm + " " + c.variant + " dim " + std::to_string(dim);
      auto rng = make_rng(what);
      const std::uint64_t seed = rng();
      std::mt19937_64 r1(seed), r2(seed);
      Table cpu(c, 1000, dim, r1),
          gpu({c.algorithm, Device::cuda, c.options, c.variant}, 1000, dim, r2);
      for (int t = 0; t < 5; ++t) {
        std::vector<std::int64_t> idx(5000);
        for (auto& i : idx) i = std::uniform_int_distribution<std::int64_t>(0, 999)(rng);
        const std::vector<float> g = rows_of(rng, idx.size(), dim);
        cpu.step(idx, g);
        gpu.step(idx, g);
      }
      expect_same(gpu.everything(), cpu.everything(), what + ": GPU vs CPU");
    }
  }
}

// Sparse steps over 8- and 4-bit states (docs/quantized-states.md): the CUDA row kernel and the
// CPU give the same table and state bytes (decoded states compared bitwise; the codes and
// scales are those of the decoded values, so equal values are equal bytes), rows of one and of
// three blocks, repeated indices. (The kernel against a per-block reference: emulation_test.)
TEST(SparseQuantized, CudaEqualsCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  for (const auto& c : cases()) {
    if (c.device != Device::cpu || c.rowwise()) continue;
    for (const double state_dtype : {5.0, 6.0}) {
      const std::int64_t w = state_dtype == 5.0 ? 256 : 128;
      for (std::int64_t dim : {w, 3 * w}) {
        const std::string what = c.algorithm + (state_dtype == 5.0 ? " 8-bit" : " 4-bit") +
                                 " dim " + std::to_string(dim);
        auto rng = make_rng(what);
        const std::uint64_t seed = rng();
        std::mt19937_64 r1(seed), r2(seed);
        const Options quantized = {{"state_dtype", state_dtype}, {"min_quant_size", 0}};
        Table cpu(c, 200, dim, r1, quantized),
            gpu({c.algorithm, Device::cuda, c.options, c.variant}, 200, dim, r2, quantized);
        for (int t = 0; t < 4; ++t) {
          std::vector<std::int64_t> idx(300);
          for (auto& i : idx) i = std::uniform_int_distribution<std::int64_t>(0, 199)(rng);
          const std::vector<float> g = rows_of(rng, idx.size(), dim);
          cpu.step(idx, g);
          gpu.step(idx, g);
        }
        expect_same(gpu.everything(), cpu.everything(), what + ": GPU vs CPU");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, Sparse, ::testing::ValuesIn(cases()), [](const auto& param_info) {
  const Case& c = param_info.param;
  return c.algorithm + (c.variant.empty() ? "" : "_" + c.variant) +
         (c.device == Device::cuda ? "_cuda" : "_cpu");
});

}  // namespace
}  // namespace fo::test
