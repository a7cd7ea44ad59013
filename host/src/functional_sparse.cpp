// fused_sparse_step: the functional layer's sparse row step (docs/optimizers.md, "Sparse
// steps"), checked whole before anything is written, then the backend's typed sparse step;
// and its by-name entries.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fusedopt/functional.hpp"
#include "messages.hpp"
#include "sparse.hpp"
#include "sparse_check.hpp"
#include "typed_options.hpp"

namespace fo {
namespace {

using detail::invalid;

// The names of the algorithms that take sparse steps, for a refusal's message.
std::string sparse_algorithms() {
  std::vector<std::string> names;
#define FO_SPARSE_NAME(A) \
  if (SparseCapable<A>::value) names.emplace_back(A::kName);
  FO_FOR_EACH_DENSE_ALGORITHM(FO_SPARSE_NAME)
#undef FO_SPARSE_NAME
  return detail::join(names);
}

template <class A>
void check_sparse_options(const typename A::Options& o) {
  if (!SparseCapable<A>::value)
    detail::unsupported(std::string(A::kName) +
                        " has no sparse step (sparse: " + sparse_algorithms() + ")");
  if (const std::string err = detail::options_error<A>(o); !err.empty()) invalid(err);
  if (const char* refusal = SparseRefusal<A>::of(o); *refusal)
    invalid(std::string(A::kName) + ": " + refusal);
}

template <class A>
std::vector<StateSpec> sparse_states_of(const NamedOptions& named) {
  const typename A::Options o = detail::options_by_name<A>(named);
  check_sparse_options<A>(o);
  std::vector<StateSpec> out;
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(o, k))
      out.push_back({StateList<A>::name(k), k, A::state_init(o, k),
                     StateShapes<A>::of(o, k) == StateShape::row});
  return out;
}

// Every check of a sparse step; the SparseStep it describes.
template <class A>
detail::SparseStep check_sparse(const typename A::Options& options, std::int64_t step,
                                const SparseTensors& t, const Exec& exec,
                                const StepControls& controls) {
  const auto who = [] { return std::string(A::kName) + " sparse step: "; };
  check_sparse_options<A>(options);
  if (step < 1) invalid(who() + "step must be >= 1, got " + std::to_string(step));
  if (t.rows <= 0 || t.dim <= 0)
    invalid(who() + "the table must have rows and columns, got " + std::to_string(t.rows) + " x " +
            std::to_string(t.dim));
  if (controls.stochastic_rounding || controls.d_lr || controls.d_grad_multiplier ||
      controls.d_found_inf || controls.grad_multiplier != 1.0f)
    detail::unsupported(who() + "the step controls apply to dense steps only");
  const bool cuda = exec.device == Device::cuda;
  const auto check_buffer = [&](const float* ptr, const char* what) {
    if (!ptr) invalid(who() + what + " is null");
    if (reinterpret_cast<std::uintptr_t>(ptr) % sizeof(float) != 0)
      invalid(who() + what + " is not aligned to its element size");
    if (cuda && !controls.buffers_on_device && !cuda::is_device_pointer(ptr, exec.device_index))
      invalid(who() + what + " is not CUDA device memory");
  };
  detail::SparseStep s{
      t.table,    {nullptr, nullptr, nullptr}, t.rows, t.dim, t.indices, t.index_dtype, t.nnz,
      t.grad_rows};
  check_buffer(t.table, "the table");
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(options, k)) {
      check_buffer(t.states[k], StateList<A>::name(k));
      s.states[k] = t.states[k];
    }
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(exec.device_index);
  detail::check_sparse_buffers(s, exec.device, exec.device_index, controls.buffers_on_device,
                               exec.stream, who);
  return s;
}

}  // namespace

template <class A>
void fused_sparse_step(const typename A::Options& options, std::int64_t step,
                       const SparseTensors& t, const Exec& exec, const StepControls& controls) {
  const detail::SparseStep s = check_sparse<A>(options, step, t, exec, controls);
  if (t.nnz == 0) return;
  const bool cuda = exec.device == Device::cuda;
  std::optional<cuda::DeviceGuard> guard;
  if (cuda) guard.emplace(exec.device_index);
  if (cuda)
    cuda::sparse_step<A>(options, step, s, exec.stream);
  else
    cpu::sparse_step<A>(options, step, s);
}

#define FO_INSTANTIATE(A)                                                                   \
  template void fused_sparse_step<A>(const A::Options&, std::int64_t, const SparseTensors&, \
                                     const Exec&, const StepControls&);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

namespace {

struct SparseByName {
  const char* name;
  void (*step)(const NamedOptions&, std::int64_t, const SparseTensors&, const Exec&,
               const StepControls&);
  void (*check)(const NamedOptions&, std::int64_t, const SparseTensors&, const Exec&,
                const StepControls&);
  std::vector<StateSpec> (*states)(const NamedOptions&);
};

template <class A>
void sparse_step_by_name(const NamedOptions& named, std::int64_t step, const SparseTensors& t,
                         const Exec& exec, const StepControls& controls) {
  fused_sparse_step<A>(detail::options_by_name<A>(named), step, t, exec, controls);
}

template <class A>
void sparse_check_by_name(const NamedOptions& named, std::int64_t step, const SparseTensors& t,
                          const Exec& exec, const StepControls& controls) {
  check_sparse<A>(detail::options_by_name<A>(named), step, t, exec, controls);
}

const SparseByName& sparse_by_name(std::string_view algorithm) {
  static const SparseByName table[] = {
#define FO_BY_NAME(A) \
  {A::kName, &sparse_step_by_name<A>, &sparse_check_by_name<A>, &sparse_states_of<A>},
      FO_FOR_EACH_DENSE_ALGORITHM(FO_BY_NAME)
#undef FO_BY_NAME
  };
  for (const SparseByName& entry : table)
    if (algorithm == entry.name) return entry;
  invalid("unknown algorithm '" + std::string(algorithm) + "' (sparse: " + sparse_algorithms() +
          ")");
}

}  // namespace

void fused_sparse_step(std::string_view algorithm, const NamedOptions& options, std::int64_t step,
                       const SparseTensors& t, const Exec& exec, const StepControls& controls) {
  sparse_by_name(algorithm).step(options, step, t, exec, controls);
}

void check_sparse_step(std::string_view algorithm, const NamedOptions& options, std::int64_t step,
                       const SparseTensors& t, const Exec& exec, const StepControls& controls) {
  sparse_by_name(algorithm).check(options, step, t, exec, controls);
}

std::vector<StateSpec> sparse_step_states(std::string_view algorithm, const NamedOptions& options) {
  return sparse_by_name(algorithm).states(options);
}

}  // namespace fo
