// LAMB (docs/optimizers.md `lamb`; NVIDIA Apex FusedLAMB): Adam's moments, an update with
// weight decay inside it, and a per-tensor trust ratio ||p|| / ||update|| scaling the step.
//
//   m <- beta1 * m + beta3 * g,  beta3 = 1 - beta1 (grad_averaging) or 1     (exp_avg)
//   v <- beta2 * v + (1 - beta2) * g * g                                     (exp_avg_sq)
//     (adam_w_mode = 0: g <- g + weight_decay * p first)
//   u = (m / bc1) / (sqrt(v / bc2) + eps)  (+ weight_decay * p with adam_w_mode)
//     bc_i = 1 - beta_i^t with bias_correction, else 1
//   ratio = ||p|| / ||u|| where weight_decay != 0 or use_nvlamb, and both norms are non-zero;
//           else 1                                               (norms over the whole tensor)
//   p <- p - lr * ratio * u
//
// Two passes (kernels/trust_ratio.hpp): the first updates m and v and sums the squares of p
// and u; the second recomputes u from p and the stored moments, bitwise as the first did, and
// applies it. Precision: fp32 per element, one division and one square root per update
// (Adam's form: the bias corrections as factors made in double, where Apex divides by each);
// the norms in double; lr * ratio one float.
// Traffic per element: pass one p, g, m, v read, m, v written; pass two p, m, v read, p
// written: 10 accesses, against Adam's 7.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/ops/adam.hpp"
#include "fusedopt/kernels/trust_ratio.hpp"

namespace fo {

struct LambOp {
  static constexpr bool kAdvanceStates = true;
  static constexpr bool kApplyReadsGrad = false;
  static constexpr bool kApplyWritesStates = false;

  float beta1, beta3, beta2, one_minus_beta2;
  float step_scale;    // 1 / bc1 (bias corrections: 1 without bias_correction)
  float inv_sqrt_bc2;  // 1 / sqrt(bc2)
  float eps;
  float weight_decay;  // in the update (adam_w_mode) or into g (L2)
  bool adam_w_mode;
  bool adaptive;  // weight_decay != 0 or use_nvlamb
  double lr;

  // s[0] exp_avg, s[1] exp_avg_sq
  template <class V>
  FO_HOST_DEVICE void advance(const V& p, V g, V* s) const {
    if (!adam_w_mode) g = vfma(V(weight_decay), p, g);
    s[0] = vfma(V(beta1), s[0], V(beta3) * g);
    s[1] = vfma(V(beta2), s[1], V(one_minus_beta2) * g * g);
  }
  template <class V>
  FO_HOST_DEVICE V direction(const V& p, V, const V* s) const {
    const V u = s[0] * V(step_scale) / vfma(vsqrt(s[1]), V(inv_sqrt_bc2), V(eps));
    return adam_w_mode ? vfma(V(weight_decay), p, u) : u;
  }
  FO_HOST_DEVICE bool needs_norms() const { return adaptive; }
  FO_HOST_DEVICE float rate(double param_norm, double update_norm) const {
    if (adaptive && param_norm != 0.0 && update_norm != 0.0)
      return to_f32(lr * (param_norm / update_norm));
    return to_f32(lr);
  }
  template <class V>
  FO_HOST_DEVICE void apply(V& p, V g, V* s, V rate) const {
    p = vfma(-rate, direction(p, g, s), p);
  }
};

struct Lamb {
  static constexpr const char* kName = "lamb";
  static constexpr bool kTrustRatio = true;
  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0.01;
    bool bias_correction = true, grad_averaging = true, adam_w_mode = true, use_nvlamb = false;
  };
  using Op = LambOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("eps", &Options::eps),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("bias_correction", &Options::bias_correction),
      flag_option("grad_averaging", &Options::grad_averaging),
      flag_option("adam_w_mode", &Options::adam_w_mode),
      flag_option("use_nvlamb", &Options::use_nvlamb),
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
    LambOp op{};
    op.beta1 = to_f32(o.beta1);
    op.beta3 = o.grad_averaging ? to_f32(1.0 - o.beta1) : 1.0f;
    op.beta2 = to_f32(o.beta2);
    op.one_minus_beta2 = to_f32(1.0 - o.beta2);
    const double bc1 = o.bias_correction ? 1.0 - power(o.beta1, step) : 1.0;
    const double bc2 = o.bias_correction ? 1.0 - power(o.beta2, step) : 1.0;
    op.step_scale = to_f32(1.0 / bc1);
    op.inv_sqrt_bc2 = to_f32(1.0 / sqrt(bc2));
    op.eps = to_f32(o.eps);
    op.weight_decay = to_f32(o.weight_decay);
    op.adam_w_mode = o.adam_w_mode;
    op.adaptive = o.weight_decay != 0.0 || o.use_nvlamb;
    op.lr = o.lr;
    return op;
  }
};

}  // namespace fo
