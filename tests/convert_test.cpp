// fp32 <-> bf16 / f16 conversions (kernels/include/fusedopt/kernels/convert.hpp) against
// references that share no code with them: round to nearest computed in double from the two
// bracketing neighbours, the x86 F16C hardware conversion, and exhaustive round trips; and the
// statistics of stochastic rounding and of random_bits.
#include "fusedopt/kernels/convert.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "test_util.hpp"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#include <immintrin.h>
#define FO_TEST_X86 1
#endif

namespace fo::test {
namespace {

// ---- bit helpers ------------------------------------------------------------------------

float from_bits(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

std::string hex(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08X", v);
  return buf;
}

std::string describe(float x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g (%s)", static_cast<double>(x), hex(bits(x)).c_str());
  return buf;
}

// Collects mismatches, reports the first few as failures and the total at the end.
struct Mismatches {
  std::size_t count = 0;
  void add(const std::string& what) {
    if (++count <= 10) ADD_FAILURE() << what;
  }
  ~Mismatches() { EXPECT_EQ(count, 0u) << "mismatches in total"; }
};

// ---- the double-precision reference --------------------------------------------------------

/// A binary format: p significant bits (implicit one included), smallest normal 2^emin.
struct Format {
  int p;
  int emin;
  double max_finite;
};
const Format kBF16{8, -126, std::ldexp(255.0, 120)};  // (2 - 2^-7) * 2^127
const Format kF16{11, -14, 65504.0};

/// The format's values bracketing v >= 0 (finite): lo <= v < hi = lo + spacing, both as if
/// the exponent range went on upwards (callers map values past max_finite to inf).
struct Bracket {
  double lo, hi, spacing;
};

Bracket bracket(double v, const Format& f) {
  int e = 0;
  if (v != 0.0) std::frexp(v, &e);  // v in [2^(e-1), 2^e)
  const int exp = v == 0.0 ? f.emin : std::max(e - 1, f.emin);
  const double spacing = std::ldexp(1.0, exp - (f.p - 1));
  const double lo = std::floor(v / spacing) * spacing;  // exact: v has 24 bits, spacing 2^k
  return {lo, lo + spacing, spacing};
}

double overflow_to_inf(double v, const Format& f) {
  return v > f.max_finite ? std::numeric_limits<double>::infinity() : v;
}

/// Round v >= 0 to nearest, ties to the even significand; past max_finite is inf.
double round_nearest(double v, const Format& f) {
  const Bracket b = bracket(v, f);
  const double down = v - b.lo, up = b.hi - v;  // exact
  double r;
  if (down < up)
    r = b.lo;
  else if (up < down)
    r = b.hi;
  else
    r = std::fmod(b.lo / b.spacing, 2.0) == 0.0 ? b.lo : b.hi;
  return overflow_to_inf(r, f);
}

/// Bits of a bf16 value v >= 0 (or inf), with the given sign.
std::uint16_t encode_bf16(double v, bool negative) {
  const std::uint32_t u = bits(static_cast<float>(v));  // exact: v is a bf16 value
  EXPECT_EQ(u & 0xFFFFu, 0u) << v << " is not a bf16 value";
  return static_cast<std::uint16_t>((u >> 16) | (negative ? 0x8000u : 0u));
}

/// Bits of an f16 value v >= 0 (or inf), with the given sign, from the format's definition.
std::uint16_t encode_f16(double v, bool negative) {
  std::uint32_t h;
  if (std::isinf(v)) {
    h = 0x7C00u;
  } else if (v < std::ldexp(1.0, -14)) {
    const double m = std::ldexp(v, 24);
    EXPECT_EQ(m, std::floor(m)) << v << " is not an f16 subnormal";
    h = static_cast<std::uint32_t>(m);
  } else {
    int e;
    const double m = std::frexp(v, &e);  // v = m 2^e, m in [0.5, 1)
    const double frac = (2.0 * m - 1.0) * 1024.0;
    EXPECT_EQ(frac, std::floor(frac)) << v << " is not an f16 value";
    h = (static_cast<std::uint32_t>(e - 1 + 15) << 10) | static_cast<std::uint32_t>(frac);
  }
  return static_cast<std::uint16_t>(h | (negative ? 0x8000u : 0u));
}

/// The value of f16 bits from the format's definition.
double decode_f16(std::uint16_t h) {
  const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 31)
    return m ? std::numeric_limits<double>::quiet_NaN()
             : sign * std::numeric_limits<double>::infinity();
  if (e == 0) return sign * std::ldexp(m, -24);
  return sign * std::ldexp(1024 + m, e - 25);
}

std::uint16_t ref_bf16(float x) {
  return encode_bf16(round_nearest(std::fabs(static_cast<double>(x)), kBF16), std::signbit(x));
}

std::uint16_t ref_f16(float x) {
  return encode_f16(round_nearest(std::fabs(static_cast<double>(x)), kF16), std::signbit(x));
}

// ---- inputs -----------------------------------------------------------------------------

/// Every 64th float bit pattern (2^26 of them), the low 6 bits varied by a hash of the index
/// so that ties and near-ties in the dropped bits come up.
template <class F>
void for_each_sampled_pattern(F&& f) {
  for (std::uint32_t i = 0; i < (1u << 26); ++i) f((i << 6) | ((i * 0x9E3779B9u) >> 26));
}

/// Hand-picked floats: ties both ways, the edges of both formats, zeros, inf, NaN, denormals.
std::vector<float> edge_cases() {
  std::vector<std::uint32_t> u = {
      0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u,  // +-0, +-inf
      0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u,  // quiet and signalling NaNs
      0x7FFFFFFFu, 0x7F810000u, 0x7FBFFFFFu,               // NaN payloads high and low only
      0x00000001u, 0x80000001u, 0x007FFFFFu, 0x00008000u,  // fp32 denormals
      0x00018000u, 0x00008001u, 0x00007FFFu, 0x00800000u,  // denormal ties and near-ties
      0x3F808000u, 0x3F818000u, 0x3F808001u, 0x3F807FFFu,  // bf16 ties to even, both ways
      0xBF808000u, 0xBF818000u,                            // the same, negative
      0x7F7F0000u, 0x7F7F7FFFu, 0x7F7F8000u, 0x7F7FFFFFu,  // bf16 max, just below and at the
      0x7F7E8000u, 0xFF7F8000u,                            // overflow tie; tie to even at max
      0x3F801000u, 0x3F803000u, 0x3F801001u, 0x3F800FFFu,  // f16 ties to even, near-ties
      0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x477FF001u,  // 65504, just below/at 65520
      0x47800000u, 0xC77FF000u, 0x477FD000u,               // 65536, -65520, tie below max
      0x38800000u, 0x387FFFFFu, 0x387FE000u, 0x387FF000u,  // f16 smallest normal and below
      0x33800000u, 0x33000000u, 0x33000001u, 0x32FFFFFFu,  // 2^-24, 2^-25 (tie to 0), around
      0x33C00000u, 0x34200000u, 0x34000000u, 0xB3C00000u,  // 1.5, 2.5, 2 x 2^-24; -1.5 x 2^-24
      0x3F800000u, 0x40490FDBu, 0xC0490FDBu, 0x3DCCCCCDu,  // 1, pi, -pi, 0.1
  };
  std::vector<float> v;
  for (auto b : u) v.push_back(from_bits(b));
  return v;
}

// ---- F16C -------------------------------------------------------------------------------

#ifdef FO_TEST_X86
#if defined(__clang__)
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wc99-extensions"  // inside clang's _cvtss_sh macro
#endif
__attribute__((target("f16c"))) std::uint16_t hw_to_f16(float x) {
  return static_cast<std::uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float hw_from_f16(std::uint16_t h) { return _cvtsh_ss(h); }
#if defined(__clang__)
#pragma clang diagnostic pop
#endif
/// F16C and the OS saving YMM state (its VEX encoding needs it): CPUID.1:ECX bits 29 and 27,
/// XCR0 bits 1 and 2. (Like __builtin_cpu_supports("f16c"), which older clang lacks.)
bool have_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  if (!(c & (1u << 29)) || !(c & (1u << 27))) return false;
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 6u) == 6u;
}
#else
std::uint16_t hw_to_f16(float) { return 0; }
float hw_from_f16(std::uint16_t) { return 0.0f; }
bool have_f16c() { return false; }
#endif

// ---- checks shared by the RNE tests ---------------------------------------------------------

bool is_bf16_nan(std::uint16_t b) { return (b & 0x7F80u) == 0x7F80u && (b & 0x7Fu); }
bool is_f16_nan(std::uint16_t h) { return (h & 0x7C00u) == 0x7C00u && (h & 0x3FFu); }

void check_bf16_rne(float x, Mismatches& bad) {
  const std::uint16_t got = to_bf16(x).bits;
  if (std::isnan(x)) {
    // NaN stays NaN: quiet, sign kept, top payload bits kept.
    const std::uint16_t want = static_cast<std::uint16_t>((bits(x) >> 16) | 0x40u);
    if (got != want || !is_bf16_nan(got))
      bad.add("to_bf16(" + describe(x) + ") = " + hex(got) + ", want quiet NaN " + hex(want));
    return;
  }
  const std::uint16_t want = ref_bf16(x);
  if (got != want) bad.add("to_bf16(" + describe(x) + ") = " + hex(got) + ", want " + hex(want));
}

void check_f16_rne(float x, Mismatches& bad) {
  const std::uint16_t got = to_f16(x).bits;
  if (std::isnan(x)) {
    const std::uint16_t want = static_cast<std::uint16_t>(((bits(x) >> 16) & 0x8000u) | 0x7E00u |
                                                          ((bits(x) >> 13) & 0x3FFu));
    if (got != want || !is_f16_nan(got))
      bad.add("to_f16(" + describe(x) + ") = " + hex(got) + ", want quiet NaN " + hex(want));
    return;
  }
  const std::uint16_t want = ref_f16(x);
  if (got != want) bad.add("to_f16(" + describe(x) + ") = " + hex(got) + ", want " + hex(want));
}

// ---- bf16 round to nearest -----------------------------------------------------------------

TEST(ConvertBf16, RoundToNearestMatchesReferenceOnSampledPatterns) {
  Mismatches bad;
  for_each_sampled_pattern([&](std::uint32_t u) { check_bf16_rne(from_bits(u), bad); });
  auto rng = make_rng();
  for (int i = 0; i < (1 << 22); ++i)
    check_bf16_rne(from_bits(static_cast<std::uint32_t>(rng())), bad);
}

TEST(ConvertBf16, RoundToNearestEdgeCases) {
  Mismatches bad;
  for (float x : edge_cases()) check_bf16_rne(x, bad);
  // The reference's verdicts on the cases that matter most, spelled out.
  EXPECT_EQ(to_bf16(from_bits(0x3F808000u)).bits, 0x3F80u);  // tie, even below
  EXPECT_EQ(to_bf16(from_bits(0x3F818000u)).bits, 0x3F82u);  // tie, even above
  EXPECT_EQ(to_bf16(from_bits(0x3F808001u)).bits, 0x3F81u);  // just past the tie
  EXPECT_EQ(to_bf16(from_bits(0x7F7F7FFFu)).bits, 0x7F7Fu);  // just below overflow: max
  EXPECT_EQ(to_bf16(from_bits(0x7F7F8000u)).bits, 0x7F80u);  // overflow tie: inf
  EXPECT_EQ(to_bf16(from_bits(0xFF7FFFFFu)).bits, 0xFF80u);  // largest float: -inf
  EXPECT_EQ(to_bf16(from_bits(0x80000000u)).bits, 0x8000u);  // -0
  EXPECT_EQ(to_bf16(from_bits(0x00008000u)).bits, 0x0000u);  // denormal tie to 0
  EXPECT_EQ(to_bf16(from_bits(0x00018000u)).bits, 0x0002u);  // denormal tie to even
  EXPECT_EQ(to_bf16(from_bits(0x007FFFFFu)).bits, 0x0080u);  // denormal up to the min normal
  EXPECT_EQ(to_bf16(from_bits(0xFF800000u)).bits, 0xFF80u);  // -inf
  EXPECT_EQ(to_bf16(from_bits(0xFF800001u)).bits, 0xFFC0u);  // signalling NaN: quiet, sign
}

TEST(ConvertBf16, WideningIsExactAndRoundTripsAllPatterns) {
  Mismatches bad;
  for (std::uint32_t b = 0; b < 65536u; ++b) {
    const bf16 h{static_cast<std::uint16_t>(b)};
    const float x = to_float(h);
    if (bits(x) != b << 16) bad.add("to_float(bf16 " + hex(b) + ") = " + describe(x));
    const std::uint16_t back = to_bf16(x).bits;
    if (is_bf16_nan(h.bits)) {
      if (!std::isnan(x) || !is_bf16_nan(back) || (back & 0x8000u) != (b & 0x8000u) ||
          back != (b | 0x40u))
        bad.add("bf16 NaN " + hex(b) + " came back as " + hex(back));
    } else if (back != b) {
      bad.add("bf16 " + hex(b) + " came back as " + hex(back));
    }
  }
}

// The CPU storage layer's block loops (host/src/cpu/bf16_blocks.inc), compiled and vectorized
// under each instruction set's flags: the scalar conversions' bits for every bf16 pattern
// widened and for the sampled, edge and random floats rounded, at lengths that leave every
// vector tail.
TEST(ConvertBf16, EveryIsasBlockLoopsGiveTheScalarBits) {
  std::vector<float> xs;
  for_each_sampled_pattern([&](std::uint32_t u) { xs.push_back(from_bits(u)); });
  for (float x : edge_cases()) xs.push_back(x);
  auto rng = make_rng();
  for (int i = 0; i < (1 << 18); ++i) xs.push_back(from_bits(static_cast<std::uint32_t>(rng())));
  std::vector<bf16> all(65536);
  for (std::uint32_t b = 0; b < 65536u; ++b) all[b] = bf16{static_cast<std::uint16_t>(b)};
  const cpu::Isa saved = cpu::isa();
  int isas = 0;
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    SCOPED_TRACE(cpu::isa_name(isa));
    cpu::set_isa(isa);
    ++isas;
    for (std::size_t len : {std::size_t{1}, std::size_t{7}, std::size_t{15}, std::size_t{17},
                            std::size_t{31}, std::size_t{33}, std::size_t{1023}}) {
      std::vector<bf16> got(xs.size(), bf16{0x5A5A});
      for (std::size_t at = 0; at < xs.size(); at += len)
        cpu::narrow_bf16(got.data() + at, xs.data() + at, std::min(len, xs.size() - at));
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < xs.size(); ++i) wrong += got[i].bits != to_bf16(xs[i]).bits;
      EXPECT_EQ(wrong, 0u) << "rounded in blocks of " << len;
      std::vector<float> wide(all.size(), -1.0f);
      for (std::size_t at = 0; at < all.size(); at += len)
        cpu::widen_bf16(wide.data() + at, all.data() + at, std::min(len, all.size() - at));
      wrong = 0;
      for (std::size_t b = 0; b < all.size(); ++b) wrong += bits(wide[b]) != b << 16;
      EXPECT_EQ(wrong, 0u) << "widened in blocks of " << len;
    }
  }
  cpu::set_isa(saved);
  EXPECT_GE(isas, 1);
}

// ---- f16 round to nearest ------------------------------------------------------------------

TEST(ConvertF16, WideningIsExactAndRoundTripsAllPatterns) {
  Mismatches bad;
  const bool hw = have_f16c();
  for (std::uint32_t b = 0; b < 65536u; ++b) {
    const f16 h{static_cast<std::uint16_t>(b)};
    const float x = to_float(h);
    const double want = decode_f16(h.bits);
    if (is_f16_nan(h.bits)) {
      // NaN stays NaN with its sign and payload (the quiet bit as it was).
      const std::uint32_t want_bits = ((b & 0x8000u) << 16) | 0x7F800000u | ((b & 0x3FFu) << 13);
      if (bits(x) != want_bits) bad.add("to_float(f16 NaN " + hex(b) + ") = " + describe(x));
      const std::uint16_t back = to_f16(x).bits;
      if (back != (b | 0x200u)) bad.add("f16 NaN " + hex(b) + " came back as " + hex(back));
      continue;
    }
    if (static_cast<double>(x) != want || std::signbit(x) != std::signbit(want))
      bad.add("to_float(f16 " + hex(b) + ") = " + describe(x));
    if (hw && bits(x) != bits(hw_from_f16(h.bits)))
      bad.add("to_float(f16 " + hex(b) + ") = " + describe(x) + ", F16C says " +
              describe(hw_from_f16(h.bits)));
    const std::uint16_t back = to_f16(x).bits;
    if (back != b) bad.add("f16 " + hex(b) + " came back as " + hex(back));
  }
}

TEST(ConvertF16, RoundToNearestMatchesReferenceOnSampledPatterns) {
  Mismatches bad;
  for_each_sampled_pattern([&](std::uint32_t u) { check_f16_rne(from_bits(u), bad); });
  auto rng = make_rng();
  for (int i = 0; i < (1 << 22); ++i)
    check_f16_rne(from_bits(static_cast<std::uint32_t>(rng())), bad);
  // Random floats within f16's range, where the sampled patterns are thinner.
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> exp(-26, 16);
  for (int i = 0; i < (1 << 22); ++i) {
    const float x = std::ldexp(mant(rng), exp(rng)) * ((i & 1) ? -1.0f : 1.0f);
    check_f16_rne(x, bad);
  }
}

TEST(ConvertF16, RoundToNearestEdgeCases) {
  Mismatches bad;
  for (float x : edge_cases()) check_f16_rne(x, bad);
  EXPECT_EQ(to_f16(65504.0f).bits, 0x7BFFu);
  EXPECT_EQ(to_f16(from_bits(0x477FEFFFu)).bits, 0x7BFFu);  // just below 65520: max
  EXPECT_EQ(to_f16(65520.0f).bits, 0x7C00u);                // the overflow tie: inf
  EXPECT_EQ(to_f16(-65520.0f).bits, 0xFC00u);
  EXPECT_EQ(to_f16(1e10f).bits, 0x7C00u);
  EXPECT_EQ(to_f16(from_bits(0x3F801000u)).bits, 0x3C00u);    // 1 + 2^-11: tie, even below
  EXPECT_EQ(to_f16(from_bits(0x3F803000u)).bits, 0x3C02u);    // 1 + 3 2^-11: tie, even above
  EXPECT_EQ(to_f16(std::ldexp(1.0f, -24)).bits, 0x0001u);     // smallest subnormal
  EXPECT_EQ(to_f16(std::ldexp(1.0f, -25)).bits, 0x0000u);     // tie to even: zero
  EXPECT_EQ(to_f16(-std::ldexp(1.0f, -25)).bits, 0x8000u);    // -0
  EXPECT_EQ(to_f16(from_bits(0x33000001u)).bits, 0x0001u);    // just past the tie
  EXPECT_EQ(to_f16(std::ldexp(1.5f, -24)).bits, 0x0002u);     // subnormal tie to even above
  EXPECT_EQ(to_f16(std::ldexp(2.5f, -24)).bits, 0x0002u);     // subnormal tie to even below
  EXPECT_EQ(to_f16(std::ldexp(1023.5f, -24)).bits, 0x0400u);  // tie carries to the min normal
  EXPECT_EQ(to_f16(std::ldexp(1022.5f, -24)).bits, 0x03FEu);
  EXPECT_EQ(to_f16(from_bits(0x00000001u)).bits, 0x0000u);  // fp32 denormal
  EXPECT_EQ(to_f16(from_bits(0x80000001u)).bits, 0x8000u);
  EXPECT_EQ(to_f16(from_bits(0xFF800000u)).bits, 0xFC00u);  // -inf
  EXPECT_EQ(to_f16(from_bits(0xFF800001u)).bits, 0xFE00u);  // signalling NaN: quiet, sign
  EXPECT_EQ(to_f16(from_bits(0x7F802000u)).bits, 0x7E01u);  // payload's top bits kept
}

TEST(ConvertF16, RoundToNearestMatchesF16C) {
  if (!have_f16c()) GTEST_SKIP() << "no F16C on this CPU";
  Mismatches bad;
  auto check = [&](float x) {
    const std::uint16_t got = to_f16(x).bits, want = hw_to_f16(x);
    if (got != want)  // bitwise, NaNs included: F16C quiets NaNs and keeps sign and payload top
      bad.add("to_f16(" + describe(x) + ") = " + hex(got) + ", F16C says " + hex(want));
  };
  for_each_sampled_pattern([&](std::uint32_t u) { check(from_bits(u)); });
  for (float x : edge_cases()) check(x);
  auto rng = make_rng();
  for (int i = 0; i < (1 << 24); ++i) check(from_bits(static_cast<std::uint32_t>(rng())));
}

// ---- stochastic rounding -----------------------------------------------------------------

/// The two neighbours' bits for stochastic rounding of finite x: toward zero and away.
struct Neighbours {
  std::uint16_t down, up;
};

Neighbours bf16_neighbours(float x) {
  const Bracket b = bracket(std::fabs(static_cast<double>(x)), kBF16);
  const bool neg = std::signbit(x);
  return {encode_bf16(overflow_to_inf(b.lo, kBF16), neg),
          encode_bf16(b.lo == std::fabs(x) ? b.lo : overflow_to_inf(b.hi, kBF16), neg)};
}

Neighbours f16_neighbours(float x) {
  const Bracket b = bracket(std::fabs(static_cast<double>(x)), kF16);
  const bool neg = std::signbit(x);
  return {encode_f16(overflow_to_inf(b.lo, kF16), neg),
          encode_f16(b.lo == std::fabs(x) ? b.lo : overflow_to_inf(b.hi, kF16), neg)};
}

/// Finite floats for the neighbour checks: any bit pattern, or inside f16's range.
std::vector<float> stochastic_inputs(std::mt19937_64& rng, bool f16_range) {
  std::vector<float> v;
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> exp(-40, 17);
  for (int i = 0; i < 20000; ++i) {
    float x;
    if (f16_range && (i & 1)) {
      x = std::ldexp(mant(rng), exp(rng));
    } else {
      do x = from_bits(static_cast<std::uint32_t>(rng()));
      while (!std::isfinite(x));
    }
    v.push_back((i & 2) ? -std::fabs(x) : std::fabs(x));
  }
  for (float x : edge_cases())
    if (std::isfinite(x)) v.push_back(x);
  for (float x : {65505.0f, 65535.0f, 65535.99f, 65536.0f, 7e4f, 1e-30f, 3e-8f}) v.push_back(x);
  return v;
}

TEST(ConvertStochastic, ResultIsAlwaysOneOfTheTwoNeighbours) {
  Mismatches bad;
  auto rng = make_rng();
  for (float x : stochastic_inputs(rng, false)) {
    const Neighbours n = bf16_neighbours(x);
    if (to_bf16_stochastic(x, 0).bits != n.down)
      bad.add("bf16 draw 0 must truncate " + describe(x));
    for (int k = 0; k < 64; ++k) {
      const std::uint16_t got = to_bf16_stochastic(x, static_cast<std::uint32_t>(rng())).bits;
      if (got != n.down && got != n.up)
        bad.add("to_bf16_stochastic(" + describe(x) + ") = " + hex(got) + ", want " + hex(n.down) +
                " or " + hex(n.up));
    }
  }
  for (float x : stochastic_inputs(rng, true)) {
    const Neighbours n = f16_neighbours(x);
    if (to_f16_stochastic(x, 0).bits != n.down) bad.add("f16 draw 0 must truncate " + describe(x));
    for (int k = 0; k < 64; ++k) {
      const std::uint16_t got = to_f16_stochastic(x, static_cast<std::uint32_t>(rng())).bits;
      if (got != n.down && got != n.up)
        bad.add("to_f16_stochastic(" + describe(x) + ") = " + hex(got) + ", want " + hex(n.down) +
                " or " + hex(n.up));
    }
  }
}

TEST(ConvertStochastic, NanAndInfAreKept) {
  for (std::uint32_t r : {0u, 0x8000u, 0xFFFFFFFFu, 0x12345678u}) {
    for (float x : edge_cases()) {
      if (std::isnan(x)) {
        EXPECT_EQ(to_bf16_stochastic(x, r).bits, to_bf16(x).bits) << describe(x);
        EXPECT_EQ(to_f16_stochastic(x, r).bits, to_f16(x).bits) << describe(x);
      }
    }
    const float inf = std::numeric_limits<float>::infinity();
    EXPECT_EQ(to_bf16_stochastic(inf, r).bits, 0x7F80u);
    EXPECT_EQ(to_bf16_stochastic(-inf, r).bits, 0xFF80u);
    EXPECT_EQ(to_f16_stochastic(inf, r).bits, 0x7C00u);
    EXPECT_EQ(to_f16_stochastic(-inf, r).bits, 0xFC00u);
    // |x| >= 65536 is f16 inf whatever the draw; 65504 stays 65504.
    EXPECT_EQ(to_f16_stochastic(65536.0f, r).bits, 0x7C00u);
    EXPECT_EQ(to_f16_stochastic(-1e6f, r).bits, 0xFC00u);
    EXPECT_EQ(to_f16_stochastic(65504.0f, r).bits, 0x7BFFu);
  }
}

TEST(ConvertStochastic, ExactValuesStayExactForEveryDraw) {
  Mismatches bad;
  auto rng = make_rng();
  std::vector<std::uint32_t> draws = {0u, 1u, 0x7FFFu, 0x8000u, 0xFFFFu, 0x1FFFu, 0xFFFFFFFFu};
  for (int k = 0; k < 16; ++k) draws.push_back(static_cast<std::uint32_t>(rng()));
  for (std::uint32_t b = 0; b < 65536u; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    for (std::uint32_t r : draws) {
      if (!is_bf16_nan(h)) {
        const std::uint16_t got = to_bf16_stochastic(to_float(bf16{h}), r).bits;
        if (got != h) bad.add("bf16 " + hex(b) + " draw " + hex(r) + " gave " + hex(got));
      }
      if (!is_f16_nan(h)) {
        const std::uint16_t got = to_f16_stochastic(to_float(f16{h}), r).bits;
        if (got != h) bad.add("f16 " + hex(b) + " draw " + hex(r) + " gave " + hex(got));
      }
    }
  }
}

// Rounds x with kDraws draws from random_bits and checks that both the mean value and the
// frequency of rounding away from zero are within 5 standard errors of exact (a chance failure
// about once in 10^5 runs).
constexpr int kDraws = 100000;

template <class T>
void check_unbiased(float x, const Format& f, std::uint64_t seed) {
  const double ax = std::fabs(static_cast<double>(x));
  const Bracket b = bracket(ax, f);
  const double p = (ax - b.lo) / b.spacing;  // probability of rounding away from zero
  ASSERT_GT(p, 0.0) << describe(x) << " is exact";
  const double up_value = overflow_to_inf(b.hi, f);
  double sum = 0.0;
  int ups = 0;
  for (int i = 0; i < kDraws; ++i) {
    const float r =
        to_float(from_float_stochastic<T>(x, random_bits(seed, 3, static_cast<std::uint64_t>(i))));
    const double a = std::fabs(static_cast<double>(r));
    ASSERT_TRUE(a == b.lo || a == up_value) << describe(x) << " gave " << describe(r);
    ASSERT_EQ(std::signbit(r), std::signbit(x)) << describe(x);
    if (a != b.lo)
      ++ups;
    else
      sum += a;
  }
  const double se_p = std::sqrt(p * (1.0 - p) / kDraws);
  EXPECT_NEAR(static_cast<double>(ups) / kDraws, p, 5.0 * se_p) << describe(x);
  if (!std::isinf(up_value)) {
    const double mean = (sum + ups * up_value) / kDraws;
    EXPECT_NEAR(mean, ax, 5.0 * se_p * b.spacing) << describe(x);
  }
}

TEST(ConvertStochastic, Bf16IsUnbiased) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  std::vector<float> xs = {0.1f,
                           -1.0f / 3.0f,
                           1.0f + std::ldexp(1.0f, -10),
                           3.14159265f,
                           from_bits(0x00012345u),   // fp32 denormal
                           from_bits(0x7F7FC000u)};  // above bf16 max: inf with p = 3/4
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> exp(-120, 120);
  for (int i = 0; i < 4; ++i) xs.push_back(std::ldexp(mant(rng), exp(rng)));
  for (float x : xs) check_unbiased<bf16>(x, kBF16, seed);
}

TEST(ConvertStochastic, F16IsUnbiased) {
  auto rng = make_rng();
  const std::uint64_t seed = rng();
  std::vector<float> xs = {0.1f,
                           -1.0f / 3.0f,
                           3.14159265f,
                           1000.3f,
                           std::ldexp(5.3f, -24),     // subnormal
                           std::ldexp(-0.3f, -24),    // between 0 and the smallest subnormal
                           std::ldexp(1023.7f, -24),  // rounds to the smallest normal or below
                           65514.0f};                 // inf with probability 10/32
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> exp(-24, 15);
  for (int i = 0; i < 4; ++i) xs.push_back(std::ldexp(mant(rng), exp(rng)));
  for (float x : xs) check_unbiased<f16>(x, kF16, seed);
}

TEST(ConvertStochastic, SameCounterGivesSameBits) {
  auto rng = make_rng();
  const std::uint64_t seed = rng(), step = rng() % 1000000;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    const float x =
        from_bits(static_cast<std::uint32_t>(rng()) & 0x7F7FFFFFu) * ((i & 1) ? -1.0f : 1.0f);
    EXPECT_EQ(random_bits(seed, step, i), random_bits(seed, step, i));
    EXPECT_EQ(to_bf16_stochastic(x, random_bits(seed, step, i)).bits,
              to_bf16_stochastic(x, random_bits(seed, step, i)).bits);
    EXPECT_EQ(to_f16_stochastic(x, random_bits(seed, step, i)).bits,
              to_f16_stochastic(x, random_bits(seed, step, i)).bits);
  }
  // Pins the stream (values from the implementation, not an oracle): a change to random_bits
  // changes the result of every stochastically rounded run, so it should be deliberate.
  EXPECT_EQ(random_bits(0, 0, 0), 0x568A9B0Bu);
  EXPECT_EQ(random_bits(1, 2, 3), 0xDAC0B083u);
  EXPECT_EQ(random_bits(~0ull, ~0ull, ~0ull), 0x8DB4C609u);
  EXPECT_EQ(random_bits(42, 1000, 123456789), 0x4263A93Au);
}

// ---- random_bits ---------------------------------------------------------------------------

int popcount32(std::uint32_t v) {
  int n = 0;
  for (; v; v &= v - 1) ++n;
  return n;
}

TEST(RandomBits, ChangesWhenAnyInputChangesByOne) {
  auto rng = make_rng();
  std::vector<std::array<std::uint64_t, 3>> triples = {
      {0, 0, 0}, {0, 0, ~0ull}, {~0ull, ~0ull, ~0ull}, {1, 1, 1}, {0, 1, 0}};
  for (int i = 0; i < 10000; ++i) triples.push_back({rng(), rng() % 100000, rng() % (1ull << 34)});
  Mismatches bad;
  double flipped = 0.0;
  int pairs = 0;
  for (const auto& t : triples) {
    const std::uint32_t base = random_bits(t[0], t[1], t[2]);
    for (int which = 0; which < 3; ++which) {
      for (std::uint64_t delta : {1ull, ~0ull}) {  // +1 and -1
        auto u = t;
        u[which] += delta;
        const std::uint32_t other = random_bits(u[0], u[1], u[2]);
        if (other == base) bad.add("random_bits unchanged by input " + std::to_string(which));
        flipped += popcount32(base ^ other);
        ++pairs;
      }
    }
  }
  EXPECT_NEAR(flipped / pairs, 16.0, 0.2) << "mean bits flipped by a one-step change";
}

TEST(RandomBits, EveryBitIsSetHalfTheTime) {
  auto rng = make_rng();
  const std::uint64_t seed = rng(), step = rng() % 1000000, index = rng() % (1ull << 32);
  constexpr int kCalls = 1000000;
  // Along the index (how the kernels draw), along the step, and along the seed.
  for (int axis = 0; axis < 3; ++axis) {
    int count[32] = {};
    for (int i = 0; i < kCalls; ++i) {
      const auto k = static_cast<std::uint64_t>(i);
      const std::uint32_t r = axis == 0   ? random_bits(seed, step, k)
                              : axis == 1 ? random_bits(seed, k, index)
                                          : random_bits(k, step, index);
      for (int bit = 0; bit < 32; ++bit) count[bit] += (r >> bit) & 1u;
    }
    for (int bit = 0; bit < 32; ++bit)
      EXPECT_NEAR(static_cast<double>(count[bit]) / kCalls, 0.5, 0.01)
          << "bit " << bit << " along axis " << axis;
  }
}

// ---- the kernels' generic helpers ---------------------------------------------------------------

TEST(ConvertTemplates, FromFloatDispatches) {
  auto rng = make_rng();
  for (int i = 0; i < 10000; ++i) {
    const float x = from_bits(static_cast<std::uint32_t>(rng()));
    const auto r = static_cast<std::uint32_t>(rng());
    EXPECT_EQ(bits(from_float<float>(x)), bits(x));
    EXPECT_EQ(bits(to_float(x)), bits(x));
    EXPECT_EQ(bits(from_float_stochastic<float>(x, r)), bits(x));
    EXPECT_EQ(from_float<bf16>(x).bits, to_bf16(x).bits);
    EXPECT_EQ(from_float<f16>(x).bits, to_f16(x).bits);
    EXPECT_EQ(from_float_stochastic<bf16>(x, r).bits, to_bf16_stochastic(x, r).bits);
    EXPECT_EQ(from_float_stochastic<f16>(x, r).bits, to_f16_stochastic(x, r).bits);
  }
}

}  // namespace
}  // namespace fo::test
