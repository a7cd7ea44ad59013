// What `fusedopt-demo train` shows of its runs (report.cpp): progress while an optimizer
// trains, the table of results, the per-epoch numbers as CSV and the loss curves as SVG.
//
//   fo::demo::ProgressPrinter progress("softmax adam", /*tty=*/false, config.epochs);
//   results.push_back(fo::demo::train_run(config, split, std::ref(progress)));
//   progress.finish(results.back(), seconds);
//   fo::demo::print_table(results);
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "model.hpp"
#include "train.hpp"

namespace fo::demo {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// One optimizer's progress, given to train_run as its on_progress: a bar redrawn in place on
/// a terminal; elsewhere (a log, a pipe) a line every few epochs with each epoch's train loss
/// and test accuracy.
class ProgressPrinter {
 public:
  /// `unit` names what the lines count, in the singular ("epoch"; "step" for newton).
  ProgressPrinter(std::string label, bool tty, int epochs, std::string unit = "epoch");

  void operator()(const Progress& p);
  /// The run's last line: its time on a terminal, else what is left and whether it diverged.
  void finish(const RunResult& r, double seconds);

 private:
  void draw(const Progress& p);
  void flush();

  std::string label_;
  bool tty_;
  int group_;
  std::string unit_;
  Clock::time_point last_draw_{};
  EpochStats last_;
  bool have_last_ = false;
  std::vector<EpochStats> pending_;
};

/// The results table on stdout: one row per run, then a paragraph on newton's row if any.
void print_table(const std::vector<RunResult>& results);

/// Every run's history as CSV, one line per model, optimizer and epoch. Throws
/// std::runtime_error if the file cannot be written.
void write_history(const std::string& path, const std::vector<RunResult>& results);

/// The train loss of `runs` (all of one model), one line per optimizer on a log scale: against
/// the epoch, or against the optimizer steps on a log axis when newton is among them.
void write_loss_plot(const std::string& path, ModelKind kind, const std::vector<RunResult>& runs,
                     const std::string& batch_label);

/// Whether the file at `path` is a plot that write_loss_plot wrote (in this run or an earlier
/// one): the demo removes only its own files.
bool is_loss_plot(const std::string& path);

}  // namespace fo::demo
