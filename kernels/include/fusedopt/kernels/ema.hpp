// The weight EMA's update (docs/optimizers.md, "Weight EMA"), written once for the CPU
// kernels (V: a SIMD register wrapper or float) and the CUDA kernel (float).
#pragma once

#include "fusedopt/kernels/config.hpp"

namespace fo {

/// The EMA's weight w = 1 - decay: computed in double, rounded once to float (what torch's
/// lerp receives from timm's `weight=1. - decay`).
inline float ema_weight(double decay) { return static_cast<float>(1.0 - decay); }

/// ema <- lerp(ema, p, w) in fp32, torch's lerp without its fused multiply-add:
///   w < 0.5:  ema + w * (p - ema)
///   else:     p - (p - ema) * (1 - w)     (1 - w in float: exact for w in [0.5, 1])
/// each operation rounded to nearest in that order. The branch depends on w only: uniform
/// across a launch or a loop.
template <class V>
FO_HOST_DEVICE V ema_lerp(V ema, V p, float w) {
  if (w < 0.5f) return ema + V(w) * (p - ema);
  return p - (p - ema) * V(1.0f - w);
}

}  // namespace fo
