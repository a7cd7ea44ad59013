// The vocabulary every optimizer functor is written in.
//
// A functor's call operator is a template over a value type V: `float` on the GPU and in the
// CPU's scalar path, a SIMD register wrapper (kernels/cpu/simd_*.hpp) in the CPU's vector
// paths. The functions below are the scalar half of that vocabulary; each SIMD wrapper
// provides the same names for its type, found by argument-dependent lookup. Names carry a `v`
// prefix so that a float argument never silently binds to the double-precision ::sqrt.
#pragma once

#include <cmath>

// Always inlined, also on the host at -O0: each CPU ISA's translation unit compiles these with
// its own instruction set, and an out-of-line copy (a weak symbol) from the AVX-512 unit could
// be the one the linker keeps for the scalar path.
#if defined(__CUDACC__)
#define FO_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FO_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FO_HOST_DEVICE inline
#endif

// The CUDA kernels and their launchers sit in an inline namespace when compiled as host C++
// for the host emulation (kernels/cuda/host_emulation.hpp), so that a test binary can hold
// them beside the library's real CUDA backend (or its stub) without a clash of symbols.
#if defined(FO_CUDA_HOST_EMULATION)
#define FO_EMULATION_BEGIN inline namespace host_emulation {
#define FO_EMULATION_END }
#else
#define FO_EMULATION_BEGIN
#define FO_EMULATION_END
#endif

namespace fo {

/// Most state buffers any optimizer keeps per element (rmsprop: square_avg, momentum, grad_avg).
inline constexpr int kMaxStates = 3;

FO_HOST_DEVICE float vfma(float a, float b, float c) { return fmaf(a, b, c); }
FO_HOST_DEVICE float vsqrt(float a) { return sqrtf(a); }
FO_HOST_DEVICE float vmax(float a, float b) { return a > b ? a : b; }
FO_HOST_DEVICE float vmin(float a, float b) { return a < b ? a : b; }
FO_HOST_DEVICE float vselect(bool m, float a, float b) { return m ? a : b; }
/// sign(x) in {-1, 0, +1}; sign(0) = sign(-0) = 0; sign(NaN) = 0.
FO_HOST_DEVICE float vsign(float a) { return a > 0.0f ? 1.0f : (a < 0.0f ? -1.0f : 0.0f); }

}  // namespace fo
