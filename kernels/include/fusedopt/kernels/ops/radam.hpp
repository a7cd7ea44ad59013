// RAdam (docs/optimizers.md `radam`; torch.optim.RAdam): Adam whose adaptive step is switched
// on, and scaled by the rectification term r_t, only once the variance of the adaptive
// learning rate is tractable (rho_t > 5); before that, SGD with momentum.
//
//   g  <- -g if maximize
//   p  <- p * (1 - lr * weight_decay)          (decoupled_weight_decay), or
//   g  <- g + weight_decay * p                 (L2 decay)
//   m  <- beta1 * m + (1 - beta1) * g          (exp_avg)
//   v  <- beta2 * v + (1 - beta2) * g * g      (exp_avg_sq)
//   rho_inf = 2 / (1 - beta2) - 1,  rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
//   rho_t > 5:  p <- p - lr * r_t * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps),
//               r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//   else:       p <- p - lr / (1 - beta1^t) * m
//
// Precision: fp32 in the functor; rho_t, r_t and the step size are computed once per step in
// double (powers by power(), square roots: the same bits on the host and the device).
// Traffic per element: p, g, exp_avg, exp_avg_sq read; p, exp_avg, exp_avg_sq written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/ops/adam.hpp"

namespace fo {

struct RAdamOp {
  AdamCore core;
  float eps;
  float step_size;  // lr * r_t * sqrt(bc2) / bc1 when rectified; else lr / bc1
  bool rectified;

  // s[0] exp_avg, s[1] exp_avg_sq
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    V m, v;
    core.moments(p, g, s, m, v);
    if (rectified)
      p = vfma(V(-step_size), m / (vsqrt(v) + V(eps)), p);
    else
      p = vfma(V(-step_size), m, p);
  }
};

struct RAdam {
  static constexpr const char* kName = "radam";
  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
    bool decoupled_weight_decay = false, maximize = false;
  };
  using Op = RAdamOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("decoupled_weight_decay", &Options::decoupled_weight_decay),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  static constexpr bool kNonNegativeStates[] = {false, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    validate_adam_core(o.lr, o.eps, o.beta1, o.beta2, v);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    const double beta2_t = power(o.beta2, step);
    const double bc1 = 1.0 - power(o.beta1, step);
    const double bc2 = 1.0 - beta2_t;
    const double rho_inf = 2.0 / (1.0 - o.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * static_cast<double>(step) * beta2_t / bc2;
    RAdamOp op{};
    op.core = AdamCore::make(o.lr, o.beta1, o.beta2, o.weight_decay, o.decoupled_weight_decay,
                             o.maximize);
    op.eps = to_f32(o.eps);
    op.rectified = rho_t > 5.0;
    if (op.rectified) {
      const double r = sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                            ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
      op.step_size = to_f32(o.lr * r * sqrt(bc2) / bc1);
    } else {
      op.step_size = to_f32(o.lr / bc1);
    }
    return op;
  }
};

}  // namespace fo
