// Schedule-Free SGD and AdamW (docs/optimizers.md `sgd_schedule_free`, `adamw_schedule_free`;
// facebookresearch/schedule_free's SGDScheduleFree and AdamWScheduleFree, "The Road Less
// Scheduled", Defazio et al. 2024). No learning-rate schedule: the param in training is
// y = (1 - beta) z + beta x, an interpolation between the SGD/Adam iterate z (state "z",
// which starts as a copy of the param) and x, an average of the z's weighted by
// c_t = w_t / (w_1 + ... + w_t). The step updates y in place without forming x:
//
//   lr_t   = lr * t / warmup_steps while t - 1 < warmup_steps, then lr
//   lr_max = max(lr_max, lr_t)                        (scalar state, starts at -1)
//   w_t    = t^r * lr_max^weight_lr_power
//   W      = W + w_t                                  (scalar state weight_sum, starts at 0)
//   c      = w_t / W                                  (0 where W is 0)
//   AdamW: v <- beta2 v + (1 - beta2) g^2;  u = g / (sqrt(v / (1 - beta2^t)) + eps)
//   SGD:   u = g
//   u     <- u + weight_decay * y                     (decay at y)
//   y     <- lerp(y, z, c);   y <- y + lr_t (beta (1 - c) - 1) u;   z <- z - lr_t u
//
// beta is momentum (SGD) or beta1 (AdamW). Evaluation uses x, which eval() computes from y
// and z as x = lerp(y, z, 1 - 1/beta) (EvalOp); train() restores y.
//
// lr_max and weight_sum are the per-param scalar states (kScalars): make_op reads them and
// returns their values after this step, which the caller keeps only if the step is taken.
// They follow the lr each step actually uses (a schedule's factor included), as the package's
// do; t^r and lr_max^p are computed with portable_pow, so the device builds the host's bits.
//
// Precision: fp32 in the functor, lerp as torch's (ema_lerp); the step scalars in double.
// Traffic per element: p, g, z read, p, z written; AdamW also exp_avg_sq read and written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/ema.hpp"

namespace fo {

/// x^y for x >= 0 as Python's float pow gives it for the cases the scalars meet: y == 0 gives
/// 1 (0^0 included), 0^y = 0 for y > 0; otherwise e^(y ln x) from the portable helpers.
FO_HOST_DEVICE double portable_pow(double x, double y) {
  if (y == 0.0) return 1.0;
  if (x == 0.0) return y > 0.0 ? 0.0 : HUGE_VAL;
  return portable_exp(y * portable_log(x));
}

/// The step scalars both variants share: this step's lr, the averaging weight c, the y
/// update's rate lr (beta (1 - c) - 1), and the scalar states after the step.
struct ScheduleFreeScalars {
  double lr, ckp1, y_lr;
};

FO_HOST_DEVICE ScheduleFreeScalars schedule_free_scalars(double lr, double beta, double warmup,
                                                         double r, double power, std::int64_t step,
                                                         const double* in, double* out) {
  const auto t = static_cast<double>(step);
  if (t - 1.0 < warmup) lr *= t / warmup;  // the package's (k + 1) / warmup_steps for k < warmup
  const double lr_max = lr > in[0] ? lr : in[0];
  const double weight = portable_pow(t, r) * portable_pow(lr_max, power);
  const double weight_sum = in[1] + weight;
  const double ckp1 = weight_sum != 0.0 ? weight / weight_sum : 0.0;
  out[0] = lr_max;
  out[1] = weight_sum;
  return {lr, ckp1, lr * (beta * (1.0 - ckp1) - 1.0)};
}

/// eval(): the param's x from its y and z (the package's lerp with weight 1 - 1/beta).
struct ScheduleFreeEvalOp {
  float weight;
  template <class V>
  FO_HOST_DEVICE V operator()(V y, const V* s) const {
    return ema_lerp(y, s[0], weight);
  }
};

struct SgdScheduleFreeOp {
  float lr, ckp1, y_lr, weight_decay;

  // s[0] z
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (weight_decay != 0.0f) g = g + V(weight_decay) * p;
    p = ema_lerp(p, s[0], ckp1);
    p = p + V(y_lr) * g;
    s[0] = s[0] - V(lr) * g;
  }
};

struct AdamWScheduleFreeOp {
  float lr, ckp1, y_lr, weight_decay;
  float beta2, one_minus_beta2, bc2, eps;

  // s[0] z, s[1] exp_avg_sq
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    s[1] = s[1] * V(beta2) + V(one_minus_beta2) * (g * g);
    V u = g / (vsqrt(s[1] / V(bc2)) + V(eps));
    if (weight_decay != 0.0f) u = u + V(weight_decay) * p;
    p = ema_lerp(p, s[0], ckp1);
    p = p + V(y_lr) * u;
    s[0] = s[0] - V(lr) * u;
  }
};

/// What the two descriptors share: warm-up and averaging options, the scalar states, z.
struct ScheduleFreeCommon {
  static constexpr const char* kScalars[] = {"lr_max", "weight_sum"};
  static double scalar_init(int k) { return k == 0 ? -1.0 : 0.0; }
  static constexpr bool state_from_param(int k) { return k == 0; }  // z starts as the param
  static void validate_common(double lr, double beta, const char* beta_name, double wd,
                              double warmup, double r, double power, Validator& v) {
    v.at_least("lr", lr, 0.0);
    v.in_open_unit_interval(beta_name, beta);  // eval's 1 - 1/beta needs beta > 0
    v.at_least("weight_decay", wd, 0.0);
    v.at_least("warmup_steps", warmup, 0.0);
    v.at_least("r", r, 0.0);
    v.at_least("weight_lr_power", power, 0.0);
  }
};

struct SgdScheduleFree : ScheduleFreeCommon {
  static constexpr const char* kName = "sgd_schedule_free";
  struct Options {
    double lr = 1.0, momentum = 0.9, weight_decay = 0.0, warmup_steps = 0.0, r = 0.0;
    double weight_lr_power = 2.0;
  };
  using Op = SgdScheduleFreeOp;
  using EvalOp = ScheduleFreeEvalOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("momentum", &Options::momentum),
      real_option("weight_decay", &Options::weight_decay),
      real_option("warmup_steps", &Options::warmup_steps),
      real_option("r", &Options::r),
      real_option("weight_lr_power", &Options::weight_lr_power),
  };
  static constexpr const char* kStates[] = {"z"};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    validate_common(o.lr, o.momentum, "momentum", o.weight_decay, o.warmup_steps, o.r,
                    o.weight_lr_power, v);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step, const double* scalars,
                                   double* next) {
    const ScheduleFreeScalars c = schedule_free_scalars(o.lr, o.momentum, o.warmup_steps, o.r,
                                                        o.weight_lr_power, step, scalars, next);
    return {to_f32(c.lr), to_f32(c.ckp1), to_f32(c.y_lr), to_f32(o.weight_decay)};
  }
  static EvalOp make_eval_op(const Options& o) { return {to_f32(1.0 - 1.0 / o.momentum)}; }
};

struct AdamWScheduleFree : ScheduleFreeCommon {
  static constexpr const char* kName = "adamw_schedule_free";
  struct Options {
    double lr = 2.5e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
    double warmup_steps = 0.0, r = 0.0, weight_lr_power = 2.0;
  };
  using Op = AdamWScheduleFreeOp;
  using EvalOp = ScheduleFreeEvalOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      real_option("warmup_steps", &Options::warmup_steps),
      real_option("r", &Options::r),
      real_option("weight_lr_power", &Options::weight_lr_power),
  };
  static constexpr const char* kStates[] = {"z", "exp_avg_sq"};
  static constexpr bool kNonNegativeStates[] = {false, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    validate_common(o.lr, o.beta1, "beta1", o.weight_decay, o.warmup_steps, o.r, o.weight_lr_power,
                    v);
    v.in_unit_interval("beta2", o.beta2);
    v.greater_than("eps", o.eps, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step, const double* scalars,
                                   double* next) {
    const ScheduleFreeScalars c = schedule_free_scalars(o.lr, o.beta1, o.warmup_steps, o.r,
                                                        o.weight_lr_power, step, scalars, next);
    AdamWScheduleFreeOp op{};
    op.lr = to_f32(c.lr);
    op.ckp1 = to_f32(c.ckp1);
    op.y_lr = to_f32(c.y_lr);
    op.weight_decay = to_f32(o.weight_decay);
    op.beta2 = to_f32(o.beta2);
    op.one_minus_beta2 = to_f32(1.0 - o.beta2);
    op.bc2 = to_f32(1.0 - power(o.beta2, step));
    op.eps = to_f32(o.eps);
    return op;
  }
  static EvalOp make_eval_op(const Options& o) { return {to_f32(1.0 - 1.0 / o.beta1)}; }
};

}  // namespace fo
