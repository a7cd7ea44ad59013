// The CPU kernels compiled with -mavx512f -mfma: sixteen lanes.
#include <immintrin.h>

#include "cpu/cpu_backend.hpp"
#include "cpu/quant_encode.hpp"
#include "fusedopt/kernels/cpu/simd_avx512.hpp"

using Io = fo::cpu::avx512::Io;
#define FO_ISA_KERNELS avx512_kernels
#include "cpu/kernel_table.inc"
#define FO_ISA_BF16_BLOCKS avx512_bf16_blocks
#include "cpu/bf16_blocks.inc"

void fo::cpu::encode_block_avx512(const std::uint8_t* base, const float* thresholds, const float* x,
                                  float absmax, int n, std::int32_t* codes) {
  static_assert(NearestCodeTable<8>::kCrossings == 2, "two compares per element");
  const __m512 a = _mm512_set1_ps(absmax);
  const __m512i low_byte = _mm512_set1_epi32(0xFF), one = _mm512_set1_epi32(1);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 y = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), a);  // masked lanes: 0
    const __m512i prefix = _mm512_srli_epi32(_mm512_castps_si512(y), 16);
    __m512i c = _mm512_and_si512(_mm512_i32gather_epi32(prefix, base, 1), low_byte);
    const __m512 t0 = _mm512_i32gather_ps(c, thresholds, 4);
    const __m512 t1 = _mm512_i32gather_ps(_mm512_add_epi32(c, one), thresholds, 4);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(y, t0, _CMP_GE_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(y, t1, _CMP_GE_OQ), c, one);
    _mm512_mask_storeu_epi32(codes + i, m, c);
  }
}
