// AdaGrad (docs/optimizers.md `adagrad`), and its row-wise form for embedding tables.
//
// Precision: fp32; the decayed rate lr / (1 + (t-1)*lr_decay) is computed in double per step.
// Traffic per element: p, g, sum read; p, sum written.
//
// Row-wise (`rowwise` = 1, FBGEMM's row-wise AdaGrad; sparse steps only): one accumulator per
// row instead of per element, so the state is [rows] instead of [rows x dim]. For a touched
// row with summed gradient g (dim values):
//   sum += mean(g*g)                       (mean in the fixed order of kernels/rowwise.hpp)
//   p   -= clr / (sqrt(sum) + eps) * g
// Traffic per touched row: dim floats of p read and written, the gradient read (on CUDA twice,
// the second time mostly from cache), one float of state read and written.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"

namespace fo {

struct AdagradOp {
  float clr, eps, weight_decay;
  bool maximize;

  // s[0] sum
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0f) g = vfma(V(weight_decay), p, g);
    V sum = vfma(g, g, s[0]);
    s[0] = sum;
    p = vfma(V(-clr), g / (vsqrt(sum) + V(eps)), p);
  }
};

// Row-wise: row() once per touched row with its states and the row's mean square gradient,
// then the call operator over the row's elements with the rate row() returned.
struct AdagradRowOp {
  float clr, eps;
  bool maximize;

  // s[0] sum (one per row)
  FO_HOST_DEVICE float row(float* s, float mean_square) const {
    s[0] = s[0] + mean_square;
    return clr / (vsqrt(s[0]) + eps);
  }
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, float rate) const {
    if (maximize) g = -g;
    p = vfma(V(-rate), g, p);
  }
};

struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr bool kSparse = true;  // per touched element, as torch.optim.Adagrad
  struct Options {
    double lr = 1e-2, lr_decay = 0.0, weight_decay = 0.0, initial_accumulator_value = 0.0,
           eps = 1e-10;
    bool maximize = false;
    bool rowwise = false;  // one accumulator per row (sparse steps of [rows x dim] tables)
  };
  using Op = AdagradOp;
  using RowOp = AdagradRowOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("lr_decay", &Options::lr_decay),
      real_option("weight_decay", &Options::weight_decay),
      real_option("initial_accumulator_value", &Options::initial_accumulator_value),
      real_option("eps", &Options::eps),
      flag_option("maximize", &Options::maximize),
      flag_option("rowwise", &Options::rowwise),
  };
  static constexpr const char* kStates[] = {"sum"};
  static constexpr bool kNonNegativeStates[] = {true};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options& o, int) { return o.initial_accumulator_value; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.at_least("lr_decay", o.lr_decay, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
    v.at_least("initial_accumulator_value", o.initial_accumulator_value, 0.0);
    v.at_least("eps", o.eps, 0.0);
  }
  /// Options a sparse step refuses, as torch.optim.Adagrad does: "" when none.
  static const char* sparse_refusal(const Options& o) {
    return o.weight_decay != 0.0
               ? "adagrad's weight_decay does not apply to sparse gradients (as in PyTorch)"
               : "";
  }
  /// Row-wise: every state holds one value per row, and sparse steps use RowOp.
  static bool rowwise(const Options& o) { return o.rowwise; }
  FO_HOST_DEVICE static RowOp make_row_op(const Options& o, std::int64_t step) {
    const Op op = make_op(o, step);
    return RowOp{op.clr, op.eps, op.maximize};
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    AdagradOp op{};
    op.clr = to_f32(o.lr / (1.0 + static_cast<double>(step - 1) * o.lr_decay));
    op.eps = to_f32(o.eps);
    op.weight_decay = to_f32(o.weight_decay);
    op.maximize = o.maximize;
    return op;
  }
};

}  // namespace fo
