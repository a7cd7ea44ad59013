// fusedopt_bench: achieved bandwidth of every optimizer step against the machine's limit.
//
//   step/<algorithm>/<backend>/<dtype>/<n>      (default options of each algorithm)
//
// Bytes are the minimal traffic of a step: each input read once, each output written once
// (param and every state read and written, grad read). `bytes_per_second` is decimal.
//
// CPU: `pct_of_limit` compares the step with a traffic probe timed in the same iterations:
// the library's own loop and threads reading and writing exactly the step's streams with
// one add each. That probe, not a memcpy, is the limit on a CPU, where a copy's stores also
// pay for reading each line first. Buffer sets rotate so every iteration misses the LLC.
// CUDA: device time from events; `pct_of_copy` against a device-to-device copy moving the
// same bytes, timed in the same iterations; buffer sets rotate so L2 is not measured.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "fusedopt/fusedopt.hpp"
#if defined(FUSEDOPT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;

template <class A>
int active_states() {
  const typename A::Options o{};
  int n = 0;
  for (int k = 0; k < static_cast<int>(sizeof(A::kStates) / sizeof(A::kStates[0])); ++k)
    n += A::has_state(o, k) ? 1 : 0;
  return n;
}

/// Minimal traffic of one step: grad read; param and each state read and written.
template <class A>
std::int64_t step_bytes(std::int64_t n) {
  return (1 + 2 * (1 + active_states<A>())) * n * static_cast<std::int64_t>(sizeof(float));
}

/// Buffer sets to rotate through so that `cache` bytes hold none of the next set.
int rotation(std::int64_t set_bytes, std::int64_t cache) {
  return static_cast<int>(std::clamp<std::int64_t>(2 * cache / set_bytes + 2, 2, 64));
}

/// Decimal bytes per second of the (manual) iteration time.
void set_bytes_per_second(benchmark::State& state, std::int64_t bytes_per_iteration) {
  state.counters["bytes_per_second"] = benchmark::Counter(
      static_cast<double>(bytes_per_iteration) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

std::int64_t llc_bytes() {
  long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 <= 0) l3 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return l3 > 0 ? l3 : (64 << 20);
}

// ---------------------------------------------------------------------------------- CPU

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using HostArray = std::unique_ptr<float, FreeDeleter>;

/// 64-byte aligned, filled with small non-zero values (zeros can run faster than data).
HostArray host_array(std::int64_t n, float value) {
  const std::size_t bytes = (static_cast<std::size_t>(n) * sizeof(float) + 63) / 64 * 64;
  HostArray a(static_cast<float*>(std::aligned_alloc(64, bytes)));
  if (!a) throw std::bad_alloc();
  std::fill(a.get(), a.get() + n, value);
  return a;
}

struct HostSet {
  HostArray param, grad, states[fo::kMaxStates];
  fo::cpu::DensePtrs ptrs() const {
    return {param.get(), grad.get(), {states[0].get(), states[1].get(), states[2].get()}};
  }
};

template <class A>
void bench_cpu_step(benchmark::State& state, std::int64_t n) {
  const typename A::Options options{};
  const std::int64_t bytes = step_bytes<A>(n);
  std::vector<HostSet> sets(static_cast<std::size_t>(rotation(bytes, llc_bytes())));
  for (auto& s : sets) {
    s.param = host_array(n, 0.5f);
    s.grad = host_array(n, 0.01f);
    for (int k = 0; k < active_states<A>(); ++k) s.states[k] = host_array(n, 0.25f);
  }
  std::size_t next = 0;
  std::int64_t step = 1;
  double probe_s = 0.0, step_s = 0.0;
  for (auto _ : state) {
    const fo::cpu::DensePtrs probe = sets[next].ptrs();
    next = (next + 1) % sets.size();
    const fo::cpu::DensePtrs p = sets[next].ptrs();
    next = (next + 1) % sets.size();
    fo::DenseTensors t;
    t.param = p.param;
    t.grad = p.grad;
    for (int k = 0; k < fo::kMaxStates; ++k) t.states[k] = p.states[k];
    t.numel = n;

    const auto t0 = Clock::now();
    fo::cpu::traffic_probe(probe, n);
    const auto t1 = Clock::now();
    fo::fused_step<A>(options, step++, t);
    const auto t2 = Clock::now();
    const double s = std::chrono::duration<double>(t2 - t1).count();
    probe_s += std::chrono::duration<double>(t1 - t0).count();
    step_s += s;
    state.SetIterationTime(s);
  }
  set_bytes_per_second(state, bytes);
  state.counters["pct_of_limit"] = 100.0 * probe_s / step_s;
  state.counters["probe_GBps"] =
      static_cast<double>(bytes) * static_cast<double>(state.iterations()) / probe_s / 1e9;
  state.counters["threads"] = fo::cpu::num_threads();
  state.SetLabel(fo::cpu::isa_name(fo::cpu::isa()));
}

// --------------------------------------------------------------------------------- CUDA

#if defined(FUSEDOPT_WITH_CUDA)
#define BENCH_CUDA(expr)                                                               \
  do {                                                                                 \
    const cudaError_t e_ = (expr);                                                     \
    if (e_ != cudaSuccess) {                                                           \
      state.SkipWithError((std::string(#expr) + ": " + cudaGetErrorName(e_)).c_str()); \
      return;                                                                          \
    }                                                                                  \
  } while (0)

__attribute__((unused)) int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

template <class A>
void bench_cuda_step(benchmark::State& state, std::int64_t n) {
  const typename A::Options options{};
  const std::int64_t bytes = step_bytes<A>(n);
  int device = 0, l2 = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  const int nsets = rotation(bytes, l2);
  const int nbuf = 2 + active_states<A>();
  std::vector<std::vector<float*>> sets(static_cast<std::size_t>(nsets));
  struct Guard {
    std::vector<std::vector<float*>>* s;
    ~Guard() {
      for (auto& v : *s)
        for (float* p : v) cudaFree(p);
    }
  } guard{&sets};
  for (auto& s : sets)
    for (int b = 0; b < nbuf; ++b) {
      void* p = nullptr;
      BENCH_CUDA(cudaMalloc(&p, static_cast<std::size_t>(n) * sizeof(float)));
      BENCH_CUDA(cudaMemset(p, 0x3c, static_cast<std::size_t>(n) * sizeof(float)));  // ~0.01
      s.push_back(static_cast<float*>(p));
    }
  void* copy_src = nullptr;
  void* copy_dst = nullptr;
  const std::size_t copy_bytes = static_cast<std::size_t>(bytes / 2);  // a copy moves 2x
  BENCH_CUDA(cudaMalloc(&copy_src, copy_bytes));
  BENCH_CUDA(cudaMalloc(&copy_dst, copy_bytes));
  cudaEvent_t e0, e1, e2;
  BENCH_CUDA(cudaEventCreate(&e0));
  BENCH_CUDA(cudaEventCreate(&e1));
  BENCH_CUDA(cudaEventCreate(&e2));
  std::size_t next = 0;
  std::int64_t step = 1;
  double copy_ms = 0.0, step_ms = 0.0;
  const fo::Exec exec{fo::Device::cuda, nullptr};
  for (auto _ : state) {
    const auto& s = sets[next];
    next = (next + 1) % sets.size();
    fo::DenseTensors t;
    t.param = s[0];
    t.grad = s[1];
    for (int k = 0; k + 2 < nbuf; ++k) t.states[k] = s[2 + k];
    t.numel = n;
    BENCH_CUDA(cudaEventRecord(e0));
    BENCH_CUDA(cudaMemcpyAsync(copy_dst, copy_src, copy_bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaEventRecord(e1));
    fo::fused_step<A>(options, step++, t, exec);
    BENCH_CUDA(cudaEventRecord(e2));
    BENCH_CUDA(cudaEventSynchronize(e2));
    float c = 0, k = 0;
    BENCH_CUDA(cudaEventElapsedTime(&c, e0, e1));
    BENCH_CUDA(cudaEventElapsedTime(&k, e1, e2));
    copy_ms += c;
    step_ms += k;
    state.SetIterationTime(k / 1e3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaEventDestroy(e2);
  cudaFree(copy_src);
  cudaFree(copy_dst);
  set_bytes_per_second(state, bytes);
  state.counters["pct_of_copy"] = 100.0 * copy_ms / step_ms;
}
#endif

template <class A>
void register_algorithm(bool cuda) {
  for (std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 26}) {
    const std::string name = std::string("step/") + A::kName + "/cpu/f32/" + std::to_string(n);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [n](benchmark::State& s) { bench_cpu_step<A>(s, n); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(n > (1 << 22) ? 2.0 : 0.5);
  }
#if defined(FUSEDOPT_WITH_CUDA)
  if (cuda)
    for (int lg : {20, 24, 28}) {
      const std::int64_t n = std::int64_t{1} << lg;
      const std::string name = std::string("step/") + A::kName + "/cuda/f32/" + std::to_string(n);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [n](benchmark::State& s) { bench_cuda_step<A>(s, n); })
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
#else
  (void)cuda;
#endif
}

}  // namespace

int main(int argc, char** argv) {
#if defined(FUSEDOPT_WITH_CUDA)
  const bool cuda = cuda_device_count() > 0;
#else
  const bool cuda = false;
#endif
#define FO_REGISTER(A) register_algorithm<fo::A>(cuda);
  FO_FOR_EACH_DENSE_ALGORITHM(FO_REGISTER)
#undef FO_REGISTER
  benchmark::AddCustomContext("cpu_isa", fo::cpu::isa_name(fo::cpu::isa()));
  benchmark::AddCustomContext("cpu_threads", std::to_string(fo::cpu::num_threads()));
  benchmark::AddCustomContext("cuda_devices", cuda ? "yes" : "none");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
