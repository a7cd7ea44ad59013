// Learning-rate schedules: the lr of each optimizer step as a pure function of the step
// (fusedopt/kernels/schedule.hpp has the formulas, PyTorch's lr_scheduler semantics).
//
//   const fo::Schedule s = fo::parse_schedule("warmup_cosine:lr=3e-4,warmup=100,total=5000");
//   for (std::int64_t t = 1; t <= 5000; ++t) {
//     opt.set_option("lr", fo::scheduled_lr(s, t));  // the lr of the t-th step
//     opt.step(grads);
//   }
//
// Spec syntax: `kind:key=value,key=value,...` (spaces around names and values are ignored;
// integers may be written 1e4). Kinds and their keys (required, [optional = default]):
//
//   constant       lr
//   step           lr, step_size, [gamma = 0.1]
//   exponential    lr, gamma
//   cosine         lr, total, [min_lr = 0]
//   linear_warmup  lr, warmup
//   warmup_cosine  lr, warmup, total, [min_lr = 0]
//   cyclic         min_lr, max_lr, [step_size = 2000]
//   one_cycle      max_lr, total, [pct_start = 0.3], [div_factor = 25], [final_div_factor = 1e4]
//
// Valid values: every value finite; lr, min_lr, max_lr >= 0; min_lr <= lr (cosine,
// warmup_cosine) and min_lr <= max_lr (cyclic); gamma > 0; step_size, total >= 1;
// linear_warmup: warmup >= 1; warmup_cosine: 0 <= warmup <= total; one_cycle: pct_start in
// [0, 1], div_factor > 0, final_div_factor > 0; step_size, total, warmup integers <= 2^53.
//
// Capturable CUDA steps: schedule_to_device writes the lr of the next step into device memory
// from a device step counter, so a CUDA graph of [schedule_to_device, your step-counter
// increment, Optimizer::step] advances the lr on every replay with no host involvement.
// Optimizer::set_device_scalars(d_lr, ...) multiplies every param's lr option by *d_lr: set
// the lr option to 1 (or per-param ratios) and let the schedule supply the value.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fusedopt/kernels/schedule.hpp"
#include "fusedopt/types.hpp"

namespace fo {

/// Parses a spec (syntax above) into a validated Schedule. Throws fo::Error
/// (invalid_argument) naming the problem: unknown kind or key, a key given twice, a missing
/// required key, a malformed number, or a value out of range.
Schedule parse_schedule(std::string_view spec);

/// The spec of a schedule: every key its kind takes, numbers to 17 significant digits, so
/// that parse_schedule(format_schedule(s)) has bitwise the values s's kind uses (fields it
/// does not use come back as defaults). Throws fo::Error if the kind is unknown.
std::string format_schedule(const Schedule& s);

/// Throws fo::Error (invalid_argument) if `s` breaks any rule above (or its kind is unknown).
void validate_schedule(const Schedule& s);

/// The lr of the `step`-th optimizer step, counting from 1. Throws fo::Error
/// (invalid_argument) if step < 1 or `s` is invalid (the check costs a few comparisons).
double scheduled_lr(const Schedule& s, std::int64_t step);

/// CUDA: enqueues on `stream` (a cudaStream_t; null: the default stream) a one-thread kernel
/// that writes float(schedule_lr(s, *d_step + 1)) to *d_lr: `d_step` counts the steps
/// already taken, so *d_lr is the lr of the next one. Both pointers are device memory of the
/// current device. The schedule is copied into the launch (a graph replays the schedule it
/// captured); the step counter is any device int64 the caller advances, for instance by a
/// kernel captured after the optimizer step (the optimizer's own device step counts are
/// internal). Validates `s` and the pointers on the host; throws fo::Error (unsupported)
/// in a build without CUDA, (device_error) if the launch fails.
void schedule_to_device(const Schedule& s, const std::int64_t* d_step, float* d_lr, void* stream);

}  // namespace fo
