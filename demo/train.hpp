// Training the demo's models with fo::Optimizer, and `fusedopt-demo train`, which compares
// optimizers on the digits data: progress, a table, loss curves as SVG.
//
//   fo::demo::TrainConfig c;
//   c.model.kind = fo::demo::ModelKind::softmax;
//   c.optimizer = "adam";
//   fo::demo::RunResult r = fo::demo::train_run(c, split);   // r.history.back().test_accuracy
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "data.hpp"
#include "fusedopt/types.hpp"
#include "model.hpp"

namespace fo::demo {

/// The optimizers `train` compares unless told otherwise.
const std::vector<std::string>& default_optimizers();

/// The options the demo sets before the user's: an lr tuned for this problem (and momentum
/// 0.9 for sgd). Algorithms it has no tuning for keep the library's defaults.
std::vector<std::pair<std::string, double>> demo_defaults(const std::string& algorithm);

struct TrainConfig {
  ModelSpec model;
  std::string optimizer = "adam";
  /// Passed to fo::Optimizer::set_option in order, after demo_defaults(optimizer).
  std::vector<std::pair<std::string, double>> options;
  int epochs = 30;
  std::size_t batch = 32;  // 0: the whole training set
  std::uint64_t seed = 1;  // init and batch order (the split has its own)
  Device device = Device::cpu;
  /// When set, set_option("lr", lr_at(t)) before the t-th step (t counts from 1, as
  /// fo::scheduled_lr does).
  std::function<double(std::int64_t)> lr_at;
};

struct EpochStats {
  int epoch = 0;  // 0: before the first step
  double train_loss = 0, train_accuracy = 0;
  double test_loss = 0, test_accuracy = 0;
};

struct Progress {
  int epoch = 0;  // the epoch in progress, from 1
  int epochs = 0;
  std::size_t batch = 0;  // batches done in this epoch
  std::size_t batches = 0;
  const EpochStats* finished = nullptr;  // set when an epoch has just been evaluated
};

struct RunResult {
  std::string model;
  std::string optimizer;
  double lr = 0;                    // at the first step
  std::vector<EpochStats> history;  // history[0] is before training
  std::int64_t steps = 0;
  double step_seconds = 0;  // summed over opt.step calls only
  bool diverged = false;    // the train loss became inf or nan; training stopped
  double mean_step_us() const {
    return steps ? 1e6 * step_seconds / static_cast<double>(steps) : 0;
  }
};

/// Trains one model with one optimizer. Params and gradients are float32 on the CPU; with
/// Device::cuda (a CUDA build) they are copied to device memory around each step, which the
/// optimizer takes there. Throws fo::Error for a bad optimizer option.
RunResult train_run(const TrainConfig& config, const Split& data,
                    const std::function<void(const Progress&)>& on_progress = {});

/// `fusedopt-demo train [options]`; argv[0] is "train". Returns the exit status.
int run_train(int argc, char** argv);

}  // namespace fo::demo
