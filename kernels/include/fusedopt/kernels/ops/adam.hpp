// Adam (docs/optimizers.md `adam`) and the functor AdamW shares with it.
//
// Precision: storage is converted to fp32 by the kernel; every operation here is fp32. The
// step-dependent scalars (lr / bc1, 1 / sqrt(bc2)) are computed once per step in double.
// Traffic per element: p, g, m, v read; p, m, v written (+ vmax read and written with amsgrad).
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

/// What the Adam-like functors (adam, adamw, nadam, radam) share: maximize, weight decay (L2
/// folded into g, or decoupled: p shrinks first) and the two moments. The same operations in
/// the same order in each, so each rounds as Adam does.
struct AdamCore {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float weight_decay;  // L2 decay folded into g; 0 when decoupled
  float param_scale;   // decoupled decay 1 - lr*wd; 1 for L2
  bool maximize;

  // Applies maximize and decay to g and p, then the moments into s[0] (exp_avg) and s[1]
  // (exp_avg_sq); returns them in m and v.
  template <class V>
  FO_HOST_DEVICE void moments(V& p, V& g, V* s, V& m, V& v) const {
    if (maximize) g = -g;
    p = p * V(param_scale);
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);
    m = vfma(V(beta1), s[0], V(one_minus_beta1) * g);
    v = vfma(V(beta2), s[1], V(one_minus_beta2) * g * g);
    s[0] = m;
    s[1] = v;
  }

  FO_HOST_DEVICE static AdamCore make(double lr, double beta1, double beta2, double wd,
                                      bool decoupled, bool maximize) {
    AdamCore c{};
    c.beta1 = to_f32(beta1);
    c.one_minus_beta1 = to_f32(1.0 - beta1);
    c.beta2 = to_f32(beta2);
    c.one_minus_beta2 = to_f32(1.0 - beta2);
    c.weight_decay = decoupled ? 0.0f : to_f32(wd);
    c.param_scale = decoupled ? to_f32(1.0 - lr * wd) : 1.0f;
    c.maximize = maximize;
    return c;
  }
};

struct AdamOp {
  AdamCore core;
  float eps;
  float step_size;     // lr / bc1
  float inv_sqrt_bc2;  // 1 / sqrt(bc2)
  bool amsgrad;

  // s[0] exp_avg, s[1] exp_avg_sq, s[2] max_exp_avg_sq (amsgrad only)
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    V m, v;
    core.moments(p, g, s, m, v);
    if (amsgrad) {
      v = vmax(s[2], v);
      s[2] = v;
    }
    V denom = vfma(vsqrt(v), V(inv_sqrt_bc2), V(eps));
    p = vfma(V(-step_size), m / denom, p);
  }

  /// Step scalars shared by adam and adamw; `decoupled` picks where weight decay goes.
  FO_HOST_DEVICE static AdamOp make(double lr, double beta1, double beta2, double eps, double wd,
                                    bool amsgrad, bool maximize, bool decoupled,
                                    std::int64_t step) {
    const double bc1 = 1.0 - power(beta1, step);
    const double bc2 = 1.0 - power(beta2, step);
    AdamOp op{};
    op.core = AdamCore::make(lr, beta1, beta2, wd, decoupled, maximize);
    op.eps = to_f32(eps);
    op.step_size = to_f32(lr / bc1);
    op.inv_sqrt_bc2 = to_f32(1.0 / sqrt(bc2));
    op.amsgrad = amsgrad;
    return op;
  }
};

/// The constraints every Adam-like optimizer (adam, adamw, lazyadam) puts on its options.
inline void validate_adam_core(double lr, double eps, double beta1, double beta2, Validator& v) {
  v.at_least("lr", lr, 0.0);
  v.at_least("eps", eps, 0.0);
  v.in_unit_interval("beta1", beta1);
  v.in_unit_interval("beta2", beta2);
}

/// Options and validation common to adam and adamw (they differ in the weight_decay default).
struct AdamOptionsBase {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false, maximize = false;
};

/// Everything adam and adamw declare but their name: options `O`, and where weight decay goes.
template <class O, bool kDecoupled>
struct AdamFamily {
  using Options = O;
  using Op = AdamOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option<Options>("lr", &Options::lr),
      real_option<Options>("beta1", &Options::beta1),
      real_option<Options>("beta2", &Options::beta2),
      real_option<Options>("eps", &Options::eps),
      real_option<Options>("weight_decay", &Options::weight_decay),
      flag_option<Options>("amsgrad", &Options::amsgrad),
      flag_option<Options>("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static constexpr bool kNonNegativeStates[] = {false, true, true};
  static bool has_state(const Options& o, int k) { return k < 2 || o.amsgrad; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    validate_adam_core(o.lr, o.eps, o.beta1, o.beta2, v);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    return AdamOp::make(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.amsgrad, o.maximize,
                        kDecoupled, step);
  }
};

struct Adam : AdamFamily<AdamOptionsBase, /*kDecoupled=*/false> {
  static constexpr const char* kName = "adam";
};

}  // namespace fo
