// AVX-512F value type for the optimizer functors: 16 fp32 lanes, the same function names as
// the scalar vocabulary in fusedopt/kernels/config.hpp. Include only from a translation unit
// compiled with -mavx512f -mfma.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fo::cpu::avx512 {

struct Vf {
  static constexpr int kWidth = 16;
  __m512 v;
  Vf() = default;
  Vf(float x) : v(_mm512_set1_ps(x)) {}  // NOLINT: broadcasts, as float converts in scalar code
  explicit Vf(__m512 x) : v(x) {}
};
using Mask = __mmask16;

inline Vf operator+(Vf a, Vf b) { return Vf(_mm512_add_ps(a.v, b.v)); }
inline Vf operator-(Vf a, Vf b) { return Vf(_mm512_sub_ps(a.v, b.v)); }
inline Vf operator*(Vf a, Vf b) { return Vf(_mm512_mul_ps(a.v, b.v)); }
inline Vf operator/(Vf a, Vf b) { return Vf(_mm512_div_ps(a.v, b.v)); }
inline Vf operator-(Vf a) {  // flips the sign bit, as scalar negation does (-0 stays -0)
  return Vf(_mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN))));
}
inline Mask operator>(Vf a, Vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline Mask operator<(Vf a, Vf b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }

inline Vf vfma(Vf a, Vf b, Vf c) { return Vf(_mm512_fmadd_ps(a.v, b.v, c.v)); }
inline Vf vsqrt(Vf a) { return Vf(_mm512_sqrt_ps(a.v)); }
// max/minps return the second operand when unordered: the scalar `a > b ? a : b` exactly.
inline Vf vmax(Vf a, Vf b) { return Vf(_mm512_max_ps(a.v, b.v)); }
inline Vf vmin(Vf a, Vf b) { return Vf(_mm512_min_ps(a.v, b.v)); }
inline Vf vselect(Mask m, Vf a, Vf b) { return Vf(_mm512_mask_blend_ps(m, b.v, a.v)); }
inline Vf vsign(Vf a) {
  const Vf zero(0.0f);
  return vselect(a > zero, Vf(1.0f), vselect(a < zero, Vf(-1.0f), zero));
}

/// Loads and stores of storage type float; `n` active lanes (1..16) for the tail.
struct Io {
  using V = Vf;
  using TailMask = Mask;
  static Vf load(const float* p) { return Vf(_mm512_loadu_ps(p)); }
  static void store(float* p, Vf x) { _mm512_storeu_ps(p, x.v); }
  static Mask tail_mask(std::int64_t n) { return static_cast<Mask>((1u << n) - 1u); }  // n < 16
  static Vf load(const float* p, Mask m) { return Vf(_mm512_maskz_loadu_ps(m, p)); }
  static void store(float* p, Vf x, Mask m) { _mm512_mask_storeu_ps(p, m, x.v); }
};

}  // namespace fo::cpu::avx512
