#include "reference/muon_reference.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "reference/newton_schulz.hpp"

namespace fo::ref {
namespace {

double get(const OptionMap& o, const char* key, double fallback) {
  const auto it = o.find(key);
  return it == o.end() ? fallback : it->second;
}

}  // namespace

double muon_adjusted_lr(double lr, int fn, std::int64_t rows, std::int64_t cols) {
  const double a = static_cast<double>(rows), b = static_cast<double>(cols);
  double ratio = 1.0;
  if (fn == 0) ratio = std::sqrt(std::max(1.0, a / b));
  if (fn == 1) ratio = 0.2 * std::sqrt(std::max(a, b));
  if (fn == 2) ratio = std::sqrt(a / b);
  return lr * ratio;
}

void muon_step(const OptionMap& o, std::vector<double>& param, const std::vector<double>& grad,
               std::vector<double>& buf, std::int64_t batch, std::int64_t rows, std::int64_t cols) {
  for (const auto& [key, value] : o) {
    static const char* const known[] = {"lr",       "weight_decay", "momentum", "nesterov",
                                        "ns_a",     "ns_b",         "ns_c",     "eps",
                                        "ns_steps", "adjust_lr_fn", "ns_bf16"};
    if (std::none_of(std::begin(known), std::end(known), [&](const char* k) { return key == k; }))
      throw std::invalid_argument("fo::ref::muon_step: unknown option " + key);
    (void)value;
  }
  const std::size_t n = static_cast<std::size_t>(batch * rows * cols);
  if (param.size() != n || grad.size() != n || buf.size() != n)
    throw std::invalid_argument("fo::ref::muon_step: sizes differ from batch * rows * cols");
  const double lr = get(o, "lr", 1e-3), wd = get(o, "weight_decay", 0.1);
  const double mu = get(o, "momentum", 0.95);
  const bool nesterov = get(o, "nesterov", 1.0) != 0.0;
  // buf.lerp_(grad, 1 - momentum); update = grad.lerp(buf, momentum) if nesterov else buf
  std::vector<double> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    buf[i] = buf[i] + (1.0 - mu) * (grad[i] - buf[i]);
    x[i] = nesterov ? grad[i] + mu * (buf[i] - grad[i]) : buf[i];
  }
  const double adjusted =
      muon_adjusted_lr(lr, static_cast<int>(get(o, "adjust_lr_fn", 0.0)), rows, cols);
  const std::size_t per = static_cast<std::size_t>(rows * cols);
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::vector<double> g(x.begin() + static_cast<std::ptrdiff_t>(b * per),
                                x.begin() + static_cast<std::ptrdiff_t>((b + 1) * per));
    const std::vector<double> out = newton_schulz(
        g, rows, cols, get(o, "ns_a", 3.4445), get(o, "ns_b", -4.7750), get(o, "ns_c", 2.0315),
        static_cast<int>(get(o, "ns_steps", 5.0)), get(o, "eps", 1e-7));
    for (std::size_t i = 0; i < per; ++i) {
      double& p = param[b * per + i];
      p = p * (1.0 - lr * wd);    // param.mul_(1 - lr * weight_decay)
      p = p - adjusted * out[i];  // param.add_(update, alpha=-adjusted_lr)
    }
  }
}

}  // namespace fo::ref
