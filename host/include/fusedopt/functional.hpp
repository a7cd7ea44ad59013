// The stateless layer: one call is one fused optimizer step over one tensor, or over a list of
// tensors sharing options, with the caller owning every buffer. The optimizer objects
// (optimizer.hpp) are built on it, and so are the Python bindings (python/), which own their
// state as torch tensors.
//
//   fo::Adam::Options opt;  opt.lr = 3e-4;
//   fo::fused_step<fo::Adam>(opt, step, {param, grad, {exp_avg, exp_avg_sq}, n});
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/types.hpp"

namespace fo {

/// The buffers of one dense step. states[k] is the algorithm's k-th state (A::kStates order);
/// an entry the options do not use is ignored. Every pointer is on the Exec's device.
struct DenseTensors {
  void* param = nullptr;
  const void* grad = nullptr;
  void* states[kMaxStates] = {nullptr, nullptr, nullptr};
  float* master = nullptr;  // f32 master weights of a low-precision param, or null
  std::int64_t numel = 0;
  DType param_dtype = DType::f32;  // f32, bf16 or f16
  // grad_dtype: the param's, or f32. state_dtype: f32, bf16, or block-quantized q8 or q4
  // (docs/quantized-states.md) for the algorithms whose step is one elementwise pass and
  // whose used states do not start as a copy of the param (AlgorithmDescription::quantizable;
  // others: fo::Error unsupported). A quantized state is ONE byte buffer of
  // quant_state_bytes(numel, 8 or 4) bytes (kernels/quantize.hpp: the codes, zero padding to
  // 16 bytes, one float32 absmax per block), 16-byte aligned (else invalid_argument), created
  // with fill_quantized_state (the state's StateSpec init and non_negative) and carried from
  // step to step as it is. The CPU steps it through its storage layer, bitwise as
  // fo::Optimizer with state_dtype 5 or 6; CUDA takes it where its kernels do.
  DType grad_dtype = DType::f32;
  DType state_dtype = DType::f32;
  // f32 weight EMA, or null: updated in the same pass, after the step, with
  // StepControls::ema_decay from the param's new f32 value (docs/optimizers.md, "Weight EMA").
  // The caller creates it as a copy of the param (of the master weights) before its first step.
  float* ema = nullptr;
  // The algorithm's scalar states (fo::step_scalars: sgd_schedule_free's lr_max and
  // weight_sum), kMaxScalars doubles the caller keeps per tensor, host memory on the CPU and
  // device memory on CUDA, starting at their initial values; the step reads them and writes
  // their next values (on CUDA stream-ordered, not when the step is skipped by d_found_inf).
  // Null for algorithms without them. A tensor with them steps even when empty.
  double* scalars = nullptr;
  // The tensor as a batch of matrices [batch, rows, cols] over its last two dimensions, for
  // algorithms with factored states (adafactor: row_var holds batch * rows values, col_var
  // batch * cols; docs/optimizers.md). Unset (rows 0): a vector, which keeps the per-element
  // state (adafactor's variance) instead. Ignored by every other algorithm.
  MatrixView view{};
};

/// Where a step runs: the CPU (threads, see cpu.hpp) or a CUDA stream (null: default stream).
struct Exec {
  Device device = Device::cpu;
  void* stream = nullptr;  // cudaStream_t
  int device_index = -1;   // CUDA: the device made current for the call (-1: the current one)
};

/// Extras of a step. The device-side scalars (d_*) need CUDA; both backends take the rest.
struct StepControls {
  float grad_multiplier = 1.0f;      // every gradient is multiplied by this (1 / loss scale)
  double ema_decay = 0.0;            // decay of the tensors' weight EMAs, in [0, 1)
  bool stochastic_rounding = false;  // low-precision writes round stochastically
  std::uint64_t seed = 0;            // with `key`, keys the draws (with step and element)
  int key = 0;
  const float* d_lr = nullptr;               // a device-side factor on lr (a schedule's)
  const float* d_grad_multiplier = nullptr;  // a device-side gradient multiplier
  const float* d_found_inf = nullptr;        // where non-zero, the step does nothing
  // CUDA: the caller vouches that every buffer is device memory (a DLPack producer said so),
  // which skips the pointer query per buffer (about a microsecond each).
  bool buffers_on_device = false;
};

/// One fused step of algorithm A (fo::Sgd, fo::Adam, ... from the registry) at step count
/// `step` (1 on the first step). Validates the options and buffers first and throws fo::Error
/// without writing anything if they are bad. On CUDA the step is asynchronous on the stream,
/// and every buffer must be CUDA device (or managed) memory: checked by a pointer query per
/// buffer, about a microsecond each (fo::Optimizer checks a grad buffer once, not per step).
template <class A>
void fused_step(const typename A::Options& options, std::int64_t step, const DenseTensors& t,
                const Exec& exec = {}, const StepControls& controls = {});

#define FO_DECLARE_FUSED_STEP(A)                                                           \
  extern template void fused_step<A>(const A::Options&, std::int64_t, const DenseTensors&, \
                                     const Exec&, const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_DECLARE_FUSED_STEP)
#undef FO_DECLARE_FUSED_STEP

/// One step of algorithm A over a list of n tensors under the same options: tensors[i] takes
/// step count steps[i] (each >= 1; they may differ, as for params that skipped steps), with
/// the same result, bit for bit, as fused_step on each tensor. Every tensor has the same
/// param, grad and state dtypes. On CUDA the list goes out as multi-tensor launches (tensors at
/// the same step share launches); on the CPU each tensor is one threaded pass. Everything is
/// validated before anything is written: a call that throws fo::Error has changed nothing.
///   const fo::DenseTensors ts[] = {{w, gw, {mw, vw}, nw}, {b, gb, {mb, vb}, nb}};
///   const std::int64_t steps[] = {t, t};
///   fo::fused_step_list<fo::Adam>(opt, ts, steps, 2);
template <class A>
void fused_step_list(const typename A::Options& options, const DenseTensors* tensors,
                     const std::int64_t* steps, std::size_t n, const Exec& exec = {},
                     const StepControls& controls = {});

#define FO_DECLARE_FUSED_STEP_LIST(A)                                                    \
  extern template void fused_step_list<A>(const A::Options&, const DenseTensors*,        \
                                          const std::int64_t*, std::size_t, const Exec&, \
                                          const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_DECLARE_FUSED_STEP_LIST)
#undef FO_DECLARE_FUSED_STEP_LIST

/// Option values by their docs/optimizers.md names (flags as 0 or 1); an option not named
/// keeps its default.
using NamedOptions = std::vector<std::pair<std::string, double>>;

/// fused_step_list with the algorithm ("adam", ...) and its options named, for code that
/// holds no algorithm type (bindings). Throws fo::Error, having changed nothing, for an
/// unknown algorithm or option, a flag that is not 0 or 1, or what the typed call rejects.
///   fo::fused_step_list("adamw", {{"lr", 3e-4}, {"weight_decay", 0.1}}, ts, steps, 2);
void fused_step_list(std::string_view algorithm, const NamedOptions& options,
                     const DenseTensors* tensors, const std::int64_t* steps, std::size_t n,
                     const Exec& exec = {}, const StepControls& controls = {});

/// Every check fused_step_list(algorithm, ...) makes, without the step: for a caller that
/// steps several lists as one operation (param groups) and must not step any when one is
/// bad. Throws what that call would throw.
void check_step_list(std::string_view algorithm, const NamedOptions& options,
                     const DenseTensors* tensors, const std::int64_t* steps, std::size_t n,
                     const Exec& exec = {}, const StepControls& controls = {});

/// One state buffer a step uses: its name (A::kStates), its slot in DenseTensors::states and
/// the value it starts at.
struct StateSpec {
  std::string name;
  int index = 0;
  double init = 0.0;
  bool per_row = false;  // one value per table row (sparse_step_states, row-wise), not per element
  bool from_param = false;  // starts as a copy of the param (its master weights), not at init
  // How many values it holds for a param (StateShape): one per element, or for factored
  // states (adafactor) one per matrix row or column, kept only by params of two or more
  // dimensions (factor_rows, factor_cols) or of fewer (unfactored): state_shape() below.
  StateShape shape = StateShape::element;
  // Never negative (A::kNonNegativeStates): a quantized state of it takes the unsigned map.
  bool non_negative = false;
};

/// The shape of state `spec` for a param of `shape` (ndim dims), in torch's layout: the
/// param's own, or for a factored state the param's with its last dimension (factor_rows:
/// [..., rows, 1]) or its second-to-last (factor_cols: [..., 1, cols]) set to 1. False where
/// such a param does not keep the state (`out` is then left empty).
bool state_shape(const StateSpec& spec, const std::int64_t* shape, int ndim,
                 std::vector<std::int64_t>& out);

/// A param of `shape` as a batch of matrices over its last two dimensions
/// (DenseTensors::view); unset (rows 0) for fewer than two dimensions.
MatrixView matrix_view(const std::int64_t* shape, int ndim);

/// A per-tensor scalar state of an algorithm (DenseTensors::scalars): its name and initial value.
struct ScalarSpec {
  std::string name;
  double init = 0.0;
};

/// The scalar states of `algorithm`, in DenseTensors::scalars order (none for most). Throws
/// fo::Error for an unknown algorithm.
std::vector<ScalarSpec> step_scalars(std::string_view algorithm);

/// The evaluation form of params (algorithms whose AlgorithmDescription::eval is set:
/// sgd_schedule_free, adamw_schedule_free): tensors[i].param (and its master weights) <- its
/// evaluation value from itself and its states (docs/optimizers.md); grads are not read. The
/// caller keeps the training values to restore them bitwise (the optimizer objects' train()).
/// Checked first, like fused_step_list.
void eval_params(std::string_view algorithm, const NamedOptions& options,
                 const DenseTensors* tensors, std::size_t n, const Exec& exec = {});

/// The states a dense step of `algorithm` under `options` reads and writes (in slot order),
/// each with its initial value: what a caller that owns the state allocates before a param's
/// first step. Validates like fused_step_list (throws fo::Error for an unknown algorithm or
/// option, or invalid values), so it also checks options where they are set.
///   for (const fo::StateSpec& s : fo::step_states("adam", {{"amsgrad", 1}})) ...
std::vector<StateSpec> step_states(std::string_view algorithm, const NamedOptions& options);

/// Block-quantized state buffers (DenseTensors::state_dtype q8 or q4) in host memory, for a
/// caller that owns its states (bindings): `q` is DType::q8 or DType::q4, `non_negative` the
/// state's StateSpec::non_negative (which map it takes), n the param's numel. Each buffer is
/// quantized_state_bytes(q, n) bytes; its codes round to nearest and its padding is zeroed.
/// Throws fo::Error invalid_argument for another dtype, n < 0 or a null pointer (n > 0).
///   std::vector<unsigned char> m(fo::quantized_state_bytes(fo::DType::q8, n));
///   fo::fill_quantized_state(m.data(), fo::DType::q8, spec.non_negative, spec.init, n);
std::size_t quantized_state_bytes(DType q, std::int64_t n);
/// A state's n values as its buffer `dst` (encoded to nearest, as a step writes them).
void quantize_state(void* dst, DType q, bool non_negative, const float* src, std::int64_t n);
/// The n values of a state's buffer `src`, decoded (exact: value[code] * absmax).
void dequantize_state(float* dst, const void* src, DType q, bool non_negative, std::int64_t n);
/// A state of n copies of `value`: what a step starts from (a quantized fo::Optimizer state's
/// first bytes).
void fill_quantized_state(void* dst, DType q, bool non_negative, float value, std::int64_t n);

/// The buffers of one sparse row step (docs/optimizers.md, "Sparse steps"): a [rows x dim]
/// float32 table, its states (states[k] is the algorithm's k-th state: [rows x dim], or [rows]
/// where the options make the algorithm row-wise; an entry the options do not use is
/// ignored), nnz row indices (int32 or int64, duplicates allowed: their gradient rows are
/// summed) and their [nnz x dim] float32 gradient rows. Every pointer on the Exec's device.
struct SparseTensors {
  float* table = nullptr;
  float* states[kMaxStates] = {nullptr, nullptr, nullptr};
  std::int64_t rows = 0;
  std::int64_t dim = 0;
  const void* indices = nullptr;
  DType index_dtype = DType::i64;
  std::int64_t nnz = 0;
  const float* grad_rows = nullptr;
};

/// One sparse step of algorithm A (one that takes sparse steps: lazyadam, adagrad) at the
/// table's step count `step` (1 on its first step): each distinct indexed row steps once, with
/// the same bits on the CPU and CUDA; no other row or state is read or written. Everything is
/// checked first, every index included (on CUDA: a kernel and a wait for the stream); a call
/// that throws fo::Error has changed nothing. StepControls::buffers_on_device skips the
/// pointer queries, as for dense steps.
///   fo::fused_sparse_step<fo::LazyAdam>(opt, t, {table, {m, v}, rows, dim, idx, fo::DType::i64,
///                                                nnz, grad_rows});
template <class A>
void fused_sparse_step(const typename A::Options& options, std::int64_t step,
                       const SparseTensors& t, const Exec& exec = {},
                       const StepControls& controls = {});

#define FO_DECLARE_FUSED_SPARSE_STEP(A)                                                            \
  extern template void fused_sparse_step<A>(const A::Options&, std::int64_t, const SparseTensors&, \
                                            const Exec&, const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_DECLARE_FUSED_SPARSE_STEP)
#undef FO_DECLARE_FUSED_SPARSE_STEP

/// fused_sparse_step with the algorithm and its options named (for bindings).
void fused_sparse_step(std::string_view algorithm, const NamedOptions& options, std::int64_t step,
                       const SparseTensors& t, const Exec& exec = {},
                       const StepControls& controls = {});

/// Every check fused_sparse_step(algorithm, ...) makes, without the step (for a caller that
/// steps several things as one operation and must step none when one is bad).
void check_sparse_step(std::string_view algorithm, const NamedOptions& options, std::int64_t step,
                       const SparseTensors& t, const Exec& exec = {},
                       const StepControls& controls = {});

/// The states a sparse step of `algorithm` under `options` uses, with the number of values
/// each holds relative to a [rows x dim] table (StateSpec::per_row: one per row). Validates
/// like fused_sparse_step's options (throws for an algorithm without sparse steps).
std::vector<StateSpec> sparse_step_states(std::string_view algorithm, const NamedOptions& options);

}  // namespace fo
