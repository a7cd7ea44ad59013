// Learning-rate schedules: every kind against closed forms written independently here, hand-
// derived PyTorch reference values, monotonicity, the spec parser (round trips and every
// rejection, message included), and the device form against the host on a GPU.
#include "fusedopt/schedule.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tensor_buffer.hpp"
#include "test_util.hpp"

#if defined(FUSEDOPT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fo::test {
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr std::int64_t kMaxStep = std::numeric_limits<std::int64_t>::max();

// Values agree with an independent formula to rounding (different operation orders).
#define EXPECT_LR(got, want) EXPECT_NEAR((got), (want), 1e-12 * std::fabs(want) + 1e-18)

double lr_at(std::string_view spec, std::int64_t step) {
  return scheduled_lr(parse_schedule(spec), step);
}

// Independent closed forms, written from the definitions (not from the library's code).
double cos_interp(double from, double to, double p) {  // from at p = 0, to at p = 1
  return to + 0.5 * (from - to) * (1.0 + std::cos(kPi * p));
}

// ---------------------------------------------------------------------------------------
// Each kind against its closed form at the first step, boundaries, middle, end, past end.

TEST(Schedule, ConstantIsTheLrAtEveryStep) {
  for (std::int64_t t : {std::int64_t{1}, std::int64_t{2}, std::int64_t{1000}, kMaxStep})
    EXPECT_EQ(lr_at("constant:lr=0.1", t), 0.1);
  EXPECT_EQ(lr_at("constant:lr=0", 7), 0.0);
}

TEST(Schedule, StepDecaysByGammaEveryStepSize) {
  const double lr = 0.1, gamma = 0.5;
  const std::int64_t size = 30;
  const Schedule s = parse_schedule("step:lr=0.1,gamma=0.5,step_size=30");
  for (std::int64_t t : {1, 2, 30, 31, 59, 60, 61, 90, 91, 1000}) {
    double want = lr;  // repeated multiplication, once per completed period of the steps before t
    for (std::int64_t k = 0; k < (t - 1) / size; ++k) want *= gamma;
    EXPECT_LR(scheduled_lr(s, t), want) << "t=" << t;
  }
  EXPECT_EQ(scheduled_lr(s, 30), 0.1);   // the last step of the first period
  EXPECT_EQ(scheduled_lr(s, 31), 0.05);  // the first of the second
  // gamma defaults to 0.1, as in StepLR.
  EXPECT_LR(lr_at("step:lr=1,step_size=2", 3), 0.1);
}

TEST(Schedule, ExponentialDecaysByGammaEveryStep) {
  const Schedule s = parse_schedule("exponential:lr=0.2,gamma=0.9");
  double want = 0.2;
  for (std::int64_t t = 1; t <= 200; ++t) {
    EXPECT_LR(scheduled_lr(s, t), want) << "t=" << t;
    want *= 0.9;
  }
  EXPECT_EQ(scheduled_lr(s, kMaxStep), 0.0);  // underflows cleanly
}

TEST(Schedule, CosineAnnealsToMinLrOverTotalStepsThenHolds) {
  const double lr = 0.01, min_lr = 1e-5;
  const std::int64_t total = 1000;
  const Schedule s = parse_schedule("cosine:lr=0.01,min_lr=1e-5,total=1000");
  for (std::int64_t t : {1, 2, 250, 500, 501, 750, 999, 1000, 1001, 1002, 5000}) {
    const double p = static_cast<double>(std::min(t - 1, total)) / static_cast<double>(total);
    EXPECT_LR(scheduled_lr(s, t), cos_interp(lr, min_lr, p)) << "t=" << t;
  }
  EXPECT_LR(scheduled_lr(s, 1), lr);
  EXPECT_EQ(scheduled_lr(s, 1001), min_lr);  // e = T_max: exactly eta_min
  EXPECT_EQ(scheduled_lr(s, kMaxStep), min_lr);
  EXPECT_LR(lr_at("cosine:lr=0.5,total=4", 3), 0.25);  // min_lr defaults to 0
}

TEST(Schedule, LinearWarmupRampsToLrAtStepWarmup) {
  const Schedule s = parse_schedule("linear_warmup:lr=0.1,warmup=10");
  for (std::int64_t t = 1; t <= 10; ++t)
    EXPECT_LR(scheduled_lr(s, t), 0.1 * static_cast<double>(t) / 10.0) << "t=" << t;
  EXPECT_LR(scheduled_lr(s, 1), 0.01);
  EXPECT_LR(scheduled_lr(s, 5), 0.05);
  EXPECT_EQ(scheduled_lr(s, 10), 0.1);
  EXPECT_EQ(scheduled_lr(s, 11), 0.1);
  EXPECT_EQ(scheduled_lr(s, kMaxStep), 0.1);
  EXPECT_EQ(lr_at("linear_warmup:lr=0.1,warmup=1", 1), 0.1);
}

TEST(Schedule, WarmupCosineWarmsUpThenAnnealsOverTheRemainingSteps) {
  const double lr = 3e-4, min_lr = 3e-6;
  const std::int64_t warmup = 100, total = 5000;
  const Schedule s = parse_schedule("warmup_cosine:lr=3e-4,warmup=100,total=5000,min_lr=3e-6");
  const auto want = [&](std::int64_t t) {
    if (t <= warmup) return lr * static_cast<double>(t) / static_cast<double>(warmup);
    // CosineAnnealingLR(T_max = total - warmup) started at step warmup + 1.
    const std::int64_t i = std::min(t - 1 - warmup, total - warmup);
    return cos_interp(lr, min_lr, static_cast<double>(i) / static_cast<double>(total - warmup));
  };
  for (std::int64_t t : {1, 2, 50, 99, 100, 101, 102, 2550, 4999, 5000, 5001, 5002, 100000})
    EXPECT_LR(scheduled_lr(s, t), want(t)) << "t=" << t;
  EXPECT_LR(scheduled_lr(s, 1), 3e-6);
  EXPECT_EQ(scheduled_lr(s, 100), lr);                        // end of warmup
  EXPECT_LR(scheduled_lr(s, 101), lr);                        // cosine index 0
  EXPECT_LR(scheduled_lr(s, 101 + 2450), (lr + min_lr) / 2);  // halfway through the cosine
  EXPECT_EQ(scheduled_lr(s, 5001), min_lr);
  EXPECT_EQ(scheduled_lr(s, 100000), min_lr);

  // warmup = 0 is exactly the cosine schedule; warmup = total holds lr then drops to min_lr.
  const Schedule plain = parse_schedule("cosine:lr=0.1,min_lr=0.001,total=50");
  const Schedule no_warmup = parse_schedule("warmup_cosine:lr=0.1,min_lr=0.001,warmup=0,total=50");
  for (std::int64_t t = 1; t <= 60; ++t)
    EXPECT_EQ(scheduled_lr(no_warmup, t), scheduled_lr(plain, t)) << "t=" << t;
  const Schedule all_warmup =
      parse_schedule("warmup_cosine:lr=0.1,min_lr=0.001,warmup=50,total=50");
  EXPECT_EQ(scheduled_lr(all_warmup, 50), 0.1);
  EXPECT_EQ(scheduled_lr(all_warmup, 51), 0.001);
}

TEST(Schedule, CyclicIsATriangleBetweenMinAndMaxLr) {
  const double lo = 1e-4, hi = 1e-2;
  const std::int64_t half = 200;
  const Schedule s = parse_schedule("cyclic:min_lr=1e-4,max_lr=1e-2,step_size=200");
  for (std::int64_t t = 1; t <= 2000; ++t) {
    // A triangle in exact integers: r steps into the current cycle of 2 * step_size steps.
    const std::int64_t r = (t - 1) % (2 * half);
    const double scale =
        static_cast<double>(r <= half ? r : 2 * half - r) / static_cast<double>(half);
    EXPECT_LR(scheduled_lr(s, t), lo + (hi - lo) * scale) << "t=" << t;
  }
  EXPECT_EQ(scheduled_lr(s, 1), lo);
  EXPECT_LR(scheduled_lr(s, 201), hi);  // peak after step_size steps
  EXPECT_EQ(scheduled_lr(s, 401), lo);  // back at the base: the next cycle
  EXPECT_LR(scheduled_lr(s, 601), hi);
  EXPECT_LR(scheduled_lr(s, 101), (lo + hi) / 2);
  EXPECT_LR(scheduled_lr(s, 301), (lo + hi) / 2);
  const double far = scheduled_lr(s, kMaxStep);
  EXPECT_TRUE(far >= lo && far <= hi) << far;
}

TEST(Schedule, OneCycleRisesToMaxLrThenAnnealsToItsFinalLr) {
  const double max_lr = 0.1, div = 25.0, final_div = 1e4;
  const std::int64_t total = 1000;
  const Schedule s = parse_schedule(
      "one_cycle:max_lr=0.1,total=1000,pct_start=0.3,div_factor=25,final_div_factor=1e4");
  const double start = max_lr / div, end = max_lr / (div * final_div);
  const double peak = 0.3 * static_cast<double>(total) - 1.0;  // index of the peak: 299
  const auto want = [&](std::int64_t t) {
    const double e = static_cast<double>(std::min(t - 1, total - 1));
    if (e <= peak) return cos_interp(start, max_lr, e / peak);
    return cos_interp(max_lr, end, (e - peak) / (static_cast<double>(total - 1) - peak));
  };
  for (std::int64_t t : {1, 2, 150, 299, 300, 301, 302, 650, 999, 1000, 1001, 5000})
    EXPECT_LR(scheduled_lr(s, t), want(t)) << "t=" << t;
  EXPECT_LR(scheduled_lr(s, 1), 0.004);
  EXPECT_EQ(scheduled_lr(s, 300), max_lr);
  EXPECT_LR(scheduled_lr(s, 1000), 4e-7);
  EXPECT_EQ(scheduled_lr(s, 1001), scheduled_lr(s, 1000));  // held past the end
  EXPECT_EQ(scheduled_lr(s, kMaxStep), scheduled_lr(s, 1000));
  // PyTorch's defaults: pct_start 0.3, div_factor 25, final_div_factor 1e4.
  const Schedule d = parse_schedule("one_cycle:max_lr=0.1,total=1000");
  for (std::int64_t t : {1, 300, 650, 1000}) EXPECT_EQ(scheduled_lr(d, t), scheduled_lr(s, t));
}

TEST(Schedule, OneCycleSkipsEmptyPhasesWherePyTorchDividesByZero) {
  // pct_start * total == 1: the rise has no steps; step 1 is the peak.
  const Schedule a = parse_schedule("one_cycle:max_lr=0.1,total=10,pct_start=0.1");
  EXPECT_LR(scheduled_lr(a, 1), 0.1);
  EXPECT_LR(scheduled_lr(a, 10), 0.1 / 25 / 1e4);
  // pct_start = 0: annealing from the peak at e = -1.
  const Schedule b = parse_schedule("one_cycle:max_lr=0.1,total=10,pct_start=0");
  EXPECT_LR(scheduled_lr(b, 1), cos_interp(0.1, 0.1 / 25 / 1e4, 1.0 / 10.0));
  // pct_start = 1: the whole schedule rises; the last step is the peak.
  const Schedule c = parse_schedule("one_cycle:max_lr=0.1,total=10,pct_start=1");
  EXPECT_LR(scheduled_lr(c, 1), 0.004);
  EXPECT_EQ(scheduled_lr(c, 10), 0.1);
  EXPECT_EQ(scheduled_lr(c, 11), 0.1);
  // total = 1: the single step is the end.
  for (const char* spec :
       {"one_cycle:max_lr=0.1,total=1", "one_cycle:max_lr=0.1,total=1,pct_start=1"}) {
    const double v = lr_at(spec, 1);
    EXPECT_TRUE(std::isfinite(v) && v >= 0.0 && v <= 0.1) << spec << ": " << v;
  }
}

// ---------------------------------------------------------------------------------------
// PyTorch reference values, derived by hand from torch.optim.lr_scheduler's formulas. A
// PyTorch scheduler stepped after each optimizer step gives step t the value at
// last_epoch e = t - 1.

TEST(Schedule, CosineMatchesPyTorchCosineAnnealingLR) {
  // CosineAnnealingLR(opt(lr=0.1), T_max=10), closed form
  //   eta_min + (base_lr - eta_min) * (1 + cos(pi * e / T_max)) / 2,  eta_min = 0:
  //   e=0: cos 0 = 1                          -> 0.1 * 2 / 2              = 0.1
  //   e=2: cos 36 deg = (1 + sqrt 5) / 4      = 0.80901699437494742
  //                                           -> 0.1 * 1.809016994... / 2 = 0.090450849718747371
  //   e=3: cos 54 deg = sqrt(10 - 2 sqrt 5)/4 = 0.58778525229247314
  //                                           -> 0.1 * 1.587785252... / 2 = 0.079389262614623657
  //   e=5: cos 90 deg = 0                     -> 0.05
  //   e=9: cos 162 deg = -sqrt(10+2 sqrt 5)/4 = -0.95105651629515357
  //                                           -> 0.1 * 0.048943483... / 2 = 0.0024471741852423235
  //   e=10: cos 180 deg = -1                  -> 0
  const Schedule s = parse_schedule("cosine:lr=0.1,total=10");
  EXPECT_LR(scheduled_lr(s, 1), 0.1);
  EXPECT_LR(scheduled_lr(s, 3), 0.090450849718747371);
  EXPECT_LR(scheduled_lr(s, 4), 0.079389262614623657);
  EXPECT_LR(scheduled_lr(s, 6), 0.05);
  EXPECT_LR(scheduled_lr(s, 10), 0.0024471741852423235);
  EXPECT_EQ(scheduled_lr(s, 11), 0.0);
  // With eta_min = 0.01, T_max = 4 (base 0.1, so base - eta_min = 0.09):
  //   e=1: cos 45 deg = sqrt 2 / 2 = 0.70710678118654752
  //        -> 0.01 + 0.09 * 1.70710678118654752 / 2 = 0.01 + 0.076819805153394638 =
  //        0.086819805153394638
  //   e=2: cos 90 deg = 0  -> 0.01 + 0.09 / 2 = 0.055
  //   e=3: cos 135 deg = -sqrt 2 / 2
  //        -> 0.01 + 0.09 * 0.29289321881345248 / 2 = 0.01 + 0.013180194846605362 =
  //        0.023180194846605362
  //   e=4: -> 0.01
  const Schedule m = parse_schedule("cosine:lr=0.1,min_lr=0.01,total=4");
  EXPECT_LR(scheduled_lr(m, 2), 0.086819805153394638);
  EXPECT_LR(scheduled_lr(m, 3), 0.055);
  EXPECT_LR(scheduled_lr(m, 4), 0.023180194846605362);
  EXPECT_EQ(scheduled_lr(m, 5), 0.01);
}

TEST(Schedule, StepMatchesPyTorchStepLRDocumentation) {
  // torch.optim.lr_scheduler.StepLR's docstring, step_size=30, gamma=0.1, lr 0.05:
  //   lr = 0.05 if epoch < 30; 0.005 if 30 <= epoch < 60; 0.0005 if 60 <= epoch < 90
  // closed form base_lr * gamma ** (e // step_size). Epoch e is step e + 1.
  const Schedule s = parse_schedule("step:lr=0.05,step_size=30,gamma=0.1");
  EXPECT_LR(scheduled_lr(s, 1), 0.05);
  EXPECT_LR(scheduled_lr(s, 30), 0.05);
  EXPECT_LR(scheduled_lr(s, 31), 0.005);
  EXPECT_LR(scheduled_lr(s, 60), 0.005);
  EXPECT_LR(scheduled_lr(s, 61), 0.0005);
  EXPECT_LR(scheduled_lr(s, 90), 0.0005);
  EXPECT_LR(scheduled_lr(s, 91), 0.00005);
}

TEST(Schedule, OneCycleMatchesPyTorchOneCycleLR) {
  // OneCycleLR(opt, max_lr=0.1, total_steps=100, pct_start=0.25) with anneal_strategy='cos',
  // div_factor=25, final_div_factor=1e4, three_phase=False:
  //   initial_lr = 0.1 / 25 = 0.004, min_lr = 0.004 / 1e4 = 4e-7
  //   phase 1: end_step = float(0.25 * 100) - 1 = 24, from 0.004 to 0.1
  //   phase 2: end_step = 100 - 1 = 99 (start_step 24), from 0.1 to 4e-7
  //   _annealing_cos(start, end, pct) = end + (start - end) / 2 * (cos(pi * pct) + 1)
  //   e=0:  pct 0:           0.1 + (0.004 - 0.1) / 2 * 2           = 0.004
  //   e=12: pct 12/24 = 0.5: 0.1 + (-0.096) / 2 * 1                = 0.052
  //   e=24: pct 1:           0.1 + (-0.096) / 2 * 0                = 0.1
  //   e=49: pct 25/75 = 1/3: cos(pi/3) = 0.5, so
  //                          4e-7 + (0.1 - 4e-7) / 2 * 1.5 = 4e-7 + 0.0749997 = 0.0750001
  //   e=99: pct 1:           4e-7
  const Schedule s = parse_schedule("one_cycle:max_lr=0.1,total=100,pct_start=0.25");
  EXPECT_LR(scheduled_lr(s, 1), 0.004);
  EXPECT_LR(scheduled_lr(s, 13), 0.052);
  EXPECT_LR(scheduled_lr(s, 25), 0.1);
  EXPECT_LR(scheduled_lr(s, 50), 0.0750001);
  EXPECT_LR(scheduled_lr(s, 100), 4e-7);
  // Default pct_start 0.3: end_step = float(0.3 * 100) - 1 = 29 (0.3 * 100 rounds to 30.0);
  //   e=29: 0.1;  e=64: pct 35/70 = 0.5 -> 4e-7 + (0.1 - 4e-7) / 2 = 0.0500002
  const Schedule d = parse_schedule("one_cycle:max_lr=0.1,total=100");
  EXPECT_LR(scheduled_lr(d, 30), 0.1);
  EXPECT_LR(scheduled_lr(d, 65), 0.0500002);
}

TEST(Schedule, CyclicMatchesPyTorchCyclicLR) {
  // CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=10) (its docstring's example),
  // mode 'triangular': total_size = 20, step_ratio = 0.5,
  //   cycle = floor(1 + e / 20), x = 1 + e / 20 - cycle,
  //   scale = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1), lr = 0.01 + 0.09 * scale
  //   e=0: x 0 -> 0.01;  e=5: x 0.25 -> 0.055;  e=10: x 0.5 -> 0.1;
  //   e=15: x 0.75 -> scale 0.5 -> 0.055;  e=20: cycle 2, x 0 -> 0.01
  const Schedule s = parse_schedule("cyclic:min_lr=0.01,max_lr=0.1,step_size=10");
  EXPECT_LR(scheduled_lr(s, 1), 0.01);
  EXPECT_LR(scheduled_lr(s, 6), 0.055);
  EXPECT_LR(scheduled_lr(s, 11), 0.1);
  EXPECT_LR(scheduled_lr(s, 16), 0.055);
  EXPECT_LR(scheduled_lr(s, 21), 0.01);
  // step_size defaults to CyclicLR's 2000.
  EXPECT_LR(lr_at("cyclic:min_lr=0,max_lr=1", 2001), 1.0);
}

// ---------------------------------------------------------------------------------------

// Non-increasing (sign -1) or non-decreasing (sign +1) over [from, to].
void expect_monotone(const Schedule& s, std::int64_t from, std::int64_t to, int sign,
                     const char* what) {
  double prev = scheduled_lr(s, from);
  for (std::int64_t t = from + 1; t <= to; ++t) {
    const double v = scheduled_lr(s, t);
    if (sign < 0 ? v > prev : v < prev) {
      ADD_FAILURE() << what << ": lr goes " << (sign < 0 ? "up" : "down") << " at step " << t
                    << ": " << prev << " -> " << v;
      return;
    }
    prev = v;
  }
}

TEST(Schedule, MonotoneWhereTheScheduleIs) {
  expect_monotone(parse_schedule("step:lr=0.1,step_size=7,gamma=0.5"), 1, 500, -1, "step");
  expect_monotone(parse_schedule("exponential:lr=0.1,gamma=0.99"), 1, 2000, -1, "exponential");
  expect_monotone(parse_schedule("exponential:lr=1e-6,gamma=1.01"), 1, 2000, +1, "lr range test");
  expect_monotone(parse_schedule("cosine:lr=0.1,min_lr=1e-4,total=777"), 1, 1000, -1, "cosine");
  expect_monotone(parse_schedule("linear_warmup:lr=0.1,warmup=333"), 1, 1000, +1, "warmup");
  const Schedule wc = parse_schedule("warmup_cosine:lr=3e-4,warmup=100,total=1000");
  expect_monotone(wc, 1, 100, +1, "warmup_cosine warmup");
  expect_monotone(wc, 100, 1200, -1, "warmup_cosine decay");
  const Schedule cy = parse_schedule("cyclic:min_lr=1e-4,max_lr=1e-2,step_size=50");
  expect_monotone(cy, 1, 51, +1, "cyclic rise");
  expect_monotone(cy, 51, 101, -1, "cyclic fall");
  expect_monotone(cy, 101, 151, +1, "cyclic second rise");
  const Schedule oc = parse_schedule("one_cycle:max_lr=0.1,total=1000,pct_start=0.3");
  expect_monotone(oc, 1, 300, +1, "one_cycle rise");
  expect_monotone(oc, 300, 1500, -1, "one_cycle anneal");
  // Within bounds everywhere.
  for (std::int64_t t = 1; t <= 1500; ++t) {
    EXPECT_TRUE(scheduled_lr(wc, t) >= 0.0 && scheduled_lr(wc, t) <= 3e-4) << t;
    EXPECT_TRUE(scheduled_lr(oc, t) >= 0.1 / 25 / 1e4 && scheduled_lr(oc, t) <= 0.1) << t;
  }
}

TEST(Schedule, EveryKindIsFiniteAtExtremeSteps) {
  for (const char* spec :
       {"constant:lr=0.1", "step:lr=0.1,step_size=1", "exponential:lr=0.1,gamma=0.5",
        "cosine:lr=0.1,total=1", "linear_warmup:lr=0.1,warmup=9007199254740992",
        "warmup_cosine:lr=0.1,warmup=1,total=1", "cyclic:min_lr=0,max_lr=1,step_size=1",
        "cyclic:min_lr=0,max_lr=1,step_size=9007199254740992", "one_cycle:max_lr=0.1,total=1"}) {
    const Schedule s = parse_schedule(spec);
    for (std::int64_t t : {std::int64_t{1}, std::int64_t{2}, kMaxStep - 1, kMaxStep}) {
      const double v = scheduled_lr(s, t);
      EXPECT_TRUE(std::isfinite(v) && v >= 0.0) << spec << " at " << t << ": " << v;
    }
    // The kernel-side function takes steps below 1 as step 1 (it cannot throw).
    EXPECT_EQ(schedule_lr(s, 0), schedule_lr(s, 1)) << spec;
    EXPECT_EQ(schedule_lr(s, std::numeric_limits<std::int64_t>::min()), schedule_lr(s, 1)) << spec;
  }
}

// ---------------------------------------------------------------------------------------
// The parser.

TEST(ScheduleSpec, ReadsEveryKeyAndAppliesPyTorchDefaults) {
  const Schedule a = parse_schedule("warmup_cosine:lr=3e-4,warmup=100,total=5000");
  EXPECT_EQ(a.kind, ScheduleKind::warmup_cosine);
  EXPECT_EQ(a.lr, 3e-4);
  EXPECT_EQ(a.warmup, 100);
  EXPECT_EQ(a.total, 5000);
  EXPECT_EQ(a.min_lr, 0.0);

  const Schedule b = parse_schedule(
      "one_cycle:max_lr=0.1,total=1000,pct_start=0.3,div_factor=25,final_div_factor=1e4");
  EXPECT_EQ(b.kind, ScheduleKind::one_cycle);
  EXPECT_EQ(b.max_lr, 0.1);
  EXPECT_EQ(b.total, 1000);
  EXPECT_EQ(b.pct_start, 0.3);
  EXPECT_EQ(b.div_factor, 25.0);
  EXPECT_EQ(b.final_div_factor, 1e4);
  const Schedule b_defaults = parse_schedule("one_cycle:max_lr=0.1,total=1000");
  EXPECT_EQ(b_defaults.pct_start, 0.3);
  EXPECT_EQ(b_defaults.div_factor, 25.0);
  EXPECT_EQ(b_defaults.final_div_factor, 1e4);

  const Schedule c = parse_schedule("step:lr=0.1,gamma=0.5,step_size=30");
  EXPECT_EQ(c.kind, ScheduleKind::step);
  EXPECT_EQ(c.gamma, 0.5);
  EXPECT_EQ(c.step_size, 30);
  EXPECT_EQ(parse_schedule("step:lr=0.1,step_size=30").gamma, 0.1);

  const Schedule d = parse_schedule("cyclic:min_lr=1e-4,max_lr=1e-2,step_size=200");
  EXPECT_EQ(d.kind, ScheduleKind::cyclic);
  EXPECT_EQ(d.min_lr, 1e-4);
  EXPECT_EQ(d.max_lr, 1e-2);
  EXPECT_EQ(d.step_size, 200);
  EXPECT_EQ(parse_schedule("cyclic:min_lr=0,max_lr=1").step_size, 2000);

  const Schedule e = parse_schedule("cosine:lr=0.01,min_lr=1e-5,total=1000");
  EXPECT_EQ(e.kind, ScheduleKind::cosine);
  EXPECT_EQ(e.min_lr, 1e-5);

  EXPECT_EQ(parse_schedule("constant:lr=0.1").kind, ScheduleKind::constant);
  EXPECT_EQ(parse_schedule("exponential:lr=0.1,gamma=0.9").kind, ScheduleKind::exponential);
  EXPECT_EQ(parse_schedule("linear_warmup:lr=0.1,warmup=5").kind, ScheduleKind::linear_warmup);

  // Key order is free, spaces around names and values are ignored, integers may be 1e3.
  const Schedule f = parse_schedule("  cosine : total = 1e3 , lr= 0.01 ,min_lr =1e-5 ");
  EXPECT_EQ(f.total, 1000);
  EXPECT_EQ(f.lr, 0.01);
  EXPECT_EQ(f.min_lr, 1e-5);
}

bool same_schedule(const Schedule& a, const Schedule& b) {
  return a.kind == b.kind && std::memcmp(&a.lr, &b.lr, sizeof(double)) == 0 &&
         std::memcmp(&a.min_lr, &b.min_lr, sizeof(double)) == 0 &&
         std::memcmp(&a.max_lr, &b.max_lr, sizeof(double)) == 0 &&
         std::memcmp(&a.gamma, &b.gamma, sizeof(double)) == 0 &&
         std::memcmp(&a.pct_start, &b.pct_start, sizeof(double)) == 0 &&
         std::memcmp(&a.div_factor, &b.div_factor, sizeof(double)) == 0 &&
         std::memcmp(&a.final_div_factor, &b.final_div_factor, sizeof(double)) == 0 &&
         a.step_size == b.step_size && a.total == b.total && a.warmup == b.warmup;
}

TEST(ScheduleSpec, FormatAndParseRoundTripBitwise) {
  EXPECT_EQ(format_schedule(parse_schedule("cosine:lr=0.01,min_lr=1e-5,total=1000")),
            "cosine:lr=0.01,total=1000,min_lr=1.0000000000000001e-05");
  EXPECT_EQ(format_schedule(parse_schedule("constant:lr=0.5")), "constant:lr=0.5");

  // Random values in range for every kind: format, parse, same bits and same lrs.
  std::mt19937_64 rng = make_rng();
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::uniform_int_distribution<std::int64_t> count(1, 100000);
  for (int trial = 0; trial < 200; ++trial) {
    Schedule s;
    s.kind = static_cast<ScheduleKind>(trial % 8);
    s.max_lr = unit(rng);
    s.lr = unit(rng);
    s.min_lr = s.lr * unit(rng);
    if (s.kind == ScheduleKind::cyclic) s.min_lr = s.max_lr * unit(rng);
    s.gamma = 0.5 + unit(rng);
    s.pct_start = unit(rng);
    s.div_factor = 1.0 + 100.0 * unit(rng);
    s.final_div_factor = 1.0 + 1e5 * unit(rng);
    s.step_size = count(rng);
    s.total = count(rng);
    s.warmup = std::uniform_int_distribution<std::int64_t>(0, s.total)(rng);
    if (s.kind == ScheduleKind::linear_warmup) s.warmup = std::max<std::int64_t>(1, s.warmup);
    validate_schedule(s);
    const std::string spec = format_schedule(s);
    const Schedule back = parse_schedule(spec);
    // Fields the kind does not take come back as defaults; compare through a second trip.
    EXPECT_EQ(format_schedule(back), spec);
    for (std::int64_t t : {std::int64_t{1}, std::int64_t{2}, s.total / 2 + 1, s.total, s.total + 7})
      EXPECT_EQ(scheduled_lr(back, t), scheduled_lr(s, t)) << spec << " at " << t;
    const Schedule again = parse_schedule(format_schedule(back));
    EXPECT_TRUE(same_schedule(again, back)) << spec;
  }
}

void expect_rejected(const std::string& spec, const std::string& message) {
  try {
    (void)parse_schedule(spec);
    ADD_FAILURE() << "'" << spec << "' was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument) << spec;
    EXPECT_EQ(std::string(e.what()), message) << spec;
  }
}

TEST(ScheduleSpec, RejectsMalformedSpecsWithAClearMessage) {
  const std::string known =
      "(known: constant, step, exponential, cosine, linear_warmup, warmup_cosine, cyclic, "
      "one_cycle)";
  expect_rejected("", "schedule spec '' has no kind " + known);
  expect_rejected("  :lr=1", "schedule spec '  :lr=1' has no kind " + known);
  expect_rejected("linear:lr=0.1", "schedule spec 'linear:lr=0.1': unknown kind 'linear' " + known);
  expect_rejected("Cosine:lr=0.1,total=10",
                  "schedule spec 'Cosine:lr=0.1,total=10': unknown kind 'Cosine' " + known);
  expect_rejected("constant:lr=0.1,gamma=0.5",
                  "constant schedule: unknown key 'gamma' (constant takes lr)");
  expect_rejected("one_cycle:max_lr=0.1,total=10,anneal=linear",
                  "one_cycle schedule: unknown key 'anneal' (one_cycle takes max_lr, total, "
                  "pct_start, div_factor, final_div_factor)");
  expect_rejected("constant", "constant schedule: missing required key 'lr' (constant takes lr)");
  expect_rejected("cosine:lr=0.01",
                  "cosine schedule: missing required key 'total' (cosine takes lr, total, min_lr)");
  expect_rejected("warmup_cosine:lr=3e-4,total=5000",
                  "warmup_cosine schedule: missing required key 'warmup' (warmup_cosine takes lr, "
                  "warmup, total, min_lr)");
  expect_rejected("step:lr=0.1,gamma=0.5",
                  "step schedule: missing required key 'step_size' (step takes lr, step_size, "
                  "gamma)");
  expect_rejected("exponential:lr=0.1",
                  "exponential schedule: missing required key 'gamma' (exponential takes lr, "
                  "gamma)");
  expect_rejected("cyclic:max_lr=0.1",
                  "cyclic schedule: missing required key 'min_lr' (cyclic takes min_lr, max_lr, "
                  "step_size)");
  expect_rejected("one_cycle:total=100",
                  "one_cycle schedule: missing required key 'max_lr' (one_cycle takes max_lr, "
                  "total, pct_start, div_factor, final_div_factor)");
  expect_rejected("constant:lr=0.1,lr=0.2", "constant schedule: key 'lr' given twice");
  expect_rejected("constant:lr",
                  "constant schedule: expected key=value, got 'lr' in 'constant:lr'");
  expect_rejected("constant:", "constant schedule: expected key=value, got '' in 'constant:'");
  expect_rejected("constant:lr=0.1,",
                  "constant schedule: expected key=value, got '' in 'constant:lr=0.1,'");
  expect_rejected("constant:lr=", "constant schedule: lr must be a number, got ''");
  expect_rejected("constant:lr=abc", "constant schedule: lr must be a number, got 'abc'");
  expect_rejected("constant:lr=0.1x", "constant schedule: lr must be a number, got '0.1x'");
  expect_rejected("constant:lr=0.1 0.2", "constant schedule: lr must be a number, got '0.1 0.2'");
  expect_rejected("cosine:lr=0.1,total=1.5",
                  "cosine schedule: total must be an integer with |value| <= 2^53, got '1.5'");
  expect_rejected("cosine:lr=0.1,total=1e300",
                  "cosine schedule: total must be an integer with |value| <= 2^53, got '1e300'");
  expect_rejected("cosine:lr=0.1,total=nan",
                  "cosine schedule: total must be an integer with |value| <= 2^53, got 'nan'");
}

TEST(ScheduleSpec, RejectsOutOfRangeValuesWithAClearMessage) {
  // Non-finite.
  expect_rejected("constant:lr=nan", "constant schedule: lr must be finite, got nan");
  expect_rejected("constant:lr=inf", "constant schedule: lr must be finite, got inf");
  expect_rejected("cosine:lr=0.1,total=10,min_lr=-inf",
                  "cosine schedule: min_lr must be finite, got -inf");
  expect_rejected("one_cycle:max_lr=0.1,total=10,div_factor=inf",
                  "one_cycle schedule: div_factor must be finite, got inf");
  // Negative lrs.
  expect_rejected("constant:lr=-0.1", "constant schedule: lr must be >= 0, got -0.1");
  expect_rejected("step:lr=-1,step_size=3", "step schedule: lr must be >= 0, got -1");
  expect_rejected("cosine:lr=0.1,min_lr=-1e-5,total=10",
                  "cosine schedule: min_lr must be >= 0, got -1e-05");
  expect_rejected("cyclic:min_lr=-1e-4,max_lr=1e-2",
                  "cyclic schedule: min_lr must be >= 0, got -0.0001");
  expect_rejected("one_cycle:max_lr=-0.1,total=10",
                  "one_cycle schedule: max_lr must be >= 0, got -0.1");
  // Ordering of the bounds.
  expect_rejected("cosine:lr=1e-5,min_lr=0.01,total=10",
                  "cosine schedule: min_lr must be <= lr, got min_lr=0.01, lr=1e-05");
  expect_rejected("warmup_cosine:lr=1e-5,min_lr=0.01,warmup=1,total=10",
                  "warmup_cosine schedule: min_lr must be <= lr, got min_lr=0.01, lr=1e-05");
  expect_rejected("cyclic:min_lr=1e-2,max_lr=1e-4",
                  "cyclic schedule: min_lr must be <= max_lr, got min_lr=0.01, max_lr=0.0001");
  // gamma <= 0.
  expect_rejected("step:lr=0.1,step_size=30,gamma=0", "step schedule: gamma must be > 0, got 0");
  expect_rejected("exponential:lr=0.1,gamma=-0.5",
                  "exponential schedule: gamma must be > 0, got -0.5");
  // Counts.
  expect_rejected("step:lr=0.1,step_size=0", "step schedule: step_size must be >= 1, got 0");
  expect_rejected("cyclic:min_lr=0,max_lr=1,step_size=-3",
                  "cyclic schedule: step_size must be >= 1, got -3");
  expect_rejected("cosine:lr=0.1,total=0", "cosine schedule: total must be >= 1, got 0");
  expect_rejected("warmup_cosine:lr=0.1,warmup=0,total=0",
                  "warmup_cosine schedule: total must be >= 1, got 0");
  expect_rejected("one_cycle:max_lr=0.1,total=-5",
                  "one_cycle schedule: total must be >= 1, got -5");
  expect_rejected("linear_warmup:lr=0.1,warmup=0",
                  "linear_warmup schedule: warmup must be >= 1, got 0");
  expect_rejected("warmup_cosine:lr=0.1,warmup=-1,total=10",
                  "warmup_cosine schedule: warmup must be >= 0, got -1");
  expect_rejected("warmup_cosine:lr=3e-4,warmup=200,total=100",
                  "warmup_cosine schedule: warmup must be <= total, got warmup=200, total=100");
  // one_cycle's shape.
  expect_rejected("one_cycle:max_lr=0.1,total=10,pct_start=1.5",
                  "one_cycle schedule: pct_start must be in [0, 1], got 1.5");
  expect_rejected("one_cycle:max_lr=0.1,total=10,pct_start=-0.1",
                  "one_cycle schedule: pct_start must be in [0, 1], got -0.1");
  expect_rejected("one_cycle:max_lr=0.1,total=10,div_factor=0",
                  "one_cycle schedule: div_factor must be > 0, got 0");
  expect_rejected("one_cycle:max_lr=0.1,total=10,final_div_factor=-1e4",
                  "one_cycle schedule: final_div_factor must be > 0, got -10000");
}

void expect_invalid(const std::function<void()>& f, const std::string& message) {
  try {
    f();
    ADD_FAILURE() << "accepted; expected: " << message;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
    EXPECT_EQ(std::string(e.what()), message);
  }
}

TEST(ScheduleSpec, ValidateAndScheduledLrCheckHandBuiltSchedules) {
  Schedule s;  // constant, lr 0
  EXPECT_NO_THROW(validate_schedule(s));
  s.kind = ScheduleKind::cosine;  // total 0
  expect_invalid([&] { validate_schedule(s); }, "cosine schedule: total must be >= 1, got 0");
  expect_invalid([&] { (void)scheduled_lr(s, 1); }, "cosine schedule: total must be >= 1, got 0");
  s.total = std::int64_t{1} << 60;
  expect_invalid([&] { validate_schedule(s); },
                 "cosine schedule: total must be <= 2^53, got 1152921504606846976");
  s.kind = static_cast<ScheduleKind>(42);
  expect_invalid([&] { validate_schedule(s); },
                 "schedule: unknown kind 42 (known: constant, step, exponential, cosine, "
                 "linear_warmup, warmup_cosine, cyclic, one_cycle)");
  const Schedule ok = parse_schedule("constant:lr=0.1");
  expect_invalid([&] { (void)scheduled_lr(ok, 0); }, "schedule: step must be >= 1, got 0");
  expect_invalid([&] { (void)scheduled_lr(ok, -3); }, "schedule: step must be >= 1, got -3");
  // Fields a kind does not take are not checked (they are not used).
  Schedule c = ok;
  c.gamma = std::nan("");
  EXPECT_NO_THROW(validate_schedule(c));
}

// ---------------------------------------------------------------------------------------
// The device form.

TEST(ScheduleDevice, PointersAreCheckedFirst) {
  const Schedule s = parse_schedule("constant:lr=0.1");
  std::int64_t step = 0;
  float lr = 0.0f;
  expect_invalid([&] { schedule_to_device(s, nullptr, &lr, nullptr); },
                 "schedule_to_device: d_step is null");
  expect_invalid([&] { schedule_to_device(s, &step, nullptr, nullptr); },
                 "schedule_to_device: d_lr is null");
  Schedule bad = s;
  bad.lr = -1.0;
  expect_invalid([&] { schedule_to_device(bad, &step, &lr, nullptr); },
                 "constant schedule: lr must be >= 0, got -1");
}

#if !defined(FUSEDOPT_WITH_CUDA)
TEST(ScheduleDevice, UnsupportedWithoutCuda) {
  std::int64_t step = 0;
  float lr = 0.0f;
  try {
    schedule_to_device(parse_schedule("constant:lr=0.1"), &step, &lr, nullptr);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::unsupported);
    EXPECT_STREQ(e.what(), "fusedopt was built without CUDA");
  }
}
#endif

#if defined(FUSEDOPT_WITH_CUDA)
// float(host value) and the device's float agree to one float ulp (the device's double cos
// and pow may differ from the host's by an ulp of a double, which can move a float rounding).
void expect_float_close(float got, double host, const std::string& what) {
  const float want = static_cast<float>(host);
  EXPECT_LE(std::fabs(got - want), std::fabs(want) * 1.2e-7f)
      << what << ": device " << got << ", host " << want;
}
#endif

TEST(ScheduleDevice, MatchesTheHostForEveryKindAndReplaysFromAGraph) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
#if defined(FUSEDOPT_WITH_CUDA)
  const char* specs[] = {
      "constant:lr=0.1",
      "step:lr=0.1,gamma=0.5,step_size=7",
      "exponential:lr=0.1,gamma=0.97",
      "cosine:lr=0.01,min_lr=1e-5,total=60",
      "linear_warmup:lr=0.1,warmup=25",
      "warmup_cosine:lr=3e-4,warmup=10,total=80",
      "cyclic:min_lr=1e-4,max_lr=1e-2,step_size=13",
      "one_cycle:max_lr=0.1,total=90,pct_start=0.3,div_factor=25,final_div_factor=1e4",
  };
  std::int64_t* d_step = nullptr;
  float* d_lr = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_step), sizeof(std::int64_t)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_lr), sizeof(float)), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);

  for (const char* spec : specs) {
    const Schedule s = parse_schedule(spec);
    // Direct launches: *d_step steps taken, so the kernel writes the lr of step *d_step + 1.
    for (std::int64_t taken = 0; taken < 100; ++taken) {
      // On `stream`: a plain cudaMemcpy from pageable memory runs on the legacy stream and
      // may return before its DMA lands, unordered with a non-blocking stream's kernel.
      ASSERT_EQ(cudaMemcpyAsync(d_step, &taken, sizeof taken, cudaMemcpyHostToDevice, stream),
                cudaSuccess);
      schedule_to_device(s, d_step, d_lr, stream);
      float got = 0.0f;
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(&got, d_lr, sizeof got, cudaMemcpyDeviceToHost), cudaSuccess);
      expect_float_close(got, scheduled_lr(s, taken + 1),
                         std::string(spec) + " step " + std::to_string(taken + 1));
    }
    // Captured once, replayed: each replay reads the counter as it is then.
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    schedule_to_device(s, d_step, d_lr, stream);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (std::int64_t taken = 0; taken < 100; ++taken) {
      ASSERT_EQ(cudaMemcpyAsync(d_step, &taken, sizeof taken, cudaMemcpyHostToDevice, stream),
                cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      float got = 0.0f;
      ASSERT_EQ(cudaMemcpyAsync(&got, d_lr, sizeof got, cudaMemcpyDeviceToHost, stream),
                cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      expect_float_close(got, scheduled_lr(s, taken + 1),
                         std::string(spec) + " replayed, step " + std::to_string(taken + 1));
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  // A negative counter is taken as no steps taken; the largest does not overflow.
  const Schedule s = parse_schedule("cosine:lr=0.01,min_lr=1e-5,total=60");
  for (std::int64_t taken : {std::int64_t{-5}, kMaxStep}) {
    ASSERT_EQ(cudaMemcpy(d_step, &taken, sizeof taken, cudaMemcpyHostToDevice), cudaSuccess);
    schedule_to_device(s, d_step, d_lr, nullptr);
    float got = 0.0f;
    ASSERT_EQ(cudaMemcpy(&got, d_lr, sizeof got, cudaMemcpyDeviceToHost), cudaSuccess);
    expect_float_close(got, taken < 0 ? 0.01 : 1e-5, "counter " + std::to_string(taken));
  }
  cudaStreamDestroy(stream);
  cudaFree(d_lr);
  cudaFree(d_step);
#endif
}

}  // namespace
}  // namespace fo::test
