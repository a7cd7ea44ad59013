// The CPU's encoder of quantized states (kernels/quantize.hpp): nearest_code by a table
// instead of a binary search. A float's top 16 bits (sign, exponent, 7 mantissa bits) name an
// interval of floats; for each interval the table holds the code of its smallest value, and
// the code of any y in it is that code plus the number of the map's thresholds at or below y
// inside the interval. Every map here has at most kCrossings thresholds in one interval
// (checked when the table is built), so a code is one table load and kCrossings compares,
// independent across elements, where the search is Bits dependent compares.
//
// Equal to nearest_code for every float: y outside [-1, 1] (never a normalized value; NaN and
// infinities among them) takes nearest_code itself. tests/quantize_test.cpp checks both ends
// of every interval and both sides of every threshold.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "fusedopt/kernels/quantize.hpp"

namespace fo::cpu {

template <int Bits>
class NearestCodeTable {
 public:
  static constexpr int kCrossings = 2;

  explicit NearestCodeTable(const QuantMap<Bits>& q) : q_(q), base_((1u << 16) + 3) {
    constexpr int kCodes = QuantMap<Bits>::kCodes;
    for (int k = 0; k < kCodes - 1; ++k) threshold_[k] = q.threshold[k];
    for (int k = kCodes - 1; k < kCodes + kCrossings; ++k)  // never reached: y <= 1 < +inf
      threshold_[k] = std::numeric_limits<float>::infinity();
    for (std::uint32_t prefix = 0; prefix < (1u << 16); ++prefix) {
      // The interval's smallest and largest values: the float order reverses for negatives.
      const float a = float_of(prefix << 16), b = float_of((prefix << 16) | 0xFFFFu);
      // Only its part in [-1, 1] is looked up (the intervals of 1 and -1 hold larger values).
      float lo = prefix & 0x8000u ? b : a, hi = prefix & 0x8000u ? a : b;
      lo = lo < -1.0f ? -1.0f : lo;
      hi = hi > 1.0f ? 1.0f : hi;
      if (!(lo <= hi)) {  // wholly outside [-1, 1], or NaN: never looked up
        base_[prefix] = 0;
        continue;
      }
      const int c_lo = nearest_code(q, lo), c_hi = nearest_code(q, hi);
      if (c_hi - c_lo > kCrossings)
        throw std::logic_error("NearestCodeTable: too many thresholds in one interval");
      base_[prefix] = static_cast<std::uint8_t>(c_lo);
    }
  }

  /// The codes of the interval starts by prefix (3 bytes of padding after them, so that a
  /// 4-byte gather at the last one stays inside), and the thresholds with kCrossings + 1
  /// infinities after the last: what a vectorized encoder (encode_block_avx512) reads.
  const std::uint8_t* base() const { return base_.data(); }
  const float* thresholds() const { return threshold_; }

  int operator()(float y) const {
    if (!(y >= -1.0f && y <= 1.0f)) return nearest_code(q_, y);
    const int c = base_[bits_of(y) >> 16];
    int code = c;
    for (int j = 0; j < kCrossings; ++j) code += y >= threshold_[c + j] ? 1 : 0;
    return code;
  }

 private:
  static float float_of(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static std::uint32_t bits_of(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }

  const QuantMap<Bits>& q_;
  float threshold_[QuantMap<Bits>::kCodes + kCrossings];
  std::vector<std::uint8_t> base_;
};

/// The table of one of quantize.hpp's four maps (by its address), built once: 64 KiB each.
template <int Bits>
const NearestCodeTable<Bits>& nearest_code_table(const QuantMap<Bits>& q) {
  if constexpr (Bits == 8) {
    static const NearestCodeTable<8> s(kQuantMap8Signed), u(kQuantMap8Unsigned);
    if (&q == &kQuantMap8Signed) return s;
    if (&q == &kQuantMap8Unsigned) return u;
  } else {
    static const NearestCodeTable<4> s(kQuantMap4Signed), u(kQuantMap4Unsigned);
    if (&q == &kQuantMap4Signed) return s;
    if (&q == &kQuantMap4Unsigned) return u;
  }
  throw std::logic_error("nearest_code_table: not one of quantize.hpp's maps");
}

/// block_absmax (quantize.hpp) in a form the compiler vectorizes: the largest of the
/// magnitudes' bit patterns (sign cleared, a non-negative float's bits order as its value, and
/// every NaN's and infinity's bits lie above the largest finite float's), then that magnitude,
/// or NaN if it is not finite.
inline float block_absmax_fast(const float* x, int n) {
  std::uint32_t m = 0;
  for (int i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    u &= 0x7FFFFFFFu;
    m = u > m ? u : m;
  }
  if (m >= 0x7F800000u) return std::numeric_limits<float>::quiet_NaN();
  float f;
  std::memcpy(&f, &m, sizeof f);
  return f;
}

#if defined(FO_HAVE_X86_ISAS)
/// codes[i] = the table's code of x[i] / absmax for i < n (n <= 256), 16 lanes at a time: the
/// same division, table load and compares as NearestCodeTable::operator(). absmax finite and
/// > 0 (so every x[i] / absmax is in [-1, 1]). Defined in isa_avx512.cpp; call it only where
/// the CPU runs AVX-512 kernels (cpu::isa()).
void encode_block_avx512(const std::uint8_t* base, const float* thresholds, const float* x,
                         float absmax, int n, std::int32_t* codes);
#endif

}  // namespace fo::cpu
