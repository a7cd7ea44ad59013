// fused_step and fused_step_list: validation, then one algorithm's step on a backend, typed
// all the way down; and the by-name entries, where the registry's table turns a name into a
// type once per call.
#include "fusedopt/functional.hpp"

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "fusedopt/kernels/ema.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "messages.hpp"
#include "typed_options.hpp"

namespace fo {
namespace {

using detail::invalid;

bool misaligned(const void* p, std::size_t align) {
  return reinterpret_cast<std::uintptr_t>(p) % align != 0;
}

/// The start of a message about tensor `index` of a list (or about the tensor of a single step
/// when index < 0): built only when a check fails, so a list's checks allocate nothing.
template <class A>
std::string label(std::int64_t index) {
  return index < 0 ? std::string(A::kName)
                   : std::string(A::kName) + ": tensor " + std::to_string(index);
}

// Whether a step of tensor t under options o uses state k: the options keep it, and for a
// factored algorithm's states the tensor's matrix view does (kernels/factored.hpp).
template <class A>
bool uses_state(const typename A::Options& o, int k, const MatrixView& v) {
  if (!A::has_state(o, k)) return false;
  const StateShape s = StateShapes<A>::of(o, k);
  if (s == StateShape::factor_rows || s == StateShape::factor_cols) return v.factored();
  if (s == StateShape::unfactored) return !v.factored();
  return true;
}

// Why a step of A under options o cannot keep block-quantized states (q8, q4), or "" where it
// can: its step is one elementwise pass (AlgorithmDescription::quantizable) and no state it
// uses starts as a copy of the param (8 or 4 bits cannot hold weights).
template <class A>
std::string quantized_refusal(const typename A::Options& o, const MatrixView& v) {
  if (const char* why = cpu::quantized_storage_refusal<A>(); *why) return why;
  for (int k = 0; k < StateList<A>::count; ++k)
    if (uses_state<A>(o, k, v) && StateFromParam<A>::of(k))
      return std::string("its state '") + StateList<A>::name(k) +
             "' is a copy of the weights, which block-quantized (int8, int4) states cannot "
             "hold (give it float32 or bfloat16 states)";
  return "";
}

template <class A>
void check_tensors(const typename A::Options& o, const DenseTensors& t, const Exec& exec,
                   const StepControls& c, std::int64_t index) {
  const auto who = [index] { return label<A>(index); };
  if (t.numel < 0) invalid(who() + ": numel must be >= 0, got " + std::to_string(t.numel));
  const bool cuda = exec.device == Device::cuda;
  auto unsupported = [&](const std::string& what) {
    throw Error(StatusCode::unsupported, who() + ": " + what);
  };
  if (t.param_dtype != DType::f32 && t.param_dtype != DType::bf16 && t.param_dtype != DType::f16)
    invalid(who() + ": params must be float32, bfloat16 or float16, got " +
            dtype_name(t.param_dtype));
  if (t.grad_dtype != t.param_dtype && t.grad_dtype != DType::f32)
    invalid(who() + ": grads must be float32 or the param's dtype, got " +
            dtype_name(t.grad_dtype));
  const bool quantized = cpu::is_quantized(t.state_dtype);
  if (t.state_dtype != DType::f32 && t.state_dtype != DType::bf16 && !quantized)
    invalid(who() + ": states must be float32 or bfloat16 (or block-quantized: q8, q4), got " +
            dtype_name(t.state_dtype));
  if (quantized)
    if (const std::string why = quantized_refusal<A>(o, t.view); !why.empty()) unsupported(why);
  if (t.master && t.param_dtype == DType::f32)
    invalid(who() + ": master weights belong to bfloat16 or float16 params");
  if (!cuda) {
    if (c.d_lr || c.d_grad_multiplier || c.d_found_inf)
      unsupported("device-side scalars need the CUDA backend");
    if (const char* why = CpuRefusal<A>::of(o); *why) unsupported(why);
  }
  if constexpr (MatrixCapable<A>::value) {
    const MatrixView& v = t.view;
    if (!is_matrix_batch(v, t.numel))
      invalid(who() + ": steps matrices only: DenseTensors::view must hold the tensor as " +
              "[batch, rows, cols] (a param of 2 or more dimensions), got [" +
              std::to_string(v.batch) + ", " + std::to_string(v.rows) + ", " +
              std::to_string(v.cols) + "] for numel " + std::to_string(t.numel) +
              " (vectors and scalars: use adamw or another elementwise algorithm)");
  }
  if (!std::isfinite(c.grad_multiplier))
    invalid(who() + ": the gradient multiplier must be finite");
  if (t.ema && !(c.ema_decay >= 0.0 && c.ema_decay < 1.0))
    invalid(who() + ": ema_decay must be in [0, 1), got " + detail::format_number(c.ema_decay));
  if constexpr (ScalarList<A>::count > 0) {
    if (!t.scalars) invalid(who() + ": its scalar states (DenseTensors::scalars) are null");
    if (misaligned(t.scalars, sizeof(double)))
      invalid(who() + ": its scalar states are not aligned to a double");
    if (cuda && !c.buffers_on_device && !cuda::is_device_pointer(t.scalars, -1))
      invalid(who() + ": its scalar states are not CUDA device memory");
  }
  if (t.numel == 0) return;
  // what, name: "state", "exp_avg" (name may be ""), joined only for a message.
  auto check = [&](const void* ptr, DType dtype, const char* what_kind, const char* name) {
    auto what = [&] { return std::string(what_kind) + (*name ? " " : "") + name; };
    if (!ptr) invalid(who() + ": " + what() + " is null");
    if (cpu::is_quantized(dtype)) {  // its float32 absmax values follow its codes at 16 bytes
      if (misaligned(ptr, 16))
        invalid(who() + ": " + what() + " is block-quantized (" + dtype_name(dtype) +
                "): its buffer must be 16-byte aligned");
    } else if (misaligned(ptr, dtype_size(dtype))) {
      invalid(who() + ": " + what() + " is not aligned to its element size");
    }
    // A host pointer in a kernel would be an illegal address that ends the CUDA context. One
    // pointer query per buffer (about a microsecond): the Optimizer's steps avoid it.
    if (cuda && !c.buffers_on_device && !cuda::is_device_pointer(ptr, -1))
      invalid(who() + ": " + what() + " is not CUDA device memory");
  };
  check(t.param, t.param_dtype, "param", "");
  check(t.grad, t.grad_dtype, "grad", "");
  if (t.master) check(t.master, DType::f32, "master", "");
  if (t.ema) check(t.ema, DType::f32, "ema", "");
  if constexpr (FactoredCapable<A>::value) {
    const MatrixView& v = t.view;
    if (v.factored() && !(v.batch > 0 && v.cols > 0 && v.batch * v.rows * v.cols == t.numel))
      invalid(who() + ": view [" + std::to_string(v.batch) + ", " + std::to_string(v.rows) + ", " +
              std::to_string(v.cols) + "] does not hold numel " + std::to_string(t.numel) +
              " elements");
  }
  for (int k = 0; k < StateList<A>::count; ++k)
    if (uses_state<A>(o, k, t.view))
      check(t.states[k], t.state_dtype, "state", StateList<A>::name(k));
}

// Options a dense step takes: valid, and not row-wise.
template <class A>
void check_options(const typename A::Options& options) {
  if (const std::string err = detail::options_error<A>(options); !err.empty()) invalid(err);
  if constexpr (RowwiseCapable<A>::value)
    if (A::rowwise(options))
      throw Error(StatusCode::unsupported,
                  std::string(A::kName) +
                      ": rowwise applies to sparse steps of embedding tables (step_sparse); "
                      "dense steps take rowwise = 0");
}

template <class A>
void check_step(std::int64_t step, std::int64_t index) {
  if (step < 1) invalid(label<A>(index) + ": step must be >= 1, got " + std::to_string(step));
}

template <class A>
std::vector<StateSpec> states_of(const NamedOptions& named) {
  const typename A::Options o = detail::options_by_name<A>(named);
  check_options<A>(o);
  std::vector<StateSpec> out;
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(o, k))
      out.push_back({StateList<A>::name(k), k, A::state_init(o, k), false, StateFromParam<A>::of(k),
                     StateShapes<A>::of(o, k), StateList<A>::non_negative(k)});
  return out;
}

// Every check of a list step, in order; throws on the first failure.
template <class A>
void check_list(const typename A::Options& options, const DenseTensors* tensors,
                const std::int64_t* steps, std::size_t n, const Exec& exec,
                const StepControls& controls) {
  check_options<A>(options);
  if (n == 0) return;
  if (!tensors || !steps) invalid(std::string(A::kName) + ": the tensor or step array is null");
  const DenseTensors& first = tensors[0];
  for (std::size_t i = 0; i < n; ++i) {
    const DenseTensors& t = tensors[i];
    const auto index = static_cast<std::int64_t>(i);
    check_step<A>(steps[i], index);
    check_tensors<A>(options, t, exec, controls, index);
    if (t.param_dtype != first.param_dtype || t.grad_dtype != first.grad_dtype ||
        t.state_dtype != first.state_dtype)
      invalid(label<A>(index) + ": its dtypes (param " + dtype_name(t.param_dtype) + ", grad " +
              dtype_name(t.grad_dtype) + ", states " + dtype_name(t.state_dtype) +
              ") differ from tensor 0's (" + dtype_name(first.param_dtype) + ", " +
              dtype_name(first.grad_dtype) + ", " + dtype_name(first.state_dtype) +
              "): one list takes one combination");
    if ((t.master != nullptr) != (first.master != nullptr))
      invalid(label<A>(index) + ": either every tensor of a list has master weights or none has");
  }
}

// A CUDA launch's settings: the dtypes of `t` (every tensor of a list shares them) and the
// step controls.
cuda::ListSettings list_settings(const DenseTensors& t, const StepControls& controls) {
  cuda::ListSettings s;
  s.param_dtype = t.param_dtype;
  s.grad_dtype = t.grad_dtype;
  s.state_dtype = t.state_dtype;
  s.stochastic = controls.stochastic_rounding;
  s.seed = controls.seed;
  s.grad_multiplier = controls.grad_multiplier;
  s.ema_weight = ema_weight(controls.ema_decay);
  s.d_lr = controls.d_lr;
  s.d_grad_multiplier = controls.d_grad_multiplier;
  s.d_found_inf = controls.d_found_inf;
  return s;
}

// A CPU step's storage (cpu::Storage) of `t`, with the states the options use.
cpu::Storage cpu_storage(const DenseTensors& t, void* const* states, const StepControls& c) {
  cpu::Storage s;
  s.param = t.param;
  s.param_dtype = t.param_dtype;
  s.grad = t.grad;
  s.grad_dtype = t.grad_dtype;
  s.master = t.master;
  for (int k = 0; k < kMaxStates; ++k) s.states[k] = states[k];
  s.state_dtype = t.state_dtype;
  s.stochastic = c.stochastic_rounding;
  s.seed = c.seed;
  s.key = c.key;
  return s;
}

/// Stream-ordered device scratch for one call, released in stream order.
class StreamScratch {
 public:
  StreamScratch(std::size_t bytes, void* stream)
      : p_(cuda::allocate_async(bytes, stream)), stream_(stream) {}
  ~StreamScratch() { cuda::deallocate_async(p_, stream_); }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  void* data() const { return p_; }

 private:
  void* p_;
  void* stream_;
};

// A CUDA step of the entries. A trust-ratio algorithm's workspace is this call's, allocated
// and released in stream order (cudaMallocAsync, cudaFreeAsync): the call waits for nothing.
template <class A>
void cuda_list_step(const typename A::Options& options, const cuda::ListEntry* entries,
                    std::size_t n, cuda::ListSettings s, const Exec& exec) {
  cuda::DeviceGuard guard(exec.device_index);
  std::optional<StreamScratch> workspace;
  if (const std::size_t bytes = cuda::step_workspace<A>(entries, n); bytes > 0) {
    workspace.emplace(bytes, exec.stream);
    s.d_workspace = workspace->data();
    s.workspace_bytes = bytes;
  }
  cuda::multi_tensor_step<A>(options, entries, n, cuda::plan_list(entries, n), s, exec.stream);
}

// The registry's table from name to typed entry: the one place a name becomes a type.
struct ByName {
  const char* name;
  void (*step_list)(const NamedOptions&, const DenseTensors*, const std::int64_t*, std::size_t,
                    const Exec&, const StepControls&);
  void (*check_list)(const NamedOptions&, const DenseTensors*, const std::int64_t*, std::size_t,
                     const Exec&, const StepControls&);
  std::vector<StateSpec> (*states)(const NamedOptions&);
  std::vector<ScalarSpec> (*scalars)();
  void (*eval)(const NamedOptions&, const DenseTensors*, std::size_t, const Exec&);
};

template <class A>
std::vector<ScalarSpec> scalars_of() {
  std::vector<ScalarSpec> out;
  for (int k = 0; k < ScalarList<A>::count; ++k)
    out.push_back({ScalarList<A>::name(k), ScalarList<A>::init(k)});
  return out;
}

template <class A>
void eval_by_name(const NamedOptions& named, const DenseTensors* tensors, std::size_t n,
                  const Exec& exec) {
  const typename A::Options o = detail::options_by_name<A>(named);
  check_options<A>(o);
  if (!EvalCapable<A>::value)
    throw Error(StatusCode::unsupported, std::string(A::kName) + " has no evaluation form");
  if (n > 0 && !tensors) invalid(std::string(A::kName) + ": the tensor array is null");
  const bool cuda = exec.device == Device::cuda;
  for (std::size_t i = 0; i < n; ++i) {
    const DenseTensors& t = tensors[i];
    const std::string who = label<A>(static_cast<std::int64_t>(i));
    if (t.numel < 0) invalid(who + ": numel must be >= 0");
    if (t.numel == 0) continue;
    if (t.master && t.param_dtype == DType::f32)
      invalid(who + ": master weights belong to bfloat16 or float16 params");
    if (cpu::is_quantized(t.state_dtype))  // its states copy the weights: never quantized
      throw Error(StatusCode::unsupported,
                  who + ": the evaluation form takes float32 or bfloat16 states, got " +
                      dtype_name(t.state_dtype));
    const auto check = [&](const void* p, std::size_t align, const char* what) {
      if (!p) invalid(who + ": " + what + " is null");
      if (misaligned(p, align)) invalid(who + ": " + what + " is not aligned to its element size");
      if (cuda && !cuda::is_device_pointer(p, -1))
        invalid(who + ": " + what + " is not CUDA device memory");
    };
    check(t.param, dtype_size(t.param_dtype), "param");
    if (t.master) check(t.master, sizeof(float), "master");
    for (int k = 0; k < StateList<A>::count; ++k)
      if (uses_state<A>(o, k, t.view))
        check(t.states[k], dtype_size(t.state_dtype), StateList<A>::name(k));
  }
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(exec.device_index);
  for (std::size_t i = 0; i < n; ++i) {
    const DenseTensors& t = tensors[i];
    if (t.numel == 0) continue;
    void* states[kMaxStates] = {nullptr, nullptr, nullptr};
    for (int k = 0; k < StateList<A>::count; ++k)
      if (A::has_state(o, k)) states[k] = t.states[k];
    if (cuda) {
      const cuda::ListEntry e{t.param, nullptr, t.master, {states[0], states[1], states[2]},
                              t.numel, 0,       0};
      cuda::eval_params<A>(o, e, t.param_dtype, t.state_dtype, exec.stream);
    } else if (t.param_dtype == DType::f32 && t.state_dtype == DType::f32) {
      float* const s[kMaxStates] = {static_cast<float*>(states[0]), static_cast<float*>(states[1]),
                                    static_cast<float*>(states[2])};
      cpu::eval_params<A>(o, static_cast<float*>(t.param), s, t.numel);
    } else {  // as CUDA's eval_kernel: from and into the master, the param rounded to nearest
      const auto count = static_cast<std::size_t>(t.numel);
      std::vector<float> wide((1 + kMaxStates) * count);
      float* const x = t.master ? t.master : wide.data();
      if (!t.master) cpu::widen(x, t.param, t.param_dtype, t.numel);
      float* s[kMaxStates] = {};
      for (int k = 0; k < kMaxStates; ++k) {
        if (!states[k]) continue;
        s[k] = wide.data() + (1 + k) * count;
        cpu::widen(s[k], states[k], t.state_dtype, t.numel);
      }
      cpu::eval_params<A>(o, x, s, t.numel);
      cpu::narrow(t.param, t.param_dtype, x, t.numel);
    }
  }
}

template <class A>
void step_list_by_name(const NamedOptions& named, const DenseTensors* t, const std::int64_t* steps,
                       std::size_t n, const Exec& exec, const StepControls& controls) {
  fused_step_list<A>(detail::options_by_name<A>(named), t, steps, n, exec, controls);
}

template <class A>
void check_list_by_name(const NamedOptions& named, const DenseTensors* t, const std::int64_t* steps,
                        std::size_t n, const Exec& exec, const StepControls& controls) {
  check_list<A>(detail::options_by_name<A>(named), t, steps, n, exec, controls);
}

const ByName& by_name(std::string_view algorithm) {
  static const ByName table[] = {
#define FO_BY_NAME(A)                                            \
  {A::kName,      &step_list_by_name<A>, &check_list_by_name<A>, \
   &states_of<A>, &scalars_of<A>,        &eval_by_name<A>},
      FO_FOR_EACH_DENSE_ALGORITHM(FO_BY_NAME)
#undef FO_BY_NAME
  };
  for (const ByName& entry : table)
    if (algorithm == entry.name) return entry;
  std::vector<std::string> known;
  for (const ByName& entry : table) known.emplace_back(entry.name);
  invalid("unknown algorithm '" + std::string(algorithm) + "' (known: " + detail::join(known) +
          ")");
}

}  // namespace

template <class A>
void fused_step(const typename A::Options& options, std::int64_t step, const DenseTensors& t,
                const Exec& exec, const StepControls& controls) {
  check_options<A>(options);
  check_step<A>(step, -1);
  check_tensors<A>(options, t, exec, controls, -1);
  if (t.numel == 0 && ScalarList<A>::count == 0) return;
  void* states[kMaxStates] = {nullptr, nullptr, nullptr};  // only the ones the options use
  for (int k = 0; k < StateList<A>::count; ++k)
    if (uses_state<A>(options, k, t.view)) states[k] = t.states[k];
  if (exec.device == Device::cuda) {
    const cuda::ListEntry entry{t.param,   t.grad, t.master,     {states[0], states[1], states[2]},
                                t.numel,   step,   controls.key, t.ema,
                                t.scalars, t.view};
    cuda_list_step<A>(options, &entry, 1, list_settings(t, controls), exec);
    return;
  }
  cpu::DensePtrs ptrs{static_cast<float*>(t.param),
                      static_cast<const float*>(t.grad),
                      {static_cast<float*>(states[0]), static_cast<float*>(states[1]),
                       static_cast<float*>(states[2])},
                      controls.grad_multiplier,
                      t.ema,
                      ema_weight(controls.ema_decay),
                      t.view};
  const cpu::Storage storage = cpu_storage(t, states, controls);
  cpu::dense_step<A>(options, step, ptrs, t.numel, t.scalars, &storage);
}

template <class A>
void fused_step_list(const typename A::Options& options, const DenseTensors* tensors,
                     const std::int64_t* steps, std::size_t n, const Exec& exec,
                     const StepControls& controls) {
  // 1. Everything is checked before anything is written.
  check_list<A>(options, tensors, steps, n, exec, controls);
  if (n == 0) return;
  const DenseTensors& first = tensors[0];
  // 2. The step: only the states the options use are passed on, as in fused_step.
  if (exec.device == Device::cuda) {
    std::vector<cuda::ListEntry> entries;
    entries.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      const DenseTensors& t = tensors[i];
      if (t.numel == 0 && ScalarList<A>::count == 0) continue;
      cuda::ListEntry e{t.param,   t.grad,   t.master,     {nullptr, nullptr, nullptr},
                        t.numel,   steps[i], controls.key, t.ema,
                        t.scalars, t.view};
      for (int k = 0; k < StateList<A>::count; ++k)
        if (uses_state<A>(options, k, t.view)) e.states[k] = t.states[k];
      entries.push_back(e);
    }
    if (entries.empty()) return;
    cuda_list_step<A>(options, entries.data(), entries.size(), list_settings(first, controls),
                      exec);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {  // every scratch first: a failure changes nothing
    const DenseTensors& t = tensors[i];
    void* const states[kMaxStates] = {t.states[0], t.states[1], t.states[2]};
    const cpu::Storage storage = cpu_storage(t, states, controls);
    cpu::reserve_step<A>(t.view, t.numel, &storage);
  }
  for (std::size_t i = 0; i < n; ++i) {
    const DenseTensors& t = tensors[i];
    if (t.numel == 0 && ScalarList<A>::count == 0) continue;
    cpu::DensePtrs ptrs{static_cast<float*>(t.param),
                        static_cast<const float*>(t.grad),
                        {nullptr, nullptr, nullptr},
                        controls.grad_multiplier,
                        t.ema,
                        ema_weight(controls.ema_decay),
                        t.view};
    for (int k = 0; k < StateList<A>::count; ++k)
      if (uses_state<A>(options, k, t.view)) ptrs.states[k] = static_cast<float*>(t.states[k]);
    void* const states[kMaxStates] = {ptrs.states[0], ptrs.states[1], ptrs.states[2]};
    const cpu::Storage storage = cpu_storage(t, states, controls);
    cpu::dense_step<A>(options, steps[i], ptrs, t.numel, t.scalars, &storage);
  }
}

#define FO_INSTANTIATE(A)                                                                        \
  template void fused_step<A>(const A::Options&, std::int64_t, const DenseTensors&, const Exec&, \
                              const StepControls&);                                              \
  template void fused_step_list<A>(const A::Options&, const DenseTensors*, const std::int64_t*,  \
                                   std::size_t, const Exec&, const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

void fused_step_list(std::string_view algorithm, const NamedOptions& options,
                     const DenseTensors* tensors, const std::int64_t* steps, std::size_t n,
                     const Exec& exec, const StepControls& controls) {
  by_name(algorithm).step_list(options, tensors, steps, n, exec, controls);
}

void check_step_list(std::string_view algorithm, const NamedOptions& options,
                     const DenseTensors* tensors, const std::int64_t* steps, std::size_t n,
                     const Exec& exec, const StepControls& controls) {
  by_name(algorithm).check_list(options, tensors, steps, n, exec, controls);
}

std::vector<StateSpec> step_states(std::string_view algorithm, const NamedOptions& options) {
  return by_name(algorithm).states(options);
}

std::vector<ScalarSpec> step_scalars(std::string_view algorithm) {
  return by_name(algorithm).scalars();
}

void eval_params(std::string_view algorithm, const NamedOptions& options,
                 const DenseTensors* tensors, std::size_t n, const Exec& exec) {
  by_name(algorithm).eval(options, tensors, n, exec);
}

namespace {
void check_quantized_buffers(const char* who, DType q, std::int64_t n, const void* a,
                             const void* b) {
  if (!cpu::is_quantized(q))
    invalid(std::string(who) + ": the dtype must be q8 or q4 (block-quantized), got " +
            dtype_name(q));
  if (n < 0) invalid(std::string(who) + ": n must be >= 0, got " + std::to_string(n));
  if (n > 0 && (!a || !b)) invalid(std::string(who) + ": a buffer is null");
}
int quant_bits(DType q) { return q == DType::q8 ? 8 : 4; }
}  // namespace

std::size_t quantized_state_bytes(DType q, std::int64_t n) {
  check_quantized_buffers("quantized_state_bytes", q, n, &q, &q);
  return static_cast<std::size_t>(quant_state_bytes(n, quant_bits(q)));
}

void quantize_state(void* dst, DType q, bool non_negative, const float* src, std::int64_t n) {
  check_quantized_buffers("quantize_state", q, n, dst, src);
  if (n > 0) cpu::quantize_state(dst, q, non_negative, src, n);
}

void dequantize_state(float* dst, const void* src, DType q, bool non_negative, std::int64_t n) {
  check_quantized_buffers("dequantize_state", q, n, dst, src);
  if (n > 0) cpu::dequantize_state(dst, src, q, non_negative, n);
}

void fill_quantized_state(void* dst, DType q, bool non_negative, float value, std::int64_t n) {
  check_quantized_buffers("fill_quantized_state", q, n, dst, &q);
  if (n > 0) cpu::fill_quantized(dst, q, non_negative, value, n);
}

const char* dtype_name(DType t) noexcept {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::q8: return "int8 (block-quantized)";
    case DType::q4: return "int4 (block-quantized)";
  }
  return "unknown dtype";
}

std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::f32:
    case DType::i32: return 4;
    case DType::f16:
    case DType::bf16: return 2;
    case DType::i64: return 8;
    case DType::q8:
    case DType::q4: return 1;
  }
  return 0;
}

int cuda_device_count() noexcept { return cuda::device_count(); }

}  // namespace fo
