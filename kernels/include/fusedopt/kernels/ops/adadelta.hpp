// AdaDelta (docs/optimizers.md `adadelta`).
//
// Precision: fp32 throughout.
// Traffic per element: p, g, square_avg, acc_delta read; p, square_avg, acc_delta written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct AdadeltaOp {
  float lr, rho, one_minus_rho, eps, weight_decay;
  bool maximize;

  // s[0] square_avg, s[1] acc_delta
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);
    V sq = vfma(V(rho), s[0], V(one_minus_rho) * g * g);
    s[0] = sq;
    V delta = vsqrt(s[1] + V(eps)) / vsqrt(sq + V(eps)) * g;
    s[1] = vfma(V(rho), s[1], V(one_minus_rho) * delta * delta);
    p = vfma(V(-lr), delta, p);
  }
};

struct Adadelta {
  static constexpr const char* kName = "adadelta";
  struct Options {
    double lr = 1.0, rho = 0.9, eps = 1e-6, weight_decay = 0.0;
    bool maximize = false;
  };
  using Op = AdadeltaOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("rho", &Options::rho),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"square_avg", "acc_delta"};
  static constexpr bool kNonNegativeStates[] = {true, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.in_unit_interval("rho", o.rho);
    v.at_least("eps", o.eps, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    AdadeltaOp op{};
    op.lr = to_f32(o.lr);
    op.rho = to_f32(o.rho);
    op.one_minus_rho = to_f32(1.0 - o.rho);
    op.eps = to_f32(o.eps);
    op.weight_decay = to_f32(o.weight_decay);
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
