// Optimizer objects: own their state buffers, count steps per param, apply per-param option
// overrides (PyTorch's param groups), and step every param in one call.
//
//   fo::Optimizer opt("adamw", fo::Device::cpu);
//   opt.set_option("lr", 3e-4);
//   opt.add_param("w", w.data(), fo::DType::f32, {rows, cols});
//   opt.step({g.data()});          // grads in add order; nullptr = no gradient this step
//
// One optimizer may step params with several algorithms (Muon for the hidden matrices, AdamW
// for the rest): add_param names a param's algorithm, and "adamw.lr" sets the defaults of a
// second one. Every param still steps in the one step() call and saves in the one checkpoint.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fusedopt/types.hpp"

namespace fo {

/// What a dense algorithm is called and what it has, for enumeration and FFI.
struct AlgorithmDescription {
  std::string name;
  std::vector<std::string> options;  // docs/optimizers.md names, in declaration order
  std::vector<double> defaults;      // flags as 0/1
  std::vector<bool> is_flag;
  std::vector<std::string> states;   // every state the algorithm may keep
  std::vector<bool> non_negative;    // per state: never negative (a quantized state of it takes
                                     // the unsigned map: docs/quantized-states.md)
  bool quantizable = false;          // its states may be stored in 8 or 4 bits (state_dtype 5,
                                     // 6): its step is one elementwise pass
  bool sparse = false;               // takes sparse row steps (step_sparse)
  std::vector<std::string> scalars;  // its per-param scalar states (sgd_schedule_free: lr_max,
                                     // weight_sum), kept in double
  std::vector<double> scalar_init;   // their initial values
  bool eval = false;                 // has an evaluation form of its params (eval(), train())
  bool matrix_only = false;          // steps matrices only (muon): params of 2 or more
                                     // dimensions, a batch of matrices over the last two
};

/// Every registered dense algorithm, in registry order.
const std::vector<AlgorithmDescription>& dense_algorithms();

class Optimizer {
 public:
  /// `algorithm` is a name from docs/optimizers.md ("adam", ...). Throws fo::Error if unknown, or
  /// if `device` is CUDA and this build or machine has no such device.
  explicit Optimizer(std::string_view algorithm, Device device = Device::cpu, int device_index = 0);
  ~Optimizer();
  Optimizer(Optimizer&&) noexcept;
  Optimizer& operator=(Optimizer&&) noexcept;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  const std::string& algorithm() const noexcept;
  Device device() const noexcept;

  /// Sets an option's default for every param without an override of it. Flags take 0 or 1.
  /// Rejected (nothing changes) if any param's options would become invalid, or if a param
  /// that has stepped would gain or lose a state buffer. A plain key ("lr") is an option of
  /// the constructor's algorithm; "adamw.lr" is the option of adamw, for the params added with
  /// that algorithm (add_param), and may be set before any of them is added.
  ///
  /// Besides the algorithm's options (docs/optimizers.md), optimizer-wide step settings:
  ///   grad_scale (1)        gradients are divided by it: the loss scale of mixed precision
  ///   max_grad_norm (0)     clip the global L2 norm of all (unscaled) gradients to this; 0: off
  ///   skip_nonfinite (0)    if any gradient is inf or nan, skip the whole step: params, states
  ///                         and step counts stay bitwise unchanged
  ///   master_weights (0)    bf16/f16 params keep an f32 master copy, stepped in fp32
  ///   state_dtype (0)       0: float32 states; 2: bfloat16 states; 5: 8-bit and 6: 4-bit
  ///                         block-quantized states (docs/quantized-states.md), for the
  ///                         algorithms whose step is one elementwise pass
  ///   min_quant_size (4096) with state_dtype 5 or 6, params of fewer elements keep float32
  ///                         states; a param's own state_dtype (set_param_option) overrides
  ///                         both. load() keeps this optimizer's state_dtype and
  ///                         min_quant_size and converts the file's states into them
  ///   fp32_grads (0)        grads of bf16/f16 params are float32
  ///   stochastic_rounding (0), seed (0): stochastic rounding of low-precision writes
  /// Both backends take every storage, with the same bytes, for every kind of step (the
  /// block-quantized states for the one-pass elementwise algorithms only).
  ///   ema_decay (0)         weight EMA: each param keeps a float32 average of its values,
  ///                         updated in the step's pass (state "ema"); in [0, 1), 0: off
  /// The storage settings (master_weights, state_dtype, min_quant_size, fp32_grads) are fixed
  /// once a param
  /// has stepped; so is whether ema_decay is 0 (its non-zero value may change at any time).
  void set_option(std::string_view key, double value);
  double option(std::string_view key) const;

  /// Registers a param the caller owns (on this optimizer's device, aligned to its element
  /// size). State buffers are created and initialised from the options at its first step.
  /// `algorithm`: the registered algorithm that steps it; empty: the constructor's. Its
  /// options start from that algorithm's defaults in this optimizer ("adamw.lr").
  void add_param(std::string name, void* data, DType dtype, std::vector<std::int64_t> shape,
                 std::string_view algorithm = {});
  /// The algorithm that steps param `name`.
  const std::string& param_algorithm(std::string_view name) const;
  /// A param's own option: `key` is an option of its algorithm, by its plain name ("lr"), or
  /// "state_dtype": the storage of this param's states (the values of the optimizer's option),
  /// until its first step.
  void set_param_option(std::string_view name, std::string_view key, double value);
  double param_option(std::string_view name, std::string_view key) const;

  /// One step of every param: grads[i] is the gradient of the i-th added param (same dtype
  /// and numel) or null to leave that param, its state and its step count untouched. Exactly
  /// num_params() entries. `stream` is a cudaStream_t on CUDA (null: default), ignored on CPU.
  void step(const void* const* grads, void* stream = nullptr);
  void step(std::initializer_list<const void*> grads, void* stream = nullptr);

  /// A sparse step of an embedding table `name` ([rows x dim], float32): `indices` (nnz of
  /// them, int32 or int64) name rows of the table and `grad_rows` ([nnz x dim], float32)
  /// their gradients. Duplicates are summed deterministically; each distinct row takes one
  /// step with the table's step count; untouched rows and their state stay bitwise as they
  /// were. Every index is checked first: one outside [0, rows) is an error naming its
  /// position, and nothing changes. nnz == 0 still counts the step. Algorithms with
  /// AlgorithmDescription::sparse (lazyadam; adagrad without weight decay). On CUDA this
  /// waits for the index check; the update itself is stream-ordered.
  ///
  /// adagrad with rowwise = 1 (FBGEMM's row-wise AdaGrad) keeps one accumulator per row,
  /// state [rows]: sum += mean(g*g) over the row, p -= lr / (sqrt(sum) + eps) * g. Such a
  /// param takes sparse steps only; a dense step naming it is rejected. In an optimizer that
  /// also steps dense params, set it per table: set_param_option(table, "rowwise", 1).
  void step_sparse(std::string_view name, const void* indices, DType index_dtype, std::int64_t nnz,
                   const void* grad_rows, void* stream = nullptr);

  /// CUDA, for capturable steps (CUDA graphs): every param's lr option is multiplied by
  /// `*d_lr` at run time (a schedule's factor; per-param lrs keep their ratios), gradients
  /// are also multiplied by `*d_grad_multiplier`, and a non-zero `*d_found_inf` skips the
  /// step (the step's own non-finite check, with skip_nonfinite, sets it too). Null: unused.
  /// Step counts of a CUDA optimizer always live on the device, so a step never waits for
  /// the host. The first step of a param allocates its state: take it before capturing.
  void set_device_scalars(const float* d_lr, const float* d_grad_multiplier, float* d_found_inf);

  /// The weight EMA (ema_decay > 0, docs/optimizers.md "Weight EMA") into the params, e.g. to
  /// evaluate with it. swap_ema exchanges each param and its EMA bitwise, so a second call
  /// restores both; a param with master weights swaps them with the EMA and takes the new
  /// master rounded to nearest; a bf16/f16 param without master weights is refused (its EMA
  /// would not come back). copy_ema_to_params overwrites the params (and master weights)
  /// with the EMA (rounded to nearest into a bf16/f16 param) and keeps the EMA. A param that
  /// has not stepped has no EMA buffer yet (it is the param): it is left as it is. Checked
  /// before anything changes; on CUDA stream-ordered on `stream`.
  void swap_ema(void* stream = nullptr);
  void copy_ema_to_params(void* stream = nullptr);

  /// Schedule-Free's two forms of the params (algorithms with AlgorithmDescription::eval:
  /// sgd_schedule_free, adamw_schedule_free; docs/optimizers.md). A step moves the training
  /// form y; eval() keeps each stepped param's y (and master weights) in a copy it allocates
  /// and writes the evaluation form x into the param; train() puts y back bitwise and frees
  /// the copy. An optimizer starts in training mode, step() in eval mode is refused, and a
  /// call in the mode it names does nothing. Checked and allocated before anything changes;
  /// on CUDA stream-ordered on `stream`.
  void eval(void* stream = nullptr);
  void train(void* stream = nullptr);
  bool training() const noexcept;

  /// A param's scalar state (AlgorithmDescription::scalars, e.g. weight_sum): its initial
  /// value before the param's first step. On CUDA this waits for the device.
  double scalar_state(std::string_view name, std::string_view scalar) const;

  /// The global gradient norm (after grad_scale) of the last step that computed one
  /// (max_grad_norm > 0 or skip_nonfinite), or NaN. On CUDA this waits for the device.
  float grad_norm() const;

  /// Saves the whole optimizer (options, per-param overrides, step settings, step counts and
  /// every state) to `path`, atomically: a crash mid-save leaves the previous file intact.
  void save(const std::string& path) const;
  /// Loads a checkpoint into this optimizer, which must have the same algorithm and params
  /// (by name, shape, dtype and algorithm; one message names every mismatch). Everything is checked
  /// before anything changes: on any error the optimizer is exactly as it was. A checkpoint
  /// from either device loads into either device.
  void load(const std::string& path);

  std::size_t num_params() const noexcept;
  const std::string& param_name(std::size_t i) const;
  std::int64_t numel(std::string_view name) const;
  std::int64_t step_count(std::string_view name) const;

  /// The states this param keeps under its current options, by the name docs/optimizers.md gives
  /// (and "master" for a param with master weights, "ema" with ema_decay > 0).
  std::vector<std::string> state_names(std::string_view name) const;
  /// Values in a state buffer: the param's numel, or its rows (shape[0]) for a row-wise
  /// state (adagrad with rowwise = 1).
  std::int64_t state_numel(std::string_view name, std::string_view state) const;
  /// Copies a state buffer, as float32, into host memory (`numel` must be state_numel); a
  /// quantized state decoded.
  void get_state(std::string_view name, std::string_view state, float* out,
                 std::int64_t numel) const;
  std::vector<float> state(std::string_view name, std::string_view state) const;
  /// Bytes the optimizer holds for its params now (on their device): state buffers, master
  /// weights, weight EMAs and scalar states; params that have not stepped hold none.
  std::size_t state_memory_bytes() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fo
