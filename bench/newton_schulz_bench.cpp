// newton_schulz_bench: Muon's Newton-Schulz iteration on the CPU (matrix/newton_schulz.hpp)
// against the machine's own sgemm, in one run.
//
//   ns/cpu/<gram>/<rows>x<cols>     the 5-step iteration of one float32 matrix, the Gram
//                                   matrix by sgemm or ssyrk (+ mirror); torch's defaults
//   sgemm/cpu/768x3072x768          one cblas_sgemm, C (768 x 768) = A (768 x 3072) B
//
// Flops are the iteration's useful work, per step 2 m^2 n (gram) + 2 m^3 (poly) + 2 m^2 n
// (update), m the small side (kernels/newton_schulz.hpp's ns_flops; ssyrk does half the
// gram's, but is counted as the same work): `flops` is decimal flop/s, `pct_of_sgemm` the
// iteration's rate over the sgemm rate measured once at the start of this run (the median of
// 15 calls of the sgemm case). The operands (at most 3072 x 768 floats, 9.4 MB, plus two
// 768 x 768) are reused, as the optimizer would: the GEMMs are compute-bound, so no cache
// flushing. Threads: OpenBLAS's own (OPENBLAS_NUM_THREADS; printed in the context).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fusedopt/kernels/newton_schulz.hpp"
#include "matrix/newton_schulz.hpp"

namespace {

std::vector<float> random_matrix(std::int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

constexpr int kSgemmM = 768, kSgemmN = 768, kSgemmK = 3072;
constexpr double kSgemmFlops = 2.0 * kSgemmM * kSgemmN * kSgemmK;

struct SgemmOperands {
  std::vector<float> a = random_matrix(std::int64_t{kSgemmM} * kSgemmK, 1),
                     b = random_matrix(std::int64_t{kSgemmK} * kSgemmN, 2),
                     c = std::vector<float>(std::size_t{kSgemmM} * kSgemmN);
  void run() {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, kSgemmM, kSgemmN, kSgemmK, 1.0f,
                a.data(), kSgemmK, b.data(), kSgemmN, 0.0f, c.data(), kSgemmN);
  }
};

// The machine's sgemm rate in flop/s, measured once: the median of 15 timed calls after 3.
double sgemm_rate() {
  static const double rate = [] {
    SgemmOperands s;
    for (int i = 0; i < 3; ++i) s.run();
    std::vector<double> t;
    for (int i = 0; i < 15; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      s.run();
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    return kSgemmFlops / t[t.size() / 2];
  }();
  return rate;
}

void bm_sgemm(benchmark::State& state) {
  SgemmOperands s;
  for (auto _ : state) {
    s.run();
    benchmark::DoNotOptimize(s.c.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] =
      benchmark::Counter(kSgemmFlops, benchmark::Counter::kIsIterationInvariantRate);
}

void bm_newton_schulz(benchmark::State& state, fo::detail::NsGram gram) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  const double reference_rate = sgemm_rate();
  const fo::detail::NsGram saved = fo::detail::newton_schulz_cpu_gram();
  fo::detail::set_newton_schulz_cpu_gram(gram);
  const std::vector<float> in = random_matrix(rows * cols, 3);
  std::vector<float> out(in.size());
  std::vector<float> ws(
      static_cast<std::size_t>(fo::detail::newton_schulz_cpu_workspace_floats(rows, cols)));
  double seconds = 0.0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    fo::detail::newton_schulz_cpu(in.data(), out.data(), 1, rows, cols, fo::kNsDefaultCoefficients,
                                  fo::kNsDefaultSteps, fo::kNsDefaultEps, ws.data(),
                                  static_cast<std::int64_t>(ws.size()));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(t);
    seconds += t;
  }
  fo::detail::set_newton_schulz_cpu_gram(saved);
  const double flops = fo::ns_flops(rows, cols, fo::kNsDefaultSteps);
  state.counters["flops"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  // The iteration's rate over the sgemm's, in percent (a plain number: computed here).
  const double rate = seconds > 0 ? flops * static_cast<double>(state.iterations()) / seconds : 0;
  state.counters["pct_of_sgemm"] = 100.0 * rate / reference_rate;
}

// GPT-2 small's hidden matrices: attention out (768 x 768), MLP in and out (768 x 3072,
// 3072 x 768, the latter transposed), fused QKV (768 x 2304).
void shapes(benchmark::internal::Benchmark* b) {
  b->Args({768, 768})->Args({768, 3072})->Args({3072, 768})->Args({768, 2304});
  b->ArgNames({"rows", "cols"})->Unit(benchmark::kMillisecond)->UseManualTime();
}

}  // namespace

BENCHMARK(bm_sgemm)->Name("sgemm/cpu/768x3072x768")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(bm_newton_schulz, sgemm_gram, fo::detail::NsGram::gemm)
    ->Name("ns/cpu/sgemm_gram")
    ->Apply(shapes);
BENCHMARK_CAPTURE(bm_newton_schulz, ssyrk_gram, fo::detail::NsGram::syrk)
    ->Name("ns/cpu/ssyrk_gram")
    ->Apply(shapes);

int main(int argc, char** argv) {
  benchmark::AddCustomContext("openblas_threads",
                              std::to_string(fo::detail::newton_schulz_cpu_threads()));
  benchmark::AddCustomContext("openblas_config", fo::detail::blas_config());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
