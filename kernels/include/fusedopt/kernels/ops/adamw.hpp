// AdamW (docs/optimizers.md `adamw`): Adam's functor with decoupled weight decay, p *= 1 - lr*wd
// first.
#pragma once

#include "fusedopt/kernels/ops/adam.hpp"

namespace fo {

struct AdamWOptions : AdamOptionsBase {
  AdamWOptions() { weight_decay = 1e-2; }
};

struct AdamW : AdamFamily<AdamWOptions> {
  static constexpr const char* kName = "adamw";
  using Options = AdamWOptions;
  using Op = AdamOp;
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    return AdamOp::make(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.amsgrad, o.maximize,
                        /*decoupled=*/true, step);
  }
};

}  // namespace fo
