// AdEMAMix (docs/optimizers.md `ademamix`; Pagliardini, Ablin and Grangier, 2024, "The AdEMAMix
// Optimizer: Better, Faster, Older"), as bitsandbytes' AdEMAMix and optax.contrib.ademamix
// compute it: Adam's bias-corrected fast EMA and second moment, plus a slow EMA (beta3, not
// bias-corrected) mixed in with weight alpha, and decoupled weight decay.
//
//   g  <- -g if maximize
//   p  <- p * (1 - lr * weight_decay)
//   m1 <- beta1 * m1 + (1 - beta1) * g              (exp_avg)
//   m2 <- beta3_t * m2 + (1 - beta3_t) * g          (exp_avg_slow)
//   nu <- beta2 * nu + (1 - beta2) * g * g          (exp_avg_sq)
//   p  <- p - lr * (m1 / (1 - beta1^t) + alpha_t * m2) / (sqrt(nu / (1 - beta2^t)) + eps)
//
//   alpha_t = min(t * alpha / t_alpha, alpha)                           (t_alpha > 0; else alpha)
//   beta3_t = min(exp(ln b1 ln b3 / ((1 - s) ln b3 + s ln b1)), b3),
//             s = t / t_beta3                                           (t_beta3 > 0; else b3)
//
// The warm-ups are the paper's schedulers as bitsandbytes writes them (1-based t; beta3_t
// interpolates linearly in the EMA's half-life from beta1 to beta3).
//
// Precision: fp32 in the functor; alpha_t, beta3_t and the bias corrections are computed once
// per step in double from +, -, *, /, sqrt and the portable exp/log (algorithm.hpp), so a
// step built on the device has the host's bits.
// Traffic per element: p, g, exp_avg, exp_avg_slow, exp_avg_sq read; the same but g written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

/// The paper's beta3 warm-up before its clamp at beta3, at s = t / t_beta3:
/// exp(ln b1 ln b3 / ((1 - s) ln b3 + s ln b1)), written as exp(1 / ((1 - s) / ln b1 +
/// s / ln b3)) (the same number) so that beta1 = 0 (ln b1 = -inf) gives its limit b3^(1/s)
/// instead of inf / inf.
FO_HOST_DEVICE double ademamix_beta3_warmup(double beta1, double beta3, double s) {
  const double inv_ln_b1 = 1.0 / portable_log(beta1), inv_ln_b3 = 1.0 / portable_log(beta3);
  return portable_exp(1.0 / ((1.0 - s) * inv_ln_b1 + s * inv_ln_b3));
}

struct AdEMAMixOp {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, eps;
  float param_scale;   // 1 - lr * weight_decay
  float fast_coef;     // lr / (1 - beta1^t)
  float slow_coef;     // lr * alpha_t
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
  bool maximize;

  // s[0] exp_avg, s[1] exp_avg_slow, s[2] exp_avg_sq
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    p = p * V(param_scale);                                         // decoupled decay
    const V m1 = vfma(V(beta1), s[0], V(one_minus_beta1) * g);      // m1: fast EMA
    const V m2 = vfma(V(beta3), s[1], V(one_minus_beta3) * g);      // m2: slow EMA
    const V nu = vfma(V(beta2), s[2], V(one_minus_beta2) * g * g);  // nu: second moment
    s[0] = m1;
    s[1] = m2;
    s[2] = nu;
    const V denom = vfma(vsqrt(nu), V(inv_sqrt_bc2), V(eps));  // sqrt(nu / bc2) + eps
    const V num = vfma(V(slow_coef), m2, V(fast_coef) * m1);   // lr (m1 / bc1 + alpha_t m2)
    p = p - num / denom;
  }
};

struct AdEMAMix {
  static constexpr const char* kName = "ademamix";
  // bitsandbytes' defaults (optax's differ only in weight_decay, 0 there).
  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, beta3 = 0.9999, alpha = 5.0, eps = 1e-8;
    double weight_decay = 1e-2;
    double t_alpha = 0.0, t_beta3 = 0.0;  // warm-up lengths in steps; 0: no warm-up
    bool maximize = false;
  };
  using Op = AdEMAMixOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("beta3", &Options::beta3),
      real_option("alpha", &Options::alpha),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      real_option("t_alpha", &Options::t_alpha),
      real_option("t_beta3", &Options::t_beta3),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_slow", "exp_avg_sq"};
  static constexpr bool kNonNegativeStates[] = {false, false, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.at_least("eps", o.eps, 0.0);
    v.in_unit_interval("beta1", o.beta1);
    v.in_unit_interval("beta2", o.beta2);
    v.in_unit_interval("beta3", o.beta3);
    v.at_least("alpha", o.alpha, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
    v.at_least("t_alpha", o.t_alpha, 0.0);
    v.at_least("t_beta3", o.t_beta3, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    const double t = static_cast<double>(step);
    double alpha = o.alpha;
    if (o.t_alpha > 0.0) {
      const double warm = t * o.alpha / o.t_alpha;
      alpha = warm < o.alpha ? warm : o.alpha;
    }
    double beta3 = o.beta3;
    if (o.t_beta3 > 0.0) {
      const double warm = ademamix_beta3_warmup(o.beta1, o.beta3, t / o.t_beta3);
      beta3 = warm < o.beta3 ? warm : o.beta3;  // (a NaN would give beta3; none arises)
    }
    AdEMAMixOp op{};
    op.beta1 = to_f32(o.beta1);
    op.one_minus_beta1 = to_f32(1.0 - o.beta1);
    op.beta2 = to_f32(o.beta2);
    op.one_minus_beta2 = to_f32(1.0 - o.beta2);
    op.beta3 = to_f32(beta3);
    op.one_minus_beta3 = to_f32(1.0 - beta3);
    op.eps = to_f32(o.eps);
    op.param_scale = to_f32(1.0 - o.lr * o.weight_decay);
    op.fast_coef = to_f32(o.lr / (1.0 - power(o.beta1, step)));
    op.slow_coef = to_f32(o.lr * alpha);
    op.inv_sqrt_bc2 = to_f32(1.0 / sqrt(1.0 - power(o.beta2, step)));
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
