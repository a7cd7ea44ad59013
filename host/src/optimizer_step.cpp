// Optimizer steps: the gradient-norm pass (clipping, the non-finite check), then one fused
// pass per param on the CPU, or one multi-tensor launch sequence per group of params sharing
// options and dtype on CUDA; and sparse steps of embedding tables. After a param's first step
// (which creates its state) a step allocates nothing and plans no launch it planned before.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "fusedopt/kernels/ema.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "fusedopt/kernels/sum_order.hpp"
#include "optimizer_impl.hpp"
#include "sparse_check.hpp"

namespace fo {

using detail::invalid;
using detail::ParamEntry;
using detail::unsupported;

void Optimizer::step(std::initializer_list<const void*> grads, void* stream) {
  if (grads.size() != impl_->params.size())
    invalid("step: got " + std::to_string(grads.size()) + " grads for " +
            std::to_string(impl_->params.size()) + " params");
  step(grads.begin(), stream);
}

void Optimizer::step(const void* const* grads, void* stream) {
  Impl& m = *impl_;
  if (!grads && !m.params.empty()) invalid("step: the grads array is null");
  if (m.eval_mode)
    invalid(
        "step: the optimizer is in eval mode (its params hold their evaluation form): "
        "call train() first");
  // 1. Validate every gradient before anything is written.
  const bool cuda = m.device == Device::cuda;
  m.stepping.clear();
  for (std::size_t i = 0; i < m.params.size(); ++i) {
    const void* g = grads[i];
    if (!g) continue;
    const ParamEntry& p = m.params[i];
    if (!p.facts.dense)
      unsupported("step: param '" + p.name + "' keeps per-row state (" + m.desc(p).name +
                  " with these options): it takes sparse steps (step_sparse) only");
    if (!cuda && !p.facts.cpu_refusal.empty())
      unsupported("step: param '" + p.name + "': " + m.desc(p).name + ": " + p.facts.cpu_refusal);
    if (const std::string why = m.storage_problem(p); !why.empty())
      unsupported("step: param '" + p.name + "': " + why);
    if (reinterpret_cast<std::uintptr_t>(g) % dtype_size(m.grad_dtype(p)) != 0)
      invalid("step: the grad of param '" + p.name + "' is not aligned to its element size");
    // A host pointer in a kernel would be an illegal address that ends the CUDA context.
    const bool known = i < m.device_checked_grads.size() && m.device_checked_grads[i] == g;
    if (cuda && p.numel > 0 && !known && !cuda::is_device_pointer(g, m.device_index))
      invalid("step: the grad of param '" + p.name + "' is not memory of CUDA device " +
              std::to_string(m.device_index));
    m.stepping.push_back(i);
  }
  if (cuda) {
    m.device_checked_grads.resize(m.params.size(), nullptr);
    for (std::size_t i : m.stepping)
      if (m.params[i].numel > 0) m.device_checked_grads[i] = grads[i];
    cuda::DeviceGuard guard(m.device_index);
    m.step_cuda(grads, stream);
  } else {
    m.step_cpu(grads);
  }
}

// Creates the state of params stepping for the first time; a failed allocation leaves every
// param as it was.
void Optimizer::Impl::create_first_step_state(const std::size_t* indices, std::size_t n,
                                              void* stream) {
  if (std::all_of(indices, indices + n, [&](std::size_t i) { return params[i].has_buffers(); }))
    return;
  struct Fresh {
    std::size_t index;
    std::vector<std::optional<detail::Buffer>> states;
    std::optional<detail::Buffer> master;
    std::optional<detail::Buffer> ema;
    std::optional<detail::Buffer> scalars;
  };
  std::vector<Fresh> fresh;
  for (std::size_t j = 0; j < n; ++j) {
    const std::size_t i = indices[j];
    const ParamEntry& p = params[i];
    if (p.has_buffers()) continue;
    Fresh f{i, std::vector<std::optional<detail::Buffer>>(kMaxStates), std::nullopt, std::nullopt,
            std::nullopt};
    const std::size_t num_scalars = desc(p).scalars.size();
    for (int k = 0; k < static_cast<int>(desc(p).states.size()); ++k) {
      if (!p.keeps(p.facts, k)) continue;
      f.states[k].emplace(device, device_index, state_bytes(p, k));
    }
    if (has_master(p))
      f.master.emplace(device, device_index, static_cast<std::size_t>(p.numel) * sizeof(float));
    if (has_ema())
      f.ema.emplace(device, device_index, static_cast<std::size_t>(p.numel) * sizeof(float));
    if (num_scalars > 0) f.scalars.emplace(device, device_index, kMaxScalars * sizeof(double));
    fresh.push_back(std::move(f));
  }
  for (Fresh& f : fresh) {  // nothing below allocates
    ParamEntry& p = params[f.index];
    for (int k = 0; k < kMaxStates; ++k) {
      if (!f.states[k]) continue;
      const float init = p.facts.state_init[k];
      const std::int64_t count = p.state_numel(p.facts, k);
      const DType storage = state_dtype(p);
      if (cpu::is_quantized(storage)) {  // never a copy of the param (storage_problem)
        // Filled where it lives: both backends write every byte of the buffer, padding
        // included, the same (a checkpoint saves it bytewise).
        if (device == Device::cuda)
          cuda::fill_quantized(f.states[k]->data(), storage, desc(p).non_negative[k], init, count,
                               stream);
        else
          cpu::fill_quantized(f.states[k]->data(), storage, desc(p).non_negative[k], init, count);
      } else if (p.facts
                     .state_from_param[k]) {  // a copy of the param (per element: count == numel)
        if (device == Device::cuda)
          cuda::convert(f.states[k]->data(), storage, p.data, p.dtype, count, stream);
        else
          cpu::convert(f.states[k]->data(), storage, p.data, p.dtype, count);
      } else if (device == Device::cuda) {
        cuda::fill(f.states[k]->data(), storage, init, count, stream);
      } else {
        cpu::fill(f.states[k]->data(), storage, init, count);
      }
      p.states[k] = std::move(f.states[k]);
    }
    if (f.scalars) {
      double init[kMaxScalars] = {};
      const std::vector<double>& scalar_init = desc(p).scalar_init;
      std::copy(scalar_init.begin(), scalar_init.end(), init);
      if (device == Device::cuda)
        cuda::copy_from_host(f.scalars->data(), init, sizeof init, stream);
      else
        std::copy(init, init + kMaxScalars, static_cast<double*>(f.scalars->data()));
      p.scalars = std::move(f.scalars);
    }
    if (f.master) {
      if (device == Device::cuda)
        cuda::widen(f.master->f32(), p.data, p.dtype, p.numel, stream);
      else
        cpu::widen(f.master->f32(), p.data, p.dtype, p.numel);
      p.master = std::move(f.master);
    }
    if (f.ema) {  // the param before its first step (its master weights: the same values)
      if (device == Device::cuda)
        cuda::widen(f.ema->f32(), p.data, p.dtype, p.numel, stream);
      else
        cpu::widen(f.ema->f32(), p.data, p.dtype, p.numel);
      p.ema = std::move(f.ema);
    }
  }
}

// The norm of all stepping gradients times `mult`, in the CUDA norm pass's order
// (grad_sumsq_kernel, finalize_norm_kernel), so that a clipped step is bitwise the same on
// both backends: each grad (in param order) in chunks of 8192 elements, lane l of 256 adding
// the squares (exact in double) of elements l, l + 256, ... of its chunk, the lanes by the
// fixed tree; then the chunks of all grads, in that order, chunk c to lane c % 256, and the
// tree. The same result for any thread count.
float Optimizer::Impl::cpu_norm(const void* const* grads, float mult, bool* nonfinite) {
  constexpr std::int64_t kChunk = kSumChunk;  // the CUDA norm pass's elements per block
  std::int64_t all_chunks = 0;
  for (std::size_t i : stepping) all_chunks += (params[i].numel + kChunk - 1) / kChunk;
  if (norm_partials.size() < static_cast<std::size_t>(all_chunks))
    norm_partials.resize(static_cast<std::size_t>(all_chunks));
  double* partial = norm_partials.data();
  int any_bad = 0;
  for (std::size_t i : stepping) {
    const void* const g = grads[i];
    const DType dtype = grad_dtype(params[i]);
    const std::int64_t n = params[i].numel, chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(cpu::num_threads()) reduction(| : any_bad) schedule(static)
    for (std::int64_t c = 0; c < chunks; ++c) {
      double lanes[kSumLanes] = {};
      const std::int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      for (std::int64_t row = begin; row < end; row += kSumLanes) {
        const int count = static_cast<int>(std::min<std::int64_t>(kSumLanes, end - row));
        for (int l = 0; l < count; ++l) {
          const float x = cpu::value_at(g, dtype, row + l) * mult;
          any_bad |= !std::isfinite(x);
          lanes[l] += static_cast<double>(x) * static_cast<double>(x);
        }
      }
      partial[c] = tree_sum(lanes);
    }
    partial += chunks;
  }
  *nonfinite = any_bad != 0;
  const double total = sum_of_chunks(norm_partials.data(), all_chunks, 1);
  return static_cast<float>(std::sqrt(total));
}

void Optimizer::Impl::step_cpu(const void* const* grads) {
  float mult = settings.grad_multiplier();
  if (settings.max_grad_norm > 0.0 || settings.skip_nonfinite) {
    bool nonfinite = false;
    host_norm = cpu_norm(grads, mult, &nonfinite);
    norm_computed = true;
    if (nonfinite && settings.skip_nonfinite) return;  // nothing changes, no step is counted
    if (settings.max_grad_norm > 0.0)
      mult *= std::min(1.0f, static_cast<float>(settings.max_grad_norm) / (host_norm + 1e-6f));
  }
  // Every param's scratch before any param's state is created or written: a failed allocation
  // changes nothing (a later, larger param's scratch would otherwise fail after an earlier
  // param had stepped).
  for (std::size_t i : stepping) {
    const ParamEntry& p = params[i];
    cpu::Storage dtypes;  // the storages only: cpu_reserve reads no pointer
    dtypes.param_dtype = p.dtype;
    dtypes.grad_dtype = grad_dtype(p);
    dtypes.state_dtype = state_dtype(p);
    slot(p).algorithm->cpu_reserve(detail::matrix_view(p.shape), p.numel,
                                   low_storage(p) ? &dtypes : nullptr);
  }
  create_first_step_state(stepping.data(), stepping.size(), nullptr);
  for (std::size_t i : stepping) {
    ParamEntry& p = params[i];
    cpu::DensePtrs t{static_cast<float*>(p.data), static_cast<const float*>(grads[i]), {}, mult};
    for (int k = 0; k < kMaxStates; ++k) t.states[k] = p.states[k] ? p.states[k]->f32() : nullptr;
    t.ema = p.ema ? p.ema->f32() : nullptr;
    t.ema_weight = ema_weight(settings.ema_decay);
    t.view = detail::matrix_view(p.shape);
    // 16-bit params or states: the storage layer, with CUDA's rounding (cpu::Storage).
    cpu::Storage st;
    if (low_storage(p)) {
      st.param = p.data;
      st.param_dtype = p.dtype;
      st.grad = grads[i];
      st.grad_dtype = grad_dtype(p);
      st.master = p.master ? p.master->f32() : nullptr;
      for (int k = 0; k < kMaxStates; ++k)
        st.states[k] = p.states[k] ? p.states[k]->data() : nullptr;
      st.state_dtype = state_dtype(p);
      st.stochastic = settings.stochastic_rounding;
      st.seed = static_cast<std::uint64_t>(settings.seed);
      st.key = p.key;
    }
    double* const scalars = p.scalars ? static_cast<double*>(p.scalars->data()) : nullptr;
    if (p.numel > 0 || scalars)
      slot(p).algorithm->cpu_step(p.local, p.steps_launched + 1, t, p.numel, scalars,
                                  low_storage(p) ? &st : nullptr);
    ++p.steps_launched;
  }
}

// Device step counts by param key; grows (keeping the counts) as params are added.
void Optimizer::Impl::grow_device_steps(void* stream) {
  if (d_steps && d_steps_capacity >= params.size()) return;
  const std::size_t capacity = std::max<std::size_t>(16, 2 * params.size());
  detail::Buffer next(device, device_index, capacity * sizeof(std::int64_t));
  cuda::memset_zero(next.data(), capacity * sizeof(std::int64_t), stream);
  if (d_steps) {  // params were added after stepping: carry the old counts over
    std::vector<std::int64_t> h(d_steps_capacity);
    cuda::copy_to_host(h.data(), d_steps->data(), h.size() * sizeof(std::int64_t));
    cuda::copy_from_host(next.data(), h.data(), h.size() * sizeof(std::int64_t), stream);
  }
  d_steps = std::move(next);
  d_steps_capacity = capacity;
}

// Groups the params by algorithm, options and dtype, in param order (each group led by its
// first param).
void Optimizer::Impl::regroup() {
  std::vector<detail::StepGroup> next;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const ParamEntry& p = params[i];
    auto same = [&](const detail::StepGroup& g) {
      const ParamEntry& lead = params[g.members.front()];
      return lead.slot == p.slot && lead.dtype == p.dtype && state_dtype(lead) == state_dtype(p) &&
             slot(p).algorithm->same_options(lead.local, p.local);
    };
    auto it = std::find_if(next.begin(), next.end(), same);
    if (it == next.end()) it = next.insert(next.end(), detail::StepGroup{});
    it->members.push_back(i);
  }
  groups = std::move(next);
  groups_stale = false;
}

namespace {

// Fills g.entries with g's members that step (grads[i] non-null) and plans their launches
// unless these are the members planned last time.
void fill_group(detail::StepGroup& g, const std::vector<ParamEntry>& params,
                const void* const* grads) {
  g.entries.clear();
  std::size_t n = 0;
  bool same = true;
  for (std::size_t i : g.members) {
    if (!grads[i]) continue;
    same = same && n < g.planned.size() && g.planned[n] == i;
    ++n;
    const ParamEntry& p = params[i];
    cuda::ListEntry e{p.data, grads[i], p.master ? p.master->f32() : nullptr, {}, p.numel,
                      0,      p.key};
    for (int k = 0; k < kMaxStates; ++k) e.states[k] = p.states[k] ? p.states[k]->data() : nullptr;
    e.ema = p.ema ? p.ema->f32() : nullptr;
    e.scalars = p.scalars ? static_cast<double*>(p.scalars->data()) : nullptr;
    e.view = detail::matrix_view(p.shape);
    g.entries.push_back(e);
  }
  if (same && n == g.planned.size()) return;
  g.plan = cuda::plan_list(g.entries.data(), g.entries.size());
  g.planned.clear();
  for (std::size_t i : g.members)
    if (grads[i]) g.planned.push_back(i);
}

}  // namespace

void Optimizer::Impl::step_cuda(const void* const* grads, void* stream) {
  const bool clip = settings.max_grad_norm > 0.0;
  const bool norm = clip || settings.skip_nonfinite;
  const DType norm_dtype = stepping.empty() ? DType::f32 : grad_dtype(params[stepping[0]]);
  if (norm)  // checked before anything is allocated
    for (std::size_t i : stepping)
      if (grad_dtype(params[i]) != norm_dtype)
        unsupported("clipping and the non-finite check need one gradient dtype across params");
  grow_device_steps(stream);
  // The algorithms' workspace (one, shared by the groups' launches in stream order: the
  // largest any algorithm needs for its stepping params), before any state is created.
  std::size_t step_ws = 0;
  for (std::size_t s = 0; s < slots.size(); ++s) {
    workspace_query.clear();
    for (std::size_t i : stepping) {
      if (params[i].slot != s) continue;
      workspace_query.push_back({nullptr, nullptr, nullptr, {}, params[i].numel, 0, 0});
      workspace_query.back().view = detail::matrix_view(params[i].shape);
    }
    if (!workspace_query.empty())
      step_ws = std::max(step_ws, slots[s].algorithm->cuda_workspace(workspace_query.data(),
                                                                     workspace_query.size()));
  }
  if (step_ws > 0 && (!d_step_workspace || d_step_workspace->bytes() < step_ws))
    d_step_workspace.emplace(device, device_index, step_ws);
  create_first_step_state(stepping.data(), stepping.size(), stream);
  if (!d_scalars) d_scalars.emplace(device, device_index, 4 * sizeof(float));
  if (groups_stale) regroup();

  float* const scalars = d_scalars->f32();  // [norm, clip, found_inf]
  const float mult = settings.grad_multiplier();
  float* found_inf = d_found_inf;
  if (!found_inf && settings.skip_nonfinite) {
    found_inf = scalars + 2;
    cuda::memset_zero(found_inf, sizeof(float), stream);
  }
  if (norm) {
    // One pass over every stepping gradient. With none at all (every grad null) it still
    // runs, over nothing, so that the norm reads 0 and the clipping coefficient 1, as on the
    // CPU.
    if (norm_list.members.size() != params.size()) {
      norm_list.members.resize(params.size());
      for (std::size_t i = 0; i < params.size(); ++i) norm_list.members[i] = i;
    }
    fill_group(norm_list, params, grads);
    const std::int64_t ws = cuda::grad_norm_workspace(norm_list.plan);
    if (!d_workspace || d_workspace->bytes() < static_cast<std::size_t>(ws) * sizeof(float))
      d_workspace.emplace(device, device_index, static_cast<std::size_t>(ws) * sizeof(float));
    cuda::grad_norm(norm_list.entries.data(), norm_list.plan, norm_dtype, mult, d_grad_multiplier,
                    static_cast<float>(settings.max_grad_norm), settings.skip_nonfinite,
                    d_workspace->f32(), scalars, scalars + 1, found_inf, stream);
    norm_computed = true;
  }
  for (detail::StepGroup& g : groups) {
    fill_group(g, params, grads);
    if (g.entries.empty()) continue;
    const ParamEntry& lead = params[g.members.front()];
    cuda::ListSettings s;
    s.param_dtype = lead.dtype;
    s.grad_dtype = grad_dtype(lead);
    s.state_dtype = state_dtype(lead);
    s.stochastic = settings.stochastic_rounding;
    s.seed = static_cast<std::uint64_t>(settings.seed);
    s.grad_multiplier = mult;
    s.ema_weight = ema_weight(settings.ema_decay);
    s.d_lr = d_lr;
    s.d_steps = static_cast<std::int64_t*>(d_steps->data());
    s.d_grad_multiplier = d_grad_multiplier;
    s.d_clip = clip ? scalars + 1 : nullptr;
    s.d_found_inf = found_inf;
    if (d_step_workspace) {
      s.d_workspace = d_step_workspace->data();
      s.workspace_bytes = d_step_workspace->bytes();
    }
    slot(lead).algorithm->cuda_step(lead.local, g.entries.data(), g.entries.size(), g.plan, s,
                                    stream);
  }
  for (std::size_t i : stepping) ++params[i].steps_launched;
}

void Optimizer::step_sparse(std::string_view name, const void* indices, DType index_dtype,
                            std::int64_t nnz, const void* grad_rows, void* stream) {
  Impl& m = *impl_;
  ParamEntry& p = m.param(name);
  // Built only for a message: a valid step allocates nothing.
  const auto who = [&] { return "step_sparse('" + p.name + "'): "; };
  if (!m.desc(p).sparse) {
    std::string sparse;
    for (const auto& a : dense_algorithms())
      if (a.sparse) sparse += (sparse.empty() ? "" : ", ") + a.name;
    unsupported(who() + m.desc(p).name + " has no sparse step (sparse: " + sparse + ")");
  }
  if (!p.facts.sparse_refusal.empty()) invalid(who() + p.facts.sparse_refusal);
  const DType storage = m.state_dtype(p);
  const bool quantized = cpu::is_quantized(storage);
  if (p.dtype != DType::f32 || (storage != DType::f32 && !quantized))
    unsupported(who() +
                "sparse steps take float32 tables with float32 or quantized states (this "
                "table: " +
                dtype_name(p.dtype) + ", its states: " + dtype_name(storage) + ")");
  if (const std::string why = m.storage_problem(p); !why.empty()) unsupported(who() + why);
  if (m.settings.grad_scale != 1.0 || m.settings.max_grad_norm > 0.0 || m.settings.skip_nonfinite)
    unsupported(who() + "grad_scale, max_grad_norm and skip_nonfinite apply to dense steps only");
  if (m.has_ema()) unsupported(who() + "the weight EMA (ema_decay) is updated by dense steps only");
  if (p.shape.empty() || p.shape[0] == 0 || p.numel == 0)
    invalid(who() + "the table must have rows and columns (shape [rows x dim], dim > 0)");
  const std::int64_t rows = p.shape[0], dim = p.numel / rows;
  if (quantized) {
    const std::int64_t w = quant_block_size(storage == DType::q8 ? 8 : 4);
    if (dim % w != 0)
      unsupported(who() + dtype_name(storage) +
                  " states are stepped row by row in whole blocks of " + std::to_string(w) +
                  " elements: this table's rows have " + std::to_string(dim) +
                  " (give it float32 states: set_param_option(name, \"state_dtype\", 0))");
  }
  const detail::SparseStep probe{
      nullptr, {nullptr, nullptr, nullptr},         rows, dim, indices, index_dtype,
      nnz,     static_cast<const float*>(grad_rows)};
  const bool cuda = m.device == Device::cuda;
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(m.device_index);
  detail::check_sparse_buffers(probe, m.device, m.device_index, false, stream, who);
  const std::size_t index = m.by_name.at(p.name);
  if (cuda) m.grow_device_steps(stream);
  m.create_first_step_state(&index, 1, stream);
  // The table's step count: on CUDA it lives on the device (dense steps count there too).
  std::int64_t step = p.steps_launched;
  auto* d_step = cuda ? static_cast<std::int64_t*>(m.d_steps->data()) + p.key : nullptr;
  if (cuda && p.steps_launched > 0) cuda::copy_to_host(&step, d_step, sizeof step);
  ++step;
  if (nnz > 0) {
    detail::SparseStep s = probe;
    s.table = static_cast<float*>(p.data);
    for (int k = 0; k < kMaxStates; ++k) s.states[k] = p.states[k] ? p.states[k]->f32() : nullptr;
    s.state_dtype = storage;
    for (std::size_t k = 0; k < m.desc(p).non_negative.size(); ++k)
      if (m.desc(p).non_negative[k]) s.non_negative_states |= 1u << k;
    m.slot(p).algorithm->sparse_step(p.local, step, s, m.device, stream);
  }
  if (cuda) cuda::copy_from_host(d_step, &step, sizeof step, stream);
  p.steps_launched = cuda ? std::max(p.steps_launched + 1, step) : step;
}

// The weight EMA into the params (docs/optimizers.md, "Weight EMA"). A param without an EMA
// buffer has not stepped: its EMA is the param itself, and nothing changes.
void Optimizer::Impl::apply_ema(bool swap, const char* who, void* stream) {
  if (!has_ema()) invalid(std::string(who) + ": there is no weight EMA (ema_decay is 0)");
  if (swap)
    for (const ParamEntry& p : params)
      if (p.ema && !p.master && p.dtype != DType::f32)
        unsupported(std::string(who) + ": param '" + p.name + "' is " + dtype_name(p.dtype) +
                    " without master weights: its float32 EMA would not come back from it "
                    "exactly (use master_weights, or copy_ema_to_params)");
  const bool cuda = device == Device::cuda;
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(device_index);
  for (ParamEntry& p : params) {
    if (!p.ema || p.numel == 0) continue;
    float* const e = p.ema->f32();
    // The f32 value of the param: its master weights, or the param itself (f32).
    float* const f32 = p.master ? p.master->f32() : static_cast<float*>(p.data);
    const bool low = p.dtype != DType::f32;
    if (!cuda) {  // as the CUDA path below: the master rounds to nearest into the param
      if (swap) {
        std::swap_ranges(e, e + p.numel, f32);
        if (low) cpu::narrow(p.data, p.dtype, f32, p.numel);
      } else if (!low || p.master) {
        std::copy(e, e + p.numel, f32);
        if (low) cpu::narrow(p.data, p.dtype, f32, p.numel);
      } else {
        cpu::narrow(p.data, p.dtype, e, p.numel);
      }
      continue;
    }
    if (swap) {
      cuda::swap(f32, e, p.numel, stream);
      if (low) cuda::narrow(p.data, p.dtype, f32, p.numel, stream);  // master -> param
    } else if (!low || p.master) {
      cuda::narrow(f32, DType::f32, e, p.numel, stream);  // a copy
      if (low) cuda::narrow(p.data, p.dtype, f32, p.numel, stream);
    } else {
      cuda::narrow(p.data, p.dtype, e, p.numel, stream);
    }
  }
}

void Optimizer::swap_ema(void* stream) { impl_->apply_ema(true, "swap_ema", stream); }

void Optimizer::copy_ema_to_params(void* stream) {
  impl_->apply_ema(false, "copy_ema_to_params", stream);
}

// eval(): every stepped param keeps its training form and takes its evaluation form;
// train(): the kept forms come back. A param that has not stepped has no state: both forms
// are the param itself.
void Optimizer::Impl::switch_mode(bool to_eval, void* stream) {
  const char* who = to_eval ? "eval" : "train";
  for (const detail::AlgorithmSlot& s : slots)  // every algorithm, even one without params yet
    if (!s.desc().eval)
      unsupported(std::string(who) + ": " + s.desc().name +
                  " has one form of its params (eval() and train() are Schedule-Free's)");
  if (to_eval == eval_mode) return;
  const bool cuda = device == Device::cuda;
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(device_index);
  const auto stepped = [](const ParamEntry& p) {
    return p.numel > 0 && std::any_of(std::begin(p.states), std::end(p.states),
                                      [](const auto& b) { return b.has_value(); });
  };
  if (to_eval) {
    struct Kept {
      std::optional<detail::Buffer> param, master;
    };
    std::vector<Kept> kept(params.size());  // every allocation before anything changes
    std::vector<float> wide;  // CPU, 16-bit storage: the f32 param and states of eval's op
    for (std::size_t i = 0; i < params.size(); ++i) {
      const ParamEntry& p = params[i];
      if (!stepped(p)) continue;
      if (!cuda && low_storage(p))
        wide.resize(std::max(wide.size(), (1 + kMaxStates) * static_cast<std::size_t>(p.numel)));
      kept[i].param.emplace(device, device_index,
                            static_cast<std::size_t>(p.numel) * dtype_size(p.dtype));
      if (p.master)
        kept[i].master.emplace(device, device_index,
                               static_cast<std::size_t>(p.numel) * sizeof(float));
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      ParamEntry& p = params[i];
      if (!stepped(p)) continue;
      const std::size_t bytes = static_cast<std::size_t>(p.numel) * dtype_size(p.dtype);
      if (cuda) {
        cuda::copy_device(kept[i].param->data(), p.data, bytes, stream);
        if (p.master)
          cuda::copy_device(kept[i].master->data(), p.master->data(),
                            static_cast<std::size_t>(p.numel) * sizeof(float), stream);
        cuda::ListEntry e{p.data, nullptr, p.master ? p.master->f32() : nullptr, {}, p.numel,
                          0,      p.key};
        for (int k = 0; k < kMaxStates; ++k)
          e.states[k] = p.states[k] ? p.states[k]->data() : nullptr;
        slot(p).algorithm->cuda_eval(p.local, e, p.dtype, state_dtype(p), stream);
      } else if (!low_storage(p)) {
        std::memcpy(kept[i].param->data(), p.data, bytes);
        float* const s[kMaxStates] = {p.states[0] ? p.states[0]->f32() : nullptr,
                                      p.states[1] ? p.states[1]->f32() : nullptr,
                                      p.states[2] ? p.states[2]->f32() : nullptr};
        slot(p).algorithm->cpu_eval(p.local, static_cast<float*>(p.data), s, p.numel);
      } else {  // as CUDA's eval_kernel: from and into the master, the param rounded to nearest
        std::memcpy(kept[i].param->data(), p.data, bytes);
        if (p.master)
          std::memcpy(kept[i].master->data(), p.master->data(),
                      static_cast<std::size_t>(p.numel) * sizeof(float));
        const auto n = static_cast<std::size_t>(p.numel);
        float* const x = p.master ? p.master->f32() : wide.data();
        if (!p.master) cpu::widen(x, p.data, p.dtype, p.numel);
        float* s[kMaxStates] = {};
        for (int k = 0; k < kMaxStates; ++k) {
          if (!p.states[k]) continue;
          s[k] = wide.data() + (1 + k) * n;
          read_state(p, k, *p.states[k], s[k], p.numel);
        }
        slot(p).algorithm->cpu_eval(p.local, x, s, p.numel);
        cpu::narrow(p.data, p.dtype, x, p.numel);
      }
      p.train_param = std::move(kept[i].param);
      p.train_master = std::move(kept[i].master);
    }
  } else {
    for (ParamEntry& p : params) {
      if (!p.train_param) continue;
      const std::size_t bytes = static_cast<std::size_t>(p.numel) * dtype_size(p.dtype);
      if (cuda) {
        cuda::copy_device(p.data, p.train_param->data(), bytes, stream);
        if (p.master && p.train_master)
          cuda::copy_device(p.master->data(), p.train_master->data(),
                            static_cast<std::size_t>(p.numel) * sizeof(float), stream);
      } else {
        std::memcpy(p.data, p.train_param->data(), bytes);
        if (p.master && p.train_master)
          std::memcpy(p.master->data(), p.train_master->data(),
                      static_cast<std::size_t>(p.numel) * sizeof(float));
      }
    }
    // The copies are stream-ordered: the kept buffers are freed (cudaFree waits for the
    // device) only after them.
    for (ParamEntry& p : params) {
      p.train_param.reset();
      p.train_master.reset();
    }
  }
  eval_mode = to_eval;
}

void Optimizer::eval(void* stream) { impl_->switch_mode(true, stream); }
void Optimizer::train(void* stream) { impl_->switch_mode(false, stream); }
bool Optimizer::training() const noexcept { return !impl_->eval_mode; }

float Optimizer::grad_norm() const {
  const Impl& m = *impl_;
  if (!m.norm_computed) return std::numeric_limits<float>::quiet_NaN();
  if (m.device != Device::cuda) return m.host_norm;
  float norm = 0.0f;
  cuda::DeviceGuard guard(m.device_index);
  cuda::copy_to_host(&norm, m.d_scalars->data(), sizeof(float));
  return norm;
}

}  // namespace fo
