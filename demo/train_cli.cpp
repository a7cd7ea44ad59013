// `fusedopt-demo train`: its options, checked before any training starts; then each model
// trained with each optimizer (train.cpp) and the results reported (report.cpp).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "fusedopt/optimizer.hpp"
#include "fusedopt/schedule.hpp"
#include "report.hpp"
#include "train.hpp"

namespace fo::demo {

namespace {

const char kUsage[] = R"(usage: fusedopt-demo train [options]

Trains softmax regression and a two-layer perceptron on the UCI handwritten digits (1797
8x8 images: 1437 to train, 360 to test) with each optimizer, and compares them: final loss,
test accuracy, time per optimizer step, and the loss curves as SVG.

options:
  --optimizers LIST    comma-separated (default: sgd,rmsprop,adagrad,adam,adamw,lion,
                       muon+adamw,newton); any fusedopt algorithm; A+B, one optimizer in
                       which A steps the hidden layers' weight matrices and B the output
                       layer and the biases (the mlp only; B's options as
                       muon+adamw.adamw.lr=...); and newton: damped Newton's method
                       with the exact Hessian, on the softmax model only (full batch, in
                       double on the CPU; it ignores --epochs, --batch and --schedule and
                       takes newton.l2 (default 1e-4), newton.grad_tol (1e-8) and
                       newton.max_iters (100))
  --opt-set KEY=VALUE  an fo::Optimizer option for every listed optimizer that has it;
                       NAME.KEY=VALUE for one optimizer (repeatable; e.g. adam.lr=0.01,
                       weight_decay=1e-4, max_grad_norm=1). Unless set here, each
                       optimizer's lr is 10x the library's default (sgd: 0.1 with
                       momentum 0.9; rmsprop: its default, 0.01)
  --model M            softmax, mlp or both (default both)
  --hidden N           width of the mlp's hidden layer (default 64)
  --activation A       tanh or relu (default tanh)
  --epochs N           passes over the training set (default 30)
  --batch N|full       examples per step: 1, 32 (default), ..., or full for full batch;
                       an N above the training set's size (1437) is rejected
  --schedule SPEC      an lr schedule, e.g. warmup_cosine:lr=3e-3,warmup=100,total=1350
                       (fusedopt/schedule.hpp lists the kinds); its lr replaces every
                       listed optimizer's lr, step by step
  --device D           cpu, cuda or auto (default auto: cuda when a GPU is present); on
                       cuda the models run in cuBLAS and the optimizers step device memory
  --seed N             the split, the initialisation and the batch order (default 1)
  --data FILE          the digits file, CSV, gzipped or not (default: the source tree's
                       demo/data/digits.csv.gz)
  --out DIR            where history.csv and loss_<model>.svg go (default
                       ./fusedopt-demo-out); an earlier run's plot of a model this run
                       does not train is removed
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
    (void)make_optimizer(algorithm, Device::cpu).option(key);
    return true;
  } catch (const std::exception&) {
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
  ProgressPrinter progress(label, false, 30, "step");  // as for 30 epochs: 5 steps a line
  for (std::size_t k = 1; k < r.history.size(); ++k)
    progress({static_cast<int>(k), steps, 1, 1, &r.history[k]});
  std::printf("%-16s %s: max |g| %.1e after %d steps, %lld evaluations, %.2f s (%s, double)\n",
              label.c_str(), r.converged ? "converged" : "stopped", r.grad_norm, steps,
              static_cast<long long>(r.evaluations), seconds,
              config.device == Device::cuda ? "solves in cuSOLVER" : "cpu");
  std::fflush(stdout);
  return r;
}

using OptionList = std::vector<std::pair<std::string, double>>;

// Each listed optimizer's --opt-set values, every one checked on an optimizer built with
// them (and newton's config), so that no run fails half way. Throws UsageError.
std::vector<OptionList> checked_options(const Cli& cli, Device device) {
  for (const OptSet& s : cli.sets) {
    bool used = false;
    for (const std::string& name : cli.optimizers)
      used = used || s.target == name || (s.target.empty() && has_option(name, s.key));
    if (!used)
      throw UsageError("--opt-set " + (s.target.empty() ? "" : s.target + ".") + s.key +
                       ": no optimizer in the list takes it");
  }
  std::vector<OptionList> options;
  for (const std::string& name : cli.optimizers) {
    options.push_back(options_for(name, cli.sets));
    if (is_newton(name)) {
      (void)newton_config(options.back(), cli.seed);  // throws UsageError for a bad value
      continue;
    }
    try {
      Optimizer probe = make_optimizer(name, device);
      for (const auto& [key, value] : options.back()) probe.set_option(key, value);
    } catch (const std::invalid_argument& e) {  // a malformed mix
      throw UsageError(e.what());
    } catch (const Error& e) {
      std::string what = e.what();  // the library's messages mostly name the algorithm
      if (what.rfind("unknown algorithm", 0) == 0) what += "; or newton, the demo's own";
      throw UsageError(what.rfind(name + ":", 0) == 0 ? what : name + ": " + what);
    }
  }
  return options;
}

// The digits, split, with --data and --batch checked against them. Throws UsageError.
Split load_split(const Cli& cli) {
  if (std::filesystem::is_directory(cli.data)) {
    const std::filesystem::path inside = std::filesystem::path(cli.data) / "digits.csv.gz";
    throw UsageError("--data " + cli.data +
                     " is a directory; --data takes the digits file itself (CSV, gzipped or "
                     "not): " +
                     (std::filesystem::is_regular_file(inside)
                          ? "use --data " + inside.string()
                          : "digits.csv.gz (the source tree's copy: " + default_data_path() + ")"));
  }
  Split split = split_dataset(load_digits(cli.data), 360, cli.seed);
  if (cli.batch > split.train.size())
    throw UsageError("--batch " + std::to_string(cli.batch) + ": the training set has only " +
                     std::to_string(split.train.size()) +
                     " examples (--batch full takes them all in every step)");
  return split;
}

// Every model with every optimizer, in command-line order, with progress on stdout.
std::vector<RunResult> train_all(const Cli& cli, const std::vector<OptionList>& options,
                                 const std::optional<Schedule>& schedule, const Split& split,
                                 Device device, bool tty) {
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
      const std::string label = std::string(model_name(kind)) + " " + cli.optimizers[k];
      if (mix_of(cli.optimizers[k])) {
        const Model<float> model({kind, cli.hidden, cli.activation});
        try {
          (void)tensor_algorithm(cli.optimizers[k], model.tensors(), 0);
        } catch (const std::invalid_argument&) {
          std::printf(
              "%-16s skipped: the %s model has no hidden layer (its one matrix is the "
              "output layer, which the mix leaves to %s)\n",
              label.c_str(), model_name(kind), mix_of(cli.optimizers[k])->rest.c_str());
          continue;
        }
      }
      TrainConfig c;
      c.model = {kind, cli.hidden, cli.activation};
      c.optimizer = cli.optimizers[k];
      c.options = options[k];
      c.epochs = cli.epochs;
      c.batch = cli.batch;
      c.seed = cli.seed;
      c.device = device;
      if (schedule) c.lr_at = [&s = *schedule](std::int64_t step) { return scheduled_lr(s, step); };
      ProgressPrinter progress(label, tty, c.epochs);
      const auto t0 = Clock::now();
      results.push_back(train_run(c, split, std::ref(progress)));
      progress.finish(results.back(), seconds_since(t0));
    }
  }
  return results;
}

// history.csv and a loss plot per model trained, then their paths on stdout. A plot of a
// model this run did not train is an earlier run's and would pass for this one's beside the
// new history.csv: removed if it is the demo's own, else named.
void write_outputs(const Cli& cli, const std::vector<RunResult>& results,
                   const std::string& batch_label) {
  const std::string history = (std::filesystem::path(cli.out) / "history.csv").string();
  write_history(history, results);
  std::vector<std::string> svgs, notes;
  for (ModelKind kind : {ModelKind::softmax, ModelKind::mlp}) {
    const std::string model = model_name(kind);
    const std::string path = (std::filesystem::path(cli.out) / ("loss_" + model + ".svg")).string();
    std::vector<RunResult> runs;
    for (const RunResult& r : results)
      if (r.model == model) runs.push_back(r);
    if (!runs.empty()) {
      write_loss_plot(path, kind, runs, batch_label);
      svgs.push_back(path);
    } else if (std::filesystem::exists(path)) {
      notes.push_back(is_loss_plot(path) && std::filesystem::remove(path)
                          ? "removed " + path + ", an earlier run's plot (this run trained no " +
                                model + " model)"
                          : "note: " + path +
                                " is not this run's, nor a plot of this demo's: left as it is");
    }
  }
  std::printf("\nper-epoch numbers: %s\nloss curves:\n", history.c_str());
  for (const std::string& s : svgs) std::printf("  %s\n", s.c_str());
  for (const std::string& s : notes) std::printf("%s\n", s.c_str());
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

    // Everything is checked before any training starts: options, data, the output directory.
    const std::vector<OptionList> options = checked_options(cli, device);
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
    const Split split = load_split(cli);
    prepare_out_dir(cli.out);  // before the training, whose results would be lost after

    const bool tty = isatty(fileno(stdout)) != 0;
    const std::string batch_label =
        cli.batch == 0 ? "full batch" : "batch " + std::to_string(cli.batch);
    std::printf("digits: %zu train / %zu test examples (%s)\n", split.train.size(),
                split.test.size(), cli.data.c_str());
    std::printf("%d epoch%s, %s, models and optimizer steps on %s%s\n\n", cli.epochs,
                cli.epochs == 1 ? "" : "s", batch_label.c_str(),
                device == Device::cuda ? "cuda (cuBLAS)" : "the cpu",
                cli.schedule ? (", lr schedule " + *cli.schedule).c_str() : "");
    std::fflush(stdout);

    const std::vector<RunResult> results = train_all(cli, options, schedule, split, device, tty);
    print_table(results);
    write_outputs(cli, results, batch_label);
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
