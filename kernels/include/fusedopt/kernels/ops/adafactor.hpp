// Adafactor (docs/optimizers.md `adafactor`; torch.optim.Adafactor): factored second moments
// (kernels/factored.hpp), a relative step size and update clipping, no first moment.
//
//   t = step; w = t^beta2_decay (the weight of the new statistic; 1 at t = 1)
//   rho = min(lr, 1 / sqrt(t));  alpha = max(eps2, RMS(p)) * rho      (p before this step)
//   param of >= 2 dims, viewed as [batch, rows, cols]:
//     row_var <- lerp(row_var, mean over the row of g^2, w)           [batch * rows]
//     col_var <- lerp(col_var, mean over the column of g^2, w)        [batch * cols]
//     v = row_var_i * col_var_j / max(mean over i of row_var, eps1)   (per matrix)
//   param of < 2 dims:
//     variance <- lerp(variance, g^2, w);  v = variance
//   u = g / sqrt(max(v, eps1^2))   (-g with maximize)
//   p <- p * (1 - lr * weight_decay) - alpha / max(1, RMS(u) / d) * u
//
// eps1 = None in torch is the param dtype's machine epsilon: here eps1's default is float32's
// (2^-23); a bf16 param that should match torch's None takes eps1 = 2^-7.
// Precision: fp32 per element (torch's lerp, one product and one division for v, one square
// root and one division for u, one fused multiply-add for p); the means, RMS values and the
// rate in double, rounded once to float. Traffic per element: g read three times (statistics,
// sums, apply), p twice, p written once; the row and column statistics are small.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/ema.hpp"
#include "fusedopt/kernels/factored.hpp"

namespace fo {

struct AdafactorOp {
  float weight;   // w = t^beta2_decay
  float eps1;     // clamps the row mean
  float eps1_sq;  // clamps the second moment
  float decay;    // 1 - lr * weight_decay
  bool maximize;
  double rho;  // min(lr, 1 / sqrt(t))
  double eps2, d;

  template <class V>
  FO_HOST_DEVICE V blend(V state, V mean_square) const {
    return ema_lerp(state, mean_square, weight);
  }
  FO_HOST_DEVICE float normalizer(double row_mean) const {
    const float m = static_cast<float>(row_mean);
    return m > eps1 ? m : eps1;  // torch's clamp(min=eps1)
  }
  template <class V>
  FO_HOST_DEVICE V estimate(V row, V col, V norm) const {
    return row * col / norm;
  }
  template <class V>
  FO_HOST_DEVICE V direction(V g, V second_moment) const {
    const V u = g / vsqrt(vmax(second_moment, V(eps1_sq)));
    return maximize ? -u : u;
  }
  FO_HOST_DEVICE float rate(double param_sum_sq, double direction_sum_sq,
                            std::int64_t numel) const {
    const double n = numel > 0 ? static_cast<double>(numel) : 1.0;
    const double rms_p = sqrt(param_sum_sq / n), rms_u = sqrt(direction_sum_sq / n);
    const double alpha = (rms_p > eps2 ? rms_p : eps2) * rho;
    const double clip = rms_u / d > 1.0 ? rms_u / d : 1.0;
    return to_f32(alpha / clip);
  }
  template <class V>
  FO_HOST_DEVICE V apply(V p, V u, V rate) const {
    return vfma(-rate, u, p * V(decay));
  }
};

struct Adafactor {
  static constexpr const char* kName = "adafactor";
  static constexpr bool kFactored = true;
  struct Options {
    double lr = 1e-2, beta2_decay = -0.8, eps1 = 1.1920928955078125e-07, eps2 = 1e-3, d = 1.0,
           weight_decay = 0.0;
    bool maximize = false;
  };
  using Op = AdafactorOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("beta2_decay", &Options::beta2_decay),
      real_option("eps1", &Options::eps1),
      real_option("eps2", &Options::eps2),
      real_option("d", &Options::d),
      real_option("weight_decay", &Options::weight_decay),
      flag_option("maximize", &Options::maximize),
  };
  static constexpr const char* kStates[] = {"row_var", "col_var", "variance"};
  static bool has_state(const Options&, int) { return true; }
  static double state_init(const Options&, int) { return 0.0; }
  static StateShape state_shape(const Options&, int k) {
    return k == 0 ? StateShape::factor_rows
                  : (k == 1 ? StateShape::factor_cols : StateShape::unfactored);
  }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    if (!(o.beta2_decay <= 0.0)) v.fail("beta2_decay must be <= 0, got %g", o.beta2_decay);
    v.at_least("eps1", o.eps1, 0.0);
    v.at_least("eps2", o.eps2, 0.0);
    v.at_least("d", o.d, 1.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t step) {
    AdafactorOp op{};
    const double t = static_cast<double>(step);
    // t^beta2_decay = e^(beta2_decay ln t), in the portable functions so the device has the
    // host's bits.
    op.weight = to_f32(portable_exp(o.beta2_decay * portable_log(t)));
    op.eps1 = to_f32(o.eps1);
    op.eps1_sq = to_f32(o.eps1 * o.eps1);
    op.decay = to_f32(1.0 - o.lr * o.weight_decay);
    op.maximize = o.maximize;
    const double inv_sqrt_t = 1.0 / sqrt(t);
    op.rho = o.lr < inv_sqrt_t ? o.lr : inv_sqrt_t;
    op.eps2 = o.eps2;
    op.d = o.d;
    return op;
  }
};

}  // namespace fo
