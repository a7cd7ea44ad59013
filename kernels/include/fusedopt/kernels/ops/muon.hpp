// Muon (docs/optimizers.md `muon`; torch.optim.Muon, torch 2.15): momentum, orthogonalized by
// the Newton-Schulz iteration (kernels/newton_schulz.hpp), applied with a learning rate
// adjusted to the matrix's shape. A step of the matrix kind (kernels/matrix_step.hpp).
//
//   buf <- lerp(buf, g, 1 - momentum)                 (momentum_buffer)
//   X = lerp(g, buf, momentum) if nesterov else buf   (the iteration's input)
//   O = NS(X)                                         (each matrix of the batch)
//   p <- p * (1 - lr * weight_decay) - adjusted_lr * O
//   adjusted_lr = lr * sqrt(max(1, rows / cols))      adjust_lr_fn 0, "original"
//               = lr * 0.2 * sqrt(max(rows, cols))    adjust_lr_fn 1, "match_rms_adamw"
//               = lr * sqrt(rows / cols)              adjust_lr_fn 2, "spectral_unclamped"
//
// Precision: fp32 per element, torch's order of operations: its two lerps (kernels/ema.hpp's
// ema_lerp, each weight rounded once to float), p * float(1 - lr*wd), then one fused
// multiply-add with -float(adjusted_lr); the adjusted lr in double. Traffic per element:
// pass 1 reads g and buf, writes buf and X; pass 2 reads p and O, writes p.
#pragma once

#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/ema.hpp"
#include "fusedopt/kernels/matrix_step.hpp"

namespace fo {

struct MuonOp {
  float buf_weight;       // 1 - momentum: the buffer's lerp toward g
  float nesterov_weight;  // momentum: g's lerp toward the buffer
  float decay;            // 1 - lr * weight_decay
  bool nesterov;
  int adjust_lr_fn;  // 0 original, 1 match_rms_adamw, 2 spectral_unclamped
  double lr;

  // s[0] momentum_buffer
  template <class V>
  FO_HOST_DEVICE V prepare(V g, V* s) const {
    s[0] = ema_lerp(s[0], g, buf_weight);                         // buf: momentum buffer
    return nesterov ? ema_lerp(g, s[0], nesterov_weight) : s[0];  // X: the iteration's input
  }
  // adjusted lr for a rows x cols matrix, in double, rounded once
  FO_HOST_DEVICE float rate(std::int64_t rows, std::int64_t cols) const {
    const double r = static_cast<double>(rows), c = static_cast<double>(cols);
    double ratio = 1.0;
    if (adjust_lr_fn == 1)
      ratio = 0.2 * sqrt(r > c ? r : c);
    else if (adjust_lr_fn == 2)
      ratio = sqrt(r / c);
    else
      ratio = sqrt(r / c > 1.0 ? r / c : 1.0);
    return to_f32(lr * ratio);
  }
  template <class V>
  FO_HOST_DEVICE V apply(V p, V o, V rate) const {
    return vfma(-rate, o, p * V(decay));  // p: decayed, then the orthogonalized step
  }
};

struct Muon {
  static constexpr const char* kName = "muon";
  static constexpr bool kMatrix = true;
  struct Options {
    double lr = 1e-3, weight_decay = 0.1, momentum = 0.95;
    bool nesterov = true;
    double ns_a = kNsDefaultCoefficients.a, ns_b = kNsDefaultCoefficients.b,
           ns_c = kNsDefaultCoefficients.c, eps = kNsDefaultEps, ns_steps = kNsDefaultSteps,
           adjust_lr_fn = 0;
    bool ns_bf16 = false;
  };
  using Op = MuonOp;
  static constexpr OptionField<Options> kOptions[] = {
      real_option("lr", &Options::lr),
      real_option("weight_decay", &Options::weight_decay),
      real_option("momentum", &Options::momentum),
      flag_option("nesterov", &Options::nesterov),
      real_option("ns_a", &Options::ns_a),
      real_option("ns_b", &Options::ns_b),
      real_option("ns_c", &Options::ns_c),
      real_option("eps", &Options::eps),
      real_option("ns_steps", &Options::ns_steps),
      real_option("adjust_lr_fn", &Options::adjust_lr_fn),
      flag_option("ns_bf16", &Options::ns_bf16),
  };
  static constexpr const char* kStates[] = {"momentum_buffer"};
  static bool has_state(const Options&, int) { return true; }  // torch keeps it at momentum 0
  static double state_init(const Options&, int) { return 0.0; }
  static void validate(const Options& o, Validator& v) {
    v.at_least("lr", o.lr, 0.0);
    v.at_least("momentum", o.momentum, 0.0);
    v.at_least("weight_decay", o.weight_decay, 0.0);
    v.at_least("eps", o.eps, 0.0);
    if (!(o.ns_steps >= 0.0 && o.ns_steps <= kNsMaxSteps && o.ns_steps == floor(o.ns_steps)))
      v.fail("ns_steps must be a whole number in [0, %d] (torch: less than 100), got %g",
             kNsMaxSteps, o.ns_steps);
    if (!(o.adjust_lr_fn == 0.0 || o.adjust_lr_fn == 1.0 || o.adjust_lr_fn == 2.0))
      v.fail(
          "adjust_lr_fn must be 0 (original), 1 (match_rms_adamw) or 2 (spectral_unclamped), "
          "got %g",
          o.adjust_lr_fn);
  }
  /// Why the CPU backend refuses these options, or "".
  static const char* cpu_refusal(const Options& o) {
    return o.ns_bf16 ? "ns_bf16 = 1 (a bfloat16 Newton-Schulz iteration) runs on CUDA only; the "
                       "CPU iterates in float32 (ns_bf16 = 0)"
                     : "";
  }
  static NsConfig ns_config(const Options& o) {
    return {{o.ns_a, o.ns_b, o.ns_c}, static_cast<int>(o.ns_steps), o.eps, o.ns_bf16};
  }
  FO_HOST_DEVICE static Op make_op(const Options& o, std::int64_t) {
    MuonOp op{};
    op.buf_weight = to_f32(1.0 - o.momentum);
    op.nesterov_weight = to_f32(o.momentum);
    op.decay = to_f32(1.0 - o.lr * o.weight_decay);
    op.nesterov = o.nesterov;
    op.adjust_lr_fn = static_cast<int>(o.adjust_lr_fn);
    op.lr = o.lr;
    return op;
  }
};

}  // namespace fo
