// Muon's Newton-Schulz iteration on the CPU (matrix/newton_schulz.hpp): the plan of
// kernels/newton_schulz.hpp run with OpenBLAS, one matrix of the batch after another.
// Precision: float32 storage and GEMMs (OpenBLAS's sgemm accumulates in float); the norm's
// sum of squares in double, in the fixed order of kernels/sum_order.hpp, which the GPU's
// kernels (kernels/cuda/newton_schulz.cuh) follow too: X is the same bits on both. Work per
// matrix and step: 4 m^2 n + 2 m^3 flops.
#include "matrix/newton_schulz.hpp"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>

#include "fusedopt/kernels/sum_order.hpp"
#include "messages.hpp"

namespace fo::detail {
namespace {

// ssyrk: 10-15% faster than sgemm on the benchmark's non-square shapes, the same on 768 x 768
// (bench/results/2026-12-02-cpu-newton-schulz.md).
std::atomic<int> g_gram{static_cast<int>(NsGram::syrk)};

CBLAS_TRANSPOSE op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

// One GEMM of the plan over the four operands of one matrix.
void run_gemm(const NsPlan& p, const NsGemm& g, float* const ops[4], NsGram gram_kind) {
  float* const c = ops[static_cast<int>(g.c)];
  if (g.beta != 0.0)
    std::memcpy(c, ops[static_cast<int>(g.init)],
                static_cast<std::size_t>(ns_operand_size(p, g.c)) * sizeof(float));
  const int m = static_cast<int>(g.m), n = static_cast<int>(g.n), k = static_cast<int>(g.k);
  const float alpha = static_cast<float>(g.alpha), beta = static_cast<float>(g.beta);
  const float* a = ops[static_cast<int>(g.a)];
  if (&g == &p.gram && gram_kind == NsGram::syrk) {
    // A = op(a) op(a)^T: the upper triangle by ssyrk, then mirrored (poly reads all of A).
    cblas_ssyrk(CblasColMajor, CblasUpper, op(g.trans_a), m, k, alpha, a, static_cast<int>(g.lda),
                beta, c, static_cast<int>(g.ldc));
    const std::int64_t ld = g.ldc;
    for (std::int64_t j = 0; j < g.n; ++j)
      for (std::int64_t i = 0; i < j; ++i) c[j + i * ld] = c[i + j * ld];
    return;
  }
  cblas_sgemm(CblasColMajor, op(g.trans_a), op(g.trans_b), m, n, k, alpha, a,
              static_cast<int>(g.lda), ops[static_cast<int>(g.b)], static_cast<int>(g.ldb), beta, c,
              static_cast<int>(g.ldc));
}

}  // namespace

std::int64_t newton_schulz_cpu_workspace_floats(std::int64_t rows, std::int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  const std::int64_t m = std::min(rows, cols), n = std::max(rows, cols);
  return m * n + 2 * m * m;
}

void validate_newton_schulz(const char* name, std::int64_t batch, std::int64_t rows,
                            std::int64_t cols, const NsCoefficients& coefficients, int steps,
                            double eps) {
  const std::string where = std::string(name) + ": ";
  if (batch < 0 || rows < 0 || cols < 0)
    invalid(where + "batch, rows and cols must be >= 0, got " + std::to_string(batch) + ", " +
            std::to_string(rows) + ", " + std::to_string(cols));
  if (batch > INT_MAX || rows > INT_MAX || cols > INT_MAX)
    invalid(where + "batch, rows and cols must be at most " + std::to_string(INT_MAX) +
            " (BLAS's int)");
  if (steps < 0 || steps > kNsMaxSteps)
    invalid(where + "steps must be in [0, " + std::to_string(kNsMaxSteps) + "], got " +
            std::to_string(steps));
  if (!std::isfinite(eps) || eps < 0.0)
    invalid(where + "eps must be finite and >= 0, got " + format_number(eps));
  if (!std::isfinite(coefficients.a) || !std::isfinite(coefficients.b) ||
      !std::isfinite(coefficients.c))
    invalid(where + "the coefficients must be finite");
}

void newton_schulz_cpu(const float* in, float* out, std::int64_t batch, std::int64_t rows,
                       std::int64_t cols, const NsCoefficients& coefficients, int steps, double eps,
                       float* workspace, std::int64_t workspace_floats) {
  validate_newton_schulz("newton_schulz", batch, rows, cols, coefficients, steps, eps);
  const std::string where = "newton_schulz: ";
  if (batch == 0 || rows == 0 || cols == 0) return;
  if (!in || !out || !workspace) invalid(where + "in, out or workspace is null");
  const std::int64_t need = newton_schulz_cpu_workspace_floats(rows, cols);
  if (workspace_floats < need)
    invalid(where + "the workspace has " + std::to_string(workspace_floats) +
            " floats, rows x cols = " + std::to_string(rows) + " x " + std::to_string(cols) +
            " needs " + std::to_string(need));

  const NsPlan p = ns_plan(rows, cols, coefficients);
  const std::int64_t size = p.m * p.n;
  const NsGram gram_kind = newton_schulz_cpu_gram();
  float* const ws_x = workspace;
  float* const gram = workspace + size;
  float* const poly = gram + p.m * p.m;
  for (std::int64_t i = 0; i < batch; ++i) {
    const float* g = in + i * size;
    float* o = out + i * size;
    // x and next swap after each step: start where an even number of swaps ends in `out`.
    float* ops[4];
    ops[static_cast<int>(NsOperand::x)] = steps % 2 ? ws_x : o;
    ops[static_cast<int>(NsOperand::next)] = steps % 2 ? o : ws_x;
    ops[static_cast<int>(NsOperand::gram)] = gram;
    ops[static_cast<int>(NsOperand::poly)] = poly;

    // X = G / max(||G||_F, eps), in the input's layout (which is X's column-major storage);
    // the sum in the GPU's order (sum_of_squares is one thread's walk of it).
    const float divisor = ns_norm_divisor(sum_of_squares(g, size), eps);
    float* x = ops[static_cast<int>(NsOperand::x)];
    for (std::int64_t j = 0; j < size; ++j) x[j] = g[j] / divisor;

    for (int s = 0; s < steps; ++s) {
      run_gemm(p, p.gram, ops, gram_kind);    // A = X X^T
      run_gemm(p, p.poly, ops, gram_kind);    // B = b A + c A A
      run_gemm(p, p.update, ops, gram_kind);  // next = a X + B X
      std::swap(ops[static_cast<int>(NsOperand::x)], ops[static_cast<int>(NsOperand::next)]);
    }
  }
}

NsGram newton_schulz_cpu_gram() { return static_cast<NsGram>(g_gram.load()); }
void set_newton_schulz_cpu_gram(NsGram g) { g_gram.store(static_cast<int>(g)); }

int newton_schulz_cpu_threads() { return openblas_get_num_threads(); }
const char* blas_config() { return openblas_get_config(); }

}  // namespace fo::detail
