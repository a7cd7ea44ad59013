// Learning-rate schedules: the lr of the t-th optimizer step as a pure function of t, written
// once for the host and the device (FO_HOST_DEVICE): no allocation, no exceptions, no state.
//
// Steps count from 1: schedule_lr(s, t) is the lr the t-th step uses. A PyTorch scheduler
// stepped once after every optimizer step (`opt.step(); sched.step()`) hands step t its
// value at last_epoch = t - 1, so every formula below is PyTorch's at e = t - 1, evaluated
// in double in the order of PyTorch's closed forms. With glibc's cos and pow (which CPython
// calls too), step, exponential, cosine, cyclic, one_cycle and linear_warmup give PyTorch's
// closed-form values bit for bit (PyTorch's default recursive updates of StepLR,
// ExponentialLR and CosineAnnealingLR drift from those in the last bits); the device's cos
// and pow may differ from the host's in the last bit of a double.
//
//   kind           lr at step t (e = t - 1)                       PyTorch equivalent
//   constant       lr                                              (none needed)
//   step           lr * gamma^floor(e / step_size)                 StepLR
//   exponential    lr * gamma^e                                    ExponentialLR
//   cosine         min_lr + (lr - min_lr) (1 + cos(pi min(e, total) / total)) / 2
//                                                                  CosineAnnealingLR(T_max=total)
//   linear_warmup  lr * min(1, t / warmup)                         LambdaLR(min(1, (e+1)/warmup))
//   warmup_cosine  t <= warmup: lr * t / warmup; then cosine from lr to min_lr with
//                  T_max = total - warmup at index t - 1 - warmup  SequentialLR([LinearLR(1/warmup,
//                                                   1, warmup-1), CosineAnnealingLR], [warmup])
//   cyclic         min_lr + (max_lr - min_lr) * tri(e), tri rising 0 -> 1 over step_size
//                  steps and falling back over the next step_size  CyclicLR('triangular')
//   one_cycle      cos warmup from max_lr/div_factor to max_lr at e = pct_start*total - 1,
//                  then cos annealing to max_lr/div_factor/final_div_factor at e = total - 1
//                                                                  OneCycleLR(anneal 'cos')
//
// Past the end of a finite schedule the lr stays at its final value: cosine and
// warmup_cosine hold min_lr from step total + 1 on (PyTorch's cosine formula would rise
// again), one_cycle holds its final lr after step total (where PyTorch raises). Steps below 1
// are taken as step 1. Where PyTorch's OneCycleLR divides by zero (a phase of zero length,
// e.g. pct_start * total == 1), the empty phase is skipped.
//
// schedule_lr assumes a valid schedule (fo::validate_schedule in fusedopt/schedule.hpp); an
// invalid one gives a meaningless value but never an integer division by zero.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/kernels/config.hpp"

namespace fo {

/// Schedule kinds; the numbering is stable (it may be stored).
enum class ScheduleKind : int {
  constant = 0,
  step = 1,
  exponential = 2,
  cosine = 3,
  linear_warmup = 4,
  warmup_cosine = 5,
  cyclic = 6,
  one_cycle = 7,
};

/// A schedule: its kind and every kind's parameters (each kind reads only its own; the
/// defaults are PyTorch's). Plain data, trivially copyable: passed by value to a kernel.
struct Schedule {
  ScheduleKind kind = ScheduleKind::constant;
  double lr = 0.0;                // constant, step, exponential, cosine, *warmup*: base/peak lr
  double min_lr = 0.0;            // cosine, warmup_cosine: final lr; cyclic: lowest lr
  double max_lr = 0.0;            // cyclic, one_cycle: highest lr
  double gamma = 0.1;             // step, exponential: decay factor
  double pct_start = 0.3;         // one_cycle: fraction of total spent rising
  double div_factor = 25.0;       // one_cycle: initial lr = max_lr / div_factor
  double final_div_factor = 1e4;  // one_cycle: final lr = initial lr / final_div_factor
  std::int64_t step_size = 2000;  // step: steps per decay; cyclic: steps per half cycle
  std::int64_t total = 0;         // cosine, warmup_cosine, one_cycle: length in steps
  std::int64_t warmup = 0;        // linear_warmup, warmup_cosine: steps of linear warmup
};
static_assert(std::is_trivially_copyable<Schedule>::value, "Schedule is passed to kernels");
static_assert(std::is_standard_layout<Schedule>::value, "Schedule is plain data");

namespace detail {

constexpr double kSchedulePi = 3.14159265358979323846;  // Python's math.pi

/// CosineAnnealingLR's closed form at index e of T_max = t_max, held at eta_min from
/// e = t_max on (where the formula gives eta_min exactly; a zero-length cosine is at its end).
FO_HOST_DEVICE double cosine_anneal(double base, double eta_min, std::int64_t e,
                                    std::int64_t t_max) {
  if (t_max <= 0 || e >= t_max) return eta_min;
  return eta_min +
         (base - eta_min) *
             (1.0 + cos(kSchedulePi * static_cast<double>(e) / static_cast<double>(t_max))) / 2.0;
}

/// OneCycleLR's _annealing_cos: from `start` at pct = 0 to `end` at pct = 1.
FO_HOST_DEVICE double anneal_cos(double start, double end, double pct) {
  const double cos_out = cos(kSchedulePi * pct) + 1.0;
  return end + (start - end) / 2.0 * cos_out;
}

}  // namespace detail

/// The lr of the `step`-th optimizer step (step >= 1; smaller values are taken as 1).
FO_HOST_DEVICE double schedule_lr(const Schedule& s, std::int64_t step) {
  const std::int64_t t = step < 1 ? 1 : step;
  const std::int64_t e = t - 1;  // PyTorch's last_epoch when step t runs
  switch (s.kind) {
    case ScheduleKind::constant: return s.lr;
    case ScheduleKind::step: {
      const std::int64_t size = s.step_size > 0 ? s.step_size : 1;
      return s.lr * pow(s.gamma, static_cast<double>(e / size));
    }
    case ScheduleKind::exponential: return s.lr * pow(s.gamma, static_cast<double>(e));
    case ScheduleKind::cosine: return detail::cosine_anneal(s.lr, s.min_lr, e, s.total);
    case ScheduleKind::linear_warmup:
      if (t >= s.warmup) return s.lr;
      return s.lr * (static_cast<double>(t) / static_cast<double>(s.warmup));
    case ScheduleKind::warmup_cosine:
      if (t <= s.warmup) return s.lr * (static_cast<double>(t) / static_cast<double>(s.warmup));
      return detail::cosine_anneal(s.lr, s.min_lr, t - 1 - s.warmup, s.total - s.warmup);
    case ScheduleKind::cyclic: {
      // CyclicLR's own arithmetic (total_size = 2 * step_size, step_ratio = 0.5), so that the
      // values are PyTorch's bit for bit.
      const double size = 2.0 * static_cast<double>(s.step_size > 0 ? s.step_size : 1);
      const double cycle = floor(1.0 + static_cast<double>(e) / size);
      const double x = 1.0 + static_cast<double>(e) / size - cycle;
      const double scale = x <= 0.5 ? x / 0.5 : (x - 1.0) / (0.5 - 1.0);
      return s.min_lr + (s.max_lr - s.min_lr) * scale;
    }
    case ScheduleKind::one_cycle: {
      const double initial_lr = s.max_lr / s.div_factor;
      const double final_lr = initial_lr / s.final_div_factor;
      const std::int64_t last = s.total - 1;  // PyTorch raises past it; we hold the end
      const double x = static_cast<double>(e < last ? e : last);
      const double end_up = s.pct_start * static_cast<double>(s.total) - 1.0;
      if (x <= end_up && end_up > 0.0) return detail::anneal_cos(initial_lr, s.max_lr, x / end_up);
      const double length = static_cast<double>(last) - end_up;
      const double pct = length > 0.0 ? (x - end_up) / length : 1.0;
      return detail::anneal_cos(s.max_lr, final_lr, pct);
    }
  }
  return s.lr;  // unreachable for a valid kind
}

}  // namespace fo
