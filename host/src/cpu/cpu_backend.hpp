// The CPU backend: each algorithm's kernels per instruction set, and the threaded drivers over
// them. Typed by the algorithm throughout: the one type erasure is the optimizer layer's
// (algorithm.hpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedopt/cpu.hpp"
#include "fusedopt/kernels/algorithm.hpp"
#include "fusedopt/kernels/cpu/elementwise.hpp"
#include "fusedopt/kernels/cpu/factored.hpp"
#include "fusedopt/kernels/cpu/matrix_step.hpp"
#include "fusedopt/kernels/cpu/trust_ratio.hpp"
#include "fusedopt/kernels/probe.hpp"
#include "fusedopt/kernels/registry.hpp"

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
/// chunks of a tensor of n elements and its pass two over [begin, end); for a factored
/// algorithm (kernels/factored.hpp) its sums pass over whole chunks and its apply pass; for
/// one of the matrix kind (kernels/matrix_step.hpp) its two elementwise passes.
template <class A>
struct Kernels {
  void (*range)(const typename A::Op& op, const DensePtrs& t, std::int64_t begin, std::int64_t end);
  void (*row)(const typename RowOpOf<A>::type& op, float* param, const float* grad,
              float* const* row_states, std::int64_t dim);
  void (*first)(const typename A::Op& op, const DensePtrs& t, std::int64_t n,
                std::int64_t chunk_begin, std::int64_t chunk_end, double* partial);
  void (*second)(const typename A::Op& op, const DensePtrs& t, float rate, std::int64_t begin,
                 std::int64_t end);
  void (*factored_stats)(const DensePtrs& t, std::int64_t segment_begin, std::int64_t segment_end,
                         double* row_sq, double* col_partial);
  void (*factored_sums)(const typename A::Op& op, const DensePtrs& t, const float* norms,
                        std::int64_t n, std::int64_t chunk_begin, std::int64_t chunk_end,
                        double* partial);
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
/// none.
template <class A>
void dense_step(const typename A::Options& options, std::int64_t step, const DensePtrs& t,
                std::int64_t n, double* scalars = nullptr);

/// eval() of one tensor (A is EvalCapable): param[i] <- A::EvalOp(param[i], states at i), on
/// the configured threads, in the scalar float arithmetic of CUDA's eval_kernel.
template <class A>
void eval_params(const typename A::Options& options, float* param, float* const* states,
                 std::int64_t n);

/// Reads and writes exactly the streams of a step (param, grad, non-null states) with trivial
/// arithmetic, through the same loop and threads: the CPU's bandwidth limit for that step.
void traffic_probe(const DensePtrs& t, std::int64_t n);

}  // namespace fo::cpu
