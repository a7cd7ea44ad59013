// LARS (docs/optimizers.md `lars`; Optax's lars, after You et al. 2017): SGD with momentum
// whose step is scaled per tensor by a trust ratio of the param's norm to the update's.
//
//   u = g + weight_decay * p                     (g alone where adapt = 0)
//   ratio = trust_coefficient * ||p|| / (||u|| + eps), 1 where either norm is 0 or adapt = 0
//                                                (norms over the whole tensor)
//   v <- momentum * v + lr * ratio * u           (momentum_buffer; none when momentum = 0)
//   p <- p - v,  or with nesterov  p <- p - (lr * ratio * u + momentum * v)
//
// The buffer holds the lr-scaled velocity, as Optax's trace does (so a change of lr applies to
// new gradients only). adapt is the per-param switch that exempts a tensor (biases, norm
// weights) from both the trust ratio and the decay.
//
// Two passes (kernels/trust_ratio.hpp): the first reads p and g for the norms of p and u, the
// second applies the step; the first is skipped where adapt = 0. Precision: fp32 per element;
// the norms in double; lr * ratio one float. Traffic per element: p, g read; then p, g, v
// read, p, v written: 7 accesses, against SGD with momentum's 5.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/trust_ratio.hpp"

namespace fo {

struct LarsOp {
  static constexpr bool kAdvanceStates = false;
  static constexpr bool kApplyReadsGrad = true;
  static constexpr bool kApplyWritesStates = true;

  float weight_decay;  // 0 where adapt = 0
  float momentum;
  bool nesterov, adapt;
  double lr, trust_coefficient, eps;

  template <class V>
  FO_HOST_DEVICE void advance(const V&, V, V*) const {}
  template <class V>
  FO_HOST_DEVICE V direction(const V& p, V g, const V*) const {
    return weight_decay != 0.0f ? vfma(V(weight_decay), p, g) : g;
  }
  FO_HOST_DEVICE bool needs_norms() const { return adapt; }
  FO_HOST_DEVICE float rate(double param_norm, double update_norm) const {
    if (adapt && param_norm != 0.0 && update_norm != 0.0)
      return to_f32(lr * (trust_coefficient * param_norm / (update_norm + eps)));
    return to_f32(lr);
  }
  // s[0] momentum_buffer (momentum != 0 only)
  template <class V>
  FO_HOST_DEVICE void apply(V& p, V g, V* s, V rate) const {
    const V step = rate * direction(p, g, s);
    if (momentum == 0.0f) {
      p = p - step;
      return;
    }
    const V v = vfma(V(momentum), s[0], step);
    s[0] = v;
    p = p - (nesterov ? vfma(V(momentum), v, step) : v);
  }
};

struct Lars {
  static constexpr const char* kName = "lars";
  static constexpr bool kTrustRatio = true;
  struct Options {
    double lr = 1.0, momentum = 0.9, weight_decay = 0.0, trust_coefficient = 1e-3, eps = 0.0;
    bool nesterov = false, adapt = true;
  };
  using Op = LarsOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("momentum", &Options::momentum),
      real_option("weight_decay", &Options::weight_decay),
      real_option("trust_coefficient", &Options::trust_coefficient),
      real_option("eps", &Options::eps),
      flag_option("nesterov", &Options::nesterov),
      flag_option("adapt", &Options::adapt),
  };
  static constexpr const char* kStates[] = {"momentum_buffer"};
  static bool has_state(const Options& o, int) { return o.momentum != 0.0; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.in_unit_interval("momentum", o.momentum);
    v.at_least("weight_decay", o.weight_decay, 0.0);
    v.greater_than("trust_coefficient", o.trust_coefficient, 0.0);
    v.at_least("eps", o.eps, 0.0);
    if (o.nesterov && o.momentum == 0.0) v.fail("nesterov needs momentum > 0");
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    LarsOp op{};
    op.weight_decay = o.adapt ? to_f32(o.weight_decay) : 0.0f;
    op.momentum = to_f32(o.momentum);
    op.nesterov = o.nesterov;
    op.adapt = o.adapt;
    op.lr = o.lr;
    op.trust_coefficient = o.trust_coefficient;
    op.eps = o.eps;
    return op;
  }
};

}  // namespace fo
