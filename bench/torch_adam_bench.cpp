// libtorch's torch::optim::Adam against fusedopt's Adam on the CPU, in one binary and one run
// so that the ratio is not at the mercy of a noisy machine: both step the same-sized tensors
// allocated by libtorch, timed the same way (wall time), bytes counted as minimal traffic
// (7 streams of 4 bytes). Optional: -DFUSEDOPT_BENCH_LIBTORCH=ON where libtorch is installed.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <thread>

#include "fusedopt/fusedopt.hpp"

namespace {

void set_rate(benchmark::State& state, std::int64_t n) {
  state.counters["bytes_per_second"] = benchmark::Counter(
      7.0 * 4.0 * static_cast<double>(n) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

void bench_torch_adam(benchmark::State& state, std::int64_t n) {
  torch::NoGradGuard no_grad;
  torch::Tensor p = torch::full({n}, 0.5f);
  p.set_requires_grad(true);
  p.mutable_grad() = torch::full({n}, 0.01f);
  torch::optim::Adam opt({p}, torch::optim::AdamOptions(1e-3));
  opt.step();  // creates the state outside the timed loop
  for (auto _ : state) opt.step();
  set_rate(state, n);
  state.counters["threads"] = torch::get_num_threads();
}

void bench_fusedopt_adam(benchmark::State& state, std::int64_t n) {
  torch::Tensor p = torch::full({n}, 0.5f), g = torch::full({n}, 0.01f);
  fo::Optimizer opt("adam");
  opt.add_param("p", p.data_ptr<float>(), fo::DType::f32, {n});
  opt.step({g.data_ptr<float>()});
  for (auto _ : state) opt.step({g.data_ptr<float>()});
  set_rate(state, n);
  state.counters["threads"] = fo::cpu::num_threads();
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(static_cast<int>(std::thread::hardware_concurrency()));
  for (std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 26})
    for (bool torch_side : {true, false}) {
      const std::string name =
          std::string(torch_side ? "torch" : "fusedopt") + "/adam/cpu/f32/" + std::to_string(n);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [n, torch_side](benchmark::State& s) {
                                     if (torch_side)
                                       bench_torch_adam(s, n);
                                     else
                                       bench_fusedopt_adam(s, n);
                                   })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->MinTime(2.0);
    }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
