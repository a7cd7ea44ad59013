// Instruction-set selection and threading of the CPU backend.
#include "cpu/cpu_backend.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
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

// ------------------------------------------------------------------ the storage layer

// The bfloat16 conversions of the instruction set in use.
const Bf16Blocks& active_bf16_blocks() {
#if defined(FO_HAVE_X86_ISAS)
  switch (isa()) {
    case Isa::avx512: return avx512_bf16_blocks();
    case Isa::avx2: return avx2_bf16_blocks();
    case Isa::scalar: break;
  }
#endif
  return scalar_bf16_blocks();
}

// dst[j] = src[begin + j] for j < m, widened.
void widen_block(float* dst, const void* src, DType dtype, std::int64_t begin, std::int64_t m) {
  if (dtype == DType::bf16) {
    active_bf16_blocks().widen(dst, static_cast<const bf16*>(src) + begin, m);
  } else {
    const f16* s = static_cast<const f16*>(src) + begin;
    for (std::int64_t j = 0; j < m; ++j) dst[j] = to_float(s[j]);
  }
}

template <class T>
void narrow_block_as(T* dst, const float* src, std::int64_t begin, std::int64_t m, bool stochastic,
                     std::uint64_t seed, std::uint64_t step, std::uint64_t counter_offset) {
  if (!stochastic) {
    if constexpr (std::is_same_v<T, bf16>)
      active_bf16_blocks().narrow(dst + begin, src, m);
    else
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

// dst[j] = element begin + j of a quantized state of n elements, decoded, for j < m: a block
// (one absmax) at a time.
template <int Bits>
void dequantize_range(const QuantMap<Bits>& q, const void* state, std::int64_t n,
                      std::int64_t begin, std::int64_t m, float* dst) {
  const auto* codes = static_cast<const std::uint8_t*>(state);
  const auto* absmax = reinterpret_cast<const float*>(codes + quant_absmax_offset(n, Bits));
  constexpr std::int64_t w = quant_block_size(Bits);
  for (std::int64_t i = begin; i < begin + m;) {
    const std::int64_t stop = std::min(begin + m, (i / w + 1) * w);
    const float a = absmax[i / w];
    if constexpr (Bits == 8) {
      for (std::int64_t k = i; k < stop; ++k) dst[k - begin] = decode(q, codes[k], a);
    } else {
      for (std::int64_t k = i; k < stop; ++k)
        dst[k - begin] = decode(q, (codes[k >> 1] >> ((k & 1) * 4)) & 0xF, a);
    }
    i = stop;
  }
}

// Elements [begin, begin + m) of a quantized state of n elements from src[0, m): begin a
// multiple of the block size, begin + m a multiple of it or n. Each block's absmax, then its
// codes (step_code: to nearest, or stochastically with counter 4i + counter_offset): 16 at a
// time on AVX-512 where it rounds to nearest and the absmax is finite and non-zero (x / a in
// [-1, 1], the vector encoder's domain), else one at a time; then packed.
template <int Bits>
void quantize_range(const QuantMap<Bits>& q, void* state, std::int64_t n, std::int64_t begin,
                    std::int64_t m, const float* src, bool stochastic, std::uint64_t seed,
                    std::uint64_t step, std::uint64_t counter_offset) {
  auto* const codes = static_cast<std::uint8_t*>(state);
  auto* const absmax = reinterpret_cast<float*>(codes + quant_absmax_offset(n, Bits));
  constexpr std::int64_t w = quant_block_size(Bits);
  const NearestCodeTable<Bits>& nearest = nearest_code_table(q);
#if defined(FO_HAVE_X86_ISAS)
  const bool vector = !stochastic && isa() == Isa::avx512;
#endif
  std::int32_t block[w];  // a block's codes
  for (std::int64_t b = 0; b < m; b += w) {
    const auto len = static_cast<int>(std::min(w, m - b));
    const float* const x = src + b;
    const float a = block_absmax_fast(x, len);
    const std::int64_t first = begin + b;
    absmax[first / w] = a;
#if defined(FO_HAVE_X86_ISAS)
    const bool by_vector = vector && a > 0.0f;
    if (by_vector) encode_block_avx512(nearest.base(), nearest.thresholds(), x, a, len, block);
#else
    constexpr bool by_vector = false;
#endif
    if (!by_vector && !stochastic)
      for (int j = 0; j < len; ++j) block[j] = nearest(normalized(x[j], a));  // nearest_code
    if (stochastic)
      for (int j = 0; j < len; ++j) {
        const auto counter = static_cast<std::uint64_t>(first + j) * 4 + counter_offset;
        block[j] = step_code(q, normalized(x[j], a), true, seed, step, counter);
      }
    if constexpr (Bits == 8) {
      for (int j = 0; j < len; ++j) codes[first + j] = static_cast<std::uint8_t>(block[j]);
    } else {
      for (int j = 0; j < len; j += 2) {
        const int hi = j + 1 < len ? block[j + 1] : 0;
        codes[(first + j) >> 1] = static_cast<std::uint8_t>(block[j] | (hi << 4));
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

// v grown to at least n elements, never shrunk (a thread's scratch): fo::Error out_of_memory
// "<who>: no memory for <what>" where it cannot grow, v as it was.
template <class T>
T* grown(std::vector<T>& v, std::size_t n, const std::string& who, const char* what) {
  try {
    if (v.size() < n) v.resize(n);
  } catch (const std::bad_alloc&) {
    throw Error(StatusCode::out_of_memory, who + ": no memory for " + what);
  }
  return v.data();
}

// The storage layer's scratch: per thread (2 + kMaxStates) * `block` floats (param, grad,
// states), kept by the calling thread and only grown, so that a step allocates nothing after
// the first and a failed allocation comes before any write.
float* storage_scratch(int threads, std::int64_t block) {
  thread_local std::vector<float> scratch;
  const auto need =
      static_cast<std::size_t>(threads) * (2 + kMaxStates) * static_cast<std::size_t>(block);
  return grown(scratch, need, "CPU step", "the storage layer's scratch");
}

// Which of a step's tensors a pass of the storage layer moves.
constexpr unsigned kParamStream = 1, kGradStream = 2, kStateStreams = 4;

// The storage layer of one step of a tensor of n elements (Storage): moves its param (or
// master weights), grad and states between their storages and float32 views (DensePtrs). A
// view's float32 tensors are the tensors themselves (the master weights stand for a 16-bit
// param); the others are a scratch `mine` of `stride` floats per stream (the param at 0, the
// grad at stride, state k at (2 + k) * stride). Values are rounded as CUDA's kernels round
// them (narrow_block, quantize_range: the element's counters 4i for the param, 4i + 1 + k for
// state k), so no result depends on the blocks or the threads.
class StorageLayer {
 public:
  template <class A>
  static StorageLayer of(const Storage& st, std::int64_t n, std::int64_t step) {
    StorageLayer layer(st, n, step);
    for (int k = 0; k < StateList<A>::count; ++k)
      layer.non_negative_[k] = StateList<A>::non_negative(k);
    return layer;
  }

  bool low_param() const { return st_.param_dtype != DType::f32; }
  bool low_grad() const { return st_.grad_dtype != DType::f32; }
  bool low_states() const { return st_.state_dtype != DType::f32; }
  bool quantized() const { return is_quantized(st_.state_dtype); }
  const Storage& storage() const { return st_; }

  // The view of `t` whose element 0 is the tensor's element `first`: the streams in `streams`
  // (the others null), the weight EMA (float32, updated from the value before rounding).
  DensePtrs place(const DensePtrs& t, std::int64_t first, float* mine, std::int64_t stride,
                  unsigned streams) const {
    DensePtrs d = t;
    d.param = nullptr;
    d.grad = nullptr;
    if (streams & kParamStream)
      d.param = st_.master    ? st_.master + first
                : low_param() ? mine
                              : static_cast<float*>(st_.param) + first;
    if (streams & kGradStream)
      d.grad = low_grad() ? mine + stride : static_cast<const float*>(st_.grad) + first;
    for (int k = 0; k < kMaxStates; ++k)
      d.states[k] = !st_.states[k] || !(streams & kStateStreams) ? nullptr
                    : low_states()                               ? mine + (2 + k) * stride
                                   : static_cast<float*>(st_.states[k]) + first;
    d.ema = t.ema ? t.ema + first : nullptr;
    return d;
  }

  // place() of elements [b, b + m), the scratch filled: widened, or decoded.
  DensePtrs in(const DensePtrs& t, std::int64_t b, std::int64_t m, float* mine, std::int64_t stride,
               unsigned streams) const {
    if ((streams & kParamStream) && low_param() && !st_.master)
      widen_block(mine, st_.param, st_.param_dtype, b, m);
    if ((streams & kGradStream) && low_grad())
      widen_block(mine + stride, st_.grad, st_.grad_dtype, b, m);
    for (int k = 0; k < kMaxStates; ++k) {
      if (!st_.states[k] || !(streams & kStateStreams) || !low_states()) continue;
      float* const s = mine + (2 + k) * stride;
      if (quantized())
        with_quant_map(st_.state_dtype, non_negative_[k],
                       [&](const auto& q) { dequantize_range(q, st_.states[k], n_, b, m, s); });
      else
        widen_block(s, st_.states[k], st_.state_dtype, b, m);
    }
    return place(t, b, mine, stride, streams);
  }

  // Elements [b, b + m) of the streams in `streams` from the view `d` of them (element 0 at
  // b) into their storages, rounded. A float32 stream is the view itself: nothing to do.
  void out(const DensePtrs& d, std::int64_t b, std::int64_t m, unsigned streams) const {
    if ((streams & kParamStream) && low_param())
      narrow_block(st_.param, st_.param_dtype, d.param, b, m, st_.stochastic, seed_, step_, 0);
    if (!(streams & kStateStreams) || !low_states()) return;
    for (int k = 0; k < kMaxStates; ++k) {
      if (!st_.states[k]) continue;
      const auto offset = 1 + static_cast<std::uint64_t>(k);
      if (quantized())
        with_quant_map(st_.state_dtype, non_negative_[k], [&](const auto& q) {
          quantize_range(q, st_.states[k], n_, b, m, d.states[k], st_.stochastic, seed_, step_,
                         offset);
        });
      else
        narrow_block(st_.states[k], st_.state_dtype, d.states[k], b, m, st_.stochastic, seed_,
                     step_, offset);
    }
  }

  // Values [b, b + m) of state k (of whatever count) stored from x[0, m), and x replaced by
  // what the storage holds, as CUDA's stored_value (bfloat16 states; float32 ones are x).
  void store_state(int k, float* x, std::int64_t b, std::int64_t m) const {
    if (!low_states()) return;
    narrow_block(st_.states[k], st_.state_dtype, x, b, m, st_.stochastic, seed_, step_,
                 1 + static_cast<std::uint64_t>(k));
    widen_block(x, st_.states[k], st_.state_dtype, b, m);
  }

 private:
  StorageLayer(const Storage& st, std::int64_t n, std::int64_t step)
      : st_(st),
        n_(n),
        seed_(st.seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(st.key + 1))),
        step_(static_cast<std::uint64_t>(step)) {}

  const Storage& st_;
  std::int64_t n_;
  std::uint64_t seed_, step_;
  bool non_negative_[kMaxStates] = {};
};

// block(d, b, m) over [0, n) in blocks of kStoreBlock elements on the configured threads, each
// through the layer: the streams `in` read into a view d (element 0 at b), those in `out`
// written back after. Its scratch is the calling thread's (storage_scratch), allocated first.
// The storage layer's scratch of a pass over n elements in blocks (stored_blocks).
float* block_scratch(std::int64_t n) { return storage_scratch(team_size(n), kStoreBlock); }

template <class Block>
void stored_blocks(const StorageLayer& layer, const DensePtrs& t, std::int64_t n, unsigned in,
                   unsigned out, const Block& block) {
  float* const scratch = block_scratch(n);
  parallel_for_indexed(
      [&](std::int64_t begin, std::int64_t end, int thread) {
        float* const mine =
            scratch + static_cast<std::ptrdiff_t>(thread) * (2 + kMaxStates) * kStoreBlock;
        for (std::int64_t b = begin; b < end; b += kStoreBlock) {
          const std::int64_t m = std::min(kStoreBlock, end - b);
          const DensePtrs d = layer.in(t, b, m, mine, kStoreBlock, in);
          block(d, b, m);
          layer.out(d, b, m, out);
        }
      },
      n, kMinParallel, layer.quantized() ? kQuant8BlockSize : kSplitAlign);
}

// The per-thread scratch of a step's chunk sums (two doubles per chunk), only grown.
double* chunk_scratch(std::int64_t chunks, const char* who) {
  thread_local std::vector<double> scratch;
  return grown(scratch, static_cast<std::size_t>(2 * chunks), who, "the norm scratch");
}

// Pass one's threads of a trust-ratio step over `chunks` chunks.
int chunk_team(std::int64_t chunks) { return team_size(chunks, kMinParallel / kSumChunk); }

// A trust-ratio step's scratch: its chunk sums and, through the storage layer, pass one's
// chunks (kSumChunk floats per stream per thread) and pass two's blocks: all of it before
// anything is written.
struct TrustScratch {
  double* partial;
  float* chunk_store;
};
TrustScratch trust_scratch(const char* who, std::int64_t n, bool layer) {
  const std::int64_t chunks = sum_chunks(n);
  TrustScratch s{chunk_scratch(chunks, who), nullptr};
  if (layer) {
    block_scratch(n);  // the same vector: its pointer is taken again by pass two
    s.chunk_store = storage_scratch(chunk_team(chunks), kSumChunk);
  }
  return s;
}

// The two passes of a trust-ratio step; the chunk sums live in a per-thread scratch that
// only grows. Through the storage layer (`layer`, else t's f32 pointers are the tensors):
// pass one widens a chunk at a time (the sums' unit); where it advances states that are
// stored rounded, it advances them, stores them and reads them back before direction(), as
// CUDA's pass one (trust_ratio.cuh: stored_value), so that the norms are of the update pass
// two applies. Pass two goes in blocks, as the elementwise step.
template <class A>
void trust_step(const typename A::Op& op, const DensePtrs& t, std::int64_t n,
                const StorageLayer* layer) {
  const Kernels<A>& k = active_kernels<A>();
  const bool first_pass = A::Op::kAdvanceStates || op.needs_norms();
  const std::int64_t chunks = sum_chunks(n);
  const TrustScratch scratch = trust_scratch(A::kName, n, layer != nullptr);
  double* const partial = scratch.partial;
  float rate = op.rate(0.0, 0.0);
  if (first_pass) {
    if (layer) {
      const bool split = A::Op::kAdvanceStates && layer->low_states();
      parallel_for_indexed(
          [&](std::int64_t cb, std::int64_t ce, int thread) {
            float* const mine = scratch.chunk_store +
                                static_cast<std::ptrdiff_t>(thread) * (2 + kMaxStates) * kSumChunk;
            for (std::int64_t c = cb; c < ce; ++c) {
              const std::int64_t b = c * kSumChunk, m = std::min(kSumChunk, n - b);
              // The states only where pass one advances them: CUDA's direction() sees zeros
              // otherwise, and the CPU's (null states) too.
              constexpr unsigned in =
                  kParamStream | kGradStream | (A::Op::kAdvanceStates ? kStateStreams : 0);
              const DensePtrs d = layer->in(t, b, m, mine, kSumChunk, in);
              if (split) {
                k.advance(op, d, 0, m);
                layer->out(d, b, m, kStateStreams);
                layer->in(t, b, m, mine, kSumChunk, kStateStreams);  // as stored
              }
              k.first(op, d, m, 0, 1, partial + 2 * c, !split);  // the chunk: its own order
            }
          },
          chunks, kMinParallel / kSumChunk, 1);  // chunk_team(chunks) threads
    } else {
      parallel_for(
          [&](std::int64_t cb, std::int64_t ce) { k.first(op, t, n, cb, ce, partial, true); },
          chunks, kMinParallel / kSumChunk, 1);
    }
    const double pn = std::sqrt(sum_of_chunks(partial, chunks, 2));
    const double un = std::sqrt(sum_of_chunks(partial + 1, chunks, 2));
    rate = op.rate(pn, un);
  }
  if (layer) {
    constexpr unsigned in =
        kParamStream | kStateStreams | (A::Op::kApplyReadsGrad ? kGradStream : 0);
    constexpr unsigned out = kParamStream | (A::Op::kApplyWritesStates ? kStateStreams : 0);
    stored_blocks(*layer, t, n, in, out, [&](const DensePtrs& d, std::int64_t, std::int64_t m) {
      k.second(op, d, rate, 0, m);
    });
  } else {
    parallel_for([&](std::int64_t begin, std::int64_t end) { k.second(op, t, rate, begin, end); },
                 n);
  }
}

// A factored step's scratch on the calling thread, only grown (fo::Error out_of_memory
// before anything is written): the chunk sums, row sums and per-segment column sums
// (double), each matrix's normalizer, and with 16-bit storage (`storage`, or null) the
// storage layer's whole-tensor float32 copies of the param and grad (2n) and of the states.
struct FactoredScratch {
  double* sums;
  float* norms;
  float* wide;
};
FactoredScratch factored_scratch(const char* who, const MatrixView& v, std::int64_t n,
                                 const Storage* storage) {
  thread_local std::vector<double> sums;
  thread_local std::vector<float> norms, wide;
  const std::int64_t chunks = sum_chunks(n);
  const std::int64_t per_matrix = v.factored() ? (v.rows + kColSegment - 1) / kColSegment : 0;
  const auto need = static_cast<std::size_t>(
      2 * chunks + (v.factored() ? v.batch * v.rows + v.batch * per_matrix * v.cols : 0));
  std::size_t wide_need = 0;
  if (storage) {
    if (storage->param_dtype != DType::f32 || storage->grad_dtype != DType::f32)
      wide_need += static_cast<std::size_t>(2 * n);
    if (storage->state_dtype != DType::f32)
      wide_need += static_cast<std::size_t>(v.factored() ? v.batch * (v.rows + v.cols) : n);
  }
  return {grown(sums, need, who, "the step's scratch"),
          grown(norms, static_cast<std::size_t>(v.batch), who, "the step's scratch"),
          grown(wide, wide_need, who, "the step's scratch")};
}

// A matrix step's scratch on the calling thread (the iteration's input, n floats, then its
// workspace), only grown (fo::Error out_of_memory before anything is written).
float* matrix_scratch(const char* who, const MatrixView& v, std::int64_t n) {
  thread_local std::vector<float> scratch;
  const std::int64_t floats = n + detail::newton_schulz_cpu_workspace_floats(v.rows, v.cols);
  return grown(scratch, static_cast<std::size_t>(floats), who, "the step's scratch");
}

// The three passes of a factored step (kernels/factored.hpp). Scratch per thread that only
// grows: the row sums, the per-segment column sums (8 bytes per kColSegment elements), each
// matrix's normalizer and the chunk sums. Through the storage layer (`layer`, else t's f32
// pointers are the tensors), the whole tensor is widened into a scratch that only grows (its
// 16-bit param and grad, and bfloat16 states: up to 3 floats per element, a fallback's cost,
// which CUDA does not pay) and each statistic is stored where it is blended and read back,
// as CUDA's kernels do (factored.cuh), before anything uses it; the param is narrowed last.
template <class A>
void factored_step(const typename A::Op& op, const DensePtrs& t_in, std::int64_t n,
                   const StorageLayer* layer) {
  if (n == 0) return;  // no element, no statistic: nothing moves
  const Kernels<A>& k = active_kernels<A>();
  const MatrixView& v = t_in.view;
  const std::int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  const std::int64_t per_matrix = v.factored() ? (v.rows + kColSegment - 1) / kColSegment : 0;
  const std::int64_t segments = v.batch * per_matrix;
  const std::int64_t state_count[kMaxStates] = {v.batch * v.rows, v.batch * v.cols,
                                                v.factored() ? 0 : n};
  const FactoredScratch scratch =
      factored_scratch(A::kName, v, n, layer ? &layer->storage() : nullptr);
  DensePtrs t = t_in;
  float* const base = scratch.wide;
  if (layer) {
    constexpr unsigned kIn = kParamStream | kGradStream;
    parallel_for(
        [&](std::int64_t b, std::int64_t e) {
          for (; b < e; b += kStoreBlock)
            layer->in(t_in, b, std::min(kStoreBlock, e - b), base + b, n, kIn);
        },
        n);
    t = layer->place(t_in, 0, base, n, kIn);
    float* next = base + ((layer->low_param() || layer->low_grad()) ? 2 * n : 0);
    for (int s = 0; s < kMaxStates; ++s) {
      void* const stored = layer->storage().states[s];
      t.states[s] = static_cast<float*>(stored);
      if (!stored || !layer->low_states()) continue;
      t.states[s] = next;
      widen_block(next, stored, layer->storage().state_dtype, 0, state_count[s]);
      next += state_count[s];
    }
  }
  // The value statistic j of state s holds once blended to x.
  const auto keep = [&](int s, std::int64_t j, float x) {
    if (layer) layer->store_state(s, &x, j, 1);
    return x;
  };
  double* const partial = scratch.sums;
  float* const norm = scratch.norms;
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
            col_var[j] = keep(1, j, op.blend(col_var[j], static_cast<float>(sum / rows)));
          }
        },
        v.batch * v.cols,
        std::max<std::int64_t>(1, kMinParallel / std::max<std::int64_t>(1, per_matrix)), 1);
    for (std::int64_t b = 0; b < v.batch; ++b) {
      double lanes[kRowLanes] = {};
      for (std::int64_t r = 0; r < v.rows; ++r) {
        const std::int64_t i = b * v.rows + r;
        row_var[i] = keep(0, i, op.blend(row_var[i], static_cast<float>(row_sq[i] / cols)));
        lanes[r % kRowLanes] += static_cast<double>(row_var[i]);
      }
      norm[b] = op.normalizer(row_lane_sum(lanes) / rows);
    }
  }
  // Unfactored statistics stored rounded: blended (and read back) before the sums pass uses
  // them; else that pass blends them.
  const bool blend_apart = !v.factored() && layer && layer->low_states();
  if (blend_apart) {
    float* const var = t.states[2];
    parallel_for(
        [&](std::int64_t b, std::int64_t e) {
          for (; b < e; b += kStoreBlock) {
            const std::int64_t m = std::min(kStoreBlock, e - b);
            for (std::int64_t i = b; i < b + m; ++i) {
              const float x = t.grad[i] * t.grad_multiplier;
              var[i] = op.blend(var[i], x * x);
            }
            layer->store_state(2, var + b, b, m);
          }
        },
        n);
  }
  parallel_for(
      [&](std::int64_t cb, std::int64_t ce) {
        k.factored_sums(op, t, norm, n, cb, ce, partial, !blend_apart);
      },
      chunks, kMinParallel / kSumChunk, 1);
  const float rate =
      op.rate(sum_of_chunks(partial, chunks, 2), sum_of_chunks(partial + 1, chunks, 2), n);
  parallel_for([&](std::int64_t b, std::int64_t e) { k.factored_apply(op, t, norm, rate, b, e); },
               n);
  if (layer && layer->low_param())
    parallel_for(
        [&](std::int64_t b, std::int64_t e) {
          const DensePtrs d = layer->place(t_in, b, base + b, n, kParamStream);
          layer->out(d, b, e - b, kParamStream);
        },
        n);
}

// The three parts of a matrix step (kernels/matrix_step.hpp): the prepare pass on the
// configured threads into a scratch per thread that only grows (the iteration's input and its
// workspace, never allocated again for a tensor no larger), the iteration on OpenBLAS's own
// threads from this one, the apply pass on the configured threads. Everything that can refuse
// comes before the first write.
// Through the storage layer (`layer`, else t's f32 pointers are the tensors) both passes go in
// blocks, as the elementwise step: the states rounded after prepare, the param after apply.
template <class A>
void matrix_step(const typename A::Options& options, const typename A::Op& op, const DensePtrs& t,
                 std::int64_t n, const StorageLayer* layer) {
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
  float* const x = matrix_scratch(A::kName, v, n);
  const Kernels<A>& k = active_kernels<A>();
  const float rate = op.rate(v.rows, v.cols);
  if (layer) {
    stored_blocks(*layer, t, n, kGradStream | kStateStreams, kStateStreams,
                  [&](const DensePtrs& d, std::int64_t b, std::int64_t m) {
                    k.matrix_prepare(op, d, x + b, 0, m);
                  });
  } else {
    parallel_for([&](std::int64_t b, std::int64_t e) { k.matrix_prepare(op, t, x, b, e); }, n);
  }
  detail::newton_schulz_cpu(x, x, v.batch, v.rows, v.cols, ns.coefficients, ns.steps, ns.eps, x + n,
                            ws);
  if (layer) {
    stored_blocks(*layer, t, n, kParamStream, kParamStream,
                  [&](const DensePtrs& d, std::int64_t b, std::int64_t m) {
                    k.matrix_apply(op, d, x + b, rate, 0, m);
                  });
  } else {
    parallel_for([&](std::int64_t b, std::int64_t e) { k.matrix_apply(op, t, x, rate, b, e); }, n);
  }
}

// An elementwise step through the storage layer (Storage): each thread's range in blocks of
// kStoreBlock elements. An element's result depends on neither its block nor its thread: the
// kernel's does not (elementwise.hpp), nor do the conversions.
template <class A>
void stored_range_step(const typename A::Op& op, const DensePtrs& t, const StorageLayer& layer,
                       std::int64_t n) {
  const auto kernel = active_kernels<A>().range;
  constexpr unsigned kAll = kParamStream | kGradStream | kStateStreams;
  stored_blocks(layer, t, n, kAll, kParamStream | kStateStreams,
                [&](const DensePtrs& d, std::int64_t, std::int64_t m) { kernel(op, d, 0, m); });
}

}  // namespace

template <class A>
void reserve_step(const MatrixView& v, std::int64_t n, const Storage* storage) {
  if (storage && !storage->needs_layer()) storage = nullptr;
  if (n <= 0) return;  // an empty tensor's step asks for nothing
  if constexpr (MatrixCapable<A>::value) {
    if (!is_matrix_batch(v, n)) return;  // refused by the step, before anything is written
    matrix_scratch(A::kName, v, n);
    if (storage) block_scratch(n);
  } else if constexpr (FactoredCapable<A>::value) {
    factored_scratch(A::kName, v, n, storage);
  } else if constexpr (TrustRatioCapable<A>::value) {
    trust_scratch(A::kName, n, storage != nullptr);
  } else if (storage) {
    block_scratch(n);
  }
}

template <class A>
void dense_step(const typename A::Options& options, std::int64_t step, const DensePtrs& t,
                std::int64_t n, double* scalars, const Storage* storage) {
  double next[kMaxScalars] = {};
  if (ScalarList<A>::count > 0 && !scalars)
    throw Error(StatusCode::invalid_argument,
                std::string(A::kName) + ": the step's scalar states are missing");
  if (storage && !storage->needs_layer()) storage = nullptr;
  if (storage && *quantized_storage_refusal<A>() && is_quantized(storage->state_dtype))
    throw Error(StatusCode::unsupported,
                std::string(A::kName) + ": " + quantized_storage_refusal<A>());
  const typename A::Op op = make_step_op<A>(options, step, scalars, next);
  std::optional<StorageLayer> layer;
  if (storage) layer.emplace(StorageLayer::of<A>(*storage, n, step));
  const StorageLayer* const through = layer ? &*layer : nullptr;
  if constexpr (MatrixCapable<A>::value) {
    static_assert(ScalarList<A>::count == 0, "matrix steps keep no scalar states");
    matrix_step<A>(options, op, t, n, through);
  } else if constexpr (FactoredCapable<A>::value) {
    static_assert(ScalarList<A>::count == 0, "factored steps keep no scalar states");
    factored_step<A>(op, t, n, through);
  } else if constexpr (TrustRatioCapable<A>::value) {
    static_assert(ScalarList<A>::count == 0, "trust-ratio steps keep no scalar states");
    trust_step<A>(op, t, n, through);
  } else if (through) {
    if (n > 0) stored_range_step<A>(op, t, *through, n);
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
                                  std::int64_t, double*, const Storage*);                \
  template void reserve_step<fo::A>(const MatrixView&, std::int64_t, const Storage*);
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

void widen_bf16(float* dst, const bf16* src, std::int64_t m) {
  active_bf16_blocks().widen(dst, src, m);
}

void narrow_bf16(bf16* dst, const float* src, std::int64_t m) {
  active_bf16_blocks().narrow(dst, src, m);
}

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
