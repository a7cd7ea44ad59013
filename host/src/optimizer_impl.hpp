// fo::Optimizer's state, shared by the files that implement it: optimizer.cpp (options,
// params, state queries), settings.cpp (the optimizer-wide step settings), optimizer_step.cpp
// (dense and sparse steps) and optimizer_checkpoint.cpp (save and load).
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "algorithm.hpp"
#include "buffer.hpp"
#include "cuda/cuda_backend.hpp"
#include "fusedopt/optimizer.hpp"
#include "messages.hpp"

namespace fo::detail {

inline constexpr const char* kMasterState = "master";
inline constexpr const char* kEmaState = "ema";
// In a checkpoint saved in eval mode: the params' training form (and its master weights).
inline constexpr const char* kTrainParamState = "train_param";
inline constexpr const char* kTrainMasterState = "train_master";
// A checkpoint's per-param scalar states: "scalar." and the scalar's name.
inline constexpr const char* kScalarPrefix = "scalar.";
// A checkpoint's per-param pair "algorithm." and the algorithm's name (value 1) marks a param
// not stepped by the checkpoint's (the constructor's) algorithm.
inline constexpr const char* kAlgorithmPrefix = "algorithm.";
// A checkpoint option saved in eval mode only.
inline constexpr const char* kEvalModeKey = "eval_mode";

/// A state_dtype option's value as a storage (0, 2, 5, 6); throws invalid_argument naming `who`.
DType parse_state_dtype(double v, const std::string& who);

/// Optimizer-wide step settings (optimizer.hpp), kept apart from the algorithm's options.
struct Settings {
  double grad_scale = 1.0;  // gradients are divided by it
  double max_grad_norm = 0.0;
  bool skip_nonfinite = false;
  bool master_weights = false;
  DType state_dtype = DType::f32;
  bool fp32_grads = false;
  bool stochastic_rounding = false;
  double seed = 0.0;
  double ema_decay = 0.0;  // weight EMA: 0 off, else its decay in (0, 1)
  // With quantized states (state_dtype q8, q4): params of fewer elements keep float32 states.
  std::int64_t min_quant_size = 4096;

  static const std::vector<std::string>& keys();
  static bool is_key(std::string_view key);
  /// Settings that fix a param's storage once it has stepped.
  static bool is_storage_key(std::string_view key);
  double get(std::string_view key) const;
  /// Validates and sets; throws without changing anything. Both backends take every value.
  void set(std::string_view key, double v);
  /// What multiplies the gradients: 1 / grad_scale.
  float grad_multiplier() const { return static_cast<float>(1.0 / grad_scale); }
};

/// One algorithm of an optimizer (the first is the constructor's; others step the params
/// added with them) and the option values its params default to.
struct AlgorithmSlot {
  std::unique_ptr<Algorithm> algorithm;
  std::vector<double> defaults;
  std::size_t num_params = 0;  // its params are the algorithm's param indices 0, 1, ...

  const AlgorithmDescription& desc() const { return algorithm->description(); }
};

struct ParamEntry {
  std::string name;
  void* data;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::int64_t numel;
  int key;                                       // its index: RNG stream and device step slot
  std::size_t slot = 0;                          // its algorithm: Impl::slots[slot]
  std::size_t local = 0;                         // its index among that algorithm's params
  std::vector<std::optional<double>> overrides;  // per option index
  std::vector<double> options;                   // effective: defaults with overrides applied
  OptionFacts facts;                             // what `options` imply
  // Steps launched. On the CPU every launched step is taken (a skipped one is not launched);
  // on CUDA the device may skip one (found_inf), so the device's count is the step count and
  // this is an upper bound of it.
  std::int64_t steps_launched = 0;
  std::optional<DType> state_dtype;          // its own state storage (set_param_option), or
                                             // unset: the optimizer's (Impl::state_dtype)
  std::optional<Buffer> states[kMaxStates];  // created at the first step
  std::optional<Buffer> master;              // f32 master weights
  std::optional<Buffer> ema;                 // f32 weight EMA (ema_decay > 0)
  std::optional<Buffer> scalars;             // the algorithm's scalar states (doubles)
  // eval mode: the training form of the param (its bytes) and of its master weights.
  std::optional<Buffer> train_param;
  std::optional<Buffer> train_master;

  /// Whether the param keeps state k under facts `f` (its options, and for factored states
  /// its dimensions).
  bool keeps(const OptionFacts& f, int k) const {
    return f.has_state[k] && state_kept(f.state_shape[k], shape);
  }
  /// Values in state k's buffer under facts `f`.
  std::int64_t state_numel(const OptionFacts& f, int k) const {
    return detail::state_numel(f.state_shape[k], shape, numel);
  }
  /// True once the param has state or master buffers (or has stepped): its storage layout is
  /// then fixed, even if the step that created the buffers failed or was skipped.
  bool has_buffers() const {
    if (steps_launched > 0 || master || ema || scalars) return true;
    for (const auto& b : states)
      if (b) return true;
    return false;
  }
};

/// Params that share options and dtype: one multi-tensor launch sequence per step on CUDA.
/// Its entries and plan are kept between steps: a step that steps the same params as the
/// previous one plans nothing and allocates nothing.
struct StepGroup {
  std::vector<std::size_t> members;  // param indices
  std::vector<std::size_t> planned;  // the members the plan was made for
  std::vector<cuda::ListEntry> entries;
  cuda::ListPlan plan;
};

}  // namespace fo::detail

namespace fo {

struct Optimizer::Impl {
  std::vector<detail::AlgorithmSlot> slots;  // [0]: the constructor's algorithm
  Device device;
  int device_index;
  detail::Settings settings;
  std::vector<detail::ParamEntry> params;
  std::map<std::string, std::size_t, std::less<>> by_name;  // finds a string_view, no copy

  // The step path's scratch, kept between steps so that a step allocates nothing.
  std::vector<std::size_t> stepping;
  std::vector<double> norm_partials;
  std::vector<detail::StepGroup> groups;  // CUDA; rebuilt when options or params change
  bool groups_stale = true;
  detail::StepGroup norm_list;  // CUDA: every stepping param, for the norm pass

  // CPU: the last norm. CUDA: device buffers for step counts, the norm pass and its scalars.
  float host_norm = std::numeric_limits<float>::quiet_NaN();
  std::optional<detail::Buffer> d_steps;  // int64 per param key
  std::size_t d_steps_capacity = 0;
  std::optional<detail::Buffer> d_workspace;
  std::optional<detail::Buffer> d_step_workspace;  // the algorithm's (trust-ratio steps)
  std::vector<cuda::ListEntry> workspace_query;    // sizes of the stepping params, reused
  std::optional<detail::Buffer> d_scalars;         // [norm, clip, found_inf]
  bool norm_computed = false;
  bool eval_mode = false;  // eval(): params hold their evaluation form
  const float* d_lr = nullptr;
  const float* d_grad_multiplier = nullptr;
  float* d_found_inf = nullptr;
  // CUDA: the grad pointer of each param last found to be memory of this device. A training
  // loop passes the same buffers every step, so the pointer query runs once per buffer, not
  // once per step. (Under unified addressing a live device range is never a host address.)
  std::vector<const void*> device_checked_grads;

  /// The constructor's algorithm.
  const AlgorithmDescription& desc() const { return slots[0].desc(); }
  /// Param p's algorithm.
  const detail::AlgorithmSlot& slot(const detail::ParamEntry& p) const { return slots[p.slot]; }
  const AlgorithmDescription& desc(const detail::ParamEntry& p) const {
    return slots[p.slot].desc();
  }
  /// The slot of registered algorithm `name`, or slots.size() if this optimizer has none yet.
  std::size_t find_slot(std::string_view name) const;
  /// An option key of the optimizer's defaults: "lr" is the constructor's algorithm's, and
  /// "adamw.lr" that of adamw (a second algorithm's). `slot` is slots.size() for a registered
  /// algorithm this optimizer has no slot of yet (`fresh` then holds a new one).
  struct OptionKey {
    std::size_t slot;
    int index;
    std::unique_ptr<detail::Algorithm> fresh;
  };
  OptionKey option_key(std::string_view key) const;
  /// Index of option `key` of slot s; throws naming the options and settings if there is none.
  int option_index(std::size_t s, std::string_view key) const;
  /// Facts of `values` under slot s's algorithm; throws (invalid_argument, prefixed by `who`)
  /// if they are invalid.
  detail::OptionFacts checked_facts(std::size_t s, const std::vector<double>& values,
                                    const std::string& who) const;
  /// Throws if param `p` may not move to options with facts `next`.
  void check_transition(const detail::ParamEntry& p, const detail::OptionFacts& next) const;
  /// Commits valid options to param i (its typed options included).
  void assign(std::size_t i, std::vector<double> values, detail::OptionFacts facts) noexcept;

  detail::ParamEntry& param(std::string_view name);
  const detail::ParamEntry& param(std::string_view name) const;

  DType grad_dtype(const detail::ParamEntry& p) const {
    return settings.fp32_grads ? DType::f32 : p.dtype;
  }
  bool has_master(const detail::ParamEntry& p) const {
    return settings.master_weights && p.dtype != DType::f32;
  }
  bool has_ema() const { return settings.ema_decay > 0.0; }
  /// Whether p's param or states are not float32: on the CPU its steps then go through the
  /// storage layer (cpu::Storage).
  bool low_storage(const detail::ParamEntry& p) const {
    return p.dtype != DType::f32 || state_dtype(p) != DType::f32;
  }
  /// The storage of p's states: its own (set_param_option), else the optimizer's state_dtype,
  /// except that quantized states are float32 for params under min_quant_size elements.
  DType state_dtype(const detail::ParamEntry& p) const {
    if (p.state_dtype) return *p.state_dtype;
    const DType d = settings.state_dtype;
    if ((d == DType::q8 || d == DType::q4) && p.numel < settings.min_quant_size) return DType::f32;
    return d;
  }
  std::size_t state_bytes(const detail::ParamEntry& p, int k) const {
    return storage_bytes(state_dtype(p), p.state_numel(p.facts, k));
  }
  /// Bytes of n values stored as `d` (a quantized state: its codes and scales).
  static std::size_t storage_bytes(DType d, std::int64_t n);
  /// State k of p as n float32 values into `out` (host memory), from its buffer `b` (of p's
  /// state storage, on the optimizer's device).
  void read_state(const detail::ParamEntry& p, int k, const detail::Buffer& b, float* out,
                  std::int64_t n) const;
  /// Why p's states cannot be stored as they are set (quantized states of an algorithm or
  /// options that cannot take them), or "".
  std::string storage_problem(const detail::ParamEntry& p) const;

  void create_first_step_state(const std::size_t* indices, std::size_t n, void* stream);
  void grow_device_steps(void* stream);
  float cpu_norm(const void* const* grads, float mult, bool* nonfinite);
  void step_cpu(const void* const* grads);
  /// swap_ema (swap) or copy_ema_to_params: checks every param first.
  void apply_ema(bool swap, const char* who, void* stream);
  /// eval() (to_eval) or train().
  void switch_mode(bool to_eval, void* stream);
  void regroup();
  void step_cuda(const void* const* grads, void* stream);
};

}  // namespace fo
