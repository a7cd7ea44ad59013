// Plain double-precision reference ("oracle") for one step of each dense fusedopt optimizer.
// Written straight from docs/optimizers.md, independently of the library's kernels. Scalar loops
// only.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace fo::ref {
using OptionMap = std::map<std::string, double>;  // flags as 0/1; a missing key means the default
using StateMap =
    std::map<std::string, std::vector<double>>;  // state buffers by documented state name

/// Option sets a test runs the algorithm with: the first is {} (the defaults); together they
/// give every option a non-default value, and the richest switches on every state. Throws
/// std::invalid_argument for an algorithm the reference does not know.
const std::vector<OptionMap>& test_variants(const std::string& algorithm);

/// The last of test_variants (every state switched on), as (key, value) pairs in key order.
std::vector<std::pair<std::string, double>> richest_options(const std::string& algorithm);

/// The documented default options of an algorithm, every key present (e.g. adamw weight_decay
/// 1e-2).
OptionMap defaults(const std::string& algorithm);

/// The state names the algorithm keeps under these options, in the documented order
/// (e.g. sgd with momentum 0 -> {}, rmsprop centered+momentum ->
/// {"square_avg","momentum_buffer","grad_avg"}, adam with amsgrad ->
/// {"exp_avg","exp_avg_sq","max_exp_avg_sq"}).
std::vector<std::string> state_names(const std::string& algorithm, const OptionMap& options);

/// The documented initial value of a state (rprop step_size: lr; adagrad sum:
/// initial_accumulator_value; else 0).
double state_initial_value(const std::string& algorithm, const OptionMap& options,
                           const std::string& state);

/// Whether a state starts as a copy of the param instead (Schedule-Free's z).
bool state_starts_as_param(const std::string& algorithm, const std::string& state);

/// Schedule-Free's evaluation form of a param (x, from y and z), in double: the package's
/// eval(), p.lerp_(z, 1 - 1/beta) with beta its momentum or beta1.
void schedule_free_eval(const std::string& algorithm, const OptionMap& options,
                        std::vector<double>& param, const StateMap& states);

/// One step, in double. `t` is the step count of this param (1 on the first step).
/// `states` must hold every buffer state_names() lists, each param.size() long (the caller
/// initialises them). `ambiguous`, if non-null, is resized to param.size() and set to 1 at
/// each element whose result hinges on the sign of a quantity so close to zero that float32
/// rounding could flip it: for lion, |c| <= 1e-5 * (|beta1*m| + |(1-beta1)*g|) where
/// c = beta1*m + (1-beta1)*g (only when that bound is > 0: an exact 0 from all-zero inputs
/// is exact in float32 too); for rprop, 0 < |g*prev| < 1e-30 (underflow range), or g a
/// nonzero float32-subnormal (flush-to-zero could make sign(g) 0); else 0.
/// rprop follows torch.optim.Rprop: step_size is multiplied by eta_plus / eta_minus / 1 and then
/// clamped to [step_size_min, step_size_max] at every element (also where the sign is 0).
/// Throws std::invalid_argument for an unknown algorithm, an option key the algorithm does not
/// have, a missing state buffer, or a grad/state whose size differs from param's.
void step(const std::string& algorithm, const OptionMap& options, std::int64_t t,
          std::vector<double>& param, const std::vector<double>& grad, StateMap& states,
          std::vector<unsigned char>* ambiguous = nullptr);
/// Factored second moments (adafactor): the states a param of `shape` keeps ({"row_var",
/// "col_var"} for two or more dimensions, over the last two; {"variance"} for fewer), and how
/// many values each holds.
std::vector<std::string> factored_state_names(const std::string& algorithm,
                                              const std::vector<std::int64_t>& shape);
std::int64_t factored_state_size(const std::string& state, const std::vector<std::int64_t>& shape);
/// One adafactor step of a param of `shape` (torch.optim.Adafactor's algorithm, in double);
/// `states` holds factored_state_names' buffers. step() of a vector param is this with
/// shape {n}.
void factored_step(const std::string& algorithm, const OptionMap& options, std::int64_t t,
                   const std::vector<std::int64_t>& shape, std::vector<double>& param,
                   const std::vector<double>& grad, StateMap& states);

/// The weight EMA after a step (docs/optimizers.md, "Weight EMA"), in double, for every
/// element: ema <- ema + (1 - decay) * (param - ema), `param` being the param after the step.
/// The EMA starts as a copy of the param before its first step (the caller's). Throws
/// std::invalid_argument if the sizes differ or decay is outside [0, 1).
void ema_update(std::vector<double>& ema, const std::vector<double>& param, double decay);

/// One sparse step (docs/optimizers.md, "Sparse steps"): the gradient rows of each distinct index
/// are summed, then each touched row of the [rows x dim] table takes one step() with the table's
/// step count t; untouched rows and their states are not changed. Throws on a bad index.
/// adagrad with rowwise = 1 (FBGEMM's row-wise AdaGrad; its state "sum" has `rows` values):
/// sum[r] += mean over the row of g*g, then p -= clr / (sqrt(sum[r]) + eps) * g.
void sparse_step(const std::string& algorithm, const OptionMap& options, std::int64_t t,
                 std::vector<double>& table, std::int64_t rows, std::int64_t dim,
                 const std::vector<std::int64_t>& indices, const std::vector<double>& grad_rows,
                 StateMap& states);

}  // namespace fo::ref
