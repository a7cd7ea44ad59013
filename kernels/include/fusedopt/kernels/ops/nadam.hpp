// NAdam (docs/optimizers.md `nadam`; torch.optim.NAdam): Adam with Nesterov momentum through
// Dozat's momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay)).
//
//   g  <- -g if maximize
//   p  <- p * (1 - lr * weight_decay)          (decoupled_weight_decay), or
//   g  <- g + weight_decay * p                 (L2 decay)
//   m  <- beta1 * m + (1 - beta1) * g          (exp_avg)
//   v  <- beta2 * v + (1 - beta2) * g * g      (exp_avg_sq)
//   d  <- sqrt(v / (1 - beta2^t)) + eps
//   p  <- p - lr * (1 - mu_t) / (1 - P_t) * g / d
//   p  <- p - lr * mu_{t+1} / (1 - P_t * mu_{t+1}) * m / d,   P_t = mu_1 * ... * mu_t
//
// torch keeps P_t as a per-param state (mu_product) updated once per step; here it is a
// function of t (nadam_mu_product), so the kernels need no per-tensor scalar state and a
// checkpoint needs none either. The two agree while beta1 and momentum_decay stay fixed; a
// run that changes them mid-way sees the product of the current values.
//
// Precision: fp32 in the functor; the two coefficients are computed once per step in double.
// Traffic per element: p, g, exp_avg, exp_avg_sq read; p, exp_avg, exp_avg_sq written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/ops/adam.hpp"

namespace fo {

/// ln(0.96): the base of NAdam's momentum schedule.
inline constexpr double kNAdamLn096 = -0.040821994520255166;

/// 0.96^(t * momentum_decay), the decaying part of NAdam's mu_t.
FO_HOST_DEVICE double nadam_decay_power(double momentum_decay, std::int64_t t) {
  return portable_exp(static_cast<double>(t) * momentum_decay * kNAdamLn096);
}

/// P_t = prod_{i=1..t} beta1 * (1 - q^i / 2), q = 0.96^momentum_decay, in O(1) time in t
/// (the step scalars of a step are computed once per block on the device when the step
/// count lives there). beta1^t times exp(S) with
///   S = sum_i ln(1 - q^i / 2) = -sum_{k>=1} (2^-k / k) * sum_{i=1..t} q^(ik)
///     = -sum_k (2^-k / k) * q^k (1 - q^(kt)) / (1 - q^k),
/// 60 terms (the k-th is below 2^-k / k of the first). 1 - q^k and 1 - q^(kt) are built by
/// the exact recurrence 1 - x^k = (1 - x^(k-1)) + x^(k-1) (1 - x) from expm1, so nothing
/// cancels even as momentum_decay -> 0 (where the inner sum tends to t). Relative error
/// about 1e-13, far below the float the functor keeps.
FO_HOST_DEVICE double nadam_mu_product(double beta1, double momentum_decay, std::int64_t t) {
  if (t <= 0) return 1.0;
  const double ln_q = momentum_decay * kNAdamLn096;
  const double one_minus_q = -portable_expm1(ln_q);
  const double one_minus_qt = -portable_expm1(static_cast<double>(t) * ln_q);
  const double q = 1.0 - one_minus_q, qt = 1.0 - one_minus_qt;
  double s = 0.0, half_k = 1.0;
  double qk = 1.0, one_minus_qk = 0.0;    // q^(k-1), 1 - q^(k-1)
  double qtk = 1.0, one_minus_qtk = 0.0;  // q^(t(k-1)), 1 - q^(t(k-1))
  for (int k = 1; k <= 60; ++k) {
    one_minus_qk += qk * one_minus_q;
    one_minus_qtk += qtk * one_minus_qt;
    qk *= q;
    qtk *= qt;
    half_k *= 0.5;
    // sum_{i=1..t} q^(ik); t itself where q^k rounds to 1 (momentum_decay 0 or tiny).
    const double inner =
        one_minus_qk > 0.0 ? qk * one_minus_qtk / one_minus_qk : static_cast<double>(t);
    s -= half_k / k * inner;
  }
  return power(beta1, t) * portable_exp(s);
}

struct NAdamOp {
  AdamCore core;
  float eps;
  float bc2;        // 1 - beta2^t
  float grad_coef;  // lr * (1 - mu_t) / (1 - P_t)
  float avg_coef;   // lr * mu_{t+1} / (1 - P_t * mu_{t+1})

  // s[0] exp_avg, s[1] exp_avg_sq
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    V m, v;
    core.moments(p, g, s, m, v);
    const V d = vsqrt(v / V(bc2)) + V(eps);
    p = vfma(V(-grad_coef), g / d, p);
    p = vfma(V(-avg_coef), m / d, p);
  }
};

struct NAdam {
  static constexpr const char* kName = "nadam";
  struct Options {
    double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
    double momentum_decay = 4e-3;
    bool decoupled_weight_decay = false, maximize = false;
  };
  using Op = NAdamOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      real_option("momentum_decay", &Options::momentum_decay),
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
    v.at_least("momentum_decay", o.momentum_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    const double mu = o.beta1 * (1.0 - 0.5 * nadam_decay_power(o.momentum_decay, step));
    const double mu_next = o.beta1 * (1.0 - 0.5 * nadam_decay_power(o.momentum_decay, step + 1));
    const double mu_product = nadam_mu_product(o.beta1, o.momentum_decay, step);
    NAdamOp op{};
    op.core = AdamCore::make(o.lr, o.beta1, o.beta2, o.weight_decay, o.decoupled_weight_decay,
                             o.maximize);
    op.eps = to_f32(o.eps);
    op.bc2 = to_f32(1.0 - power(o.beta2, step));
    op.grad_coef = to_f32(o.lr * (1.0 - mu) / (1.0 - mu_product));
    op.avg_coef = to_f32(o.lr * mu_next / (1.0 - mu_product * mu_next));
    return op;
  }
};

}  // namespace fo
