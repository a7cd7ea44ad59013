// What `fusedopt-demo train` shows of its runs: the progress lines, the table of results,
// history.csv and the loss curves as SVG.
#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "svg.hpp"

namespace fo::demo {

namespace {

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// In every loss plot's title: how is_loss_plot knows the demo's own.
const char kLossPlotMark[] = " on digits: train loss";

}  // namespace

ProgressPrinter::ProgressPrinter(std::string label, bool tty, int epochs, std::string unit)
    : label_(std::move(label)),
      tty_(tty),
      group_(std::max(1, (epochs + 5) / 6)),
      unit_(std::move(unit)) {}

void ProgressPrinter::operator()(const Progress& p) {
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

void ProgressPrinter::finish(const RunResult& r, double seconds) {
  if (tty_) {
    std::printf("  %.2f s%s\n", seconds, r.diverged ? "  diverged" : "");
  } else {
    flush();
    if (r.diverged)
      std::printf("%-16s diverged at epoch %d\n", label_.c_str(), r.history.back().epoch);
  }
  std::fflush(stdout);
}

void ProgressPrinter::draw(const Progress& p) {
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

void ProgressPrinter::flush() {
  if (pending_.empty()) return;
  std::string loss, acc;
  for (const EpochStats& s : pending_) {
    loss += " " + fmt("%-6.3g", s.train_loss);
    acc += " " + fmt("%4.1f", 100 * s.test_accuracy);
  }
  // "epoch 3" for one, "epochs 1-5" for a group.
  const int first = pending_.front().epoch, last = pending_.back().epoch;
  const std::string unit = first == last ? unit_ : unit_ + "s";
  const std::string span =
      first == last ? std::to_string(first) : std::to_string(first) + "-" + std::to_string(last);
  std::printf("%-16s %-6s %-6s loss%s  test %%%s\n", label_.c_str(), unit.c_str(), span.c_str(),
              loss.c_str(), acc.c_str());
  pending_.clear();
  std::fflush(stdout);
}

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
      kLossPlotMark + ", " + batch_label + (by_step ? " (newton: full batch)" : "");
  plot.axes(
      by_step ? "optimizer steps, log scale (newton: one step = one exact-Hessian solve)" : "epoch",
      "train loss (mean cross-entropy)", title);
  std::vector<LegendEntry> legend;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const bool nt = is_newton(runs[i].optimizer);
    std::vector<Point> pts;
    for (const EpochStats& s : runs[i].history)
      if (std::isfinite(x_of(s))) pts.push_back({x_of(s), s.train_loss});
    plot.polyline(pts, svg_color(i), 2, svg_dash(i));
    if (nt)
      for (const Point& p : pts) plot.marker(p, svg_color(i), 3.5);
    legend.push_back({runs[i].optimizer +
                          (nt ? " (exact Hessian, L2 " + fmt("%g", runs[i].l2) + ")" : "") +
                          (runs[i].diverged ? " (diverged)" : ""),
                      svg_color(i), svg_dash(i), nt});
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

bool is_loss_plot(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string svg{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  return svg.rfind("<?xml", 0) == 0 && svg.find(kLossPlotMark) != std::string::npos;
}

}  // namespace fo::demo
