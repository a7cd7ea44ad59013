// Optimizer checkpoints: save and load (the file format is checkpoint.hpp's). A load checks
// everything, the file's options and every state tensor, before it changes anything.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "optimizer_impl.hpp"

namespace fo {
namespace {

// Host copies, as float32, of a device or host buffer of n values stored as `dtype`.
std::vector<float> values_of(const detail::Buffer& b, DType dtype, std::int64_t n, Device device,
                             int device_index) {
  const auto count = static_cast<std::size_t>(n);
  std::vector<float> out(count);
  if (device != Device::cuda) {
    cpu::widen(out.data(), b.data(), dtype, n);
    return out;
  }
  cuda::DeviceGuard guard(device_index);
  if (dtype == DType::f32) {
    cuda::copy_to_host(out.data(), b.data(), count * sizeof(float));
    return out;
  }
  std::vector<std::uint16_t> raw(count);
  cuda::copy_to_host(raw.data(), b.data(), count * sizeof(std::uint16_t));
  for (std::size_t i = 0; i < count; ++i)
    out[i] = dtype == DType::bf16 ? to_float(bf16{raw[i]}) : to_float(f16{raw[i]});
  return out;
}

// A quantized state's buffer as it is (codes and scales), in a checkpoint tensor's float32
// values: its bytes, zero-padded to whole values.
std::vector<float> raw_values(const detail::Buffer& b, std::size_t bytes, Device device,
                              int device_index) {
  std::vector<float> out((bytes + 3) / 4, 0.0f);
  if (bytes == 0) return out;  // an empty tensor's buffer: nothing to copy (and no pointers)
  if (device != Device::cuda) {
    std::memcpy(out.data(), b.data(), bytes);
    return out;
  }
  cuda::DeviceGuard guard(device_index);
  cuda::copy_to_host(out.data(), b.data(), bytes);
  return out;
}

}  // namespace

using detail::invalid;
using detail::kAlgorithmPrefix;
using detail::kEmaState;
using detail::kEvalModeKey;
using detail::kMasterState;
using detail::kScalarPrefix;
using detail::kTrainMasterState;
using detail::kTrainParamState;
using detail::OptionFacts;
using detail::ParamEntry;
using detail::Settings;

void Optimizer::save(const std::string& path) const {
  const Impl& m = *impl_;
  detail::CheckpointData d;
  d.algorithm = m.desc().name;
  // The constructor's algorithm's defaults by their plain names, a second algorithm's as
  // "adamw.lr" (a file without them is what a single-algorithm optimizer always wrote).
  for (std::size_t s = 0; s < m.slots.size(); ++s) {
    const AlgorithmDescription& a = m.slots[s].desc();
    const std::string prefix = s == 0 ? "" : a.name + ".";
    for (std::size_t k = 0; k < a.options.size(); ++k)
      d.options.emplace_back(prefix + a.options[k], m.slots[s].defaults[k]);
  }
  for (const auto& key : Settings::keys()) {
    // Without the EMA a file is byte for byte what a library from before it wrote, and loads
    // there; with it, such a library refuses the file by its unknown option.
    if (key == "ema_decay" && !m.has_ema()) continue;
    d.options.emplace_back(key, m.settings.get(key));
  }
  // The loading optimizer's state_dtype and min_quant_size are its own: saved for the record,
  // the threshold only when set (the files of a library from before it load there).
  d.options.erase(std::remove_if(d.options.begin(), d.options.end(),
                                 [&](const auto& kv) {
                                   return kv.first == "min_quant_size" &&
                                          m.settings.min_quant_size == Settings{}.min_quant_size;
                                 }),
                  d.options.end());
  if (m.eval_mode) d.options.emplace_back(kEvalModeKey, 1.0);  // only then: older files load
  for (const ParamEntry& p : m.params) {
    detail::CheckpointParam cp{p.name, p.dtype, p.shape, step_count(p.name), {}};
    const AlgorithmDescription& a = m.desc(p);
    if (p.slot != 0) cp.overrides.emplace_back(kAlgorithmPrefix + a.name, 1.0);
    for (std::size_t k = 0; k < p.overrides.size(); ++k)
      if (p.overrides[k]) cp.overrides.emplace_back(a.options[k], *p.overrides[k]);
    if (p.scalars)  // exact: doubles in the file's per-param pairs
      for (std::size_t k = 0; k < a.scalars.size(); ++k)
        cp.overrides.emplace_back(kScalarPrefix + a.scalars[k], scalar_state(p.name, a.scalars[k]));
    const bool has_state = p.master || p.ema ||
                           std::any_of(std::begin(p.states), std::end(p.states),
                                       [](const auto& b) { return b.has_value(); });
    const DType storage = m.state_dtype(p);
    const bool quantized = cpu::is_quantized(storage);  // saved as they are: resumes are bitwise
    d.params.push_back(std::move(cp));
    if (!has_state) continue;  // never stepped: its state is still the initial value
    for (const auto& s : state_names(p.name)) {
      const int k = detail::index_of(a.states, s);
      if (quantized && k >= 0 && p.states[k])
        d.tensors.push_back(
            {p.name, s, raw_values(*p.states[k], m.state_bytes(p, k), m.device, m.device_index),
             storage});
      else
        d.tensors.push_back({p.name, s, state(p.name, s)});
    }
    if (p.train_param)
      d.tensors.push_back({p.name, kTrainParamState,
                           values_of(*p.train_param, p.dtype, p.numel, m.device, m.device_index)});
    if (p.train_master)
      d.tensors.push_back(
          {p.name, kTrainMasterState,
           values_of(*p.train_master, DType::f32, p.numel, m.device, m.device_index)});
  }
  detail::write_file_atomically(path, detail::encode_checkpoint(d));
}

void Optimizer::load(const std::string& path) {
  Impl& m = *impl_;
  const std::vector<unsigned char> bytes = detail::read_file(path);
  const detail::CheckpointData d = detail::decode_checkpoint(bytes.data(), bytes.size());
  const std::string who = "load('" + path + "'): ";
  if (d.algorithm != m.desc().name)
    invalid(who + "the checkpoint is of " + d.algorithm + ", this optimizer is " + m.desc().name);
  // 1. Options and settings, validated on copies. Each algorithm's defaults start from its
  // registered ones; a second algorithm this optimizer has no slot of yet gets a new one.
  struct SlotDefaults {
    std::unique_ptr<detail::Algorithm> fresh;
    std::vector<double> values;
    const AlgorithmDescription& desc(const Impl& m, std::size_t s) const {
      return fresh ? fresh->description() : m.slots[s].desc();
    }
  };
  std::vector<SlotDefaults> defaults(m.slots.size());
  for (std::size_t s = 0; s < m.slots.size(); ++s) defaults[s].values = m.slots[s].desc().defaults;
  const auto option_of = [&](const std::string& key) -> std::pair<std::size_t, int> {
    const std::size_t dot = key.find('.');
    if (dot == std::string::npos) return {0, m.option_index(0, key)};
    const std::string name = key.substr(0, dot);
    std::size_t s = 0;
    while (s < defaults.size() && defaults[s].desc(m, s).name != name) ++s;
    if (s == defaults.size()) {
      std::unique_ptr<detail::Algorithm> fresh = detail::make_algorithm(name);
      if (!fresh) invalid(who + "option '" + key + "' names no registered algorithm");
      std::vector<double> values = fresh->description().defaults;
      defaults.push_back({std::move(fresh), std::move(values)});
    }
    const int k = detail::index_of(defaults[s].desc(m, s).options, key.substr(dot + 1));
    if (k < 0) invalid(who + name + " has no option '" + key.substr(dot + 1) + "'");
    return {s, k};
  };
  Settings settings;
  std::vector<std::string> seen_keys;
  bool eval_mode = false;
  for (const auto& [key, value] : d.options) {
    if (std::find(seen_keys.begin(), seen_keys.end(), key) != seen_keys.end())
      throw Error(StatusCode::corrupt_data, who + "option '" + key + "' appears twice");
    seen_keys.push_back(key);
    if (key == kEvalModeKey) {
      const bool eval_forms =
          std::all_of(m.slots.begin(), m.slots.end(), [](const auto& s) { return s.desc().eval; });
      if (value != 1.0 || !eval_forms)
        throw Error(StatusCode::corrupt_data, who + "option '" + key + "' is invalid here");
      eval_mode = true;
      continue;
    }
    if (Settings::is_key(key)) {
      settings.set(key, value);
      continue;
    }
  }
  // The states are converted into this optimizer's state storage, which stays as it is.
  settings.state_dtype = m.settings.state_dtype;
  settings.min_quant_size = m.settings.min_quant_size;
  for (const auto& [key, value] : d.options) {
    if (key == kEvalModeKey || Settings::is_key(key)) continue;
    const auto [s, k] = option_of(key);
    defaults[s].values[k] = value;
  }
  for (std::size_t s = 0; s < defaults.size(); ++s) {
    const OptionFacts f = defaults[s].fresh ? defaults[s].fresh->facts(defaults[s].values)
                                            : m.slots[s].algorithm->facts(defaults[s].values);
    if (!f.error.empty()) invalid(who + f.error);
  }
  // 2. The same params, by name, shape and dtype: every mismatch in one message.
  std::vector<std::string> problems;
  std::unordered_map<std::string, const detail::CheckpointParam*> in_file;
  for (const auto& cp : d.params)
    if (!in_file.emplace(cp.name, &cp).second)
      throw Error(StatusCode::corrupt_data, who + "param '" + cp.name + "' appears twice");
  for (const auto& t : d.tensors)
    if (!in_file.count(t.param))
      throw Error(StatusCode::corrupt_data, who + "a tensor of unknown param '" + t.param + "'");
  for (const ParamEntry& p : m.params) {
    auto it = in_file.find(p.name);
    if (it == in_file.end()) {
      problems.push_back("param '" + p.name + "' is not in the checkpoint");
      continue;
    }
    const detail::CheckpointParam& cp = *it->second;
    if (cp.shape != p.shape) {
      std::string a, b;
      for (auto x : cp.shape) a += (a.empty() ? "" : "x") + std::to_string(x);
      for (auto x : p.shape) b += (b.empty() ? "" : "x") + std::to_string(x);
      problems.push_back("param '" + p.name + "' has shape [" + b + "], the checkpoint [" + a +
                         "]");
    }
    if (cp.dtype != p.dtype)
      problems.push_back("param '" + p.name + "' is " + dtype_name(p.dtype) + ", the checkpoint " +
                         dtype_name(cp.dtype));
    std::string algorithm = d.algorithm;
    for (const auto& kv : cp.overrides)
      if (kv.first.rfind(kAlgorithmPrefix, 0) == 0)
        algorithm = kv.first.substr(std::string(kAlgorithmPrefix).size());
    if (algorithm != m.desc(p).name)
      problems.push_back("param '" + p.name + "' is stepped by " + m.desc(p).name +
                         ", in the checkpoint by " + algorithm);
    if (const std::string why = m.storage_problem(p); !why.empty())
      problems.push_back("param '" + p.name + "': " + why);
  }
  for (const auto& cp : d.params)
    if (!m.by_name.count(cp.name))
      problems.push_back("the checkpoint's param '" + cp.name + "' is not in this optimizer");
  if (!problems.empty()) {
    std::string msg;
    for (const auto& x : problems) msg += (msg.empty() ? "" : "; ") + x;
    invalid(who + "the checkpoint does not match this optimizer: " + msg);
  }
  // 3. Per param: options, state tensors complete and of the right size, new buffers filled.
  struct Loaded {
    std::vector<std::optional<double>> overrides;
    std::vector<double> options;
    OptionFacts facts;
    std::int64_t step;
    std::optional<detail::Buffer> states[kMaxStates];
    std::optional<detail::Buffer> master;
    std::optional<detail::Buffer> ema;
    std::optional<detail::Buffer> scalars;
    std::optional<detail::Buffer> train_param;
    std::optional<detail::Buffer> train_master;
  };
  std::vector<Loaded> loaded(m.params.size());
  std::unordered_map<std::string, std::vector<const detail::CheckpointTensor*>> tensors;
  for (const auto& t : d.tensors) tensors[t.param].push_back(&t);
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const ParamEntry& p = m.params[i];
    const detail::CheckpointParam& cp = *in_file.at(p.name);
    const AlgorithmDescription& a = m.desc(p);
    const std::vector<double>& param_defaults = defaults[p.slot].values;
    const std::size_t num_scalars = a.scalars.size();
    Loaded& l = loaded[i];
    l.step = cp.step;
    l.overrides.resize(param_defaults.size());
    double scalars[kMaxScalars] = {};
    std::size_t scalars_found = 0;
    for (const auto& [key, value] : cp.overrides) {
      if (key.rfind(kAlgorithmPrefix, 0) == 0) {  // its algorithm: compared above
        if (value != 1.0)
          throw Error(StatusCode::corrupt_data,
                      who + "param '" + p.name + "' has an invalid '" + key + "'");
        continue;
      }
      if (key.rfind(kScalarPrefix, 0) == 0) {  // a scalar state, not an option
        const int k = detail::index_of(a.scalars, key.substr(std::string(kScalarPrefix).size()));
        if (k < 0 || !std::isfinite(value))
          throw Error(StatusCode::corrupt_data,
                      who + "param '" + p.name + "' has an invalid scalar state '" + key + "'");
        scalars[k] = value;
        ++scalars_found;
        continue;
      }
      l.overrides[m.option_index(p.slot, key)] = value;
    }
    l.options = param_defaults;
    for (std::size_t k = 0; k < param_defaults.size(); ++k)
      if (l.overrides[k]) l.options[k] = *l.overrides[k];
    l.facts = m.checked_facts(p.slot, l.options, who + "param '" + p.name + "': ");
    const auto& ts = tensors[p.name];
    std::vector<std::string> expected;
    for (int k = 0; k < static_cast<int>(a.states.size()); ++k)
      if (p.keeps(l.facts, k)) expected.push_back(a.states[k]);
    const bool master = settings.master_weights && p.dtype != DType::f32;
    if (master) expected.emplace_back(kMasterState);
    if (settings.ema_decay > 0.0) expected.emplace_back(kEmaState);
    if (ts.empty()) {  // never stepped, or state-free under these options (sgd, momentum 0)
      if (cp.step > 0 && !expected.empty())
        throw Error(StatusCode::corrupt_data,
                    who + "param '" + p.name + "' has stepped but the checkpoint has no state");
      if (scalars_found > 0)
        throw Error(StatusCode::corrupt_data,
                    who + "param '" + p.name + "' has scalar states but no state tensors");
      continue;
    }
    if (scalars_found != num_scalars)
      throw Error(StatusCode::corrupt_data,
                  who + "param '" + p.name + "' has " + std::to_string(scalars_found) +
                      " scalar states, expected " + std::to_string(num_scalars));
    if (num_scalars > 0) {
      l.scalars.emplace(m.device, m.device_index, kMaxScalars * sizeof(double));
      if (m.device == Device::cuda) {
        cuda::DeviceGuard guard(m.device_index);
        cuda::copy_from_host(l.scalars->data(), scalars, sizeof scalars, nullptr);
      } else {
        std::copy(scalars, scalars + kMaxScalars, static_cast<double*>(l.scalars->data()));
      }
    }
    if (eval_mode && p.numel > 0) {  // the training form, kept while in eval mode
      expected.emplace_back(kTrainParamState);
      if (master) expected.emplace_back(kTrainMasterState);
    }
    if (ts.size() != expected.size())
      throw Error(StatusCode::corrupt_data,
                  who + "param '" + p.name + "' has " + std::to_string(ts.size()) +
                      " state tensors, expected " + std::to_string(expected.size()));
    for (const auto* t : ts) {
      if (std::find(expected.begin(), expected.end(), t->state) == expected.end())
        throw Error(StatusCode::corrupt_data,
                    who + "param '" + p.name + "' has an unexpected state '" + t->state + "'");
      const bool is_master = t->state == kMasterState, is_ema = t->state == kEmaState;
      const bool is_train = t->state == kTrainParamState,
                 is_train_master = t->state == kTrainMasterState;
      const bool whole = is_master || is_ema || is_train || is_train_master;  // numel f32 values
      const int k = whole ? -1 : detail::index_of(a.states, t->state);
      const std::int64_t count = whole ? p.numel : p.state_numel(l.facts, k);
      // A quantized state in the file: its buffer's bytes, as whole float32 values.
      const bool as_saved = t->dtype != DType::f32;
      if (as_saved && (whole || !a.quantizable))
        throw Error(StatusCode::corrupt_data,
                    who + "state '" + t->state + "' of '" + p.name + "' cannot be quantized");
      const DType file_storage = t->dtype;  // f32, or (as_saved) the quantized state's
      const std::size_t raw_bytes = as_saved ? Impl::storage_bytes(file_storage, count) : 0;
      const std::int64_t values_expected =
          as_saved ? static_cast<std::int64_t>((raw_bytes + 3) / 4) : count;
      if (static_cast<std::int64_t>(t->values.size()) != values_expected)
        throw Error(StatusCode::corrupt_data, who + "state '" + t->state + "' of '" + p.name +
                                                  "' has " + std::to_string(t->values.size()) +
                                                  " values, expected " +
                                                  std::to_string(values_expected));
      const DType storage = is_train                                 ? p.dtype
                            : is_master || is_ema || is_train_master ? DType::f32
                                                                     : m.state_dtype(p);
      const std::size_t bytes_needed = Impl::storage_bytes(storage, count);
      std::optional<detail::Buffer>& slot = is_master         ? l.master
                                            : is_ema          ? l.ema
                                            : is_train        ? l.train_param
                                            : is_train_master ? l.train_master
                                                              : l.states[k];
      if (slot) throw Error(StatusCode::corrupt_data, who + "state '" + t->state + "' twice");
      slot.emplace(m.device, m.device_index, bytes_needed);
      if (as_saved || cpu::is_quantized(storage)) {
        // Host bytes in this optimizer's storage: the file's as they are where it is the same
        // (bitwise), else decoded to float32 and stored (rounded to nearest where quantized).
        const bool non_negative = a.non_negative[static_cast<std::size_t>(k)];
        std::vector<unsigned char> image(bytes_needed);
        if (bytes_needed == 0) {
          // an empty tensor's state: nothing to convert or copy
        } else if (as_saved && file_storage == storage) {
          std::memcpy(image.data(), t->values.data(), bytes_needed);
        } else {
          std::vector<float> values = t->values;
          if (as_saved) {
            // A corrupt file cannot make this read out of bounds: sizes were checked above.
            values.assign(static_cast<std::size_t>(count), 0.0f);
            cpu::dequantize_state(values.data(), t->values.data(), file_storage, non_negative,
                                  count);
          }
          if (cpu::is_quantized(storage))
            cpu::quantize_state(image.data(), storage, non_negative, values.data(), count);
          else
            cpu::narrow(image.data(), storage, values.data(), count);
        }
        if (bytes_needed == 0) {
          // nothing to copy
        } else if (m.device == Device::cuda) {
          cuda::DeviceGuard guard(m.device_index);
          cuda::copy_from_host(slot->data(), image.data(), bytes_needed, nullptr);
        } else {
          std::memcpy(slot->data(), image.data(), bytes_needed);
        }
      } else if (m.device == Device::cuda) {
        cuda::DeviceGuard guard(m.device_index);
        if (storage == DType::f32) {
          cuda::copy_from_host(slot->data(), t->values.data(), bytes_needed, nullptr);
        } else {
          std::vector<std::uint16_t> raw(t->values.size());
          for (std::size_t j = 0; j < raw.size(); ++j)
            raw[j] = storage == DType::f16 ? to_f16(t->values[j]).bits : to_bf16(t->values[j]).bits;
          cuda::copy_from_host(slot->data(), raw.data(), bytes_needed, nullptr);
        }
      } else {
        cpu::narrow(slot->data(), storage, t->values.data(), count);
      }
    }
  }
  m.slots.reserve(defaults.size());  // the new algorithms' slots, before the commit
  // 4. Commit: nothing below throws but a device failure writing the step counts.
  if (m.device == Device::cuda) {
    cuda::DeviceGuard guard(m.device_index);
    m.grow_device_steps(nullptr);
    std::vector<std::int64_t> steps(m.d_steps_capacity, 0);
    for (std::size_t i = 0; i < m.params.size(); ++i) steps[m.params[i].key] = loaded[i].step;
    cuda::copy_from_host(m.d_steps->data(), steps.data(), steps.size() * sizeof(std::int64_t),
                         nullptr);
    // The copies ran on the legacy default stream, which does not order against non-blocking
    // streams: finish them before any step can read the state.
    cuda::synchronize();
  }
  for (std::size_t s = 0; s < defaults.size(); ++s) {
    if (defaults[s].fresh)
      m.slots.push_back({std::move(defaults[s].fresh), std::move(defaults[s].values), 0});
    else
      m.slots[s].defaults = std::move(defaults[s].values);
  }
  m.settings = settings;
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    ParamEntry& p = m.params[i];
    Loaded& l = loaded[i];
    p.overrides = std::move(l.overrides);
    m.assign(i, std::move(l.options), std::move(l.facts));
    p.steps_launched = l.step;
    for (int k = 0; k < kMaxStates; ++k) p.states[k] = std::move(l.states[k]);
    p.master = std::move(l.master);
    p.ema = std::move(l.ema);
    p.scalars = std::move(l.scalars);
    p.train_param = std::move(l.train_param);
    p.train_master = std::move(l.train_master);
  }
  m.eval_mode = eval_mode;
}

}  // namespace fo
