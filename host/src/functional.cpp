// fused_step: validation, then one algorithm's step on a backend, typed all the way down.
#include "fusedopt/functional.hpp"

#include <cmath>
#include <cstdint>
#include <string>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "messages.hpp"
#include "typed_options.hpp"

namespace fo {
namespace {

using detail::invalid;

bool misaligned(const void* p, std::size_t align) {
  return reinterpret_cast<std::uintptr_t>(p) % align != 0;
}

template <class A>
void check_tensors(const typename A::Options& o, const DenseTensors& t, const Exec& exec,
                   const StepControls& c) {
  const std::string who = A::kName;
  if (t.numel < 0) invalid(who + ": numel must be >= 0, got " + std::to_string(t.numel));
  const bool cuda = exec.device == Device::cuda;
  auto unsupported = [&](const std::string& what) {
    throw Error(StatusCode::unsupported, who + ": " + what);
  };
  if (t.param_dtype != DType::f32 && t.param_dtype != DType::bf16 && t.param_dtype != DType::f16)
    invalid(who + ": params must be float32, bfloat16 or float16, got " +
            dtype_name(t.param_dtype));
  if (t.grad_dtype != t.param_dtype && t.grad_dtype != DType::f32)
    invalid(who + ": grads must be float32 or the param's dtype, got " + dtype_name(t.grad_dtype));
  if (t.state_dtype != DType::f32 && t.state_dtype != DType::bf16)
    invalid(who + ": states must be float32 or bfloat16, got " + dtype_name(t.state_dtype));
  if (t.master && t.param_dtype == DType::f32)
    invalid(who + ": master weights belong to bfloat16 or float16 params");
  if (!cuda) {
    if (t.param_dtype != DType::f32 || t.grad_dtype != DType::f32 || t.state_dtype != DType::f32)
      unsupported("the CPU backend steps float32 params, grads and states only");
    if (c.stochastic_rounding || c.d_lr || c.d_grad_multiplier || c.d_found_inf)
      unsupported("device-side scalars and stochastic rounding need the CUDA backend");
  }
  if (!std::isfinite(c.grad_multiplier)) invalid(who + ": the gradient multiplier must be finite");
  if (t.numel == 0) return;
  auto check = [&](const void* ptr, DType dtype, const std::string& what) {
    if (!ptr) invalid(who + ": " + what + " is null");
    if (misaligned(ptr, dtype_size(dtype)))
      invalid(who + ": " + what + " is not aligned to its element size");
    // A host pointer in a kernel would be an illegal address that ends the CUDA context. One
    // pointer query per buffer (about a microsecond): the Optimizer's steps avoid it.
    if (cuda && !cuda::is_device_pointer(ptr, -1))
      invalid(who + ": " + what + " is not CUDA device memory");
  };
  check(t.param, t.param_dtype, "param");
  check(t.grad, t.grad_dtype, "grad");
  if (t.master) check(t.master, DType::f32, "master");
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(o, k))
      check(t.states[k], t.state_dtype, std::string("state ") + StateList<A>::name(k));
}

}  // namespace

template <class A>
void fused_step(const typename A::Options& options, std::int64_t step, const DenseTensors& t,
                const Exec& exec, const StepControls& controls) {
  if (const std::string err = detail::options_error<A>(options); !err.empty()) invalid(err);
  if (step < 1) invalid(std::string(A::kName) + ": step must be >= 1, got " + std::to_string(step));
  if constexpr (RowwiseCapable<A>::value)
    if (A::rowwise(options))
      throw Error(StatusCode::unsupported,
                  std::string(A::kName) +
                      ": rowwise applies to sparse steps of embedding tables (step_sparse); "
                      "dense steps take rowwise = 0");
  check_tensors<A>(options, t, exec, controls);
  if (t.numel == 0) return;
  void* states[kMaxStates] = {nullptr, nullptr, nullptr};  // only the ones the options use
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(options, k)) states[k] = t.states[k];
  if (exec.device == Device::cuda) {
    const cuda::ListEntry entry{t.param, t.grad, t.master,    {states[0], states[1], states[2]},
                                t.numel, step,   controls.key};
    cuda::ListSettings s;
    s.param_dtype = t.param_dtype;
    s.grad_dtype = t.grad_dtype;
    s.state_dtype = t.state_dtype;
    s.stochastic = controls.stochastic_rounding;
    s.seed = controls.seed;
    s.grad_multiplier = controls.grad_multiplier;
    s.d_lr = controls.d_lr;
    s.d_grad_multiplier = controls.d_grad_multiplier;
    s.d_found_inf = controls.d_found_inf;
    cuda::multi_tensor_step<A>(options, &entry, 1, cuda::plan_list(&entry, 1), s, exec.stream);
    return;
  }
  cpu::DensePtrs ptrs{static_cast<float*>(t.param),
                      static_cast<const float*>(t.grad),
                      {static_cast<float*>(states[0]), static_cast<float*>(states[1]),
                       static_cast<float*>(states[2])},
                      controls.grad_multiplier};
  cpu::dense_step<A>(options, step, ptrs, t.numel);
}

#define FO_INSTANTIATE(A)                                                                        \
  template void fused_step<A>(const A::Options&, std::int64_t, const DenseTensors&, const Exec&, \
                              const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

const char* dtype_name(DType t) noexcept {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
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
  }
  return 0;
}

int cuda_device_count() noexcept { return cuda::device_count(); }

}  // namespace fo
