// Block-wise 8- and 4-bit quantization (kernels/include/fusedopt/kernels/quantize.hpp) against
// references written here from the definitions: the maps' values in long double from their
// decimal formulas, the nearest code by a linear scan, and the statistics of stochastic
// rounding.
#include "fusedopt/kernels/quantize.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/quant_encode.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

std::string describe(float x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g (%a)", static_cast<double>(x), static_cast<double>(x));
  return buf;
}

template <int Bits>
struct NamedMap {
  const char* name;
  const QuantMap<Bits>& map;
  bool is_signed;
};

const NamedMap<8> kMaps8[] = {{"8-bit signed", kQuantMap8Signed, true},
                              {"8-bit unsigned", kQuantMap8Unsigned, false}};
const NamedMap<4> kMaps4[] = {{"4-bit signed", kQuantMap4Signed, true},
                              {"4-bit unsigned", kQuantMap4Unsigned, false}};

/// The nearest code to y by a linear scan in long double; an exact tie goes to the larger
/// value. y below value[0] gives 0.
template <int Bits>
int brute_nearest(const QuantMap<Bits>& q, float y) {
  int best = 0;
  long double best_d = std::fabs(static_cast<long double>(y) - q.value[0]);
  for (int k = 1; k < QuantMap<Bits>::kCodes; ++k) {
    const long double d = std::fabs(static_cast<long double>(y) - q.value[k]);
    if (d <= best_d) best = k, best_d = d;  // values increase: `<=` takes the larger on ties
  }
  return best;
}

/// The largest k with value[k] <= y (0 if none), by a linear scan.
template <int Bits>
int brute_below(const QuantMap<Bits>& q, float y) {
  int k = 0;
  for (int j = 1; j < QuantMap<Bits>::kCodes; ++j)
    if (q.value[j] <= y) k = j;
  return k;
}

// ---- the maps -----------------------------------------------------------------------------------

/// bitsandbytes' dynamic map from its decimal definition, in long double: decade i has m
/// intervals of linspace(0.1, 1), whose means (0.1 + 0.9 (j + 1/2) / m) are scaled by
/// 10^(i - Bits + 2); signed maps add the negatives; then 0 and 1; sorted.
template <int Bits>
std::vector<long double> dynamic_map_exact(bool is_signed) {
  std::vector<long double> v = {0.0L, 1.0L};
  for (int i = 0; i < Bits - 1; ++i) {
    const int m = is_signed ? 1 << i : 1 << (i + 1);
    for (int j = 0; j < m; ++j) {
      const long double x = (0.1L + 0.9L * (j + 0.5L) / m) * std::pow(10.0L, i - Bits + 2);
      v.push_back(x);
      if (is_signed) v.push_back(-x);
    }
  }
  std::sort(v.begin(), v.end());
  return v;
}

template <int Bits>
void expect_sorted_with_thresholds(const QuantMap<Bits>& q, const char* name) {
  for (int k = 0; k + 1 < QuantMap<Bits>::kCodes; ++k) {
    ASSERT_LT(q.value[k], q.value[k + 1]) << name << " at " << k;
    // threshold[k]: the smallest float at or above the exact midpoint.
    const long double mid = (static_cast<long double>(q.value[k]) + q.value[k + 1]) / 2;
    const float t = q.threshold[k];
    EXPECT_GE(static_cast<long double>(t), mid) << name << " at " << k;
    EXPECT_LT(static_cast<long double>(std::nextafter(t, -INFINITY)), mid) << name << " at " << k;
  }
}

TEST(QuantizeMaps, SizesOrderEndsAndThresholds) {
  for (const auto& m : kMaps8) {
    expect_sorted_with_thresholds(m.map, m.name);
    EXPECT_EQ(m.map.value[255], 1.0f) << m.name;
  }
  for (const auto& m : kMaps4) {
    expect_sorted_with_thresholds(m.map, m.name);
    EXPECT_EQ(m.map.value[15], 1.0f) << m.name;
  }
  static_assert(sizeof(kQuantMap8Signed.value) == 256 * 4 && sizeof(kQuantMap4Signed.value) == 64);
  // Signed maps: 0 in the middle, negatives mirror the positives below 1, so the most negative
  // value is -value[254], not -1 (bitsandbytes appends 1 but not -1).
  EXPECT_EQ(bits(kQuantMap8Signed.value[127]), 0u);
  EXPECT_EQ(bits(kQuantMap4Signed.value[7]), 0u);
  for (int k = 0; k < 127; ++k)
    EXPECT_EQ(kQuantMap8Signed.value[k], -kQuantMap8Signed.value[254 - k]) << k;
  for (int k = 0; k < 7; ++k) EXPECT_EQ(kQuantMap4Signed.value[k], -kQuantMap4Signed.value[14 - k]);
  EXPECT_EQ(bits(kQuantMap8Unsigned.value[0]), 0u);
  // torchao's unsigned 4-bit map is linspace(0, 1, 17)[1:]: k / 16, exact, no zero.
  for (int k = 0; k < 16; ++k)
    EXPECT_EQ(kQuantMap4Unsigned.value[k], static_cast<float>(k + 1) / 16.0f) << k;
}

// Literals: create_dynamic_map in bitsandbytes/functional.py (and torchao/optim/quant_utils.py,
// the same function, called as create_dynamic_map(True, 3, 4) for torchao's signed 4-bit map),
// evaluated by hand in float32 as torch does it (linspace, means, times float(10**k)).
TEST(QuantizeMaps, SpotValuesFromTheReferenceDefinition) {
  // Appended by create_dynamic_map: 0 and 1.
  EXPECT_EQ(kQuantMap8Signed.value[255], 1.0f);
  EXPECT_EQ(kQuantMap8Unsigned.value[255], 1.0f);
  // 8-bit signed, decade 10^0 (linspace(0.1, 1, 65)): first mean 0.1 + 0.9 / 128 rounds to
  // 0x1.b66668p-4; second is (0.1140625 + 0.128125) / 2 = 0.12109375 exactly; last
  // (0.9859375 + 1) / 2 -> 0x1.fc6666p-1 (0.99296874).
  EXPECT_EQ(kQuantMap8Signed.value[191], 0x1.b66668p-4f);
  EXPECT_EQ(kQuantMap8Signed.value[192], 0.12109375f);
  EXPECT_EQ(kQuantMap8Signed.value[254], 0x1.fc6666p-1f);
  EXPECT_EQ(kQuantMap8Signed.value[0], -0x1.fc6666p-1f);
  // Smallest positive: float(1e-6) * ((0.1f + 1) / 2), the float product 0x1.27476ep-21.
  EXPECT_EQ(kQuantMap8Signed.value[128], 0x1.27476ep-21f);
  // 8-bit unsigned, decade 10^0 (linspace(0.1, 1, 129)): first mean 0.1 + 0.9 / 256 =
  // 0.103515625 (0x1.a8p-4) after the float rounding of its terms.
  EXPECT_EQ(kQuantMap8Unsigned.value[127], 0x1.a8p-4f);
  // torchao's signed 4-bit map: +-{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875}, 0, 1
  // in float32 arithmetic.
  const float positive4[] = {0x1.6872bp-8f, 0x1.0a3d72p-5f, 0x1.3d70a4p-4f, 0x1.b33332p-3f,
                             0x1.cp-2f,     0x1.533334p-1f, 0x1.c66666p-1f, 1.0f};
  for (int k = 0; k < 8; ++k) EXPECT_EQ(kQuantMap4Signed.value[8 + k], positive4[k]) << k;
}

// The float32 arithmetic of the definition lands within two ulps of each value's exact decimal
// definition (it rounds each linspace point, the sum of two of them and the product with the
// decade): an independent check of the construction, as wrong decades, counts or order would
// miss by far more. Builds of torch differ in the last bit of some 8-bit entries (see
// docs/quantized-states.md).
TEST(QuantizeMaps, WithinTwoUlpsOfTheExactDefinition) {
  auto check = [](const auto& q, const std::vector<long double>& exact, const char* name) {
    ASSERT_EQ(exact.size(), sizeof(q.value) / sizeof(float)) << name;
    for (std::size_t k = 0; k < exact.size(); ++k) {
      const float v = q.value[k];
      const long double ulp = std::fabs(static_cast<long double>(std::nextafter(v, INFINITY)) - v);
      EXPECT_LE(std::fabs(static_cast<long double>(v) - exact[k]), 2 * ulp)
          << name << " at " << k << ": " << describe(v);
    }
  };
  check(kQuantMap8Signed, dynamic_map_exact<8>(true), "8-bit signed");
  check(kQuantMap8Unsigned, dynamic_map_exact<8>(false), "8-bit unsigned");
  check(kQuantMap4Signed, dynamic_map_exact<4>(true), "4-bit signed");
}

// ---- exhaustive round trips over the codes ------------------------------------------------------

const float kScales[] = {1.0f, 0.37f, 1e-8f, 12345.678f, 0x1p-60f, 3e30f};

TEST(QuantizeRoundTrip, EveryCodeTimesAScaleIsExact) {
  for (float s : kScales) {
    for (const auto& m : kMaps8) {
      // One block holding every code's value * s: its absmax is 1 * s.
      std::vector<float> x(256), out(256);
      for (int k = 0; k < 256; ++k) x[k] = m.map.value[k] * s;
      std::vector<std::uint8_t> codes(256);
      const float absmax = quantize_block8(m.map, x.data(), 256, codes.data(), NearestRounding{});
      ASSERT_EQ(absmax, s) << m.name;
      dequantize_block8(m.map, codes.data(), 256, absmax, out.data());
      for (int k = 0; k < 256; ++k) {
        EXPECT_EQ(codes[k], k) << m.name << ", scale " << s;
        EXPECT_EQ(bits(out[k]), bits(x[k])) << m.name << ", scale " << s << ", code " << k;
      }
    }
    for (const auto& m : kMaps4) {
      // A full block of 128: the 16 codes eight times over.
      std::vector<float> x(128), out(128);
      for (int i = 0; i < 128; ++i) x[i] = m.map.value[i % 16] * s;
      std::vector<std::uint8_t> packed(64);
      const float absmax = quantize_block4(m.map, x.data(), 128, packed.data(), NearestRounding{});
      ASSERT_EQ(absmax, s) << m.name;
      dequantize_block4(m.map, packed.data(), 128, absmax, out.data());
      for (int i = 0; i < 128; ++i) {
        EXPECT_EQ(code4_at(packed.data(), i), i % 16) << m.name << ", scale " << s;
        EXPECT_EQ(bits(out[i]), bits(x[i])) << m.name << ", scale " << s << ", element " << i;
      }
    }
  }
}

TEST(QuantizeRoundTrip, FourBitPackingIsLowNibbleFirst) {
  const float x[5] = {1.0f, 0.0f, -0.4375f, 0.0055f, -1.0f};  // 4-bit signed codes 15 7 2 8 0
  std::uint8_t packed[3] = {0xAA, 0xAA, 0xAA};
  quantize_block4(kQuantMap4Signed, x, 5, packed, NearestRounding{});
  EXPECT_EQ(packed[0], 0x7F);
  EXPECT_EQ(packed[1], 0x82);
  EXPECT_EQ(packed[2], 0x00);  // element 4's code 0, the unused high nibble 0
  EXPECT_EQ(packed4_bytes(5), 3);
  EXPECT_EQ(packed4_bytes(kQuant4BlockSize), 64);
}

// ---- random blocks
// --------------------------------------------------------------------------------

/// Normal values with outliers (a few elements 10^3 times larger), of either sign; squared for
/// an unsigned map, as second moments are.
std::vector<float> random_state(std::mt19937_64& rng, std::size_t n, bool is_signed) {
  std::vector<float> v = random_floats(rng, n);
  std::uniform_int_distribution<std::size_t> pick(0, n - 1);
  for (std::size_t k = 0; k < n / 50 + 1; ++k) v[pick(rng)] *= 1000.0f;
  if (!is_signed)
    for (auto& x : v) x = x * x;
  return v;
}

/// Checks one block's codes and decoded values against the brute-force nearest code and the
/// error bound. Bound: with y = x / absmax between the codes' values a <= y <= b, the nearest
/// is at most (b - a) / 2 from y; below the smallest value v0 it is v0 - y. Times absmax, plus
/// the two roundings (y = x / absmax and value * absmax, half an ulp each: at most 2^-24 of
/// |x| and of |decoded|).
template <int Bits>
void check_block(const QuantMap<Bits>& q, const float* x, int n, float absmax, const int* codes,
                 const float* decoded, const std::string& what) {
  int bad = 0;
  for (int i = 0; i < n && bad < 5; ++i) {
    const float y = normalized(x[i], absmax);
    const int want = brute_nearest(q, y);
    const int lo = brute_below(q, y);
    const long double gap = y < q.value[0] ? static_cast<long double>(q.value[0]) - y
                            : lo + 1 < QuantMap<Bits>::kCodes
                                ? (static_cast<long double>(q.value[lo + 1]) - q.value[lo]) / 2
                                : 0.0L;
    const long double bound = gap * absmax + 0x1p-24L * (std::fabs(static_cast<long double>(x[i])) +
                                                         std::fabs(decoded[i]));
    const long double err = std::fabs(static_cast<long double>(decoded[i]) - x[i]);
    if (codes[i] != want || err > bound) {
      ++bad;
      ADD_FAILURE() << what << ", element " << i << ": x " << describe(x[i]) << ", absmax "
                    << describe(absmax) << ", code " << codes[i] << " (want " << want
                    << "), decoded " << describe(decoded[i]) << ", error "
                    << static_cast<double>(err) << " > bound " << static_cast<double>(bound);
    }
  }
}

template <int Bits>
void check_random_tensor(const QuantMap<Bits>& q, bool is_signed, int w, std::size_t n,
                         std::mt19937_64& rng, const std::string& name) {
  const std::vector<float> x = random_state(rng, n, is_signed);
  for (std::size_t start = 0; start < n; start += static_cast<std::size_t>(w)) {
    const int len = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(w), n - start));
    std::vector<std::uint8_t> storage(static_cast<std::size_t>(w), 0xEE);
    std::vector<float> out(static_cast<std::size_t>(len), std::nanf(""));
    std::vector<int> codes(static_cast<std::size_t>(len));
    float absmax;
    if constexpr (Bits == 8) {
      absmax = quantize_block8(q, x.data() + start, len, storage.data(), NearestRounding{});
      dequantize_block8(q, storage.data(), len, absmax, out.data());
      for (int i = 0; i < len; ++i) codes[i] = storage[i];
    } else {
      absmax = quantize_block4(q, x.data() + start, len, storage.data(), NearestRounding{});
      dequantize_block4(q, storage.data(), len, absmax, out.data());
      for (int i = 0; i < len; ++i) codes[i] = code4_at(storage.data(), i);
      if (len % 2) {
        EXPECT_EQ(storage[len / 2] >> 4, 0) << name << ": odd block's last nibble";
      }
    }
    float want_absmax = 0.0f;
    for (int i = 0; i < len; ++i) want_absmax = std::max(want_absmax, std::fabs(x[start + i]));
    ASSERT_EQ(absmax, want_absmax) << name;
    check_block(q, x.data() + start, len, absmax, codes.data(), out.data(),
                name + ", n " + std::to_string(n) + ", block at " + std::to_string(start));
  }
}

TEST(QuantizeRandom, NearestCodeAndErrorBoundOnFullAndPartialBlocks) {
  auto rng = make_rng();
  for (const auto& m : kMaps8) {
    const std::size_t w = kQuant8BlockSize;
    for (std::size_t n : {w, std::size_t{1}, w - 1, w + 1, 37 * w + 101})
      check_random_tensor(m.map, m.is_signed, static_cast<int>(w), n, rng, m.name);
  }
  for (const auto& m : kMaps4) {
    const std::size_t w = kQuant4BlockSize;
    for (std::size_t n : {w, std::size_t{1}, w - 1, w + 1, 37 * w + 101})
      check_random_tensor(m.map, m.is_signed, static_cast<int>(w), n, rng, m.name);
  }
}

// Every float in [-1, 1] near each threshold: the binary search agrees with the linear scan.
TEST(QuantizeRandom, NearestCodeAtEveryThreshold) {
  auto check = [](const auto& q, const char* name) {
    for (float t : q.threshold)
      for (float y = std::nextafter(std::nextafter(t, -2.0f), -2.0f),
                 end = std::nextafter(std::nextafter(t, 2.0f), 2.0f);
           y <= end; y = std::nextafter(y, 2.0f))
        ASSERT_EQ(nearest_code(q, y), brute_nearest(q, y)) << name << ", y " << describe(y);
  };
  check(kQuantMap8Signed, "8-bit signed");
  check(kQuantMap8Unsigned, "8-bit unsigned");
  check(kQuantMap4Signed, "4-bit signed");
  check(kQuantMap4Unsigned, "4-bit unsigned");
}

// ---- special values -----------------------------------------------------------------------------

TEST(QuantizeSpecial, AllZeroBlockDecodesToZero) {
  std::vector<float> x(256, 0.0f), out(256, std::nanf(""));
  x[3] = -0.0f;
  std::vector<std::uint8_t> codes(256);
  for (const auto& m : kMaps8) {
    const float absmax = quantize_block8(m.map, x.data(), 256, codes.data(), NearestRounding{});
    EXPECT_EQ(bits(absmax), 0u) << m.name;
    dequantize_block8(m.map, codes.data(), 256, absmax, out.data());
    for (float v : out) ASSERT_EQ(v, 0.0f) << m.name;
  }
  for (const auto& m : kMaps4) {
    const float absmax =
        quantize_block4(m.map, x.data(), 128, codes.data(), StochasticRounding{1, 2, 3});
    EXPECT_EQ(bits(absmax), 0u) << m.name;
    dequantize_block4(m.map, codes.data(), 128, absmax, out.data());
    for (int i = 0; i < 128; ++i) ASSERT_EQ(out[i], 0.0f) << m.name;  // 1/16 * 0 too
  }
}

TEST(QuantizeSpecial, NanOrInfMakesTheWholeBlockNan) {
  auto rng = make_rng();
  const float specials[] = {std::nanf(""), -std::nanf(""), INFINITY, -INFINITY};
  for (float s : specials) {
    std::vector<float> x = random_floats(rng, 256), out(256, 0.0f);
    x[rng() % 128] = s;  // in the first 128: the 4-bit blocks below
    std::vector<std::uint8_t> codes(256);
    for (const auto& m : kMaps8) {
      const float absmax = quantize_block8(m.map, x.data(), 256, codes.data(), NearestRounding{});
      EXPECT_EQ(bits(absmax), 0x7FC00000u) << m.name << " with " << s;
      dequantize_block8(m.map, codes.data(), 256, absmax, out.data());
      for (float v : out) ASSERT_TRUE(std::isnan(v)) << m.name << " with " << s;
    }
    for (const auto& m : kMaps4) {
      const float absmax =
          quantize_block4(m.map, x.data(), 128, codes.data(), StochasticRounding{4, 5, 6});
      EXPECT_TRUE(std::isnan(absmax)) << m.name << " with " << s;
      dequantize_block4(m.map, codes.data(), 128, absmax, out.data());
      for (int i = 0; i < 128; ++i) ASSERT_TRUE(std::isnan(out[i])) << m.name << " with " << s;
    }
  }
}

TEST(QuantizeSpecial, AbsmaxIsTheSameForAnyReductionOrder) {
  const float nan = std::nanf("");
  EXPECT_TRUE(std::isnan(absmax_combine(nan, 1.0f)));
  EXPECT_TRUE(std::isnan(absmax_combine(1.0f, nan)));
  EXPECT_TRUE(std::isnan(absmax_combine(INFINITY, nan)));
  EXPECT_EQ(absmax_combine(2.0f, 1.0f), 2.0f);
  EXPECT_EQ(absmax_combine(1.0f, 2.0f), 2.0f);
}

// Unsigned maps hold second moments, never negative. A negative x (which the optimizer does
// not produce) gets code 0: 0 for the 8-bit map (clamped to 0), absmax / 16 for the 4-bit map,
// which has no zero. Its magnitude still counts towards absmax, as in the signed maps.
TEST(QuantizeSpecial, UnsignedMapsClampNegativesToTheSmallestCode) {
  const float x[4] = {0.5f, -0.25f, -2.0f, 1.0f};
  std::uint8_t codes[4];
  float out[4];
  const float a8 = quantize_block8(kQuantMap8Unsigned, x, 4, codes, NearestRounding{});
  EXPECT_EQ(a8, 2.0f);
  dequantize_block8(kQuantMap8Unsigned, codes, 4, a8, out);
  EXPECT_EQ(codes[1], 0);
  EXPECT_EQ(codes[2], 0);
  EXPECT_EQ(out[1], 0.0f);
  EXPECT_EQ(out[2], 0.0f);
  std::uint8_t packed[2];
  const float a4 = quantize_block4(kQuantMap4Unsigned, x, 4, packed, StochasticRounding{7, 8, 9});
  dequantize_block4(kQuantMap4Unsigned, packed, 4, a4, out);
  EXPECT_EQ(out[1], 2.0f / 16.0f);
  EXPECT_EQ(out[2], 2.0f / 16.0f);
  EXPECT_EQ(out[0], 0.5f);  // 0.5 / 2 = 4 / 16 and 1 / 2 = 8 / 16 exactly: every draw keeps them
  EXPECT_EQ(out[3], 1.0f);
  // The signed maps keep the sign.
  EXPECT_LT(decode(kQuantMap8Signed, nearest_code(kQuantMap8Signed, -0.125f), 1.0f), 0.0f);
}

// ---- stochastic rounding ----------------------------------------------------------------------

/// Draws y's code kDraws times from random_bits: always one of the two neighbours, and the
/// mean of the decoded values within 5 standard errors of y (one draw's deviation from its
/// mean is at most the gap g = b - a, its standard deviation g sqrt(p (1 - p))).
template <int Bits>
void check_unbiased(const QuantMap<Bits>& q, float y, std::uint64_t seed, const char* name) {
  constexpr int kDraws = 20000;
  const int lo = brute_below(q, y);
  if (y < q.value[0] || lo == QuantMap<Bits>::kCodes - 1) {
    for (int i = 0; i < 100; ++i)
      ASSERT_EQ(stochastic_code(q, y, uniform_from_bits(random_bits(seed, 1, i))), lo) << name;
    return;
  }
  const double a = q.value[lo], b = q.value[lo + 1], p = (y - a) / (b - a);
  double sum = 0.0;
  for (int i = 0; i < kDraws; ++i) {
    const StochasticRounding r{seed, 11, static_cast<std::uint64_t>(i)};
    const int c = encode(q, y, 0, r);
    ASSERT_TRUE(c == lo || c == lo + 1) << name << ", y " << describe(y) << " gave " << c;
    if (p == 0.0) {
      ASSERT_EQ(c, lo) << name << ": a map value must stay exact";
    }
    sum += q.value[c];
  }
  const double se = (b - a) * std::sqrt(p * (1.0 - p) / kDraws);
  EXPECT_NEAR(sum / kDraws, static_cast<double>(y), 5.0 * se + 1e-7 * (b - a))
      << name << ", y " << describe(y) << ", p " << p;
}

TEST(QuantizeStochastic, UnbiasedAndAlwaysANeighbour) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  std::uniform_real_distribution<float> in01(0.0f, 1.0f), in11(-1.0f, 1.0f), tiny(-1e-5f, 1e-5f);
  for (int t = 0; t < 6; ++t) {
    const float ys[] = {in11(rng), tiny(rng), in01(rng), std::pow(in01(rng), 4.0f)};
    for (float y : ys) {
      check_unbiased(kQuantMap8Signed, y, seed, "8-bit signed");
      check_unbiased(kQuantMap4Signed, y, seed, "4-bit signed");
      check_unbiased(kQuantMap8Unsigned, std::fabs(y), seed, "8-bit unsigned");
      check_unbiased(kQuantMap4Unsigned, std::fabs(y), seed, "4-bit unsigned");
    }
  }
  // Map values stay exact; the ends and values outside the map get the end code.
  for (float y : {kQuantMap8Signed.value[200], 1.0f, -0.999f, 0.0f})
    check_unbiased(kQuantMap8Signed, y, seed, "8-bit signed");
  check_unbiased(kQuantMap4Unsigned, 0.01f, seed, "4-bit unsigned");
}

TEST(QuantizeStochastic, BlockCodesAreNeighboursAndReproducible) {
  auto rng = make_rng();
  const std::vector<float> x = random_state(rng, 256, true);
  const StochasticRounding r{rng(), 42, 256 * 7};
  std::vector<std::uint8_t> c1(256), c2(256);
  const float absmax = quantize_block8(kQuantMap8Signed, x.data(), 256, c1.data(), r);
  quantize_block8(kQuantMap8Signed, x.data(), 256, c2.data(), r);
  EXPECT_EQ(c1, c2);
  for (int i = 0; i < 256; ++i) {
    const int lo = brute_below(kQuantMap8Signed, normalized(x[i], absmax));
    EXPECT_TRUE(c1[i] == lo || c1[i] == lo + 1) << i;
  }
}

// The CPU's table encoder (host/src/cpu/quant_encode.hpp) against nearest_code: both ends of
// every 16-bit-prefix interval of floats, both sides of and on every threshold, the specials
// and random floats, for each of the four maps. nearest_code is a step function with its
// steps at the thresholds, so agreeing at all of these is agreeing everywhere.
template <int Bits>
void expect_table_is_nearest_code(const QuantMap<Bits>& q, const char* name) {
  const cpu::NearestCodeTable<Bits>& table = cpu::nearest_code_table(q);
  const auto float_of = [](std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  std::vector<float> ys;
  for (std::uint32_t prefix = 0; prefix < (1u << 16); ++prefix) {
    ys.push_back(float_of(prefix << 16));
    ys.push_back(float_of((prefix << 16) | 0xFFFFu));
  }
  for (int k = 0; k + 1 < QuantMap<Bits>::kCodes; ++k) {
    const float t = q.threshold[k];
    for (float y : {t, std::nextafter(t, -2.0f), std::nextafter(t, 2.0f)}) ys.push_back(y);
  }
  for (float y :
       {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(),
        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
        std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min()})
    ys.push_back(y);
  auto rng = make_rng(name);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 100000; ++i) ys.push_back(u(rng));
  std::size_t wrong = 0;
  for (float y : ys)
    if (table(y) != nearest_code(q, y) && ++wrong <= 5)
      ADD_FAILURE() << name << ": y = " << y << " gives " << table(y) << ", nearest_code "
                    << nearest_code(q, y);
  EXPECT_EQ(wrong, 0u) << name;
}

TEST(QuantizeCpuEncoder, TableEqualsNearestCodeEverywhere) {
  expect_table_is_nearest_code(kQuantMap8Signed, "8-bit signed");
  expect_table_is_nearest_code(kQuantMap8Unsigned, "8-bit unsigned");
  expect_table_is_nearest_code(kQuantMap4Signed, "4-bit signed");
  expect_table_is_nearest_code(kQuantMap4Unsigned, "4-bit unsigned");
}

TEST(QuantizeCpuEncoder, FastAbsmaxEqualsBlockAbsmax) {
  auto rng = make_rng();
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + trial % 256;
    std::vector<float> x = random_floats(rng, static_cast<std::size_t>(n));
    if (trial % 7 == 1) std::fill(x.begin(), x.end(), 0.0f);
    if (trial % 11 == 2) x[static_cast<std::size_t>(trial) % x.size()] = nan;
    if (trial % 13 == 3) x[static_cast<std::size_t>(trial) % x.size()] = trial % 2 ? inf : -inf;
    if (trial % 17 == 4) x[0] = -0.0f;
    const float a = cpu::block_absmax_fast(x.data(), n), b = block_absmax(x.data(), n);
    ASSERT_TRUE(std::memcmp(&a, &b, sizeof a) == 0 || (a != a && b != b))
        << "trial " << trial << ": " << a << " vs " << b;
  }
}

}  // namespace
}  // namespace fo::test
