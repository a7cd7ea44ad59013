// After a param's first step, the optimizer's step path allocates nothing: a training loop
// that steps the same params every iteration never reaches the heap. Counted by replacing the
// global operator new for this test binary (counting only while a test asks), on the CPU
// backend; the CUDA step path keeps the same scratch (optimizer_step.cpp) but needs a GPU.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "test_util.hpp"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
// Allocations of at least this many bytes fail (std::bad_alloc); 0: none fails.
std::atomic<std::size_t> g_fail_from{0};
}  // namespace

// Not inlined: inlined into a `new T` / `delete` pair, GCC reads the free() as a mismatch
// for the operator new it sees (-Wmismatched-new-delete), though both are these.
__attribute__((noinline)) void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  const std::size_t fail = g_fail_from.load(std::memory_order_relaxed);
  if (fail > 0 && n >= fail) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
__attribute__((noinline)) void operator delete(void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace fo::test {
namespace {

/// Heap allocations through operator new made by f().
template <class F>
long allocations_in(F&& f) {
  g_allocations = 0;
  g_counting = true;
  f();
  g_counting = false;
  return g_allocations.load();
}

TEST(StepAllocations, NoneAfterTheFirstStep) {
  auto rng = make_rng();
  for (const std::string algorithm : {"adam", "sgd", "rprop"}) {
    SCOPED_TRACE(algorithm);
    Optimizer opt(algorithm);
    const std::vector<std::int64_t> sizes = {1, 7, 70001, 1 << 17};  // threaded and not
    std::vector<std::vector<float>> params, grads;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      params.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
      grads.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
      opt.add_param("p" + std::to_string(i), params.back().data(), DType::f32, {sizes[i]});
    }
    opt.set_param_option("p1", "lr", 0.5);  // two groups of options
    opt.set_option("max_grad_norm", 1.0);   // and the norm pass
    std::vector<const void*> g;
    for (const auto& x : grads) g.push_back(x.data());
    opt.step(g.data());  // creates the state
    EXPECT_EQ(allocations_in([&] {
                for (int s = 0; s < 3; ++s) opt.step(g.data());
              }),
              0);
    g[2] = nullptr;  // a param without a gradient this step
    opt.step(g.data());
    EXPECT_EQ(allocations_in([&] { opt.step(g.data()); }), 0);
    EXPECT_EQ(opt.step_count("p2"), 4);
    EXPECT_EQ(opt.step_count("p0"), 6);
  }
}

TEST(StepAllocations, NoneInASparseStepAfterTheFirst) {
  auto rng = make_rng();
  Optimizer opt("lazyadam");
  const std::int64_t rows = 300, dim = 16;
  std::vector<float> table = random_floats(rng, static_cast<std::size_t>(rows * dim));
  opt.add_param("table", table.data(), DType::f32, {rows, dim});
  const std::vector<std::int64_t> indices = {5, 299, 5, 0, 17};
  const std::vector<float> grad_rows = random_floats(rng, indices.size() * dim);
  const auto step = [&] {
    opt.step_sparse("table", indices.data(), DType::i64, static_cast<std::int64_t>(indices.size()),
                    grad_rows.data());
  };
  step();
  EXPECT_EQ(allocations_in([&] {
              for (int s = 0; s < 3; ++s) step();
            }),
            0);
  EXPECT_EQ(opt.step_count("table"), 4);
}

// The CPU storage layer (bf16 params with master weights, bf16 states) keeps its scratch
// between steps, per thread, grown only: a step allocates nothing after the first at a thread
// count; where the scratch cannot grow, the step throws out_of_memory before writing anything.
// On a thread of its own: its scratch starts empty.
TEST(StepAllocations, StorageLayerNoneAfterTheFirstAndAFailedOneChangesNothing) {
  const int saved_threads = cpu::num_threads();
  std::thread([] {
    auto rng = make_rng();
    const std::int64_t n = 70001;  // two threads' worth (cpu_backend.cpp, kMinParallel)
    std::vector<std::uint16_t> p;
    for (float x : random_floats(rng, n)) p.push_back(to_bf16(x).bits);
    std::vector<std::uint16_t> g;
    for (float x : random_floats(rng, n)) g.push_back(to_bf16(x).bits);
    Optimizer opt("adam");
    opt.set_option("master_weights", 1);
    opt.set_option("state_dtype", 2);
    opt.set_option("stochastic_rounding", 1);
    opt.add_param("w", p.data(), DType::bf16, {n});
    cpu::set_num_threads(1);
    opt.step({g.data()});  // creates the state and one thread's scratch
    EXPECT_EQ(allocations_in([&] { opt.step({g.data()}); }), 0);
    cpu::set_num_threads(2);  // a second thread's scratch: it must grow
    const std::vector<std::uint16_t> p0 = p;
    const std::vector<float> m0 = opt.state("w", "master"), v0 = opt.state("w", "exp_avg_sq");
    g_fail_from = 16 * 1024;
    try {
      opt.step({g.data()});
      ADD_FAILURE() << "the step was taken without its scratch";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::out_of_memory) << e.what();
    }
    g_fail_from = 0;
    EXPECT_EQ(p, p0);
    EXPECT_TRUE(bitwise_equal(opt.state("w", "master"), m0));
    EXPECT_TRUE(bitwise_equal(opt.state("w", "exp_avg_sq"), v0));
    EXPECT_EQ(opt.step_count("w"), 2);
    opt.step({g.data()});
    EXPECT_EQ(allocations_in([&] { opt.step({g.data()}); }), 0);
    EXPECT_EQ(opt.step_count("w"), 4);
  }).join();
  cpu::set_num_threads(saved_threads);
}

// A step of several params grows every param's scratch before any param is written: where a
// later, larger param's scratch cannot grow (a trust-ratio step's pass-one chunks on more
// threads, a factored step's widened tensor, a matrix step's iteration workspace), the step
// throws out_of_memory and the smaller param, whose scratch fitted, has not moved either.
// The failing step runs on a fresh thread (its scratch empty).
TEST(StepAllocations, ALaterParamsFailedScratchLeavesEveryParamAsItWas) {
  struct Case {
    std::string algorithm;
    DType dtype;  // of params, grads and states
    std::vector<std::int64_t> small, large;
  };
  const std::vector<Case> cases = {{"lamb", DType::bf16, {100}, {70001}},
                                   {"adafactor", DType::bf16, {8, 8}, {300, 700}},
                                   {"muon", DType::f32, {8, 8}, {300, 700}}};
  const int saved_threads = cpu::num_threads();
  cpu::set_num_threads(2);
  auto rng = make_rng();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.algorithm);
    const auto numel = [](const std::vector<std::int64_t>& shape) {
      std::int64_t n = 1;
      for (std::int64_t d : shape) n *= d;
      return static_cast<std::size_t>(n);
    };
    const auto data = [&](std::size_t n) {  // random values stored as c.dtype
      const std::vector<float> x = random_floats(rng, n);
      std::vector<unsigned char> out(n * dtype_size(c.dtype));
      for (std::size_t i = 0; i < n; ++i) {
        if (c.dtype == DType::f32) {
          std::memcpy(out.data() + 4 * i, &x[i], 4);
        } else {
          const std::uint16_t bits = to_bf16(x[i]).bits;
          std::memcpy(out.data() + 2 * i, &bits, 2);
        }
      }
      return out;
    };
    std::vector<unsigned char> ps = data(numel(c.small)), pl = data(numel(c.large));
    const std::vector<unsigned char> gs = data(numel(c.small)), gl = data(numel(c.large));
    Optimizer opt(c.algorithm);
    if (c.dtype != DType::f32) opt.set_option("state_dtype", 2);
    opt.add_param("small", ps.data(), c.dtype, c.small);
    opt.add_param("large", pl.data(), c.dtype, c.large);
    std::thread([&] {  // each param's state and first step, one at a time
      opt.step({gs.data(), nullptr});
      opt.step({nullptr, gl.data()});
    })
        .join();
    const std::vector<unsigned char> ps0 = ps, pl0 = pl;
    std::vector<std::vector<float>> states0;
    for (const char* name : {"small", "large"})
      for (const std::string& s : opt.state_names(name)) states0.push_back(opt.state(name, s));
    std::thread([&] {
      g_fail_from = 200 * 1024;  // the small param's scratch fits, the large one's does not
      try {
        opt.step({gs.data(), gl.data()});
        ADD_FAILURE() << "the step was taken without the large param's scratch";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), StatusCode::out_of_memory) << e.what();
      }
      g_fail_from = 0;
    }).join();
    EXPECT_EQ(ps, ps0) << "the small param moved";
    EXPECT_EQ(pl, pl0) << "the large param moved";
    std::size_t k = 0;
    for (const char* name : {"small", "large"})
      for (const std::string& s : opt.state_names(name))
        EXPECT_TRUE(bitwise_equal(opt.state(name, s), states0[k++])) << name << "." << s;
    EXPECT_EQ(opt.step_count("small"), 1);
    EXPECT_EQ(opt.step_count("large"), 1);
    opt.step({gs.data(), gl.data()});  // the next call works
    EXPECT_EQ(opt.step_count("small"), 2);
  }
  cpu::set_num_threads(saved_threads);
}

// The stateless layer's list step too: both tensors' scratch before the first is written.
TEST(StepAllocations, AListStepsFailedScratchLeavesEveryTensorAsItWas) {
  const int saved_threads = cpu::num_threads();
  cpu::set_num_threads(2);
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {100, 70001};
  std::vector<std::vector<std::uint16_t>> p, g, m, v;
  for (std::int64_t n : sizes) {
    for (auto* x : {&p, &g}) {
      x->emplace_back();
      for (float f : random_floats(rng, static_cast<std::size_t>(n)))
        x->back().push_back(to_bf16(f).bits);
    }
    m.emplace_back(static_cast<std::size_t>(n), std::uint16_t{0});
    v.emplace_back(static_cast<std::size_t>(n), std::uint16_t{0});
  }
  std::vector<DenseTensors> t(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    t[i].param = p[i].data();
    t[i].grad = g[i].data();
    t[i].states[0] = m[i].data();
    t[i].states[1] = v[i].data();
    t[i].numel = sizes[i];
    t[i].param_dtype = t[i].grad_dtype = t[i].state_dtype = DType::bf16;
  }
  const std::int64_t steps[] = {1, 1};
  const auto p0 = p, m0 = m, v0 = v;
  std::thread([&] {  // a fresh thread: its scratch empty
    g_fail_from = 200 * 1024;
    try {
      fused_step_list("lamb", {}, t.data(), steps, t.size());
      ADD_FAILURE() << "the step was taken without the large tensor's scratch";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::out_of_memory) << e.what();
    }
    g_fail_from = 0;
  })
      .join();
  EXPECT_EQ(p, p0);
  EXPECT_EQ(m, m0);
  EXPECT_EQ(v, v0);
  fused_step_list("lamb", {}, t.data(), steps, t.size());  // the next call works
  EXPECT_NE(p, p0);
  cpu::set_num_threads(saved_threads);
}

}  // namespace
}  // namespace fo::test
