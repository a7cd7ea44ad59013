// The one place where an algorithm's type is erased. The optimizer objects and the C ABI work
// by name and with options as numbers; Algorithm is what they hold: implemented once, by
// AlgorithmImpl<A> (algorithms.cpp), for every registered algorithm. It keeps each param's
// options as A::Options, made once when they change, and steps through the backends' typed
// templates: no algorithm index, no untyped payload, no option vector in a step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "fusedopt/optimizer.hpp"
#include "sparse.hpp"

namespace fo::detail {

/// What a param's option values imply for the generic layer: checked once, when they change.
struct OptionFacts {
  std::string error;  // why the values are invalid, or "" when they are valid
  bool has_state[kMaxStates] = {};
  float state_init[kMaxStates] = {};
  bool state_from_param[kMaxStates] = {};  // starts as a copy of the param
  StateShape state_shape[kMaxStates] = {};
  bool dense = true;           // takes dense steps (no row-wise state)
  std::string sparse_refusal;  // why a sparse step refuses these values, or ""
  std::string cpu_refusal;     // why the CPU backend refuses these values, or ""
};

/// Values in a state of this shape for a param of `shape` (numel elements); 0 where such a
/// param does not keep it.
std::int64_t state_numel(StateShape s, const std::vector<std::int64_t>& shape, std::int64_t numel);
/// Whether a param of `shape` keeps a state of this shape (factored states: by its dimensions).
bool state_kept(StateShape s, const std::vector<std::int64_t>& shape);
/// The param as a batch of matrices over its last two dimensions (factored algorithms); unset
/// (rows 0) for fewer than two dimensions.
MatrixView matrix_view(const std::vector<std::int64_t>& shape);

class Algorithm {
 public:
  virtual ~Algorithm() = default;
  virtual const AlgorithmDescription& description() const = 0;

  /// What option values (description().options order) mean; .error when they are invalid
  /// (not finite, a flag not 0 or 1, or against the algorithm's constraints).
  virtual OptionFacts facts(const std::vector<double>& values) const = 0;

  /// Sets the options of param `param` (an index up to the number set so far, which adds one)
  /// from valid values. Only adding can throw (memory).
  virtual void set_options(std::size_t param, const std::vector<double>& values) = 0;
  /// Whether params a and b have equal options (they can share a multi-tensor launch).
  virtual bool same_options(std::size_t a, std::size_t b) const = 0;

  /// A dense step of param `param` on the CPU at step count `step`; `scalars`: its scalar
  /// states (description().scalars), advanced by the step, or null where there are none;
  /// `storage`: where the tensors are when not all float32 (cpu::Storage), or null.
  virtual void cpu_step(std::size_t param, std::int64_t step, const cpu::DensePtrs& t,
                        std::int64_t n, double* scalars, const cpu::Storage* storage) const = 0;
  /// Grows the calling thread's CPU scratch to what cpu_step of a tensor of n elements viewed
  /// as `view` with `storage` (its dtypes only; or null) asks for (cpu::reserve_step).
  virtual void cpu_reserve(const MatrixView& view, std::int64_t n,
                           const cpu::Storage* storage) const = 0;
  /// eval() of param `param` (description().eval) on the CPU / on CUDA.
  virtual void cpu_eval(std::size_t param, float* p, float* const* states,
                        std::int64_t n) const = 0;
  virtual void cuda_eval(std::size_t param, const cuda::ListEntry& e, DType param_dtype,
                         DType state_dtype, void* stream) const = 0;
  /// Bytes of device workspace a CUDA step of these entries needs (settings.d_workspace).
  virtual std::size_t cuda_workspace(const cuda::ListEntry* entries, std::size_t n) const = 0;
  /// A multi-tensor step on CUDA of tensors sharing the options of param `param`.
  virtual void cuda_step(std::size_t param, const cuda::ListEntry* entries, std::size_t n,
                         const cuda::ListPlan& plan, const cuda::ListSettings& settings,
                         void* stream) const = 0;
  /// A sparse step of param `param` (description().sparse) at step count `step`.
  virtual void sparse_step(std::size_t param, std::int64_t step, const SparseStep& s, Device device,
                           void* stream) const = 0;
};

/// A new Algorithm of the registered algorithm `name` with no params, or null if unknown.
std::unique_ptr<Algorithm> make_algorithm(std::string_view name);

/// Index of `key` in `names`, or -1.
int index_of(const std::vector<std::string>& names, std::string_view key);

}  // namespace fo::detail
