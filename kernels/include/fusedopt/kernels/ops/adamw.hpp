// AdamW (docs/optimizers.md `adamw`): Adam's functor with decoupled weight decay, p *= 1 - lr*wd
// first.
#pragma once

#include "fusedopt/kernels/ops/adam.hpp"

namespace fo {

struct AdamWOptions : AdamOptionsBase {
  AdamWOptions() { weight_decay = 1e-2; }
};

struct AdamW : AdamFamily<AdamWOptions, /*kDecoupled=*/true> {
  static constexpr const char* kName = "adamw";
};

}  // namespace fo
