// The scalar value type for the CPU fallback: plain float, one lane, with the functions of
// fusedopt/kernels/config.hpp. Used where the CPU has neither AVX2+FMA nor AVX-512.
#pragma once

#include <cstdint>

namespace fo::cpu::scalar {

struct Io {
  using V = float;
  using TailMask = int;
  static float load(const float* p) { return *p; }
  static void store(float* p, float x) { *p = x; }
  static int tail_mask(std::int64_t) { return 0; }  // width 1: there is never a tail
  static float load(const float* p, int) { return *p; }
  static void store(float* p, float x, int) { *p = x; }
};

}  // namespace fo::cpu::scalar
