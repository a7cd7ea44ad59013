// fused_step: validation, then dispatch of one algorithm's functor to a backend; and the
// type-erased registry built from the same list.
#include "fusedopt/functional.hpp"

#include <cmath>
#include <cstdint>
#include <string>

#include "algorithm_index.hpp"
#include "algorithms.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"

namespace fo {
namespace {

[[noreturn]] void invalid(const std::string& msg) {
  throw Error(StatusCode::invalid_argument, msg);
}

template <class A>
std::string options_error(const typename A::Options& o) {
  for (const auto& f : A::kOptions)
    if (f.real && !std::isfinite(o.*f.real))
      return std::string(A::kName) + ": option " + f.name + " must be finite, got " +
             Validator::fmt(o.*f.real);
  Validator v;
  A::validate(o, v);
  return v.ok() ? std::string() : std::string(A::kName) + ": " + v.message();
}

bool misaligned(const void* p, std::size_t align) {
  return reinterpret_cast<std::uintptr_t>(p) % align != 0;
}

template <class A>
cpu::DensePtrs check_tensors(const typename A::Options& o, const DenseTensors& t) {
  const std::string who = A::kName;
  if (t.numel < 0) invalid(who + ": numel must be >= 0, got " + std::to_string(t.numel));
  for (DType d : {t.param_dtype, t.grad_dtype, t.state_dtype})
    if (d != DType::f32)
      throw Error(StatusCode::unsupported,
                  who + ": only float32 params, grads and states are supported so far, got " +
                      dtype_name(d));
  cpu::DensePtrs p{
      static_cast<float*>(t.param), static_cast<const float*>(t.grad), {nullptr, nullptr, nullptr}};
  constexpr int kStates = static_cast<int>(sizeof(A::kStates) / sizeof(A::kStates[0]));
  for (int k = 0; k < kStates; ++k)
    if (A::has_state(o, k)) p.states[k] = static_cast<float*>(t.states[k]);
  if (t.numel == 0) return p;
  auto check = [&](const void* ptr, const std::string& what) {
    if (!ptr) invalid(who + ": " + what + " is null");
    if (misaligned(ptr, sizeof(float)))
      invalid(who + ": " + what + " is not aligned to its 4-byte element size");
  };
  check(p.param, "param");
  check(p.grad, "grad");
  for (int k = 0; k < kStates; ++k)
    if (A::has_state(o, k)) check(p.states[k], std::string("state ") + A::kStates[k]);
  return p;
}

}  // namespace

template <class A>
void fused_step(const typename A::Options& options, std::int64_t step, const DenseTensors& t,
                const Exec& exec) {
  if (const std::string err = options_error<A>(options); !err.empty()) invalid(err);
  if (step < 1) invalid(std::string(A::kName) + ": step must be >= 1, got " + std::to_string(step));
  const cpu::DensePtrs ptrs = check_tensors<A>(options, t);
  if (t.numel == 0) return;
  const typename A::Op op = A::make_op(options, step);
  constexpr int index = detail::IndexOf<A>::value;
  if (exec.device == Device::cuda)
    cuda::dense_step(index, &op, ptrs, t.numel, /*device=*/-1, exec.stream);
  else
    cpu::parallel_for(cpu::active_table().step[index], &op, ptrs, t.numel);
}

#define FO_INSTANTIATE(A) \
  template void fused_step<A>(const A::Options&, std::int64_t, const DenseTensors&, const Exec&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

namespace detail {
namespace {

template <class A>
typename A::Options unpack(const std::vector<double>& v) {
  typename A::Options o;
  int i = 0;
  for (const auto& f : A::kOptions) f.set(o, v[i++]);
  return o;
}

template <class A>
AlgorithmInfo make_info() {
  AlgorithmInfo info;
  info.desc.name = A::kName;
  const typename A::Options defaults{};
  for (const auto& f : A::kOptions) {
    info.desc.options.emplace_back(f.name);
    info.desc.defaults.push_back(f.get(defaults));
    info.desc.is_flag.push_back(f.flag != nullptr);
  }
  for (const char* s : A::kStates) info.desc.states.emplace_back(s);
  info.validate = [](const std::vector<double>& v) { return options_error<A>(unpack<A>(v)); };
  info.has_state = [](const std::vector<double>& v, int k) {
    return A::has_state(unpack<A>(v), k);
  };
  info.state_init = [](const std::vector<double>& v, int k) {
    return A::state_init(unpack<A>(v), k);
  };
  info.step = [](const std::vector<double>& v, std::int64_t step, const DenseTensors& t,
                 const Exec& exec) { fused_step<A>(unpack<A>(v), step, t, exec); };
  return info;
}

}  // namespace

int AlgorithmInfo::option_index(std::string_view key) const {
  for (std::size_t i = 0; i < desc.options.size(); ++i)
    if (desc.options[i] == key) return static_cast<int>(i);
  return -1;
}

int AlgorithmInfo::state_index(std::string_view name) const {
  for (std::size_t i = 0; i < desc.states.size(); ++i)
    if (desc.states[i] == name) return static_cast<int>(i);
  return -1;
}

const std::vector<AlgorithmInfo>& algorithm_infos() {
  static const std::vector<AlgorithmInfo> infos = {
#define FO_INFO(A) make_info<A>(),
      FO_FOR_EACH_DENSE_ALGORITHM(FO_INFO)
#undef FO_INFO
  };
  return infos;
}

const AlgorithmInfo* find_algorithm(std::string_view name) {
  for (const auto& info : algorithm_infos())
    if (info.desc.name == name) return &info;
  return nullptr;
}

}  // namespace detail

const std::vector<AlgorithmDescription>& dense_algorithms() {
  static const std::vector<AlgorithmDescription> all = [] {
    std::vector<AlgorithmDescription> v;
    for (const auto& info : detail::algorithm_infos()) v.push_back(info.desc);
    return v;
  }();
  return all;
}

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

}  // namespace fo
