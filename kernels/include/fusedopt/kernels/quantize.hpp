// Block-wise quantization of optimizer state to 8 or 4 bits (docs/quantized-states.md): the
// storage layer of the quantized-state kernels dequantizes a block of a state to fp32, the
// optimizer's math runs in fp32, and the block is quantized again.
//
// A block of w consecutive elements (w = kQuant8BlockSize or kQuant4BlockSize; the last block
// of a tensor may be shorter) is stored as one fp32 `absmax` (the block's largest magnitude)
// and one code per element, an index into a sorted table of 2^bits values in [-1, 1] (signed
// maps, first moments) or [0, 1] (unsigned maps, second moments). An element decodes to
// value[code] * absmax and encodes as the code of x / absmax, rounded to the nearest table
// value (ties to the larger one) or stochastically between its two neighbours.
//
// Bytes per element: 1 (8-bit) or 1/2 (4-bit) for the codes, plus 4 / w for the absmax.
//
// Reproducibility: every operation below is an IEEE fp32 add, multiply, divide or compare,
// written without a contractible a * b + c, so the CPU (-ffp-contract=off) and CUDA
// (--fmad=false, IEEE division by default) produce the same codes and absmax bits. The maps
// are constexpr tables built on the host; a CUDA kernel reads them from memory it is handed
// (a kernel parameter, __constant__ or shared memory), never from these host objects.
#pragma once

#include <cstdint>
#include <limits>

#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/kernels/factored.hpp"
#include "fusedopt/kernels/matrix_step.hpp"
#include "fusedopt/kernels/trust_ratio.hpp"

namespace fo {

/// Whether algorithm A steps in one elementwise pass: the kind whose states may be
/// block-quantized. A trust-ratio, factored or matrix step stores its states and reads them
/// back between passes, which the per-block contract below does not describe; both backends
/// refuse them quantized states. (A state copied from the weights is refused too: 8 or 4 bits
/// cannot hold weights; StateFromParam.)
template <class A>
inline constexpr bool kOnePassStep =
    !TrustRatioCapable<A>::value && !FactoredCapable<A>::value && !MatrixCapable<A>::value;

/// Elements per block of an 8-bit state (bitsandbytes' block-wise 8-bit optimizers and
/// torchao's 8-bit optimizers both use 256).
inline constexpr int kQuant8BlockSize = 256;
/// Elements per block of a 4-bit state (torchao's 4-bit optimizers' default).
inline constexpr int kQuant4BlockSize = 128;

/// A sorted table of 2^Bits fp32 values and the decision thresholds between neighbours.
/// threshold[k] is the smallest float at or above the exact midpoint of value[k] and
/// value[k + 1], so that for every float y: y >= threshold[k] <=> y >= that midpoint.
template <int Bits>
struct QuantMap {
  static constexpr int kCodes = 1 << Bits;
  float value[kCodes];
  float threshold[kCodes - 1];
};

namespace quant_detail {

constexpr double pow2(int e) {
  double r = 1.0;
  for (; e > 0; --e) r *= 2.0;
  for (; e < 0; ++e) r /= 2.0;
  return r;
}

/// The spacing of floats in the binade of a (a > 0 and a normal float).
constexpr double float_spacing(double a) {
  int e = 0;
  while (a >= 2.0) a /= 2.0, ++e;
  while (a < 1.0) a *= 2.0, --e;
  return pow2(e - 23);
}

/// The smallest float >= m, for a finite m whose magnitude is 0 or a normal float's.
constexpr float float_at_or_above(double m) {
  const float f = static_cast<float>(m);
  if (static_cast<double>(f) >= m) return f;
  if (f == 0.0f) return std::numeric_limits<float>::denorm_min();
  if (f > 0.0f) return static_cast<float>(f + float_spacing(f));
  // f < 0: one float towards zero; below a power of two the spacing halves.
  const double a = -static_cast<double>(f);
  const double s = float_spacing(a);
  return static_cast<float>(-(a - (a == s * 8388608.0 ? s / 2.0 : s)));
}

/// Point j of torch.linspace(start, end, m + 1) in float32 as torch's CPU kernel's scalar
/// formula computes it: start + step * j below the halfway index, end - step * (m - j) from it
/// on, step = (end - start) / m. Only evaluated at compile time (the maps are constant
/// initialized), where no compiler fuses the multiply-add.
constexpr float linspace_point(float start, float end, int m, int j) {
  const float step = (end - start) / static_cast<float>(m);
  return j < (m + 1) / 2 ? start + step * static_cast<float>(j)
                         : end - step * static_cast<float>(m - j);
}

template <int Bits>
constexpr void fill_thresholds(QuantMap<Bits>& q) {
  for (int k = 0; k + 1 < QuantMap<Bits>::kCodes; ++k)  // the sum of neighbours is exact in double
    q.threshold[k] = float_at_or_above(
        (static_cast<double>(q.value[k]) + static_cast<double>(q.value[k + 1])) * 0.5);
}

}  // namespace quant_detail

/// bitsandbytes' dynamic map (create_dynamic_map with max_exponent_bits = Bits - 1 and
/// total_bits = Bits), rebuilt here in its float32 arithmetic: for each decade i in
/// [0, Bits - 1), the means of neighbouring points of linspace(0.1, 1, m + 1) with m = 2^i
/// (signed) or 2^(i + 1) (unsigned) intervals, each times float(10^(i - Bits + 2)); signed
/// maps add their negatives; then 0 and 1. Sorted by construction: decade i's values are below
/// 10^(i - Bits + 2) <= decade i + 1's.
template <int Bits>
constexpr QuantMap<Bits> make_dynamic_map(bool is_signed) {
  constexpr double kPow10[] = {1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6};  // 10^-k: Python's
  static_assert(Bits >= 2 && Bits - 2 < 7, "make_dynamic_map: 2 to 8 bits");
  QuantMap<Bits> q{};
  float positive[QuantMap<Bits>::kCodes] = {};
  int np = 0;
  for (int i = 0; i < Bits - 1; ++i) {
    const int m = is_signed ? 1 << i : 1 << (i + 1);
    const float decade = static_cast<float>(kPow10[Bits - 2 - i]);
    for (int j = 0; j < m; ++j) {
      const float mean = (quant_detail::linspace_point(0.1f, 1.0f, m, j) +
                          quant_detail::linspace_point(0.1f, 1.0f, m, j + 1)) /
                         2.0f;
      positive[np++] = decade * mean;
    }
  }
  int n = 0;
  if (is_signed)
    for (int k = np - 1; k >= 0; --k) q.value[n++] = -positive[k];
  q.value[n++] = 0.0f;
  for (int k = 0; k < np; ++k) q.value[n++] = positive[k];
  q.value[n++] = 1.0f;
  quant_detail::fill_thresholds(q);
  return q;
}

/// torchao's 4-bit map for second moments: linspace(0, 1, 17)[1:] = k / 16 for k = 1..16. It
/// has no zero: a zero in a block with a nonzero absmax decodes to absmax / 16.
constexpr QuantMap<4> make_linear_map4_unsigned() {
  QuantMap<4> q{};
  for (int k = 0; k < 16; ++k) q.value[k] = quant_detail::linspace_point(0.0f, 1.0f, 16, k + 1);
  quant_detail::fill_thresholds(q);
  return q;
}

/// 8-bit first moments: bitsandbytes' "dynamic" map (signed, [-0.99296875, 1]).
inline constexpr QuantMap<8> kQuantMap8Signed = make_dynamic_map<8>(true);
/// 8-bit second moments: bitsandbytes' "udynamic" map (unsigned, [0, 1]).
inline constexpr QuantMap<8> kQuantMap8Unsigned = make_dynamic_map<8>(false);
/// 4-bit first moments: torchao's signed 4-bit dynamic map ([-0.8875, 1]).
inline constexpr QuantMap<4> kQuantMap4Signed = make_dynamic_map<4>(true);
/// 4-bit second moments: torchao's linear map without zero ([1/16, 1]).
inline constexpr QuantMap<4> kQuantMap4Unsigned = make_linear_map4_unsigned();

// ---- one element -----------------------------------------------------------------------------

/// The code whose value is nearest to y; an exact midpoint goes to the larger value. y below
/// the smallest value (a negative y and an unsigned map, or y < -0.99296875 and the 8-bit
/// signed map) gives code 0; NaN gives code 0. Bits comparisons (8 for 256 codes), no branch.
template <int Bits>
FO_HOST_DEVICE int nearest_code(const QuantMap<Bits>& q, float y) {
  int c = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int s = QuantMap<Bits>::kCodes / 2; s > 0; s /= 2) c += y >= q.threshold[c + s - 1] ? s : 0;
  return c;
}

/// The largest code whose value is <= y, or 0 if there is none. Bits comparisons.
template <int Bits>
FO_HOST_DEVICE int code_at_or_below(const QuantMap<Bits>& q, float y) {
  int c = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int s = QuantMap<Bits>::kCodes / 2; s > 0; s /= 2) c += y >= q.value[c + s] ? s : 0;
  return c;
}

/// Stochastic rounding with u uniform in [0, 1): between the values a <= y < b bracketing y,
/// b with probability (y - a) / (b - a) (computed in fp32), else a. A y equal to a table value
/// keeps its code for every u; y outside [value[0], value[last]] gets the end code.
template <int Bits>
FO_HOST_DEVICE int stochastic_code(const QuantMap<Bits>& q, float y, float u) {
  const int lo = code_at_or_below(q, y);
  if (lo == QuantMap<Bits>::kCodes - 1) return lo;
  const float a = q.value[lo], b = q.value[lo + 1];
  const float p = (y - a) / (b - a);  // up probability; <= 0 below the map, NaN for NaN y
  return u < p ? lo + 1 : lo;
}

/// A uniform float in [0, 1) from 32 random bits: the top 24 bits times 2^-24 (exact).
FO_HOST_DEVICE float uniform_from_bits(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-8f;
}

/// The largest magnitude of two: NaN if either is NaN, so that a block's absmax is the same
/// bits for any reduction order (max is exact, this makes it commutative and associative with
/// NaN too). Inputs are magnitudes (>= 0 or NaN).
FO_HOST_DEVICE float absmax_combine(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

/// What a block stores as its absmax: the largest magnitude when finite, else NaN (a block
/// with a NaN or an inf decodes entirely to NaN, which the optimizer's non-finite check sees).
FO_HOST_DEVICE float stored_absmax(float largest_magnitude) {
  return largest_magnitude <= 3.40282347e38f ? largest_magnitude
                                             : convert_detail::float_of(0x7FC00000u);
}

/// x / absmax, the point looked up in the map; 0 when absmax is 0 (an all-zero block: no
/// division by zero) or NaN (the codes do not matter then).
FO_HOST_DEVICE float normalized(float x, float absmax) { return absmax > 0.0f ? x / absmax : 0.0f; }

/// value[code] * absmax.
template <int Bits>
FO_HOST_DEVICE float decode(const QuantMap<Bits>& q, int code, float absmax) {
  return q.value[code] * absmax;
}

/// Round to the nearest code.
struct NearestRounding {};

/// Stochastic rounding; element i of a block draws random_bits(seed, step, first_index + i)
/// (first_index: the block's first element's index in its tensor, so draws do not depend on
/// how the tensor is cut into blocks or launches).
struct StochasticRounding {
  std::uint64_t seed, step, first_index;
};

template <int Bits>
FO_HOST_DEVICE int encode(const QuantMap<Bits>& q, float y, int, NearestRounding) {
  return nearest_code(q, y);
}

template <int Bits>
FO_HOST_DEVICE int encode(const QuantMap<Bits>& q, float y, int i, StochasticRounding r) {
  const std::uint64_t index = r.first_index + static_cast<std::uint64_t>(i);
  return stochastic_code(q, y, uniform_from_bits(random_bits(r.seed, r.step, index)));
}

// ---- one block (the serial form; a CUDA block computes the absmax by a reduction) ------------

/// The absmax a block of x[0, n) stores (see stored_absmax).
FO_HOST_DEVICE float block_absmax(const float* x, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; ++i) m = absmax_combine(m, fabsf(x[i]));
  return stored_absmax(m);
}

/// Quantizes x[0, n) (n <= kQuant8BlockSize) to codes[0, n); returns the block's absmax.
/// Usage: `float absmax = quantize_block8(kQuantMap8Signed, m, n, codes, NearestRounding{});`
template <class Rounding>
FO_HOST_DEVICE float quantize_block8(const QuantMap<8>& q, const float* x, int n,
                                     std::uint8_t* codes, Rounding rounding) {
  const float absmax = block_absmax(x, n);
  for (int i = 0; i < n; ++i)
    codes[i] = static_cast<std::uint8_t>(encode(q, normalized(x[i], absmax), i, rounding));
  return absmax;
}

/// out[i] = value[codes[i]] * absmax for i in [0, n).
FO_HOST_DEVICE void dequantize_block8(const QuantMap<8>& q, const std::uint8_t* codes, int n,
                                      float absmax, float* out) {
  for (int i = 0; i < n; ++i) out[i] = decode(q, codes[i], absmax);
}

/// Code i of a packed 4-bit array: byte i / 2, low nibble for even i, high nibble for odd i.
FO_HOST_DEVICE int code4_at(const std::uint8_t* packed, int i) {
  return (packed[i >> 1] >> ((i & 1) * 4)) & 0xF;
}

/// Bytes holding n 4-bit codes.
FO_HOST_DEVICE constexpr std::int64_t packed4_bytes(std::int64_t n) { return (n + 1) / 2; }

/// Quantizes x[0, n) (n <= kQuant4BlockSize) into packed[0, (n + 1) / 2): element 2k in the low
/// nibble of byte k, element 2k + 1 in its high nibble (0 when n is odd). Returns the absmax.
template <class Rounding>
FO_HOST_DEVICE float quantize_block4(const QuantMap<4>& q, const float* x, int n,
                                     std::uint8_t* packed, Rounding rounding) {
  const float absmax = block_absmax(x, n);
  for (int i = 0; i < n; i += 2) {
    const int lo = encode(q, normalized(x[i], absmax), i, rounding);
    const int hi = i + 1 < n ? encode(q, normalized(x[i + 1], absmax), i + 1, rounding) : 0;
    packed[i >> 1] = static_cast<std::uint8_t>(lo | (hi << 4));
  }
  return absmax;
}

/// out[i] = value[code i] * absmax for i in [0, n).
FO_HOST_DEVICE void dequantize_block4(const QuantMap<4>& q, const std::uint8_t* packed, int n,
                                      float absmax, float* out) {
  for (int i = 0; i < n; ++i) out[i] = decode(q, code4_at(packed, i), absmax);
}

// ---- a quantized optimizer state (state_dtype q8 or q4) --------------------------------------

/// Elements per block of a state quantized to `bits` (8 or 4).
FO_HOST_DEVICE constexpr std::int64_t quant_block_size(int bits) {
  return bits == 8 ? kQuant8BlockSize : kQuant4BlockSize;
}
/// Blocks (absmax values) of a state of n elements.
FO_HOST_DEVICE constexpr std::int64_t quant_blocks(std::int64_t n, int bits) {
  return (n + quant_block_size(bits) - 1) / quant_block_size(bits);
}
/// Bytes of its codes: n, or (n + 1) / 2 packed 4-bit codes (element i in byte i / 2, the low
/// nibble for even i; blocks are of even size, so block j's codes start at byte j * w * bits / 8).
FO_HOST_DEVICE constexpr std::int64_t quant_code_bytes(std::int64_t n, int bits) {
  return bits == 8 ? n : packed4_bytes(n);
}
/// Where the absmax values start in the state's buffer: after the codes, 16-byte aligned.
FO_HOST_DEVICE constexpr std::int64_t quant_absmax_offset(std::int64_t n, int bits) {
  return (quant_code_bytes(n, bits) + 15) / 16 * 16;
}
/// Bytes of the state's one buffer: its codes, then one float32 absmax per block.
FO_HOST_DEVICE constexpr std::int64_t quant_state_bytes(std::int64_t n, int bits) {
  return quant_absmax_offset(n, bits) + 4 * quant_blocks(n, bits);
}

/// The code of y = x / absmax when a step writes a quantized state: to nearest, or (stochastic)
/// stochastically from the draw of `counter` in the stream (seed, step): the counter of state k
/// of element i is 4i + 1 + k, as for the 16-bit states (multi_tensor.cuh).
template <int Bits>
FO_HOST_DEVICE int step_code(const QuantMap<Bits>& q, float y, bool stochastic, std::uint64_t seed,
                             std::uint64_t step, std::uint64_t counter) {
  if (!stochastic) return nearest_code(q, y);
  return stochastic_code(q, y, uniform_from_bits(random_bits(seed, step, counter)));
}

}  // namespace fo
