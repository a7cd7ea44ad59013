// Optimizer objects: options with per-param overrides, state ownership, step counting.
// Every mutating call validates everything first and changes nothing when it throws.
#include "fusedopt/optimizer.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "algorithms.hpp"
#include "buffer.hpp"
#include "cuda/cuda_backend.hpp"

namespace fo {
namespace {

[[noreturn]] void invalid(const std::string& msg) {
  throw Error(StatusCode::invalid_argument, msg);
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

}  // namespace

struct ParamEntry {
  std::string name;
  void* data;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::int64_t numel;
  std::vector<std::optional<double>> overrides;  // per option index
  std::vector<double> options;                   // effective: defaults with overrides applied
  std::int64_t step = 0;
  std::optional<detail::StateBuffer> states[kMaxStates];  // created at the first step
};

struct Optimizer::Impl {
  const detail::AlgorithmInfo* info;
  Device device;
  int device_index;
  std::vector<double> defaults;
  std::vector<ParamEntry> params;
  std::unordered_map<std::string, std::size_t> by_name;

  std::vector<double> effective(const ParamEntry& p, const std::vector<double>& base) const {
    std::vector<double> v = base;
    for (std::size_t i = 0; i < v.size(); ++i)
      if (p.overrides[i]) v[i] = *p.overrides[i];
    return v;
  }

  int option_index(std::string_view key) const {
    const int k = info->option_index(key);
    if (k < 0)
      invalid(info->desc.name + " has no option '" + std::string(key) +
              "' (its options: " + join(info->desc.options) + ")");
    return k;
  }

  void check_value(int k, double value) const {
    const std::string& key = info->desc.options[k];
    if (!std::isfinite(value))
      invalid(info->desc.name + ": option " + key + " must be finite, got " +
              Validator::fmt(value));
    if (info->desc.is_flag[k] && value != 0.0 && value != 1.0)
      invalid(info->desc.name + ": option " + key + " is a flag and takes 0 or 1, got " +
              Validator::fmt(value));
  }

  /// Throws if param `p` may not move to options `next`.
  void check_transition(const ParamEntry& p, const std::vector<double>& next) const {
    if (const std::string err = info->validate(next); !err.empty())
      invalid("param '" + p.name + "': " + err);
    if (p.step == 0) return;
    for (int k = 0; k < static_cast<int>(info->desc.states.size()); ++k)
      if (info->has_state(p.options, k) != info->has_state(next, k))
        invalid("param '" + p.name + "' has already stepped; this change would " +
                (info->has_state(next, k) ? "add" : "remove") + " its state '" +
                info->desc.states[k] + "'");
  }

  ParamEntry& param(std::string_view name) {
    auto it = by_name.find(std::string(name));
    if (it == by_name.end()) invalid("no param named '" + std::string(name) + "'");
    return params[it->second];
  }
  const ParamEntry& param(std::string_view name) const {
    return const_cast<Impl*>(this)->param(name);
  }
};

Optimizer::Optimizer(std::string_view algorithm, Device device, int device_index)
    : impl_(std::make_unique<Impl>()) {
  impl_->info = detail::find_algorithm(algorithm);
  if (!impl_->info) {
    std::vector<std::string> names;
    for (const auto& d : dense_algorithms()) names.push_back(d.name);
    invalid("unknown algorithm '" + std::string(algorithm) + "' (known: " + join(names) + ")");
  }
  if (device != Device::cpu && device != Device::cuda)
    invalid("unknown device " + std::to_string(static_cast<int>(device)));
  if (device == Device::cuda) {
    if (!cuda::built_with_cuda())
      throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
    const int n = cuda::device_count();
    if (device_index < 0 || device_index >= n)
      invalid("CUDA device " + std::to_string(device_index) + " does not exist (" +
              std::to_string(n) + " visible)");
  } else if (device_index != 0) {
    invalid("the CPU device index must be 0, got " + std::to_string(device_index));
  }
  impl_->device = device;
  impl_->device_index = device_index;
  impl_->defaults = impl_->info->desc.defaults;
}

Optimizer::~Optimizer() = default;
Optimizer::Optimizer(Optimizer&&) noexcept = default;
Optimizer& Optimizer::operator=(Optimizer&&) noexcept = default;

const std::string& Optimizer::algorithm() const noexcept { return impl_->info->desc.name; }
Device Optimizer::device() const noexcept { return impl_->device; }

void Optimizer::set_option(std::string_view key, double value) {
  Impl& m = *impl_;
  const int k = m.option_index(key);
  m.check_value(k, value);
  std::vector<double> next = m.defaults;
  next[k] = value;
  if (const std::string err = m.info->validate(next); !err.empty()) invalid(err);
  std::vector<std::vector<double>> per_param;
  for (const ParamEntry& p : m.params) {
    per_param.push_back(m.effective(p, next));
    m.check_transition(p, per_param.back());
  }
  m.defaults = std::move(next);
  for (std::size_t i = 0; i < m.params.size(); ++i) m.params[i].options = std::move(per_param[i]);
}

double Optimizer::option(std::string_view key) const {
  return impl_->defaults[impl_->option_index(key)];
}

void Optimizer::add_param(std::string name, void* data, DType dtype,
                          std::vector<std::int64_t> shape) {
  Impl& m = *impl_;
  if (name.empty()) invalid("a param name must not be empty");
  if (m.by_name.count(name)) invalid("a param named '" + name + "' was already added");
  if (static_cast<int>(dtype) < 0 || static_cast<int>(dtype) > static_cast<int>(DType::i64))
    invalid("param '" + name + "': unknown dtype " + std::to_string(static_cast<int>(dtype)));
  if (dtype == DType::i32 || dtype == DType::i64)
    invalid("param '" + name + "': dtype " + dtype_name(dtype) + " is not a floating type");
  if (dtype != DType::f32)
    throw Error(StatusCode::unsupported, "param '" + name + "': dtype " + dtype_name(dtype) +
                                             " is not supported yet (float32 only)");
  std::int64_t numel = 1;
  for (std::int64_t d : shape) {
    if (d < 0) invalid("param '" + name + "': negative dimension " + std::to_string(d));
    if (d != 0 && numel > std::numeric_limits<std::int64_t>::max() / d)
      invalid("param '" + name + "': element count overflows 64 bits");
    numel *= d;
  }
  if (numel > 0 && !data) invalid("param '" + name + "': data is null");
  if (reinterpret_cast<std::uintptr_t>(data) % dtype_size(dtype) != 0)
    invalid("param '" + name + "': data is not aligned to its element size");
  if (numel > 0 && m.device == Device::cuda && !cuda::is_device_pointer(data, m.device_index))
    invalid("param '" + name + "': data is not memory of CUDA device " +
            std::to_string(m.device_index));
  ParamEntry p;
  p.name = name;
  p.data = data;
  p.dtype = dtype;
  p.shape = std::move(shape);
  p.numel = numel;
  p.overrides.resize(m.defaults.size());
  p.options = m.defaults;
  m.params.reserve(m.params.size() + 1);  // the only allocation that can throw comes first
  m.by_name.emplace(name, m.params.size());
  m.params.push_back(std::move(p));
}

void Optimizer::set_param_option(std::string_view name, std::string_view key, double value) {
  Impl& m = *impl_;
  ParamEntry& p = m.param(name);
  const int k = m.option_index(key);
  m.check_value(k, value);
  std::vector<double> next = p.options;
  next[k] = value;
  m.check_transition(p, next);
  p.overrides[k] = value;
  p.options = std::move(next);
}

double Optimizer::param_option(std::string_view name, std::string_view key) const {
  return impl_->param(name).options[impl_->option_index(key)];
}

void Optimizer::step(std::initializer_list<const void*> grads, void* stream) {
  if (grads.size() != impl_->params.size())
    invalid("step: got " + std::to_string(grads.size()) + " grads for " +
            std::to_string(impl_->params.size()) + " params");
  step(grads.begin(), stream);
}

void Optimizer::step(const void* const* grads, void* stream) {
  Impl& m = *impl_;
  if (!grads && !m.params.empty()) invalid("step: the grads array is null");
  // 1. Validate every gradient before anything is written.
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const void* g = grads[i];
    if (g && reinterpret_cast<std::uintptr_t>(g) % dtype_size(m.params[i].dtype) != 0)
      invalid("step: the grad of param '" + m.params[i].name +
              "' is not aligned to its element size");
  }
  cuda::DeviceGuard guard(m.device == Device::cuda ? m.device_index : -1);
  const Exec exec{m.device, stream};
  // 2. Create the state of params stepping for the first time; a failed allocation leaves
  //    every param as it was.
  std::vector<std::pair<std::size_t, std::vector<std::optional<detail::StateBuffer>>>> fresh;
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const ParamEntry& p = m.params[i];
    if (!grads[i] || p.step > 0) continue;
    std::vector<std::optional<detail::StateBuffer>> bufs(kMaxStates);
    for (int k = 0; k < static_cast<int>(m.info->desc.states.size()); ++k) {
      if (!m.info->has_state(p.options, k)) continue;
      bufs[k].emplace(m.device, m.device_index, p.numel);
      const float init = static_cast<float>(m.info->state_init(p.options, k));
      if (m.device == Device::cuda)
        cuda::fill(bufs[k]->data(), init, p.numel, m.device_index, stream);
      else
        std::fill(bufs[k]->data(), bufs[k]->data() + p.numel, init);
    }
    fresh.emplace_back(i, std::move(bufs));
  }
  for (auto& [i, bufs] : fresh)
    for (int k = 0; k < kMaxStates; ++k) m.params[i].states[k] = std::move(bufs[k]);
  // 3. The fused steps.
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    ParamEntry& p = m.params[i];
    if (!grads[i]) continue;
    DenseTensors t;
    t.param = p.data;
    t.grad = grads[i];
    t.numel = p.numel;
    t.param_dtype = t.grad_dtype = p.dtype;
    for (int k = 0; k < kMaxStates; ++k) t.states[k] = p.states[k] ? p.states[k]->data() : nullptr;
    m.info->step(p.options, p.step + 1, t, exec);
    ++p.step;
  }
}

std::size_t Optimizer::num_params() const noexcept { return impl_->params.size(); }

const std::string& Optimizer::param_name(std::size_t i) const {
  if (i >= impl_->params.size()) invalid("param index " + std::to_string(i) + " out of range");
  return impl_->params[i].name;
}

std::int64_t Optimizer::numel(std::string_view name) const { return impl_->param(name).numel; }
std::int64_t Optimizer::step_count(std::string_view name) const { return impl_->param(name).step; }

std::vector<std::string> Optimizer::state_names(std::string_view name) const {
  const ParamEntry& p = impl_->param(name);
  std::vector<std::string> out;
  for (int k = 0; k < static_cast<int>(impl_->info->desc.states.size()); ++k)
    if (impl_->info->has_state(p.options, k)) out.push_back(impl_->info->desc.states[k]);
  return out;
}

void Optimizer::get_state(std::string_view name, std::string_view state, float* out,
                          std::int64_t numel) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  const int k = m.info->state_index(state);
  if (k < 0 || !m.info->has_state(p.options, k))
    invalid("param '" + p.name + "' has no state '" + std::string(state) +
            "' (its states: " + join(state_names(name)) + ")");
  if (numel != p.numel)
    invalid("get_state: param '" + p.name + "' has " + std::to_string(p.numel) +
            " elements, the output " + std::to_string(numel));
  if (numel > 0 && !out) invalid("get_state: the output is null");
  if (!p.states[k]) {  // not stepped yet: the state is its initial value
    std::fill(out, out + numel, static_cast<float>(m.info->state_init(p.options, k)));
  } else if (m.device == Device::cuda) {
    cuda::DeviceGuard guard(m.device_index);
    cuda::copy_to_host(out, p.states[k]->data(), numel, m.device_index, nullptr);
  } else {
    std::copy(p.states[k]->data(), p.states[k]->data() + numel, out);
  }
}

std::vector<float> Optimizer::state(std::string_view name, std::string_view state) const {
  std::vector<float> out(static_cast<std::size_t>(numel(name)));
  get_state(name, state, out.data(), static_cast<std::int64_t>(out.size()));
  return out;
}

}  // namespace fo
