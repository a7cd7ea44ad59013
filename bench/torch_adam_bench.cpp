// libtorch's torch::optim::Adam on the CPU, timed like step/adam/cpu/f32/<n> in
// fusedopt_bench (same minimal byte count: 7 streams of 4 bytes), for the ratio between the
// two. Optional: built with -DFUSEDOPT_BENCH_LIBTORCH=ON where libtorch is installed.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <thread>

namespace {

void bench_torch_adam(benchmark::State& state, std::int64_t n) {
  torch::NoGradGuard no_grad;
  torch::Tensor p = torch::full({n}, 0.5f);
  p.set_requires_grad(true);
  p.mutable_grad() = torch::full({n}, 0.01f);
  torch::optim::Adam opt({p}, torch::optim::AdamOptions(1e-3));
  opt.step();  // creates the state outside the timed loop
  for (auto _ : state) opt.step();
  state.counters["bytes_per_second"] = benchmark::Counter(
      7.0 * 4.0 * static_cast<double>(n) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["threads"] = torch::get_num_threads();
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(static_cast<int>(std::thread::hardware_concurrency()));
  for (std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 26}) {
    const std::string name = "torch/adam/cpu/f32/" + std::to_string(n);
    benchmark::RegisterBenchmark(name.c_str(), [n](benchmark::State& s) { bench_torch_adam(s, n); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinTime(2.0);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
