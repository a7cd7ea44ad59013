// muon (torch.optim.Muon's algorithm; kernels/ops/muon.hpp, a step of the matrix kind,
// kernels/matrix_step.hpp) on the CPU: 30 steps against the double reference written from
// torch's code (reference/muon_reference.hpp) for square, wide, tall (transposed inside the
// iteration) and batched params, every adjust_lr_fn, nesterov on and off, weight decay, on every
// instruction set; a 3-D batch equal to a loop of 2-D steps; zero gradients; bits across
// thread counts; checkpoints; 0-size matrices; refusals. (dense_reference_test and
// determinism_test skip muon with a pointer here: they step vectors.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/muon_reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using Shape = std::vector<std::int64_t>;

// Shapes: a single element, a single row and column, square, wide, tall (rows > cols: the
// iteration works on the transpose), batches of matrices (3-D and 4-D) and one large enough
// for the elementwise passes to be split over threads.
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> all = {{1, 1},  {1, 37},   {37, 1},      {16, 16},  {7, 13},
                                         {13, 7}, {3, 8, 5}, {2, 2, 6, 4}, {65, 100}, {300, 120}};
  return all;
}

std::int64_t numel(const Shape& s) {
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

std::string shape_name(const Shape& s) {
  std::string out;
  for (auto d : s) out += (out.empty() ? "" : "x") + std::to_string(d);
  return out;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Option sets: reference/reference.cpp's muon variants (every option off its default in one
// of them) that the CPU steps: ns_bf16 = 1 is CUDA's (refused here, tested below).
std::vector<ref::OptionMap> variants() {
  std::vector<ref::OptionMap> out;
  for (const ref::OptionMap& v : ref::test_variants("muon"))
    if (!v.count("ns_bf16")) out.push_back(v);
  return out;
}

constexpr double kU = 1.0 / (1 << 24);

// Tolerances of one step started from the library's previous output (the reference takes the
// library's float param and momentum buffer, in double):
//  - momentum_buffer: one fp32 lerp (3 roundings): |got - want| <= 4u |want| + 4u |g - buf|;
//    taken as 8u (|want| + max |g|) + tiny.
//  - param: p * decay and one fma (2 roundings), plus adjusted_lr times the iteration's error.
//    The iteration runs in fp32 (OpenBLAS) on an input rounded to fp32 (the nesterov lerp:
//    a few ulp), and its polynomial amplifies relative errors of small singular values (slope
//    up to 3.4 per step, 5 steps). Measured here (the test prints it) over these shapes,
//    variants and 30 steps, with OpenBLAS 0.3.21 on 2 cores: the worst element's error is
//    4.0e-6 to 4.8e-6 of the largest update (scalar, avx2, avx512 runs). Bound: 5e-5 of it,
//    ten times the measured worst (another BLAS, another blocking), far under what a wrong
//    coefficient, a missed transpose, a wrong adjusted lr (>= 10% of the update) or a lerp
//    in the other direction would leave.
constexpr double kNsRelative = 5e-5;

::testing::AssertionResult close_buffer(const std::vector<float>& got,
                                        const std::vector<double>& want,
                                        const std::vector<float>& grad) {
  double gmax = 0.0;
  for (float g : grad) gmax = std::max(gmax, std::abs(static_cast<double>(g)));
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double tol = 8 * kU * (std::abs(want[i]) + gmax) + 1e-37;
    if (!(std::abs(got[i] - want[i]) <= tol))
      return ::testing::AssertionFailure() << "momentum_buffer[" << i << "]: got " << got[i]
                                           << ", want " << want[i] << " (tol " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}

// `update`: the reference's adjusted_lr * O per element (want_p before the update's
// subtraction minus want_p), so the bound scales with the update's own size.
::testing::AssertionResult close_param(const std::vector<float>& got,
                                       const std::vector<double>& want,
                                       const std::vector<double>& update, double* worst) {
  double umax = 0.0;
  for (double u : update) umax = std::max(umax, std::abs(u));
  int bad = 0;
  std::ostringstream msg;
  msg.precision(9);
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    const double tol = 4 * kU * std::abs(want[i]) + kNsRelative * umax + 1e-37;
    if (umax > 0) *worst = std::max(*worst, std::max(0.0, err - 4 * kU * std::abs(want[i])) / umax);
    if (!(err <= tol) && ++bad <= 5)
      msg << "\n  param[" << i << "]: got " << got[i] << ", want " << want[i] << " (err " << err
          << ", tol " << tol << ")";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " mismatches" << msg.str();
}

ref::OptionMap with_defaults(const ref::OptionMap& o) {
  ref::OptionMap all = ref::defaults("muon");
  for (const auto& [k, v] : o) all[k] = v;
  return all;
}

class MuonIsa : public ::testing::TestWithParam<cpu::Isa> {
 protected:
  void SetUp() override {
    if (!cpu::isa_supported(GetParam()))
      GTEST_SKIP() << "this CPU lacks " << cpu::isa_name(GetParam());
    saved_ = cpu::isa();
    cpu::set_isa(GetParam());
  }
  void TearDown() override { cpu::set_isa(saved_); }
  cpu::Isa saved_ = cpu::Isa::scalar;
};

TEST_P(MuonIsa, ThirtyStepsMatchDoubleReference) {
  auto rng = make_rng();
  double worst = 0.0;  // the largest iteration error seen, relative to the largest update
  const std::vector<ref::OptionMap> all = variants();
  ASSERT_EQ(all.size(), ref::test_variants("muon").size() - 1);
  for (std::size_t v = 0; v < all.size(); ++v) {
    const ref::OptionMap o = with_defaults(all[v]);
    for (const Shape& shape : shapes()) {
      SCOPED_TRACE("variant " + std::to_string(v) + ", shape " + shape_name(shape));
      const std::int64_t n = numel(shape);
      const std::int64_t rows = shape[shape.size() - 2], cols = shape.back(),
                         batch = n / (rows * cols);
      std::vector<float> param = random_floats(rng, static_cast<std::size_t>(n));
      Optimizer opt("muon");
      for (const auto& [key, value] : all[v]) opt.set_option(key, value);
      opt.add_param("w", param.data(), DType::f32, shape);
      ASSERT_EQ(opt.state_names("w"), std::vector<std::string>{"momentum_buffer"});
      std::vector<double> buf(static_cast<std::size_t>(n), 0.0);
      for (int t = 1; t <= 30; ++t) {
        SCOPED_TRACE("step " + std::to_string(t));
        std::vector<float> grad = random_floats(rng, static_cast<std::size_t>(n));
        if (t % 7 == 3)  // a step with a few large gradients: an ill-conditioned input
          for (std::size_t i = 0; i < grad.size(); i += 5) grad[i] *= 100.0f;
        const std::vector<double> old_p = to_double(param);
        opt.step({grad.data()});
        std::vector<double> want_p = old_p, want_buf = buf;
        ref::muon_step(o, want_p, to_double(grad), want_buf, batch, rows, cols);
        std::vector<double> update(want_p.size());
        const double decay = 1.0 - o.at("lr") * o.at("weight_decay");
        for (std::size_t i = 0; i < update.size(); ++i) update[i] = old_p[i] * decay - want_p[i];
        ASSERT_TRUE(close_param(param, want_p, update, &worst));
        const std::vector<float> got_buf = opt.state("w", "momentum_buffer");
        ASSERT_TRUE(close_buffer(got_buf, want_buf, grad));
        buf = to_double(got_buf);
      }
    }
  }
  std::printf("[ muon ] largest iteration error / largest update: %.3g (bound %.3g)\n", worst,
              kNsRelative);
}

INSTANTIATE_TEST_SUITE_P(Cpu, MuonIsa,
                         ::testing::Values(cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512),
                         [](const auto& i) { return std::string(cpu::isa_name(i.param)); });

std::vector<std::vector<float>> run_steps(const Shape& shape, std::uint64_t seed, int steps) {
  std::mt19937_64 rng(seed);
  std::vector<float> param = random_floats(rng, static_cast<std::size_t>(numel(shape)));
  Optimizer opt("muon");
  opt.add_param("w", param.data(), DType::f32, shape);
  for (int t = 0; t < steps; ++t) {
    const std::vector<float> grad = random_floats(rng, param.size());
    opt.step({grad.data()});
  }
  return {param, opt.state("w", "momentum_buffer")};
}

TEST(Muon, SameBitsOnEveryIsaAndThreadCount) {
  const std::uint64_t seed = run_seed();
  const Shape shape{2, 260, 300};  // 156000 elements: the elementwise passes split over threads
  const cpu::Isa saved = cpu::isa();
  const int saved_threads = cpu::num_threads();
  cpu::set_isa(cpu::Isa::scalar);
  cpu::set_num_threads(1);
  const auto want = run_steps(shape, seed, 3);
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    for (int threads : {1, 2, 3}) {
      SCOPED_TRACE(std::string(cpu::isa_name(isa)) + ", " + std::to_string(threads) + " threads");
      cpu::set_isa(isa);
      cpu::set_num_threads(threads);
      expect_same(run_steps(shape, seed, 3), want, "param and momentum_buffer");
    }
  }
  cpu::set_isa(saved);
  cpu::set_num_threads(saved_threads);
}

TEST(Muon, ABatchOfMatricesEqualsEachMatrixOnItsOwn) {
  auto rng = make_rng();
  const std::int64_t batch = 3, rows = 9, cols = 5;  // tall: transposed inside the iteration
  const std::size_t per = static_cast<std::size_t>(rows * cols);
  std::vector<float> all = random_floats(rng, batch * per);
  std::vector<std::vector<float>> each;
  for (std::int64_t b = 0; b < batch; ++b)
    each.emplace_back(all.begin() + b * per, all.begin() + (b + 1) * per);
  Optimizer batched("muon"), single("muon");
  batched.set_option("adjust_lr_fn", 2);
  single.set_option("adjust_lr_fn", 2);
  batched.add_param("w", all.data(), DType::f32, {batch, rows, cols});
  for (std::int64_t b = 0; b < batch; ++b)
    single.add_param("w" + std::to_string(b), each[b].data(), DType::f32, {rows, cols});
  for (int t = 0; t < 4; ++t) {
    const std::vector<float> g = random_floats(rng, all.size());
    batched.step({g.data()});
    std::vector<const void*> gs;
    for (std::int64_t b = 0; b < batch; ++b) gs.push_back(g.data() + b * per);
    single.step(gs.data());
  }
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::vector<float> part(all.begin() + b * per, all.begin() + (b + 1) * per);
    EXPECT_TRUE(bitwise_equal(part, each[b]))
        << "matrix " << b << ": " << first_difference(part, each[b]);
  }
}

TEST(Muon, ZeroGradientsOnlyDecayTheParam) {
  std::vector<float> param = {1.0f, -2.0f, 3.0f, 0.5f, 0.25f, -1.0f};
  const std::vector<float> before = param;
  Optimizer opt("muon");
  opt.set_option("weight_decay", 0.5);
  opt.set_option("lr", 0.1);
  opt.add_param("w", param.data(), DType::f32, {2, 3});
  const std::vector<float> zeros(6, 0.0f);
  opt.step({zeros.data()});
  // The iteration of a zero matrix is zero (eps keeps its division finite): the step is the
  // decay alone, p * (1 - lr * wd).
  for (std::size_t i = 0; i < param.size(); ++i)
    EXPECT_EQ(param[i], before[i] * static_cast<float>(1.0 - 0.1 * 0.5)) << i;
  for (float x : opt.state("w", "momentum_buffer")) EXPECT_EQ(x, 0.0f);
}

TEST(Muon, ZeroSizeMatricesStepAndNothingMoves) {
  for (const Shape& shape : std::vector<Shape>{{0, 5}, {4, 0}, {0, 3, 3}}) {
    SCOPED_TRACE(shape_name(shape));
    std::vector<float> other = {1.0f, 2.0f, 3.0f, 4.0f};
    const std::vector<float> before = other;
    Optimizer opt("muon");
    opt.add_param("empty", nullptr, DType::f32, shape);
    opt.add_param("w", other.data(), DType::f32, {2, 2});
    const std::vector<float> g = {0.5f, -0.5f, 0.25f, 1.0f};
    opt.step({nullptr, g.data()});
    opt.step({g.data(), g.data()});  // an empty param's grad may be any pointer
    EXPECT_EQ(opt.step_count("empty"), 1);
    EXPECT_EQ(opt.step_count("w"), 2);
    EXPECT_FALSE(bitwise_equal(other, before));
  }
}

TEST(Muon, ResumeFromCheckpointEqualsNeverStopping) {
  auto rng = make_rng();
  const Shape shape{2, 9, 33};
  const std::vector<float> p0 = random_floats(rng, static_cast<std::size_t>(numel(shape)));
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 6; ++t) grads.push_back(random_floats(rng, p0.size()));
  std::vector<float> a = p0, b = p0;
  Optimizer oa("muon"), ob("muon");
  oa.add_param("w", a.data(), DType::f32, shape);
  ob.add_param("w", b.data(), DType::f32, shape);
  for (int t = 0; t < 3; ++t) oa.step({grads[t].data()}), ob.step({grads[t].data()});
  const std::string path =
      ::testing::TempDir() + "muon_resume_" + std::to_string(::getpid()) + ".ckpt";
  oa.save(path);
  std::vector<float> c = a;
  Optimizer oc("muon");
  oc.add_param("w", c.data(), DType::f32, shape);
  oc.load(path);
  for (int t = 3; t < 6; ++t) ob.step({grads[t].data()}), oc.step({grads[t].data()});
  EXPECT_TRUE(bitwise_equal(b, c)) << first_difference(c, b);
  EXPECT_TRUE(bitwise_equal(ob.state("w", "momentum_buffer"), oc.state("w", "momentum_buffer")));
  std::remove(path.c_str());
}

TEST(Muon, VectorsAndScalarsAreRefusedWithAPointerToAdamW) {
  Optimizer opt("muon");
  std::vector<float> v(8, 1.0f);
  for (const Shape& shape : std::vector<Shape>{{8}, {}}) {
    try {
      opt.add_param("b", v.data(), DType::f32, shape);
      ADD_FAILURE() << "a param of " << shape.size() << " dimensions was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("adamw"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(opt.step_count("b"), Error);  // not added
  for (const AlgorithmDescription& d : dense_algorithms())
    EXPECT_EQ(d.matrix_only, d.name == "muon") << d.name;
}

TEST(Muon, TheFunctionalStepRefusesATensorWithoutAMatrixView) {
  std::vector<float> p(6, 1.0f), g(6, 0.5f), buf(6, 0.0f);
  DenseTensors t;
  t.param = p.data();
  t.grad = g.data();
  t.states[0] = buf.data();
  t.numel = 6;
  try {
    fused_step_list("muon", {}, &t, std::vector<std::int64_t>{1}.data(), 1);
    ADD_FAILURE() << "a tensor without a view was stepped";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
  }
  EXPECT_EQ(p, std::vector<float>(6, 1.0f));
  t.view = MatrixView{1, 2, 3};
  fused_step_list("muon", {}, &t, std::vector<std::int64_t>{1}.data(), 1);
  EXPECT_NE(p, std::vector<float>(6, 1.0f));
}

TEST(Muon, OptionsOutOfRangeAreRefusedAndChangeNothing) {
  Optimizer opt("muon");
  std::vector<float> param(12, 1.0f);
  opt.add_param("w", param.data(), DType::f32, {3, 4});
  for (const auto& [key, value] :
       std::vector<std::pair<const char*, double>>{{"lr", -1e-3},
                                                   {"momentum", -0.1},
                                                   {"weight_decay", -0.1},
                                                   {"eps", -1e-7},
                                                   {"ns_steps", 100},
                                                   {"ns_steps", 2.5},
                                                   {"ns_steps", -1},
                                                   {"adjust_lr_fn", 3},
                                                   {"adjust_lr_fn", 0.5},
                                                   {"ns_a", INFINITY},
                                                   {"nesterov", 2.0}}) {
    SCOPED_TRACE(std::string(key) + " = " + std::to_string(value));
    const double before = opt.option(key);
    EXPECT_THROW(opt.set_option(key, value), Error);
    EXPECT_EQ(opt.option(key), before);
    EXPECT_THROW(opt.set_param_option("w", key, value), Error);
    EXPECT_EQ(opt.param_option("w", key), before);
  }
}

TEST(Muon, Bf16IterationIsRefusedOnTheCpuBeforeAnythingChanges) {
  std::vector<float> a(12, 1.0f), b(6, 2.0f);
  Optimizer opt("muon");
  opt.add_param("a", a.data(), DType::f32, {3, 4});
  opt.add_param("b", b.data(), DType::f32, {2, 3});
  opt.set_param_option("b", "ns_bf16", 1);
  const std::vector<float> ga(12, 0.5f), gb(6, 0.25f);
  try {
    opt.step({ga.data(), gb.data()});
    ADD_FAILURE() << "ns_bf16 stepped on the CPU";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("ns_bf16"), std::string::npos) << e.what();
  }
  EXPECT_EQ(a, std::vector<float>(12, 1.0f));  // not even the first param moved
  EXPECT_EQ(opt.step_count("a"), 0);
  // The functional layer refuses it too.
  DenseTensors t;
  std::vector<float> buf(6, 0.0f);
  t.param = b.data();
  t.grad = gb.data();
  t.states[0] = buf.data();
  t.numel = 6;
  t.view = MatrixView{1, 2, 3};
  EXPECT_THROW(
      fused_step_list("muon", {{"ns_bf16", 1}}, &t, std::vector<std::int64_t>{1}.data(), 1), Error);
  EXPECT_EQ(b, std::vector<float>(6, 2.0f));
}

// ------------------------------------------------------- on a GPU (bench/gpu_suite.sh)
// Written without a GPU: these have never run (the emulation has no cuBLAS; its share of the
// CUDA path is EmulatedMatrixKernels). The momentum buffer depends on the gradients alone,
// through the same fp32 lerps on both backends (no FMA contraction): bitwise equal to the
// CPU's. The params differ by the iterations' errors only (decay and update are elementwise
// and alike), which add up over the steps: per step at most adjusted_lr times twice the
// CPU's bound against the double reference (kNsRelative of the largest update, an output
// element being at most ~1.2, taken as 1.5) for float32; for ns_bf16 = 1 a quarter of
// adjusted_lr per step (tests/python/test_muon.py measures 0.06 to 0.09 lr between torch's
// bf16 iteration and a float32 one).

TEST(MuonGpu, StepsMatchTheCpuWithinTheIterationsError) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const double lr = 0.02;
  for (const bool bf16 : {false, true}) {
    for (const Shape& shape : std::vector<Shape>{{16, 16}, {24, 8}, {3, 8, 5}, {65, 100}}) {
      SCOPED_TRACE(shape_name(shape) + (bf16 ? ", ns_bf16" : ", float32"));
      const std::int64_t n = numel(shape);
      const std::int64_t rows = shape[shape.size() - 2], cols = shape.back();
      const std::vector<float> p0 = random_floats(rng, static_cast<std::size_t>(n));
      std::vector<float> cpu_p = p0;
      TestTensor gpu_p(Device::cuda, p0);
      Optimizer cpu("muon"), gpu("muon", Device::cuda);
      for (Optimizer* o : {&cpu, &gpu}) o->set_option("lr", lr);
      gpu.set_option("ns_bf16", bf16 ? 1 : 0);
      cpu.add_param("w", cpu_p.data(), DType::f32, shape);
      gpu.add_param("w", gpu_p.data(), DType::f32, shape);
      const double adjusted = ref::muon_adjusted_lr(lr, 0, rows, cols);
      const double per_step = bf16 ? 0.25 * adjusted : adjusted * 2 * kNsRelative * 1.5;
      for (int t = 1; t <= 5; ++t) {
        SCOPED_TRACE("step " + std::to_string(t));
        const std::vector<float> g = random_floats(rng, static_cast<std::size_t>(n));
        TestTensor gpu_g(Device::cuda, g);
        cpu.step({g.data()});
        gpu.step({gpu_g.data()});
        EXPECT_TRUE(
            bitwise_equal(gpu.state("w", "momentum_buffer"), cpu.state("w", "momentum_buffer")));
        const std::vector<float> got = gpu_p.values();
        for (std::size_t i = 0; i < got.size(); ++i)
          ASSERT_LE(std::abs(static_cast<double>(got[i]) - cpu_p[i]),
                    t * per_step + 8 * kU * std::abs(cpu_p[i]))
              << "param[" << i << "]";
      }
      EXPECT_TRUE(gpu_p.guards_intact());
    }
  }
}

#if defined(FUSEDOPT_WITH_CUDA)
// Capturable: after a first step (state, workspace, the thread's cuBLAS handle), a step
// captured in a graph and replayed equals an eager one, bitwise (device step counts, no host
// sync, no allocation).
TEST(MuonGpu, ACapturedStepEqualsAnEagerOne) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Shape shape{2, 96, 40};
  const std::vector<float> p0 = random_floats(rng, static_cast<std::size_t>(numel(shape)));
  const std::vector<float> g1 = random_floats(rng, p0.size()), g2 = random_floats(rng, p0.size());
  TestTensor pa(Device::cuda, p0), pb(Device::cuda, p0), ga(Device::cuda, g1), gb(Device::cuda, g2);
  Optimizer eager("muon", Device::cuda), captured("muon", Device::cuda);
  eager.add_param("w", pa.data(), DType::f32, shape);
  captured.add_param("w", pb.data(), DType::f32, shape);
  eager.step({ga.data()});
  captured.step({ga.data()});
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  std::string error;
  try {
    captured.step({gb.data()}, stream);
  } catch (const std::exception& e) {
    error = e.what();
  }
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  ASSERT_TRUE(error.empty()) << "threw while capturing: " << error;
  ASSERT_EQ(end, cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiateWithFlags(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  eager.step({gb.data()});
  const std::vector<float> a = pa.values(), b = pb.values();
  EXPECT_TRUE(bitwise_equal(b, a)) << first_difference(b, a);
  EXPECT_EQ(captured.step_count("w"), 2);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
#endif

}  // namespace
}  // namespace fo::test
