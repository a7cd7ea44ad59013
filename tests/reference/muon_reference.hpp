// Plain double-precision reference for one Muon step (torch.optim.Muon, torch 2.15,
// _single_tensor_muon), written from torch's code and docs/optimizers.md `muon`,
// independently of the library's functor: the momentum's lerps, the Newton-Schulz iteration
// (reference/newton_schulz.hpp) in double, the adjusted lr, the decay and the update.
#pragma once
#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace fo::ref {

/// One step of a param viewed as `batch` row-major rows x cols matrices (torch: batch 1; a
/// larger batch is each matrix stepped on its own). Options by docs name (missing: default):
/// lr, weight_decay, momentum, nesterov, ns_a, ns_b, ns_c, eps, ns_steps, adjust_lr_fn.
void muon_step(const OptionMap& options, std::vector<double>& param,
               const std::vector<double>& grad, std::vector<double>& momentum_buffer,
               std::int64_t batch, std::int64_t rows, std::int64_t cols);

/// torch's _adjust_lr(lr, fn, (rows, cols)): fn 0 original, 1 match_rms_adamw, 2
/// spectral_unclamped.
double muon_adjusted_lr(double lr, int adjust_lr_fn, std::int64_t rows, std::int64_t cols);

}  // namespace fo::ref
