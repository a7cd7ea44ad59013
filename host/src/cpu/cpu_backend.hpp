// The CPU backend: per-ISA kernel tables and the threaded driver over them.
#pragma once

#include <cstdint>

#include "algorithm_index.hpp"
#include "fusedopt/cpu.hpp"
#include "fusedopt/kernels/cpu/elementwise.hpp"
#include "fusedopt/kernels/probe.hpp"

namespace fo::cpu {

/// A kernel over [begin, end) of one tensor; `op` points to the algorithm's functor.
using RangeKernel = void (*)(const void* op, const DensePtrs& t, std::int64_t begin,
                             std::int64_t end);

/// One row of a row-wise step (rowwise_row): `row_op` points to the algorithm's RowOp,
/// `row_states[k]` to the row's value of state k (or null).
using RowKernel = void (*)(const void* row_op, float* param, const float* grad,
                           float* const* row_states, std::int64_t dim);

/// One ISA's kernels: a step per algorithm, a row step per row-wise algorithm (null for the
/// others), and the traffic probe (see traffic_probe).
struct KernelTable {
  RangeKernel step[detail::kNumDenseAlgorithms];
  RowKernel row_step[detail::kNumDenseAlgorithms];
  RangeKernel probe;
};

const KernelTable& scalar_table();
#if defined(FO_HAVE_X86_ISAS)
const KernelTable& avx2_table();
const KernelTable& avx512_table();
#endif

/// Runs `kernel` over [0, n) with the configured threads; ranges are split at multiples of
/// 64 elements (whole cache lines) so threads never share a line of an aligned tensor.
void parallel_for(RangeKernel kernel, const void* op, const DensePtrs& t, std::int64_t n);

/// The kernel table of the ISA in use.
const KernelTable& active_table();

/// Reads and writes exactly the streams of a step (param, grad, non-null states) with trivial
/// arithmetic, through the same loop and threads: the CPU's bandwidth limit for that step.
void traffic_probe(const DensePtrs& t, std::int64_t n);

}  // namespace fo::cpu
