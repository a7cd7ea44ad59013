// Plain double-precision reference for one optimizer step; see reference.hpp and
// docs/optimizers.md.
#include "reference/reference.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <utility>

namespace fo::ref {
namespace {

double sign(double x) { return x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0); }

// Options with a missing key filled from the defaults; unknown keys are rejected.
OptionMap resolve(const std::string& algorithm, const OptionMap& options) {
  OptionMap o = defaults(algorithm);
  for (const auto& [key, value] : options) {
    auto it = o.find(key);
    if (it == o.end())
      throw std::invalid_argument("fo::ref: algorithm '" + algorithm + "' has no option '" + key +
                                  "'");
    it->second = value;
  }
  return o;
}

std::vector<double>& buffer(StateMap& states, const std::string& name, std::size_t n) {
  auto it = states.find(name);
  if (it == states.end())
    throw std::invalid_argument("fo::ref: missing state buffer '" + name + "'");
  if (it->second.size() != n)
    throw std::invalid_argument("fo::ref: state '" + name + "' has the wrong size");
  return it->second;
}

}  // namespace

namespace {
/// Option sets per algorithm: together they give every option a non-default value, each flag
/// is combined with decay and maximize, and the last switches on every state
/// (DenseReferenceCoverage.EveryOptionIsExercised checks both).
const std::map<std::string, std::vector<OptionMap>>& all_variants() {
  static const std::map<std::string, std::vector<OptionMap>> v = {
      {"sgd",
       {{},
        {{"lr", 0.1}, {"momentum", 0.9}},
        {{"lr", 0.1}, {"momentum", 0.9}, {"dampening", 0.3}},
        {{"lr", 0.1}, {"momentum", 0.9}, {"nesterov", 1}, {"weight_decay", 0.1}},
        {{"lr", 0.05}, {"weight_decay", 0.1}, {"maximize", 1}},
        {{"lr", 0.05}, {"momentum", 0.5}, {"nesterov", 1}, {"maximize", 1}}}},
      {"adagrad",
       {{},
        {{"lr_decay", 0.05}, {"weight_decay", 0.1}},
        {{"initial_accumulator_value", 0.5}, {"eps", 1e-3}, {"maximize", 1}, {"lr", 0.1}}}},
      {"adadelta",
       {{}, {{"rho", 0.5}, {"eps", 1e-3}, {"weight_decay", 0.1}, {"maximize", 1}, {"lr", 0.5}}}},
      {"rmsprop",
       {{},
        {{"centered", 1}},
        {{"momentum", 0.9}},
        {{"centered", 1},
         {"momentum", 0.9},
         {"weight_decay", 0.1},
         {"maximize", 1},
         {"alpha", 0.9},
         {"eps", 1e-3},
         {"lr", 0.001}}}},
      {"adam",
       {{},
        {{"amsgrad", 1}},
        {{"weight_decay", 0.1},
         {"maximize", 1},
         {"beta1", 0.8},
         {"beta2", 0.99},
         {"eps", 1e-3},
         {"lr", 1e-2}},
        {{"amsgrad", 1}, {"weight_decay", 0.1}, {"beta2", 0.9}}}},
      {"adamw",
       {{},
        {{"weight_decay", 0.5}, {"lr", 1e-2}, {"beta1", 0.5}, {"beta2", 0.9}, {"eps", 1e-3}},
        {{"amsgrad", 1}, {"maximize", 1}}}},
      {"rprop",
       {{},
        {{"maximize", 1},
         {"eta_minus", 0.3},
         {"eta_plus", 1.5},
         {"step_size_min", 1e-3},
         {"step_size_max", 0.05},
         {"lr", 0.1}},
        {{"lr", 1e-8}}}},  // below step_size_min: the clamp applies from the first step
      {"lazyadam",
       {{}, {{"maximize", 1}, {"beta1", 0.5}, {"beta2", 0.9}, {"eps", 1e-3}, {"lr", 1e-2}}}},
      {"lion",
       {{},
        {{"weight_decay", 0.5}, {"maximize", 1}, {"beta1", 0.5}, {"beta2", 0.9}, {"lr", 1e-2}}}},
      {"adamax",
       {{},
        {{"weight_decay", 0.1},
         {"maximize", 1},
         {"beta1", 0.5},
         {"beta2", 0.9},
         {"eps", 1e-3},
         {"lr", 1e-2}}}},
      {"signsgd", {{}, {{"weight_decay", 0.1}, {"maximize", 1}, {"lr", 1e-2}}}},
      {"nadam",
       {{},
        {{"weight_decay", 0.1}, {"maximize", 1}, {"momentum_decay", 0.02}, {"lr", 1e-2}},
        {{"weight_decay", 0.5},
         {"decoupled_weight_decay", 1},
         {"beta1", 0.5},
         {"beta2", 0.9},
         {"eps", 1e-3},
         {"momentum_decay", 0}}}},
      {"radam",
       {{},  // beta2 0.999: rho_t > 5 from step 7, so a 25-step run takes both branches
        {{"weight_decay", 0.1}, {"maximize", 1}, {"beta2", 0.9}, {"lr", 1e-2}},
        {{"weight_decay", 0.5},
         {"decoupled_weight_decay", 1},
         {"beta1", 0.5},
         {"beta2", 0.99},
         {"eps", 1e-3}}}},
      {"lamb",
       {{},
        {{"weight_decay", 0}},  // no trust ratio (Apex: only with decay or use_nvlamb)
        {{"weight_decay", 0}, {"use_nvlamb", 1}, {"grad_averaging", 0}, {"lr", 1e-2}},
        {{"adam_w_mode", 0},
         {"bias_correction", 0},
         {"weight_decay", 0.1},
         {"beta1", 0.5},
         {"beta2", 0.9},
         {"eps", 1e-3}}}},
      {"lars",
       {{},
        {{"adapt", 0}, {"weight_decay", 0.1}, {"momentum", 0}, {"lr", 0.1}},
        {{"weight_decay", 0.01}, {"nesterov", 1}, {"momentum", 0.5}, {"eps", 1e-3}},
        {{"weight_decay", 0.1}, {"trust_coefficient", 0.02}, {"lr", 0.5}}}},
      {"sgd_schedule_free",
       {{},
        {{"lr", 0.1}, {"momentum", 0.5}, {"weight_decay", 0.1}, {"warmup_steps", 10}},
        {{"r", 1}, {"weight_lr_power", 0}, {"lr", 0.5}, {"warmup_steps", 3}}}},
      {"adafactor",
       {{},  // lr 1e-2 > 1/sqrt(t) from t = 10^4 only: rho = 1/sqrt(t) throughout
        {{"lr", 1e-3}, {"beta2_decay", -0.5}, {"weight_decay", 0.1}, {"maximize", 1}},
        {{"eps1", 1e-3}, {"eps2", 0.5}, {"d", 2}, {"lr", 0.05}}}},
      {"muon",  // stepped on matrices by muon_test.cpp (ref::muon_step), never here
       {{},
        {{"nesterov", 0}, {"weight_decay", 0}},
        {{"adjust_lr_fn", 1}, {"lr", 0.02}, {"momentum", 0.5}},
        {{"ns_bf16", 1}},  // CUDA only: the CPU refuses it (muon_test.cpp)
        {{"ns_a", 2.0},
         {"ns_b", -1.5},
         {"ns_c", 0.5},
         {"ns_steps", 3},
         {"eps", 1e-3},
         {"momentum", 0}},
        {{"adjust_lr_fn", 2}, {"weight_decay", 0.3}, {"lr", 0.01}}}},
      {"adamw_schedule_free",
       {{},
        {{"beta1", 0.5},
         {"beta2", 0.9},
         {"eps", 1e-3},
         {"weight_decay", 0.1},
         {"warmup_steps", 7},
         {"lr", 1e-2}},
        {{"r", 0.5}, {"weight_lr_power", 1}, {"warmup_steps", 30}}}},
      {"ademamix",
       {{},
        // Warm-ups shorter than a 25-step run: both schedules ramp, then hold.
        {{"t_alpha", 10}, {"t_beta3", 15}, {"weight_decay", 0}, {"lr", 1e-2}},
        {{"weight_decay", 0.1},
         {"maximize", 1},
         {"beta1", 0.5},
         {"beta2", 0.9},
         {"beta3", 0.99},
         {"alpha", 2},
         {"eps", 1e-3},
         {"t_alpha", 7},
         {"t_beta3", 40}}}},
  };
  return v;
}

}  // namespace

const std::vector<OptionMap>& test_variants(const std::string& algorithm) {
  const auto it = all_variants().find(algorithm);
  if (it == all_variants().end())
    throw std::invalid_argument("fo::ref: no test variants for algorithm '" + algorithm + "'");
  return it->second;
}

std::vector<std::pair<std::string, double>> richest_options(const std::string& algorithm) {
  const OptionMap& last = test_variants(algorithm).back();
  return {last.begin(), last.end()};
}

OptionMap defaults(const std::string& a) {
  if (a == "sgd")
    return {{"lr", 1e-3},        {"momentum", 0}, {"dampening", 0},
            {"weight_decay", 0}, {"nesterov", 0}, {"maximize", 0}};
  if (a == "adagrad")
    return {{"lr", 1e-2},   {"lr_decay", 0}, {"weight_decay", 0}, {"initial_accumulator_value", 0},
            {"eps", 1e-10}, {"maximize", 0}, {"rowwise", 0}};
  if (a == "adadelta")
    return {{"lr", 1.0}, {"rho", 0.9}, {"eps", 1e-6}, {"weight_decay", 0}, {"maximize", 0}};
  if (a == "rmsprop")
    return {{"lr", 1e-2},    {"alpha", 0.99}, {"eps", 1e-8},  {"weight_decay", 0},
            {"momentum", 0}, {"centered", 0}, {"maximize", 0}};
  if (a == "adam" || a == "adamw")
    return {{"lr", 1e-3},
            {"beta1", 0.9},
            {"beta2", 0.999},
            {"eps", 1e-8},
            {"weight_decay", a == "adamw" ? 1e-2 : 0.0},
            {"amsgrad", 0},
            {"maximize", 0}};
  if (a == "rprop")
    return {{"lr", 1e-2},          {"eta_minus", 0.5}, {"eta_plus", 1.2}, {"step_size_min", 1e-6},
            {"step_size_max", 50}, {"maximize", 0}};
  if (a == "lion")
    return {{"lr", 1e-4}, {"beta1", 0.9}, {"beta2", 0.99}, {"weight_decay", 0}, {"maximize", 0}};
  if (a == "lazyadam")
    return {{"lr", 1e-3}, {"beta1", 0.9}, {"beta2", 0.999}, {"eps", 1e-8}, {"maximize", 0}};
  if (a == "adamax")  // torch.optim.Adamax
    return {{"lr", 2e-3},  {"beta1", 0.9},      {"beta2", 0.999},
            {"eps", 1e-8}, {"weight_decay", 0}, {"maximize", 0}};
  if (a == "signsgd") return {{"lr", 1e-3}, {"weight_decay", 0}, {"maximize", 0}};
  if (a == "nadam")  // torch.optim.NAdam
    return {{"lr", 2e-3},        {"beta1", 0.9},
            {"beta2", 0.999},    {"eps", 1e-8},
            {"weight_decay", 0}, {"momentum_decay", 4e-3},
            {"maximize", 0},     {"decoupled_weight_decay", 0}};
  if (a == "radam")  // torch.optim.RAdam
    return {{"lr", 1e-3},
            {"beta1", 0.9},
            {"beta2", 0.999},
            {"eps", 1e-8},
            {"weight_decay", 0},
            {"maximize", 0},
            {"decoupled_weight_decay", 0}};
  if (a == "ademamix")  // bitsandbytes' AdEMAMix (t_alpha, t_beta3: 0 for its None)
    return {{"lr", 1e-3},   {"beta1", 0.9}, {"beta2", 0.999},       {"beta3", 0.9999},
            {"alpha", 5},   {"eps", 1e-8},  {"weight_decay", 1e-2}, {"t_alpha", 0},
            {"t_beta3", 0}, {"maximize", 0}};
  if (a == "lamb")  // NVIDIA Apex FusedLAMB (its amsgrad is unsupported there too)
    return {{"lr", 1e-3},          {"beta1", 0.9},         {"beta2", 0.999},
            {"eps", 1e-6},         {"weight_decay", 0.01}, {"bias_correction", 1},
            {"grad_averaging", 1}, {"adam_w_mode", 1},     {"use_nvlamb", 0}};
  if (a == "lars")  // Optax's lars (learning_rate has no default there)
    return {{"lr", 1.0}, {"momentum", 0.9}, {"weight_decay", 0}, {"trust_coefficient", 1e-3},
            {"eps", 0},  {"nesterov", 0},   {"adapt", 1}};
  if (a == "adafactor")  // torch.optim.Adafactor (eps = (eps1, eps2); eps1 None: float32's)
    return {{"lr", 1e-2},
            {"beta2_decay", -0.8},
            {"eps1", 1.1920928955078125e-07},
            {"eps2", 1e-3},
            {"d", 1},
            {"weight_decay", 0},
            {"maximize", 0}};
  if (a == "muon")  // torch.optim.Muon (torch 2.15); ns_coefficients = (ns_a, ns_b, ns_c)
    return {{"lr", 1e-3},     {"weight_decay", 0.1}, {"momentum", 0.95}, {"nesterov", 1},
            {"ns_a", 3.4445}, {"ns_b", -4.7750},     {"ns_c", 2.0315},   {"eps", 1e-7},
            {"ns_steps", 5},  {"adjust_lr_fn", 0},   {"ns_bf16", 0}};
  if (a == "sgd_schedule_free")  // facebookresearch/schedule_free SGDScheduleFree
    return {{"lr", 1.0},         {"momentum", 0.9}, {"weight_decay", 0},
            {"warmup_steps", 0}, {"r", 0},          {"weight_lr_power", 2}};
  if (a == "adamw_schedule_free")  // and AdamWScheduleFree
    return {{"lr", 2.5e-3},      {"beta1", 0.9},      {"beta2", 0.999}, {"eps", 1e-8},
            {"weight_decay", 0}, {"warmup_steps", 0}, {"r", 0},         {"weight_lr_power", 2}};
  throw std::invalid_argument("fo::ref: unknown algorithm '" + a + "'");
}

bool state_starts_as_param(const std::string& a, const std::string& state) {
  return (a == "sgd_schedule_free" || a == "adamw_schedule_free") && state == "z";
}

void schedule_free_eval(const std::string& a, const OptionMap& options, std::vector<double>& param,
                        const StateMap& states) {
  const OptionMap o = resolve(a, options);
  const double beta = a == "sgd_schedule_free" ? o.at("momentum") : o.at("beta1");
  const std::vector<double>& z = states.at("z");
  for (std::size_t i = 0; i < param.size(); ++i) param[i] += (1.0 - 1.0 / beta) * (z[i] - param[i]);
}

std::vector<std::string> state_names(const std::string& a, const OptionMap& options) {
  const OptionMap o = resolve(a, options);
  if (a == "sgd")
    return o.at("momentum") != 0 ? std::vector<std::string>{"momentum_buffer"}
                                 : std::vector<std::string>{};
  if (a == "adagrad") return {"sum"};
  if (a == "adadelta") return {"square_avg", "acc_delta"};
  if (a == "rmsprop") {
    std::vector<std::string> names{"square_avg"};
    if (o.at("momentum") > 0) names.push_back("momentum_buffer");
    if (o.at("centered") != 0) names.push_back("grad_avg");
    return names;
  }
  if (a == "adam" || a == "adamw") {
    std::vector<std::string> names{"exp_avg", "exp_avg_sq"};
    if (o.at("amsgrad") != 0) names.push_back("max_exp_avg_sq");
    return names;
  }
  if (a == "rprop") return {"prev", "step_size"};
  if (a == "lazyadam") return {"exp_avg", "exp_avg_sq"};
  if (a == "adamax") return {"exp_avg", "exp_inf"};
  if (a == "nadam" || a == "radam") return {"exp_avg", "exp_avg_sq"};
  if (a == "signsgd") return {};
  if (a == "ademamix") return {"exp_avg", "exp_avg_slow", "exp_avg_sq"};
  if (a == "lamb") return {"exp_avg", "exp_avg_sq"};
  if (a == "lars")
    return o.at("momentum") != 0 ? std::vector<std::string>{"momentum_buffer"}
                                 : std::vector<std::string>{};
  if (a == "sgd_schedule_free") return {"z"};
  if (a == "adamw_schedule_free") return {"z", "exp_avg_sq"};
  if (a == "adafactor") return {"variance"};  // a vector param; matrices: factored_state_names
  if (a == "muon") return {"momentum_buffer"};
  return {"exp_avg"};  // lion (resolve() already rejected unknown algorithms)
}

double state_initial_value(const std::string& a, const OptionMap& options,
                           const std::string& state) {
  const OptionMap o = resolve(a, options);
  if (a == "rprop" && state == "step_size") return o.at("lr");
  if (a == "adagrad" && state == "sum") return o.at("initial_accumulator_value");
  return 0.0;
}

namespace {

// lamb and lars: the whole tensor's norms between computing the update and applying it.
void trust_ratio_step(const std::string& a, const OptionMap& o, std::int64_t t,
                      std::vector<double>& param, const std::vector<double>& grad,
                      const std::vector<std::vector<double>*>& s) {
  const std::size_t n = param.size();
  const double lr = o.at("lr"), wd = o.at("weight_decay");
  std::vector<double> u(n);
  double param_sq = 0.0, update_sq = 0.0;
  if (a == "lamb") {  // NVIDIA Apex FusedLAMB
    const double beta1 = o.at("beta1"), beta2 = o.at("beta2");
    const double beta3 = o.at("grad_averaging") != 0 ? 1.0 - beta1 : 1.0;
    const bool bias_correction = o.at("bias_correction") != 0;
    const double bc1 = bias_correction ? 1.0 - std::pow(beta1, double(t)) : 1.0;
    const double bc2 = bias_correction ? 1.0 - std::pow(beta2, double(t)) : 1.0;
    const bool adam_w = o.at("adam_w_mode") != 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double g = adam_w ? grad[i] : grad[i] + wd * param[i];
      double& m = (*s[0])[i];
      double& v = (*s[1])[i];
      m = beta1 * m + beta3 * g;
      v = beta2 * v + (1.0 - beta2) * g * g;
      u[i] = (m / bc1) / (std::sqrt(v / bc2) + o.at("eps")) + (adam_w ? wd * param[i] : 0.0);
    }
    for (std::size_t i = 0; i < n; ++i) param_sq += param[i] * param[i], update_sq += u[i] * u[i];
    double ratio = 1.0;
    if ((wd != 0 || o.at("use_nvlamb") != 0) && param_sq > 0 && update_sq > 0)
      ratio = std::sqrt(param_sq) / std::sqrt(update_sq);
    for (std::size_t i = 0; i < n; ++i) param[i] -= lr * ratio * u[i];
    return;
  }
  // lars, as Optax chains it: decay, trust ratio, learning rate, then momentum (a trace).
  const bool adapt = o.at("adapt") != 0;
  for (std::size_t i = 0; i < n; ++i) {
    u[i] = adapt ? grad[i] + wd * param[i] : grad[i];
    param_sq += param[i] * param[i], update_sq += u[i] * u[i];
  }
  double ratio = 1.0;
  if (adapt && param_sq > 0 && update_sq > 0)
    ratio = o.at("trust_coefficient") * std::sqrt(param_sq) / (std::sqrt(update_sq) + o.at("eps"));
  const double momentum = o.at("momentum");
  for (std::size_t i = 0; i < n; ++i) {
    const double step = lr * ratio * u[i];
    if (momentum == 0) {
      param[i] -= step;
      continue;
    }
    double& v = (*s[0])[i];
    v = momentum * v + step;
    param[i] -= o.at("nesterov") != 0 ? step + momentum * v : v;
  }
}

}  // namespace

std::vector<std::string> factored_state_names(const std::string& a,
                                              const std::vector<std::int64_t>& shape) {
  if (a != "adafactor") throw std::invalid_argument("fo::ref: '" + a + "' is not factored");
  return shape.size() >= 2 ? std::vector<std::string>{"row_var", "col_var"}
                           : std::vector<std::string>{"variance"};
}

std::int64_t factored_state_size(const std::string& state, const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (state == "row_var" && i + 1 == shape.size()) continue;
    if (state == "col_var" && i + 2 == shape.size()) continue;
    n *= shape[i];
  }
  return n;
}

// torch.optim.Adafactor's _single_tensor_adafactor, in double.
void factored_step(const std::string& a, const OptionMap& options, std::int64_t t,
                   const std::vector<std::int64_t>& shape, std::vector<double>& param,
                   const std::vector<double>& grad, StateMap& states) {
  const OptionMap o = resolve(a, options);
  const std::size_t n = param.size();
  if (grad.size() != n) throw std::invalid_argument("fo::ref: grad and param sizes differ");
  if (n == 0) return;
  const double lr = o.at("lr"), eps1 = o.at("eps1"), eps2 = o.at("eps2");
  const double w = std::pow(double(t), o.at("beta2_decay"));
  const double rho = std::min(lr, 1.0 / std::sqrt(double(t)));
  double param_sq = 0.0;
  for (double p : param) param_sq += p * p;
  const double alpha = std::max(eps2, std::sqrt(param_sq / double(n))) * rho;
  std::vector<double> g(grad);
  if (o.at("maximize") != 0)
    for (double& x : g) x = -x;
  std::vector<double> v(n);  // the second-moment estimate
  if (shape.size() >= 2) {
    const std::int64_t cols = shape.back(), rows = shape[shape.size() - 2];
    const std::int64_t batch = static_cast<std::int64_t>(n) / (rows * cols);
    std::vector<double>& row_var = buffer(states, "row_var", std::size_t(batch * rows));
    std::vector<double>& col_var = buffer(states, "col_var", std::size_t(batch * cols));
    for (std::int64_t b = 0; b < batch; ++b) {
      const double* gb = g.data() + b * rows * cols;
      double row_sum = 0.0;
      for (std::int64_t r = 0; r < rows; ++r) {
        double sq = 0.0;
        for (std::int64_t c = 0; c < cols; ++c) sq += gb[r * cols + c] * gb[r * cols + c];
        double& rv = row_var[std::size_t(b * rows + r)];
        rv += w * (sq / double(cols) - rv);
        row_sum += rv;
      }
      for (std::int64_t c = 0; c < cols; ++c) {
        double sq = 0.0;
        for (std::int64_t r = 0; r < rows; ++r) sq += gb[r * cols + c] * gb[r * cols + c];
        double& cv = col_var[std::size_t(b * cols + c)];
        cv += w * (sq / double(rows) - cv);
      }
      const double norm = std::max(row_sum / double(rows), eps1);
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c)
          v[std::size_t(b * rows * cols + r * cols + c)] =
              row_var[std::size_t(b * rows + r)] * col_var[std::size_t(b * cols + c)] / norm;
    }
  } else {
    std::vector<double>& var = buffer(states, "variance", n);
    for (std::size_t i = 0; i < n; ++i) v[i] = var[i] += w * (g[i] * g[i] - var[i]);
  }
  std::vector<double> u(n);
  double update_sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    u[i] = g[i] / std::sqrt(std::max(v[i], eps1 * eps1));
    update_sq += u[i] * u[i];
  }
  const double clip = std::max(1.0, std::sqrt(update_sq / double(n)) / o.at("d"));
  for (std::size_t i = 0; i < n; ++i)
    param[i] = param[i] * (1.0 - lr * o.at("weight_decay")) - alpha / clip * u[i];
}

void step(const std::string& a, const OptionMap& options, std::int64_t t,
          std::vector<double>& param, const std::vector<double>& grad, StateMap& states,
          std::vector<unsigned char>* ambiguous) {
  const OptionMap o = resolve(a, options);
  if (a == "adagrad" && o.at("rowwise") != 0)
    throw std::invalid_argument("fo::ref: row-wise adagrad has sparse steps only");
  const std::size_t n = param.size();
  if (grad.size() != n) throw std::invalid_argument("fo::ref: grad and param sizes differ");
  std::vector<std::vector<double>*> s;  // the buffers, in state_names() order
  for (const auto& name : state_names(a, options)) s.push_back(&buffer(states, name, n));
  if (ambiguous) ambiguous->assign(n, 0);

  if (a == "lamb" || a == "lars") return trust_ratio_step(a, o, t, param, grad, s);
  if (a == "muon")
    throw std::invalid_argument(
        "fo::ref: muon steps matrices: ref::muon_step (reference/muon_reference.hpp)");
  if (a == "adafactor")
    return factored_step(a, options, t, {static_cast<std::int64_t>(n)}, param, grad, states);
  if (a == "sgd_schedule_free" || a == "adamw_schedule_free") {
    // The package's step with fixed options: lr_max and weight_sum, its per-group scalars,
    // replayed from step 1 (each step's own lr under the warm-up).
    const double warmup = o.at("warmup_steps");
    double lr = 0.0, lr_max = -1.0, weight = 0.0, weight_sum = 0.0;
    for (std::int64_t k = 1; k <= t; ++k) {
      lr = o.at("lr") * (double(k - 1) < warmup ? double(k) / warmup : 1.0);
      lr_max = std::max(lr, lr_max);
      weight = std::pow(double(k), o.at("r")) * std::pow(lr_max, o.at("weight_lr_power"));
      weight_sum += weight;
    }
    const double ckp1 = weight_sum != 0.0 ? weight / weight_sum : 0.0;
    const bool adam = a == "adamw_schedule_free";
    const double beta = adam ? o.at("beta1") : o.at("momentum");
    const double wd = o.at("weight_decay");
    for (std::size_t i = 0; i < n; ++i) {
      double& y = param[i];
      double& z = (*s[0])[i];
      double u = grad[i];
      if (adam) {
        const double beta2 = o.at("beta2");
        double& v = (*s[1])[i];
        v = beta2 * v + (1.0 - beta2) * grad[i] * grad[i];
        u = grad[i] / (std::sqrt(v / (1.0 - std::pow(beta2, double(t)))) + o.at("eps"));
      }
      u += wd * y;
      y += ckp1 * (z - y);
      y += lr * (beta * (1.0 - ckp1) - 1.0) * u;
      z -= lr * u;
    }
    return;
  }

  const double lr = o.at("lr");
  const bool maximize = o.at("maximize") != 0;
  const double wd = o.count("weight_decay") ? o.at("weight_decay") : 0.0;

  // nadam's momentum schedule mu_k and mu_product = mu_1 * ... * mu_t.
  const auto mu = [&](std::int64_t k) {
    return o.at("beta1") * (1.0 - 0.5 * std::pow(0.96, double(k) * o.at("momentum_decay")));
  };
  double mu_product = 1.0;
  if (a == "nadam")
    for (std::int64_t k = 1; k <= t; ++k) mu_product *= mu(k);

  for (std::size_t i = 0; i < n; ++i) {
    double& p = param[i];
    double g = maximize ? -grad[i] : grad[i];
    // Each algorithm applies its own weight decay, as its documentation says: L2 (folded
    // into g) or decoupled (p shrinks by lr * wd first); none for rprop and lazyadam.
    const auto l2_decay = [&] { g += wd * p; };
    const auto decoupled_decay = [&] { p *= 1.0 - lr * wd; };
    // Adam's two moments (states 0 and 1) from g; returns the bias corrections at step t.
    const auto adam_moments = [&](double& m, double& v) {
      const double beta1 = o.at("beta1"), beta2 = o.at("beta2");
      m = beta1 * m + (1.0 - beta1) * g;
      v = beta2 * v + (1.0 - beta2) * g * g;
      return std::make_pair(1.0 - std::pow(beta1, double(t)), 1.0 - std::pow(beta2, double(t)));
    };

    if (a == "sgd") {
      l2_decay();
      const double momentum = o.at("momentum");
      if (momentum != 0) {
        double& b = (*s[0])[i];
        b = (t == 1) ? g : momentum * b + (1.0 - o.at("dampening")) * g;
        g = o.at("nesterov") != 0 ? g + momentum * b : b;
      }
      p -= lr * g;
    } else if (a == "adagrad") {
      l2_decay();
      double& sum = (*s[0])[i];
      const double clr = lr / (1.0 + double(t - 1) * o.at("lr_decay"));
      sum += g * g;
      p -= clr * g / (std::sqrt(sum) + o.at("eps"));
    } else if (a == "adadelta") {
      l2_decay();
      double& sq = (*s[0])[i];
      double& acc = (*s[1])[i];
      const double rho = o.at("rho"), eps = o.at("eps");
      sq = rho * sq + (1.0 - rho) * g * g;
      const double delta = std::sqrt(acc + eps) / std::sqrt(sq + eps) * g;
      acc = rho * acc + (1.0 - rho) * delta * delta;
      p -= lr * delta;
    } else if (a == "rmsprop") {
      l2_decay();
      const double alpha = o.at("alpha"), eps = o.at("eps"), momentum = o.at("momentum");
      const bool centered = o.at("centered") != 0;
      double& sq = (*s[0])[i];
      sq = alpha * sq + (1.0 - alpha) * g * g;
      double avg;
      if (centered) {
        double& ga = (*s.back())[i];  // grad_avg is always listed last
        ga = alpha * ga + (1.0 - alpha) * g;
        avg = std::sqrt(sq - ga * ga) + eps;
      } else {
        avg = std::sqrt(sq) + eps;
      }
      if (momentum > 0) {
        double& b = (*s[1])[i];
        b = momentum * b + g / avg;
        p -= lr * b;
      } else {
        p -= lr * g / avg;
      }
    } else if (a == "adam" || a == "adamw") {
      if (a == "adamw")
        decoupled_decay();
      else
        l2_decay();
      double& m = (*s[0])[i];
      double& v = (*s[1])[i];
      const auto [bc1, bc2] = adam_moments(m, v);
      const double eps = o.at("eps");
      double vv = v;
      if (o.at("amsgrad") != 0) {
        double& vmax = (*s[2])[i];
        vmax = std::max(vmax, v);
        vv = vmax;
      }
      const double denom = std::sqrt(vv) / std::sqrt(bc2) + eps;
      p -= (lr / bc1) * m / denom;
    } else if (a == "rprop") {  // torch.optim.Rprop: factor, then clamp everywhere
      double& prev = (*s[0])[i];
      double& ss = (*s[1])[i];
      const double prod = g * prev;
      const double sg = sign(prod);
      const double factor = sg > 0 ? o.at("eta_plus") : (sg < 0 ? o.at("eta_minus") : 1.0);
      ss = std::min(std::max(ss * factor, o.at("step_size_min")), o.at("step_size_max"));
      if (sg < 0) g = 0.0;
      p -= sign(g) * ss;
      prev = g;
      if (ambiguous && ((prod != 0 && std::fabs(prod) < 1e-30) ||
                        (g != 0 && std::fabs(g) < 1.1754943508222875e-38)))  // FLT_MIN
        (*ambiguous)[i] = 1;
    } else if (a == "lazyadam") {  // eps on the uncorrected sqrt(v)
      double& m = (*s[0])[i];
      double& v = (*s[1])[i];
      const auto [bc1, bc2] = adam_moments(m, v);
      p -= lr * std::sqrt(bc2) / bc1 * m / (std::sqrt(v) + o.at("eps"));
    } else if (a == "adamax") {  // torch.optim.Adamax
      l2_decay();
      const double beta1 = o.at("beta1"), beta2 = o.at("beta2"), eps = o.at("eps");
      double& m = (*s[0])[i];
      double& u = (*s[1])[i];
      m = beta1 * m + (1.0 - beta1) * g;
      u = std::max(beta2 * u, std::fabs(g) + eps);
      p -= lr / (1.0 - std::pow(beta1, double(t))) * m / u;
    } else if (a == "nadam") {  // torch.optim.NAdam, mu_product as a plain running product
      if (o.at("decoupled_weight_decay") != 0)
        decoupled_decay();
      else
        l2_decay();
      double& m = (*s[0])[i];
      double& v = (*s[1])[i];
      const double bc2 = adam_moments(m, v).second;
      const double denom = std::sqrt(v / bc2) + o.at("eps");
      p -= lr * (1.0 - mu(t)) / (1.0 - mu_product) * g / denom;
      p -= lr * mu(t + 1) / (1.0 - mu_product * mu(t + 1)) * m / denom;
    } else if (a == "radam") {  // torch.optim.RAdam
      if (o.at("decoupled_weight_decay") != 0)
        decoupled_decay();
      else
        l2_decay();
      const double beta2 = o.at("beta2");
      double& m = (*s[0])[i];
      double& v = (*s[1])[i];
      const auto [bc1, bc2] = adam_moments(m, v);
      const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
      const double rho_t = rho_inf - 2.0 * double(t) * std::pow(beta2, double(t)) / bc2;
      if (rho_t > 5.0) {
        const double rect = std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                      ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
        p -= m / bc1 * lr * std::sqrt(bc2) / (std::sqrt(v) + o.at("eps")) * rect;
      } else {
        p -= m / bc1 * lr;
      }
    } else if (a == "ademamix") {
      // The AdEMAMix paper's Algorithm 1 with its warm-up schedulers, as bitsandbytes'
      // _ReferenceAdEMAMix and AdEMAMix.update_step write them (t counts from 1).
      const double beta1 = o.at("beta1"), beta2 = o.at("beta2");
      const double t_alpha = o.at("t_alpha"), t_beta3 = o.at("t_beta3");
      double alpha = o.at("alpha"), beta3 = o.at("beta3");
      if (t_alpha > 0) alpha = std::min(double(t) * alpha / t_alpha, alpha);
      if (t_beta3 > 0) {
        const double ln_beta1 = std::log(beta1), ln_beta3 = std::log(beta3);
        const double scale = double(t) / t_beta3;
        beta3 = std::min(
            std::exp(ln_beta1 * ln_beta3 / ((1.0 - scale) * ln_beta3 + scale * ln_beta1)), beta3);
      }
      double& m1 = (*s[0])[i];
      double& m2 = (*s[1])[i];
      double& nu = (*s[2])[i];
      m1 = beta1 * m1 + (1.0 - beta1) * g;
      m2 = beta3 * m2 + (1.0 - beta3) * g;
      nu = beta2 * nu + (1.0 - beta2) * g * g;
      const double bc1 = 1.0 - std::pow(beta1, double(t));
      const double bc2 = 1.0 - std::pow(beta2, double(t));
      const double update =
          (m1 / bc1 + alpha * m2) / (std::sqrt(nu) / std::sqrt(bc2) + o.at("eps"));
      p -= lr * (update + wd * p);  // decay on the param before this step
    } else if (a == "signsgd") {
      const double g0 = g;
      l2_decay();
      // sign(g + wd * p) is ambiguous in float32 where the sum nearly cancels.
      const double bound = 1e-5 * (std::fabs(g0) + std::fabs(wd * p));
      if (ambiguous && wd != 0 && bound > 0 && std::fabs(g) <= bound) (*ambiguous)[i] = 1;
      p -= lr * sign(g);
    } else {  // lion
      decoupled_decay();
      const double beta1 = o.at("beta1"), beta2 = o.at("beta2");
      double& m = (*s[0])[i];
      const double c = beta1 * m + (1.0 - beta1) * g;  // uses the OLD m
      const double bound = 1e-5 * (std::fabs(beta1 * m) + std::fabs((1.0 - beta1) * g));
      if (ambiguous && bound > 0 && std::fabs(c) <= bound) (*ambiguous)[i] = 1;
      p -= lr * sign(c);
      m = beta2 * m + (1.0 - beta2) * g;
    }
  }
}

void sparse_step(const std::string& a, const OptionMap& options, std::int64_t t,
                 std::vector<double>& table, std::int64_t rows, std::int64_t dim,
                 const std::vector<std::int64_t>& indices, const std::vector<double>& grad_rows,
                 StateMap& states) {
  if (static_cast<std::int64_t>(table.size()) != rows * dim ||
      static_cast<std::int64_t>(grad_rows.size()) !=
          static_cast<std::int64_t>(indices.size()) * dim)
    throw std::invalid_argument("fo::ref: sparse sizes disagree");
  // Sum the gradient of each distinct row (any order: this is double precision).
  std::map<std::int64_t, std::vector<double>> summed;
  for (std::size_t k = 0; k < indices.size(); ++k) {
    const std::int64_t r = indices[k];
    if (r < 0 || r >= rows) throw std::invalid_argument("fo::ref: index out of range");
    auto& g = summed.try_emplace(r, std::vector<double>(static_cast<std::size_t>(dim), 0.0))
                  .first->second;
    for (std::int64_t j = 0; j < dim; ++j) g[j] += grad_rows[k * dim + j];
  }
  // Row-wise AdaGrad (FBGEMM): one accumulator per row, sum += mean(g^2) over the row, then
  // p -= clr / (sqrt(sum) + eps) * g with the row's rate.
  const OptionMap o = resolve(a, options);
  if (a == "adagrad" && o.at("rowwise") != 0) {
    std::vector<double>& sum = buffer(states, "sum", static_cast<std::size_t>(rows));
    const double clr = o.at("lr") / (1.0 + static_cast<double>(t - 1) * o.at("lr_decay"));
    for (const auto& [r, g] : summed) {
      double mean_square = 0.0;
      for (double x : g) mean_square += x * x;
      mean_square /= static_cast<double>(dim);
      sum[r] += mean_square;
      const double rate = clr / (std::sqrt(sum[r]) + o.at("eps"));
      for (std::int64_t j = 0; j < dim; ++j)
        table[r * dim + j] -= rate * (o.at("maximize") != 0 ? -g[j] : g[j]);
    }
    return;
  }
  // One dense step of each touched row, on that row alone.
  const std::vector<std::string> names = state_names(a, options);
  for (const auto& [r, g] : summed) {
    const auto row = [&](std::vector<double>& v) {
      return std::vector<double>(v.begin() + r * dim, v.begin() + (r + 1) * dim);
    };
    std::vector<double> p = row(table);
    StateMap s;
    for (const auto& name : names) s[name] = row(buffer(states, name, table.size()));
    step(a, options, t, p, g, s);
    std::copy(p.begin(), p.end(), table.begin() + r * dim);
    for (const auto& name : names)
      std::copy(s[name].begin(), s[name].end(), states[name].begin() + r * dim);
  }
}

void ema_update(std::vector<double>& ema, const std::vector<double>& param, double decay) {
  if (ema.size() != param.size()) throw std::invalid_argument("ema_update: sizes differ");
  if (!(decay >= 0.0 && decay < 1.0)) throw std::invalid_argument("ema_update: decay");
  for (std::size_t i = 0; i < ema.size(); ++i) ema[i] += (1.0 - decay) * (param[i] - ema[i]);
}

}  // namespace fo::ref
