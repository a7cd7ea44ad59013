// The CPU backend: each algorithm's kernels per instruction set, and the threaded drivers over
// them. Typed by the algorithm throughout: the one type erasure is the optimizer layer's
// (algorithm.hpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/cpu.hpp"
#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/kernels/cpu/elementwise.hpp"
#include "fusedopt/kernels/cpu/factored.hpp"
#include "fusedopt/kernels/cpu/matrix_step.hpp"
#include "fusedopt/kernels/cpu/trust_ratio.hpp"
#include "fusedopt/kernels/probe.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/types.hpp"

// X(Algorithm): every type the CPU kernels are compiled for: the registry and the probe.
#define FO_FOR_EACH_CPU_KERNEL(X) FO_FOR_EACH_DENSE_ALGORITHM(X) X(TrafficProbe)

namespace fo::cpu {

/// The row functor of algorithm A's row-wise form, or NoRowOp where it has none.
struct NoRowOp {};
template <class A, class = void>
struct RowOpOf {
  using type = NoRowOp;
};
template <class A>
struct RowOpOf<A, std::void_t<typename A::RowOp>> {
  using type = typename A::RowOp;
};

/// One instruction set's kernels of algorithm A: its step over [begin, end) of one tensor, and
/// its step of one table row with per-row states (null where A has no row-wise form); for a
/// trust-ratio algorithm (kernels/trust_ratio.hpp) instead of `range`, its pass one over whole
/// chunks of a tensor of n elements (and advance(), that pass's first half alone, for states
/// stored rounded) and its pass two over [begin, end); for a factored
/// algorithm (kernels/factored.hpp) its sums pass over whole chunks and its apply pass; for
/// one of the matrix kind (kernels/matrix_step.hpp) its two elementwise passes.
template <class A>
struct Kernels {
  void (*range)(const typename A::Op& op, const DensePtrs& t, std::int64_t begin, std::int64_t end);
  void (*row)(const typename RowOpOf<A>::type& op, float* param, const float* grad,
              float* const* row_states, std::int64_t dim);
  void (*first)(const typename A::Op& op, const DensePtrs& t, std::int64_t n,
                std::int64_t chunk_begin, std::int64_t chunk_end, double* partial, bool advance);
  void (*advance)(const typename A::Op& op, const DensePtrs& t, std::int64_t begin,
                  std::int64_t end);
  void (*second)(const typename A::Op& op, const DensePtrs& t, float rate, std::int64_t begin,
                 std::int64_t end);
  void (*factored_stats)(const DensePtrs& t, std::int64_t segment_begin, std::int64_t segment_end,
                         double* row_sq, double* col_partial);
  void (*factored_sums)(const typename A::Op& op, const DensePtrs& t, const float* norms,
                        std::int64_t n, std::int64_t chunk_begin, std::int64_t chunk_end,
                        double* partial, bool blend);
  void (*factored_apply)(const typename A::Op& op, const DensePtrs& t, const float* norms,
                         float rate, std::int64_t begin, std::int64_t end);
  void (*matrix_prepare)(const typename A::Op& op, const DensePtrs& t, float* x, std::int64_t begin,
                         std::int64_t end);
  void (*matrix_apply)(const typename A::Op& op, const DensePtrs& t, const float* o, float rate,
                       std::int64_t begin, std::int64_t end);
};

// Defined by isa_*.cpp for every FO_FOR_EACH_CPU_KERNEL type.
template <class A>
const Kernels<A>& scalar_kernels();
#if defined(FO_HAVE_X86_ISAS)
template <class A>
const Kernels<A>& avx2_kernels();
template <class A>
const Kernels<A>& avx512_kernels();
#endif

/// A's kernels for the instruction set in use.
template <class A>
const Kernels<A>& active_kernels() {
#if defined(FO_HAVE_X86_ISAS)
  switch (isa()) {
    case Isa::avx512: return avx512_kernels<A>();
    case Isa::avx2: return avx2_kernels<A>();
    case Isa::scalar: break;
  }
#endif
  return scalar_kernels<A>();
}

/// One instruction set's bfloat16 block conversions, the storage layer's inner loops: the
/// exact bit operations of to_float and to_bf16 (round to nearest even), which the
/// instruction set's flags let the compiler vectorize, so every instruction set gives the
/// same bits. Defined by isa_*.cpp (bf16_blocks.inc).
struct Bf16Blocks {
  void (*widen)(float* dst, const bf16* src, std::int64_t m);
  void (*narrow)(bf16* dst, const float* src, std::int64_t m);
};
const Bf16Blocks& scalar_bf16_blocks();
#if defined(FO_HAVE_X86_ISAS)
const Bf16Blocks& avx2_bf16_blocks();
const Bf16Blocks& avx512_bf16_blocks();
#endif

/// dst[j] = to_float(src[j]) / to_bf16(src[j]) for j < m, through the loop of the
/// instruction set in use (Bf16Blocks).
void widen_bf16(float* dst, const bf16* src, std::int64_t m);
void narrow_bf16(bf16* dst, const float* src, std::int64_t m);

/// Where a dense step's tensors are stored when not all of them are float32 (the CUDA
/// backend's storages: multi_tensor.cuh). The step then goes through the storage layer: in
/// blocks of kStoreBlock elements, the 16-bit param (or its f32 master weights), grad and
/// states are widened into f32 scratch, the unchanged f32 kernel steps the scratch, and the
/// values are written back rounded as CUDA rounds them (to nearest even, or stochastically
/// with CUDA's draws: counter 4i for the param's element i, 4i + 1 + k for state k). The
/// weight EMA (DensePtrs::ema) is updated by the kernel from the f32 value before rounding.
/// DensePtrs' param, grad and states are then ignored: these pointers stand for them.
struct Storage {
  void* param = nullptr;
  DType param_dtype = DType::f32;
  const void* grad = nullptr;
  DType grad_dtype = DType::f32;  // f32, or param_dtype
  float* master = nullptr;        // f32 master weights of a 16-bit param, or null
  void* states[kMaxStates] = {};
  DType state_dtype = DType::f32;  // f32, bf16, or block-quantized q8 or q4 (each state one
                                   // buffer of quant_state_bytes; the tensor's numel is n)
  bool stochastic = false;
  std::uint64_t seed = 0;  // the run's seed; mixed with `key` as CUDA does
  int key = 0;             // the param's stable id (its RNG stream)

  /// Whether a step through this storage needs the storage layer (else DensePtrs' f32
  /// pointers are the tensors themselves).
  bool needs_layer() const {
    return param_dtype != DType::f32 || grad_dtype != DType::f32 || master ||
           state_dtype != DType::f32;
  }
};

/// Elements per block of the storage layer: whole cache lines, its f32 scratch in L1/L2.
inline constexpr std::int64_t kStoreBlock = 1024;

/// Why algorithm A's step refuses block-quantized states, or "" where it takes them (the
/// one-pass elementwise kinds: a trust-ratio, factored or matrix step stores and re-reads its
/// states between passes, which the per-block contract of kernels/quantize.hpp does not
/// describe). Every other storage is taken by every kind.
template <class A>
const char* quantized_storage_refusal() {
  if constexpr (!kOnePassStep<A>)
    return "block-quantized (int8, int4) states need a step that is one elementwise pass; this "
           "algorithm's is not (give it float32 or bfloat16 states)";
  else
    return "";
}

/// One step of algorithm A at step count `step` over elements [0, n) of `t`, on the configured
/// threads. Ranges are split at multiples of 64 elements (whole cache lines) so threads never
/// share a line of an aligned tensor; any split gives the same bits. Options already valid.
/// A matrix algorithm (kernels/matrix_step.hpp) takes its two passes around the Newton-Schulz
/// iteration (OpenBLAS's threads), with a scratch per thread that only grows (numel floats
/// and the iteration's workspace; fo::Error out_of_memory before anything is written); it
/// refuses options its cpu_refusal names (fo::Error unsupported) and shapes over BLAS's int.
/// A trust-ratio algorithm takes its two passes, with the tensor's norms between them summed
/// in the order of kernels/trust_ratio.hpp, and may allocate a scratch of 16 bytes per 8192
/// elements the first time a tensor that large steps on a thread (fo::Error out_of_memory,
/// before anything is written).
/// `scalars`: A's scalar states (ScalarList), advanced after the pass; null where it keeps
/// none. `storage`: where the tensors are, when not all float32 (Storage); null: DensePtrs'
/// f32 pointers. The storage layer's scratch (kStoreBlock floats per stream per thread; a
/// trust-ratio step's pass one kSumChunk; a factored step's the whole tensor) only grows
/// (fo::Error out_of_memory before anything is written); quantized states are refused where
/// quantized_storage_refusal says (fo::Error unsupported).
template <class A>
void dense_step(const typename A::Options& options, std::int64_t step, const DensePtrs& t,
                std::int64_t n, double* scalars = nullptr, const Storage* storage = nullptr);

/// Grows the calling thread's scratch to what dense_step<A> of a tensor of n elements viewed
/// as `view`, with `storage` (its dtypes; no pointer is read), will ask for: a step of several
/// tensors reserves for all of them before the first is written, so that a failed allocation
/// (fo::Error out_of_memory) changes nothing.
template <class A>
void reserve_step(const MatrixView& view, std::int64_t n, const Storage* storage);

/// eval() of one tensor (A is EvalCapable): param[i] <- A::EvalOp(param[i], states at i), on
/// the configured threads, in the scalar float arithmetic of CUDA's eval_kernel.
template <class A>
void eval_params(const typename A::Options& options, float* param, float* const* states,
                 std::int64_t n);

/// Host conversions between storages (f32, bf16, f16) as the CUDA backend's (cuda::widen,
/// narrow, fill, convert): exact widening, rounding to nearest even.
inline float value_at(const void* p, DType storage, std::int64_t i) {
  switch (storage) {
    case DType::bf16: return to_float(static_cast<const bf16*>(p)[i]);
    case DType::f16: return to_float(static_cast<const f16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
void widen(float* dst, const void* src, DType storage, std::int64_t n);
/// Whether a state storage is block-quantized (DType q8, q4: kernels/quantize.hpp).
inline bool is_quantized(DType d) { return d == DType::q8 || d == DType::q4; }
/// A quantized state's buffer (q8 or q4, n elements; the unsigned map where non_negative) from
/// n float32 values, rounded to nearest; its padding bytes zeroed.
void quantize_state(void* dst, DType q, bool non_negative, const float* src, std::int64_t n);
/// The n values of a quantized state's buffer, decoded.
void dequantize_state(float* dst, const void* src, DType q, bool non_negative, std::int64_t n);
/// quantize_state of n copies of `value`.
void fill_quantized(void* dst, DType q, bool non_negative, float value, std::int64_t n);
/// Elements [begin, begin + m) of a quantized state of n elements, decoded into dst[0, m).
void dequantize_state_range(float* dst, const void* state, DType q, bool non_negative,
                            std::int64_t n, std::int64_t begin, std::int64_t m);
/// Elements [begin, begin + m) of a quantized state of n elements from src[0, m), to nearest:
/// begin a multiple of the block size, begin + m a multiple of it or n. The blocks outside
/// are not touched.
void quantize_state_range(void* state, DType q, bool non_negative, std::int64_t n,
                          std::int64_t begin, std::int64_t m, const float* src);
void narrow(void* dst, DType storage, const float* src, std::int64_t n);
void fill(void* p, DType storage, float value, std::int64_t n);
void convert(void* dst, DType dst_storage, const void* src, DType src_storage, std::int64_t n);

/// Reads and writes exactly the streams of a step (param, grad, non-null states) with trivial
/// arithmetic, through the same loop and threads: the CPU's bandwidth limit for that step.
void traffic_probe(const DensePtrs& t, std::int64_t n);

}  // namespace fo::cpu
