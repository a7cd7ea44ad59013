// The optimizer-wide step settings (optimizer.hpp, set_option): loss scale, clipping, the
// non-finite skip, storage, stochastic rounding, the weight EMA.
#include <algorithm>
#include <cmath>
#include <string>

#include "optimizer_impl.hpp"
#include "typed_options.hpp"

namespace fo::detail {

DType parse_state_dtype(double v, const std::string& who) {
  if (v == 0.0) return DType::f32;
  if (v == 2.0) return DType::bf16;
  if (v == 5.0) return DType::q8;
  if (v == 6.0) return DType::q4;
  invalid(who +
          " takes 0 (float32), 2 (bfloat16), 5 (8-bit block-quantized) or 6 (4-bit "
          "block-quantized), got " +
          format_number(v));
}

const std::vector<std::string>& Settings::keys() {
  static const std::vector<std::string> k = {
      "grad_scale", "max_grad_norm",       "skip_nonfinite", "master_weights", "state_dtype",
      "fp32_grads", "stochastic_rounding", "seed",           "ema_decay",      "min_quant_size"};
  return k;
}

bool Settings::is_key(std::string_view key) {
  return std::find(keys().begin(), keys().end(), key) != keys().end();
}

bool Settings::is_storage_key(std::string_view key) {
  return key == "master_weights" || key == "state_dtype" || key == "fp32_grads" ||
         key == "min_quant_size";
}

double Settings::get(std::string_view key) const {
  if (key == "grad_scale") return grad_scale;
  if (key == "max_grad_norm") return max_grad_norm;
  if (key == "skip_nonfinite") return skip_nonfinite;
  if (key == "master_weights") return master_weights;
  if (key == "state_dtype") return static_cast<double>(static_cast<int>(state_dtype));
  if (key == "fp32_grads") return fp32_grads;
  if (key == "stochastic_rounding") return stochastic_rounding;
  if (key == "ema_decay") return ema_decay;
  if (key == "min_quant_size") return static_cast<double>(min_quant_size);
  return seed;
}

void Settings::set(std::string_view key, double v) {
  const std::string k(key);
  if (!std::isfinite(v)) invalid("option " + k + " must be finite, got " + format_number(v));
  auto flag = [&] {
    if (v != 0.0 && v != 1.0) invalid("option " + k + " is a flag and takes 0 or 1");
    return v != 0.0;
  };
  if (key == "grad_scale") {
    const auto inverse = static_cast<float>(1.0 / v);  // what multiplies the gradients
    if (!(v > 0.0) || !std::isfinite(inverse) || inverse == 0.0f)
      invalid("grad_scale must be > 0 with 1/grad_scale a finite, non-zero float, got " +
              format_number(v));
    grad_scale = v;
  } else if (key == "max_grad_norm") {
    if (!(v >= 0.0)) invalid("max_grad_norm must be >= 0, got " + format_number(v));
    max_grad_norm = v;
  } else if (key == "skip_nonfinite") {
    skip_nonfinite = flag();
  } else if (key == "master_weights") {
    master_weights = flag();
  } else if (key == "state_dtype") {
    state_dtype = parse_state_dtype(v, "state_dtype");
  } else if (key == "fp32_grads") {
    fp32_grads = flag();
  } else if (key == "stochastic_rounding") {
    stochastic_rounding = flag();
  } else if (key == "ema_decay") {
    if (!(v >= 0.0 && v < 1.0))
      invalid("ema_decay must be in [0, 1) (0: no weight EMA), got " + format_number(v));
    ema_decay = v;
  } else if (key == "min_quant_size") {
    if (!(v >= 0.0 && v <= 9007199254740992.0 && v == std::floor(v)))
      invalid("min_quant_size must be an integer >= 0, got " + format_number(v));
    min_quant_size = static_cast<std::int64_t>(v);
  } else if (key == "seed") {
    if (!(v >= 0.0 && v <= 9007199254740992.0 && v == std::floor(v)))
      invalid("seed must be an integer in [0, 2^53] (exact as a double)");
    seed = v;
  }
}

}  // namespace fo::detail
