// RMSProp, plain, centered and with momentum (docs/optimizers.md `rmsprop`).
//
// Precision: fp32 throughout; the centered variance sq - ga^2 is one fused multiply-add.
// Traffic per element: p, g, square_avg read; p, square_avg written; + momentum_buffer and
// grad_avg read and written when enabled.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct RmspropOp {
  float lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  bool centered, has_momentum, maximize;

  // s[0] square_avg, s[1] momentum_buffer (momentum > 0), s[2] grad_avg (centered)
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);
    V sq = vfma(V(alpha), s[0], V(one_minus_alpha) * g * g);
    s[0] = sq;
    V avg;
    if (centered) {
      V ga = vfma(V(alpha), s[2], V(one_minus_alpha) * g);
      s[2] = ga;
      avg = vsqrt(vfma(-ga, ga, sq)) + V(eps);
    } else {
      avg = vsqrt(sq) + V(eps);
    }
    if (has_momentum) {
      V b = vfma(V(momentum), s[1], g / avg);
      s[1] = b;
      p = vfma(V(-lr), b, p);
    } else {
      p = vfma(V(-lr), g / avg, p);
    }
  }
};

struct Rmsprop {
  static constexpr const char* kName = "rmsprop";
  struct Options {
    double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0.0, momentum = 0.0;
    bool centered = false, maximize = false;
  };
  using Op = RmspropOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("alpha", &Options::alpha),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      real_option("momentum", &Options::momentum),
      flag_option("centered", &Options::centered),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"square_avg", "momentum_buffer", "grad_avg"};
  static constexpr bool kNonNegativeStates[] = {true, false, false};
  static bool has_state(const Options& o, int k) {
    return k == 0 || (k == 1 && o.momentum > 0.0) || (k == 2 && o.centered);
  }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.in_unit_interval("alpha", o.alpha);
    v.at_least("eps", o.eps, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
    v.at_least("momentum", o.momentum, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    RmspropOp op{};
    op.lr = to_f32(o.lr);
    op.alpha = to_f32(o.alpha);
    op.one_minus_alpha = to_f32(1.0 - o.alpha);
    op.eps = to_f32(o.eps);
    op.weight_decay = to_f32(o.weight_decay);
    op.momentum = to_f32(o.momentum);
    op.centered = o.centered;
    op.has_momentum = o.momentum > 0.0;
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
