// Lion (docs/optimizers.md `lion`; Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms").
//
// Precision: fp32 throughout; sign(0) = 0.
// Traffic per element: p, g, exp_avg read; p, exp_avg written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct LionOp {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, param_scale;
  bool maximize;

  // s[0] exp_avg
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    p = p * V(param_scale);
    const V c = vfma(V(beta1), s[0], V(one_minus_beta1) * g);
    p = vfma(V(-lr), vsign(c), p);
    s[0] = vfma(V(beta2), s[0], V(one_minus_beta2) * g);
  }
};

struct Lion {
  static constexpr const char* kName = "lion";
  struct Options {
    double lr = 1e-4, beta1 = 0.9, beta2 = 0.99, weight_decay = 0.0;
    bool maximize = false;
  };
  using Op = LionOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"exp_avg"};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.in_unit_interval("beta1", o.beta1);
    v.in_unit_interval("beta2", o.beta2);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    LionOp op{};
    op.lr = to_f32(o.lr);
    op.beta1 = to_f32(o.beta1);
    op.one_minus_beta1 = to_f32(1.0 - o.beta1);
    op.beta2 = to_f32(o.beta2);
    op.one_minus_beta2 = to_f32(1.0 - o.beta2);
    op.param_scale = to_f32(1.0 - o.lr * o.weight_decay);
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
