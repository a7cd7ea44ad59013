// AVX2+FMA value type for the optimizer functors: 8 fp32 lanes, the same function names as
// the scalar vocabulary in fusedopt/kernels/config.hpp. Include only from a translation unit
// compiled with -mavx2 -mfma.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fo::cpu::avx2 {

struct Vf {
  static constexpr int kWidth = 8;
  __m256 v;
  Vf() = default;
  Vf(float x) : v(_mm256_set1_ps(x)) {}  // NOLINT: broadcasts, as float converts in scalar code
  explicit Vf(__m256 x) : v(x) {}
};
struct Mask {
  __m256 m;
};

inline Vf operator+(Vf a, Vf b) { return Vf(_mm256_add_ps(a.v, b.v)); }
inline Vf operator-(Vf a, Vf b) { return Vf(_mm256_sub_ps(a.v, b.v)); }
inline Vf operator*(Vf a, Vf b) { return Vf(_mm256_mul_ps(a.v, b.v)); }
inline Vf operator/(Vf a, Vf b) { return Vf(_mm256_div_ps(a.v, b.v)); }
inline Vf operator-(Vf a) { return Vf(_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))); }
inline Mask operator>(Vf a, Vf b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask operator<(Vf a, Vf b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }

inline Vf vfma(Vf a, Vf b, Vf c) { return Vf(_mm256_fmadd_ps(a.v, b.v, c.v)); }
inline Vf vsqrt(Vf a) { return Vf(_mm256_sqrt_ps(a.v)); }
// max/minps return the second operand when unordered: the scalar `a > b ? a : b` exactly.
inline Vf vmax(Vf a, Vf b) { return Vf(_mm256_max_ps(a.v, b.v)); }
inline Vf vmin(Vf a, Vf b) { return Vf(_mm256_min_ps(a.v, b.v)); }
inline Vf vselect(Mask m, Vf a, Vf b) { return Vf(_mm256_blendv_ps(b.v, a.v, m.m)); }
inline Vf vsign(Vf a) {
  const Vf zero(0.0f);
  return vselect(a > zero, Vf(1.0f), vselect(a < zero, Vf(-1.0f), zero));
}

/// Loads and stores of storage type float; the tail uses maskload/maskstore, which neither
/// read nor write the inactive lanes' memory.
struct Io {
  using V = Vf;
  using TailMask = __m256i;
  static Vf load(const float* p) { return Vf(_mm256_loadu_ps(p)); }
  static void store(float* p, Vf x) { _mm256_storeu_ps(p, x.v); }
  static TailMask tail_mask(std::int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Vf load(const float* p, TailMask m) { return Vf(_mm256_maskload_ps(p, m)); }
  static void store(float* p, Vf x, TailMask m) { _mm256_maskstore_ps(p, m, x.v); }
};

}  // namespace fo::cpu::avx2
