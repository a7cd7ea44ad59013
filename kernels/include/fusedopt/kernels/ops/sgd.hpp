// SGD with momentum, dampening and Nesterov (docs/optimizers.md `sgd`).
//
// Precision: fp32 throughout; lr and momentum constants are rounded once from double.
// Traffic per element: p, g read, p written; + momentum_buffer read and written if momentum != 0.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct SgdOp {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, nesterov, maximize;
  bool first;  // step 1: the buffer starts as g, undampened

  // s[0] momentum_buffer (only when momentum != 0)
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);
    if (has_momentum) {
      V b = first ? g : vfma(V(momentum), s[0], V(one_minus_dampening) * g);
      s[0] = b;
      g = nesterov ? vfma(V(momentum), b, g) : b;
    }
    p = vfma(V(-lr), g, p);
  }
};

struct Sgd {
  static constexpr const char* kName = "sgd";
  struct Options {
    double lr = 1e-3, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
    bool nesterov = false, maximize = false;
  };
  using Op = SgdOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("momentum", &Options::momentum),
      real_option("dampening", &Options::dampening),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("nesterov", &Options::nesterov),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"momentum_buffer"};
  static bool has_state(const Options& o, int) { return o.momentum != 0.0; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.at_least("momentum", o.momentum, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
    if (o.nesterov && !(o.momentum > 0.0 && o.dampening == 0.0))
      v.fail("nesterov requires momentum > 0 and dampening == 0");
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    SgdOp op{};
    op.lr = to_f32(o.lr);
    op.momentum = to_f32(o.momentum);
    op.one_minus_dampening = to_f32(1.0 - o.dampening);
    op.weight_decay = to_f32(o.weight_decay);
    op.has_momentum = o.momentum != 0.0;
    op.nesterov = o.nesterov;
    op.maximize = o.maximize;
    op.first = step == 1;
    return op;
  }
};

}  // namespace fo
