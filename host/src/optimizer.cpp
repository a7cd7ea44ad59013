// Optimizer objects: options with per-param overrides, state ownership, step counting, and
// the step itself: the gradient-norm pass (clipping, the non-finite check) and then one
// fused pass per param on the CPU, or multi-tensor launches per option group on CUDA.
// Every mutating call validates everything first and changes nothing when it throws.
#include "fusedopt/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "algorithms.hpp"
#include "buffer.hpp"
#include "checkpoint.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "device_check.hpp"
#include "fusedopt/kernels/convert.hpp"

namespace fo {
namespace {

[[noreturn]] void invalid(const std::string& msg) {
  throw Error(StatusCode::invalid_argument, msg);
}
[[noreturn]] void unsupported(const std::string& msg) { throw Error(StatusCode::unsupported, msg); }

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

constexpr const char* kMasterState = "master";

/// Optimizer-wide step settings (see optimizer.hpp), kept apart from the algorithm's options.
struct Settings {
  double grad_scale = 1.0;
  double max_grad_norm = 0.0;
  bool skip_nonfinite = false;
  bool master_weights = false;
  DType state_dtype = DType::f32;
  bool fp32_grads = false;
  bool stochastic_rounding = false;
  double seed = 0.0;

  static const std::vector<std::string>& keys() {
    static const std::vector<std::string> k = {
        "grad_scale",  "max_grad_norm", "skip_nonfinite",      "master_weights",
        "state_dtype", "fp32_grads",    "stochastic_rounding", "seed"};
    return k;
  }
  static bool is_key(std::string_view key) {
    return std::find(keys().begin(), keys().end(), key) != keys().end();
  }
  double get(std::string_view key) const {
    if (key == "grad_scale") return grad_scale;
    if (key == "max_grad_norm") return max_grad_norm;
    if (key == "skip_nonfinite") return skip_nonfinite;
    if (key == "master_weights") return master_weights;
    if (key == "state_dtype") return static_cast<double>(static_cast<int>(state_dtype));
    if (key == "fp32_grads") return fp32_grads;
    if (key == "stochastic_rounding") return stochastic_rounding;
    return seed;
  }
  /// Validates and sets; throws without changing anything.
  void set(std::string_view key, double v, Device device) {
    const std::string k(key);
    if (!std::isfinite(v)) invalid("option " + k + " must be finite, got " + Validator::fmt(v));
    auto flag = [&] {
      if (v != 0.0 && v != 1.0) invalid("option " + k + " is a flag and takes 0 or 1");
      return v != 0.0;
    };
    if (key == "grad_scale") {
      const auto inverse = static_cast<float>(1.0 / v);  // what multiplies the gradients
      if (!(v > 0.0) || !std::isfinite(inverse) || inverse == 0.0f)
        invalid("grad_scale must be > 0 with 1/grad_scale a finite, non-zero float, got " +
                Validator::fmt(v));
      grad_scale = v;
    } else if (key == "max_grad_norm") {
      if (!(v >= 0.0)) invalid("max_grad_norm must be >= 0, got " + Validator::fmt(v));
      max_grad_norm = v;
    } else if (key == "skip_nonfinite") {
      skip_nonfinite = flag();
    } else if (key == "master_weights") {
      master_weights = flag();
    } else if (key == "state_dtype") {
      if (v != 0.0 && v != 2.0) invalid("state_dtype takes 0 (float32) or 2 (bfloat16)");
      if (v == 2.0 && device != Device::cuda) unsupported("bfloat16 states need the CUDA backend");
      state_dtype = v == 2.0 ? DType::bf16 : DType::f32;
    } else if (key == "fp32_grads") {
      fp32_grads = flag();
    } else if (key == "stochastic_rounding") {
      stochastic_rounding = flag();
    } else if (key == "seed") {
      if (!(v >= 0.0 && v <= 9007199254740992.0 && v == std::floor(v)))
        invalid("seed must be an integer in [0, 2^53] (exact as a double)");
      seed = v;
    }
  }
};

}  // namespace

struct ParamEntry;
bool has_buffers(const ParamEntry& p);

struct ParamEntry {
  std::string name;
  void* data;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::int64_t numel;
  int key;                                       // its index: RNG stream and device step slot
  std::vector<std::optional<double>> overrides;  // per option index
  std::vector<double> options;                   // effective: defaults with overrides applied
  std::int64_t step = 0;  // steps taken (CPU); steps attempted, an upper bound (CUDA)
  std::optional<detail::StateBuffer> states[kMaxStates];  // created at the first step
  std::optional<detail::StateBuffer> master;              // f32 master weights
};

/// True once a param has state or master buffers (or has stepped): its storage layout is then
/// fixed, even if the step that created the buffers failed or was skipped.
bool has_buffers(const ParamEntry& p) {
  if (p.step > 0 || p.master) return true;
  for (const auto& b : p.states)
    if (b) return true;
  return false;
}

struct Optimizer::Impl {
  const detail::AlgorithmInfo* info;
  Device device;
  int device_index;
  std::vector<double> defaults;
  Settings settings;
  std::vector<ParamEntry> params;
  std::unordered_map<std::string, std::size_t> by_name;
  // CPU: the last norm. CUDA: device buffers for step counts, the norm pass and its scalars.
  float host_norm = std::numeric_limits<float>::quiet_NaN();
  std::optional<detail::StateBuffer> d_steps;  // int64 per param key
  std::size_t d_steps_capacity = 0;
  std::optional<detail::StateBuffer> d_workspace;
  std::optional<detail::StateBuffer> d_scalars;  // [norm, clip, found_inf]
  bool norm_computed = false;
  const float* d_lr = nullptr;
  const float* d_grad_multiplier = nullptr;
  float* d_found_inf = nullptr;
  // CUDA: the grad pointer of each param last found to be memory of this device. A training
  // loop passes the same buffers every step, so the pointer query runs once per buffer, not
  // once per step. (Under unified addressing a live device range is never a host address.)
  std::vector<const void*> device_checked_grads;

  std::vector<double> effective(const ParamEntry& p, const std::vector<double>& base) const {
    std::vector<double> v = base;
    for (std::size_t i = 0; i < v.size(); ++i)
      if (p.overrides[i]) v[i] = *p.overrides[i];
    return v;
  }

  int option_index(std::string_view key) const {
    const int k = info->option_index(key);
    if (k < 0)
      invalid(info->desc.name + " has no option '" + std::string(key) + "' (its options: " +
              join(info->desc.options) + "; step settings: " + join(Settings::keys()) + ")");
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
    if (!has_buffers(p)) return;
    if (rowwise(p.options) != rowwise(next))
      invalid("param '" + p.name + "' has already stepped; this change would make its " +
              (rowwise(next) ? "per-element state row-wise" : "row-wise state per element"));
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

  DType grad_dtype(const ParamEntry& p) const { return settings.fp32_grads ? DType::f32 : p.dtype; }
  bool has_master(const ParamEntry& p) const {
    return settings.master_weights && p.dtype != DType::f32;
  }
  bool rowwise(const std::vector<double>& options) const {
    return info->rowwise && info->rowwise(options);
  }
  /// Values in each state buffer of `p` under `options`: one per element, or one per row
  /// (shape[0]) for a row-wise algorithm.
  std::int64_t state_numel(const ParamEntry& p, const std::vector<double>& options) const {
    if (!rowwise(options)) return p.numel;
    return p.shape.empty() ? p.numel : p.shape[0];
  }
  std::size_t state_bytes(const ParamEntry& p) const {
    return static_cast<std::size_t>(state_numel(p, p.options)) * dtype_size(settings.state_dtype);
  }

  void create_first_step_state(const std::vector<std::size_t>& stepping, void* stream);
  void grow_device_steps(void* stream);
  float cpu_norm(const std::vector<std::size_t>& stepping, const void* const* grads, float mult,
                 bool* nonfinite) const;
  void step_cpu(const std::vector<std::size_t>& stepping, const void* const* grads);
  void step_cuda(const std::vector<std::size_t>& stepping, const void* const* grads, void* stream);
};

Optimizer::Optimizer(std::string_view algorithm, Device device, int device_index)
    : impl_(std::make_unique<Impl>()) {
  impl_->info = detail::find_algorithm(algorithm);
  if (!impl_->info) {
    std::vector<std::string> names;
    for (const auto& d : dense_algorithms()) names.push_back(d.name);
    invalid("unknown algorithm '" + std::string(algorithm) + "' (known: " + join(names) + ")");
  }
  detail::check_device("", device, device_index);
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
  if (Settings::is_key(key)) {
    const bool storage = key == "master_weights" || key == "state_dtype" || key == "fp32_grads";
    Settings next = m.settings;
    next.set(key, value, m.device);
    if (storage && next.get(key) != m.settings.get(key))
      for (const ParamEntry& p : m.params)
        if (has_buffers(p))
          invalid(std::string(key) + " cannot change: param '" + p.name + "' has already stepped");
    m.settings = next;
    return;
  }
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
  if (Settings::is_key(key)) return impl_->settings.get(key);
  return impl_->defaults[impl_->option_index(key)];
}

void Optimizer::add_param(std::string name, void* data, DType dtype,
                          std::vector<std::int64_t> shape) {
  Impl& m = *impl_;
  if (name.empty()) invalid("a param name must not be empty");
  if (name.size() > 4096) invalid("a param name must be at most 4096 bytes (checkpoints)");
  if (shape.size() > 16) invalid("param '" + name + "': at most 16 dimensions");
  if (m.params.size() >= (std::size_t{1} << 20)) invalid("at most 2^20 params per optimizer");
  if (m.by_name.count(name)) invalid("a param named '" + name + "' was already added");
  if (static_cast<int>(dtype) < 0 || static_cast<int>(dtype) > static_cast<int>(DType::i64))
    invalid("param '" + name + "': unknown dtype " + std::to_string(static_cast<int>(dtype)));
  if (dtype == DType::i32 || dtype == DType::i64)
    invalid("param '" + name + "': dtype " + dtype_name(dtype) + " is not a floating type");
  if (dtype != DType::f32 && m.device != Device::cuda)
    unsupported("param '" + name + "': dtype " + dtype_name(dtype) +
                " needs the CUDA backend (the CPU steps float32)");
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
  p.key = static_cast<int>(m.params.size());
  p.overrides.resize(m.defaults.size());
  p.options = m.defaults;
  m.params.reserve(m.params.size() + 1);  // the only allocation that can throw comes first
  m.by_name.emplace(name, m.params.size());
  m.params.push_back(std::move(p));
}

void Optimizer::set_param_option(std::string_view name, std::string_view key, double value) {
  Impl& m = *impl_;
  ParamEntry& p = m.param(name);
  if (Settings::is_key(key))
    invalid(std::string(key) + " is a step setting of the whole optimizer, not of one param");
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

void Optimizer::set_device_scalars(const float* d_lr, const float* d_grad_multiplier,
                                   float* d_found_inf) {
  if (impl_->device != Device::cuda && (d_lr || d_grad_multiplier || d_found_inf))
    unsupported("device scalars need the CUDA backend");
  impl_->d_lr = d_lr;
  impl_->d_grad_multiplier = d_grad_multiplier;
  impl_->d_found_inf = d_found_inf;
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
  const bool cuda = m.device == Device::cuda;
  std::vector<std::size_t> stepping;
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const void* g = grads[i];
    if (!g) continue;
    const ParamEntry& p = m.params[i];
    if (m.rowwise(p.options))
      unsupported("step: param '" + p.name +
                  "' is row-wise (rowwise = 1): it takes sparse steps (step_sparse) only");
    if (reinterpret_cast<std::uintptr_t>(g) % dtype_size(m.grad_dtype(p)) != 0)
      invalid("step: the grad of param '" + p.name + "' is not aligned to its element size");
    // A host pointer in a kernel would be an illegal address that ends the CUDA context.
    const bool known = i < m.device_checked_grads.size() && m.device_checked_grads[i] == g;
    if (cuda && p.numel > 0 && !known && !cuda::is_device_pointer(g, m.device_index))
      invalid("step: the grad of param '" + p.name + "' is not memory of CUDA device " +
              std::to_string(m.device_index));
    stepping.push_back(i);
  }
  if (cuda) {
    m.device_checked_grads.resize(m.params.size(), nullptr);
    for (std::size_t i : stepping)
      if (m.params[i].numel > 0) m.device_checked_grads[i] = grads[i];
    cuda::DeviceGuard guard(m.device_index);
    m.step_cuda(stepping, grads, stream);
  } else {
    m.step_cpu(stepping, grads);
  }
}

// Creates the state of params stepping for the first time; a failed allocation leaves every
// param as it was.
void Optimizer::Impl::create_first_step_state(const std::vector<std::size_t>& stepping,
                                              void* stream) {
  struct Fresh {
    std::size_t index;
    std::vector<std::optional<detail::StateBuffer>> states;
    std::optional<detail::StateBuffer> master;
  };
  std::vector<Fresh> fresh;
  for (std::size_t i : stepping) {
    const ParamEntry& p = params[i];
    if (has_buffers(p)) continue;
    Fresh f{i, std::vector<std::optional<detail::StateBuffer>>(kMaxStates), std::nullopt};
    for (int k = 0; k < static_cast<int>(info->desc.states.size()); ++k)
      if (info->has_state(p.options, k)) f.states[k].emplace(device, device_index, state_bytes(p));
    if (has_master(p))
      f.master.emplace(device, device_index, static_cast<std::size_t>(p.numel) * sizeof(float));
    fresh.push_back(std::move(f));
  }
  for (Fresh& f : fresh) {  // nothing below allocates
    ParamEntry& p = params[f.index];
    for (int k = 0; k < kMaxStates; ++k) {
      if (!f.states[k]) continue;
      const auto init = static_cast<float>(info->state_init(p.options, k));
      const std::int64_t n = state_numel(p, p.options);
      if (device == Device::cuda)
        cuda::fill(f.states[k]->data(), settings.state_dtype, init, n, stream);
      else
        std::fill(f.states[k]->f32(), f.states[k]->f32() + n, init);
      p.states[k] = std::move(f.states[k]);
    }
    if (f.master) {
      cuda::widen(f.master->f32(), p.data, p.dtype, p.numel, stream);
      p.master = std::move(f.master);
    }
  }
}

// The norm of all stepping gradients times `mult`: fixed chunks summed in double, then in
// order, so the result does not depend on the thread count.
float Optimizer::Impl::cpu_norm(const std::vector<std::size_t>& stepping, const void* const* grads,
                                float mult, bool* nonfinite) const {
  constexpr std::int64_t kChunk = 1 << 16;
  double total = 0.0;
  bool bad = false;
  for (std::size_t i : stepping) {
    const float* g = static_cast<const float*>(grads[i]);
    const std::int64_t n = params[i].numel, chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(static_cast<std::size_t>(chunks), 0.0);
    int any_bad = 0;
#pragma omp parallel for num_threads(cpu::num_threads()) reduction(| : any_bad) schedule(static)
    for (std::int64_t c = 0; c < chunks; ++c) {
      double s = 0.0;
      const std::int64_t end = std::min(n, (c + 1) * kChunk);
      for (std::int64_t j = c * kChunk; j < end; ++j) {
        const float x = g[j] * mult;
        any_bad |= !std::isfinite(x);
        s += static_cast<double>(x) * x;
      }
      partial[static_cast<std::size_t>(c)] = s;
    }
    for (double s : partial) total += s;
    bad = bad || any_bad;
  }
  *nonfinite = bad;
  return static_cast<float>(std::sqrt(total));
}

void Optimizer::Impl::step_cpu(const std::vector<std::size_t>& stepping, const void* const* grads) {
  float mult = static_cast<float>(1.0 / settings.grad_scale);
  if (settings.max_grad_norm > 0.0 || settings.skip_nonfinite) {
    bool nonfinite = false;
    host_norm = cpu_norm(stepping, grads, mult, &nonfinite);
    norm_computed = true;
    if (nonfinite && settings.skip_nonfinite) return;  // nothing changes, no step is counted
    if (settings.max_grad_norm > 0.0)
      mult *= std::min(1.0f, static_cast<float>(settings.max_grad_norm) / (host_norm + 1e-6f));
  }
  create_first_step_state(stepping, nullptr);
  const Exec exec{Device::cpu, nullptr};
  StepControls controls;
  controls.grad_multiplier = mult;
  for (std::size_t i : stepping) {
    ParamEntry& p = params[i];
    DenseTensors t;
    t.param = p.data;
    t.grad = grads[i];
    t.numel = p.numel;
    for (int k = 0; k < kMaxStates; ++k) t.states[k] = p.states[k] ? p.states[k]->data() : nullptr;
    info->step(p.options, p.step + 1, t, exec, controls);
    ++p.step;
  }
}

// Device step counts by param key; grows (keeping the counts) as params are added.
void Optimizer::Impl::grow_device_steps(void* stream) {
  if (d_steps && d_steps_capacity >= params.size()) return;
  const std::size_t capacity = std::max<std::size_t>(16, 2 * params.size());
  detail::StateBuffer next(device, device_index, capacity * sizeof(std::int64_t));
  cuda::memset_zero(next.data(), capacity * sizeof(std::int64_t), stream);
  if (d_steps) {  // params were added after stepping: carry the old counts over
    std::vector<std::int64_t> h(d_steps_capacity);
    cuda::copy_to_host(h.data(), d_steps->data(), h.size() * sizeof(std::int64_t));
    cuda::copy_from_host(next.data(), h.data(), h.size() * sizeof(std::int64_t), stream);
  }
  d_steps = std::move(next);
  d_steps_capacity = capacity;
}

void Optimizer::Impl::step_cuda(const std::vector<std::size_t>& stepping, const void* const* grads,
                                void* stream) {
  const bool clip = settings.max_grad_norm > 0.0;
  if (clip || settings.skip_nonfinite)  // checked before anything is allocated
    for (std::size_t i : stepping)
      if (grad_dtype(params[i]) != grad_dtype(params[stepping[0]]))
        unsupported("clipping and the non-finite check need one gradient dtype across params");
  grow_device_steps(stream);
  create_first_step_state(stepping, stream);
  if (!d_scalars) d_scalars.emplace(device, device_index, 4 * sizeof(float));

  std::vector<cuda::ListEntry> entries;
  entries.reserve(stepping.size());
  for (std::size_t i : stepping) {
    const ParamEntry& p = params[i];
    cuda::ListEntry e{p.data, grads[i], p.master ? p.master->f32() : nullptr, {}, p.numel,
                      0,      p.key};
    for (int k = 0; k < kMaxStates; ++k) e.states[k] = p.states[k] ? p.states[k]->data() : nullptr;
    entries.push_back(e);
  }
  float* const scalars = d_scalars->f32();  // [norm, clip, found_inf]
  const float mult = static_cast<float>(1.0 / settings.grad_scale);
  float* found_inf = d_found_inf;
  if (!found_inf && settings.skip_nonfinite) {
    found_inf = scalars + 2;
    cuda::memset_zero(found_inf, sizeof(float), stream);
  }
  if (clip || settings.skip_nonfinite) {
    // Per dtype of gradient: one norm pass over all of them (dtypes differ only by param).
    const std::int64_t ws = cuda::grad_norm_workspace(entries.data(), entries.size());
    if (!d_workspace || d_workspace->bytes() < static_cast<std::size_t>(ws) * sizeof(float))
      d_workspace.emplace(device, device_index, static_cast<std::size_t>(ws) * sizeof(float));
    std::map<DType, std::vector<cuda::ListEntry>> by_grad;
    for (std::size_t j = 0; j < stepping.size(); ++j)
      by_grad[grad_dtype(params[stepping[j]])].push_back(entries[j]);
    if (by_grad.size() > 1)
      unsupported("clipping and the non-finite check need one gradient dtype across params");
    // No gradient at all (every grad null): the pass still runs, over nothing, so that the
    // norm reads 0 and the clipping coefficient 1, as on the CPU.
    if (by_grad.empty()) by_grad[DType::f32];
    for (const auto& [dtype, list] : by_grad)
      cuda::grad_norm(list.data(), list.size(), dtype, mult, d_grad_multiplier,
                      static_cast<float>(settings.max_grad_norm), settings.skip_nonfinite,
                      d_workspace->f32(), scalars, scalars + 1, found_inf, stream);
    norm_computed = true;
  }
  // One multi-tensor launch sequence per group of params sharing options and dtype.
  std::map<std::pair<std::vector<double>, int>, std::vector<cuda::ListEntry>> groups;
  for (std::size_t j = 0; j < stepping.size(); ++j) {
    const ParamEntry& p = params[stepping[j]];
    groups[{p.options, static_cast<int>(p.dtype)}].push_back(entries[j]);
  }
  for (const auto& [key, list] : groups) {
    cuda::ListSettings s;
    s.param_dtype = static_cast<DType>(key.second);
    s.grad_dtype = settings.fp32_grads ? DType::f32 : s.param_dtype;
    s.state_dtype = settings.state_dtype;
    s.stochastic = settings.stochastic_rounding;
    s.seed = static_cast<std::uint64_t>(settings.seed);
    s.grad_multiplier = mult;
    s.d_lr = d_lr;
    s.d_steps = static_cast<std::int64_t*>(d_steps->data());
    s.d_grad_multiplier = d_grad_multiplier;
    s.d_clip = clip ? scalars + 1 : nullptr;
    s.d_found_inf = found_inf;
    info->cuda_list_step(key.first, list.data(), list.size(), s, stream);
  }
  for (std::size_t i : stepping) ++params[i].step;
}

void Optimizer::step_sparse(std::string_view name, const void* indices, DType index_dtype,
                            std::int64_t nnz, const void* grad_rows, void* stream) {
  Impl& m = *impl_;
  ParamEntry& p = m.param(name);
  const std::string who = "step_sparse('" + p.name + "'): ";
  if (!m.info->sparse_step) {
    std::string sparse;
    for (const auto& a : detail::algorithm_infos())
      if (a.sparse_step) sparse += (sparse.empty() ? "" : ", ") + a.desc.name;
    unsupported(who + m.info->desc.name + " has no sparse step (sparse: " + sparse + ")");
  }
  if (const std::string why = m.info->sparse_refusal(p.options); !why.empty()) invalid(who + why);
  if (p.dtype != DType::f32 || m.settings.state_dtype != DType::f32)
    unsupported(who + "sparse steps take float32 tables and states");
  if (m.settings.grad_scale != 1.0 || m.settings.max_grad_norm > 0.0 || m.settings.skip_nonfinite)
    unsupported(who + "grad_scale, max_grad_norm and skip_nonfinite apply to dense steps only");
  if (p.shape.empty() || p.shape[0] == 0 || p.numel == 0)
    invalid(who + "the table must have rows and columns (shape [rows x dim], dim > 0)");
  if (index_dtype != DType::i32 && index_dtype != DType::i64)
    invalid(who + "indices must be int32 or int64, got " + dtype_name(index_dtype));
  if (nnz < 0) invalid(who + "nnz must be >= 0, got " + std::to_string(nnz));
  if (m.device == Device::cuda && nnz > 2147483647)  // CUB's run-length encode counts in int
    invalid(who + "a CUDA sparse step takes at most 2^31-1 indices, got " + std::to_string(nnz));
  const std::int64_t rows = p.shape[0], dim = p.numel / rows;
  if (nnz > 0) {
    if (!indices) invalid(who + "indices is null");
    if (!grad_rows) invalid(who + "grad_rows is null");
    if (reinterpret_cast<std::uintptr_t>(indices) % dtype_size(index_dtype) != 0)
      invalid(who + "indices are not aligned to their element size");
    if (reinterpret_cast<std::uintptr_t>(grad_rows) % sizeof(float) != 0)
      invalid(who + "grad_rows is not aligned to its element size");
    if (m.device == Device::cuda) {  // a host pointer in a kernel would end the CUDA context
      if (!cuda::is_device_pointer(indices, m.device_index))
        invalid(who + "indices are not memory of CUDA device " + std::to_string(m.device_index));
      if (!cuda::is_device_pointer(grad_rows, m.device_index))
        invalid(who + "grad_rows is not memory of CUDA device " + std::to_string(m.device_index));
    }
  }
  const detail::SparseStep probe{
      nullptr, {nullptr, nullptr, nullptr},         false, rows, dim, indices, index_dtype,
      nnz,     static_cast<const float*>(grad_rows)};
  const bool cuda = m.device == Device::cuda;
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(m.device_index);
  if (nnz > 0) {
    const std::int64_t bad =
        cuda ? cuda::sparse_first_bad_index(probe, stream) : cpu::sparse_first_bad_index(probe);
    if (bad >= 0) {
      std::int64_t value = 0;
      const std::size_t size = dtype_size(index_dtype);
      const auto* src = static_cast<const char*>(indices) + bad * static_cast<std::int64_t>(size);
      std::int32_t v32 = 0;
      if (cuda)
        cuda::copy_to_host(index_dtype == DType::i32 ? static_cast<void*>(&v32) : &value, src,
                           size);
      else if (index_dtype == DType::i32)
        v32 = *reinterpret_cast<const std::int32_t*>(src);
      else
        value = *reinterpret_cast<const std::int64_t*>(src);
      if (index_dtype == DType::i32) value = v32;
      invalid(who + "index " + std::to_string(value) + " at position " + std::to_string(bad) +
              " is outside [0, " + std::to_string(rows) + "); nothing was changed");
    }
  }
  const std::vector<std::size_t> self{m.by_name.at(p.name)};
  if (cuda) m.grow_device_steps(stream);
  m.create_first_step_state(self, stream);
  // The table's step count: on CUDA it lives on the device (dense steps count there too).
  std::int64_t step = p.step;
  auto* d_step = cuda ? static_cast<std::int64_t*>(m.d_steps->data()) + p.key : nullptr;
  if (cuda && p.step > 0) cuda::copy_to_host(&step, d_step, sizeof step);
  ++step;
  if (nnz > 0) {
    detail::SparseStep s = probe;
    s.table = static_cast<float*>(p.data);
    for (int k = 0; k < kMaxStates; ++k) s.states[k] = p.states[k] ? p.states[k]->f32() : nullptr;
    m.info->sparse_step(p.options, step, s, m.device, stream);
  }
  if (cuda) cuda::copy_from_host(d_step, &step, sizeof step, stream);
  p.step = cuda ? std::max(p.step + 1, step) : step;
}

void Optimizer::save(const std::string& path) const {
  const Impl& m = *impl_;
  detail::CheckpointData d;
  d.algorithm = m.info->desc.name;
  for (std::size_t k = 0; k < m.defaults.size(); ++k)
    d.options.emplace_back(m.info->desc.options[k], m.defaults[k]);
  for (const auto& key : Settings::keys()) d.options.emplace_back(key, m.settings.get(key));
  for (const ParamEntry& p : m.params) {
    detail::CheckpointParam cp{p.name, p.dtype, p.shape, step_count(p.name), {}};
    for (std::size_t k = 0; k < p.overrides.size(); ++k)
      if (p.overrides[k]) cp.overrides.emplace_back(m.info->desc.options[k], *p.overrides[k]);
    d.params.push_back(std::move(cp));
    const bool has_state = p.master || std::any_of(std::begin(p.states), std::end(p.states),
                                                   [](const auto& b) { return b.has_value(); });
    if (!has_state) continue;  // never stepped: its state is still the initial value
    for (const auto& s : state_names(p.name)) d.tensors.push_back({p.name, s, state(p.name, s)});
  }
  detail::write_file_atomically(path, detail::encode_checkpoint(d));
}

void Optimizer::load(const std::string& path) {
  Impl& m = *impl_;
  const std::vector<unsigned char> bytes = detail::read_file(path);
  const detail::CheckpointData d = detail::decode_checkpoint(bytes.data(), bytes.size());
  const std::string who = "load('" + path + "'): ";
  if (d.algorithm != m.info->desc.name)
    invalid(who + "the checkpoint is of " + d.algorithm + ", this optimizer is " +
            m.info->desc.name);
  // 1. Options and settings, validated on copies.
  std::vector<double> defaults = m.info->desc.defaults;
  Settings settings;
  std::vector<std::string> seen_keys;
  for (const auto& [key, value] : d.options) {
    if (std::find(seen_keys.begin(), seen_keys.end(), key) != seen_keys.end())
      throw Error(StatusCode::corrupt_data, who + "option '" + key + "' appears twice");
    seen_keys.push_back(key);
    if (Settings::is_key(key)) {
      // States are float32 in the file: a bf16-state checkpoint loads onto the CPU as f32.
      const bool cpu_bf16 = key == "state_dtype" && value == 2.0 && m.device != Device::cuda;
      settings.set(key, cpu_bf16 ? 0.0 : value, m.device);
      continue;
    }
    const int k = m.option_index(key);
    m.check_value(k, value);
    defaults[k] = value;
  }
  if (const std::string err = m.info->validate(defaults); !err.empty()) invalid(who + err);
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
    std::int64_t step;
    std::optional<detail::StateBuffer> states[kMaxStates];
    std::optional<detail::StateBuffer> master;
  };
  std::vector<Loaded> loaded(m.params.size());
  std::unordered_map<std::string, std::vector<const detail::CheckpointTensor*>> tensors;
  for (const auto& t : d.tensors) tensors[t.param].push_back(&t);
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const ParamEntry& p = m.params[i];
    const detail::CheckpointParam& cp = *in_file.at(p.name);
    Loaded& l = loaded[i];
    l.step = cp.step;
    l.overrides.resize(defaults.size());
    for (const auto& [key, value] : cp.overrides) {
      const int k = m.option_index(key);
      m.check_value(k, value);
      l.overrides[k] = value;
    }
    l.options = defaults;
    for (std::size_t k = 0; k < defaults.size(); ++k)
      if (l.overrides[k]) l.options[k] = *l.overrides[k];
    if (const std::string err = m.info->validate(l.options); !err.empty())
      invalid(who + "param '" + p.name + "': " + err);
    const auto& ts = tensors[p.name];
    std::vector<std::string> expected;
    for (int k = 0; k < static_cast<int>(m.info->desc.states.size()); ++k)
      if (m.info->has_state(l.options, k)) expected.push_back(m.info->desc.states[k]);
    const bool master = settings.master_weights && p.dtype != DType::f32;
    if (master) expected.emplace_back(kMasterState);
    if (ts.empty()) {  // never stepped, or state-free under these options (sgd, momentum 0)
      if (cp.step > 0 && !expected.empty())
        throw Error(StatusCode::corrupt_data,
                    who + "param '" + p.name + "' has stepped but the checkpoint has no state");
      continue;
    }
    if (ts.size() != expected.size())
      throw Error(StatusCode::corrupt_data,
                  who + "param '" + p.name + "' has " + std::to_string(ts.size()) +
                      " state tensors, expected " + std::to_string(expected.size()));
    for (const auto* t : ts) {
      if (std::find(expected.begin(), expected.end(), t->state) == expected.end())
        throw Error(StatusCode::corrupt_data,
                    who + "param '" + p.name + "' has an unexpected state '" + t->state + "'");
      const bool is_master = t->state == kMasterState;
      const std::int64_t count = is_master ? p.numel : m.state_numel(p, l.options);
      if (static_cast<std::int64_t>(t->values.size()) != count)
        throw Error(StatusCode::corrupt_data, who + "state '" + t->state + "' of '" + p.name +
                                                  "' has " + std::to_string(t->values.size()) +
                                                  " values, expected " + std::to_string(count));
      const DType storage = is_master ? DType::f32 : settings.state_dtype;
      const std::size_t bytes_needed = static_cast<std::size_t>(count) * dtype_size(storage);
      std::optional<detail::StateBuffer>& slot =
          is_master ? l.master : l.states[m.info->state_index(t->state)];
      if (slot) throw Error(StatusCode::corrupt_data, who + "state '" + t->state + "' twice");
      slot.emplace(m.device, m.device_index, bytes_needed);
      if (m.device == Device::cuda) {
        cuda::DeviceGuard guard(m.device_index);
        if (storage == DType::f32) {
          cuda::copy_from_host(slot->data(), t->values.data(), bytes_needed, nullptr);
        } else {
          std::vector<std::uint16_t> raw(t->values.size());
          for (std::size_t j = 0; j < raw.size(); ++j) raw[j] = to_bf16(t->values[j]).bits;
          cuda::copy_from_host(slot->data(), raw.data(), bytes_needed, nullptr);
        }
      } else {
        std::copy(t->values.begin(), t->values.end(), slot->f32());
      }
    }
  }
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
  m.defaults = std::move(defaults);
  m.settings = settings;
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    ParamEntry& p = m.params[i];
    Loaded& l = loaded[i];
    p.overrides = std::move(l.overrides);
    p.options = std::move(l.options);
    p.step = l.step;
    for (int k = 0; k < kMaxStates; ++k) p.states[k] = std::move(l.states[k]);
    p.master = std::move(l.master);
  }
}

float Optimizer::grad_norm() const {
  const Impl& m = *impl_;
  if (!m.norm_computed) return std::numeric_limits<float>::quiet_NaN();
  if (m.device != Device::cuda) return m.host_norm;
  float norm = 0.0f;
  cuda::DeviceGuard guard(m.device_index);
  cuda::copy_to_host(&norm, m.d_scalars->data(), sizeof(float));
  return norm;
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
  if (m.device != Device::cuda || p.step == 0) return p.step;
  std::int64_t steps = 0;
  cuda::DeviceGuard guard(m.device_index);
  cuda::copy_to_host(&steps, static_cast<const std::int64_t*>(m.d_steps->data()) + p.key,
                     sizeof steps);
  return steps;
}

std::vector<std::string> Optimizer::state_names(std::string_view name) const {
  const ParamEntry& p = impl_->param(name);
  std::vector<std::string> out;
  for (int k = 0; k < static_cast<int>(impl_->info->desc.states.size()); ++k)
    if (impl_->info->has_state(p.options, k)) out.push_back(impl_->info->desc.states[k]);
  if (impl_->has_master(p)) out.emplace_back(kMasterState);
  return out;
}

void Optimizer::get_state(std::string_view name, std::string_view state, float* out,
                          std::int64_t numel) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  const bool master = state == kMasterState && m.has_master(p);
  const int k = m.info->state_index(state);
  if (!master && (k < 0 || !m.info->has_state(p.options, k)))
    invalid("param '" + p.name + "' has no state '" + std::string(state) +
            "' (its states: " + join(state_names(name)) + ")");
  const std::int64_t count = master ? p.numel : m.state_numel(p, p.options);
  if (numel != count)
    invalid("get_state: state '" + std::string(state) + "' of param '" + p.name + "' has " +
            std::to_string(count) + " values, the output " + std::to_string(numel));
  if (numel > 0 && !out) invalid("get_state: the output is null");
  const auto n = static_cast<std::size_t>(numel);
  const std::optional<detail::StateBuffer>& buf = master ? p.master : p.states[k];
  if (!buf) {  // not stepped yet: the initial value
    if (master) {
      if (m.device == Device::cuda) {
        std::vector<std::uint16_t> raw(n);
        cuda::DeviceGuard guard(m.device_index);
        cuda::copy_to_host(raw.data(), p.data, n * sizeof(std::uint16_t));
        for (std::size_t i = 0; i < n; ++i)
          out[i] = p.dtype == DType::bf16 ? to_float(bf16{raw[i]}) : to_float(f16{raw[i]});
      }
      return;
    }
    std::fill(out, out + n, static_cast<float>(m.info->state_init(p.options, k)));
    return;
  }
  const DType dtype = master ? DType::f32 : m.settings.state_dtype;
  if (m.device != Device::cuda) {
    std::copy(buf->f32(), buf->f32() + n, out);
    return;
  }
  cuda::DeviceGuard guard(m.device_index);
  if (dtype == DType::f32) {
    cuda::copy_to_host(out, buf->data(), n * sizeof(float));
    return;
  }
  std::vector<std::uint16_t> raw(n);
  cuda::copy_to_host(raw.data(), buf->data(), n * sizeof(std::uint16_t));
  for (std::size_t i = 0; i < n; ++i) out[i] = to_float(bf16{raw[i]});
}

std::int64_t Optimizer::state_numel(std::string_view name, std::string_view state) const {
  const Impl& m = *impl_;
  const ParamEntry& p = m.param(name);
  if (state == kMasterState && m.has_master(p)) return p.numel;
  const int k = m.info->state_index(state);
  if (k < 0 || !m.info->has_state(p.options, k))
    invalid("param '" + p.name + "' has no state '" + std::string(state) +
            "' (its states: " + join(state_names(name)) + ")");
  return m.state_numel(p, p.options);
}

std::vector<float> Optimizer::state(std::string_view name, std::string_view state) const {
  std::vector<float> out(static_cast<std::size_t>(state_numel(name, state)));
  get_state(name, state, out.data(), static_cast<std::int64_t>(out.size()));
  return out;
}

}  // namespace fo
