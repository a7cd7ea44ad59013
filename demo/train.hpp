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
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data.hpp"
#include "fusedopt/optimizer.hpp"
#include "fusedopt/types.hpp"
#include "model.hpp"

namespace fo::demo {

/// The optimizers `train` compares unless told otherwise: six of fusedopt's first-order
/// algorithms, "muon+adamw" (the mlp only: Mix) and "newton" (newton_run; the softmax model
/// only).
const std::vector<std::string>& default_optimizers();

/// The options the demo sets before the user's: 10x the library's default lr, a rule that
/// suits this problem for every registered algorithm but two (sgd: lr 0.1 and momentum 0.9;
/// rmsprop: its default lr). A newly registered algorithm needs no entry here.
std::vector<std::pair<std::string, double>> demo_defaults(const std::string& algorithm);

/// An optimizer name "A+B" ("muon+adamw"): one fo::Optimizer in which algorithm A steps the
/// weight matrices of the hidden layers and B the output layer's and every bias, as Muon's
/// users split a model (the output layer is a classifier head, left to AdamW).
struct Mix {
  std::string hidden, rest;
};
/// The mix `optimizer` names, or nullopt for a plain algorithm name.
std::optional<Mix> mix_of(const std::string& optimizer);
/// The optimizer `name` (an algorithm or a mix) with the demo's defaults set: a mix's B
/// options as "B.key" (fo::Optimizer's key for a second algorithm).
Optimizer make_optimizer(const std::string& name, Device device);
/// The algorithm that steps tensor i of `model` under optimizer `name` ("": the optimizer's
/// own); throws std::invalid_argument for a mix on a model without hidden layers.
std::string tensor_algorithm(const std::string& name, const std::vector<TensorSlice>& tensors,
                             std::size_t i);

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
  int epoch = 0;          // 0: before the first step (newton_run: the Newton step)
  std::int64_t step = 0;  // optimizer steps taken when it was measured
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
  // newton_run only (step_seconds then times the whole of fo::newton_minimize):
  std::int64_t evaluations = 0;  // of the objective with its Hessian, the start point included
  double l2 = 0;                 // the L2 coefficient of the objective
  double objective = 0;          // at the end: mean cross-entropy + (l2 / 2) |theta|^2
  double grad_norm = 0;          // at the end: max |g| of the objective
  bool converged = false;        // grad_norm <= NewtonConfig::grad_tol
  double eval_seconds = 0;       // in the objective (gradient and Hessian), of step_seconds
  double mean_step_us() const {
    return steps ? 1e6 * step_seconds / static_cast<double>(steps) : 0;
  }
};

/// Trains one model with one optimizer. Params and gradients are float32 on the CPU; with
/// Device::cuda (a CUDA build) the model runs on the GPU (CudaModel, model_cuda.hpp) from the
/// same initialisation, on the training set copied there once, and params and gradients stay
/// in device memory, where the optimizer steps them; the params come back once an epoch for
/// the CPU model's evaluation. Throws fo::Error for a bad optimizer option.
RunResult train_run(const TrainConfig& config, const Split& data,
                    const std::function<void(const Progress&)>& on_progress = {});

/// Damped Newton's method (fusedopt/newton.hpp) on softmax regression.
struct NewtonConfig {
  double l2 = 1e-4;             // the objective's (l2 / 2) |theta|^2, weights and biases; > 0
  double grad_tol = 1e-8;       // stop when max |g| <= grad_tol (fo::NewtonOptions::grad_tol)
  int max_steps = 100;          // accepted Newton steps at most
  std::uint64_t seed = 1;       // the initialisation: the same start as train_run's softmax model
  Device device = Device::cpu;  // where the damped systems are solved (cuda: cuSOLVER)
};

/// Minimises softmax_objective over the whole training set, 650 unknowns in double with the
/// exact Hessian, from Model<float>::init(seed) (the first-order runs' start). The result's
/// history is the start, then one entry per accepted step (epoch = step = the step's number),
/// evaluated as train_run's are (train_loss is the mean cross-entropy, without the L2 term).
/// Throws std::invalid_argument for an invalid config (fo::Error from newton_minimize).
RunResult newton_run(const NewtonConfig& config, const Split& data);

/// Whether `optimizer` names the demo's own "newton" (newton_run) rather than a fusedopt
/// algorithm.
bool is_newton(const std::string& optimizer);

/// `fusedopt-demo train [options]` (train_cli.cpp); argv[0] is "train". Returns the exit status.
int run_train(int argc, char** argv);

}  // namespace fo::demo
