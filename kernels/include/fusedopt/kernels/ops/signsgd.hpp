// SignSGD (docs/optimizers.md `signsgd`; Bernstein et al. 2018): a step of lr against the
// sign of each gradient. No state: it shows that an algorithm may keep none.
//
//   g <- -g if maximize;  g <- g + weight_decay * p             (L2 decay)
//   p <- p - lr * sign(g)                                       (sign(0) = 0)
//
// Precision: fp32. Traffic per element: p, g read; p written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct SignSgdOp {
  float lr, weight_decay;
  bool maximize;

  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V*) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);  // L2 decay
    p = vfma(V(-lr), vsign(g), p);
  }
};

struct SignSgd {
  static constexpr const char* kName = "signsgd";
  struct Options {
    double lr = 1e-3, weight_decay = 0.0;
    bool maximize = false;
  };
  using Op = SignSgdOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("maximize", &Options::maximize),
  };
  // No kStates: StateList<SignSgd>::count is 0.
  static bool has_state(const Options&, int) { return false; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    SignSgdOp op{};
    op.lr = to_f32(o.lr);
    op.weight_decay = to_f32(o.weight_decay);
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
