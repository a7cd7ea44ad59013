// The CUDA elementwise kernel: one pass over a tensor applying an optimizer functor to param,
// grad and state, each element loaded once and stored once.
//
// kVec4: every pointer is 16-byte aligned, so each thread moves float4s (16-byte loads and
// stores) and the last n % 4 elements go through the scalar path. Grid-stride loop with
// 64-bit indices: any size, any grid. States the optimizer does not keep are null and are
// neither loaded nor stored (a uniform branch).
// Bytes moved per element: 4 * (2 + 2 * active states) + 4 (grad read, param read+write).
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"

namespace fo::cuda_kernels {

struct DensePtrs {
  float* param;
  const float* grad;
  float* states[kMaxStates];
};

template <class Op>
__device__ __forceinline__ void step_one(const Op& op, const DensePtrs& t, std::int64_t i) {
  float p = t.param[i];
  float s[kMaxStates];
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k) s[k] = t.states[k] ? t.states[k][i] : 0.0f;
  op(p, __ldg(t.grad + i), s);
  t.param[i] = p;
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k)
    if (t.states[k]) t.states[k][i] = s[k];
}

__device__ __forceinline__ void unpack(const float4& v, float* out) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ float4 pack(const float* v) {
  return make_float4(v[0], v[1], v[2], v[3]);
}

template <class Op, bool kVec4>
__global__ void __launch_bounds__(256)
    dense_step_kernel(const Op op, const DensePtrs t, const std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t scalar_begin = 0;
  if constexpr (kVec4) {
    const std::int64_t nv = n / 4;
    for (std::int64_t i = tid; i < nv; i += stride) {
      float p[4], g[4], s[kMaxStates][4];
      unpack(reinterpret_cast<const float4*>(t.param)[i], p);
      unpack(__ldg(reinterpret_cast<const float4*>(t.grad) + i), g);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k) {
        if (t.states[k])
          unpack(reinterpret_cast<const float4*>(t.states[k])[i], s[k]);
        else
          s[k][0] = s[k][1] = s[k][2] = s[k][3] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sj[kMaxStates] = {s[0][j], s[1][j], s[2][j]};
        op(p[j], g[j], sj);
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k) s[k][j] = sj[k];
      }
      reinterpret_cast<float4*>(t.param)[i] = pack(p);
#pragma unroll
      for (int k = 0; k < kMaxStates; ++k)
        if (t.states[k]) reinterpret_cast<float4*>(t.states[k])[i] = pack(s[k]);
    }
    scalar_begin = nv * 4;
  }
  for (std::int64_t i = scalar_begin + tid; i < n; i += stride) step_one(op, t, i);
}

}  // namespace fo::cuda_kernels
