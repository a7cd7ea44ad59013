// fp32 <-> bfloat16 / float16 conversions and the counter-based random bits that stochastic
// rounding draws from, for the kernels that keep params, grads or state in 16 bits.
//
// Rounding policy:
// - to_float: exact widening (f16 subnormals, inf and NaN included; NaN payload kept).
// - to_bf16 / to_f16 / from_float: round to nearest, ties to even. Overflow goes to inf (for
//   f16: anything that rounds above 65504, i.e. |x| >= 65520); underflow goes to a zero of
//   x's sign; f16 subnormals are produced. NaN stays NaN, quiet, sign and the top payload bits
//   kept; inf stays inf.
// - *_stochastic: "add random bits to the bits about to be discarded, then truncate". The
//   result is one of the two neighbours bracketing x, the one away from zero with probability
//   equal to x's fractional distance between them (quantized to the random bits used: 16 for
//   bf16, 13 for f16 normals, 32 for the f16 subnormal range, so any probability below 2^-32
//   there reads as 0). Exact values are unchanged for every draw. NaN and inf as above.
//   Overflow: inf stands in as the neighbour above the largest finite value, at the place the
//   next value would have if the exponent range went on (bf16: 2^128, f16: 65536). So an
//   f16 x in (65504, 65536) becomes inf with probability (|x| - 65504) / 32 and 65504
//   otherwise, and |x| >= 65536 always becomes inf (as it does under round to nearest); a
//   bf16 x above the largest finite bf16 becomes inf with probability (|x| - max) / 2^120.
//
// Everything is integer bit manipulation, with no cuda_bf16.h / cuda_fp16.h and no hardware
// conversion instructions: the same source runs on the CPU and the GPU and gives bitwise the
// same result on both, which the library's reproducibility promise needs; g++ alone builds
// it, with no CUDA toolkit.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedopt/kernels/config.hpp"

namespace fo {

/// bfloat16 storage: sign, 8 exponent bits, 7 mantissa bits (the top half of an fp32).
struct bf16 {
  std::uint16_t bits;
};

/// IEEE binary16 storage: sign, 5 exponent bits (bias 15), 10 mantissa bits.
struct f16 {
  std::uint16_t bits;
};

static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2, "bf16 must be 2 bytes");
static_assert(sizeof(f16) == 2 && alignof(f16) == 2, "f16 must be 2 bytes");
static_assert(std::is_trivially_copyable_v<bf16> && std::is_trivially_copyable_v<f16>,
              "16-bit storage types must be trivially copyable");

namespace convert_detail {

FO_HOST_DEVICE std::uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FO_HOST_DEVICE float float_of(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

/// Leading zero bits of a nonzero 32-bit value.
FO_HOST_DEVICE int clz32(std::uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __clz(static_cast<int>(v));
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_clz(v);
#else
  int n = 0;
  while (!(v & 0x80000000u)) {
    v <<= 1;
    ++n;
  }
  return n;
#endif
}

FO_HOST_DEVICE std::uint16_t u16(std::uint32_t v) { return static_cast<std::uint16_t>(v); }

/// splitmix64's output function (Stafford's mix13): a bijection with full avalanche.
FO_HOST_DEVICE std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr std::uint32_t kF32Abs = 0x7FFFFFFFu;
constexpr std::uint32_t kF32Inf = 0x7F800000u;
/// |x| at or above this rounds (to nearest) to f16 inf: 65520, halfway from 65504 to 2^16.
constexpr std::uint32_t kF16RoundsToInf = 0x477FF000u;
/// 2^16: the place of the next f16 value after 65504 if the exponent range went on.
constexpr std::uint32_t kF16PastMax = 0x47800000u;
/// 2^-14: smallest normal f16.
constexpr std::uint32_t kF16MinNormal = 0x38800000u;
/// 2^-25: half the smallest f16 subnormal; |x| at or below it rounds (to nearest) to zero.
constexpr std::uint32_t kF16HalfMinSub = 0x33000000u;
/// (127 - 15) << 23: rebias an fp32 exponent field to f16's.
constexpr std::uint32_t kRebias = 0x38000000u;

/// NaN to f16: quiet, sign and the top 9 payload bits kept.
FO_HOST_DEVICE std::uint16_t f16_nan(std::uint32_t sign16, std::uint32_t a) {
  return u16(sign16 | 0x7E00u | ((a >> 13) & 0x03FFu));
}

}  // namespace convert_detail

// ---- widening ---------------------------------------------------------------------------

FO_HOST_DEVICE float to_float(float x) { return x; }

FO_HOST_DEVICE float to_float(bf16 x) {
  return convert_detail::float_of(static_cast<std::uint32_t>(x.bits) << 16);
}

FO_HOST_DEVICE float to_float(f16 x) {
  using namespace convert_detail;
  const std::uint32_t h = x.bits;
  const std::uint32_t sign = (h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  std::uint32_t mant = h & 0x03FFu;
  if (exp == 0x1Fu) return float_of(sign | kF32Inf | (mant << 13));  // inf, NaN (payload kept)
  if (exp != 0) return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return float_of(sign);  // +-0
  // Subnormal mant * 2^-24: normalize so the leading one lands on bit 10 (the implicit bit).
  const int shift = clz32(mant) - 21;  // mant < 2^10, so clz >= 22 and shift >= 1
  mant = (mant << shift) & 0x03FFu;
  return float_of(sign | ((113u - static_cast<std::uint32_t>(shift)) << 23) | (mant << 13));
}

// ---- round to nearest even ---------------------------------------------------------------

FO_HOST_DEVICE bf16 to_bf16(float x) {
  using namespace convert_detail;
  const std::uint32_t u = bits_of(x);
  if ((u & kF32Abs) > kF32Inf) return bf16{u16((u >> 16) | 0x0040u)};  // quiet NaN, sign kept
  // Adding 0x7FFF plus the lowest kept bit rounds the magnitude to nearest, ties to even; a
  // carry propagates into the exponent (and up to inf) as it should. The magnitude stays
  // below 2^31, so the sign bit is never touched.
  return bf16{u16((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

FO_HOST_DEVICE f16 to_f16(float x) {
  using namespace convert_detail;
  const std::uint32_t u = bits_of(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & kF32Abs;
  if (a > kF32Inf) return f16{f16_nan(sign, a)};
  if (a >= kF16RoundsToInf) return f16{u16(sign | 0x7C00u)};  // overflow and inf
  if (a >= kF16MinNormal) {
    const std::uint32_t r = a - kRebias;  // f16 exponent in bits 23..27, 13 bits to drop
    return f16{u16(sign | ((r + 0x0FFFu + ((r >> 13) & 1u)) >> 13))};
  }
  if (a <= kF16HalfMinSub) return f16{u16(sign)};  // underflow to a signed zero
  // Subnormal result: |x| = mant * 2^(e - 150) = (mant >> shift) units of 2^-24 plus a rest.
  const std::uint32_t e = a >> 23;  // 102..112 here
  const std::uint32_t mant = (a & 0x007FFFFFu) | 0x00800000u;
  const std::uint32_t shift = 126u - e;  // 14..24
  std::uint32_t q = mant >> shift;
  const std::uint32_t rest = mant & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (q & 1u))) ++q;  // may carry into the smallest normal
  return f16{u16(sign | q)};
}

// ---- stochastic rounding -----------------------------------------------------------------

FO_HOST_DEVICE bf16 to_bf16_stochastic(float x, std::uint32_t random) {
  using namespace convert_detail;
  const std::uint32_t u = bits_of(x);
  const std::uint32_t a = u & kF32Abs;
  if (a > kF32Inf) return bf16{u16((u >> 16) | 0x0040u)};
  if (a == kF32Inf) return bf16{u16(u >> 16)};
  // 16 random bits against the 16 dropped ones: away from zero with probability dropped/2^16.
  // Largest finite float + 0xFFFF stays below 2^31 (sign untouched) and may carry into inf.
  return bf16{u16((u + (random & 0xFFFFu)) >> 16)};
}

FO_HOST_DEVICE f16 to_f16_stochastic(float x, std::uint32_t random) {
  using namespace convert_detail;
  const std::uint32_t u = bits_of(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & kF32Abs;
  if (a > kF32Inf) return f16{f16_nan(sign, a)};
  if (a >= kF16PastMax) return f16{u16(sign | 0x7C00u)};  // inf and |x| >= 2^16
  if (a >= kF16MinNormal) {
    // 13 random bits against the 13 dropped ones; from 65504 the carry reaches inf (0x7C00).
    const std::uint32_t r = a - kRebias;
    return f16{u16(sign | ((r + (random & 0x1FFFu)) >> 13))};
  }
  // Subnormal range, spacing 2^-24: |x| in units of 2^-24 as 32.32 fixed point (truncated past
  // 32 fraction bits), plus 32 random bits, truncated.
  const std::uint32_t e = a >> 23;
  if (e < 63u) return f16{u16(sign)};  // |x| < 2^-64 (fp32 denormals too): fraction reads 0
  const std::uint64_t mant = (a & 0x007FFFFFu) | 0x00800000u;
  const std::uint32_t shift = 126u - e;               // |x| = mant * 2^-shift units; 14..63
  const std::uint64_t fixed = (mant << 32) >> shift;  // mant < 2^24: no bits lost on the left
  return f16{u16(sign | static_cast<std::uint32_t>((fixed + random) >> 32))};
}

// ---- random bits for stochastic rounding ---------------------------------------------------

/// 32 random bits for element `index` of step `step` of a run seeded `seed`: a stateless
/// counter-based hash, the same on every backend. The (seed, step) key takes two mix rounds
/// and is loop invariant; each element then costs one multiply and one mix (splitmix64's
/// output for stream `key`, counter `index`).
FO_HOST_DEVICE std::uint32_t random_bits(std::uint64_t seed, std::uint64_t step,
                                         std::uint64_t index) {
  using convert_detail::mix64;
  constexpr std::uint64_t kGamma = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio, odd
  const std::uint64_t key = mix64(seed ^ mix64(step + kGamma));
  return static_cast<std::uint32_t>(mix64(key + (index + 1u) * kGamma) >> 32);
}

// ---- generic helpers for the kernels ---------------------------------------------------------

/// float to T in {float, bf16, f16}, round to nearest even (the identity for float).
template <class T>
FO_HOST_DEVICE T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16(x);
  } else {
    static_assert(std::is_same_v<T, f16>, "from_float: T must be float, bf16 or f16");
    return to_f16(x);
  }
}

/// float to T in {float, bf16, f16}, stochastically rounded with `random` (the identity for
/// float).
template <class T>
FO_HOST_DEVICE T from_float_stochastic(float x, std::uint32_t random) {
  if constexpr (std::is_same_v<T, float>) {
    (void)random;
    return x;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16_stochastic(x, random);
  } else {
    static_assert(std::is_same_v<T, f16>, "from_float_stochastic: T must be float, bf16 or f16");
    return to_f16_stochastic(x, random);
  }
}

}  // namespace fo
