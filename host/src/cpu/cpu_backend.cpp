// Instruction-set selection and threading of the CPU backend.
#include "cpu/cpu_backend.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "fusedopt/types.hpp"
#include "matrix/newton_schulz.hpp"

namespace fo::cpu {
namespace {

// Below this many elements a step runs on the calling thread: waking the team costs more
// than the work it would share.
constexpr std::int64_t kMinParallel = 1 << 15;
constexpr std::int64_t kSplitAlign = 64;

std::atomic<int> g_threads{0};  // 0: not set, use omp_get_max_threads()

bool cpu_has(Isa isa) noexcept {
#if defined(FO_HAVE_X86_ISAS)
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

Isa initial_isa() {
  Isa isa = best_isa();
  if (const char* env = std::getenv("FUSEDOPT_CPU_ISA")) {
    for (Isa i : {Isa::scalar, Isa::avx2, Isa::avx512})
      if (std::strcmp(env, isa_name(i)) == 0 && cpu_has(i)) isa = i;
  }
  return isa;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

bool isa_supported(Isa isa) noexcept { return cpu_has(isa); }

Isa best_isa() noexcept {
  if (cpu_has(Isa::avx512)) return Isa::avx512;
  if (cpu_has(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

Isa isa() noexcept { return static_cast<Isa>(current_isa().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (!cpu_has(isa))
    throw Error(StatusCode::unsupported,
                std::string("CPU instruction set ") + isa_name(isa) + " is not available here");
  current_isa().store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

void set_num_threads(int n) {
  if (n < 1)
    throw Error(StatusCode::invalid_argument,
                "thread count must be >= 1, got " + std::to_string(n));
  g_threads.store(n, std::memory_order_relaxed);
}

int num_threads() noexcept {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

namespace {

/// Runs range(begin, end) over [0, n) with the configured threads, split at multiples of
/// `align`; one thread per `min_parallel` items at most.
template <class Range>
void parallel_for(const Range& range, std::int64_t n, std::int64_t min_parallel = kMinParallel,
                  std::int64_t align = kSplitAlign) {
  const std::int64_t max_by_size = std::max<std::int64_t>(1, n / min_parallel);
  const int threads = static_cast<int>(std::min<std::int64_t>(num_threads(), max_by_size));
  if (threads <= 1) {
    range(0, n);
    return;
  }
  std::int64_t chunk = (n + threads - 1) / threads;
  chunk = (chunk + align - 1) / align * align;
#pragma omp parallel num_threads(threads)
  {
    const std::int64_t begin = std::min<std::int64_t>(n, omp_get_thread_num() * chunk);
    const std::int64_t end = std::min<std::int64_t>(n, begin + chunk);
    if (begin < end) range(begin, end);
  }
}

// The two passes of a trust-ratio step; the chunk sums live in a per-thread scratch that
// only grows.
template <class A>
void trust_step(const typename A::Op& op, const DensePtrs& t, std::int64_t n) {
  const Kernels<A>& k = active_kernels<A>();
  float rate = op.rate(0.0, 0.0);
  if (A::Op::kAdvanceStates || op.needs_norms()) {
    const std::int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
    thread_local std::vector<double> scratch;
    try {
      if (scratch.size() < static_cast<std::size_t>(2 * chunks))
        scratch.resize(static_cast<std::size_t>(2 * chunks));
    } catch (const std::bad_alloc&) {
      throw Error(StatusCode::out_of_memory, "trust-ratio step: no memory for the norm scratch");
    }
    double* const partial = scratch.data();
    parallel_for([&](std::int64_t cb, std::int64_t ce) { k.first(op, t, n, cb, ce, partial); },
                 chunks, kMinParallel / kSumChunk, 1);
    const double pn = std::sqrt(sum_of_chunks(partial, chunks, 2));
    const double un = std::sqrt(sum_of_chunks(partial + 1, chunks, 2));
    rate = op.rate(pn, un);
  }
  parallel_for([&](std::int64_t begin, std::int64_t end) { k.second(op, t, rate, begin, end); }, n);
}

// The three passes of a factored step (kernels/factored.hpp). Scratch per thread that only
// grows: the row sums, the per-segment column sums (8 bytes per kColSegment elements), each
// matrix's normalizer and the chunk sums.
template <class A>
void factored_step(const typename A::Op& op, const DensePtrs& t, std::int64_t n) {
  if (n == 0) return;  // no element, no statistic: nothing moves
  const Kernels<A>& k = active_kernels<A>();
  const MatrixView& v = t.view;
  const std::int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  const std::int64_t per_matrix = v.factored() ? (v.rows + kColSegment - 1) / kColSegment : 0;
  const std::int64_t segments = v.batch * per_matrix;
  thread_local std::vector<double> scratch;
  thread_local std::vector<float> norms;
  const std::size_t need = static_cast<std::size_t>(
      2 * chunks + (v.factored() ? v.batch * v.rows + segments * v.cols : 0));
  try {
    if (scratch.size() < need) scratch.resize(need);
    if (norms.size() < static_cast<std::size_t>(v.batch))
      norms.resize(static_cast<std::size_t>(v.batch));
  } catch (const std::bad_alloc&) {
    throw Error(StatusCode::out_of_memory,
                std::string(A::kName) + ": no memory for the step's scratch");
  }
  double* const partial = scratch.data();
  float* const norm = norms.data();  // thread_local: the pointer, not the name, goes to threads
  if (v.factored()) {
    double* const row_sq = partial + 2 * chunks;
    double* const col_partial = row_sq + v.batch * v.rows;
    parallel_for(
        [&](std::int64_t sb, std::int64_t se) { k.factored_stats(t, sb, se, row_sq, col_partial); },
        segments, std::max<std::int64_t>(1, kMinParallel / (kColSegment * v.cols)), 1);
    float* const row_var = t.states[0];
    float* const col_var = t.states[1];
    const double rows = static_cast<double>(v.rows), cols = static_cast<double>(v.cols);
    parallel_for(
        [&](std::int64_t jb, std::int64_t je) {
          for (std::int64_t j = jb; j < je; ++j) {  // column j % cols of matrix j / cols
            const std::int64_t b = j / v.cols, c = j % v.cols;
            double sum = 0.0;
            for (std::int64_t s = b * per_matrix; s < (b + 1) * per_matrix; ++s)
              sum += col_partial[s * v.cols + c];
            col_var[j] = op.blend(col_var[j], static_cast<float>(sum / rows));
          }
        },
        v.batch * v.cols,
        std::max<std::int64_t>(1, kMinParallel / std::max<std::int64_t>(1, per_matrix)), 1);
    for (std::int64_t b = 0; b < v.batch; ++b) {
      double lanes[kRowLanes] = {};
      for (std::int64_t r = 0; r < v.rows; ++r) {
        const std::int64_t i = b * v.rows + r;
        row_var[i] = op.blend(row_var[i], static_cast<float>(row_sq[i] / cols));
        lanes[r % kRowLanes] += static_cast<double>(row_var[i]);
      }
      norm[b] = op.normalizer(row_lane_sum(lanes) / rows);
    }
  }
  parallel_for(
      [&](std::int64_t cb, std::int64_t ce) { k.factored_sums(op, t, norm, n, cb, ce, partial); },
      chunks, kMinParallel / kSumChunk, 1);
  const float rate =
      op.rate(sum_of_chunks(partial, chunks, 2), sum_of_chunks(partial + 1, chunks, 2), n);
  parallel_for([&](std::int64_t b, std::int64_t e) { k.factored_apply(op, t, norm, rate, b, e); },
               n);
}

// The three parts of a matrix step (kernels/matrix_step.hpp): the prepare pass on the
// configured threads into a scratch per thread that only grows (the iteration's input and its
// workspace, never allocated again for a tensor no larger), the iteration on OpenBLAS's own
// threads from this one, the apply pass on the configured threads. Everything that can refuse
// comes before the first write.
template <class A>
void matrix_step(const typename A::Options& options, const typename A::Op& op, const DensePtrs& t,
                 std::int64_t n) {
  const std::string name = A::kName;
  if (const char* why = CpuRefusal<A>::of(options); *why)
    throw Error(StatusCode::unsupported, name + ": " + why);
  const MatrixView& v = t.view;
  if (!is_matrix_batch(v, n))
    throw Error(StatusCode::invalid_argument,
                name +
                    ": steps matrices (a param of 2 or more dimensions, viewed as [batch, "
                    "rows, cols]); this tensor of " +
                    std::to_string(n) +
                    " elements has no such view (vectors and scalars: use adamw or another "
                    "elementwise algorithm)");
  if (n == 0) return;  // a 0-size matrix: nothing to orthogonalize, nothing moves
  const NsConfig ns = A::ns_config(options);
  detail::validate_newton_schulz(A::kName, v.batch, v.rows, v.cols, ns.coefficients, ns.steps,
                                 ns.eps);
  const std::int64_t ws = detail::newton_schulz_cpu_workspace_floats(v.rows, v.cols);
  thread_local std::vector<float> scratch;
  try {
    if (scratch.size() < static_cast<std::size_t>(n + ws))
      scratch.resize(static_cast<std::size_t>(n + ws));
  } catch (const std::bad_alloc&) {
    throw Error(StatusCode::out_of_memory, name + ": no memory for the step's scratch");
  }
  float* const x = scratch.data();  // thread_local: the pointer, not the name, goes to threads
  const Kernels<A>& k = active_kernels<A>();
  parallel_for([&](std::int64_t b, std::int64_t e) { k.matrix_prepare(op, t, x, b, e); }, n);
  detail::newton_schulz_cpu(x, x, v.batch, v.rows, v.cols, ns.coefficients, ns.steps, ns.eps, x + n,
                            ws);
  const float rate = op.rate(v.rows, v.cols);
  parallel_for([&](std::int64_t b, std::int64_t e) { k.matrix_apply(op, t, x, rate, b, e); }, n);
}

}  // namespace

template <class A>
void dense_step(const typename A::Options& options, std::int64_t step, const DensePtrs& t,
                std::int64_t n, double* scalars) {
  double next[kMaxScalars] = {};
  if (ScalarList<A>::count > 0 && !scalars)
    throw Error(StatusCode::invalid_argument,
                std::string(A::kName) + ": the step's scalar states are missing");
  const typename A::Op op = make_step_op<A>(options, step, scalars, next);
  if constexpr (MatrixCapable<A>::value) {
    static_assert(ScalarList<A>::count == 0, "matrix steps keep no scalar states");
    matrix_step<A>(options, op, t, n);
  } else if constexpr (FactoredCapable<A>::value) {
    static_assert(ScalarList<A>::count == 0, "factored steps keep no scalar states");
    factored_step<A>(op, t, n);
  } else if constexpr (TrustRatioCapable<A>::value) {
    static_assert(ScalarList<A>::count == 0, "trust-ratio steps keep no scalar states");
    trust_step<A>(op, t, n);
  } else {
    const auto kernel = active_kernels<A>().range;
    if (n > 0)
      parallel_for([&](std::int64_t begin, std::int64_t end) { kernel(op, t, begin, end); }, n);
  }
  for (int k = 0; k < ScalarList<A>::count; ++k) scalars[k] = next[k];
}

template <class A>
void eval_params(const typename A::Options& options, float* param, float* const* states,
                 std::int64_t n) {
  if constexpr (EvalCapable<A>::value) {
    const typename A::EvalOp op = A::make_eval_op(options);
    parallel_for(
        [&](std::int64_t begin, std::int64_t end) {
          for (std::int64_t i = begin; i < end; ++i) {
            float s[kMaxStates];
            for (int k = 0; k < kMaxStates; ++k) s[k] = states[k] ? states[k][i] : 0.0f;
            param[i] = op(param[i], s);
          }
        },
        n);
  } else {
    (void)options, (void)param, (void)states, (void)n;
    throw Error(StatusCode::unsupported, std::string(A::kName) + " has no evaluation form");
  }
}

#define FO_INSTANTIATE(A)                                                                \
  template void dense_step<fo::A>(const fo::A::Options&, std::int64_t, const DensePtrs&, \
                                  std::int64_t, double*);
FO_FOR_EACH_CPU_KERNEL(FO_INSTANTIATE)
#undef FO_INSTANTIATE
#define FO_INSTANTIATE(A) \
  template void eval_params<fo::A>(const fo::A::Options&, float*, float* const*, std::int64_t);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

void traffic_probe(const DensePtrs& t, std::int64_t n) { dense_step<TrafficProbe>({}, 1, t, n); }

}  // namespace fo::cpu
