// The demo's data: the UCI handwritten digits (scikit-learn's copy, data/README.md), read from
// the gzipped CSV, scaled to [0, 1] and split deterministically into train and test sets.
//
//   fo::demo::Split s = fo::demo::split_dataset(fo::demo::load_digits(path), 360, seed);
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fo::demo {

inline constexpr int kFeatures = 64;  // 8x8 pixels
inline constexpr int kClasses = 10;

/// A small deterministic generator (splitmix64): the same stream on every compiler and
/// standard library, unlike std::shuffle and std::*_distribution, so a seed means one split,
/// one initialisation and one batch order everywhere.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform in [0, n), n > 0 (the modulo's bias, n / 2^64, is far below anything seen here).
  std::size_t below(std::size_t n) { return static_cast<std::size_t>(next() % n); }
  /// Fisher-Yates.
  template <class T>
  void shuffle(std::vector<T>& v) {
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }

 private:
  std::uint64_t state_;
};

struct Dataset {
  std::vector<float> x;  // size() rows of kFeatures, row-major, in [0, 1]
  std::vector<int> y;    // labels 0..9
  std::size_t size() const { return y.size(); }
};

struct Split {
  Dataset train;
  Dataset test;
};

/// Where the build put the data (FUSEDOPT_DEMO_DATA: demo/data/digits.csv.gz in the source).
std::string default_data_path();

/// Reads digits.csv.gz (plain CSV works too): rows of 64 gray levels 0..16 and a label 0..9.
/// Pixels are divided by 16. Throws std::runtime_error naming the file and line of bad input.
Dataset load_digits(const std::string& path);

/// A seeded shuffle of `all`, then the last `test_size` examples are the test set.
Split split_dataset(const Dataset& all, std::size_t test_size, std::uint64_t seed);

}  // namespace fo::demo
