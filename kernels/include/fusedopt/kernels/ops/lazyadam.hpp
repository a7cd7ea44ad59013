// LazyAdam (docs/optimizers.md `lazyadam`): Adam for embedding tables, stepped on the rows a sparse
// gradient touches and nowhere else. As in PyTorch's SparseAdam and TF's LazyAdam, eps is
// added to the uncorrected sqrt(v) and the bias corrections fold into the step size. No
// weight decay. Its dense step is the sparse step with every row present once.
//
// Precision: fp32; lr * sqrt(bc2) / bc1 is computed in double once per step.
// Traffic per touched element: p, m, v read and written; the summed grad read.
#pragma once

#include "fusedopt/kernels/ops/adam.hpp"  // validate_adam_core

namespace fo {

struct LazyAdamOp {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float step_size;  // lr * sqrt(bc2) / bc1
  bool maximize;

  // s[0] exp_avg, s[1] exp_avg_sq
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    const V m = vfma(V(beta1), s[0], V(one_minus_beta1) * g);
    const V v = vfma(V(beta2), s[1], V(one_minus_beta2) * g * g);
    s[0] = m;
    s[1] = v;
    p = vfma(V(-step_size), m / (vsqrt(v) + V(eps)), p);
  }
};

struct LazyAdam {
  static constexpr const char* kName = "lazyadam";
  static constexpr bool kSparse = true;
  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    bool maximize = false;
  };
  using Op = LazyAdamOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta1", &Options::beta1),
      real_option("beta2", &Options::beta2),
      real_option("eps", &Options::eps),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  static constexpr bool kNonNegativeStates[] = {false, true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    validate_adam_core(o.lr, o.eps, o.beta1, o.beta2, v);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    const double bc1 = 1.0 - power(o.beta1, step);
    const double bc2 = 1.0 - power(o.beta2, step);
    LazyAdamOp op{};
    op.beta1 = to_f32(o.beta1);
    op.one_minus_beta1 = to_f32(1.0 - o.beta1);
    op.beta2 = to_f32(o.beta2);
    op.one_minus_beta2 = to_f32(1.0 - o.beta2);
    op.eps = to_f32(o.eps);
    op.step_size = to_f32(o.lr * sqrt(bc2) / bc1);
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
