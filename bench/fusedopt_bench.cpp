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
// same bytes and `pct_of_limit` against the traffic probe through the same multi-tensor
// kernel, both timed in the same iterations; buffer sets rotate so L2 is not measured.
// Plus step/adam/cuda/f32/gpt2_small: GPT-2 small's 148 tensors in one optimizer, and
// step_ema/adam/cpu/f32/<n>: adam with a weight EMA (ema_decay 0.999) in the same pass, its
// bytes counting the EMA read and written, and step/<adam|lamb|lars|adafactor>/cpu/bf16/<n>:
// bf16 params and grads with f32 master weights and states through the CPU's storage layer
// (no probe), bf16_states/<n> with bf16 states and no master weights.
// state_dtype/adamw/cpu/<f32|bf16|q8|q4>/<n>: fo::Optimizer("adamw") with its states in each
// storage (docs/quantized-states.md), against the f32 probe's bandwidth; and
// memory/adamw/gpt2_small/<mode>: the bytes the optimizer holds for GPT-2 small's params;
// state_dtype/adamw/cuda/<mode>/<n> the same step on the GPU, against a device copy.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "buffer.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
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
  for (int k = 0; k < fo::StateList<A>::count; ++k) n += A::has_state(o, k) ? 1 : 0;
  return n;
}

/// Minimal traffic of one step: grad read; param and each state read and written. A factored
/// algorithm's states are per row and per column of a square matrix here: their traffic is
/// negligible, and its one-pass minimum is the param's and the grad's.
template <class A>
std::int64_t step_bytes(std::int64_t n) {
  const int states = fo::FactoredCapable<A>::value ? 0 : active_states<A>();
  return (1 + 2 * (1 + states)) * n * static_cast<std::int64_t>(sizeof(float));
}

/// The benchmark's tensor of n elements as matrices: a square one (n a power of 4) for a
/// factored algorithm (its factored path), a vector for the others.
template <class A>
fo::MatrixView bench_view(std::int64_t n) {
  fo::MatrixView v;
  if constexpr (fo::FactoredCapable<A>::value) {
    v.batch = 1;
    v.rows = static_cast<std::int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
    v.cols = n / v.rows;
  }
  return v;
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

/// Host memory as the library allocates its own states (detail::Buffer: 64-byte aligned, on
/// transparent huge pages from 2 MiB), filled with small non-zero values (zeros can run faster
/// than data). The probe and the step run on the same kind of memory.
std::optional<fo::detail::Buffer> host_array(std::int64_t n, float value) {
  std::optional<fo::detail::Buffer> a;
  a.emplace(fo::Device::cpu, 0, static_cast<std::size_t>(n) * sizeof(float));
  std::fill(a->f32(), a->f32() + n, value);
  return a;
}

struct HostSet {
  std::optional<fo::detail::Buffer> param, grad, states[fo::kMaxStates], ema;
  double scalars[fo::kMaxScalars] = {};  // the algorithm's scalar states, where it keeps them
  fo::cpu::DensePtrs ptrs() const {
    auto ptr = [](const std::optional<fo::detail::Buffer>& b) { return b ? b->f32() : nullptr; };
    return {ptr(param), ptr(grad), {ptr(states[0]), ptr(states[1]), ptr(states[2])}};
  }
};

/// One iteration's probe, then its step, each timed on the wall clock; the step's time is the
/// iteration's. Their sums go to probe_s and step_s.
template <class Probe, class Step>
void probe_then_step(benchmark::State& state, const Probe& probe, const Step& step, double& probe_s,
                     double& step_s) {
  const auto t0 = Clock::now();
  probe();
  const auto t1 = Clock::now();
  step();
  const auto t2 = Clock::now();
  const double s = std::chrono::duration<double>(t2 - t1).count();
  probe_s += std::chrono::duration<double>(t1 - t0).count();
  step_s += s;
  state.SetIterationTime(s);
}

template <class A>
void bench_cpu_step(benchmark::State& state, std::int64_t n, bool ema = false) {
  const typename A::Options options{};
  // The probe moves the step's own streams: the EMA's too, as two more states would.
  const std::int64_t bytes = step_bytes<A>(n) + (ema ? 8 * n : 0);
  std::vector<HostSet> sets(static_cast<std::size_t>(rotation(bytes, llc_bytes())));
  for (auto& s : sets) {
    s.param = host_array(n, 0.5f);
    s.grad = host_array(n, 0.01f);
    for (int k = 0; k < active_states<A>(); ++k) s.states[k] = host_array(n, 0.25f);
    if (ema) s.ema = host_array(n, 0.5f);
    for (int k = 0; k < fo::ScalarList<A>::count; ++k) s.scalars[k] = fo::ScalarList<A>::init(k);
  }
  std::size_t next = 0;
  std::int64_t step = 1;
  double probe_s = 0.0, step_s = 0.0;
  for (auto _ : state) {
    fo::cpu::DensePtrs probe = sets[next].ptrs();
    if (fo::FactoredCapable<A>::value)  // the one-pass minimum: param and grad (step_bytes)
      for (auto& s : probe.states) s = nullptr;
    if (ema) {  // the probe's loop has no EMA: it moves those bytes as one more state
      for (int k = 0; k < fo::kMaxStates; ++k)
        if (!probe.states[k]) {
          probe.states[k] = sets[next].ema->f32();
          break;
        }
    }
    next = (next + 1) % sets.size();
    HostSet& set = sets[next];
    const fo::cpu::DensePtrs p = set.ptrs();
    next = (next + 1) % sets.size();
    fo::DenseTensors t;
    t.param = p.param;
    t.grad = p.grad;
    for (int k = 0; k < fo::kMaxStates; ++k) t.states[k] = p.states[k];
    t.numel = n;
    t.view = bench_view<A>(n);
    if (fo::ScalarList<A>::count > 0) t.scalars = set.scalars;
    fo::StepControls controls;
    if (ema) {
      t.ema = sets[(next + sets.size() - 1) % sets.size()].ema->f32();
      controls.ema_decay = 0.999;
    }

    probe_then_step(
        state, [&] { fo::cpu::traffic_probe(probe, n); },
        [&] { fo::fused_step<A>(options, step++, t, fo::Exec{}, controls); }, probe_s, step_s);
  }
  set_bytes_per_second(state, bytes);
  state.counters["pct_of_limit"] = 100.0 * probe_s / step_s;
  state.counters["probe_GBps"] =
      static_cast<double>(bytes) * static_cast<double>(state.iterations()) / probe_s / 1e9;
  state.counters["threads"] = fo::cpu::num_threads();
  state.SetLabel(fo::cpu::isa_name(fo::cpu::isa()));
}

/// step/<A>/cpu/bf16/<n>: bf16 params and grads, f32 master weights and states, through the
/// CPU's storage layer (cpu_backend.hpp, Storage), as step/<A>/cuda/bf16 on CUDA; with
/// `bf16_states` (step/<A>/cpu/bf16_states/<n>) bf16 states and no master weights instead.
/// Bytes: the storages' (param r+w and grad r at 2 bytes, master r+w at 4, each state r+w
/// at its width), once each: a two-pass kind moves more (its f32 row says how much).
template <class A>
void bench_cpu_storage_step(benchmark::State& state, std::int64_t n, bool bf16_states) {
  const typename A::Options options{};
  const std::int64_t bytes = bf16_states ? n * (2 * 2 + 2 + 2 * 2 * active_states<A>())
                                         : n * (2 * 2 + 2 + 2 * 4 + 2 * 4 * active_states<A>());
  struct Set {
    std::optional<fo::detail::Buffer> param, grad, master, states[fo::kMaxStates];
  };
  std::vector<Set> sets(static_cast<std::size_t>(rotation(bytes, llc_bytes())));
  const auto half = [n](float value) {
    std::optional<fo::detail::Buffer> a;
    a.emplace(fo::Device::cpu, 0, static_cast<std::size_t>(n) * 2);
    std::fill(static_cast<fo::bf16*>(a->data()), static_cast<fo::bf16*>(a->data()) + n,
              fo::to_bf16(value));
    return a;
  };
  for (auto& s : sets) {
    s.param = half(0.5f);
    s.grad = half(0.01f);
    if (!bf16_states) s.master = host_array(n, 0.5f);
    for (int k = 0; k < active_states<A>(); ++k)
      s.states[k] = bf16_states ? half(0.25f) : host_array(n, 0.25f);
  }
  std::size_t next = 0;
  std::int64_t step = 1;
  for (auto _ : state) {
    Set& set = sets[next];
    next = (next + 1) % sets.size();
    fo::DenseTensors t;
    t.param = set.param->data();
    t.grad = set.grad->data();
    t.master = set.master ? set.master->f32() : nullptr;
    for (int k = 0; k < fo::kMaxStates; ++k)
      t.states[k] = set.states[k] ? set.states[k]->data() : nullptr;
    t.numel = n;
    t.param_dtype = t.grad_dtype = fo::DType::bf16;
    if (bf16_states) t.state_dtype = fo::DType::bf16;
    const auto t0 = Clock::now();
    fo::fused_step<A>(options, step++, t);
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  set_bytes_per_second(state, bytes);
  state.counters["threads"] = fo::cpu::num_threads();
  state.SetLabel(
      std::string(fo::cpu::isa_name(fo::cpu::isa())) +
      (bf16_states ? ", bf16 params+grads+states" : ", bf16 params+grads, f32 master and states"));
}

// ----------------------------------------------------------- state storages (state_dtype)

/// The state_dtype modes compared: float32, bfloat16, 8-bit and 4-bit block-quantized.
struct StateMode {
  const char* name;
  double state_dtype;
  double state_bytes_per_element;  // one state, read and written once: codes and scales
};
constexpr StateMode kStateModes[] = {
    {"f32", 0, 4.0}, {"bf16", 2, 2.0}, {"q8", 5, 1.0 + 4.0 / 256}, {"q4", 6, 0.5 + 4.0 / 128}};

/// state_dtype/adamw/cpu/<mode>/<n>: fo::Optimizer("adamw") with f32 params and grads and its
/// two states in `mode`. Bytes: param r+w and grad r at 4, each state's codes and scales r+w.
/// The limit is the traffic probe of an f32 adam step's seven streams over n elements, timed
/// in the same iterations: pct_of_limit compares bandwidths (this step's bytes per second
/// against the probe's), since a quantized step's streams are not all of one width.
void bench_cpu_state_mode(benchmark::State& state, const StateMode& mode, std::int64_t n) {
  const auto bytes = static_cast<std::int64_t>(static_cast<double>(n) *
                                               (12.0 + 4.0 * mode.state_bytes_per_element));
  struct Set {
    std::optional<fo::detail::Buffer> param, grad, probe[4];
    std::unique_ptr<fo::Optimizer> opt;
  };
  std::vector<Set> sets(static_cast<std::size_t>(rotation(bytes, llc_bytes())));
  for (auto& s : sets) {
    s.param = host_array(n, 0.5f);
    s.grad = host_array(n, 0.01f);
    for (auto& b : s.probe) b = host_array(n, 0.25f);
    s.opt = std::make_unique<fo::Optimizer>("adamw");
    s.opt->set_option("state_dtype", mode.state_dtype);
    s.opt->add_param("p", s.param->data(), fo::DType::f32, {n});
    const void* g = s.grad->data();
    s.opt->step(&g);  // creates the state
  }
  std::size_t next = 0;
  double probe_s = 0.0, step_s = 0.0;
  for (auto _ : state) {
    Set& ps = sets[next];
    next = (next + 1) % sets.size();
    Set& set = sets[next];
    next = (next + 1) % sets.size();
    const fo::cpu::DensePtrs probe{
        ps.probe[0]->f32(), ps.probe[1]->f32(), {ps.probe[2]->f32(), ps.probe[3]->f32(), nullptr}};
    const void* g = set.grad->data();
    probe_then_step(
        state, [&] { fo::cpu::traffic_probe(probe, n); }, [&] { set.opt->step(&g); }, probe_s,
        step_s);
  }
  set_bytes_per_second(state, bytes);
  const double probe_bytes = 28.0 * static_cast<double>(n);
  const double probe_gbps = probe_bytes * static_cast<double>(state.iterations()) / probe_s / 1e9;
  const double step_gbps =
      static_cast<double>(bytes) * static_cast<double>(state.iterations()) / step_s / 1e9;
  state.counters["probe_GBps"] = probe_gbps;
  state.counters["pct_of_limit"] = 100.0 * step_gbps / probe_gbps;
  state.counters["bytes_per_element"] = static_cast<double>(bytes) / static_cast<double>(n);
  state.counters["state_bytes_per_param"] =
      static_cast<double>(sets[0].opt->state_memory_bytes()) / static_cast<double>(n);
  state.counters["threads"] = fo::cpu::num_threads();
  state.SetLabel(std::string(fo::cpu::isa_name(fo::cpu::isa())) + ", adamw states " + mode.name);
}

/// GPT-2 small's parameter list: 124M floats in 148 tensors.
std::vector<std::int64_t> gpt2_small_shapes() {
  std::vector<std::int64_t> n = {50257 * 768, 1024 * 768};
  for (int layer = 0; layer < 12; ++layer)
    for (std::int64_t x :
         {768, 768, 768 * 2304, 2304, 768 * 768, 768, 768, 768, 768 * 3072, 3072, 3072 * 768, 768})
      n.push_back(x);
  n.push_back(768);
  n.push_back(768);
  return n;
}

/// memory/adamw/gpt2_small/<mode>: what fo::Optimizer("adamw") holds for GPT-2 small's
/// parameter list (124M floats in 148 tensors, f32 params) after its first step, with the
/// default min_quant_size (4096: biases and layer norms keep float32 states). One iteration.
void bench_gpt2_state_memory(benchmark::State& state, const StateMode& mode) {
  const std::vector<std::int64_t> shapes = gpt2_small_shapes();
  std::int64_t total = 0;
  for (auto x : shapes) total += x;
  std::vector<std::optional<fo::detail::Buffer>> params, grads;
  fo::Optimizer opt("adamw");
  opt.set_option("state_dtype", mode.state_dtype);
  std::vector<const void*> g;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    params.push_back(host_array(shapes[i], 0.5f));
    grads.push_back(host_array(shapes[i], 0.01f));
    opt.add_param("p" + std::to_string(i), params.back()->data(), fo::DType::f32, {shapes[i]});
    g.push_back(grads.back()->data());
  }
  for (auto _ : state) {
    const auto t0 = Clock::now();
    opt.step(g.data());
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  const auto held = static_cast<double>(opt.state_memory_bytes());
  state.counters["params"] = static_cast<double>(total);
  state.counters["state_MB"] = held / 1e6;
  state.counters["bytes_per_param"] = held / static_cast<double>(total);
  state.counters["ratio_to_f32"] = held / (8.0 * static_cast<double>(total));
  state.SetLabel(std::string("adamw states ") + mode.name);
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

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

/// Device buffers freed at scope exit.
struct DeviceBuffers {
  std::vector<void*> ptrs;
  ~DeviceBuffers() {
    for (void* p : ptrs) cudaFree(p);
  }
  void* add(std::size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) return nullptr;
    cudaMemset(p, 0x3c, bytes);  // small non-zero values in every dtype
    ptrs.push_back(p);
    return p;
  }
};

/// Times `step`, a D2D copy moving the same bytes, and (if given) the traffic probe, in the
/// same iterations; each on its own rotating buffer set so L2 never holds the data.
template <class Step, class Probe>
void time_cuda(benchmark::State& state, std::int64_t bytes, int nsets, Step step, Probe probe,
               bool has_probe) {
  DeviceBuffers copy_bufs;
  const std::size_t copy_bytes = static_cast<std::size_t>(bytes / 2);  // a copy moves 2x
  void* src = copy_bufs.add(copy_bytes);
  void* dst = copy_bufs.add(copy_bytes);
  if (!src || !dst) return state.SkipWithError("out of device memory for the copy");
  cudaEvent_t ev[4];
  for (auto& e : ev) BENCH_CUDA(cudaEventCreate(&e));
  double copy_ms = 0, step_ms = 0, probe_ms = 0;
  int set = 0;
  for (auto _ : state) {
    BENCH_CUDA(cudaEventRecord(ev[0]));
    BENCH_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaEventRecord(ev[1]));
    if (has_probe) probe(set);
    set = (set + 1) % nsets;
    BENCH_CUDA(cudaEventRecord(ev[2]));
    step(set);
    set = (set + 1) % nsets;
    BENCH_CUDA(cudaEventRecord(ev[3]));
    BENCH_CUDA(cudaEventSynchronize(ev[3]));
    float c = 0, p = 0, k = 0;
    BENCH_CUDA(cudaEventElapsedTime(&c, ev[0], ev[1]));
    BENCH_CUDA(cudaEventElapsedTime(&p, ev[1], ev[2]));
    BENCH_CUDA(cudaEventElapsedTime(&k, ev[2], ev[3]));
    copy_ms += c;
    probe_ms += p;
    step_ms += k;
    state.SetIterationTime(k / 1e3);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  set_bytes_per_second(state, bytes);
  state.counters["pct_of_copy"] = 100.0 * copy_ms / step_ms;
  if (has_probe) state.counters["pct_of_limit"] = 100.0 * probe_ms / step_ms;
}

/// step/<A>/cuda/<f32|bf16>/<n>: f32 everything, or bf16 params and grads with f32 master
/// weights and f32 states (the usual mixed-precision setup).
template <class A>
void bench_cuda_step(benchmark::State& state, std::int64_t n, bool bf16) {
  const typename A::Options options{};
  const int nstates = active_states<A>();
  const std::int64_t elem = bf16 ? 2 : 4;
  const std::int64_t bytes =
      bf16 ? n * (2 * elem + elem + 2 * 4 + 2 * 4 * nstates) : step_bytes<A>(n);
  int device = 0, l2 = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  const int nsets = rotation(bytes, l2);
  DeviceBuffers bufs;
  std::vector<fo::DenseTensors> sets(static_cast<std::size_t>(nsets));
  std::vector<fo::cuda::ListEntry> probe_sets(static_cast<std::size_t>(nsets));
  for (int i = 0; i < nsets; ++i) {
    fo::DenseTensors& t = sets[static_cast<std::size_t>(i)];
    t.numel = n;
    t.param = bufs.add(static_cast<std::size_t>(n * elem));
    t.grad = bufs.add(static_cast<std::size_t>(n * elem));
    for (int k = 0; k < nstates; ++k) t.states[k] = bufs.add(static_cast<std::size_t>(n * 4));
    if (bf16) {
      t.param_dtype = t.grad_dtype = fo::DType::bf16;
      t.master = static_cast<float*>(bufs.add(static_cast<std::size_t>(n * 4)));
    }
    if (fo::ScalarList<A>::count > 0) {
      double init[fo::kMaxScalars] = {};
      for (int k = 0; k < fo::ScalarList<A>::count; ++k) init[k] = fo::ScalarList<A>::init(k);
      t.scalars = static_cast<double*>(bufs.add(sizeof init));
      if (t.scalars) BENCH_CUDA(cudaMemcpy(t.scalars, init, sizeof init, cudaMemcpyHostToDevice));
    }
    if (!t.param || !t.grad || (bf16 && !t.master) || (fo::ScalarList<A>::count > 0 && !t.scalars))
      return state.SkipWithError("out of device memory");
    probe_sets[static_cast<std::size_t>(i)] = fo::cuda::ListEntry{
        t.param, t.grad, nullptr, {t.states[0], t.states[1], t.states[2]}, n, 1, 0};
  }
  std::int64_t step = 1;
  const fo::Exec exec{fo::Device::cuda, nullptr};
  time_cuda(
      state, bytes, nsets,
      [&](int s) { fo::fused_step<A>(options, step++, sets[static_cast<std::size_t>(s)], exec); },
      [&](int s) { fo::cuda::traffic_probe(&probe_sets[static_cast<std::size_t>(s)], 1, nullptr); },
      !bf16);
  state.SetLabel(bf16 ? "bf16 params+grads, f32 master and states" : "f32");
}

/// state_dtype/adamw/cuda/<mode>/<n>: fo::Optimizer("adamw") on the GPU with f32 params and
/// grads and its two states in `mode` (bytes as the CPU's state_dtype benchmark), against a
/// device copy moving the same bytes.
void bench_cuda_state_mode(benchmark::State& state, const StateMode& mode, std::int64_t n) {
  const auto bytes = static_cast<std::int64_t>(static_cast<double>(n) *
                                               (12.0 + 4.0 * mode.state_bytes_per_element));
  int device = 0, l2 = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  const int nsets = rotation(bytes, l2);
  DeviceBuffers bufs;
  std::vector<std::unique_ptr<fo::Optimizer>> opts;
  std::vector<const void*> grads;
  for (int i = 0; i < nsets; ++i) {
    void* p = bufs.add(static_cast<std::size_t>(n) * 4);
    void* g = bufs.add(static_cast<std::size_t>(n) * 4);
    if (!p || !g) return state.SkipWithError("out of device memory");
    opts.push_back(std::make_unique<fo::Optimizer>("adamw", fo::Device::cuda));
    opts.back()->set_option("state_dtype", mode.state_dtype);
    opts.back()->add_param("p", p, fo::DType::f32, {n});
    grads.push_back(g);
    opts.back()->step(&grads.back());  // creates the state
  }
  time_cuda(
      state, bytes, nsets,
      [&](int s) { opts[static_cast<std::size_t>(s)]->step(&grads[static_cast<std::size_t>(s)]); },
      [](int) {}, false);
  state.counters["bytes_per_element"] = static_cast<double>(bytes) / static_cast<double>(n);
  state.SetLabel(std::string("adamw states ") + mode.name);
}

/// GPT-2 small's parameter list stepped by one Adam optimizer:
/// multi-tensor launches against a copy and the probe over the same tensors.
void bench_cuda_gpt2(benchmark::State& state, const char* algorithm) {
  const std::vector<std::int64_t> shapes = gpt2_small_shapes();
  std::int64_t total = 0;
  for (auto x : shapes) total += x;
  DeviceBuffers bufs;
  constexpr int kSets = 2;  // 124M floats per stream: far beyond L2 already
  std::vector<fo::Optimizer> opts;
  std::vector<std::vector<const void*>> grads(kSets);
  std::vector<std::vector<fo::cuda::ListEntry>> probe(kSets);
  for (int s = 0; s < kSets; ++s) {
    opts.emplace_back(algorithm, fo::Device::cuda);
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      void* p = bufs.add(static_cast<std::size_t>(shapes[i]) * 4);
      void* g = bufs.add(static_cast<std::size_t>(shapes[i]) * 4);
      if (!p || !g) return state.SkipWithError("out of device memory");
      opts.back().add_param("p" + std::to_string(i), p, fo::DType::f32, {shapes[i]});
      grads[static_cast<std::size_t>(s)].push_back(g);
    }
    opts.back().step(grads[static_cast<std::size_t>(s)].data());  // creates the state
    for (std::size_t i = 0; i < shapes.size(); ++i)
      probe[static_cast<std::size_t>(s)].push_back(
          fo::cuda::ListEntry{bufs.add(static_cast<std::size_t>(shapes[i]) * 4),
                              grads[static_cast<std::size_t>(s)][i],
                              nullptr,
                              {bufs.add(static_cast<std::size_t>(shapes[i]) * 4),
                               bufs.add(static_cast<std::size_t>(shapes[i]) * 4), nullptr},
                              shapes[i],
                              1,
                              0});
  }
  const std::int64_t bytes = 7 * 4 * total;  // adam/adamw: 7 streams
  time_cuda(
      state, bytes, kSets,
      [&](int s) {
        opts[static_cast<std::size_t>(s)].step(grads[static_cast<std::size_t>(s)].data());
      },
      [&](int s) {
        fo::cuda::traffic_probe(probe[static_cast<std::size_t>(s)].data(), shapes.size(), nullptr);
      },
      true);
  state.counters["tensors"] = static_cast<double>(shapes.size());
  state.counters["params"] = static_cast<double>(total);
}
#endif

// ------------------------------------------------------------------------------- sparse

/// nnz row indices of a table, uniform or Zipf(1.05) over the rows (hot rows repeat).
std::vector<std::int64_t> sparse_indices(std::int64_t rows, std::int64_t nnz, bool zipf,
                                         std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(nnz));
  if (!zipf) {
    std::uniform_int_distribution<std::int64_t> u(0, rows - 1);
    for (auto& i : idx) i = u(rng);
    return idx;
  }
  std::vector<double> cdf(static_cast<std::size_t>(rows));
  double total = 0.0;
  for (std::int64_t r = 0; r < rows; ++r) cdf[r] = total += 1.0 / std::pow(double(r + 1), 1.05);
  std::uniform_real_distribution<double> u(0.0, total);
  for (auto& i : idx) i = std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin();
  return idx;
}

/// sparse/<algorithm>/<backend>/<rows>x<dim>/<nnz>/<uniform|zipf>: one step_sparse of an
/// embedding table. Bytes: each distinct row's param and states read and written (a row-wise
/// state is one float per row), every gradient row and index read. Wall time (a sparse step
/// waits for its index check). With `rowwise`, the algorithm's row-wise form (rowwise = 1),
/// named <algorithm>_rowwise.
void bench_sparse(benchmark::State& state, const std::string& algorithm, bool rowwise,
                  fo::Device device, std::int64_t rows, std::int64_t dim, std::int64_t nnz,
                  bool zipf) {
  const std::vector<std::int64_t> idx = sparse_indices(rows, nnz, zipf, 7);
  std::vector<std::int64_t> distinct = idx;
  std::sort(distinct.begin(), distinct.end());
  const auto unique_rows = std::unique(distinct.begin(), distinct.end()) - distinct.begin();
  const std::size_t grad_bytes = static_cast<std::size_t>(nnz * dim) * 4;
  fo::Optimizer opt(algorithm, device);
  if (rowwise) opt.set_option("rowwise", 1);
  void* table = nullptr;
  void* grads = nullptr;
  void* d_idx = nullptr;
  std::vector<float> h_table, h_grads;
  if (device == fo::Device::cpu) {
    h_table.assign(static_cast<std::size_t>(rows * dim), 0.5f);
    h_grads.assign(static_cast<std::size_t>(nnz * dim), 0.01f);
    table = h_table.data();
    grads = h_grads.data();
    d_idx = const_cast<std::int64_t*>(idx.data());
  }
#if defined(FUSEDOPT_WITH_CUDA)
  DeviceBuffers bufs;
  if (device == fo::Device::cuda) {
    table = bufs.add(static_cast<std::size_t>(rows * dim) * 4);
    grads = bufs.add(grad_bytes);
    d_idx = bufs.add(idx.size() * 8);
    if (!table || !grads || !d_idx) return state.SkipWithError("out of device memory");
    cudaMemcpy(d_idx, idx.data(), idx.size() * 8, cudaMemcpyHostToDevice);
  }
#endif
  opt.add_param("table", table, fo::DType::f32, {rows, dim});
  opt.step_sparse("table", d_idx, fo::DType::i64, nnz, grads);  // creates the state
  const auto states = static_cast<std::int64_t>(opt.state_names("table").size());
  for (auto _ : state) {
    opt.step_sparse("table", d_idx, fo::DType::i64, nnz, grads);
#if defined(FUSEDOPT_WITH_CUDA)
    if (device == fo::Device::cuda) cudaDeviceSynchronize();
#endif
  }
  const double state_floats_per_row = rowwise ? 1.0 : double(dim);
  const double bytes = static_cast<double>(unique_rows) * 4.0 * 2.0 *
                           (double(dim) + state_floats_per_row * static_cast<double>(states)) +
                       static_cast<double>(grad_bytes) + static_cast<double>(nnz) * 8.0;
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["rows_per_second"] =
      benchmark::Counter(static_cast<double>(unique_rows) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["distinct_rows"] = static_cast<double>(unique_rows);
}

void register_sparse(bool cuda) {
  struct Shape {
    fo::Device device;
    std::int64_t rows, dim;
  };
  std::vector<Shape> shapes = {{fo::Device::cpu, 1 << 20, 128}};
  if (cuda) {
    shapes.push_back({fo::Device::cuda, 1 << 20, 128});
    shapes.push_back({fo::Device::cuda, 10 * (1 << 20), 64});
  }
  // Every algorithm that takes sparse steps, and the row-wise form of those that have one.
  std::vector<std::pair<std::string, bool>> sparse;
#define FO_SPARSE(A)                                                                       \
  if constexpr (fo::SparseCapable<fo::A>::value) sparse.emplace_back(fo::A::kName, false); \
  if constexpr (fo::RowwiseCapable<fo::A>::value) sparse.emplace_back(fo::A::kName, true);
  FO_FOR_EACH_DENSE_ALGORITHM(FO_SPARSE)
#undef FO_SPARSE
  for (const auto& [algorithm, rowwise] : sparse)
    for (const auto& sh : shapes)
      for (bool zipf : {false, true}) {
        const std::int64_t nnz = 1 << 16;
        const std::string name = "sparse/" + algorithm + (rowwise ? "_rowwise" : "") + "/" +
                                 (sh.device == fo::Device::cuda ? "cuda" : "cpu") + "/" +
                                 std::to_string(sh.rows) + "x" + std::to_string(sh.dim) + "/" +
                                 std::to_string(nnz) + "/" + (zipf ? "zipf" : "uniform");
        benchmark::RegisterBenchmark(
            name.c_str(),
            [=, algorithm = algorithm, rowwise = rowwise](benchmark::State& s) {
              bench_sparse(s, algorithm, rowwise, sh.device, sh.rows, sh.dim, nnz, zipf);
            })
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
      }
}

template <class A>
void register_algorithm(bool cuda) {
  // A matrix step (muon) is its Newton-Schulz iteration's cost, not a pass over memory:
  // bench/newton_schulz_bench.cpp and bench/python/muon_cpu_bench.py time it on real shapes.
  if (fo::MatrixCapable<A>::value) return;
  for (bool ema : {false, true})
    for (std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 26}) {
      if (ema && std::string(A::kName) != "adam") continue;
      const std::string name =
          std::string(ema ? "step_ema/" : "step/") + A::kName + "/cpu/f32/" + std::to_string(n);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [n, ema](benchmark::State& s) { bench_cpu_step<A>(s, n, ema); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(n > (1 << 22) ? 2.0 : 0.5);
    }
  // The storage layer: adam's one pass, and the two-pass kinds (trust ratio, factored).
  const std::string name = A::kName;
  if (name == "adam" || name == "lamb" || name == "lars" || name == "adafactor")
    for (bool bf16_states : {false, true})
      for (std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 26})
        benchmark::RegisterBenchmark(
            (std::string("step/") + A::kName + "/cpu/" + (bf16_states ? "bf16_states/" : "bf16/") +
             std::to_string(n))
                .c_str(),
            [n, bf16_states](benchmark::State& s) { bench_cpu_storage_step<A>(s, n, bf16_states); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(n > (1 << 22) ? 2.0 : 0.5);
#if defined(FUSEDOPT_WITH_CUDA)
  if (cuda)
    for (bool bf16 : {false, true})
      for (int lg = 20; lg <= 28; lg += 2) {
        const std::int64_t n = std::int64_t{1} << lg;
        const std::string name = std::string("step/") + A::kName + "/cuda/" +
                                 (bf16 ? "bf16" : "f32") + "/" + std::to_string(n);
        benchmark::RegisterBenchmark(
            name.c_str(), [n, bf16](benchmark::State& s) { bench_cuda_step<A>(s, n, bf16); })
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
  for (const StateMode& mode : kStateModes) {
    for (std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 26})
      benchmark::RegisterBenchmark(
          (std::string("state_dtype/adamw/cpu/") + mode.name + "/" + std::to_string(n)).c_str(),
          [&mode, n](benchmark::State& s) { bench_cpu_state_mode(s, mode, n); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(n > (1 << 22) ? 2.0 : 0.5);
    benchmark::RegisterBenchmark((std::string("memory/adamw/gpt2_small/") + mode.name).c_str(),
                                 [&mode](benchmark::State& s) { bench_gpt2_state_memory(s, mode); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
#if defined(FUSEDOPT_WITH_CUDA)
  if (cuda)
    for (const StateMode& mode : kStateModes)
      for (int lg : {20, 24, 28}) {
        const std::int64_t n = std::int64_t{1} << lg;
        benchmark::RegisterBenchmark(
            (std::string("state_dtype/adamw/cuda/") + mode.name + "/" + std::to_string(n)).c_str(),
            [&mode, n](benchmark::State& s) { bench_cuda_state_mode(s, mode, n); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
  if (cuda)
    for (const char* algorithm : {"adam", "adamw"})
      benchmark::RegisterBenchmark(
          (std::string("step/") + algorithm + "/cuda/f32/gpt2_small").c_str(),
          [algorithm](benchmark::State& s) { bench_cuda_gpt2(s, algorithm); })
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
#endif
  register_sparse(cuda);
  benchmark::AddCustomContext("cpu_isa", fo::cpu::isa_name(fo::cpu::isa()));
  benchmark::AddCustomContext("cpu_threads", std::to_string(fo::cpu::num_threads()));
  benchmark::AddCustomContext("cuda_devices", cuda ? "yes" : "none");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
