// Rprop (docs/optimizers.md `rprop`).
//
// As in torch.optim.Rprop, the step size is clamped to [step_size_min, step_size_max] on
// every step, also where sign(g*prev) == 0 (a literal reading of "clamp when it changes"
// differs only when lr lies outside the bounds).
// Precision: fp32 throughout.
// Traffic per element: p, g, prev, step_size read; p, prev, step_size written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct RpropOp {
  float eta_minus, eta_plus, step_size_min, step_size_max;
  bool maximize;

  // s[0] prev, s[1] step_size
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    const V zero(0.0f);
    const V sgn = vsign(g * s[0]);
    const V factor = vselect(sgn > zero, V(eta_plus), vselect(sgn < zero, V(eta_minus), V(1.0f)));
    const V step = vmin(vmax(s[1] * factor, V(step_size_min)), V(step_size_max));
    g = vselect(sgn < zero, zero, g);
    p = vfma(-vsign(g), step, p);
    s[0] = g;
    s[1] = step;
  }
};

struct Rprop {
  static constexpr const char* kName = "rprop";
  struct Options {
    double lr = 1e-2, eta_minus = 0.5, eta_plus = 1.2, step_size_min = 1e-6, step_size_max = 50.0;
    bool maximize = false;
  };
  using Op = RpropOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("eta_minus", &Options::eta_minus),
      real_option("eta_plus", &Options::eta_plus),
      real_option("step_size_min", &Options::step_size_min),
      real_option("step_size_max", &Options::step_size_max),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"prev", "step_size"};
  static constexpr bool kNonNegativeStates[] = {false, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options& o, int k) { return k == 1 ? o.lr : 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.in_open_unit_interval("eta_minus", o.eta_minus);
    v.greater_than("eta_plus", o.eta_plus, 1.0);
    v.at_least("step_size_min", o.step_size_min, 0.0);
    if (!(o.step_size_min <= o.step_size_max))
      v.fail("step_size_min must be <= step_size_max, got %g > %g", o.step_size_min,
             o.step_size_max);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    RpropOp op{};
    op.eta_minus = to_f32(o.eta_minus);
    op.eta_plus = to_f32(o.eta_plus);
    op.step_size_min = to_f32(o.step_size_min);
    op.step_size_max = to_f32(o.step_size_max);
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
