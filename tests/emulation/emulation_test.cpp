// The CUDA kernels' own source, run on CPU threads (kernels/cuda/host_emulation.hpp) through
// the library's own launchers (host/src/cuda/*.cu compiled as host C++: the same launch
// planning, list packing, functor building and launch tables), compared bytewise with the CPU
// backend. Every registered algorithm is covered by being registered.
//
// What runs here: the multi-tensor step (every algorithm, every option combination its
// validation accepts, host- and device-counted steps, a device lr factor, gradient scales,
// found_inf; every param, grad, state and master storage, stochastic rounding), the step over
// 8- and 4-bit block-quantized states against a per-block reference (quantize.hpp's state
// contract, warp shuffles included; the steps that take none refuse them) and against the CPU
// backend's quantized step, the whole-tensor (de)quantizations, the gradient norm pass, the
// step counters, fills and widenings, the sparse row kernels (per element and row-wise, warp
// shuffles included), index validation, the device-side schedule, and the Newton-Schulz
// iteration's norm and scale.
//
// What cannot run here, and is left to the GPU suite (bench/gpu_suite.sh): CUB's sort,
// run-length encoding and scan of the sparse step (the row kernels get a run list sorted on
// the host instead), cuSOLVER, cuBLAS (so a matrix step, muon's, runs here only as its two
// elementwise kernels around a fixed iteration output, EmulatedMatrixKernels, and the
// iteration's own scale before its GEMMs, EmulatedNewtonSchulz), device memory and
// streams, the GPU's memory model, occupancy and real launch limits, and the device's own math
// library (pow, sqrt in double). An emulated result is never a GPU result (docs/host-emulation.md).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "cuda/schedule_device.hpp"
#include "fusedopt/functional.hpp"
#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/ema.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/kernels/schedule.hpp"
#include "fusedopt/types.hpp"
#include "matrix/newton_schulz.hpp"
#include "sparse.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

// cuda::multi_tensor_step and the rest name the emulated launchers here (FO_CUDA_HOST_EMULATION
// puts them in the inline namespace cuda::host_emulation), never the library's own.

constexpr std::uint32_t kPoison = 0x7FBADBADu;  // a NaN no step produces

// ------------------------------------------------------------------------ typed buffers

/// Bytes of n elements of one storage, placed `offset` elements into an allocation that is
/// 16-byte aligned (so offsets 1-3 break the kernel's 4-wide vector accesses).
class Buffer {
 public:
  Buffer(DType dtype, std::size_t n, std::size_t offset)
      : dtype_(dtype), n_(n), offset_(offset), bytes_((n + offset) * dtype_size(dtype) + 16) {}
  void* data() { return base() + offset_ * dtype_size(dtype_); }
  const void* data() const { return const_cast<Buffer*>(this)->data(); }
  std::size_t size() const { return n_; }
  DType dtype() const { return dtype_; }
  float get(std::size_t i) const {
    const auto* p = static_cast<const unsigned char*>(data()) + i * dtype_size(dtype_);
    if (dtype_ == DType::f32) {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    std::uint16_t h;
    std::memcpy(&h, p, 2);
    return dtype_ == DType::bf16 ? to_float(bf16{h}) : to_float(f16{h});
  }
  void set(std::size_t i, float v) {  // round to nearest
    auto* p = static_cast<unsigned char*>(data()) + i * dtype_size(dtype_);
    if (dtype_ == DType::f32) {
      std::memcpy(p, &v, 4);
    } else {
      const std::uint16_t h = dtype_ == DType::bf16 ? to_bf16(v).bits : to_f16(v).bits;
      std::memcpy(p, &h, 2);
    }
  }
  void fill_from(const std::vector<float>& v) {
    for (std::size_t i = 0; i < n_; ++i) set(i, v[i]);
  }
  std::vector<unsigned char> bytes() const {
    const auto* p = static_cast<const unsigned char*>(data());
    return {p, p + n_ * dtype_size(dtype_)};
  }
  bool operator==(const Buffer& o) const { return bytes() == o.bytes(); }

 private:
  unsigned char* base() {
    const auto a = reinterpret_cast<std::uintptr_t>(storage_.data());
    return storage_.data() + (16 - a % 16) % 16;
  }
  DType dtype_;
  std::size_t n_, offset_;
  std::size_t bytes_;
  std::vector<unsigned char> storage_ = std::vector<unsigned char>(bytes_);
};

std::string first_byte_difference(const Buffer& got, const Buffer& want) {
  const auto a = got.bytes(), b = want.bytes();
  const std::size_t w = dtype_size(got.dtype());
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i])
      return "element " + std::to_string(i / w) + " of " + std::to_string(got.size()) + ": got " +
             std::to_string(got.get(i / w)) + ", want " + std::to_string(want.get(i / w));
  return "equal";
}

// -------------------------------------------------------------------- one tensor's buffers

struct Storage {
  DType param = DType::f32, grad = DType::f32, state = DType::f32;
  bool master = false, stochastic = false;
  std::string name() const {
    return std::string("param ") + dtype_name(param) + ", grad " + dtype_name(grad) + ", state " +
           dtype_name(state) + (master ? ", master" : "") + (stochastic ? ", stochastic" : "");
  }
};

/// Param, grad, master and every state of one tensor, with random contents. Every other
/// tensor has all its buffers 16-byte aligned (the kernel's 4-wide vector path); the rest
/// are placed 0-3 elements off at random, each buffer on its own (the scalar path, mostly).
struct Tensor {
  Tensor(const Storage& st, std::size_t n, std::mt19937_64& rng, const std::vector<float>& init)
      : aligned(rng() % 2 == 0),
        param(st.param, n, offset(rng)),
        grad(st.grad, n, offset(rng)),
        master(DType::f32, st.master ? n : 0, offset(rng)),
        ema(DType::f32, n, offset(rng)) {
    const std::vector<float> p0 = random_floats(rng, n);
    param.fill_from(p0);
    if (st.master) master.fill_from(p0);
    // A weight EMA (used where a test asks for one) away from the param, as after steps.
    std::vector<float> e0 = p0;
    for (float& x : e0) x *= 0.75f;
    ema.fill_from(e0);
    grad.fill_from(random_floats(rng, n));
    for (int k = 0; k < kMaxStates; ++k) {
      states.emplace_back(st.state, n, offset(rng));
      // A state starts at its initial value plus noise of its sign: it may be a square.
      std::vector<float> s = random_floats(rng, n);
      for (float& x : s) x = init[static_cast<std::size_t>(k)] + std::fabs(x) * 0.1f;
      states.back().fill_from(s);
    }
  }
  std::size_t offset(std::mt19937_64& rng) const { return aligned ? 0 : rng() % 4; }
  bool aligned;
  Buffer param, grad, master, ema;
  std::vector<Buffer> states;
  // Scalar states (ScalarList), for the algorithms that keep them: values as after steps.
  std::vector<double> scalars = std::vector<double>(kMaxScalars, 0.0);
  MatrixView view;  // factored algorithms: test_view(n)
};

/// The matrix view a factored algorithm's tensor of n elements takes here: a vector (the
/// unfactored form) where n % 3 == 1; else a batch of the smallest prime factor of n when the
/// rest is composite, and matrices as square as n allows (rows > kColSegment where n is large
/// enough, a single row where it is prime).
MatrixView test_view(std::size_t size) {
  const auto n = static_cast<std::int64_t>(size);
  MatrixView v;
  if (n == 0 || n % 3 == 1) return v;
  auto smallest_factor = [](std::int64_t m) {
    for (std::int64_t f = 2; f * f <= m; ++f)
      if (m % f == 0) return f;
    return m;
  };
  v.batch = 1;
  const std::int64_t p = smallest_factor(n);
  if (p < n && smallest_factor(n / p) < n / p) v.batch = p;
  const std::int64_t m = n / v.batch;
  v.rows = 1;
  for (std::int64_t r = 1; r * r <= m; ++r)
    if (m % r == 0) v.rows = r;
  v.cols = m / v.rows;
  return v;
}

/// Sets the views of a factored algorithm's tensors.
template <class A>
void set_views(std::vector<Tensor>& tensors, const std::vector<std::size_t>& sizes) {
  if constexpr (FactoredCapable<A>::value)
    for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].view = test_view(sizes[i]);
}

// ------------------------------------------------------------------- options to cover

/// Every combination of the algorithm's flags and of its zero-default real options set to
/// 0.5 that its own validation accepts and that takes dense steps: all its code paths.
template <class A>
std::vector<typename A::Options> option_variants() {
  using Options = typename A::Options;
  const Options defaults{};
  std::vector<const OptionField<Options>*> toggles;
  for (const auto& f : A::kOptions)
    if (f.flag || f.get(defaults) == 0.0) toggles.push_back(&f);
  std::vector<Options> out;
  for (unsigned mask = 0; mask < (1u << toggles.size()); ++mask) {
    Options o = defaults;
    for (std::size_t j = 0; j < toggles.size(); ++j)
      if (mask & (1u << j)) toggles[j]->set(o, toggles[j]->flag ? 1.0 : 0.5);
    Validator v;
    A::validate(o, v);
    if (!v.ok()) continue;
    if constexpr (RowwiseCapable<A>::value) {
      if (A::rowwise(o)) continue;
    }
    out.push_back(o);
  }
  return out;
}

template <class A>
std::string describe(const typename A::Options& o) {
  std::string s = A::kName;
  const typename A::Options defaults{};
  for (const auto& f : A::kOptions)
    if (f.get(o) != f.get(defaults))
      s += " " + std::string(f.name) + "=" + std::to_string(f.get(o));
  return s;
}

template <class A>
std::vector<float> state_inits(const typename A::Options& o) {
  std::vector<float> init(kMaxStates, 0.0f);
  for (int k = 0; k < StateList<A>::count; ++k)
    init[static_cast<std::size_t>(k)] = static_cast<float>(A::state_init(o, k));
  return init;
}

template <class A>
cuda::ListEntry entry_of(const typename A::Options& o, Tensor& t, std::int64_t step, int key) {
  cuda::ListEntry e{t.param.data(),
                    t.grad.data(),
                    nullptr,
                    {nullptr, nullptr, nullptr},
                    static_cast<std::int64_t>(t.param.size()),
                    step,
                    key};
  if (t.master.size() > 0) e.master = static_cast<float*>(t.master.data());
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(o, k)) e.states[k] = t.states[static_cast<std::size_t>(k)].data();
  if (ScalarList<A>::count > 0) e.scalars = t.scalars.data();
  e.view = t.view;
  return e;
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

/// Scalar states as after some steps: each initial value plus 0.5 (k + 1), the same for
/// every tensor's copies.
template <class A>
void start_scalars(Tensor& t) {
  for (int k = 0; k < ScalarList<A>::count; ++k)
    t.scalars[static_cast<std::size_t>(k)] = ScalarList<A>::init(k) + 0.5 * (k + 1);
}

/// A's device workspace for a step of `entries` (NaN-filled: a pass that reads what no pass
/// wrote shows), set in `s`; keep the returned storage alive for the step.
template <class A>
std::vector<double> workspace_for(cuda::ListSettings& s,
                                  const std::vector<cuda::ListEntry>& entries) {
  // 256-byte aligned, as device allocations are (a matrix step's workspace requires it):
  // 32 doubles of slack, and the first aligned address in them.
  const std::size_t need = cuda::step_workspace<A>(entries.data(), entries.size());
  std::vector<double> w(need / sizeof(double) + 32, std::numeric_limits<double>::quiet_NaN());
  const auto addr = reinterpret_cast<std::uintptr_t>(w.data());
  s.d_workspace = w.data() + ((256 - addr % 256) % 256) / sizeof(double);
  s.workspace_bytes = need;
  return w;
}

// --------------------------------------------------- f32: against the CPU backend bytewise

/// Sizes that hit every tail of the 4-wide vector path and of a block's 8192-element chunk.
const std::vector<std::size_t> kSizes = {0, 1, 3, 4, 5, 7, 8, 9, 31, 33, 8191, 8192, 8193, 20011};

/// Which of a step's scalars live in (emulated) device memory.
struct DeviceScalars {
  bool counted_on_device = false;       // step counts in d_steps (capturable steps)
  float lr_factor = 0.0f;               // d_lr, where non-zero
  float device_grad_multiplier = 0.0f;  // d_grad_multiplier, where non-zero
  bool pass_found_inf = false;          // d_found_inf, holding found_inf
  float found_inf = 0.0f;
  bool mixed_host_steps = false;  // host steps that differ across the list (i % 3 apart)
  double ema_decay = 0.0;         // a weight EMA on every tensor, where non-zero
};

/// Two steps of A over `sizes` (each tensor's buffers misaligned at random) through the
/// emulated launcher, and the same through fo::fused_step on the CPU backend; every byte of
/// param and state must agree.
template <class A>
void expect_f32_matches_cpu(const typename A::Options& o, const std::vector<std::size_t>& sizes,
                            const DeviceScalars& d, std::mt19937_64& rng) {
  const std::vector<float> init = state_inits<A>(o);
  const Storage f32{};
  std::vector<Tensor> emu, cpu;
  for (std::size_t n : sizes) {
    std::mt19937_64 copy = rng;
    emu.emplace_back(f32, n, copy, init);
    cpu.emplace_back(f32, n, rng, init);
    start_scalars<A>(emu.back());
    start_scalars<A>(cpu.back());
  }
  set_views<A>(emu, sizes);
  set_views<A>(cpu, sizes);
  const std::vector<double> scalars_before = emu.empty() ? std::vector<double>{} : emu[0].scalars;
  const float grad_multiplier = 0.75f;
  std::vector<std::int64_t> d_steps(sizes.size() + 3, 0);
  for (std::size_t i = 0; i < d_steps.size(); ++i) d_steps[i] = static_cast<std::int64_t>(i % 3);
  const std::vector<std::int64_t> steps_before = d_steps;
  const float lr_factor = d.lr_factor, dgs = d.device_grad_multiplier, found = d.found_inf;
  const std::string what = describe<A>(o);

  const auto host_step = [&](std::size_t i, int round) -> std::int64_t {
    return round + 1 + (d.mixed_host_steps ? static_cast<std::int64_t>(i % 3) : 0);
  };
  for (int round = 0; round < 2; ++round) {
    std::vector<cuda::ListEntry> entries;
    for (std::size_t i = 0; i < emu.size(); ++i)
      entries.push_back(entry_of<A>(o, emu[i], d.counted_on_device ? 0 : host_step(i, round),
                                    static_cast<int>(i) + 2));
    cuda::ListSettings s;
    s.grad_multiplier = grad_multiplier;
    if (d.counted_on_device) s.d_steps = d_steps.data();
    if (lr_factor != 0.0f) s.d_lr = &lr_factor;
    if (dgs != 0.0f) s.d_grad_multiplier = &dgs;
    if (d.pass_found_inf) s.d_found_inf = &found;
    if (d.ema_decay != 0.0) {
      for (std::size_t i = 0; i < emu.size(); ++i)
        entries[i].ema = static_cast<float*>(emu[i].ema.data());
      s.ema_weight = ema_weight(d.ema_decay);
    }
    const std::vector<double> workspace = workspace_for<A>(s, entries);
    cuda::multi_tensor_step<A>(o, entries.data(), entries.size(),
                               cuda::plan_list(entries.data(), entries.size()), s, nullptr);

    if (found != 0.0f) continue;  // the CPU takes no step either
    for (std::size_t i = 0; i < cpu.size(); ++i) {
      typename A::Options oc = o;
      if (lr_factor != 0.0f) oc.lr *= static_cast<double>(lr_factor);
      const std::int64_t step =
          d.counted_on_device ? steps_before[i + 2] + round + 1 : host_step(i, round);
      DenseTensors t;
      t.param = cpu[i].param.data();
      t.grad = cpu[i].grad.data();
      for (int k = 0; k < kMaxStates; ++k)
        t.states[k] = cpu[i].states[static_cast<std::size_t>(k)].data();
      t.numel = static_cast<std::int64_t>(sizes[i]);
      t.view = cpu[i].view;
      if (ScalarList<A>::count > 0) t.scalars = cpu[i].scalars.data();
      StepControls c;
      c.grad_multiplier = dgs != 0.0f ? grad_multiplier * dgs : grad_multiplier;
      if (d.ema_decay != 0.0) {
        t.ema = static_cast<float*>(cpu[i].ema.data());
        c.ema_decay = d.ema_decay;
      }
      fused_step<A>(oc, step, t, Exec{}, c);
    }
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_TRUE(emu[i].param == cpu[i].param)
        << what << ", size " << sizes[i]
        << ", param: " << first_byte_difference(emu[i].param, cpu[i].param);
    EXPECT_TRUE(emu[i].ema == cpu[i].ema)  // untouched on both sides without an EMA
        << what << ", size " << sizes[i] << ", ema " << d.ema_decay << ": "
        << first_byte_difference(emu[i].ema, cpu[i].ema);
    EXPECT_TRUE(same_bits(emu[i].scalars, cpu[i].scalars))
        << what << ", size " << sizes[i] << ": scalar states";
    if (ScalarList<A>::count > 0) {  // advanced by the two steps, unless they were skipped
      EXPECT_EQ(found != 0.0f, same_bits(emu[i].scalars, scalars_before))
          << what << ", size " << sizes[i] << ": scalar states after a skipped step";
    }
    for (int k = 0; k < kMaxStates; ++k) {
      const auto kk = static_cast<std::size_t>(k);
      if (!A::has_state(o, k)) continue;
      EXPECT_TRUE(emu[i].states[kk] == cpu[i].states[kk])
          << what << ", size " << sizes[i] << ", state " << StateList<A>::name(k) << ": "
          << first_byte_difference(emu[i].states[kk], cpu[i].states[kk]);
    }
  }
  if (d.counted_on_device) {
    const std::int64_t taken = found != 0.0f ? 0 : 2;
    for (std::size_t i = 0; i < sizes.size(); ++i)
      EXPECT_EQ(d_steps[i + 2], steps_before[i + 2] + taken) << what << ": device step count";
    EXPECT_EQ(d_steps[0], steps_before[0]) << "a step count of a key not in the list moved";
  }
}

// ------------------------------- 16-bit storages: against a per-element reference bytewise

/// What the step kernel promises per element (multi_tensor.cuh): widen every operand to fp32,
/// run the functor once, write the master exactly and every 16-bit value rounded to nearest
/// even, or stochastically with the draw of (seed of the key, step, 4i for the param,
/// 4i + 1 + k for state k).
/// The weight EMA's per-element contract (docs/optimizers.md): torch's lerp of element i's
/// EMA toward the f32 value p, weight w, each operation rounded in order.
void ema_contract(Tensor& t, std::size_t i, float p, float w) {
  const float e = t.ema.get(i);
  t.ema.set(i, w < 0.5f ? e + w * (p - e) : p - (p - e) * (1.0f - w));
}

/// The same for a trust-ratio algorithm's two passes (kernels/trust_ratio.hpp): pass one
/// stores advance()'s states and reads them back as stored, the norms of the values the
/// functor saw are summed in the shared order, pass two applies the rate.
template <class A, class Store>
void reference_trust_step(const typename A::Options& o, const typename A::Op& op, Tensor& t,
                          const Storage& st, float grad_multiplier, const Store& store, float w) {
  using Op = typename A::Op;
  const auto has = [&](int k) { return k < StateList<A>::count && A::has_state(o, k); };
  const std::size_t n = t.param.size();
  std::vector<float> p(n), u(n);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = st.master ? t.master.get(i) : t.param.get(i);
    const float g = t.grad.get(i) * grad_multiplier;
    float s[kMaxStates] = {};
    for (int k = 0; k < kMaxStates; ++k)
      if (has(k)) s[k] = t.states[static_cast<std::size_t>(k)].get(i);
    if (Op::kAdvanceStates) {
      op.advance(p[i], g, s);
      for (int k = 0; k < kMaxStates; ++k) {
        Buffer& b = t.states[static_cast<std::size_t>(k)];
        if (!has(k)) continue;
        store(b, i, s[k], 4 * i + 1 + k);
        s[k] = b.get(i);
      }
    }
    u[i] = op.direction(p[i], g, s);
  }
  float rate = op.rate(0.0, 0.0);
  if (op.needs_norms()) {
    const std::size_t chunks = (n + kSumChunk - 1) / kSumChunk;
    std::vector<double> partial(2 * chunks);
    for (std::size_t c = 0; c < chunks; ++c) {
      double acc_p[kSumRow] = {}, acc_u[kSumRow] = {};
      const std::size_t end = std::min(n, (c + 1) * kSumChunk);
      for (std::size_t row = c * kSumChunk; row < end; row += kSumRow) {
        const int count = static_cast<int>(std::min<std::size_t>(kSumRow, end - row));
        add_squares(p.data() + row, count, acc_p);
        add_squares(u.data() + row, count, acc_u);
      }
      partial[2 * c] = chunk_sum(acc_p);
      partial[2 * c + 1] = chunk_sum(acc_u);
    }
    rate =
        op.rate(std::sqrt(sum_of_chunks(partial.data(), static_cast<std::int64_t>(chunks), 2)),
                std::sqrt(sum_of_chunks(partial.data() + 1, static_cast<std::int64_t>(chunks), 2)));
  }
  for (std::size_t i = 0; i < n; ++i) {
    float q = st.master ? t.master.get(i) : t.param.get(i);
    const float g = Op::kApplyReadsGrad ? t.grad.get(i) * grad_multiplier : 0.0f;
    float s[kMaxStates] = {};
    for (int k = 0; k < kMaxStates; ++k)
      if (has(k)) s[k] = t.states[static_cast<std::size_t>(k)].get(i);
    op.apply(q, g, s, rate);
    if (w > 0.0f) ema_contract(t, i, q, w);
    if (st.master) t.master.set(i, q);
    store(t.param, i, q, 4 * i);
    if (Op::kApplyWritesStates)
      for (int k = 0; k < kMaxStates; ++k)
        if (has(k)) store(t.states[static_cast<std::size_t>(k)], i, s[k], 4 * i + 1 + k);
  }
}

/// With an EMA weight w > 0 (elementwise algorithms), the weight EMA (f32) then moves toward
/// the functor's f32 result, before it is rounded: docs/optimizers.md's formula, torch's lerp:
/// e + w * (p - e) for w < 0.5, else p - (p - e) * (1 - w).
template <class A>
void reference_step(const typename A::Options& o, std::int64_t step, Tensor& t, const Storage& st,
                    std::uint64_t seed, int key, float grad_multiplier, float w = 0.0f) {
  double next[kMaxScalars] = {};
  const typename A::Op op = make_step_op<A>(o, step, t.scalars.data(), next);
  for (int k = 0; k < ScalarList<A>::count; ++k) t.scalars[static_cast<std::size_t>(k)] = next[k];
  const std::uint64_t key_seed =
      seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(key + 1));
  auto store = [&](Buffer& b, std::size_t i, float x, std::uint64_t counter) {
    if (b.dtype() == DType::f32 || !st.stochastic) return b.set(i, x);
    const std::uint32_t r = random_bits(key_seed, static_cast<std::uint64_t>(step), counter);
    const std::uint16_t h =
        b.dtype() == DType::bf16 ? to_bf16_stochastic(x, r).bits : to_f16_stochastic(x, r).bits;
    std::memcpy(static_cast<unsigned char*>(b.data()) + 2 * i, &h, 2);
  };
  if constexpr (FactoredCapable<A>::value) {
    // Float32 states (the caller's): the CPU backend's step on the operands widened to fp32
    // (the master where there is one), then the per-element stores of the contract.
    (void)op;
    const std::size_t n = t.param.size();
    std::vector<float> p32(n), g32(n);
    for (std::size_t i = 0; i < n; ++i) {
      p32[i] = st.master ? t.master.get(i) : t.param.get(i);
      g32[i] = t.grad.get(i);
    }
    DenseTensors d;
    d.param = p32.data();
    d.grad = g32.data();
    for (int k = 0; k < kMaxStates; ++k) d.states[k] = t.states[static_cast<std::size_t>(k)].data();
    d.numel = static_cast<std::int64_t>(n);
    d.view = t.view;
    StepControls c;
    c.grad_multiplier = grad_multiplier;
    fused_step<A>(o, step, d, Exec{}, c);
    for (std::size_t i = 0; i < n; ++i) {
      if (w > 0.0f) ema_contract(t, i, p32[i], w);
      if (st.master) t.master.set(i, p32[i]);
      store(t.param, i, p32[i], 4 * i);
    }
  } else if constexpr (TrustRatioCapable<A>::value) {
    return reference_trust_step<A>(o, op, t, st, grad_multiplier, store, w);
  } else {
    for (std::size_t i = 0; i < t.param.size(); ++i) {
      float p = st.master ? t.master.get(i) : t.param.get(i);
      float s[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k)
        s[k] = A::has_state(o, k) ? t.states[static_cast<std::size_t>(k)].get(i) : 0.0f;
      op(p, t.grad.get(i) * grad_multiplier, s);
      if (w > 0.0f) ema_contract(t, i, p, w);
      if (st.master) t.master.set(i, p);
      store(t.param, i, p, 4 * i);
      for (int k = 0; k < kMaxStates; ++k)
        if (A::has_state(o, k))
          store(t.states[static_cast<std::size_t>(k)], i, s[k], 4 * i + 1 + k);
    }
  }
}

std::vector<Storage> storages() {
  std::vector<Storage> out;
  for (DType param : {DType::f32, DType::f16, DType::bf16})
    for (DType grad : {param, DType::f32})
      for (DType state : {DType::f32, DType::bf16})
        for (bool master : {false, true})
          for (bool stochastic : {false, true}) {
            if (grad != param && param == DType::f32) continue;  // the same twice
            if (master && param == DType::f32) continue;         // masters are for 16 bits
            const bool narrow = param != DType::f32 || state != DType::f32;
            if (stochastic && !narrow) continue;
            out.push_back({param, grad, state, master, stochastic});
          }
  return out;
}

template <class A>
void expect_storages_match_reference(std::mt19937_64& rng) {
  const std::vector<typename A::Options> variants = option_variants<A>();
  const typename A::Options o = variants.back();  // the most options on
  const std::vector<float> init = state_inits<A>(o);
  const std::vector<std::size_t> sizes = {1, 3, 4, 5, 9, 8197};
  const float grad_multiplier = 0.5f;
  const std::uint64_t seed = rng();
  // Then with a weight EMA, for 16-bit params (f32 params: WeightEmaMatchesCpuBitwise below),
  // where it follows the f32 value before rounding.
  for (const double decay : {0.0, 0.9})
    for (const Storage& st : storages()) {
      if (decay != 0.0 && st.param == DType::f32) continue;
      // A factored step's bf16 row and column statistics are stored, read back and reduced
      // between its passes: the per-element contract below does not describe them. Not
      // covered here (only float32 states are; a GPU run compares them with the CPU).
      if (FactoredCapable<A>::value && st.state != DType::f32) continue;
      const float w = decay == 0.0 ? 0.0f : ema_weight(decay);
      std::vector<Tensor> emu, ref;
      for (std::size_t n : sizes) {
        std::mt19937_64 copy = rng;
        emu.emplace_back(st, n, copy, init);
        ref.emplace_back(st, n, rng, init);
        start_scalars<A>(emu.back());
        start_scalars<A>(ref.back());
      }
      set_views<A>(emu, sizes);
      set_views<A>(ref, sizes);
      for (std::int64_t step = 1; step <= 2; ++step) {
        std::vector<cuda::ListEntry> entries;
        for (std::size_t i = 0; i < emu.size(); ++i)
          entries.push_back(entry_of<A>(o, emu[i], step, static_cast<int>(i)));
        cuda::ListSettings s;
        s.param_dtype = st.param;
        s.grad_dtype = st.grad;
        s.state_dtype = st.state;
        s.stochastic = st.stochastic;
        s.seed = seed;
        s.grad_multiplier = grad_multiplier;
        if (w > 0.0f) {
          for (std::size_t i = 0; i < emu.size(); ++i)
            entries[i].ema = static_cast<float*>(emu[i].ema.data());
          s.ema_weight = w;
        }
        const std::vector<double> workspace = workspace_for<A>(s, entries);
        cuda::multi_tensor_step<A>(o, entries.data(), entries.size(),
                                   cuda::plan_list(entries.data(), entries.size()), s, nullptr);
        for (std::size_t i = 0; i < ref.size(); ++i)
          reference_step<A>(o, step, ref[i], st, seed, static_cast<int>(i), grad_multiplier, w);
      }
      const std::string what =
          describe<A>(o) + ", " + st.name() + ", ema decay " + std::to_string(decay);
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        EXPECT_TRUE(emu[i].param == ref[i].param)
            << what << ", size " << sizes[i]
            << ", param: " << first_byte_difference(emu[i].param, ref[i].param);
        if (st.master) {
          EXPECT_TRUE(emu[i].master == ref[i].master)
              << what << ", size " << sizes[i] << ", master";
        }
        EXPECT_TRUE(emu[i].ema == ref[i].ema)
            << what << ", size " << sizes[i]
            << ", ema: " << first_byte_difference(emu[i].ema, ref[i].ema);
        for (int k = 0; k < kMaxStates; ++k) {
          const auto kk = static_cast<std::size_t>(k);
          if (A::has_state(o, k)) {
            EXPECT_TRUE(emu[i].states[kk] == ref[i].states[kk])
                << what << ", size " << sizes[i] << ", state " << StateList<A>::name(k) << ": "
                << first_byte_difference(emu[i].states[kk], ref[i].states[kk]);
          }
        }
      }
    }
}

// ------------------------------------------------------------ sparse row kernels (no CUB)

/// The sort and run-length encoding CUB does on the GPU, done here on the host: stable by
/// index, so equal indices keep ascending positions.
template <class T>
struct HostRuns {
  std::vector<T> unique_rows;
  std::vector<cuda::SparsePos> offsets, sorted_positions;
  cuda::SparsePos num_runs = 0;
  HostRuns(const std::vector<T>& indices) {
    sorted_positions.resize(indices.size());
    std::iota(sorted_positions.begin(), sorted_positions.end(), 0);
    std::stable_sort(sorted_positions.begin(), sorted_positions.end(), [&](int a, int b) {
      return indices[static_cast<std::size_t>(a)] < indices[static_cast<std::size_t>(b)];
    });
    for (std::size_t k = 0; k < indices.size(); ++k) {
      const T row = indices[static_cast<std::size_t>(sorted_positions[k])];
      if (unique_rows.empty() || unique_rows.back() != row) {
        unique_rows.push_back(row);
        offsets.push_back(static_cast<cuda::SparsePos>(k));
      }
    }
    num_runs = static_cast<cuda::SparsePos>(unique_rows.size());
  }
  cuda::SparseRuns view() const {
    return {unique_rows.data(), offsets.data(), sorted_positions.data(), &num_runs};
  }
};

template <class A, class T>
void expect_sparse_matches_cpu(const typename A::Options& o, std::int64_t dim,
                               std::mt19937_64& rng) {
  const std::int64_t rows = 40;
  const bool rowwise = [&] {
    if constexpr (RowwiseCapable<A>::value) return A::rowwise(o);
    return false;
  }();
  const std::int64_t state_len = rowwise ? rows : rows * dim;
  const std::int64_t nnz = 3 * rows;  // with many duplicates, and rows never named
  std::vector<T> indices(static_cast<std::size_t>(nnz));
  for (auto& i : indices) i = static_cast<T>(rng() % static_cast<std::uint64_t>(rows - 7));
  const std::vector<float> grads = random_floats(rng, static_cast<std::size_t>(nnz * dim));
  const std::vector<float> table0 = random_floats(rng, static_cast<std::size_t>(rows * dim));
  std::vector<std::vector<float>> states0;
  for (int k = 0; k < kMaxStates; ++k) {
    std::vector<float> s = random_floats(rng, static_cast<std::size_t>(state_len));
    for (float& x : s) x = std::fabs(x);
    states0.push_back(s);
  }
  auto run = [&](bool emulated) {
    std::vector<float> table = table0;
    std::vector<std::vector<float>> states = states0;
    detail::SparseStep s{};
    s.table = table.data();
    for (int k = 0; k < kMaxStates; ++k)
      s.states[k] = A::has_state(o, k) ? states[static_cast<std::size_t>(k)].data() : nullptr;
    s.rows = rows;
    s.dim = dim;
    s.indices = indices.data();
    s.index_dtype = sizeof(T) == 8 ? DType::i64 : DType::i32;
    s.nnz = nnz;
    s.grad_rows = grads.data();
    const HostRuns<T> runs(indices);
    if (emulated)
      cuda::launch_sparse_rows<A>(o, 3, s, runs.view(), nullptr);
    else
      cpu::sparse_step<A>(o, 3, s);
    return std::make_pair(table, states);
  };
  const auto emu = run(true), cpu = run(false);
  const std::string what = describe<A>(o) + ", dim " + std::to_string(dim) + ", " +
                           (sizeof(T) == 8 ? "int64" : "int32") + " indices";
  EXPECT_TRUE(bitwise_equal(emu.first, cpu.first))
      << what << ", table: " << first_difference(emu.first, cpu.first);
  for (int k = 0; k < kMaxStates; ++k)
    EXPECT_TRUE(bitwise_equal(emu.second[static_cast<std::size_t>(k)],
                              cpu.second[static_cast<std::size_t>(k)]))
        << what << ", state " << k;
}

template <class A>
void expect_sparse_kernels_match_cpu(std::mt19937_64& rng) {
  if constexpr (SparseCapable<A>::value) {
    std::vector<typename A::Options> variants;
    const typename A::Options defaults{};
    variants.push_back(defaults);
    if constexpr (RowwiseCapable<A>::value) {
      typename A::Options r = defaults;
      for (const auto& f : A::kOptions)
        if (std::string(f.name) == "rowwise") f.set(r, 1.0);
      ASSERT_TRUE(A::rowwise(r));
      variants.push_back(r);
    }
    for (const auto& o : variants)
      for (std::int64_t dim : {1, 5, 31, 32, 33, 130}) {
        expect_sparse_matches_cpu<A, std::int32_t>(o, dim, rng);
        expect_sparse_matches_cpu<A, std::int64_t>(o, dim, rng);
      }
  } else {
    GTEST_SKIP() << A::kName << " takes no sparse steps";
  }
}

// ---------------------------------------- sparse row kernels over quantized states (no CUB)

/// A quantized state buffer (quantize.hpp's layout) of n elements, float-aligned storage.
struct SparseQuantState {
  std::vector<float> words;
  std::uint8_t* bytes() { return reinterpret_cast<std::uint8_t*>(words.data()); }
  const std::uint8_t* bytes() const { return reinterpret_cast<const std::uint8_t*>(words.data()); }
  std::vector<std::uint8_t> copy() const {
    return std::vector<std::uint8_t>(bytes(), bytes() + words.size() * sizeof(float));
  }
};

/// Block b (w elements) of a quantized state of n elements, decoded, and encoded to nearest.
void sparse_decode_block(const SparseQuantState& q, int bits, bool non_negative, std::int64_t n,
                         std::int64_t b, float* out) {
  const auto w = static_cast<int>(quant_block_size(bits));
  const float absmax = reinterpret_cast<const float*>(q.bytes() + quant_absmax_offset(n, bits))[b];
  if (bits == 8)
    dequantize_block8(non_negative ? kQuantMap8Unsigned : kQuantMap8Signed, q.bytes() + b * w, w,
                      absmax, out);
  else
    dequantize_block4(non_negative ? kQuantMap4Unsigned : kQuantMap4Signed, q.bytes() + b * w / 2,
                      w, absmax, out);
}
void sparse_encode_block(SparseQuantState& q, int bits, bool non_negative, std::int64_t n,
                         std::int64_t b, const float* x) {
  const auto w = static_cast<int>(quant_block_size(bits));
  float* const absmax = reinterpret_cast<float*>(q.bytes() + quant_absmax_offset(n, bits));
  absmax[b] = bits == 8 ? quantize_block8(non_negative ? kQuantMap8Unsigned : kQuantMap8Signed, x,
                                          w, q.bytes() + b * w, NearestRounding{})
                        : quantize_block4(non_negative ? kQuantMap4Unsigned : kQuantMap4Signed, x,
                                          w, q.bytes() + b * w / 2, NearestRounding{});
}

/// launch_sparse_rows<A> over states quantized to `bits` (host/src/sparse.hpp's contract)
/// against a serial reference built here from quantize.hpp's block primitives and A's Op: per
/// distinct row (ascending) and block, decode each state, run the functor with the summed
/// gradient (ascending original position), encode to nearest. Table and state buffers
/// bytewise after each of three steps (repeated indices; rows never named keep their codes
/// and absmax).
template <class A, class T>
void expect_sparse_quant_matches_reference(const typename A::Options& o, int bits, std::int64_t dim,
                                           std::mt19937_64& rng) {
  const std::int64_t rows = 12, n = rows * dim, w = quant_block_size(bits);
  const std::int64_t nnz = 2 * rows;
  const std::string what = describe<A>(o) + ", q" + std::to_string(bits) + ", dim " +
                           std::to_string(dim) + ", " + (sizeof(T) == 8 ? "int64" : "int32") +
                           " indices";
  unsigned non_negative = 0;
  for (int k = 0; k < kMaxStates; ++k)
    if (k < StateList<A>::count && A::has_state(o, k) && StateList<A>::non_negative(k))
      non_negative |= 1u << k;
  // Initial states: random values (magnitudes for the unsigned maps) quantized; block 0 of
  // row 1 all zero (absmax 0).
  std::vector<SparseQuantState> emu(kMaxStates), ref(kMaxStates);
  for (int k = 0; k < kMaxStates; ++k) {
    if (!A::has_state(o, k)) continue;
    const bool nn = (non_negative >> k) & 1u;
    SparseQuantState q;
    q.words.assign(static_cast<std::size_t>((quant_state_bytes(n, bits) + 3) / 4), 0.0f);
    std::vector<float> x = random_floats(rng, static_cast<std::size_t>(n));
    if (nn)
      for (float& v : x) v = std::fabs(v);
    std::fill(x.begin() + dim, x.begin() + dim + w, 0.0f);
    for (std::int64_t b = 0; b < n / w; ++b)
      sparse_encode_block(q, bits, nn, n, b, x.data() + b * w);
    emu[static_cast<std::size_t>(k)] = ref[static_cast<std::size_t>(k)] = q;
  }
  std::vector<float> table_emu = random_floats(rng, static_cast<std::size_t>(n));
  std::vector<float> table_ref = table_emu;
  std::vector<std::vector<std::uint8_t>> initial(kMaxStates);
  for (int k = 0; k < kMaxStates; ++k) initial[static_cast<std::size_t>(k)] = emu[k].copy();
  const std::vector<float> table0 = table_emu;
  std::vector<bool> named(static_cast<std::size_t>(rows), false);
  for (std::int64_t step = 1; step <= 3; ++step) {
    std::vector<T> indices(static_cast<std::size_t>(nnz));
    for (auto& i : indices) {  // rows - 3 and up never named; many repeats
      i = static_cast<T>(rng() % static_cast<std::uint64_t>(rows - 3));
      named[static_cast<std::size_t>(i)] = true;
    }
    const std::vector<float> grads = random_floats(rng, static_cast<std::size_t>(nnz * dim));
    const HostRuns<T> runs(indices);

    detail::SparseStep s{};
    s.table = table_emu.data();
    for (int k = 0; k < kMaxStates; ++k)
      s.states[k] = A::has_state(o, k) ? emu[static_cast<std::size_t>(k)].words.data() : nullptr;
    s.rows = rows;
    s.dim = dim;
    s.indices = indices.data();
    s.index_dtype = sizeof(T) == 8 ? DType::i64 : DType::i32;
    s.nnz = nnz;
    s.grad_rows = grads.data();
    s.state_dtype = bits == 8 ? DType::q8 : DType::q4;
    s.non_negative_states = non_negative;
    cuda::launch_sparse_rows<A>(o, step, s, runs.view(), nullptr);

    const typename A::Op op = A::make_op(o, step);
    std::vector<float> st(static_cast<std::size_t>(kMaxStates * w));
    for (std::size_t r = 0; r < runs.unique_rows.size(); ++r) {
      const auto row = static_cast<std::int64_t>(runs.unique_rows[r]);
      const std::size_t begin = static_cast<std::size_t>(runs.offsets[r]);
      const std::size_t end = r + 1 < runs.unique_rows.size()
                                  ? static_cast<std::size_t>(runs.offsets[r + 1])
                                  : static_cast<std::size_t>(nnz);
      for (std::int64_t b = row * dim / w; b < (row + 1) * dim / w; ++b) {
        for (int k = 0; k < kMaxStates; ++k)
          if (A::has_state(o, k))
            sparse_decode_block(ref[static_cast<std::size_t>(k)], bits, (non_negative >> k) & 1u, n,
                                b, st.data() + k * w);
        for (std::int64_t j = 0; j < w; ++j) {
          const std::int64_t col = b * w + j - row * dim;
          float g = grads[static_cast<std::size_t>(runs.sorted_positions[begin] * dim + col)];
          for (std::size_t q = begin + 1; q < end; ++q)
            g += grads[static_cast<std::size_t>(runs.sorted_positions[q] * dim + col)];
          float sj[kMaxStates] = {};
          for (int k = 0; k < kMaxStates; ++k)
            if (A::has_state(o, k)) sj[k] = st[static_cast<std::size_t>(k * w + j)];
          float& p = table_ref[static_cast<std::size_t>(b * w + j)];
          op(p, g, sj);
          for (int k = 0; k < kMaxStates; ++k) st[static_cast<std::size_t>(k * w + j)] = sj[k];
        }
        for (int k = 0; k < kMaxStates; ++k)
          if (A::has_state(o, k))
            sparse_encode_block(ref[static_cast<std::size_t>(k)], bits, (non_negative >> k) & 1u, n,
                                b, st.data() + k * w);
      }
    }
    const std::string at = what + ", step " + std::to_string(step);
    EXPECT_TRUE(bitwise_equal(table_emu, table_ref))
        << at << ", table: " << first_difference(table_emu, table_ref);
    for (int k = 0; k < kMaxStates; ++k)
      EXPECT_TRUE(emu[static_cast<std::size_t>(k)].copy() ==
                  ref[static_cast<std::size_t>(k)].copy())
          << at << ", state " << k << " bytes";
  }
  // Rows never named: their table floats, codes and absmax exactly as they started.
  for (std::int64_t row = 0; row < rows; ++row) {
    if (named[static_cast<std::size_t>(row)]) continue;
    for (std::int64_t j = 0; j < dim; ++j)
      EXPECT_EQ(std::memcmp(&table_emu[static_cast<std::size_t>(row * dim + j)],
                            &table0[static_cast<std::size_t>(row * dim + j)], sizeof(float)),
                0)
          << what << ", untouched row " << row;
    for (int k = 0; k < kMaxStates; ++k) {
      if (!A::has_state(o, k)) continue;
      const std::vector<std::uint8_t> now = emu[static_cast<std::size_t>(k)].copy();
      const std::vector<std::uint8_t>& was = initial[static_cast<std::size_t>(k)];
      const std::int64_t c0 = row * dim * bits / 8, c1 = (row + 1) * dim * bits / 8;
      EXPECT_TRUE(std::equal(now.begin() + c0, now.begin() + c1, was.begin() + c0))
          << what << ", untouched row " << row << ", state " << k << " codes";
      const std::int64_t a0 = quant_absmax_offset(n, bits) + 4 * row * dim / w;
      const std::int64_t a1 = a0 + 4 * dim / w;
      EXPECT_TRUE(std::equal(now.begin() + a0, now.begin() + a1, was.begin() + a0))
          << what << ", untouched row " << row << ", state " << k << " absmax";
    }
  }
}

template <class A>
void expect_sparse_quant_kernels_match_reference(std::mt19937_64& rng) {
  if constexpr (!SparseCapable<A>::value) {
    GTEST_SKIP() << A::kName << " takes no sparse steps";
  } else if constexpr (StateList<A>::count == 0) {
    GTEST_SKIP() << A::kName << " keeps no states";
  } else {
    int covered = 0;
    for (const auto& o : option_variants<A>()) {
      bool rowwise = false;
      if constexpr (RowwiseCapable<A>::value) rowwise = A::rowwise(o);
      if (rowwise) continue;
      ++covered;
      for (int bits : {8, 4})
        for (std::int64_t blocks : {1, 3}) {
          const std::int64_t dim = blocks * quant_block_size(bits);
          expect_sparse_quant_matches_reference<A, std::int32_t>(o, bits, dim, rng);
          expect_sparse_quant_matches_reference<A, std::int64_t>(o, bits, dim, rng);
        }
    }
    EXPECT_GT(covered, 0) << A::kName << ": no per-element option variant";
    if constexpr (RowwiseCapable<A>::value) {
      // The row-wise form: refused before any launch.
      typename A::Options r{};
      for (const auto& f : A::kOptions)
        if (std::string(f.name) == "rowwise") f.set(r, 1.0);
      ASSERT_TRUE(A::rowwise(r));
      std::vector<float> table(256, 1.0f), state(256, 0.0f), grads(256, 1.0f);
      const std::vector<std::int32_t> indices = {0};
      detail::SparseStep s{};
      s.table = table.data();
      for (int k = 0; k < kMaxStates; ++k)
        s.states[k] = A::has_state(r, k) ? state.data() : nullptr;
      s.rows = 1;
      s.dim = 256;
      s.indices = indices.data();
      s.index_dtype = DType::i32;
      s.nnz = 1;
      s.grad_rows = grads.data();
      s.state_dtype = DType::q8;
      const HostRuns<std::int32_t> runs(indices);
      try {
        cuda::launch_sparse_rows<A>(r, 1, s, runs.view(), nullptr);
        ADD_FAILURE() << A::kName << ": row-wise states over q8 were not refused";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), StatusCode::unsupported) << e.what();
      }
      EXPECT_TRUE(std::all_of(table.begin(), table.end(), [](float x) { return x == 1.0f; }));
    }
  }
}

// ---------------------------------------------------- eval(): the params' evaluation form

/// eval_kernel per element (multi_tensor.cuh): EvalOp of the f32 param (the master weights
/// where there are some) and the widened states, into the master exactly and the param
/// rounded to nearest; and for f32 storages, the CPU backend's eval_params bytewise.
template <class A>
void expect_eval_matches(std::mt19937_64& rng) {
  if constexpr (EvalCapable<A>::value) {
    const typename A::Options o = option_variants<A>().back();
    const typename A::EvalOp op = A::make_eval_op(o);
    const std::vector<float> init = state_inits<A>(o);
    for (const Storage& st : storages()) {
      if (st.grad != st.param || st.stochastic) continue;  // no grad read; round to nearest
      for (std::size_t n : kSizes) {
        std::mt19937_64 copy = rng, copy2 = rng;
        Tensor emu(st, n, copy, init), ref(st, n, copy2, init), cpu(st, n, rng, init);
        cuda::eval_params<A>(o, entry_of<A>(o, emu, 0, 0), st.param, st.state, nullptr);
        for (std::size_t i = 0; i < n; ++i) {
          float s[kMaxStates] = {};
          for (int k = 0; k < StateList<A>::count; ++k)
            if (A::has_state(o, k)) s[k] = ref.states[static_cast<std::size_t>(k)].get(i);
          const float x = op(st.master ? ref.master.get(i) : ref.param.get(i), s);
          if (st.master) ref.master.set(i, x);
          ref.param.set(i, x);
        }
        const std::string what = describe<A>(o) + ", " + st.name() + ", size " + std::to_string(n);
        EXPECT_TRUE(emu.param == ref.param)
            << what << ", param: " << first_byte_difference(emu.param, ref.param);
        EXPECT_TRUE(emu.master == ref.master) << what << ", master";
        if (st.param != DType::f32 || st.state != DType::f32) continue;
        float* states[kMaxStates] = {};
        for (int k = 0; k < StateList<A>::count; ++k)
          if (A::has_state(o, k))
            states[k] = static_cast<float*>(cpu.states[static_cast<std::size_t>(k)].data());
        cpu::eval_params<A>(o, static_cast<float*>(cpu.param.data()), states,
                            static_cast<std::int64_t>(n));
        EXPECT_TRUE(emu.param == cpu.param)
            << what << ", CPU: " << first_byte_difference(emu.param, cpu.param);
      }
    }
  } else {
    GTEST_SKIP() << A::kName << " has one form of its params";
  }
}

// ------------------------------------------- matrix steps: the two kernels around the iteration

/// A matrix step's tensor of n elements: test_view(n) where that is a matrix, else one row.
MatrixView matrix_view_of(std::size_t n) {
  const MatrixView v = test_view(n);
  return v.factored() ? v : MatrixView{1, 1, static_cast<std::int64_t>(n)};
}

/// A matrix algorithm's step (kernels/matrix_step.hpp) cannot run here: its Newton-Schulz
/// iteration is cuBLAS's, which neither the emulation nor a build without CUDA has. The
/// launcher must refuse it with a clear error, and the param must not move. Its two
/// elementwise kernels are expect_matrix_passes_match_cpu's, bytewise against the CPU.
template <class A>
void expect_matrix_step_unsupported(std::mt19937_64& rng) {
  const typename A::Options o{};
  const Storage f32{};
  Tensor t(f32, 12, rng, state_inits<A>(o));
  t.view = MatrixView{1, 3, 4};
  const std::vector<unsigned char> before = t.param.bytes();
  std::vector<cuda::ListEntry> entries = {entry_of<A>(o, t, 1, 0)};
  cuda::ListSettings s;
  const std::vector<double> workspace = workspace_for<A>(s, entries);
  try {
    cuda::multi_tensor_step<A>(o, entries.data(), 1, cuda::plan_list(entries.data(), 1), s,
                               nullptr);
    ADD_FAILURE() << A::kName << ": a matrix step ran without cuBLAS";
  } catch (const Error& e) {
    // unsupported: no cuBLAS (a build without CUDA, whose stub says so). In a CUDA build the
    // emulated launcher calls the library's real cuBLAS iteration, which on a machine without
    // a GPU fails at its first CUDA call (device_error), after the emulated momentum pass:
    // the param has still not moved.
    EXPECT_TRUE(e.code() == StatusCode::unsupported || e.code() == StatusCode::device_error)
        << e.what();
  }
  EXPECT_EQ(t.param.bytes(), before) << A::kName << ": the param moved";
}

/// The two elementwise passes of a matrix step through their launchers (cuda::matrix_prepare,
/// cuda::matrix_apply: kernels/cuda/matrix_step.cuh) against the CPU backend's
/// (kernels/cpu/matrix_step.hpp), bytewise, for f32 storage: the iteration's input X and the
/// states after pass 1; the param and its weight EMA after pass 2, which reads the same fixed
/// output O on both sides (random values standing in for the iteration, which needs cuBLAS).
/// `x_dtype` bf16: X must be the CPU's X rounded to nearest, and an O stored as bf16 is read
/// as its float value. Device scalars (d_lr, d_steps, found_inf) as in expect_f32_matches_cpu.
template <class A>
void expect_matrix_passes_match_cpu(const typename A::Options& o, std::size_t n,
                                    const DeviceScalars& d, DType x_dtype, std::mt19937_64& rng) {
  const std::vector<float> init = state_inits<A>(o);
  const Storage f32{};
  std::mt19937_64 copy = rng;
  Tensor emu(f32, n, copy, init), cpu(f32, n, rng, init);
  emu.view = cpu.view = matrix_view_of(n);
  const std::vector<float> o_values = random_floats(rng, n);
  Buffer o_buf(x_dtype, n, 0);
  o_buf.fill_from(o_values);
  std::vector<float> o_cpu(n);  // O as the apply pass sees it
  for (std::size_t i = 0; i < n; ++i) o_cpu[i] = o_buf.get(i);
  const float grad_multiplier = 0.75f, lr_factor = d.lr_factor, found = d.found_inf;
  std::vector<std::int64_t> d_steps = {4, 4, 4};
  const std::int64_t step = 3;
  const std::string what = describe<A>(o) + ", size " + std::to_string(n) + ", X " +
                           dtype_name(x_dtype) + (lr_factor != 0.0f ? ", device lr" : "") +
                           (found != 0.0f ? ", skipped" : "");

  cuda::ListEntry e = entry_of<A>(o, emu, step, 1);
  cuda::ListSettings s;
  s.grad_multiplier = grad_multiplier;
  if (lr_factor != 0.0f) s.d_lr = &lr_factor;
  if (d.counted_on_device) s.d_steps = d_steps.data();
  if (d.pass_found_inf) s.d_found_inf = &found;
  if (d.ema_decay != 0.0) {
    e.ema = static_cast<float*>(emu.ema.data());
    s.ema_weight = ema_weight(d.ema_decay);
  }
  Buffer x(x_dtype, n, 0);
  for (std::size_t i = 0; i < n; ++i) x.set(i, 0.0f);
  const std::vector<unsigned char> x_before = x.bytes();
  cuda::matrix_prepare<A>(o, e, s, x.data(), x_dtype, nullptr);
  cuda::matrix_apply<A>(o, e, s, o_buf.data(), x_dtype, nullptr);

  typename A::Options oc = o;
  if (lr_factor != 0.0f) oc.lr *= static_cast<double>(lr_factor);
  const typename A::Op op = A::make_op(oc, d.counted_on_device ? d_steps[1] + 1 : step);
  cpu::DensePtrs t{static_cast<float*>(cpu.param.data()),
                   static_cast<const float*>(cpu.grad.data()),
                   {},
                   grad_multiplier};
  for (int k = 0; k < StateList<A>::count; ++k)
    if (A::has_state(o, k))
      t.states[k] = static_cast<float*>(cpu.states[static_cast<std::size_t>(k)].data());
  if (d.ema_decay != 0.0) {
    t.ema = static_cast<float*>(cpu.ema.data());
    t.ema_weight = ema_weight(d.ema_decay);
  }
  t.view = cpu.view;
  Buffer x_cpu(DType::f32, n, 0);
  if (found == 0.0f) {
    const cpu::Kernels<A>& k = cpu::active_kernels<A>();
    k.matrix_prepare(op, t, static_cast<float*>(x_cpu.data()), 0, static_cast<std::int64_t>(n));
    k.matrix_apply(op, t, o_cpu.data(), op.rate(t.view.rows, t.view.cols), 0,
                   static_cast<std::int64_t>(n));
    Buffer want_x(x_dtype, n, 0);
    for (std::size_t i = 0; i < n; ++i) want_x.set(i, x_cpu.get(i));
    EXPECT_TRUE(x == want_x) << what << ", X: " << first_byte_difference(x, want_x);
  } else {
    EXPECT_EQ(x.bytes(), x_before) << what << ": X written by a skipped step";
  }
  EXPECT_TRUE(emu.param == cpu.param)
      << what << ", param: " << first_byte_difference(emu.param, cpu.param);
  EXPECT_TRUE(emu.ema == cpu.ema) << what << ", ema: " << first_byte_difference(emu.ema, cpu.ema);
  for (int k = 0; k < StateList<A>::count; ++k) {
    const auto kk = static_cast<std::size_t>(k);
    if (A::has_state(o, k)) {
      EXPECT_TRUE(emu.states[kk] == cpu.states[kk])
          << what << ", state " << StateList<A>::name(k) << ": "
          << first_byte_difference(emu.states[kk], cpu.states[kk]);
    }
  }
}

/// The two passes for 16-bit params (with and without master weights), 16-bit grads and
/// bf16 states against the per-element contract of multi_tensor.cuh: every operand widened
/// to fp32, the functor's prepare and apply once, the master written exactly and every 16-bit
/// value rounded to nearest even. (Stochastic rounding goes through the same
/// store_from_float as every step kernel, with the multi-tensor step's counters: it is
/// covered there, not again here.)
template <class A>
void expect_matrix_storages_match_reference(std::mt19937_64& rng) {
  const typename A::Options o = option_variants<A>().back();
  const std::vector<float> init = state_inits<A>(o);
  const float grad_multiplier = 0.5f;
  for (const Storage& st : storages()) {
    if (st.stochastic) continue;
    for (std::size_t n : {1, 5, 9, 8197}) {
      std::mt19937_64 copy = rng;
      Tensor emu(st, n, copy, init), ref(st, n, rng, init);
      emu.view = ref.view = matrix_view_of(n);
      const std::vector<float> o_values = random_floats(rng, n);
      cuda::ListEntry e = entry_of<A>(o, emu, 2, 0);
      cuda::ListSettings s;
      s.param_dtype = st.param;
      s.grad_dtype = st.grad;
      s.state_dtype = st.state;
      s.grad_multiplier = grad_multiplier;
      Buffer x(DType::f32, n, 0);
      cuda::matrix_prepare<A>(o, e, s, x.data(), DType::f32, nullptr);
      cuda::matrix_apply<A>(o, e, s, o_values.data(), DType::f32, nullptr);
      const typename A::Op op = A::make_op(o, 2);
      const float rate = op.rate(ref.view.rows, ref.view.cols);
      const std::string what = describe<A>(o) + ", " + st.name() + ", size " + std::to_string(n);
      for (std::size_t i = 0; i < n; ++i) {
        float sv[kMaxStates] = {};
        for (int k = 0; k < StateList<A>::count; ++k)
          if (A::has_state(o, k)) sv[k] = ref.states[static_cast<std::size_t>(k)].get(i);
        const float xi = op.prepare(ref.grad.get(i) * grad_multiplier, sv);
        ASSERT_EQ(std::memcmp(&xi, static_cast<const float*>(x.data()) + i, 4), 0)
            << what << ", X[" << i << "]";
        for (int k = 0; k < StateList<A>::count; ++k)
          if (A::has_state(o, k)) ref.states[static_cast<std::size_t>(k)].set(i, sv[k]);
        const float p =
            op.apply(st.master ? ref.master.get(i) : ref.param.get(i), o_values[i], rate);
        if (st.master) ref.master.set(i, p);
        ref.param.set(i, p);
      }
      EXPECT_TRUE(emu.param == ref.param)
          << what << ", param: " << first_byte_difference(emu.param, ref.param);
      EXPECT_TRUE(emu.master == ref.master) << what << ", master";
      for (int k = 0; k < StateList<A>::count; ++k) {
        const auto kk = static_cast<std::size_t>(k);
        if (A::has_state(o, k)) {
          EXPECT_TRUE(emu.states[kk] == ref.states[kk])
              << what << ", state " << k << ": "
              << first_byte_difference(emu.states[kk], ref.states[kk]);
        }
      }
    }
  }
}

template <class A>
void expect_matrix_kernels_match(std::mt19937_64& rng) {
  for (const auto& o : option_variants<A>())
    for (std::size_t n : kSizes)
      for (DType x_dtype : {DType::f32, DType::bf16})
        expect_matrix_passes_match_cpu<A>(o, n, {}, x_dtype, rng);
  const typename A::Options o = option_variants<A>().back();
  DeviceScalars d;
  d.counted_on_device = true;
  d.lr_factor = 0.375f;
  d.ema_decay = 0.999;
  d.pass_found_inf = true;
  for (std::size_t n : {5, 8193, 20011})
    expect_matrix_passes_match_cpu<A>(o, n, d, DType::f32, rng);
  d.ema_decay = 0.375;  // the EMA's other lerp branch
  for (std::size_t n : {5, 8193}) expect_matrix_passes_match_cpu<A>(o, n, d, DType::f32, rng);
  d.found_inf = 1.0f;  // a skipped step: nothing moves
  for (std::size_t n : {5, 8193}) expect_matrix_passes_match_cpu<A>(o, n, d, DType::f32, rng);
  expect_matrix_storages_match_reference<A>(rng);
}

// ------------------------- quantized states (q8, q4): against a per-block reference bytewise

/// One quantized state's buffer (quantize.hpp's contract: the codes, then the absmax per
/// block, 16-byte aligned), placed `offset` bytes into a 16-byte aligned allocation (offset 1
/// breaks the kernels' vector accesses of the codes). Poisoned where nothing writes.
class QuantBuffer {
 public:
  QuantBuffer(int bits, std::size_t n, std::size_t offset)
      : bits_(bits),
        n_(n),
        offset_(offset),
        storage_(
            static_cast<std::size_t>(quant_state_bytes(static_cast<std::int64_t>(n), bits)) + 32,
            0xA5) {}
  int bits() const { return bits_; }
  std::size_t size() const { return n_; }
  unsigned char* data() {
    const auto a = reinterpret_cast<std::uintptr_t>(storage_.data());
    return storage_.data() + (16 - a % 16) % 16 + offset_;
  }
  const unsigned char* data() const { return const_cast<QuantBuffer*>(this)->data(); }
  std::size_t bytes_size() const {
    return static_cast<std::size_t>(quant_state_bytes(static_cast<std::int64_t>(n_), bits_));
  }
  std::vector<unsigned char> bytes() const { return {data(), data() + bytes_size()}; }
  float absmax(std::size_t block) const {
    float a;
    std::memcpy(&a, data() + quant_absmax_offset(static_cast<std::int64_t>(n_), bits_) + 4 * block,
                4);
    return a;
  }
  /// Copies another buffer's contract bytes (the same bits and size).
  void assign(const QuantBuffer& o) { std::memcpy(data(), o.data(), bytes_size()); }

 private:
  int bits_;
  std::size_t n_, offset_;
  std::vector<unsigned char> storage_;
};

std::string first_quant_difference(const QuantBuffer& got, const QuantBuffer& want) {
  const auto a = got.bytes(), b = want.bytes();
  const auto n = static_cast<std::int64_t>(got.size());
  const auto offset = static_cast<std::size_t>(quant_absmax_offset(n, got.bits()));
  const auto codes = static_cast<std::size_t>(quant_code_bytes(n, got.bits()));
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i])
      return (i < offset ? (i < codes ? "code byte " : "padding byte ") + std::to_string(i)
                         : "absmax of block " + std::to_string((i - offset) / 4) + ": got " +
                               std::to_string(got.absmax((i - offset) / 4)) + ", want " +
                               std::to_string(want.absmax((i - offset) / 4))) +
             " of " + std::to_string(a.size()) + " bytes";
  return "equal";
}

/// Bytewise equal, except that any NaN equals any NaN: a NaN gradient's param is NaN on both
/// sides, but which NaN (sign, payload) x86 arithmetic gives depends on how the compiler
/// ordered the operands of a commutative operation (the GPU gives its canonical NaN). States
/// need no such allowance: a NaN block stores the canonical NaN absmax and code 0s.
bool equal_up_to_nans(const Buffer& a, const Buffer& b) {
  if (a.size() != b.size() || a.dtype() != b.dtype()) return false;
  const auto x = a.bytes(), y = b.bytes();
  const std::size_t w = dtype_size(a.dtype());
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(x.data() + i * w, y.data() + i * w, w) != 0 &&
        !(std::isnan(a.get(i)) && std::isnan(b.get(i))))
      return false;
  return true;
}

const QuantMap<8>& map8(bool non_negative) {
  return non_negative ? kQuantMap8Unsigned : kQuantMap8Signed;
}
const QuantMap<4>& map4(bool non_negative) {
  return non_negative ? kQuantMap4Unsigned : kQuantMap4Signed;
}

/// The serial form of a whole state's quantization to nearest: quantize_block8/4 per block,
/// and zeros in the padding between the codes and the absmax (every byte of the buffer is
/// written, as quantize_state and fill_quantized write it on both backends).
void quantize_reference(QuantBuffer& q, bool non_negative, const float* x) {
  const auto n = static_cast<std::int64_t>(q.size());
  const int bits = q.bits();
  const std::int64_t w = quant_block_size(bits);
  auto* const absmax = reinterpret_cast<float*>(q.data() + quant_absmax_offset(n, bits));
  std::memset(q.data() + quant_code_bytes(n, bits), 0,
              static_cast<std::size_t>(quant_absmax_offset(n, bits) - quant_code_bytes(n, bits)));
  for (std::int64_t b = 0; b < quant_blocks(n, bits); ++b) {
    const int nb = static_cast<int>(std::min(w, n - b * w));
    float a;
    if (bits == 8)
      a = quantize_block8(map8(non_negative), x + b * w, nb, q.data() + b * w, NearestRounding{});
    else
      a = quantize_block4(map4(non_negative), x + b * w, nb, q.data() + b * w / 2,
                          NearestRounding{});
    std::memcpy(absmax + b, &a, 4);
  }
}

/// The serial dequantization: dequantize_block8/4 per block.
std::vector<float> dequantize_reference(const QuantBuffer& q, bool non_negative) {
  const auto n = static_cast<std::int64_t>(q.size());
  const int bits = q.bits();
  const std::int64_t w = quant_block_size(bits);
  std::vector<float> out(q.size());
  for (std::int64_t b = 0; b < quant_blocks(n, bits); ++b) {
    const int nb = static_cast<int>(std::min(w, n - b * w));
    const float a = q.absmax(static_cast<std::size_t>(b));
    if (bits == 8)
      dequantize_block8(map8(non_negative), q.data() + b * w, nb, a, out.data() + b * w);
    else
      dequantize_block4(map4(non_negative), q.data() + b * w / 2, nb, a, out.data() + b * w);
  }
  return out;
}

/// What a step writes into a quantized state (quantize.hpp's state contract): per block, the
/// absmax of the new values (block_absmax), and each element's step_code with counter
/// 4i + 1 + k, packed as the layout says.
void write_state_reference(QuantBuffer& q, bool non_negative, const std::vector<float>& v, int k,
                           bool stochastic, std::uint64_t seed, std::uint64_t step) {
  const auto n = static_cast<std::int64_t>(q.size());
  const int bits = q.bits();
  const std::int64_t w = quant_block_size(bits);
  auto* const absmax = reinterpret_cast<float*>(q.data() + quant_absmax_offset(n, bits));
  std::memset(q.data(), 0, static_cast<std::size_t>(quant_code_bytes(n, bits)));
  for (std::int64_t b = 0; b < quant_blocks(n, bits); ++b) {
    const int nb = static_cast<int>(std::min(w, n - b * w));
    const float a = block_absmax(v.data() + b * w, nb);
    std::memcpy(absmax + b, &a, 4);
    for (std::int64_t i = b * w; i < b * w + nb; ++i) {
      const float y = normalized(v[static_cast<std::size_t>(i)], a);
      const auto counter = 4 * static_cast<std::uint64_t>(i) + 1 + static_cast<std::uint64_t>(k);
      if (bits == 8) {
        q.data()[i] = static_cast<unsigned char>(
            step_code(map8(non_negative), y, stochastic, seed, step, counter));
      } else {
        const int c = step_code(map4(non_negative), y, stochastic, seed, step, counter);
        q.data()[i / 2] |= static_cast<unsigned char>(c << (4 * (i % 2)));
      }
    }
  }
}

template <class A>
std::vector<bool> non_negative_states() {
  std::vector<bool> out(kMaxStates, false);
  for (int k = 0; k < StateList<A>::count; ++k)
    out[static_cast<std::size_t>(k)] = StateList<A>::non_negative(k);
  return out;
}

/// One tensor with quantized states: Tensor's param, grad and master (its f32 states unused),
/// and one QuantBuffer per state, holding the quantization of init + noise (of the state's
/// sign where it is non-negative, of either sign elsewhere). With `specials`, where the tensor
/// is large enough: block 1 has zero grads and zero states (an all-zero block when the step
/// keeps zeros at zero), and one gradient of block 3 is NaN.
struct QuantTensor {
  QuantTensor(const Storage& st, int bits, std::size_t n, std::mt19937_64& rng,
              const std::vector<float>& init, const std::vector<bool>& nonneg, bool specials)
      : base(st, n, rng, init) {
    const std::size_t w = static_cast<std::size_t>(quant_block_size(bits));
    const bool with_specials = specials && n >= 4 * w;
    if (with_specials) {
      for (std::size_t i = w; i < 2 * w; ++i) base.grad.set(i, 0.0f);
      base.grad.set(3 * w + 5, std::numeric_limits<float>::quiet_NaN());
    }
    for (int k = 0; k < kMaxStates; ++k) {
      const bool nn = nonneg[static_cast<std::size_t>(k)];
      // Misaligned: by 4 bytes, for the 8-byte code loads; a state's scales are floats, so its
      // buffer is float-aligned on every path that allocates one (16-byte in the library).
      states.emplace_back(bits, n, base.aligned ? 0 : 4);
      std::vector<float> s = random_floats(rng, n);
      for (float& x : s) x = init[static_cast<std::size_t>(k)] + (nn ? std::fabs(x) : x) * 0.1f;
      if (with_specials)
        for (std::size_t i = w; i < 2 * w; ++i) s[i] = 0.0f;
      quantize_reference(states.back(), nn, s.data());
    }
  }
  Tensor base;
  std::vector<QuantBuffer> states;
};

/// One QuantTensor of A's states (their inits under o, their maps) per size, with the
/// specials, twice: `emulated` for the kernel under test and `against` for what it is held
/// to, each pair from the same draws of rng; scalar states started (start_scalars) on both.
template <class A>
void make_quant_tensor_pairs(const typename A::Options& o, const Storage& st, int bits,
                             const std::vector<std::size_t>& sizes, std::mt19937_64& rng,
                             std::vector<QuantTensor>& emulated,
                             std::vector<QuantTensor>& against) {
  const std::vector<float> init = state_inits<A>(o);
  const std::vector<bool> nn = non_negative_states<A>();
  for (std::size_t n : sizes) {
    std::mt19937_64 copy = rng;
    emulated.emplace_back(st, bits, n, copy, init, nn, true);
    against.emplace_back(st, bits, n, rng, init, nn, true);
    start_scalars<A>(emulated.back().base);
    start_scalars<A>(against.back().base);
  }
}

template <class A>
cuda::ListEntry quant_entry_of(const typename A::Options& o, QuantTensor& t, std::int64_t step,
                               int key) {
  cuda::ListEntry e = entry_of<A>(o, t.base, step, key);
  for (int k = 0; k < kMaxStates; ++k)
    e.states[k] = k < StateList<A>::count && A::has_state(o, k)
                      ? t.states[static_cast<std::size_t>(k)].data()
                      : nullptr;
  return e;
}

/// One step of the per-block contract (quantize.hpp, multi_tensor.cuh): decode every state,
/// run the functor per element in fp32, store master and param as the elementwise step does,
/// then write each state per block.
template <class A>
void reference_quant_step(const typename A::Options& o, std::int64_t step, QuantTensor& q,
                          const Storage& st, std::uint64_t seed, int key, float grad_multiplier) {
  Tensor& t = q.base;
  double next[kMaxScalars] = {};
  const typename A::Op op = make_step_op<A>(o, step, t.scalars.data(), next);
  for (int k = 0; k < ScalarList<A>::count; ++k) t.scalars[static_cast<std::size_t>(k)] = next[k];
  const std::uint64_t key_seed =
      seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(key + 1));
  const auto has = [&](int k) { return k < StateList<A>::count && A::has_state(o, k); };
  const std::vector<bool> nn = non_negative_states<A>();
  std::vector<std::vector<float>> v(kMaxStates);
  for (int k = 0; k < kMaxStates; ++k)
    if (has(k))
      v[static_cast<std::size_t>(k)] = dequantize_reference(q.states[static_cast<std::size_t>(k)],
                                                            nn[static_cast<std::size_t>(k)]);
  for (std::size_t i = 0; i < t.param.size(); ++i) {
    float p = st.master ? t.master.get(i) : t.param.get(i);
    float s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = has(k) ? v[static_cast<std::size_t>(k)][i] : 0.0f;
    op(p, t.grad.get(i) * grad_multiplier, s);
    if (st.master) t.master.set(i, p);
    if (t.param.dtype() == DType::f32 || !st.stochastic) {
      t.param.set(i, p);
    } else {
      const std::uint32_t r = random_bits(key_seed, static_cast<std::uint64_t>(step), 4 * i);
      const std::uint16_t h = to_bf16_stochastic(p, r).bits;
      std::memcpy(static_cast<unsigned char*>(t.param.data()) + 2 * i, &h, 2);
    }
    for (int k = 0; k < kMaxStates; ++k)
      if (has(k)) v[static_cast<std::size_t>(k)][i] = s[k];
  }
  for (int k = 0; k < kMaxStates; ++k)
    if (has(k))
      write_state_reference(q.states[static_cast<std::size_t>(k)], nn[static_cast<std::size_t>(k)],
                            v[static_cast<std::size_t>(k)], k, st.stochastic, key_seed,
                            static_cast<std::uint64_t>(step));
}

/// Three steps of A with q8 and q4 states, f32 and bf16 params (bf16 with and without master
/// weights), to nearest and stochastic, over sizes around the quantization blocks and over two
/// chunks, through the emulated launcher against reference_quant_step; then a skipped step
/// (found_inf) that must write nothing. Params, masters and every state buffer bytewise.
template <class A>
void expect_quantized_states_match_reference(std::mt19937_64& rng) {
  const typename A::Options o = option_variants<A>().back();
  const std::vector<std::size_t> sizes = {0, 1, 127, 128, 129, 255, 256, 257, 8192 * 2 + 77};
  const float grad_multiplier = 0.5f;
  const std::uint64_t seed = rng();
  const std::vector<bool> nn = non_negative_states<A>();
  for (const DType q : {DType::q8, DType::q4})
    for (const DType param : {DType::f32, DType::bf16})
      for (const bool master : {false, true})
        for (const bool stochastic : {false, true}) {
          if (master && param == DType::f32) continue;
          const Storage st{param, param, DType::f32, master, stochastic};
          const int bits = q == DType::q8 ? 8 : 4;
          std::vector<QuantTensor> emu, ref;
          make_quant_tensor_pairs<A>(o, st, bits, sizes, rng, emu, ref);
          const std::string what = describe<A>(o) + ", " + st.name() + ", state " + dtype_name(q);
          for (std::int64_t step = 1; step <= 4; ++step) {
            const bool skipped = step == 4;
            std::vector<cuda::ListEntry> entries;
            for (std::size_t i = 0; i < emu.size(); ++i)
              entries.push_back(quant_entry_of<A>(o, emu[i], step, static_cast<int>(i)));
            cuda::ListSettings s;
            s.param_dtype = st.param;
            s.grad_dtype = st.grad;
            s.state_dtype = q;
            s.stochastic = stochastic;
            s.seed = seed;
            s.grad_multiplier = grad_multiplier;
            const float found_inf = 1.0f;
            if (skipped) s.d_found_inf = &found_inf;
            const std::vector<double> workspace = workspace_for<A>(s, entries);
            cuda::multi_tensor_step<A>(o, entries.data(), entries.size(),
                                       cuda::plan_list(entries.data(), entries.size()), s, nullptr);
            if (skipped) continue;  // nothing moves: the reference takes no step either
            for (std::size_t i = 0; i < ref.size(); ++i)
              reference_quant_step<A>(o, step, ref[i], st, seed, static_cast<int>(i),
                                      grad_multiplier);
          }
          for (std::size_t i = 0; i < sizes.size(); ++i) {
            EXPECT_TRUE(equal_up_to_nans(emu[i].base.param, ref[i].base.param))
                << what << ", size " << sizes[i]
                << ", param: " << first_byte_difference(emu[i].base.param, ref[i].base.param);
            if (master) {
              EXPECT_TRUE(equal_up_to_nans(emu[i].base.master, ref[i].base.master))
                  << what << ", size " << sizes[i] << ", master";
            }
            EXPECT_TRUE(same_bits(emu[i].base.scalars, ref[i].base.scalars))
                << what << ", size " << sizes[i] << ": scalar states";
            for (int k = 0; k < StateList<A>::count; ++k) {
              const auto kk = static_cast<std::size_t>(k);
              if (!A::has_state(o, k)) continue;
              EXPECT_TRUE(emu[i].states[kk].bytes() == ref[i].states[kk].bytes())
                  << what << ", size " << sizes[i] << ", state " << StateList<A>::name(k)
                  << (nn[kk] ? " (unsigned map)" : " (signed map)") << ": "
                  << first_quant_difference(emu[i].states[kk], ref[i].states[kk]);
            }
          }
        }
}

/// A trust-ratio, factored or matrix step, or one with a state that starts as a copy of the
/// weights (StateFromParam), refuses quantized states before anything moves: the param and
/// every state buffer keep their bytes.
template <class A>
void expect_quantized_states_refused(std::mt19937_64& rng) {
  const typename A::Options o{};
  const Storage f32{};
  for (const DType q : {DType::q8, DType::q4}) {
    QuantTensor t(f32, q == DType::q8 ? 8 : 4, 24, rng, state_inits<A>(o), non_negative_states<A>(),
                  false);
    t.base.view = MatrixView{2, 3, 4};
    const std::vector<unsigned char> before = t.base.param.bytes();
    std::vector<std::vector<unsigned char>> states_before;
    for (const QuantBuffer& b : t.states) states_before.push_back(b.bytes());
    std::vector<cuda::ListEntry> entries = {quant_entry_of<A>(o, t, 1, 0)};
    cuda::ListSettings s;
    s.state_dtype = q;
    const std::vector<double> workspace = workspace_for<A>(s, entries);
    try {
      cuda::multi_tensor_step<A>(o, entries.data(), 1, cuda::plan_list(entries.data(), 1), s,
                                 nullptr);
      ADD_FAILURE() << A::kName << ": a step over " << dtype_name(q) << " states ran";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::unsupported) << e.what();
      EXPECT_NE(std::string(e.what()).find(dtype_name(q)), std::string::npos) << e.what();
    }
    EXPECT_EQ(t.base.param.bytes(), before) << A::kName << ": the param moved";
    for (std::size_t k = 0; k < t.states.size(); ++k)
      EXPECT_EQ(t.states[k].bytes(), states_before[k]) << A::kName << ": state " << k << " moved";
  }
}

// ------------------------------------------------------------ one test case per algorithm

struct AlgorithmCase {
  const char* name;
  void (*options_f32)(std::mt19937_64&);
  void (*device_scalars)(std::mt19937_64&);
  void (*storages)(std::mt19937_64&);
  void (*many_tensors)(std::mt19937_64&);
  void (*sparse)(std::mt19937_64&);
  void (*sparse_quantized)(std::mt19937_64&);
  void (*ema)(std::mt19937_64&);
  void (*eval)(std::mt19937_64&);
  void (*quantized)(std::mt19937_64&);
};

template <class A>
AlgorithmCase make_elementwise_case(AlgorithmCase c);

template <class A>
AlgorithmCase make_case() {
  AlgorithmCase c;
  c.name = A::kName;
  if constexpr (MatrixCapable<A>::value) {
    // A matrix step needs cuBLAS: each whole-step case asserts the refusal; the kernels
    // around the iteration are EmulatedMatrixKernels' (below), bytewise against the CPU.
    c.options_f32 = c.device_scalars = c.storages = c.many_tensors =
        c.ema = [](std::mt19937_64& rng) { expect_matrix_step_unsupported<A>(rng); };
    c.sparse = c.sparse_quantized = [](std::mt19937_64&) {
      GTEST_SKIP() << A::kName << " takes no sparse steps";
    };
    c.eval = [](std::mt19937_64&) { GTEST_SKIP() << A::kName << " has one form of its params"; };
    c.quantized = [](std::mt19937_64& rng) { expect_quantized_states_refused<A>(rng); };
    return c;
  } else {
    return make_elementwise_case<A>(c);
  }
}

template <class A>
AlgorithmCase make_elementwise_case(AlgorithmCase c) {
  c.options_f32 = [](std::mt19937_64& rng) {
    for (const auto& o : option_variants<A>()) expect_f32_matches_cpu<A>(o, kSizes, {}, rng);
  };
  c.device_scalars = [](std::mt19937_64& rng) {
    const typename A::Options o = option_variants<A>().back();
    const std::vector<std::size_t> sizes = {0, 5, 8193, 3, 0, 20011};
    DeviceScalars d;
    d.counted_on_device = true;
    expect_f32_matches_cpu<A>(o, sizes, d, rng);  // capturable: steps on the device
    d.lr_factor = 0.375f;
    d.device_grad_multiplier = 0.5f;
    d.pass_found_inf = true;
    expect_f32_matches_cpu<A>(o, sizes, d, rng);  // and a schedule's lr, a loss scale
    d.found_inf = 1.0f;
    expect_f32_matches_cpu<A>(o, sizes, d, rng);  // a skipped step: nothing moves
    DeviceScalars lr_only;
    lr_only.lr_factor = 0.25f;
    expect_f32_matches_cpu<A>(o, sizes, lr_only, rng);  // host steps, device lr
    DeviceScalars mixed;
    mixed.mixed_host_steps = true;
    expect_f32_matches_cpu<A>(o, sizes, mixed, rng);  // host steps that differ: one
                                                      // functor per step
  };
  c.storages = [](std::mt19937_64& rng) { expect_storages_match_reference<A>(rng); };
  c.many_tensors = [](std::mt19937_64& rng) {
    // Over 256 tensors (the kernel's list): two launches, block offsets across them.
    std::vector<std::size_t> sizes;
    for (int i = 0; i < 300; ++i) sizes.push_back(rng() % 40);
    sizes[137] = 100003;
    expect_f32_matches_cpu<A>(typename A::Options{}, sizes, {}, rng);
  };
  c.sparse = [](std::mt19937_64& rng) { expect_sparse_kernels_match_cpu<A>(rng); };
  c.sparse_quantized = [](std::mt19937_64& rng) {
    expect_sparse_quant_kernels_match_reference<A>(rng);
  };
  c.eval = [](std::mt19937_64& rng) { expect_eval_matches<A>(rng); };
  c.quantized = [](std::mt19937_64& rng) {
    if constexpr (TrustRatioCapable<A>::value || FactoredCapable<A>::value ||
                  StateFromParam<A>::any())
      expect_quantized_states_refused<A>(rng);
    else if constexpr (StateList<A>::count == 0)
      GTEST_SKIP() << A::kName << " keeps no states";
    else
      expect_quantized_states_match_reference<A>(rng);
  };
  c.ema = [](std::mt19937_64& rng) {
    {
      // Every option combination with an EMA in torch's first lerp branch, then the other
      // branch under device-counted steps, a skipped step, and host steps that differ.
      DeviceScalars d;
      d.ema_decay = 0.999;
      for (const auto& o : option_variants<A>()) expect_f32_matches_cpu<A>(o, kSizes, d, rng);
      const typename A::Options o = option_variants<A>().back();
      const std::vector<std::size_t> sizes = {0, 5, 8193, 3, 1, 20011};
      d.ema_decay = 0.375;
      d.counted_on_device = true;
      d.lr_factor = 0.5f;
      expect_f32_matches_cpu<A>(o, sizes, d, rng);
      d.pass_found_inf = true;
      d.found_inf = 1.0f;
      expect_f32_matches_cpu<A>(o, sizes, d, rng);  // skipped: the EMA does not move either
      DeviceScalars mixed;
      mixed.mixed_host_steps = true;
      mixed.ema_decay = 0.9;
      expect_f32_matches_cpu<A>(o, sizes, mixed, rng);
    }
  };
  return c;
}

const std::vector<AlgorithmCase>& cases() {
  static const std::vector<AlgorithmCase> all = {
#define FO_CASE(A) make_case<fo::A>(),
      FO_FOR_EACH_DENSE_ALGORITHM(FO_CASE)
#undef FO_CASE
  };
  return all;
}

class EmulatedKernels : public ::testing::TestWithParam<int> {
 protected:
  const AlgorithmCase& algorithm() const { return cases()[static_cast<std::size_t>(GetParam())]; }
};

TEST_P(EmulatedKernels, EveryOptionCombinationMatchesCpuBitwise) {
  auto rng = make_rng();
  algorithm().options_f32(rng);
}

TEST_P(EmulatedKernels, DeviceCountedStepsLrFactorAndSkipsMatchCpuBitwise) {
  auto rng = make_rng();
  algorithm().device_scalars(rng);
}

TEST_P(EmulatedKernels, EveryStorageMatchesThePerElementContract) {
  auto rng = make_rng();
  algorithm().storages(rng);
}

TEST_P(EmulatedKernels, MoreTensorsThanOneLaunchHoldsMatchCpuBitwise) {
  auto rng = make_rng();
  algorithm().many_tensors(rng);
}

TEST_P(EmulatedKernels, WeightEmaMatchesCpuBitwise) {
  auto rng = make_rng();
  algorithm().ema(rng);
}

TEST_P(EmulatedKernels, SparseRowKernelsMatchCpuBitwise) {
  auto rng = make_rng();
  algorithm().sparse(rng);
}

TEST_P(EmulatedKernels, SparseRowKernelsOverQuantizedStatesMatchThePerBlockContract) {
  auto rng = make_rng();
  algorithm().sparse_quantized(rng);
}

TEST_P(EmulatedKernels, EvalFormMatchesThePerElementContractAndCpu) {
  auto rng = make_rng();
  algorithm().eval(rng);
}

TEST_P(EmulatedKernels, QuantizedStatesMatchThePerBlockContract) {
  auto rng = make_rng();
  algorithm().quantized(rng);
}

INSTANTIATE_TEST_SUITE_P(Every, EmulatedKernels,
                         ::testing::Range(0, static_cast<int>(cases().size())),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return std::string(cases()[static_cast<std::size_t>(p.param)].name);
                         });

template <class A>
void matrix_kernels_case(std::mt19937_64& rng, int& covered) {
  if constexpr (MatrixCapable<A>::value) {
    SCOPED_TRACE(A::kName);
    expect_matrix_kernels_match<A>(rng);
    ++covered;
  }
}

// The kernels around a matrix step's iteration, for every matrix algorithm (muon).
TEST(EmulatedMatrixKernels, PassesAroundTheIterationMatchCpuBitwise) {
  auto rng = make_rng();
  int covered = 0;
#define FO_MATRIX_CASE(A) matrix_kernels_case<fo::A>(rng, covered);
  FO_FOR_EACH_DENSE_ALGORITHM(FO_MATRIX_CASE)
#undef FO_MATRIX_CASE
  EXPECT_GT(covered, 0) << "no matrix algorithm is registered";
}

// ------------------------------------------------- the Newton-Schulz iteration's scale

/// cuda::newton_schulz_normalize (kernels/cuda/newton_schulz.cuh, through its launcher) against
/// the CPU's iteration with no steps (detail::newton_schulz_cpu, steps 0: out = G /
/// max(||G||_F, eps)), bytewise, for `batch` rows x cols matrices, the input `offset` elements
/// off 16-byte alignment (1-3: the sum's scalar loads) and the output poisoned first. A batch's
/// second matrix is all zeros (divisor eps). bf16: the input is bf16, the CPU gets its float
/// values, and X must be the CPU's X rounded to nearest.
void expect_ns_normalize_matches_cpu(DType dtype, std::int64_t batch, std::int64_t rows,
                                     std::int64_t cols, std::size_t offset, bool in_place,
                                     double eps, std::mt19937_64& rng) {
  const std::int64_t size = rows * cols;
  const auto n = static_cast<std::size_t>(batch * size);
  const std::string what = std::string(dtype_name(dtype)) + ", " + std::to_string(batch) + " x " +
                           std::to_string(rows) + " x " + std::to_string(cols) + ", offset " +
                           std::to_string(offset) + (in_place ? ", in place" : "") + ", eps " +
                           std::to_string(eps);
  std::vector<float> g = random_floats(rng, n);
  if (batch > 1) std::fill(g.begin() + size, g.begin() + 2 * size, 0.0f);
  Buffer in(dtype, n, offset), out(dtype, n, (offset + 1) % 4);
  in.fill_from(g);
  for (std::size_t i = 0; i < n; ++i) g[i] = in.get(i);  // what the CPU is given
  std::memset(out.data(), 0xFF, n * dtype_size(dtype));  // NaN in f32 and bf16
  Buffer& x = in_place ? in : out;
  // The partial sums the launcher is allowed, and one more that it must leave alone.
  const auto parts = static_cast<std::size_t>(cuda::ns_norm_partials(batch, size));
  std::vector<double> partials(parts + 1, std::numeric_limits<double>::quiet_NaN());
  cuda::newton_schulz_normalize(in.data(), x.data(), dtype, batch, size, eps, partials.data(),
                                nullptr);
  EXPECT_TRUE(std::isnan(partials[parts])) << what << ": wrote past its partial sums";
  // Each chunk's sum, every bit (X alone would rarely show a different order: the divisor is
  // a float).
  const std::int64_t chunks = sum_chunks(size);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t c = 0; c < chunks; ++c) {
      std::vector<double> acc(kSumRow, 0.0);
      const std::int64_t end = std::min(size, (c + 1) * kSumChunk);
      for (std::int64_t row = c * kSumChunk; row < end; row += kSumRow)
        add_squares(g.data() + b * size + row,
                    static_cast<int>(std::min<std::int64_t>(kSumRow, end - row)), acc.data());
      const double want = chunk_sum(acc.data());
      ASSERT_EQ(std::memcmp(&partials[static_cast<std::size_t>(b * chunks + c)], &want, 8), 0)
          << what << ": matrix " << b << ", chunk " << c;
    }

  std::vector<float> cpu(n, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> ws(
      static_cast<std::size_t>(detail::newton_schulz_cpu_workspace_floats(rows, cols)));
  detail::newton_schulz_cpu(g.data(), cpu.data(), batch, rows, cols, kNsDefaultCoefficients, 0, eps,
                            ws.data(), static_cast<std::int64_t>(ws.size()));
  Buffer want(dtype, n, 0);
  want.fill_from(cpu);  // bf16: rounded to nearest even
  EXPECT_TRUE(x == want) << what << ": " << first_byte_difference(x, want);
}

// The norm and scale before the iteration's GEMMs: sizes on both sides of a block (256), a
// round (1024) and a chunk (8192) of the shared order, batches, and one matrix of over 256
// chunks (their sums wrap around the lanes; the scale's 1024 blocks grid-stride).
TEST(EmulatedNewtonSchulz, ScaleMatchesTheCpuBitwise) {
  auto rng = make_rng();
  struct Shape {
    std::int64_t rows, cols;
  };
  const std::vector<Shape> shapes = {{0, 5},   {1, 1},    {1, 31},   {4, 8},    {3, 11},
                                     {15, 17}, {16, 16},  {257, 1},  {31, 33},  {32, 32},
                                     {25, 41}, {1, 8191}, {64, 128}, {3, 2731}, {1, 100003}};
  int k = 0;  // varies the input's alignment and in-place calls
  for (DType dtype : {DType::f32, DType::bf16}) {
    for (const Shape& s : shapes)
      for (std::int64_t batch : {1, 3}) {
        // (A batch of the largest: 1,200 emulated blocks more, for nothing new.)
        if (batch > 1 && s.rows * s.cols > 10000) continue;
        expect_ns_normalize_matches_cpu(dtype, batch, s.rows, s.cols, k % 4, k % 3 == 0,
                                        kNsDefaultEps, rng);
        ++k;
      }
    // eps above every norm: the divisor is eps.
    expect_ns_normalize_matches_cpu(dtype, 3, 9, 7, 0, false, 1e3, rng);
  }
  // Over 256 chunks (f32 only: 1,300 emulated blocks).
  expect_ns_normalize_matches_cpu(DType::f32, 1, 5, 421069, 1, false, kNsDefaultEps, rng);
  // No matrices: nothing is written.
  expect_ns_normalize_matches_cpu(DType::f32, 0, 4, 4, 0, false, kNsDefaultEps, rng);
}

// --------------------------------------------------------------------- the norm pass

double reference_sumsq(const std::vector<Buffer>& grads, float scale) {
  double sum = 0.0;
  for (const Buffer& g : grads)
    for (std::size_t i = 0; i < g.size(); ++i) {
      const double v = static_cast<double>(g.get(i) * scale);
      sum += v * v;
    }
  return sum;
}

TEST(EmulatedGradNorm, MatchesADoubleReferenceForEveryGradStorage) {
  auto rng = make_rng();
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    std::vector<Buffer> grads;
    std::vector<cuda::ListEntry> entries;
    // f32: more tensors than one launch holds (two launches, partials at an offset).
    const int count = dtype == DType::f32 ? 262 : 12;
    for (int i = 0; i < count; ++i) {
      const std::size_t n = i == 7 ? 20011 : 1 + rng() % 50;
      grads.emplace_back(dtype, n, rng() % 4);
      grads.back().fill_from(random_floats(rng, n));
    }
    for (auto& g : grads)
      entries.push_back(
          {nullptr, g.data(), nullptr, {}, static_cast<std::int64_t>(g.size()), 1, 0});
    const cuda::ListPlan plan = cuda::plan_list(entries.data(), entries.size());
    const float scale = 0.5f, device_scale = 0.25f, max_norm = 1.0f;
    std::vector<float> ws(static_cast<std::size_t>(cuda::grad_norm_workspace(plan)));
    float norm, clip, found_inf = 0.0f;
    std::memcpy(&norm, &kPoison, 4);
    std::memcpy(&clip, &kPoison, 4);
    cuda::grad_norm(entries.data(), plan, dtype, scale, &device_scale, max_norm, true, ws.data(),
                    &norm, &clip, &found_inf, nullptr);
    // The kernel sums float squares in double: the only roundings that matter are the final
    // sqrt's and the float conversion, so the norm is within 2 ulp of the exact one.
    const double want = std::sqrt(reference_sumsq(grads, scale * device_scale));
    EXPECT_NEAR(norm, want, 2.0 * want * std::numeric_limits<float>::epsilon())
        << dtype_name(dtype);
    EXPECT_EQ(clip, std::min(1.0f, max_norm / (norm + 1e-6f))) << dtype_name(dtype);
    EXPECT_EQ(found_inf, 0.0f);

    const std::size_t bad = grads.size() - 2;  // in the second launch, for f32
    grads[bad].set(grads[bad].size() / 2, dtype == DType::f32
                                              ? std::numeric_limits<float>::quiet_NaN()
                                              : std::numeric_limits<float>::infinity());
    cuda::grad_norm(entries.data(), plan, dtype, scale, &device_scale, 0.0f, true, ws.data(), &norm,
                    &clip, &found_inf, nullptr);
    EXPECT_EQ(found_inf, 1.0f) << dtype_name(dtype) << ": a non-finite gradient went unseen";
    EXPECT_EQ(clip, 1.0f) << "no clipping asked for";
  }
}

// The CPU optimizer sums in the CUDA pass's order: the norm, and so a clipped step, is
// bitwise the same (tensors of one chunk, of many, and empty; a loss scale).
TEST(EmulatedGradNorm, EqualsTheCpuOptimizersNormBitwise) {
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {20011, 1, 0, 8192, 300007, 33, 8193};
  std::vector<std::vector<float>> params, grads;
  Optimizer opt("sgd");
  opt.set_option("max_grad_norm", 1.0);
  opt.set_option("grad_scale", 4.0);
  std::vector<cuda::ListEntry> entries;
  std::vector<const void*> ptrs;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    params.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
    grads.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
    opt.add_param("p" + std::to_string(i), params.back().data(), DType::f32, {sizes[i]});
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    ptrs.push_back(grads[i].data());
    entries.push_back({nullptr, grads[i].data(), nullptr, {}, sizes[i], 1, 0});
  }
  const int saved_threads = cpu::num_threads();
  for (int threads : {1, 2, 3}) {
    cpu::set_num_threads(threads);
    opt.step(ptrs.data());
    const cuda::ListPlan plan = cuda::plan_list(entries.data(), entries.size());
    std::vector<float> ws(static_cast<std::size_t>(cuda::grad_norm_workspace(plan)));
    float norm, clip, found_inf = 0.0f;
    cuda::grad_norm(entries.data(), plan, DType::f32, 0.25f, nullptr, 1.0f, true, ws.data(), &norm,
                    &clip, &found_inf, nullptr);
    const float cpu_norm = opt.grad_norm();
    EXPECT_EQ(std::memcmp(&norm, &cpu_norm, 4), 0)
        << threads << " threads: emulated " << norm << ", CPU " << cpu_norm;
  }
  cpu::set_num_threads(saved_threads);
}

TEST(EmulatedGradNorm, NoElementsGiveNormZeroAndClipOne) {
  // The optimizer runs the pass even when every grad is null; it must write, not leave garbage.
  std::vector<float> ws(4);
  float norm, clip, found_inf = 0.0f;
  std::memcpy(&norm, &kPoison, 4);
  std::memcpy(&clip, &kPoison, 4);
  cuda::grad_norm(nullptr, cuda::plan_list(nullptr, 0), DType::f32, 1.0f, nullptr, 1.0f, true,
                  ws.data(), &norm, &clip, &found_inf, nullptr);
  EXPECT_EQ(norm, 0.0f);
  EXPECT_EQ(clip, 1.0f);
  EXPECT_EQ(found_inf, 0.0f);
}

// ------------------------------------------- quantized states: specials, conversions

// Adam, default options, with q8 and q4 states: a NaN gradient makes its block's stored absmax
// NaN in both moments (and only that block's), a block of zero gradients and zero moments keeps
// absmax 0, and the rest stays finite; all bytewise as the contract says.
TEST(EmulatedQuantizedStates, NanBlocksBecomeNanAndZeroBlocksStayZero) {
  auto rng = make_rng();
  const Adam::Options o{};
  const std::vector<bool> nn = non_negative_states<Adam>();
  for (const DType q : {DType::q8, DType::q4}) {
    const int bits = q == DType::q8 ? 8 : 4;
    const auto w = static_cast<std::size_t>(quant_block_size(bits));
    const std::size_t n = 6 * w + 3;
    const Storage st{};
    std::mt19937_64 copy = rng;
    QuantTensor emu(st, bits, n, copy, state_inits<Adam>(o), nn, true);
    QuantTensor ref(st, bits, n, rng, state_inits<Adam>(o), nn, true);
    std::vector<cuda::ListEntry> entries = {quant_entry_of<Adam>(o, emu, 1, 7)};
    cuda::ListSettings s;
    s.state_dtype = q;
    cuda::multi_tensor_step<Adam>(o, entries.data(), 1, cuda::plan_list(entries.data(), 1), s,
                                  nullptr);
    reference_quant_step<Adam>(o, 1, ref, st, 0, 7, 1.0f);
    for (int k = 0; k < 2; ++k) {
      const QuantBuffer& b = emu.states[static_cast<std::size_t>(k)];
      EXPECT_EQ(b.bytes(), ref.states[static_cast<std::size_t>(k)].bytes())
          << dtype_name(q) << ", state " << k << ": "
          << first_quant_difference(b, ref.states[static_cast<std::size_t>(k)]);
      for (std::size_t block = 0; block < 7; ++block) {
        const float a = b.absmax(block);
        if (block == 3)
          EXPECT_TRUE(std::isnan(a)) << dtype_name(q) << ", state " << k;
        else if (block == 1)
          EXPECT_EQ(a, 0.0f) << dtype_name(q) << ", state " << k;
        else
          EXPECT_TRUE(std::isfinite(a) && a > 0.0f)
              << dtype_name(q) << ", state " << k << ", " << a;
      }
    }
    EXPECT_TRUE(equal_up_to_nans(emu.base.param, ref.base.param))
        << first_byte_difference(emu.base.param, ref.base.param);
  }
}

// eval() over quantized states is refused, not misread.
TEST(EmulatedQuantizedStates, EvalOverQuantizedStatesIsRefused) {
  auto rng = make_rng();
  const AdamWScheduleFree::Options o{};
  const Storage st{};
  QuantTensor t(st, 8, 300, rng, state_inits<AdamWScheduleFree>(o),
                non_negative_states<AdamWScheduleFree>(), false);
  const std::vector<unsigned char> before = t.base.param.bytes();
  const cuda::ListEntry e = quant_entry_of<AdamWScheduleFree>(o, t, 1, 0);
  try {
    cuda::eval_params<AdamWScheduleFree>(o, e, DType::f32, DType::q8, nullptr);
    ADD_FAILURE() << "eval over q8 states ran";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), StatusCode::unsupported) << err.what();
  }
  EXPECT_EQ(t.base.param.bytes(), before);
}

// quantize_state, dequantize_state and fill_quantized against quantize_block8/4 and
// dequantize_block8/4 bytewise: sizes around the blocks, both maps, a NaN block and an
// all-zero block, values below an unsigned map's range, aligned and misaligned buffers.
TEST(EmulatedQuantizedStates, WholeTensorConversionsMatchTheSerialBlocks) {
  auto rng = make_rng();
  const std::vector<std::size_t> sizes = {0, 1, 3, 127, 128, 129, 255, 256, 257, 5000};
  for (const DType q : {DType::q8, DType::q4})
    for (const bool nn : {false, true})
      for (std::size_t n : sizes)
        for (const std::size_t offset : {0, 1}) {
          const int bits = q == DType::q8 ? 8 : 4;
          const auto w = static_cast<std::size_t>(quant_block_size(bits));
          const std::string what = std::string(dtype_name(q)) + (nn ? ", unsigned" : ", signed") +
                                   ", size " + std::to_string(n) + ", offset " +
                                   std::to_string(offset);
          std::vector<float> x = random_floats(rng, n);
          if (nn)
            for (std::size_t i = 0; i < n; i += 3) x[i] = std::fabs(x[i]);  // some below 0
          if (n > 2 * w) {
            for (std::size_t i = 0; i < w; ++i) x[w + i] = 0.0f;  // block 1: all zero
            x[5] = std::numeric_limits<float>::quiet_NaN();       // block 0: NaN
          }
          std::vector<float> src(n + 1);  // src.data() + offset: misaligned by a float
          std::copy(x.begin(), x.end(), src.begin() + static_cast<std::ptrdiff_t>(offset));
          QuantBuffer got(bits, n, 4 * offset), want(bits, n, 0);  // misaligned by a float
          quantize_reference(want, nn, x.data());
          const auto nn64 = static_cast<std::int64_t>(n);
          cuda::quantize_state(got.data(), q, nn, src.data() + offset, nn64, nullptr);
          EXPECT_EQ(got.bytes(), want.bytes())
              << what << ", quantize: " << first_quant_difference(got, want);
          if (n > 2 * w) {
            EXPECT_TRUE(std::isnan(got.absmax(0))) << what;
            EXPECT_EQ(got.absmax(1), 0.0f) << what;
          }

          std::vector<float> back(n + 1, -1.0f);
          cuda::dequantize_state(back.data() + offset, got.data(), q, nn, nn64, nullptr);
          const std::vector<float> want_back = dequantize_reference(want, nn);
          EXPECT_TRUE(bitwise_equal(
              std::vector<float>(back.begin() + static_cast<std::ptrdiff_t>(offset),
                                 back.begin() + static_cast<std::ptrdiff_t>(offset + n)),
              want_back))
              << what << ", dequantize";
          EXPECT_EQ(back[offset ? 0 : n], -1.0f) << what << ": dequantize wrote past its range";

          for (const float value : {0.0f, 0.1f, -3.5f}) {
            QuantBuffer filled(bits, n, 4 * offset), fill_want(bits, n, 0);
            const std::vector<float> constant(n, value);
            quantize_reference(fill_want, nn, constant.data());
            cuda::fill_quantized(filled.data(), q, nn, value, nn64, nullptr);
            EXPECT_EQ(filled.bytes(), fill_want.bytes())
                << what << ", fill " << value << ": " << first_quant_difference(filled, fill_want);
          }
        }
  // Another dtype is an invalid argument, not a misread buffer.
  float f = 0.0f;
  EXPECT_THROW(cuda::quantize_state(&f, DType::bf16, false, &f, 1, nullptr), Error);
  EXPECT_THROW(cuda::fill(&f, DType::q8, 0.0f, 1, nullptr), Error);
}

// quantize_state and fill_quantized on CUDA and on the CPU write the same bytes over the WHOLE
// buffer, the padding between the codes and the absmax included: a checkpoint saves the state
// bytewise, and the optimizer's first step creates its quantized states with fill_quantized on
// either backend. Both destinations are poisoned first, so a byte neither writes shows.
TEST(EmulatedQuantizedStates, WholeTensorConversionsEqualTheCpuBytewisePaddingIncluded) {
  auto rng = make_rng();
  const std::vector<std::size_t> sizes = {0, 1, 127, 128, 129, 255, 256, 257, 4097, 70001};
  for (const DType q : {DType::q8, DType::q4})
    for (const bool nn : {false, true})
      for (std::size_t n : sizes) {
        const int bits = q == DType::q8 ? 8 : 4;
        const auto nn64 = static_cast<std::int64_t>(n);
        const auto bytes = static_cast<std::size_t>(quant_state_bytes(nn64, bits));
        const std::string what = std::string(dtype_name(q)) + (nn ? ", unsigned" : ", signed") +
                                 ", size " + std::to_string(n);
        // 16-byte aligned, as the library allocates a state (an odd tail still exercises the
        // kernels' scalar paths).
        const auto poisoned = [&] {
          QuantBuffer b(bits, n, 0);
          std::memset(b.data(), 0xAB, bytes);
          return b;
        };
        const std::vector<float> x = random_floats(rng, n);
        QuantBuffer got = poisoned(), want = poisoned();
        cuda::quantize_state(got.data(), q, nn, x.data(), nn64, nullptr);
        cpu::quantize_state(want.data(), q, nn, x.data(), nn64);
        EXPECT_EQ(got.bytes(), want.bytes())
            << what << ", quantize: " << first_quant_difference(got, want);
        for (const float value : {0.0f, 0.1f, -3.5f}) {
          QuantBuffer filled = poisoned(), fill_want = poisoned();
          cuda::fill_quantized(filled.data(), q, nn, value, nn64, nullptr);
          cpu::fill_quantized(fill_want.data(), q, nn, value, nn64);
          EXPECT_EQ(filled.bytes(), fill_want.bytes())
              << what << ", fill " << value << ": " << first_quant_difference(filled, fill_want);
        }
        // The padding in particular: zero on both (the comparison above holds if neither
        // wrote it).
        const std::vector<unsigned char> b = got.bytes();
        for (auto i = static_cast<std::size_t>(quant_code_bytes(nn64, bits));
             i < static_cast<std::size_t>(quant_absmax_offset(nn64, bits)); ++i)
          EXPECT_EQ(b[i], 0) << what << ": padding byte " << i;
      }
}

/// The emulated CUDA step and the CPU backend's (fused_step with DenseTensors::state_dtype q8
/// or q4, through its storage layer) over the same tensors: every byte of param and states.
/// Rounding to nearest (each backend keys stochastic draws by its own param ids).
template <class A>
void expect_quantized_matches_cpu(std::mt19937_64& rng) {
  const typename A::Options o = option_variants<A>().back();
  const std::vector<std::size_t> sizes = {1, 127, 129, 257, 5000};
  for (const DType q : {DType::q8, DType::q4})
    for (const DType param : {DType::f32, DType::bf16}) {
      const Storage st{param, param, DType::f32, false, false};
      const int bits = q == DType::q8 ? 8 : 4;
      std::vector<QuantTensor> emu, cpu;
      make_quant_tensor_pairs<A>(o, st, bits, sizes, rng, emu, cpu);
      for (auto* ts : {&emu, &cpu})  // QuantTensor misaligns some codes: the CPU takes 16 bytes
        for (QuantTensor& t : *ts)
          for (int k = 0; k < kMaxStates; ++k) {
            QuantBuffer aligned(bits, t.base.param.size(), 0);
            aligned.assign(t.states[static_cast<std::size_t>(k)]);
            t.states[static_cast<std::size_t>(k)] = aligned;
          }
      const std::string what = describe<A>(o) + ", " + st.name() + ", state " + dtype_name(q);
      for (std::int64_t step = 1; step <= 2; ++step) {
        std::vector<cuda::ListEntry> entries;
        for (std::size_t i = 0; i < emu.size(); ++i)
          entries.push_back(quant_entry_of<A>(o, emu[i], step, static_cast<int>(i)));
        cuda::ListSettings s;
        s.param_dtype = s.grad_dtype = param;
        s.state_dtype = q;
        s.grad_multiplier = 0.5f;
        const std::vector<double> workspace = workspace_for<A>(s, entries);
        cuda::multi_tensor_step<A>(o, entries.data(), entries.size(),
                                   cuda::plan_list(entries.data(), entries.size()), s, nullptr);
        for (std::size_t i = 0; i < cpu.size(); ++i) {
          DenseTensors t;
          t.param = cpu[i].base.param.data();
          t.grad = cpu[i].base.grad.data();
          t.numel = static_cast<std::int64_t>(sizes[i]);
          t.param_dtype = t.grad_dtype = param;
          t.state_dtype = q;
          for (int k = 0; k < StateList<A>::count; ++k)
            if (A::has_state(o, k)) t.states[k] = cpu[i].states[static_cast<std::size_t>(k)].data();
          StepControls c;
          c.grad_multiplier = 0.5f;
          fused_step<A>(o, step, t, Exec{}, c);
        }
      }
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        EXPECT_TRUE(equal_up_to_nans(emu[i].base.param, cpu[i].base.param))
            << what << ", size " << sizes[i]
            << ", param: " << first_byte_difference(emu[i].base.param, cpu[i].base.param);
        for (int k = 0; k < StateList<A>::count; ++k) {
          const auto kk = static_cast<std::size_t>(k);
          if (!A::has_state(o, k)) continue;
          EXPECT_TRUE(emu[i].states[kk].bytes() == cpu[i].states[kk].bytes())
              << what << ", size " << sizes[i] << ", state " << StateList<A>::name(k) << ": "
              << first_quant_difference(emu[i].states[kk], cpu[i].states[kk]);
        }
      }
    }
}

// The emulated kernel against the CPU backend's quantized step, for the algorithms both take.
TEST(EmulatedQuantizedStates, EqualTheCpuBackendBytewise) {
  auto rng = make_rng();
  expect_quantized_matches_cpu<Adam>(rng);
  expect_quantized_matches_cpu<AdamW>(rng);
  expect_quantized_matches_cpu<Sgd>(rng);
  expect_quantized_matches_cpu<Adagrad>(rng);
  expect_quantized_matches_cpu<Rmsprop>(rng);
  expect_quantized_matches_cpu<Adadelta>(rng);
  expect_quantized_matches_cpu<Lion>(rng);
  expect_quantized_matches_cpu<Rprop>(rng);
  expect_quantized_matches_cpu<Adamax>(rng);
  expect_quantized_matches_cpu<NAdam>(rng);
  expect_quantized_matches_cpu<RAdam>(rng);
  expect_quantized_matches_cpu<AdEMAMix>(rng);
  expect_quantized_matches_cpu<LazyAdam>(rng);
}

// --------------------------------------------------- fills, widenings, schedule, indices

TEST(EmulatedHelpers, FillAndWidenRoundAsTheHostDoes) {
  auto rng = make_rng();
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const std::size_t n = 70001;  // past the grid's stride
    Buffer b(dtype, n, 1), want(dtype, n, 0);
    cuda::fill(b.data(), dtype, 0.1f, static_cast<std::int64_t>(n), nullptr);
    for (std::size_t i = 0; i < n; ++i) want.set(i, 0.1f);
    EXPECT_TRUE(b.bytes() == want.bytes()) << dtype_name(dtype);
    const std::vector<float> v = random_floats(rng, n);
    b.fill_from(v);
    std::vector<float> wide(n);
    cuda::widen(wide.data(), b.data(), dtype, static_cast<std::int64_t>(n), nullptr);
    for (std::size_t i = 0; i < n; i += 997) ASSERT_EQ(wide[i], b.get(i)) << dtype_name(dtype);
  }
}

// swap_ema and copy_ema_to_params on CUDA: an exchange of two f32 buffers, and f32 rounded to
// nearest into the param's storage (a copy for f32).
TEST(EmulatedHelpers, NarrowRoundsToNearestAndSwapExchangesBitwise) {
  auto rng = make_rng();
  const std::size_t n = 70001;
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const std::vector<float> v = random_floats(rng, n);
    Buffer got(dtype, n, 1), want(dtype, n, 0);
    for (std::size_t i = 0; i < n; ++i) got.set(i, -7.0f);
    want.fill_from(v);  // Buffer::set rounds to nearest even
    cuda::narrow(got.data(), dtype, v.data(), static_cast<std::int64_t>(n), nullptr);
    EXPECT_TRUE(got == want) << dtype_name(dtype) << ": " << first_byte_difference(got, want);
  }
  std::vector<float> a = random_floats(rng, n), b = random_floats(rng, n);
  const std::vector<float> a0 = a, b0 = b;
  cuda::swap(a.data(), b.data(), static_cast<std::int64_t>(n), nullptr);
  EXPECT_TRUE(bitwise_equal(a, b0) && bitwise_equal(b, a0));
}

TEST(EmulatedHelpers, ScheduleKernelGivesTheHostsLr) {
  for (int kind = 0; kind <= static_cast<int>(ScheduleKind::one_cycle); ++kind) {
    Schedule s{};
    s.kind = static_cast<ScheduleKind>(kind);
    s.lr = 0.1;
    s.total = 100;
    s.warmup = 10;
    s.step_size = 7;
    s.max_lr = 0.5;
    s.min_lr = 0.01;
    for (std::int64_t taken :
         {std::int64_t{0}, std::int64_t{5}, std::int64_t{57}, std::int64_t{250}}) {
      float lr;
      std::memcpy(&lr, &kPoison, 4);
      cuda::schedule_to_device(s, &taken, &lr, nullptr);
      EXPECT_EQ(lr, static_cast<float>(schedule_lr(s, taken + 1))) << "kind " << kind;
    }
  }
}

TEST(EmulatedHelpers, IndexValidationFindsTheFirstBadIndex) {
  auto rng = make_rng();
  for (int trial = 0; trial < 4; ++trial) {
    std::vector<std::int64_t> idx(3001);
    for (auto& i : idx) i = static_cast<std::int64_t>(rng() % 100);
    if (trial > 0) idx[rng() % idx.size()] = trial == 1 ? -1 : 100;
    if (trial == 3) idx[2999] = 1000;
    detail::SparseStep s{};
    s.rows = 100;
    s.indices = idx.data();
    s.index_dtype = DType::i64;
    s.nnz = static_cast<std::int64_t>(idx.size());
    unsigned long long first = ~0ull;
    cuda::launch_first_bad_index(s, &first, nullptr);
    const std::int64_t want = cpu::sparse_first_bad_index(s);
    EXPECT_EQ(first == ~0ull ? -1 : static_cast<std::int64_t>(first), want) << "trial " << trial;
  }
}

TEST(EmulatedHelpers, IotaCountsPastTheGridsStride) {
  std::vector<cuda::SparsePos> out(70001);
  std::fill(out.begin(), out.end(), -1);
  cuda::launch_iota(out.data(), static_cast<std::int64_t>(out.size()), nullptr);
  for (std::size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<int>(i));
}

TEST(EmulatedHelpers, TrafficProbeTouchesExactlyItsStreams) {
  // The probe's functor (kernels/probe.hpp): p += g and each present state += g, through
  // the step kernel and its launcher; absent states are never touched.
  auto rng = make_rng();
  for (std::size_t n : {std::size_t{5}, std::size_t{8193}}) {
    const std::vector<float> g = random_floats(rng, n), p0 = random_floats(rng, n);
    std::vector<float> p = p0, s0 = p0, s2 = p0;
    cuda::ListEntry e{
        p.data(), g.data(), nullptr, {s0.data(), nullptr, s2.data()}, static_cast<std::int64_t>(n),
        1,        0};
    cuda::traffic_probe(&e, 1, nullptr);
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(p[i], p0[i] + g[i]);
      ASSERT_EQ(s0[i], p0[i] + g[i]);
      ASSERT_EQ(s2[i], p0[i] + g[i]);
    }
  }
}

// ------------------------------------------------------------------------ launch errors

TEST(EmulatedLaunches, AStaleErrorIsReportedOnceNotForever) {
  // A failed runtime call elsewhere (the user's, or an out-of-memory the caller retries)
  // leaves a last error. The next launch check reports it, and clears it: the launch after
  // that must succeed. (cudaPeekAtLastError would report it on every launch from then on.)
  std::vector<float> v(64);
  fo::emu::tl_last_error = cudaErrorMemoryAllocation;
  EXPECT_THROW(cuda::fill(v.data(), DType::f32, 1.0f, 64, nullptr), Error);
  EXPECT_NO_THROW(cuda::fill(v.data(), DType::f32, 2.0f, 64, nullptr));
  EXPECT_EQ(v[63], 2.0f);
}

}  // namespace
}  // namespace fo::test
