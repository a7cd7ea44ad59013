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

#include "cpu/quant_encode.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/kernels/quantize.hpp"
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

/// Threads of a parallel_for over n items: one per `min_parallel` items at most.
int team_size(std::int64_t n, std::int64_t min_parallel = kMinParallel) {
  const std::int64_t max_by_size = std::max<std::int64_t>(1, n / min_parallel);
  return static_cast<int>(std::min<std::int64_t>(num_threads(), max_by_size));
}

/// Runs range(begin, end, thread) over [0, n) with team_size(n, min_parallel) threads, split
/// at multiples of `align`; `thread` in [0, team_size) numbers the range's thread.
template <class Range>
void parallel_for_indexed(const Range& range, std::int64_t n,
                          std::int64_t min_parallel = kMinParallel,
                          std::int64_t align = kSplitAlign) {
  const int threads = team_size(n, min_parallel);
  if (threads <= 1) {
    range(0, n, 0);
    return;
  }
  std::int64_t chunk = (n + threads - 1) / threads;
  chunk = (chunk + align - 1) / align * align;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    const std::int64_t begin = std::min<std::int64_t>(n, thread * chunk);
    const std::int64_t end = std::min<std::int64_t>(n, begin + chunk);
    if (begin < end) range(begin, end, thread);
  }
}

/// Runs range(begin, end) over [0, n) with the configured threads, split at multiples of
/// `align`; one thread per `min_parallel` items at most.
template <class Range>
void parallel_for(const Range& range, std::int64_t n, std::int64_t min_parallel = kMinParallel,
                  std::int64_t align = kSplitAlign) {
  parallel_for_indexed([&](std::int64_t b, std::int64_t e, int) { range(b, e); }, n, min_parallel,
                       align);
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

// ------------------------------------------------------------------ the storage layer

// dst[j] = src[begin + j] for j < m, widened.
void widen_block(float* dst, const void* src, DType dtype, std::int64_t begin, std::int64_t m) {
  if (dtype == DType::bf16) {
    const bf16* s = static_cast<const bf16*>(src) + begin;
    for (std::int64_t j = 0; j < m; ++j) dst[j] = to_float(s[j]);
  } else {
    const f16* s = static_cast<const f16*>(src) + begin;
    for (std::int64_t j = 0; j < m; ++j) dst[j] = to_float(s[j]);
  }
}

template <class T>
void narrow_block_as(T* dst, const float* src, std::int64_t begin, std::int64_t m, bool stochastic,
                     std::uint64_t seed, std::uint64_t step, std::uint64_t counter_offset) {
  if (!stochastic) {
    for (std::int64_t j = 0; j < m; ++j) dst[begin + j] = from_float<T>(src[j]);
    return;
  }
  for (std::int64_t j = 0; j < m; ++j) {
    const auto counter = static_cast<std::uint64_t>(begin + j) * 4 + counter_offset;
    dst[begin + j] = from_float_stochastic<T>(src[j], random_bits(seed, step, counter));
  }
}

// dst[begin + j] = src[j] for j < m, rounded to `dtype` (16-bit) as multi_tensor_step_kernel
// rounds: to nearest even, or stochastically with counter 4 * (begin + j) + counter_offset
// (the element's index in the tensor, so the draws do not depend on the blocks or threads).
void narrow_block(void* dst, DType dtype, const float* src, std::int64_t begin, std::int64_t m,
                  bool stochastic, std::uint64_t seed, std::uint64_t step,
                  std::uint64_t counter_offset) {
  if (dtype == DType::bf16)
    narrow_block_as(static_cast<bf16*>(dst), src, begin, m, stochastic, seed, step, counter_offset);
  else
    narrow_block_as(static_cast<f16*>(dst), src, begin, m, stochastic, seed, step, counter_offset);
}

// Calls f with the map of a quantized state (q8 or q4; the unsigned map where non_negative).
template <class F>
void with_quant_map(DType q, bool non_negative, const F& f) {
  if (q == DType::q8)
    f(non_negative ? kQuantMap8Unsigned : kQuantMap8Signed);
  else
    f(non_negative ? kQuantMap4Unsigned : kQuantMap4Signed);
}

// dst[j] = element begin + j of a quantized state of n elements, decoded, for j < m.
template <int Bits>
void dequantize_range(const QuantMap<Bits>& q, const void* state, std::int64_t n,
                      std::int64_t begin, std::int64_t m, float* dst) {
  const auto* codes = static_cast<const std::uint8_t*>(state);
  const auto* absmax = reinterpret_cast<const float*>(codes + quant_absmax_offset(n, Bits));
  const std::int64_t w = quant_block_size(Bits);
  for (std::int64_t j = 0; j < m; ++j) {
    const std::int64_t i = begin + j;
    const int c = Bits == 8 ? codes[i] : (codes[i >> 1] >> ((i & 1) * 4)) & 0xF;
    dst[j] = decode(q, c, absmax[i / w]);
  }
}

// Elements [begin, begin + m) of a quantized state of n elements from src[0, m): begin a
// multiple of the block size, begin + m a multiple of it or n. Each block's absmax, then its
// codes (step_code: to nearest, or stochastically with counter 4i + counter_offset).
template <int Bits>
void quantize_range(const QuantMap<Bits>& q, void* state, std::int64_t n, std::int64_t begin,
                    std::int64_t m, const float* src, bool stochastic, std::uint64_t seed,
                    std::uint64_t step, std::uint64_t counter_offset) {
  auto* const codes = static_cast<std::uint8_t*>(state);
  auto* const absmax = reinterpret_cast<float*>(codes + quant_absmax_offset(n, Bits));
  const std::int64_t w = quant_block_size(Bits);
  const NearestCodeTable<Bits>& nearest = nearest_code_table(q);
#if defined(FO_HAVE_X86_ISAS)
  const bool vector = !stochastic && isa() == Isa::avx512;
#endif
  std::int32_t block_codes[kQuant8BlockSize];  // a block's codes, where computed 16 at a time
  bool from_block = false;
  const auto code = [&](float x, float a, std::int64_t i) {
    if (from_block) return static_cast<int>(block_codes[(i - begin) % w]);
    if (!stochastic) return nearest(normalized(x, a));  // nearest_code, by its table
    const auto counter = static_cast<std::uint64_t>(i) * 4 + counter_offset;
    return step_code(q, normalized(x, a), true, seed, step, counter);
  };
  for (std::int64_t b = 0; b < m; b += w) {
    const auto len = static_cast<int>(std::min(w, m - b));
    const float* const x = src + b;
    const float a = block_absmax_fast(x, len);
    const std::int64_t first = begin + b;
    absmax[first / w] = a;
#if defined(FO_HAVE_X86_ISAS)
    // A finite, non-zero absmax: every x / a is in [-1, 1], the vector encoder's domain.
    from_block = vector && a > 0.0f;
    if (from_block)
      encode_block_avx512(nearest.base(), nearest.thresholds(), x, a, len, block_codes);
#endif
    if constexpr (Bits == 8) {
      for (int j = 0; j < len; ++j)
        codes[first + j] = static_cast<std::uint8_t>(code(x[j], a, first + j));
    } else {
      for (int j = 0; j < len; j += 2) {
        const int lo = code(x[j], a, first + j);
        const int hi = j + 1 < len ? code(x[j + 1], a, first + j + 1) : 0;
        codes[(first + j) >> 1] = static_cast<std::uint8_t>(lo | (hi << 4));
      }
    }
  }
}

// Zeroes the bytes between a quantized state's codes and its absmax values, so that its whole
// buffer (saved as it is in checkpoints) is determined by its values.
void zero_quant_padding(void* state, DType q, std::int64_t n) {
  const int bits = q == DType::q8 ? 8 : 4;
  auto* const codes = static_cast<std::uint8_t*>(state);
  std::fill(codes + quant_code_bytes(n, bits), codes + quant_absmax_offset(n, bits),
            std::uint8_t{0});
}

// The storage layer's scratch: per thread (2 + kMaxStates) blocks of floats (param, grad,
// states), kept by the calling thread and only grown, so that a step allocates nothing after
// the first and a failed allocation comes before any write.
float* storage_scratch(int threads) {
  thread_local std::vector<float> scratch;
  const auto need = static_cast<std::size_t>(threads) * (2 + kMaxStates) * kStoreBlock;
  try {
    if (scratch.size() < need) scratch.resize(need);
  } catch (const std::bad_alloc&) {
    throw Error(StatusCode::out_of_memory, "CPU step: no memory for the storage layer's scratch");
  }
  return scratch.data();
}

// An elementwise step through the storage layer (Storage): each thread's range in blocks of
// kStoreBlock elements. f32 tensors are stepped in place (the master weights stand for a
// 16-bit param); 16-bit ones through the scratch. An element's result depends on neither its
// block nor its thread: the kernel's does not (elementwise.hpp), nor do the conversions.
template <class A>
void stored_range_step(const typename A::Op& op, const DensePtrs& t, const Storage& st,
                       std::int64_t step, std::int64_t n) {
  const auto kernel = active_kernels<A>().range;
  float* const scratch = storage_scratch(team_size(n));
  const std::uint64_t seed =
      st.seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(st.key + 1));
  const auto ustep = static_cast<std::uint64_t>(step);
  const bool low_param = st.param_dtype != DType::f32;
  const bool low_grad = st.grad_dtype != DType::f32;
  const bool low_states = st.state_dtype != DType::f32;
  const bool quant = is_quantized(st.state_dtype);
  bool non_negative[kMaxStates] = {};
  for (int k = 0; k < StateList<A>::count; ++k) non_negative[k] = StateList<A>::non_negative(k);
  parallel_for_indexed(
      [&](std::int64_t begin, std::int64_t end, int thread) {
        float* const mine =
            scratch + static_cast<std::ptrdiff_t>(thread) * (2 + kMaxStates) * kStoreBlock;
        for (std::int64_t b = begin; b < end; b += kStoreBlock) {
          const std::int64_t m = std::min(kStoreBlock, end - b);
          DensePtrs d = t;
          if (st.master) {
            d.param = st.master + b;
          } else if (low_param) {
            d.param = mine;
            widen_block(d.param, st.param, st.param_dtype, b, m);
          } else {
            d.param = static_cast<float*>(st.param) + b;
          }
          if (low_grad) {
            float* const g = mine + kStoreBlock;
            widen_block(g, st.grad, st.grad_dtype, b, m);
            d.grad = g;
          } else {
            d.grad = static_cast<const float*>(st.grad) + b;
          }
          for (int k = 0; k < kMaxStates; ++k) {
            if (!st.states[k]) {
              d.states[k] = nullptr;
            } else if (quant) {
              d.states[k] = mine + (2 + k) * kStoreBlock;
              with_quant_map(st.state_dtype, non_negative[k], [&](const auto& q) {
                dequantize_range(q, st.states[k], n, b, m, d.states[k]);
              });
            } else if (low_states) {
              d.states[k] = mine + (2 + k) * kStoreBlock;
              widen_block(d.states[k], st.states[k], st.state_dtype, b, m);
            } else {
              d.states[k] = static_cast<float*>(st.states[k]) + b;
            }
          }
          d.ema = t.ema ? t.ema + b : nullptr;  // from the f32 value, before it is rounded
          kernel(op, d, 0, m);
          if (low_param)
            narrow_block(st.param, st.param_dtype, d.param, b, m, st.stochastic, seed, ustep, 0);
          for (int k = 0; k < kMaxStates; ++k) {
            if (!st.states[k] || !low_states) continue;
            const auto offset = 1 + static_cast<std::uint64_t>(k);
            if (quant)
              with_quant_map(st.state_dtype, non_negative[k], [&](const auto& q) {
                quantize_range(q, st.states[k], n, b, m, d.states[k], st.stochastic, seed, ustep,
                               offset);
              });
            else
              narrow_block(st.states[k], st.state_dtype, d.states[k], b, m, st.stochastic, seed,
                           ustep, offset);
          }
        }
      },
      n, kMinParallel, quant ? kQuant8BlockSize : kSplitAlign);
}

}  // namespace

template <class A>
void dense_step(const typename A::Options& options, std::int64_t step, const DensePtrs& t,
                std::int64_t n, double* scalars, const Storage* storage) {
  double next[kMaxScalars] = {};
  if (ScalarList<A>::count > 0 && !scalars)
    throw Error(StatusCode::invalid_argument,
                std::string(A::kName) + ": the step's scalar states are missing");
  if (storage && !storage->needs_layer()) storage = nullptr;
  if (storage && *storage_refusal<A>())
    throw Error(StatusCode::unsupported, std::string(A::kName) + ": " + storage_refusal<A>());
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
  } else if (storage) {
    if (n > 0) stored_range_step<A>(op, t, *storage, step, n);
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
                                  std::int64_t, double*, const Storage*);
FO_FOR_EACH_CPU_KERNEL(FO_INSTANTIATE)
#undef FO_INSTANTIATE
#define FO_INSTANTIATE(A) \
  template void eval_params<fo::A>(const fo::A::Options&, float*, float* const*, std::int64_t);
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE)
#undef FO_INSTANTIATE

namespace {

void store_at(void* p, DType storage, std::int64_t i, float x) {
  switch (storage) {
    case DType::bf16: static_cast<bf16*>(p)[i] = to_bf16(x); break;
    case DType::f16: static_cast<f16*>(p)[i] = to_f16(x); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

}  // namespace

void widen(float* dst, const void* src, DType storage, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = value_at(src, storage, i);
}

void narrow(void* dst, DType storage, const float* src, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) store_at(dst, storage, i, src[i]);
}

void fill(void* p, DType storage, float value, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) store_at(p, storage, i, value);
}

void convert(void* dst, DType dst_storage, const void* src, DType src_storage, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) store_at(dst, dst_storage, i, value_at(src, src_storage, i));
}

void quantize_state(void* dst, DType q, bool non_negative, const float* src, std::int64_t n) {
  zero_quant_padding(dst, q, n);
  with_quant_map(q, non_negative,
                 [&](const auto& map) { quantize_range(map, dst, n, 0, n, src, false, 0, 0, 0); });
}

void dequantize_state(float* dst, const void* src, DType q, bool non_negative, std::int64_t n) {
  with_quant_map(q, non_negative,
                 [&](const auto& map) { dequantize_range(map, src, n, 0, n, dst); });
}

void dequantize_state_range(float* dst, const void* state, DType q, bool non_negative,
                            std::int64_t n, std::int64_t begin, std::int64_t m) {
  with_quant_map(q, non_negative,
                 [&](const auto& map) { dequantize_range(map, state, n, begin, m, dst); });
}

void quantize_state_range(void* state, DType q, bool non_negative, std::int64_t n,
                          std::int64_t begin, std::int64_t m, const float* src) {
  with_quant_map(q, non_negative, [&](const auto& map) {
    quantize_range(map, state, n, begin, m, src, false, 0, 0, 0);
  });
}

void fill_quantized(void* dst, DType q, bool non_negative, float value, std::int64_t n) {
  zero_quant_padding(dst, q, n);
  with_quant_map(q, non_negative, [&](const auto& map) {
    constexpr int kBits = std::decay_t<decltype(map)>::kCodes == 256 ? 8 : 4;
    constexpr std::int64_t w = quant_block_size(kBits);
    float block[w];
    std::fill(block, block + w, value);
    for (std::int64_t b = 0; b < n; b += w)
      quantize_range(map, dst, n, b, std::min(w, n - b), block, false, 0, 0, 0);
  });
}

void traffic_probe(const DensePtrs& t, std::int64_t n) { dense_step<TrafficProbe>({}, 1, t, n); }

}  // namespace fo::cpu
