// The training loop and `fusedopt-demo train`. The models run on the CPU (model.hpp) or, with
// --device cuda, on the GPU (model_cuda.hpp: cuBLAS), where params and gradients stay in
// device memory and the optimizer steps them there. Only the optimizer step is fusedopt's, and
// only it is timed. Newton's method on the softmax model (newton_run) is fusedopt's
// newton_minimize over the demo's exact Hessian, in double on the CPU, timed whole.
#include "train.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <stdexcept>

#include "fusedopt/newton.hpp"
#include "fusedopt/optimizer.hpp"
#include "fusedopt/schedule.hpp"
#include "svg.hpp"

#ifdef FUSEDOPT_WITH_CUDA
#include "model_cuda.hpp"
#endif

namespace fo::demo {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

#ifdef FUSEDOPT_WITH_CUDA
// What a GPU run keeps on the device: the model (its scratch and cuBLAS handle), params and
// gradients, the training set (copied once) and the epoch's order of its rows. The model's
// work and the optimizer's steps go to one stream (the default one).
class GpuRun {
 public:
  GpuRun(const ModelSpec& spec, std::size_t batch, const Dataset& train,
         const std::vector<float>& h_params)
      : model_(spec, batch),
        params_(model_.num_params()),
        grads_(model_.num_params()),
        x_(train.x.size()),
        y_(train.size()),
        order_(train.size()),
        h_order_(train.size()) {
    params_.copy_from_host(h_params.data(), h_params.size(), model_.stream());
    x_.copy_from_host(train.x.data(), train.x.size(), model_.stream());
    y_.copy_from_host(train.y.data(), train.size(), model_.stream());
  }
  float* params() const { return params_.data(); }
  const float* grads() const { return grads_.data(); }

  /// The epoch's order of the training rows, copied once; a batch is a slice of it.
  void set_order(const std::vector<std::size_t>& order) {
    for (std::size_t i = 0; i < order.size(); ++i) h_order_[i] = static_cast<int>(order[i]);
    order_.copy_from_host(h_order_.data(), h_order_.size(), model_.stream());
  }
  /// The gradient of the batch order[first, first + m), waited for, so that the clock then
  /// measures the optimizer step alone. The batch's loss is not asked for: as on the CPU,
  /// where it is dropped, the epoch's numbers come from the evaluation.
  void gradient(std::size_t first, std::size_t m) {
    model_.loss_async(params_.data(), x_.data(), y_.data(), order_.data() + first, m, grads_.data(),
                      nullptr);
    FO_DEMO_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
  }
  /// One optimizer step on the model's stream, waited for (for the timing).
  void step(Optimizer& opt, const std::vector<const void*>& grad_ptrs) {
    opt.step(grad_ptrs.data(), model_.stream());
    FO_DEMO_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
  }
  void params_to_host(std::vector<float>& h_params) const {
    params_.copy_to_host(h_params.data(), h_params.size(), model_.stream());
  }

 private:
  CudaModel model_;
  DeviceArray<float> params_, grads_, x_;
  DeviceArray<int> y_, order_;
  std::vector<int> h_order_;
};
#endif

/// Train and test loss and accuracy of a model at `params`, as one history entry.
template <class T>
EpochStats evaluate_split(const Model<T>& model, const T* params, const Split& split, int epoch,
                          std::int64_t step) {
  const Dataset& train = split.train;
  const Dataset& test = split.test;
  const Evaluation tr = model.evaluate(params, train.x.data(), train.y.data(), train.size());
  const Evaluation te = model.evaluate(params, test.x.data(), test.y.data(), test.size());
  EpochStats s;
  s.epoch = epoch;
  s.step = step;
  s.train_loss = tr.loss;
  s.train_accuracy = tr.accuracy;
  s.test_loss = te.loss;
  s.test_accuracy = te.accuracy;
  return s;
}

}  // namespace

const std::vector<std::string>& default_optimizers() {
  static const std::vector<std::string> names = {"sgd",   "rmsprop", "adagrad", "adam",
                                                 "adamw", "lion",    "newton"};
  return names;
}

std::vector<std::pair<std::string, double>> demo_defaults(const std::string& algorithm) {
  // Learning rates from a sweep of 1e-4, 3e-4, 1e-3, ..., 1 (batch 32, 30 epochs, seeds 1-3),
  // chosen to do well on both models and stay well away from divergence. Mean test accuracy
  // at the chosen lr, softmax / mlp: sgd 96.5 / 97.2 (the mlp diverges at lr 1), rmsprop
  // 97.3 / 97.8 (fails from 0.1), adagrad 96.8 / 97.6, adam 97.0 / 97.4, adamw 96.9 / 97.4,
  // lion 95.8 / 97.0 (the softmax model peaks at 3e-3 with 97.1, the mlp degrades above 1e-3).
  if (algorithm == "sgd") return {{"lr", 0.1}, {"momentum", 0.9}};
  if (algorithm == "rmsprop") return {{"lr", 1e-2}};
  if (algorithm == "adagrad") return {{"lr", 0.1}};
  if (algorithm == "adam") return {{"lr", 1e-2}};
  if (algorithm == "adamw") return {{"lr", 1e-2}};
  if (algorithm == "lion") return {{"lr", 1e-3}};
  return {};
}

RunResult train_run(const TrainConfig& config, const Split& data,
                    const std::function<void(const Progress&)>& on_progress) {
  if (config.epochs < 0) throw std::invalid_argument("epochs must be >= 0");
  const Dataset& train = data.train;
  if (train.size() == 0) throw std::invalid_argument("the training set is empty");

  const Model<float> model(config.model);
  const std::size_t np = model.num_params();
  std::vector<float> params(np), grads(np);
  model.init(params.data(), config.seed);

  Optimizer opt(config.optimizer, config.device);
  for (const auto& [key, value] : demo_defaults(config.optimizer)) opt.set_option(key, value);
  for (const auto& [key, value] : config.options) opt.set_option(key, value);

  const std::size_t n = train.size();
  const std::size_t batch = config.batch == 0 ? n : std::min(config.batch, n);

  // What the optimizer steps: the host buffers, or the GPU model's device buffers, which start
  // from the same initialisation.
  float* step_params = params.data();
  const float* step_grads = grads.data();
  const bool on_device = config.device == Device::cuda;
#ifdef FUSEDOPT_WITH_CUDA
  std::optional<GpuRun> gpu;
  if (on_device) {
    gpu.emplace(config.model, batch, train, params);
    step_params = gpu->params();
    step_grads = gpu->grads();
  }
#else
  if (on_device) throw std::runtime_error("this fusedopt-demo was built without CUDA");
#endif
  std::vector<const void*> grad_ptrs;
  for (const TensorSlice& t : model.tensors()) {
    opt.add_param(t.name, step_params + t.offset, DType::f32, t.shape);
    grad_ptrs.push_back(step_grads + t.offset);
  }

  RunResult r;
  r.model = model_name(config.model.kind);
  r.optimizer = config.optimizer;
  r.lr = config.lr_at ? config.lr_at(1) : opt.option("lr");

  auto evaluate = [&](int epoch) {
    return evaluate_split(model, params.data(), data, epoch, r.steps);
  };
  r.history.push_back(evaluate(0));

  const std::size_t batches = (n + batch - 1) / batch;
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::vector<float> xb(on_device ? 0 : batch * kFeatures);
  std::vector<int> yb(on_device ? 0 : batch);
  Rng batch_rng(config.seed ^ 0xb47c4u);  // the same batch order for every optimizer

  for (int epoch = 1; epoch <= config.epochs; ++epoch) {
    batch_rng.shuffle(order);
#ifdef FUSEDOPT_WITH_CUDA
    if (gpu) gpu->set_order(order);
#endif
    for (std::size_t b = 0; b < batches; ++b) {
      const std::size_t first = b * batch;
      const std::size_t m = std::min(batch, n - first);
      if (!on_device) {
        for (std::size_t i = 0; i < m; ++i) {
          const std::size_t src = order[first + i];
          std::copy_n(train.x.data() + src * kFeatures, kFeatures, xb.data() + i * kFeatures);
          yb[i] = train.y[src];
        }
        model.loss(params.data(), xb.data(), yb.data(), m, grads.data());
      }
#ifdef FUSEDOPT_WITH_CUDA
      if (gpu) gpu->gradient(first, m);  // forward and backward on the GPU
#endif
      if (config.lr_at) opt.set_option("lr", config.lr_at(r.steps + 1));
      const auto t0 = Clock::now();
      if (!on_device) opt.step(grad_ptrs.data());
#ifdef FUSEDOPT_WITH_CUDA
      if (gpu) gpu->step(opt, grad_ptrs);
#endif
      r.step_seconds += seconds_since(t0);
      ++r.steps;
      if (on_progress) on_progress({epoch, config.epochs, b + 1, batches, nullptr});
    }
#ifdef FUSEDOPT_WITH_CUDA
    if (gpu) gpu->params_to_host(params);  // once an epoch, for the CPU model's evaluation
#endif
    r.history.push_back(evaluate(epoch));
    if (on_progress) on_progress({epoch, config.epochs, batches, batches, &r.history.back()});
    if (!std::isfinite(r.history.back().train_loss)) {
      r.diverged = true;
      break;
    }
  }
  return r;
}

RunResult newton_run(const NewtonConfig& config, const Split& data) {
  if (!(config.l2 > 0) || !std::isfinite(config.l2))
    throw std::invalid_argument("newton: l2 must be > 0 (the cross-entropy's Hessian is singular)");
  const Dataset& train = data.train;
  if (train.size() == 0) throw std::invalid_argument("the training set is empty");

  // The first-order runs' start, in double: W then b, as softmax_objective orders theta.
  const ModelSpec spec{ModelKind::softmax};
  const Model<float> float_model(spec);
  std::vector<float> start(float_model.num_params());
  float_model.init(start.data(), config.seed);
  const Model<double> model(spec);
  const TensorSlice& tw = model.tensors().at(0);
  const TensorSlice& tb = model.tensors().at(1);
  std::vector<double> theta(tw.numel + tb.numel);
  if (theta.size() != static_cast<std::size_t>((kFeatures + 1) * kClasses))
    throw std::logic_error("newton: unexpected softmax layout");
  std::copy_n(start.data() + tw.offset, tw.numel, theta.begin());
  std::copy_n(start.data() + tb.offset, tb.numel, theta.begin() + static_cast<long>(tw.numel));

  std::vector<double> params(model.num_params(), 0.0);
  auto evaluate = [&](const std::vector<double>& th, int step) {
    std::copy_n(th.begin(), tw.numel, params.begin() + static_cast<long>(tw.offset));
    std::copy_n(th.begin() + static_cast<long>(tw.numel), tb.numel,
                params.begin() + static_cast<long>(tb.offset));
    return evaluate_split(model, params.data(), data, step, step);
  };

  RunResult r;
  r.model = model_name(ModelKind::softmax);
  r.optimizer = "newton";
  r.l2 = config.l2;
  r.history.push_back(evaluate(theta, 0));

  const NewtonObjective objective = [&](const double* x, double* grad, double* hess) {
    const auto t0 = Clock::now();
    const double f = softmax_objective(x, train.x.data(), train.y.data(), train.size(), kFeatures,
                                       kClasses, config.l2, grad, hess);
    r.eval_seconds += seconds_since(t0);
    return f;
  };
  NewtonOptions options;
  options.grad_tol = config.grad_tol;
  options.max_iters = config.max_steps;
  options.device = config.device;
  const auto t0 = Clock::now();
  const NewtonResult nr = newton_minimize(objective, theta, options);
  r.step_seconds = seconds_since(t0);

  for (std::size_t k = 0; k < nr.trajectory.size(); ++k)
    r.history.push_back(evaluate(nr.trajectory[k], static_cast<int>(k + 1)));
  r.steps = nr.steps;
  r.evaluations = nr.evaluations;
  r.objective = nr.f;
  r.grad_norm = nr.grad_norm;
  r.converged = nr.converged;
  return r;
}

// ---------------------------------------------------------------------------------------------
// The command line.

namespace {

const char kUsage[] = R"(usage: fusedopt-demo train [options]

Trains softmax regression and a two-layer perceptron on the UCI handwritten digits (1797
8x8 images: 1437 to train, 360 to test) with each optimizer, and compares them: final loss,
test accuracy, time per optimizer step, and the loss curves as SVG.

options:
  --optimizers LIST    comma-separated (default: sgd,rmsprop,adagrad,adam,adamw,lion,
                       newton); any fusedopt algorithm, and newton: damped Newton's method
                       with the exact Hessian, on the softmax model only (full batch, in
                       double on the CPU; it ignores --epochs, --batch and --schedule and
                       takes newton.l2 (default 1e-4), newton.grad_tol (1e-8) and
                       newton.max_iters (100))
  --opt-set KEY=VALUE  an fo::Optimizer option for every listed optimizer that has it;
                       NAME.KEY=VALUE for one optimizer (repeatable; e.g. adam.lr=0.01,
                       weight_decay=1e-4, max_grad_norm=1)
  --model M            softmax, mlp or both (default both)
  --hidden N           width of the mlp's hidden layer (default 64)
  --activation A       tanh or relu (default tanh)
  --epochs N           passes over the training set (default 30)
  --batch N|full       examples per step: 1, 32 (default), ..., or full for full batch
  --schedule SPEC      an lr schedule, e.g. warmup_cosine:lr=3e-3,warmup=100,total=1350
                       (fusedopt/schedule.hpp lists the kinds); its lr replaces every
                       listed optimizer's lr, step by step
  --device D           cpu, cuda or auto (default auto: cuda when a GPU is present); on
                       cuda the models run in cuBLAS and the optimizers step device memory
  --seed N             the split, the initialisation and the batch order (default 1)
  --data PATH          digits.csv.gz (default: the copy in the source tree)
  --out DIR            where the SVGs and history.csv go (default ./fusedopt-demo-out)
  -h, --help           this text
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct OptSet {
  std::string target;  // an optimizer name, or "" for all that have the key
  std::string key;
  double value;
};

struct Cli {
  std::string data = default_data_path();
  std::vector<ModelKind> models = {ModelKind::softmax, ModelKind::mlp};
  int hidden = 64;
  Activation activation = Activation::tanh;
  std::vector<std::string> optimizers = default_optimizers();
  std::vector<OptSet> sets;
  int epochs = 30;
  std::size_t batch = 32;
  std::optional<std::string> schedule;
  std::string device = "auto";
  std::uint64_t seed = 1;
  std::string out = "fusedopt-demo-out";
  bool help = false;
};

double parse_double(const std::string& s, const std::string& what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0') throw UsageError(what + ": '" + s + "' is not a number");
  return v;
}

long long parse_int(const std::string& s, const std::string& what, long long lo) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < lo)
    throw UsageError(what + ": '" + s + "' is not an integer >= " + std::to_string(lo));
  return v;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= s.size()) {
    const std::size_t comma = std::min(s.find(',', start), s.size());
    if (comma > start) out.push_back(s.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

Cli parse_cli(int argc, char** argv) {
  Cli c;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      c.help = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + arg + "'");
    std::string value;
    bool has_value = false;
    if (const std::size_t eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg.resize(eq);
      has_value = true;
    }
    auto take = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--optimizers") {
      c.optimizers = split_list(take());
      if (c.optimizers.empty()) throw UsageError("--optimizers: empty list");
    } else if (arg == "--opt-set") {
      const std::string v = take();
      const std::size_t eq = v.find('=');
      if (eq == std::string::npos || eq == 0)
        throw UsageError("--opt-set: expected KEY=VALUE or NAME.KEY=VALUE, got '" + v + "'");
      OptSet s;
      s.key = v.substr(0, eq);
      if (const std::size_t dot = s.key.find('.'); dot != std::string::npos) {
        s.target = s.key.substr(0, dot);
        s.key = s.key.substr(dot + 1);
      }
      s.value = parse_double(v.substr(eq + 1), "--opt-set " + s.key);
      c.sets.push_back(s);
    } else if (arg == "--model") {
      const std::string v = take();
      if (v == "softmax")
        c.models = {ModelKind::softmax};
      else if (v == "mlp")
        c.models = {ModelKind::mlp};
      else if (v == "both")
        c.models = {ModelKind::softmax, ModelKind::mlp};
      else
        throw UsageError("--model: expected softmax, mlp or both, got '" + v + "'");
    } else if (arg == "--hidden") {
      c.hidden = static_cast<int>(parse_int(take(), "--hidden", 1));
    } else if (arg == "--activation") {
      const std::string v = take();
      if (v == "tanh")
        c.activation = Activation::tanh;
      else if (v == "relu")
        c.activation = Activation::relu;
      else
        throw UsageError("--activation: expected tanh or relu, got '" + v + "'");
    } else if (arg == "--epochs") {
      c.epochs = static_cast<int>(parse_int(take(), "--epochs", 1));
    } else if (arg == "--batch") {
      const std::string v = take();
      c.batch = v == "full" ? 0 : static_cast<std::size_t>(parse_int(v, "--batch", 1));
    } else if (arg == "--schedule") {
      c.schedule = take();
    } else if (arg == "--device") {
      c.device = take();
      if (c.device != "cpu" && c.device != "cuda" && c.device != "auto")
        throw UsageError("--device: expected cpu, cuda or auto, got '" + c.device + "'");
    } else if (arg == "--seed") {
      c.seed = static_cast<std::uint64_t>(parse_int(take(), "--seed", 0));
    } else if (arg == "--data") {
      c.data = take();
    } else if (arg == "--out") {
      c.out = take();
    } else {
      throw UsageError("unknown option '" + arg + "'");
    }
  }
  return c;
}

bool is_newton(const std::string& name) { return name == "newton"; }

// The --opt-set keys of newton, which is no fo::Optimizer.
bool newton_has_option(const std::string& key) {
  return key == "l2" || key == "grad_tol" || key == "max_iters";
}

// newton's config from its --opt-set values; throws UsageError for a bad one.
NewtonConfig newton_config(const std::vector<std::pair<std::string, double>>& options,
                           std::uint64_t seed) {
  NewtonConfig c;
  c.seed = seed;
  for (const auto& [key, v] : options) {
    if (key == "l2") {
      if (!(v > 0) || !std::isfinite(v))
        throw UsageError("newton: l2 must be > 0 (the cross-entropy's Hessian is singular)");
      c.l2 = v;
    } else if (key == "grad_tol") {
      if (!(v >= 0) || !std::isfinite(v)) throw UsageError("newton: grad_tol must be >= 0");
      c.grad_tol = v;
    } else if (key == "max_iters") {
      if (!(v >= 0 && v <= 1e6 && v == std::floor(v)))
        throw UsageError("newton: max_iters must be an integer in [0, 1e6]");
      c.max_steps = static_cast<int>(v);
    } else {
      throw UsageError("newton: no option '" + key + "' (it takes l2, grad_tol and max_iters)");
    }
  }
  return c;
}

bool has_option(const std::string& algorithm, const std::string& key) {
  if (is_newton(algorithm)) return newton_has_option(key);
  try {
    (void)Optimizer(algorithm).option(key);
    return true;
  } catch (const Error&) {
    return false;
  }
}

// The --opt-set values each optimizer takes, in command-line order.
std::vector<std::pair<std::string, double>> options_for(const std::string& algorithm,
                                                        const std::vector<OptSet>& sets) {
  std::vector<std::pair<std::string, double>> out;
  for (const OptSet& s : sets)
    if (s.target == algorithm || (s.target.empty() && has_option(algorithm, s.key)))
      out.emplace_back(s.key, s.value);
  return out;
}

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// One optimizer's progress: a bar redrawn in place on a terminal; elsewhere (a log, a pipe)
// a line every few epochs with each epoch's train loss and test accuracy.
class ProgressPrinter {
 public:
  ProgressPrinter(std::string label, bool tty, int epochs, std::string unit = "epochs")
      : label_(std::move(label)),
        tty_(tty),
        group_(std::max(1, (epochs + 5) / 6)),
        unit_(std::move(unit)) {}

  void operator()(const Progress& p) {
    if (p.finished) {
      last_ = *p.finished;
      have_last_ = true;
    }
    if (tty_) {
      if (p.finished || seconds_since(last_draw_) > 0.05) draw(p);
      return;
    }
    if (!p.finished) return;
    pending_.push_back(*p.finished);
    if (static_cast<int>(pending_.size()) == group_ || p.epoch == p.epochs) flush();
  }

  void finish(const RunResult& r, double seconds) {
    if (tty_) {
      std::printf("  %.2f s%s\n", seconds, r.diverged ? "  diverged" : "");
    } else {
      flush();
      if (r.diverged)
        std::printf("%-16s diverged at epoch %d\n", label_.c_str(), r.history.back().epoch);
    }
    std::fflush(stdout);
  }

 private:
  void draw(const Progress& p) {
    constexpr int kWidth = 24;
    const double done =
        (p.epoch - 1 + static_cast<double>(p.batch) / static_cast<double>(p.batches)) /
        std::max(p.epochs, 1);
    const int fill = static_cast<int>(done * kWidth + 0.5);
    std::string bar(static_cast<std::size_t>(std::clamp(fill, 0, kWidth)), '#');
    bar.resize(kWidth, '.');
    std::printf("\r%-16s [%s] %3d/%-3d", label_.c_str(), bar.c_str(), p.epoch, p.epochs);
    if (have_last_)
      std::printf("  loss %-8s test %5.1f%%", fmt("%.4g", last_.train_loss).c_str(),
                  100 * last_.test_accuracy);
    std::printf("\033[K");
    std::fflush(stdout);
    last_draw_ = Clock::now();
  }

  void flush() {
    if (pending_.empty()) return;
    std::string loss, acc;
    for (const EpochStats& s : pending_) {
      loss += " " + fmt("%-6.3g", s.train_loss);
      acc += " " + fmt("%4.1f", 100 * s.test_accuracy);
    }
    const std::string span =
        std::to_string(pending_.front().epoch) + "-" + std::to_string(pending_.back().epoch);
    std::printf("%-16s %-6s %-6s loss%s  test %%%s\n", label_.c_str(), unit_.c_str(), span.c_str(),
                loss.c_str(), acc.c_str());
    pending_.clear();
    std::fflush(stdout);
  }

  std::string label_;
  bool tty_;
  int group_;
  std::string unit_;
  Clock::time_point last_draw_{};
  EpochStats last_;
  bool have_last_ = false;
  std::vector<EpochStats> pending_;
};

void print_table(const std::vector<RunResult>& results) {
  std::printf("\n%-8s %-9s %9s %11s %10s %9s %10s %7s %6s\n", "model", "optimizer", "lr",
              "train loss", "train acc", "test acc", "step (us)", "steps", "evals");
  const RunResult* newton = nullptr;
  for (const RunResult& r : results) {
    const EpochStats& s = r.history.back();
    const bool nt = is_newton(r.optimizer);
    if (nt) newton = &r;
    std::printf("%-8s %-9s %9s %11s %9.1f%% %8.1f%% %10.2f %7lld %6s\n", r.model.c_str(),
                r.optimizer.c_str(), nt ? "-" : fmt("%.3g", r.lr).c_str(),
                r.diverged ? "diverged" : fmt("%.4g", s.train_loss).c_str(), 100 * s.train_accuracy,
                100 * s.test_accuracy, r.mean_step_us(), static_cast<long long>(r.steps),
                nt ? std::to_string(r.evaluations).c_str() : "-");
  }
  if (!newton) return;
  const RunResult& r = *newton;
  std::printf(
      "\nnewton: damped Newton's method (fusedopt/newton.hpp), full batch, on the mean"
      "\n  cross-entropy + %g/2 |W, b|^2: %d unknowns in double, the exact Hessian. %lld steps,"
      "\n  %lld evaluations (objective, gradient and Hessian: %.1f ms each), max |g| %.1e%s."
      "\n  Its train loss is the cross-entropy alone; its step time is the whole step (%.1f ms:"
      "\n  evaluations and Cholesky solves), the other rows' the optimizer update alone.\n",
      r.l2, (kFeatures + 1) * kClasses, static_cast<long long>(r.steps),
      static_cast<long long>(r.evaluations),
      r.evaluations ? 1e3 * r.eval_seconds / static_cast<double>(r.evaluations) : 0.0, r.grad_norm,
      r.converged ? "" : " (not converged)", r.mean_step_us() / 1e3);
}

void write_history(const std::string& path, const std::vector<RunResult>& results) {
  std::ofstream out(path, std::ios::trunc);
  out << "model,optimizer,epoch,step,train_loss,train_accuracy,test_loss,test_accuracy\n";
  char line[256];
  for (const RunResult& r : results)
    for (const EpochStats& s : r.history) {
      std::snprintf(line, sizeof line, "%s,%s,%d,%lld,%.6g,%.6g,%.6g,%.6g\n", r.model.c_str(),
                    r.optimizer.c_str(), s.epoch, static_cast<long long>(s.step), s.train_loss,
                    s.train_accuracy, s.test_loss, s.test_accuracy);
      out << line;
    }
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path);
}

// Train loss, one line per optimizer, on a log scale. Against the epoch; or, when newton is
// among the runs, against the optimizer steps on a log axis, so that its few steps and the
// first-order methods' hundreds compare in one picture (newton's steps marked).
void write_loss_plot(const std::string& path, ModelKind kind, const std::vector<RunResult>& runs,
                     const std::string& batch_label) {
  const bool by_step = std::any_of(runs.begin(), runs.end(),
                                   [](const RunResult& r) { return is_newton(r.optimizer); });
  // The x of a measurement, or NAN where it has none (step 0 on the log axis).
  auto x_of = [&](const EpochStats& s) {
    if (!by_step) return static_cast<double>(s.epoch);
    return s.step > 0 ? static_cast<double>(s.step) : NAN;
  };
  double lo = INFINITY, hi = 0, x_hi = 1;
  for (const RunResult& r : runs) {
    hi = std::max(hi, r.history.front().train_loss);
    for (const EpochStats& s : r.history) {
      if (std::isfinite(s.train_loss) && s.train_loss > 0) lo = std::min(lo, s.train_loss);
      if (std::isfinite(x_of(s))) x_hi = std::max(x_hi, x_of(s));
    }
  }
  if (!(lo < hi)) lo = hi / 10;
  const Range x_range =
      by_step ? Range{0.7, std::max(10.0, 1.4 * x_hi), true} : Range{0, x_hi, false};
  SvgPlot plot(760, 480, x_range, {lo / 1.5, hi * 1.5, true});
  const std::string title =
      std::string(kind == ModelKind::softmax ? "softmax regression" : "two-layer perceptron") +
      " on digits: train loss, " + batch_label + (by_step ? " (newton: full batch)" : "");
  plot.axes(
      by_step ? "optimizer steps, log scale (newton: one step = one exact-Hessian solve)" : "epoch",
      "train loss (mean cross-entropy)", title);
  std::vector<LegendEntry> legend;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const bool nt = is_newton(runs[i].optimizer);
    std::vector<Point> pts;
    for (const EpochStats& s : runs[i].history)
      if (std::isfinite(x_of(s))) pts.push_back({x_of(s), s.train_loss});
    plot.polyline(pts, svg_color(i), 2);
    if (nt)
      for (const Point& p : pts) plot.marker(p, svg_color(i), 3.5);
    legend.push_back({runs[i].optimizer +
                          (nt ? " (exact Hessian, L2 " + fmt("%g", runs[i].l2) + ")" : "") +
                          (runs[i].diverged ? " (diverged)" : ""),
                      svg_color(i)});
  }
  if (by_step && !runs.empty()) {
    // Step 0 has no place on the log axis: say where every run starts.
    const double start = runs.front().history.front().train_loss;
    if (std::isfinite(start) && start > 0)
      plot.text({0.75, start}, "every run starts at " + fmt("%.3g", start) + " (step 0)", 11,
                "start", "#555");
  }
  plot.legend(legend);
  plot.save(path);
}

// `fusedopt-demo train`'s newton row: progress in lines of steps, then how it stopped.
RunResult run_newton(const NewtonConfig& config, const Split& split, bool tty) {
  const std::string label = "softmax newton";
  if (tty) {
    std::printf("%-16s %d unknowns, exact Hessian ...", label.c_str(), (kFeatures + 1) * kClasses);
    std::fflush(stdout);
  }
  const auto t0 = Clock::now();
  RunResult r = newton_run(config, split);
  const double seconds = seconds_since(t0);
  if (tty) std::printf("\r\033[K");
  const int steps = static_cast<int>(r.steps);
  ProgressPrinter progress(label, false, 30, "steps");  // as for 30 epochs: 5 steps a line
  for (std::size_t k = 1; k < r.history.size(); ++k)
    progress({static_cast<int>(k), steps, 1, 1, &r.history[k]});
  std::printf("%-16s %s: max |g| %.1e after %d steps, %lld evaluations, %.2f s (%s, double)\n",
              label.c_str(), r.converged ? "converged" : "stopped", r.grad_norm, steps,
              static_cast<long long>(r.evaluations), seconds,
              config.device == Device::cuda ? "solves in cuSOLVER" : "cpu");
  std::fflush(stdout);
  return r;
}

}  // namespace

int run_train(int argc, char** argv) {
  Cli cli;
  try {
    cli = parse_cli(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr,
                 "fusedopt-demo train: %s\n(fusedopt-demo train --help lists the options)\n",
                 e.what());
    return 2;
  }
  if (cli.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }

  try {
    Device device = Device::cpu;
    if (cli.device == "cuda" || (cli.device == "auto" && fo::cuda_device_count() > 0))
      device = Device::cuda;
    if (device == Device::cuda && fo::cuda_device_count() == 0)
      throw std::runtime_error("--device cuda: no CUDA device (or fusedopt built without CUDA)");

    // Every optimizer and option is checked before any training starts.
    std::vector<std::vector<std::pair<std::string, double>>> options;
    for (const OptSet& s : cli.sets) {
      bool used = false;
      for (const std::string& name : cli.optimizers)
        used = used || s.target == name || (s.target.empty() && has_option(name, s.key));
      if (!used)
        throw UsageError("--opt-set " + (s.target.empty() ? "" : s.target + ".") + s.key +
                         ": no optimizer in the list takes it");
    }
    for (const std::string& name : cli.optimizers) {
      options.push_back(options_for(name, cli.sets));
      if (is_newton(name)) {
        (void)newton_config(options.back(), cli.seed);  // throws UsageError for a bad value
        continue;
      }
      try {
        Optimizer probe(name, device);
        for (const auto& [key, value] : demo_defaults(name)) probe.set_option(key, value);
        for (const auto& [key, value] : options.back()) probe.set_option(key, value);
      } catch (const Error& e) {
        std::string what = e.what();  // the library's messages mostly name the algorithm
        if (what.rfind("unknown algorithm", 0) == 0) what += "; or newton, the demo's own";
        throw UsageError(what.rfind(name + ":", 0) == 0 ? what : name + ": " + what);
      }
    }
    std::optional<Schedule> schedule;
    if (cli.schedule) {
      try {
        schedule = parse_schedule(*cli.schedule);
      } catch (const std::exception& e) {
        throw UsageError(std::string("--schedule: ") + e.what());
      }
    }

    const bool only_newton = std::all_of(cli.optimizers.begin(), cli.optimizers.end(), is_newton);
    if (only_newton && cli.models == std::vector<ModelKind>{ModelKind::mlp})
      throw UsageError("newton runs on the softmax model only: nothing to train on the mlp");

    const Dataset all = load_digits(cli.data);
    const Split split = split_dataset(all, 360, cli.seed);
    const bool tty = isatty(fileno(stdout)) != 0;
    const std::string batch_label =
        cli.batch == 0 ? "full batch" : "batch " + std::to_string(cli.batch);
    std::printf("digits: %zu train / %zu test examples (%s)\n", split.train.size(),
                split.test.size(), cli.data.c_str());
    std::printf("%d epochs, %s, models and optimizer steps on %s%s\n\n", cli.epochs,
                batch_label.c_str(), device == Device::cuda ? "cuda (cuBLAS)" : "the cpu",
                cli.schedule ? (", lr schedule " + *cli.schedule).c_str() : "");
    std::fflush(stdout);

    std::vector<RunResult> results;
    for (ModelKind kind : cli.models) {
      for (std::size_t k = 0; k < cli.optimizers.size(); ++k) {
        if (is_newton(cli.optimizers[k])) {
          if (kind == ModelKind::softmax) {
            NewtonConfig config = newton_config(options[k], cli.seed);
            config.device = device;
            results.push_back(run_newton(config, split, tty));
          } else {
            std::size_t unknowns = 0;
            const Model<float> mlp({kind, cli.hidden});
            for (const TensorSlice& t : mlp.tensors()) unknowns += t.numel;
            std::printf(
                "%-16s skipped: the mlp's loss is not convex (an indefinite Hessian) and its "
                "%zu x %zu Hessian is too large; newton runs on the softmax model\n",
                (std::string(model_name(kind)) + " newton").c_str(), unknowns, unknowns);
          }
          continue;
        }
        TrainConfig c;
        c.model = {kind, cli.hidden, cli.activation};
        c.optimizer = cli.optimizers[k];
        c.options = options[k];
        c.epochs = cli.epochs;
        c.batch = cli.batch;
        c.seed = cli.seed;
        c.device = device;
        if (schedule)
          c.lr_at = [&s = *schedule](std::int64_t step) { return scheduled_lr(s, step); };
        ProgressPrinter progress(std::string(model_name(kind)) + " " + c.optimizer, tty, c.epochs);
        const auto t0 = Clock::now();
        results.push_back(train_run(c, split, std::ref(progress)));
        progress.finish(results.back(), seconds_since(t0));
      }
    }
    print_table(results);

    std::filesystem::create_directories(cli.out);
    const std::string history = (std::filesystem::path(cli.out) / "history.csv").string();
    write_history(history, results);
    std::vector<std::string> svgs;
    for (ModelKind kind : cli.models) {
      std::vector<RunResult> runs;
      for (const RunResult& r : results)
        if (r.model == model_name(kind)) runs.push_back(r);
      if (runs.empty()) continue;
      svgs.push_back(
          (std::filesystem::path(cli.out) / ("loss_" + std::string(model_name(kind)) + ".svg"))
              .string());
      write_loss_plot(svgs.back(), kind, runs, batch_label);
    }
    std::printf("\nper-epoch numbers: %s\nloss curves:\n", history.c_str());
    for (const std::string& s : svgs) std::printf("  %s\n", s.c_str());
    return 0;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "fusedopt-demo train: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fusedopt-demo train: %s\n", e.what());
    return 1;
  }
}

}  // namespace fo::demo
