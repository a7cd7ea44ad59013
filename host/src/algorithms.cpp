// The registry at run time: AlgorithmImpl<A>, the one implementation of Algorithm, made for
// each registered algorithm by name.
#include <cmath>
#include <string>
#include <vector>

#include "algorithm.hpp"
#include "fusedopt/functional.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "typed_options.hpp"

namespace fo::detail {
namespace {

// GCC 12 warns that an all-real Options (no flag member) "may be used uninitialized" through
// OptionField::get's flag branch, which a null flag pointer never takes.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <class A>
AlgorithmDescription describe() {
  AlgorithmDescription d;
  d.name = A::kName;
  const typename A::Options defaults{};
  for (const auto& f : A::kOptions) {
    d.options.emplace_back(f.name);
    d.defaults.push_back(f.get(defaults));
    d.is_flag.push_back(f.flag != nullptr);
  }
  for (int k = 0; k < StateList<A>::count; ++k) {
    d.states.emplace_back(StateList<A>::name(k));
    d.non_negative.push_back(StateList<A>::non_negative(k));
  }
  d.quantizable = kOnePassStep<A> && StateList<A>::count > 0;
  d.sparse = SparseCapable<A>::value;
  for (int k = 0; k < ScalarList<A>::count; ++k) {
    d.scalars.emplace_back(ScalarList<A>::name(k));
    d.scalar_init.push_back(ScalarList<A>::init(k));
  }
  d.eval = EvalCapable<A>::value;
  d.matrix_only = MatrixCapable<A>::value;
  return d;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <class A>
const AlgorithmDescription& description_of() {
  static const AlgorithmDescription d = describe<A>();
  return d;
}

template <class A>
class AlgorithmImpl final : public Algorithm {
 public:
  using Options = typename A::Options;

  const AlgorithmDescription& description() const override { return description_of<A>(); }

  OptionFacts facts(const std::vector<double>& values) const override {
    OptionFacts f;
    int i = 0;
    for (const auto& field : A::kOptions) {
      const double v = values[i++];
      if (!std::isfinite(v)) {
        f.error = std::string(A::kName) + ": option " + field.name + " must be finite, got " +
                  format_number(v);
        return f;
      }
      if (field.flag && v != 0.0 && v != 1.0) {
        f.error = std::string(A::kName) + ": option " + field.name +
                  " is a flag and takes 0 or 1, got " + format_number(v);
        return f;
      }
    }
    const Options o = unpack<A>(values);
    f.error = options_error<A>(o);
    if (!f.error.empty()) return f;
    for (int k = 0; k < StateList<A>::count; ++k) {
      f.has_state[k] = A::has_state(o, k);
      f.state_init[k] = static_cast<float>(A::state_init(o, k));
      f.state_from_param[k] = StateFromParam<A>::of(k);
      f.state_shape[k] = StateShapes<A>::of(o, k);
      if (f.has_state[k] && f.state_shape[k] == StateShape::row) f.dense = false;
    }
    f.sparse_refusal = SparseRefusal<A>::of(o);
    f.cpu_refusal = CpuRefusal<A>::of(o);
    return f;
  }

  void set_options(std::size_t param, const std::vector<double>& values) override {
    if (param == options_.size())
      options_.push_back(unpack<A>(values));
    else
      options_[param] = unpack<A>(values);
  }

  bool same_options(std::size_t a, std::size_t b) const override {
    for (const auto& f : A::kOptions)
      if (f.get(options_[a]) != f.get(options_[b])) return false;
    return true;
  }

  void cpu_step(std::size_t param, std::int64_t step, const cpu::DensePtrs& t, std::int64_t n,
                double* scalars, const cpu::Storage* storage) const override {
    cpu::dense_step<A>(options_[param], step, t, n, scalars, storage);
  }

  void cpu_reserve(const MatrixView& view, std::int64_t n,
                   const cpu::Storage* storage) const override {
    cpu::reserve_step<A>(view, n, storage);
  }

  void cpu_eval(std::size_t param, float* p, float* const* states, std::int64_t n) const override {
    cpu::eval_params<A>(options_[param], p, states, n);
  }

  void cuda_eval(std::size_t param, const cuda::ListEntry& e, DType param_dtype, DType state_dtype,
                 void* stream) const override {
    cuda::eval_params<A>(options_[param], e, param_dtype, state_dtype, stream);
  }

  std::size_t cuda_workspace(const cuda::ListEntry* entries, std::size_t n) const override {
    return cuda::step_workspace<A>(entries, n);
  }

  void cuda_step(std::size_t param, const cuda::ListEntry* entries, std::size_t n,
                 const cuda::ListPlan& plan, const cuda::ListSettings& settings,
                 void* stream) const override {
    cuda::multi_tensor_step<A>(options_[param], entries, n, plan, settings, stream);
  }

  void sparse_step(std::size_t param, std::int64_t step, const SparseStep& s, Device device,
                   void* stream) const override {
    if (device == Device::cuda)
      cuda::sparse_step<A>(options_[param], step, s, stream);
    else
      cpu::sparse_step<A>(options_[param], step, s);
  }

 private:
  std::vector<Options> options_;  // by param index
};

}  // namespace

std::unique_ptr<Algorithm> make_algorithm(std::string_view name) {
#define FO_MAKE(A) \
  if (name == A::kName) return std::make_unique<AlgorithmImpl<A>>();
  FO_FOR_EACH_DENSE_ALGORITHM(FO_MAKE)
#undef FO_MAKE
  return nullptr;
}

int index_of(const std::vector<std::string>& names, std::string_view key) {
  for (std::size_t i = 0; i < names.size(); ++i)
    if (names[i] == key) return static_cast<int>(i);
  return -1;
}

std::int64_t state_numel(StateShape s, const std::vector<std::int64_t>& shape, std::int64_t numel) {
  if (!state_kept(s, shape)) return 0;
  const std::size_t dims = shape.size();
  auto product_without = [&](std::size_t skip) {
    std::int64_t n = 1;
    for (std::size_t i = 0; i < dims; ++i)
      if (i != skip) n *= shape[i];
    return n;
  };
  switch (s) {
    case StateShape::row: return dims > 0 ? shape[0] : numel;
    case StateShape::factor_rows: return product_without(dims - 1);
    case StateShape::factor_cols: return product_without(dims - 2);
    case StateShape::element:
    case StateShape::unfactored: break;
  }
  return numel;
}

bool state_kept(StateShape s, const std::vector<std::int64_t>& shape) {
  if (s == StateShape::factor_rows || s == StateShape::factor_cols) return shape.size() >= 2;
  if (s == StateShape::unfactored) return shape.size() < 2;
  return true;
}

MatrixView matrix_view(const std::vector<std::int64_t>& shape) {
  return fo::matrix_view(shape.data(), static_cast<int>(shape.size()));
}

}  // namespace fo::detail

namespace fo {

MatrixView matrix_view(const std::int64_t* shape, int ndim) {
  MatrixView v;
  if (ndim < 2) return v;
  v.batch = 1;
  for (int i = 0; i + 2 < ndim; ++i) v.batch *= shape[i];
  v.rows = shape[ndim - 2];
  v.cols = shape[ndim - 1];
  return v;
}

bool state_shape(const StateSpec& spec, const std::int64_t* shape, int ndim,
                 std::vector<std::int64_t>& out) {
  out.clear();
  const std::vector<std::int64_t> dims(shape, shape + ndim);
  if (!detail::state_kept(spec.shape, dims)) return false;
  out = dims;
  if (spec.shape == StateShape::factor_rows) out[static_cast<std::size_t>(ndim - 1)] = 1;
  if (spec.shape == StateShape::factor_cols) out[static_cast<std::size_t>(ndim - 2)] = 1;
  return true;
}

const std::vector<AlgorithmDescription>& dense_algorithms() {
  static const std::vector<AlgorithmDescription> all = {
#define FO_DESCRIBE(A) detail::description_of<A>(),
      FO_FOR_EACH_DENSE_ALGORITHM(FO_DESCRIBE)
#undef FO_DESCRIBE
  };
  return all;
}

}  // namespace fo
