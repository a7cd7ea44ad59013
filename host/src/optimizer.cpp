// Optimizer objects: construction, options with per-param overrides, params, and the state
// queries. Steps are in optimizer_step.cpp, checkpoints in optimizer_checkpoint.cpp, the
// optimizer-wide step settings in settings.cpp. Every mutating call validates everything
// first and changes nothing when it throws.
#include "fusedopt/optimizer.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "device_check.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "optimizer_impl.hpp"

namespace fo {

using detail::invalid;
using detail::join;
using detail::kEmaState;
using detail::kMasterState;
using detail::OptionFacts;
using detail::ParamEntry;
using detail::Settings;
using detail::unsupported;

std::size_t Optimizer::Impl::find_slot(std::string_view name) const {
  for (std::size_t s = 0; s < slots.size(); ++s)
    if (slots[s].desc().name == name) return s;
  return slots.size();
}

int Optimizer::Impl::option_index(std::size_t s, std::string_view key) const {
  const AlgorithmDescription& d = slots[s].desc();
  const int k = detail::index_of(d.options, key);
  if (k < 0)
    invalid(d.name + " has no option '" + std::string(key) + "' (its options: " + join(d.options) +
            "; step settings: " + join(Settings::keys()) + ")");
  return k;
}

Optimizer::Impl::OptionKey Optimizer::Impl::option_key(std::string_view key) const {
  const std::size_t dot = key.find('.');
  if (dot == std::string_view::npos) return {0, option_index(0, key), nullptr};
  const std::string_view name = key.substr(0, dot), option = key.substr(dot + 1);
  const std::size_t s = find_slot(name);
  if (s < slots.size()) return {s, option_index(s, option), nullptr};
  std::unique_ptr<detail::Algorithm> fresh = detail::make_algorithm(name);
  if (!fresh)
    invalid("option '" + std::string(key) + "': '" + std::string(name) +
            "' is not a registered algorithm (an option of a second algorithm is "
            "\"algorithm.option\", e.g. \"adamw.lr\")");
  const int k = detail::index_of(fresh->description().options, option);
  if (k < 0)
    invalid(std::string(name) + " has no option '" + std::string(option) +
            "' (its options: " + join(fresh->description().options) + ")");
  return {slots.size(), k, std::move(fresh)};
}

OptionFacts Optimizer::Impl::checked_facts(std::size_t s, const std::vector<double>& values,
                                           const std::string& who) const {
  OptionFacts f = slots[s].algorithm->facts(values);
  if (!f.error.empty()) invalid(who + f.error);
  return f;
}

void Optimizer::Impl::check_transition(const ParamEntry& p, const OptionFacts& next) const {
  if (!p.has_buffers()) return;
  const AlgorithmDescription& d = desc(p);
  for (int k = 0; k < static_cast<int>(d.states.size()); ++k) {
    const std::string prefix = "param '" + p.name + "' has already stepped; this change would ";
    if (p.facts.has_state[k] != next.has_state[k])
      invalid(prefix + (next.has_state[k] ? "add" : "remove") + " its state '" + d.states[k] + "'");
    if (p.facts.has_state[k] && p.facts.state_shape[k] != next.state_shape[k])
      invalid(prefix + "make its state '" + d.states[k] + "' " +
              (next.state_shape[k] == StateShape::row ? "row-wise instead of per element"
                                                      : "per element instead of row-wise"));
  }
}

void Optimizer::Impl::assign(std::size_t i, std::vector<double> values,
                             OptionFacts facts) noexcept {
  slots[params[i].slot].algorithm->set_options(params[i].local, values);  // replaces: no throw
  params[i].options = std::move(values);
  params[i].facts = std::move(facts);
  groups_stale = true;
}

ParamEntry& Optimizer::Impl::param(std::string_view name) {
  auto it = by_name.find(name);
  if (it == by_name.end()) invalid("no param named '" + std::string(name) + "'");
  return params[it->second];
}

const ParamEntry& Optimizer::Impl::param(std::string_view name) const {
  return const_cast<Impl*>(this)->param(name);
}

Optimizer::Optimizer(std::string_view algorithm, Device device, int device_index)
    : impl_(std::make_unique<Impl>()) {
  std::unique_ptr<detail::Algorithm> a = detail::make_algorithm(algorithm);
  if (!a) {
    std::vector<std::string> names;
    for (const auto& d : dense_algorithms()) names.push_back(d.name);
    invalid("unknown algorithm '" + std::string(algorithm) + "' (known: " + join(names) + ")");
  }
  detail::check_device("", device, device_index);
  impl_->device = device;
  impl_->device_index = device_index;
  impl_->slots.push_back({std::move(a), {}, 0});
  impl_->slots[0].defaults = impl_->desc().defaults;
}

Optimizer::~Optimizer() = default;
Optimizer::Optimizer(Optimizer&&) noexcept = default;
Optimizer& Optimizer::operator=(Optimizer&&) noexcept = default;

const std::string& Optimizer::algorithm() const noexcept { return impl_->desc().name; }
Device Optimizer::device() const noexcept { return impl_->device; }

void Optimizer::set_option(std::string_view key, double value) {
  Impl& m = *impl_;
  if (Settings::is_key(key)) {
    Settings next = m.settings;
    next.set(key, value);
    if (Settings::is_storage_key(key) && next.get(key) != m.settings.get(key))
      for (const ParamEntry& p : m.params)
        if (p.has_buffers())
          invalid(std::string(key) + " cannot change: param '" + p.name + "' has already stepped");
    // The EMA's decay may change at any time; turning the EMA on or off adds or removes a
    // buffer, like a storage setting.
    if ((next.ema_decay > 0.0) != (m.settings.ema_decay > 0.0))
      for (const ParamEntry& p : m.params)
        if (p.has_buffers())
          invalid(std::string("ema_decay cannot turn the weight EMA ") +
                  (next.ema_decay > 0.0 ? "on" : "off") + ": param '" + p.name +
                  "' has already stepped (a non-zero decay may change)");
    m.settings = next;
    return;
  }
  Impl::OptionKey ok = m.option_key(key);
  if (ok.fresh) {  // a second algorithm's option before any of its params: only its defaults
    std::vector<double> next = ok.fresh->description().defaults;
    next[ok.index] = value;
    const OptionFacts f = ok.fresh->facts(next);
    if (!f.error.empty()) invalid(f.error);
    m.slots.push_back({std::move(ok.fresh), std::move(next), 0});
    return;
  }
  std::vector<double> next = m.slots[ok.slot].defaults;
  next[ok.index] = value;
  m.checked_facts(ok.slot, next, "");
  std::vector<std::size_t> members;
  std::vector<std::vector<double>> values;
  std::vector<OptionFacts> facts;
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const ParamEntry& p = m.params[i];
    if (p.slot != ok.slot) continue;
    members.push_back(i);
    values.push_back(next);
    for (std::size_t j = 0; j < next.size(); ++j)
      if (p.overrides[j]) values.back()[j] = *p.overrides[j];
    facts.push_back(m.checked_facts(ok.slot, values.back(), "param '" + p.name + "': "));
    m.check_transition(p, facts.back());
  }
  m.slots[ok.slot].defaults = std::move(next);
  for (std::size_t j = 0; j < members.size(); ++j)
    m.assign(members[j], std::move(values[j]), std::move(facts[j]));
}

double Optimizer::option(std::string_view key) const {
  if (Settings::is_key(key)) return impl_->settings.get(key);
  const Impl::OptionKey ok = impl_->option_key(key);
  return ok.fresh ? ok.fresh->description().defaults[ok.index]
                  : impl_->slots[ok.slot].defaults[ok.index];
}

void Optimizer::add_param(std::string name, void* data, DType dtype,
                          std::vector<std::int64_t> shape, std::string_view algorithm) {
  Impl& m = *impl_;
  if (name.empty()) invalid("a param name must not be empty");
  // Its algorithm: the constructor's, one this optimizer already steps, or a new one.
  const std::size_t s = algorithm.empty() ? 0 : m.find_slot(algorithm);
  std::unique_ptr<detail::Algorithm> fresh;
  if (s == m.slots.size()) {
    fresh = detail::make_algorithm(algorithm);
    if (!fresh) {
      std::vector<std::string> names;
      for (const auto& d : dense_algorithms()) names.push_back(d.name);
      invalid("param '" + name + "': unknown algorithm '" + std::string(algorithm) +
              "' (known: " + join(names) + ")");
    }
  }
  const AlgorithmDescription& d = fresh ? fresh->description() : m.slots[s].desc();
  if (name.size() > 4096) invalid("a param name must be at most 4096 bytes (checkpoints)");
  if (shape.size() > 16) invalid("param '" + name + "': at most 16 dimensions");
  if (m.params.size() >= (std::size_t{1} << 20)) invalid("at most 2^20 params per optimizer");
  if (m.by_name.count(name)) invalid("a param named '" + name + "' was already added");
  if (static_cast<int>(dtype) < 0 || static_cast<int>(dtype) > static_cast<int>(DType::i64))
    invalid("param '" + name + "': unknown dtype " + std::to_string(static_cast<int>(dtype)));
  if (dtype == DType::i32 || dtype == DType::i64)
    invalid("param '" + name + "': dtype " + dtype_name(dtype) + " is not a floating type");
  if (d.matrix_only && shape.size() < 2)
    invalid("param '" + name + "': " + d.name +
            " steps matrices only (2 or more dimensions, a batch of matrices over the last "
            "two), got " +
            std::to_string(shape.size()) +
            " dimension(s): give vectors and scalars an elementwise algorithm, e.g. "
            "add_param(name, data, dtype, shape, \"adamw\")");
  std::int64_t numel = 1;
  for (std::int64_t extent : shape) {
    if (extent < 0) invalid("param '" + name + "': negative dimension " + std::to_string(extent));
    if (extent != 0 && numel > std::numeric_limits<std::int64_t>::max() / extent)
      invalid("param '" + name + "': element count overflows 64 bits");
    numel *= extent;
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
  p.key = static_cast<int>(m.params.size());
  p.slot = s;
  p.local = fresh ? 0 : m.slots[s].num_params;
  p.options = fresh ? d.defaults : m.slots[s].defaults;
  p.overrides.resize(p.options.size());
  detail::Algorithm& a = fresh ? *fresh : *m.slots[s].algorithm;
  p.facts = a.facts(p.options);  // the defaults are valid
  // Everything that can throw (memory) comes first. A failure after set_options leaves the
  // algorithm an entry past num_params, which the next add replaces.
  m.params.reserve(m.params.size() + 1);
  m.slots.reserve(m.slots.size() + 1);
  std::vector<double> slot_defaults = fresh ? d.defaults : std::vector<double>{};
  a.set_options(p.local, p.options);
  m.by_name.emplace(name, m.params.size());
  if (fresh) m.slots.push_back({std::move(fresh), std::move(slot_defaults), 0});
  ++m.slots[s].num_params;
  m.params.push_back(std::move(p));
  m.groups_stale = true;
}

const std::string& Optimizer::param_algorithm(std::string_view name) const {
  return impl_->desc(impl_->param(name)).name;
}

void Optimizer::set_param_option(std::string_view name, std::string_view key, double value) {
  Impl& m = *impl_;
  ParamEntry& p = m.param(name);
  if (key == "state_dtype") {  // the one storage setting a param may have of its own
    const DType d = detail::parse_state_dtype(value, "param '" + p.name + "': state_dtype");
    if (p.has_buffers() && d != m.state_dtype(p))
      invalid("param '" + p.name + "': state_dtype cannot change: the param has already stepped");
    p.state_dtype = d;
    return;
  }
  if (Settings::is_key(key))
    invalid(std::string(key) + " is a step setting of the whole optimizer, not of one param");
  const int k = m.option_index(p.slot, key);
  std::vector<double> next = p.options;
  next[k] = value;
  OptionFacts facts = m.checked_facts(p.slot, next, "param '" + p.name + "': ");
  m.check_transition(p, facts);
  p.overrides[k] = value;
  m.assign(m.by_name.at(p.name), std::move(next), std::move(facts));
}

double Optimizer::param_option(std::string_view name, std::string_view key) const {
  const ParamEntry& p = impl_->param(name);
  if (key == "state_dtype") return static_cast<double>(static_cast<int>(impl_->state_dtype(p)));
  return p.options[impl_->option_index(p.slot, key)];
}

void Optimizer::set_device_scalars(const float* d_lr, const float* d_grad_multiplier,
                                   float* d_found_inf) {
  if (impl_->device != Device::cuda && (d_lr || d_grad_multiplier || d_found_inf))
    unsupported("device scalars need the CUDA backend");
  impl_->d_lr = d_lr;
  impl_->d_grad_multiplier = d_grad_multiplier;
  impl_->d_found_inf = d_found_inf;
}

std::size_t Optimizer::num_params() const noexcept { return impl_->params.size(); }

const std::string& Optimizer::param_name(std::size_t i) const {
  if (i >= impl_->params.size()) invalid("param index " + std::to_string(i) + " out of range");
  return impl_->params[i].name;
}

std::int64_t Optimizer::numel(std::string_view name) const { return impl_->param(name).numel; }

std::int64_t Optimizer::step_count(std::string_view name) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  if (m.device != Device::cuda || p.steps_launched == 0) return p.steps_launched;
  std::int64_t steps = 0;
  cuda::DeviceGuard guard(m.device_index);
  cuda::copy_to_host(&steps, static_cast<const std::int64_t*>(m.d_steps->data()) + p.key,
                     sizeof steps);
  return steps;
}

std::vector<std::string> Optimizer::state_names(std::string_view name) const {
  const ParamEntry& p = impl_->param(name);
  std::vector<std::string> out;
  const AlgorithmDescription& d = impl_->desc(p);
  for (int k = 0; k < static_cast<int>(d.states.size()); ++k)
    if (p.keeps(p.facts, k)) out.push_back(d.states[k]);
  if (impl_->has_master(p)) out.emplace_back(kMasterState);
  if (impl_->has_ema()) out.emplace_back(kEmaState);
  return out;
}

std::int64_t Optimizer::state_numel(std::string_view name, std::string_view state) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  if (state == kMasterState && m.has_master(p)) return p.numel;
  if (state == kEmaState && m.has_ema()) return p.numel;
  const int k = detail::index_of(m.desc(p).states, state);
  if (k < 0 || !p.keeps(p.facts, k))
    invalid("param '" + p.name + "' has no state '" + std::string(state) +
            "' (its states: " + join(state_names(name)) + ")");
  return p.state_numel(p.facts, k);
}

void Optimizer::get_state(std::string_view name, std::string_view state, float* out,
                          std::int64_t numel) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  const std::int64_t count = state_numel(name, state);  // throws if there is no such state
  const bool master = state == kMasterState && m.has_master(p);
  const bool ema = state == kEmaState && m.has_ema();
  const int k = master || ema ? -1 : detail::index_of(m.desc(p).states, state);
  if (numel != count)
    invalid("get_state: state '" + std::string(state) + "' of param '" + p.name + "' has " +
            std::to_string(count) + " values, the output " + std::to_string(numel));
  if (numel > 0 && !out) invalid("get_state: the output is null");
  const auto n = static_cast<std::size_t>(numel);
  const std::optional<detail::Buffer>& buf = master ? p.master : ema ? p.ema : p.states[k];
  if (!buf) {                                            // not stepped yet: the initial value
    if (master || ema || p.facts.state_from_param[k]) {  // the param's value, as float32
      if (m.device != Device::cuda) {
        cpu::widen(out, p.data, p.dtype, numel);
        return;
      }
      cuda::DeviceGuard guard(m.device_index);
      if (p.dtype == DType::f32) {
        cuda::copy_to_host(out, p.data, n * sizeof(float));
        return;
      }
      std::vector<std::uint16_t> raw(n);
      cuda::copy_to_host(raw.data(), p.data, n * sizeof(std::uint16_t));
      for (std::size_t i = 0; i < n; ++i)
        out[i] = p.dtype == DType::bf16 ? to_float(bf16{raw[i]}) : to_float(f16{raw[i]});
      return;
    }
    std::fill(out, out + n, p.facts.state_init[k]);
    return;
  }
  if (!master && !ema) {
    m.read_state(p, k, *buf, out, numel);
    return;
  }
  if (n == 0) return;  // out may be null
  if (m.device != Device::cuda) {
    std::memcpy(out, buf->data(), n * sizeof(float));
    return;
  }
  cuda::DeviceGuard guard(m.device_index);
  cuda::copy_to_host(out, buf->data(), n * sizeof(float));
}

std::size_t Optimizer::state_memory_bytes() const noexcept {
  std::size_t bytes = 0;
  const auto add = [&](const std::optional<detail::Buffer>& b) { bytes += b ? b->bytes() : 0; };
  for (const ParamEntry& p : impl_->params) {
    for (const auto& s : p.states) add(s);
    add(p.master);
    add(p.ema);
    add(p.scalars);
  }
  return bytes;
}

std::size_t Optimizer::Impl::storage_bytes(DType d, std::int64_t n) {
  if (d == DType::q8) return static_cast<std::size_t>(quant_state_bytes(n, 8));
  if (d == DType::q4) return static_cast<std::size_t>(quant_state_bytes(n, 4));
  return static_cast<std::size_t>(n) * dtype_size(d);
}

void Optimizer::Impl::read_state(const ParamEntry& p, int k, const detail::Buffer& b, float* out,
                                 std::int64_t n) const {
  const DType d = state_dtype(p);
  const void* src = b.data();
  std::vector<unsigned char> host;
  if (device == Device::cuda) {
    host.resize(storage_bytes(d, n));
    cuda::DeviceGuard guard(device_index);
    cuda::copy_to_host(host.data(), b.data(), host.size());
    src = host.data();
  }
  if (cpu::is_quantized(d))
    cpu::dequantize_state(out, src, d, desc(p).non_negative[static_cast<std::size_t>(k)], n);
  else
    cpu::widen(out, src, d, n);
}

std::string Optimizer::Impl::storage_problem(const ParamEntry& p) const {
  const DType d = state_dtype(p);
  if (!cpu::is_quantized(d)) return "";
  const AlgorithmDescription& a = desc(p);
  bool keeps_states = false;  // none (sgd without momentum, signsgd): nothing to quantize
  for (int k = 0; k < static_cast<int>(a.states.size()); ++k) keeps_states |= p.keeps(p.facts, k);
  if (!keeps_states) return "";
  const std::string fix =
      " (give this param float32 or bfloat16 states: set_param_option(name, \"state_dtype\", 0 "
      "or 2))";
  if (!a.quantizable)
    return a.name + " cannot keep " + dtype_name(d) +
           " states: its step is not one elementwise pass" + fix;
  for (int k = 0; k < static_cast<int>(a.states.size()); ++k)
    if (p.keeps(p.facts, k) && p.facts.state_shape[k] == StateShape::row)
      return a.name + "'s state '" + a.states[static_cast<std::size_t>(k)] +
             "' is one value per row under these options (row-wise), which " + dtype_name(d) +
             " blocks cannot hold" + fix;
  for (int k = 0; k < static_cast<int>(a.states.size()); ++k)
    if (p.keeps(p.facts, k) && p.facts.state_from_param[k])
      return a.name + "'s state '" + a.states[static_cast<std::size_t>(k)] +
             "' is a copy of the weights, which " + dtype_name(d) + " cannot hold" + fix;
  return "";
}

double Optimizer::scalar_state(std::string_view name, std::string_view scalar) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  const AlgorithmDescription& d = m.desc(p);
  const int k = detail::index_of(d.scalars, scalar);
  if (k < 0)
    invalid(d.name + " has no scalar state '" + std::string(scalar) + "'" +
            (d.scalars.empty() ? "" : " (its scalar states: " + join(d.scalars) + ")"));
  if (!p.scalars) return d.scalar_init[k];
  double v = 0.0;
  if (m.device != Device::cuda) return static_cast<const double*>(p.scalars->data())[k];
  cuda::DeviceGuard guard(m.device_index);
  cuda::copy_to_host(&v, static_cast<const double*>(p.scalars->data()) + k, sizeof v);
  return v;
}

std::vector<float> Optimizer::state(std::string_view name, std::string_view state) const {
  std::vector<float> out(static_cast<std::size_t>(state_numel(name, state)));
  get_state(name, state, out.data(), static_cast<std::int64_t>(out.size()));
  return out;
}

}  // namespace fo
