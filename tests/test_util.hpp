// Shared test helpers: a seeded RNG (fresh each run, printed, overridable), comparisons that
// print the first mismatches, and snapshots for "nothing changed" checks.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fusedopt/optimizer.hpp"

namespace fo::test {

/// The run's seed: FUSEDOPT_TEST_SEED if set, else fresh from the OS. Printed once.
inline std::uint64_t run_seed() {
  static const std::uint64_t seed = [] {
    std::uint64_t s;
    if (const char* env = std::getenv("FUSEDOPT_TEST_SEED"))
      s = std::strtoull(env, nullptr, 0);
    else
      s = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
    std::printf("fusedopt test seed: %llu (set FUSEDOPT_TEST_SEED to reproduce)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

/// A generator for one test, derived from the run's seed and the test's name.
inline std::mt19937_64 make_rng(const std::string& salt = "") {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = salt;
  if (info) name += std::string(info->test_suite_name()) + "." + info->name();
  return std::mt19937_64(run_seed() ^ std::hash<std::string>{}(name));
}

/// Normal values times a random scale in [0.1, 10): magnitudes vary across tensors.
inline std::vector<float> random_floats(std::mt19937_64& rng, std::size_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float scale = std::pow(10.0f, std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng));
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng) * scale;
  return v;
}

/// A float's bit pattern.
inline std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

/// First index where two float vectors differ bitwise, with both values, for messages.
inline std::string first_difference(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size())
    return "sizes differ: " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0) {
      std::ostringstream s;
      s.precision(9);
      s << "first difference at " << i << ": got " << got[i] << ", want " << want[i];
      return s.str();
    }
  return "equal";
}

/// Every buffer of `a` bitwise equal to the same buffer of `b` (params, states, counts...).
inline void expect_same(const std::vector<std::vector<float>>& a,
                        const std::vector<std::vector<float>>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (std::size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(bitwise_equal(a[i], b[i]))
        << what << ", item " << i << ": " << first_difference(a[i], b[i]);
}

/// `shape` for a param of `algorithm`, or, where the algorithm steps matrices only (muon) and
/// `shape` has fewer than two dimensions, the same elements as one row [1, numel]: for the
/// generic tests that step every algorithm on vectors.
inline std::vector<std::int64_t> shape_for(const std::string& algorithm,
                                           const std::vector<std::int64_t>& shape) {
  bool matrix_only = false;
  for (const AlgorithmDescription& d : dense_algorithms())
    matrix_only = matrix_only || (d.name == algorithm && d.matrix_only);
  if (!matrix_only || shape.size() >= 2) return shape;
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return {1, n};
}

}  // namespace fo::test
