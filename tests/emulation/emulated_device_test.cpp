// The library's CUDA host code on the emulated device (fusedopt_emulated_device_test;
// docs/host-emulation.md), where the existing tests have no CUDA case: the stateless layer's
// CUDA branch against the CPU, device-side scalars and device step counts through
// fo::Optimizer against the CPU, and failed device allocations (which the emulated device
// can make happen at will) changing nothing. Every device allocation is freed by the end of
// every test (checked for the whole binary).
//
// Equal bits are expected wherever the CPU and CUDA paths do the same float operations in
// the same order (emulation_test holds every kernel to that).
#include "emulation/emulated_device.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

// Every test's device allocations are gone at its end: the library's buffers and the tests'.
class NoDeviceMemoryLeft : public ::testing::Environment {
 public:
  void TearDown() override {
    EXPECT_EQ(emulated_device::live_allocations(), 0u) << "device memory was not freed";
  }
};
const auto* const kNoDeviceMemoryLeft = ::testing::AddGlobalTestEnvironment(new NoDeviceMemoryLeft);

std::vector<std::string> algorithm_names() {
  std::vector<std::string> names;
  for (const auto& a : dense_algorithms()) names.push_back(a.name);
  return names;
}

std::vector<float> doubles_as_floats(const std::vector<double>& d) {
  std::vector<float> f(d.size() * 2);
  std::memcpy(f.data(), d.data(), d.size() * sizeof(double));
  return f;
}

// ------------------------------------------------------------------- the stateless layer

/// The buffers of fused_step_list over `sizes` on one device: params, grads, every state the
/// options use (at its initial value, or the param), a weight EMA and the scalar states.
struct ListBuffers {
  ListBuffers(Device d, const std::string& algorithm, const NamedOptions& options,
              const std::vector<std::vector<float>>& params)
      : device(d), specs(step_states(algorithm, options)), scalar_specs(step_scalars(algorithm)) {
    for (const auto& a : dense_algorithms())
      matrix_only = matrix_only || (a.name == algorithm && a.matrix_only);
    for (const auto& p : params) {
      param.push_back(std::make_unique<TestTensor>(d, p));
      ema.push_back(std::make_unique<TestTensor>(d, p));
      std::vector<std::unique_ptr<TestTensor>> s;
      for (const StateSpec& spec : specs)
        s.push_back(std::make_unique<TestTensor>(
            d, spec.from_param ? p : std::vector<float>(p.size(), static_cast<float>(spec.init))));
      states.push_back(std::move(s));
      std::vector<double> init(kMaxScalars, 0.0);
      for (std::size_t k = 0; k < scalar_specs.size(); ++k) init[k] = scalar_specs[k].init;
      scalars.push_back(std::make_unique<TestTensor>(d, doubles_as_floats(init)));
    }
  }
  std::vector<DenseTensors> tensors(const std::vector<std::unique_ptr<TestTensor>>& grads) {
    std::vector<DenseTensors> ts(param.size());
    for (std::size_t i = 0; i < ts.size(); ++i) {
      ts[i].param = param[i]->data();
      ts[i].grad = grads[i]->data();
      ts[i].numel = param[i]->size();
      ts[i].ema = ema[i]->data();
      for (std::size_t k = 0; k < specs.size(); ++k)
        ts[i].states[specs[k].index] = states[i][k]->data();
      if (!scalar_specs.empty()) ts[i].scalars = reinterpret_cast<double*>(scalars[i]->data());
      if (matrix_only) ts[i].view = MatrixView{1, 1, ts[i].numel};  // one row
    }
    return ts;
  }
  /// Every buffer's values, guards checked.
  std::vector<std::vector<float>> everything() const {
    std::vector<std::vector<float>> all;
    auto add = [&](const TestTensor& t) {
      EXPECT_TRUE(t.guards_intact());
      all.push_back(t.values());
    };
    for (std::size_t i = 0; i < param.size(); ++i) {
      add(*param[i]);
      add(*ema[i]);
      for (const auto& s : states[i]) add(*s);
      add(*scalars[i]);
    }
    return all;
  }
  Device device;
  bool matrix_only = false;  // muon: each tensor is viewed as one row [1, numel]
  std::vector<StateSpec> specs;
  std::vector<ScalarSpec> scalar_specs;
  std::vector<std::unique_ptr<TestTensor>> param, ema, scalars;
  std::vector<std::vector<std::unique_ptr<TestTensor>>> states;
};

class EmulatedFunctional : public ::testing::TestWithParam<std::string> {};

// Three steps of a list (an empty tensor, a short one and one of many vectors; at different
// step counts, so that the device groups them) with a gradient multiplier and a weight EMA,
// then the evaluation form where the algorithm has one: the device's buffers equal the CPU's
// bitwise. A trust-ratio algorithm takes its workspace from the stream-ordered allocator.
TEST_P(EmulatedFunctional, ListStepsEqualTheCpu) {
  const std::string algorithm = GetParam();
  auto rng = make_rng();
  const NamedOptions options = ref::richest_options(algorithm);
  const std::vector<std::int64_t> sizes = {0, 5, 1031};
  std::vector<std::vector<float>> p0;
  for (std::int64_t n : sizes) p0.push_back(random_floats(rng, static_cast<std::size_t>(n)));
  ListBuffers cpu(Device::cpu, algorithm, options, p0), gpu(Device::cuda, algorithm, options, p0);
  StepControls controls;
  controls.grad_multiplier = 0.5f;
  controls.ema_decay = 0.9;
  std::vector<std::int64_t> steps = {1, 3, 1};
  for (int t = 0; t < 3; ++t) {
    std::vector<std::unique_ptr<TestTensor>> cpu_g, gpu_g;
    for (std::int64_t n : sizes) {
      const std::vector<float> g = random_floats(rng, static_cast<std::size_t>(n));
      cpu_g.push_back(std::make_unique<TestTensor>(Device::cpu, g));
      gpu_g.push_back(std::make_unique<TestTensor>(Device::cuda, g));
    }
    const std::vector<DenseTensors> c = cpu.tensors(cpu_g), g = gpu.tensors(gpu_g);
    if (gpu.matrix_only) {
      // The emulated device has no cuBLAS, so a matrix step's Newton-Schulz iteration cannot
      // run here: the step must be refused as such before any kernel, nothing changed. (Its
      // two elementwise kernels are emulation_test's EmulatedMatrixKernels, bytewise against
      // the CPU with a fixed iteration output; the whole step is the GPU suite's.)
      const auto before = gpu.everything();
      try {
        fused_step_list(algorithm, options, g.data(), steps.data(), g.size(), {Device::cuda},
                        controls);
        ADD_FAILURE() << algorithm << " stepped on the emulated device, which has no cuBLAS";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), StatusCode::unsupported) << e.what();
        EXPECT_NE(std::string(e.what()).find("cuBLAS"), std::string::npos) << e.what();
      }
      expect_same(gpu.everything(), before, "a step refused for want of cuBLAS");
      fused_step_list(algorithm, options, c.data(), steps.data(), c.size(), {}, controls);
      return;
    }
    fused_step_list(algorithm, options, c.data(), steps.data(), c.size(), {}, controls);
    fused_step_list(algorithm, options, g.data(), steps.data(), g.size(), {Device::cuda}, controls);
    expect_same(gpu.everything(), cpu.everything(), "step " + std::to_string(t + 1));
    for (auto& s : steps) ++s;
  }
  bool eval = false;
  for (const auto& a : dense_algorithms()) eval = eval || (a.name == algorithm && a.eval);
  if (eval) {
    std::vector<std::unique_ptr<TestTensor>> none_c, none_g;
    for (std::int64_t n : sizes) {
      none_c.push_back(std::make_unique<TestTensor>(Device::cpu, std::vector<float>(n)));
      none_g.push_back(std::make_unique<TestTensor>(Device::cuda, std::vector<float>(n)));
    }
    std::vector<DenseTensors> c = cpu.tensors(none_c), g = gpu.tensors(none_g);
    for (auto* list : {&c, &g})
      for (DenseTensors& x : *list) x.ema = nullptr;
    eval_params(algorithm, options, c.data(), c.size());
    eval_params(algorithm, options, g.data(), g.size(), {Device::cuda});
    expect_same(gpu.everything(), cpu.everything(), "eval_params");
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, EmulatedFunctional, ::testing::ValuesIn(algorithm_names()),
                         [](const auto& param_info) { return param_info.param; });

// -------------------------------------------------------------------- the optimizer objects

/// Params on one device in an optimizer, and everything it holds as floats.
struct Model {
  Model(Device d, const std::string& algorithm, const std::vector<std::vector<float>>& p0)
      : device(d), opt(algorithm, d) {
    for (const auto& [k, v] : ref::richest_options(algorithm)) opt.set_option(k, v);
    for (const auto& p : p0) add(p);
  }
  void add(const std::vector<float>& values) {
    params.push_back(std::make_unique<TestTensor>(device, values));
    opt.add_param("p" + std::to_string(params.size() - 1), params.back()->data(), DType::f32,
                  {params.back()->size()});
  }
  /// One step; a null entry in `grads` leaves that param out.
  void step(const std::vector<const std::vector<float>*>& grads) {
    std::vector<std::unique_ptr<TestTensor>> g;
    std::vector<const void*> ptrs;
    for (const auto* v : grads) {
      g.push_back(v ? std::make_unique<TestTensor>(device, *v) : nullptr);
      ptrs.push_back(v ? g.back()->data() : nullptr);
    }
    opt.step(ptrs.data());
  }
  std::vector<std::vector<float>> everything() const {
    std::vector<std::vector<float>> all;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string name = opt.param_name(i);
      EXPECT_TRUE(params[i]->guards_intact());
      all.push_back(params[i]->values());
      for (const auto& s : opt.state_names(name)) all.push_back(opt.state(name, s));
      all.push_back({static_cast<float>(opt.step_count(name))});
      for (const auto& a : dense_algorithms())
        if (a.name == opt.algorithm())
          for (const auto& s : a.scalars)
            all.push_back(doubles_as_floats({opt.scalar_state(name, s)}));
    }
    return all;
  }
  Device device;
  std::vector<std::unique_ptr<TestTensor>> params;
  Optimizer opt;
};

// Params added after steps (the device's step counts grow and keep theirs), steps that leave
// some params out, clipping, the non-finite check (a skipped step) and a loss scale, for an
// algorithm of each kind: every buffer, count and scalar state equals the CPU's bitwise.
TEST(EmulatedOptimizer, DeviceStepCountsAndSettingsEqualTheCpu) {
  for (const std::string algorithm : {"adam", "lamb", "adamw_schedule_free"}) {
    SCOPED_TRACE(algorithm);
    auto rng = make_rng(algorithm);
    std::vector<std::vector<float>> p0 = {random_floats(rng, 37), random_floats(rng, 0)};
    Model cpu(Device::cpu, algorithm, p0), gpu(Device::cuda, algorithm, p0);
    for (Model* m : {&cpu, &gpu}) {
      m->opt.set_option("max_grad_norm", 1.0);
      m->opt.set_option("skip_nonfinite", 1);
      m->opt.set_option("grad_scale", 8);
      m->opt.set_option("ema_decay", 0.99);
    }
    auto step_both = [&](const std::vector<bool>& stepping, bool bad) {
      std::vector<std::vector<float>> g;
      for (std::size_t i = 0; i < cpu.params.size(); ++i)
        g.push_back(random_floats(rng, static_cast<std::size_t>(cpu.params[i]->size())));
      if (bad) g[0][3] = std::nanf("");
      std::vector<const std::vector<float>*> ptrs;
      for (std::size_t i = 0; i < g.size(); ++i) ptrs.push_back(stepping[i] ? &g[i] : nullptr);
      cpu.step(ptrs);
      gpu.step(ptrs);
      const float gn = gpu.opt.grad_norm(), cn = cpu.opt.grad_norm();
      EXPECT_TRUE(std::isnan(cn) ? std::isnan(gn) : gn == cn) << gn << " vs " << cn;
    };
    step_both({true, true}, false);
    for (Model* m : {&cpu, &gpu}) m->opt.set_param_option("p1", "lr", 0.003);  // its own group
    step_both({true, false}, false);
    step_both({true, true}, true);  // skipped
    // 20 more params: past the 16 device step counts the first step made room for.
    for (int i = 0; i < 20; ++i) {
      const std::vector<float> p = random_floats(rng, static_cast<std::size_t>(1 + i * 7));
      cpu.add(p);
      gpu.add(p);
    }
    std::vector<bool> all(cpu.params.size(), true), some(cpu.params.size(), false);
    for (std::size_t i = 0; i < some.size(); i += 3) some[i] = true;
    step_both(all, false);
    for (Model* m : {&cpu, &gpu}) {
      m->opt.set_param_option("p1", "lr", m->opt.option("lr"));  // back with the others
      m->opt.set_param_option("p5", "weight_decay", 0.25);
    }
    step_both(some, false);
    expect_same(gpu.everything(), cpu.everything(), algorithm);
    EXPECT_EQ(gpu.opt.step_count("p0"), 4);
    EXPECT_EQ(gpu.opt.step_count("p1"), 2);
    EXPECT_EQ(gpu.opt.step_count("p3"), 2);
    EXPECT_EQ(gpu.opt.step_count("p4"), 1);
  }
}

// The weight EMA of float32 params on the device: swap_ema exchanges params and EMAs bitwise
// (twice: back), copy_ema_to_params copies, as on the CPU.
TEST(EmulatedOptimizer, EmaSwapAndCopyEqualTheCpu) {
  auto rng = make_rng();
  const std::vector<std::vector<float>> p0 = {random_floats(rng, 300), random_floats(rng, 0),
                                              random_floats(rng, 5)};
  Model cpu(Device::cpu, "adamw", p0), gpu(Device::cuda, "adamw", p0);
  const std::vector<float> idle = random_floats(rng, 7);  // never steps: no EMA buffer
  for (Model* m : {&cpu, &gpu}) {
    m->opt.set_option("ema_decay", 0.8);
    m->add(idle);
  }
  for (int t = 0; t < 3; ++t) {
    const std::vector<std::vector<float>> g = {random_floats(rng, 300), {}, random_floats(rng, 5)};
    cpu.step({&g[0], &g[1], &g[2], nullptr});
    gpu.step({&g[0], &g[1], &g[2], nullptr});
  }
  const auto trained = gpu.everything();
  for (Model* m : {&cpu, &gpu}) m->opt.swap_ema();
  expect_same(gpu.everything(), cpu.everything(), "swapped");
  for (Model* m : {&cpu, &gpu}) m->opt.swap_ema();
  expect_same(gpu.everything(), trained, "swapped back");
  for (Model* m : {&cpu, &gpu}) m->opt.copy_ema_to_params();
  expect_same(gpu.everything(), cpu.everything(), "copied");
}

// set_device_scalars: the lr factor, the gradient multiplier and found_inf read from device
// memory. A device lr of 2 lr' under an lr option of 0.5 is lr' exactly, and a multiplier of
// 1/4 is a grad_scale of 4: the CPU with those takes the same steps; found_inf = 1 skips one.
TEST(EmulatedOptimizer, DeviceScalarsEqualTheHostSettings) {
  for (const std::string algorithm : {"adamw", "sgd_schedule_free"}) {
    SCOPED_TRACE(algorithm);
    auto rng = make_rng(algorithm);
    const std::vector<std::vector<float>> p0 = {random_floats(rng, 1000), random_floats(rng, 3)};
    Model cpu(Device::cpu, algorithm, p0), gpu(Device::cuda, algorithm, p0);
    const float lr = 0.01f;
    cpu.opt.set_option("lr", lr);
    cpu.opt.set_option("grad_scale", 4);
    gpu.opt.set_option("lr", 0.5);
    TestTensor d_lr(Device::cuda, {2 * lr}), d_mult(Device::cuda, {0.25f}),
        d_inf(Device::cuda, {0.0f}), d_inf_set(Device::cuda, {1.0f});
    for (int t = 0; t < 4; ++t) {
      std::vector<std::vector<float>> g = {random_floats(rng, 1000), random_floats(rng, 3)};
      const bool skip = t == 2;
      gpu.opt.set_device_scalars(d_lr.data(), d_mult.data(),
                                 skip ? d_inf_set.data() : d_inf.data());
      gpu.step({&g[0], &g[1]});
      if (!skip) cpu.step({&g[0], &g[1]});
    }
    expect_same(gpu.everything(), cpu.everything(), algorithm);
    EXPECT_EQ(gpu.opt.step_count("p0"), 3);
    gpu.opt.set_device_scalars(nullptr, nullptr, nullptr);
  }
}

/// n elements of T in the emulated device's memory, from and back to the host.
template <class T>
class DeviceVector {
 public:
  explicit DeviceVector(const std::vector<T>& host)
      : n_(host.size()), p_(static_cast<T*>(cuda::allocate(n_ * sizeof(T), 0))) {
    cuda::copy_from_host(p_, host.data(), n_ * sizeof(T), nullptr);
  }
  ~DeviceVector() { cuda::deallocate(p_, 0); }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;
  T* get() const { return p_; }
  std::vector<T> host() const {
    std::vector<T> h(n_);
    cuda::copy_to_host(h.data(), p_, n_ * sizeof(T));
    return h;
  }

 private:
  std::size_t n_;
  T* p_;
};

// bf16 params with master weights under Schedule-Free on the device: eval() writes x into the
// param and the master weights, train() puts both back bitwise; a checkpoint saved in eval
// mode loads (over the params the user saved with it: x) into eval mode, and after train()
// both optimizers hold the same params, master weights and states and take the same step.
TEST(EmulatedOptimizer, Bf16ParamsEvalTrainAndACheckpointInEvalMode) {
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {1000, 3, 0};
  std::vector<std::unique_ptr<DeviceVector<bf16>>> params;
  std::vector<std::unique_ptr<TestTensor>> grads;
  Optimizer opt("adamw_schedule_free", Device::cuda);
  opt.set_option("master_weights", 1);
  opt.set_option("fp32_grads", 1);
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::vector<bf16> p;
    for (float x : random_floats(rng, static_cast<std::size_t>(sizes[i]))) p.push_back(to_bf16(x));
    params.push_back(std::make_unique<DeviceVector<bf16>>(p));
    opt.add_param("p" + std::to_string(i), params.back()->get(), DType::bf16, {sizes[i]});
  }
  auto step = [&](Optimizer& o) {
    std::vector<std::unique_ptr<TestTensor>> g;
    std::vector<const void*> ptrs;
    for (std::int64_t n : sizes) {
      g.push_back(std::make_unique<TestTensor>(Device::cuda,
                                               random_floats(rng, static_cast<std::size_t>(n))));
      ptrs.push_back(g.back()->data());
    }
    o.step(ptrs.data());
  };
  auto holdings = [&](const Optimizer& o,
                      const std::vector<std::unique_ptr<DeviceVector<bf16>>>& ps) {
    std::vector<std::vector<float>> all;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      for (const auto& s : o.state_names(name)) all.push_back(o.state(name, s));
      for (const char* s : {"lr_max", "weight_sum"})
        all.push_back(doubles_as_floats({o.scalar_state(name, s)}));
      all.push_back({static_cast<float>(o.step_count(name))});
      std::vector<float> wide;
      for (bf16 x : ps[i]->host()) wide.push_back(to_float(x));
      all.push_back(wide);
    }
    return all;
  };
  for (int t = 0; t < 3; ++t) step(opt);
  const auto trained = holdings(opt, params);
  opt.eval();
  const auto evaluated = holdings(opt, params);
  std::size_t moved = 0;  // x differs from y (where the states are not all equal)
  for (std::size_t i = 0; i < trained.size(); ++i)
    moved += !bitwise_equal(trained[i], evaluated[i]);
  EXPECT_GT(moved, 0u);
  const std::string path =
      ::testing::TempDir() + "fusedopt_emulated_bf16_" + std::to_string(::getpid()) + ".ckpt";
  opt.save(path);
  opt.train();
  expect_same(holdings(opt, params), trained, "train() after eval()");

  std::vector<std::unique_ptr<DeviceVector<bf16>>> params2;  // the params saved: x
  Optimizer loaded("adamw_schedule_free", Device::cuda);
  opt.eval();
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    params2.push_back(std::make_unique<DeviceVector<bf16>>(params[i]->host()));
    loaded.add_param("p" + std::to_string(i), params2.back()->get(), DType::bf16, {sizes[i]});
  }
  loaded.load(path);
  std::remove(path.c_str());
  EXPECT_FALSE(loaded.training());
  expect_same(holdings(loaded, params2), holdings(opt, params), "loaded in eval mode");
  opt.train();
  loaded.train();
  expect_same(holdings(loaded, params2), trained, "loaded, then train()");
  auto rng_copy = rng;
  step(opt);
  rng = rng_copy;
  step(loaded);
  expect_same(holdings(loaded, params2), holdings(opt, params), "a step after");
}

// A state that starts as a copy of the weights (Schedule-Free's z), which 8 or 4 bits cannot
// hold: the stateless layer refuses block-quantized states for it on both backends, with the
// same message, before anything moves (every buffer keeps its bytes, guards included).
TEST(EmulatedFunctional, AStateFromTheWeightsRefusesQuantizedStatesOnBothBackends) {
  auto rng = make_rng();
  const std::int64_t n = 300;
  for (const std::string algorithm : {"sgd_schedule_free", "adamw_schedule_free"})
    for (const DType q : {DType::q8, DType::q4}) {
      std::vector<std::string> messages;
      for (const Device d : {Device::cpu, Device::cuda}) {
        SCOPED_TRACE(algorithm + ", " + dtype_name(q) + (d == Device::cuda ? ", cuda" : ", cpu"));
        std::vector<std::unique_ptr<TestTensor>> buffers;  // param, grad, scalars, states
        buffers.push_back(std::make_unique<TestTensor>(d, random_floats(rng, n)));
        buffers.push_back(std::make_unique<TestTensor>(d, random_floats(rng, n)));
        std::vector<double> init(kMaxScalars, 0.0);
        const std::vector<ScalarSpec> scalar_specs = step_scalars(algorithm);
        for (std::size_t k = 0; k < scalar_specs.size(); ++k) init[k] = scalar_specs[k].init;
        buffers.push_back(std::make_unique<TestTensor>(d, doubles_as_floats(init)));
        DenseTensors t;
        t.param = buffers[0]->data();
        t.grad = buffers[1]->data();
        t.scalars = reinterpret_cast<double*>(buffers[2]->data());
        t.numel = n;
        t.state_dtype = q;
        const std::size_t words = (quantized_state_bytes(q, n) + 3) / 4;  // 16-byte aligned
        for (const StateSpec& spec : step_states(algorithm, {})) {
          buffers.push_back(std::make_unique<TestTensor>(d, random_floats(rng, words)));
          t.states[spec.index] = buffers.back()->data();
        }
        std::vector<std::vector<float>> before;
        for (const auto& b : buffers) before.push_back(b->all());
        const std::int64_t step = 1;
        Exec exec;
        exec.device = d;
        try {
          fused_step_list(algorithm, {}, &t, &step, 1, exec);
          ADD_FAILURE() << "stepped";
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), StatusCode::unsupported) << e.what();
          EXPECT_NE(std::string(e.what()).find("copy of the weights"), std::string::npos)
              << e.what();
          messages.push_back(e.what());
        }
        for (std::size_t i = 0; i < buffers.size(); ++i)
          EXPECT_TRUE(bitwise_equal(buffers[i]->all(), before[i])) << "buffer " << i << " moved";
      }
      ASSERT_EQ(messages.size(), 2u);
      EXPECT_EQ(messages[0], messages[1]);
    }
}

// The stateless layer's sparse step on the device (indices validated by a kernel, the rows
// sorted and stepped) against the CPU's, int32 and int64 indices, every sparse algorithm; a
// bad index is refused with nothing changed.
TEST(EmulatedFunctional, SparseStepsEqualTheCpu) {
  auto rng = make_rng();
  const std::int64_t rows = 37, dim = 9;
  for (const auto& a : dense_algorithms()) {
    if (!a.sparse) continue;
    for (const NamedOptions& options : {NamedOptions{}, ref::richest_options(a.name)}) {
      for (DType index_dtype : {DType::i32, DType::i64}) {
        SCOPED_TRACE(a.name + (options.empty() ? "" : " (richest)") +
                     (index_dtype == DType::i32 ? ", int32" : ", int64"));
        const std::vector<StateSpec> specs = sparse_step_states(a.name, options);
        const std::vector<float> table0 = random_floats(rng, rows * dim);
        TestTensor cpu_table(Device::cpu, table0), gpu_table(Device::cuda, table0);
        std::vector<std::unique_ptr<TestTensor>> cpu_states, gpu_states;
        SparseTensors c, g;
        c.table = cpu_table.data();
        g.table = gpu_table.data();
        for (const StateSpec& spec : specs) {
          const std::vector<float> init(spec.per_row ? rows : rows * dim,
                                        static_cast<float>(spec.init));
          cpu_states.push_back(std::make_unique<TestTensor>(Device::cpu, init));
          gpu_states.push_back(std::make_unique<TestTensor>(Device::cuda, init));
          c.states[spec.index] = cpu_states.back()->data();
          g.states[spec.index] = gpu_states.back()->data();
        }
        for (SparseTensors* t : {&c, &g}) {
          t->rows = rows;
          t->dim = dim;
          t->index_dtype = index_dtype;
        }
        auto everything = [&](const TestTensor& table,
                              const std::vector<std::unique_ptr<TestTensor>>& states) {
          std::vector<std::vector<float>> all{table.values()};
          EXPECT_TRUE(table.guards_intact());
          for (const auto& s : states) all.push_back(s->values());
          return all;
        };
        std::uniform_int_distribution<std::int64_t> row(0, rows - 1);
        for (std::int64_t step = 1; step <= 3; ++step) {
          std::vector<std::int64_t> idx64(static_cast<std::size_t>(10 + 20 * step));
          for (auto& i : idx64) i = row(rng);
          const std::vector<std::int32_t> idx32(idx64.begin(), idx64.end());
          const std::vector<float> grads = random_floats(rng, idx64.size() * dim);
          const bool i32 = index_dtype == DType::i32;
          DeviceVector<std::int32_t> d_idx32(idx32);
          DeviceVector<std::int64_t> d_idx64(idx64);
          TestTensor d_grads(Device::cuda, grads);
          c.indices = i32 ? static_cast<const void*>(idx32.data()) : idx64.data();
          g.indices = i32 ? static_cast<const void*>(d_idx32.get()) : d_idx64.get();
          c.nnz = g.nnz = static_cast<std::int64_t>(idx64.size());
          c.grad_rows = grads.data();
          g.grad_rows = d_grads.data();
          fused_sparse_step(a.name, options, step, c);
          fused_sparse_step(a.name, options, step, g, {Device::cuda});
          expect_same(everything(gpu_table, gpu_states), everything(cpu_table, cpu_states),
                      "step " + std::to_string(step));
        }
        const auto before = everything(gpu_table, gpu_states);
        DeviceVector<std::int64_t> bad({1, 2, rows, 3});
        TestTensor bad_grads(Device::cuda, random_floats(rng, 4 * dim));
        g.indices = bad.get();
        g.index_dtype = DType::i64;
        g.nnz = 4;
        g.grad_rows = bad_grads.data();
        EXPECT_THROW(fused_sparse_step(a.name, options, 4, g, {Device::cuda}), Error);
        expect_same(everything(gpu_table, gpu_states), before, "a refused step");
      }
    }
  }
}

// ------------------------------------------------------------ device memory that runs out

/// Runs `call` with the n-th device allocation from now (and every later one) failing, for
/// n = 0, 1, ... until it succeeds; after each failure (out_of_memory) `unchanged` checks
/// that nothing changed. Returns how many allocations the call needed.
template <class Setup, class Call, class Check>
int fail_each_allocation(Setup setup, Call call, Check unchanged) {
  for (long n = 0;; ++n) {
    auto state = setup();
    emulated_device::fail_allocations_after(n);
    bool failed = false;
    try {
      call(*state);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::out_of_memory) << e.what();
      failed = true;
    }
    emulated_device::fail_allocations_after(-1);
    if (!failed) return static_cast<int>(n);
    unchanged(*state, "allocation " + std::to_string(n) + " failed");
    if (::testing::Test::HasFailure() || n > 100) return -1;
  }
}

// A first step, eval() and a checkpoint's load, each with every one of its device allocations
// failing in turn: the call throws out_of_memory and leaves the params, the states, the step
// counts and the mode as they were; the same call then succeeds and gives the bits of a run
// where nothing failed.
TEST(EmulatedOptimizer, AFailedAllocationChangesNothing) {
  for (const std::string algorithm : {"adamw", "lamb", "adamw_schedule_free"}) {
    SCOPED_TRACE(algorithm);
    auto rng = make_rng(algorithm);
    const std::vector<std::vector<float>> p0 = {random_floats(rng, 100), random_floats(rng, 9)};
    const std::vector<std::vector<float>> g1 = {random_floats(rng, 100), random_floats(rng, 9)};
    const std::vector<std::vector<float>> g2 = {random_floats(rng, 100), random_floats(rng, 9)};
    const bool eval = algorithm == "adamw_schedule_free";
    auto fresh = [&] {
      auto m = std::make_unique<Model>(Device::cuda, algorithm, p0);
      m->opt.set_option("max_grad_norm", 1.0);
      m->opt.set_option("ema_decay", 0.9);
      return m;
    };
    Model never(Device::cuda, algorithm, p0);
    never.opt.set_option("max_grad_norm", 1.0);
    never.opt.set_option("ema_decay", 0.9);
    const auto before = never.everything();
    never.step({&g1[0], &g1[1]});
    const auto after_one = never.everything();

    // The first step.
    const int first = fail_each_allocation(
        fresh,
        [&](Model& m) {
          m.step({&g1[0], &g1[1]});
        },
        [&](Model& m, const std::string& what) {
          expect_same(m.everything(), before, what);
          m.step({&g1[0], &g1[1]});  // and then it steps as if nothing had happened
          expect_same(m.everything(), after_one, what + ", then stepped");
        });
    EXPECT_GT(first, 3) << "the first step allocated almost nothing";

    // eval(): in training mode still, the params as they were.
    if (eval) {
      never.step({&g2[0], &g2[1]});
      const auto trained = never.everything();
      fail_each_allocation(
          [&] {
            auto m = fresh();
            m->step({&g1[0], &g1[1]});
            m->step({&g2[0], &g2[1]});
            return m;
          },
          [&](Model& m) { m.opt.eval(); },
          [&](Model& m, const std::string& what) {
            EXPECT_TRUE(m.opt.training()) << what;
            expect_same(m.everything(), trained, what);
          });
    }

    // load(): a checkpoint of the stepped run into a fresh optimizer.
    const std::string path = ::testing::TempDir() + "fusedopt_emulated_" + algorithm + "_" +
                             std::to_string(::getpid()) + ".ckpt";
    never.opt.save(path);
    const auto saved = never.everything();
    fail_each_allocation(
        fresh, [&](Model& m) { m.opt.load(path); },
        [&](Model& m, const std::string& what) { expect_same(m.everything(), before, what); });
    // Over the params the user saved with it.
    Model loaded(Device::cuda, algorithm, {never.params[0]->values(), never.params[1]->values()});
    loaded.opt.load(path);
    std::remove(path.c_str());
    expect_same(loaded.everything(), saved, "loaded");
  }
}

// Block-quantized states created by a first step on the device (cuda::fill_quantized over
// memory the emulated cudaMalloc leaves as 0xFF) are the CPU's bytes over the whole buffer,
// the padding between the codes and the absmax included: the checkpoints, which save each
// state's buffer bytewise, are the same files.
TEST(EmulatedOptimizer, QuantizedFirstStepCheckpointEqualsTheCpuBytewise) {
  auto rng = make_rng();
  const std::vector<std::vector<float>> p0 = {random_floats(rng, 1), random_floats(rng, 129),
                                              random_floats(rng, 4097), random_floats(rng, 257)};
  std::vector<std::vector<float>> g;
  for (const auto& p : p0) g.push_back(random_floats(rng, p.size()));
  const auto read = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  for (const DType q : {DType::q8, DType::q4}) {
    SCOPED_TRACE(dtype_name(q));
    std::vector<std::vector<char>> files;
    for (const Device d : {Device::cpu, Device::cuda}) {
      Optimizer opt("adamw", d);
      opt.set_option("state_dtype", static_cast<double>(static_cast<int>(q)));
      opt.set_option("min_quant_size", 0);  // every param quantized, the 1-element one too
      std::vector<std::unique_ptr<TestTensor>> params, grads;
      std::vector<const void*> ptrs;
      for (std::size_t i = 0; i < p0.size(); ++i) {
        params.push_back(std::make_unique<TestTensor>(d, p0[i]));
        grads.push_back(std::make_unique<TestTensor>(d, g[i]));
        opt.add_param("p" + std::to_string(i), params.back()->data(), DType::f32,
                      {params.back()->size()});
        ptrs.push_back(grads.back()->data());
      }
      opt.step(ptrs.data());
      const std::string path =
          ::testing::TempDir() + "fusedopt_emulated_quant_" + std::to_string(::getpid()) + ".ckpt";
      opt.save(path);
      files.push_back(read(path));
      std::remove(path.c_str());
    }
    ASSERT_FALSE(files[0].empty());
    EXPECT_TRUE(files[1] == files[0]) << "the CUDA checkpoint's bytes differ from the CPU's";
  }
}

}  // namespace
}  // namespace fo::test
