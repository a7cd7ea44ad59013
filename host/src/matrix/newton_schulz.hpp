// The Newton-Schulz iteration of Muon (kernels/newton_schulz.hpp, docs/newton-schulz.md) for
// a batch of matrices: on the CPU here, with OpenBLAS; on the GPU with cuBLAS
// (cuda/newton_schulz_device.hpp). Internal: the optimizer that uses it calls these once per
// step, with a workspace it allocated once.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/newton_schulz.hpp"

namespace fo::detail {

/// Floats of workspace newton_schulz_cpu needs for rows x cols matrices (any batch: the
/// matrices are done one after another): m*n + 2*m*m, m = min(rows, cols).
std::int64_t newton_schulz_cpu_workspace_floats(std::int64_t rows, std::int64_t cols);

/// Orthogonalizes `batch` row-major rows x cols matrices, each contiguous after the other:
/// out = NS(in), in float32, the GEMMs by OpenBLAS's cblas_sgemm (or ssyrk for the Gram
/// matrix), the norm's sum of squares in double. `in` and `out` may be the same buffer;
/// otherwise they must not overlap, nor overlap the workspace. Allocates nothing.
///
/// Threads: OpenBLAS's own (its pthreads build on Debian: OPENBLAS_NUM_THREADS, else
/// OMP_NUM_THREADS, else every core; openblas_set_num_threads changes it for the process).
/// Call it from one thread at a time, never from inside an OpenMP parallel region.
///
/// Throws fo::Error (invalid_argument) for batch, rows or cols < 0, a side over INT_MAX
/// (BLAS's int), steps outside [0, kNsMaxSteps], eps not finite or < 0, null pointers where
/// there are elements, or workspace_floats below newton_schulz_cpu_workspace_floats().
///
///   std::vector<float> ws(newton_schulz_cpu_workspace_floats(r, c));
///   newton_schulz_cpu(g, o, 1, r, c, kNsDefaultCoefficients, kNsDefaultSteps, kNsDefaultEps,
///                     ws.data(), ws.size());
void newton_schulz_cpu(const float* in, float* out, std::int64_t batch, std::int64_t rows,
                       std::int64_t cols, const NsCoefficients& coefficients, int steps, double eps,
                       float* workspace, std::int64_t workspace_floats);

/// The checks both backends make (fo::Error invalid_argument): batch, rows, cols >= 0 and
/// at most INT_MAX (BLAS's and cuBLAS's int), steps in [0, kNsMaxSteps], eps finite and
/// >= 0, finite coefficients. `name` begins the messages.
void validate_newton_schulz(const char* name, std::int64_t batch, std::int64_t rows,
                            std::int64_t cols, const NsCoefficients& coefficients, int steps,
                            double eps);

/// How the CPU computes the Gram matrix A = X X^T: cblas_sgemm, or cblas_ssyrk (half the
/// flops) and a copy of its triangle to the other. The default is the faster on the
/// benchmark's shapes (bench/results/2026-12-02-cpu-newton-schulz.md).
enum class NsGram : int { gemm = 0, syrk = 1 };
NsGram newton_schulz_cpu_gram();
void set_newton_schulz_cpu_gram(NsGram g);  // for the benchmark and the tests

/// OpenBLAS's thread count now (openblas_get_num_threads) and its build ("OpenBLAS 0.3.21
/// ..."), for benchmarks and reports.
int newton_schulz_cpu_threads();
const char* blas_config();

}  // namespace fo::detail
