// Adamax (docs/optimizers.md `adamax`; torch.optim.Adamax): Adam with the infinity norm in
// place of the second moment.
//
//   g   <- -g if maximize;  g <- g + weight_decay * p           (L2 decay)
//   m   <- beta1 * m + (1 - beta1) * g                          (exp_avg)
//   u   <- max(beta2 * u, |g| + eps)                            (exp_inf)
//   p   <- p - lr / (1 - beta1^t) * m / u
//
// Precision: fp32 in the functor; the bias-corrected step size lr / (1 - beta1^t) is
// computed once per step in double. Traffic per element: p, g, exp_avg, exp_inf read;
// p, exp_avg, exp_inf written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct AdamaxOp {
  float beta1, one_minus_beta1, beta2, eps, weight_decay;
  float step_size;  // lr / (1 - beta1^t)
  bool maximize;

  // s[0] exp_avg, s[1] exp_inf
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);  // L2 decay
    const V m = vfma(V(beta1), s[0], V(one_minus_beta1) * g);   // m: first moment
    const V u = vmax(V(beta2) * s[1], vmax(g, -g) + V(eps));    // u: infinity norm
    s[0] = m;
    s[1] = u;
    p = vfma(V(-step_size), m / u, p);
  }
};

struct Adamax {
  static constexpr const char* kName = "adamax";
  struct Options {
    double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
    bool maximize = false;
  };
  using Op = AdamaxOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"exp_avg", "exp_inf"};
  static constexpr bool kNonNegativeStates[] = {false, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.at_least("eps", o.eps, 0.0);
    v.in_unit_interval("beta1", o.beta1);
    v.in_unit_interval("beta2", o.beta2);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    AdamaxOp op{};
    op.beta1 = to_f32(o.beta1);
    op.one_minus_beta1 = to_f32(1.0 - o.beta1);
    op.beta2 = to_f32(o.beta2);
    op.eps = to_f32(o.eps);
    op.weight_decay = to_f32(o.weight_decay);
    op.step_size = to_f32(o.lr / (1.0 - power(o.beta1, step)));
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
