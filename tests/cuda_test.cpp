// The CUDA backend against the CPU backend and against plain facts: bitwise equality with the
// CPU (both sides compile without FMA contraction), low-precision params with master weights,
// bfloat16 states, stochastic rounding, the non-finite skip, clipping, loss scaling, CUDA graph
// capture with a device-side lr, and tensors past 2^31 elements.
//
// Host code only (g++, the CUDA runtime API, no kernels). Every test skips where no GPU is
// visible, and the whole file is one skipped test in a build without CUDA. In
// fusedopt_emulated_device_test (FUSEDOPT_EMULATED_DEVICE) the GPU is the emulated device
// (docs/host-emulation.md) and the runtime API the part of it emulation/
// cuda_runtime_api_emulated.hpp gives: graphs, cuSOLVER and 20 GiB of memory are not there.
#include <gtest/gtest.h>

#include <cstdio>

#if defined(FUSEDOPT_WITH_CUDA) || defined(FUSEDOPT_EMULATED_DEVICE)

#if defined(FUSEDOPT_EMULATED_DEVICE)
#include "emulation/cuda_runtime_api_emulated.hpp"
#else
#include <cuda_runtime_api.h>
#endif

#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/newton_device.hpp"
#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

// Fails (and ends) the test if a CUDA runtime call does not return cudaSuccess.
#define CHECK_CUDA(call)                                                             \
  do {                                                                               \
    const cudaError_t fo_cuda_err_ = (call);                                         \
    if (fo_cuda_err_ != cudaSuccess)                                                 \
      GTEST_FAIL() << #call << " failed: " << cudaGetErrorName(fo_cuda_err_) << " (" \
                   << cudaGetErrorString(fo_cuda_err_) << ")";                       \
  } while (0)

namespace fo::test {
namespace {

/// For helpers that cannot use gtest's fatal assertions: throws (the test then fails with
/// the message) if a CUDA call failed.
void cuda_ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

/// An owning device array of n elements of T (cudaMalloc / cudaFree), with whole or partial
/// copies from and to host vectors. Copies wait for the device first, so they see every
/// step queued on any stream.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t n) : n_(n) {
    void* p = nullptr;
    cuda_ok(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    p_ = static_cast<T*>(p);
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() {
    if (p_) (void)cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  std::size_t size() const { return n_; }

  void upload(const std::vector<T>& host, std::size_t offset = 0) {
    if (offset + host.size() > n_) throw std::out_of_range("DeviceArray::upload past the end");
    if (host.empty()) return;
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda_ok(cudaMemcpy(p_ + offset, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
            "cudaMemcpy to the device");
  }
  std::vector<T> download(std::size_t offset, std::size_t count) const {
    if (offset + count > n_) throw std::out_of_range("DeviceArray::download past the end");
    std::vector<T> host(count);
    if (count == 0) return host;
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda_ok(cudaMemcpy(host.data(), p_ + offset, count * sizeof(T), cudaMemcpyDeviceToHost),
            "cudaMemcpy to the host");
    return host;
  }
  std::vector<T> download() const { return download(0, n_); }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

struct Stream {
  cudaStream_t s = nullptr;
  ~Stream() {
    if (s) (void)cudaStreamDestroy(s);
  }
};
struct Graph {
  cudaGraph_t g = nullptr;
  ~Graph() {
    if (g) (void)cudaGraphDestroy(g);
  }
};
struct GraphExec {
  cudaGraphExec_t e = nullptr;
  ~GraphExec() {
    if (e) (void)cudaGraphExecDestroy(e);
  }
};

// ----------------------------------------------------------------- tensors in one allocation

/// Where tensors lie in one allocation: each starts a few elements after the previous one ends,
/// at an offset whose residue mod 4 is random (the first at 1, the second at 0 mod 4), so most
/// tensors are misaligned for 16-byte (f32) and 8-byte (4 x 16-bit) vector accesses and some
/// are aligned. The gaps hold canaries that must survive every step.
struct Layout {
  std::vector<std::int64_t> sizes;
  std::vector<std::size_t> offsets;
  std::size_t total = 0;
};

Layout carve(const std::vector<std::int64_t>& sizes, std::mt19937_64& rng) {
  Layout l;
  l.sizes = sizes;
  std::size_t at = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::size_t residue = i == 0 ? 1 : i == 1 ? 0 : rng() % 4;
    at += 1;  // at least one canary before each tensor
    while (at % 4 != residue) ++at;
    l.offsets.push_back(at);
    at += static_cast<std::size_t>(sizes[i]);
  }
  l.total = at + 3;  // and a few after the last
  return l;
}

/// Sizes around every vector tail and chunk boundary (8192 elements per block), a few large
/// odd ones, and random ones up to 2^17, shuffled: `count` in all.
std::vector<std::int64_t> odd_sizes(std::mt19937_64& rng, std::size_t count) {
  std::vector<std::int64_t> s = {0,    1,    3,    4097, 100003, 2,     5,      7,    8,
                                 9,    15,   16,   17,   31,     33,    255,    257,  1023,
                                 1025, 8191, 8192, 8193, 16385,  24577, 262147, 65537};
  std::uniform_real_distribution<double> log2n(0.0, 17.0);
  while (s.size() < count) s.push_back(static_cast<std::int64_t>(std::exp2(log2n(rng))));
  std::shuffle(s.begin(), s.end(), rng);
  s.resize(count);
  return s;
}

/// One host image of the allocation: tensor i's values at its offset, `fill` in the gaps.
template <class T>
std::vector<T> pack(const Layout& l, const std::vector<std::vector<T>>& tensors, T fill) {
  std::vector<T> all(l.total, fill);
  for (std::size_t i = 0; i < tensors.size(); ++i)
    std::copy(tensors[i].begin(), tensors[i].end(),
              all.begin() + static_cast<std::ptrdiff_t>(l.offsets[i]));
  return all;
}

template <class T>
std::vector<T> slice(const Layout& l, const std::vector<T>& all, std::size_t i) {
  const auto b = all.begin() + static_cast<std::ptrdiff_t>(l.offsets[i]);
  return std::vector<T>(b, b + static_cast<std::ptrdiff_t>(l.sizes[i]));
}

std::string pname(std::size_t i) { return "p" + std::to_string(i); }

template <class T>
void add_params(Optimizer& opt, T* base, DType dtype, const Layout& l) {
  for (std::size_t i = 0; i < l.sizes.size(); ++i)
    opt.add_param(pname(i), base + l.offsets[i], dtype, {l.sizes[i]});
}

template <class T>
std::vector<const void*> pointers(const T* base, const Layout& l) {
  std::vector<const void*> p;
  for (std::size_t off : l.offsets) p.push_back(base + off);
  return p;
}

/// Random grads for every tensor of the layout (random_floats: a random scale per tensor).
std::vector<std::vector<float>> random_tensors(std::mt19937_64& rng, const Layout& l) {
  std::vector<std::vector<float>> g;
  for (std::int64_t n : l.sizes) g.push_back(random_floats(rng, static_cast<std::size_t>(n)));
  return g;
}

/// Every state of every param as float32, then each param's step count, with labels.
struct Holdings {
  std::vector<std::string> labels;
  std::vector<std::vector<float>> items;
};

Holdings holdings(const Optimizer& opt) {
  Holdings h;
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const std::string& name = opt.param_name(i);
    for (const auto& s : opt.state_names(name)) {
      h.labels.push_back(name + "." + s);
      h.items.push_back(opt.state(name, s));
    }
    h.labels.push_back(name + " step count");
    h.items.push_back({static_cast<float>(opt.step_count(name))});
    for (const auto& a : dense_algorithms()) {
      if (a.name != opt.algorithm()) continue;
      for (const auto& s : a.scalars) {  // a double's bits as two floats'
        const double v = opt.scalar_state(name, s);
        std::vector<float> bits(2);
        std::memcpy(bits.data(), &v, sizeof v);
        h.labels.push_back(name + "." + s);
        h.items.push_back(bits);
      }
    }
  }
  return h;
}

void expect_same(const Holdings& got, const Holdings& want, const std::string& what) {
  ASSERT_EQ(got.labels, want.labels) << what;
  for (std::size_t i = 0; i < got.items.size(); ++i)
    EXPECT_TRUE(bitwise_equal(got.items[i], want.items[i]))
        << what << ", " << got.labels[i] << ": " << first_difference(got.items[i], want.items[i]);
}

/// Each tensor of two images of the same layout bitwise equal, and the gaps still `canary`.
void expect_same_params(const Layout& l, const std::vector<float>& got,
                        const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), l.total);
  ASSERT_EQ(want.size(), l.total);
  for (std::size_t i = 0; i < l.sizes.size(); ++i) {
    const auto a = slice(l, got, i), b = slice(l, want, i);
    EXPECT_TRUE(bitwise_equal(a, b))
        << what << ", param " << pname(i) << " (" << l.sizes[i] << " elements at offset "
        << l.offsets[i] << "): " << first_difference(a, b);
  }
}

::testing::AssertionResult gaps_intact(const Layout& l, const std::vector<float>& all) {
  std::vector<bool> inside(l.total, false);
  for (std::size_t i = 0; i < l.sizes.size(); ++i)
    std::fill(inside.begin() + static_cast<std::ptrdiff_t>(l.offsets[i]),
              inside.begin() + static_cast<std::ptrdiff_t>(l.offsets[i]) + l.sizes[i], true);
  for (std::size_t j = 0; j < l.total; ++j)
    if (!inside[j] && std::memcmp(&all[j], &TestTensor::kCanary, sizeof(float)) != 0)
      return ::testing::AssertionFailure()
             << "a write landed outside the params, at element " << j << ": " << all[j];
  return ::testing::AssertionSuccess();
}

template <class T>
std::vector<std::uint16_t> bits_of(const std::vector<T>& v) {
  std::vector<std::uint16_t> b;
  b.reserve(v.size());
  for (const T& x : v) b.push_back(x.bits);
  return b;
}

std::string first_bits_difference(const std::vector<std::uint16_t>& got,
                                  const std::vector<std::uint16_t>& want) {
  if (got.size() != want.size()) return "sizes differ";
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      std::ostringstream s;
      s << "first difference at " << i << ": got 0x" << std::hex << got[i] << ", want 0x"
        << want[i];
      return s.str();
    }
  return "equal";
}

/// Options that give each algorithm all the states it can keep: its reference's richest variant.
std::vector<std::pair<std::string, double>> rich_options(const std::string& algorithm) {
  return ref::richest_options(algorithm);
}

void set_options(Optimizer& opt, const std::vector<std::pair<std::string, double>>& opts) {
  for (const auto& [k, v] : opts) opt.set_option(k, v);
}

/// One step of both optimizers on the same fresh grads (laid out as `gl`), then the params (as
/// `pl`, the gaps between them untouched) and every state compared bit for bit.
void step_both(std::mt19937_64& rng, Optimizer& cpu, std::vector<float>& cpu_p,
               std::vector<float>& cpu_g, Optimizer& gpu, DeviceArray<float>& gpu_p,
               DeviceArray<float>& gpu_g, const Layout& pl, const Layout& gl) {
  cpu_g = pack(gl, random_tensors(rng, gl), 0.0f);
  gpu_g.upload(cpu_g);
  cpu.step(pointers(cpu_g.data(), gl).data());
  gpu.step(pointers(gpu_g.get(), gl).data());
  const std::vector<float> got = gpu_p.download();
  expect_same_params(pl, got, cpu_p, "params");
  EXPECT_TRUE(gaps_intact(pl, got));
  expect_same(holdings(gpu), holdings(cpu), "states");
}

// ------------------------------------------------------------------------------- the tests

// The same ~40 params and grads on both backends, five steps of every algorithm: the CUDA
// kernel (vector and scalar paths, chunked blocks, multi-tensor launches) runs the same fp32
// operations as the CPU in the same order per element, and neither side contracts a*b+c into
// an FMA behind the code's back, so every bit must agree. (The per-step scalars, such as
// Adam's 1 - beta^t, are computed in double on the device there and on the host here, by
// fo::power's plain multiplications: the same bits on both.)
TEST(Cuda, GpuEqualsCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Layout pl = carve(odd_sizes(rng, 40), rng);
  const Layout gl = carve(pl.sizes, rng);  // grads at offsets of their own
  std::size_t misaligned = 0;
  for (std::size_t off : pl.offsets) misaligned += off % 4 != 0;
  ASSERT_GT(misaligned, pl.offsets.size() / 2);

  const ::testing::TestResult& result =
      *::testing::UnitTest::GetInstance()->current_test_info()->result();
  for (const auto& algo : dense_algorithms()) {
    SCOPED_TRACE(algo.name);
    if (algo.matrix_only) {  // muon: vectors are refused, and its iteration is OpenBLAS's here
      // and cuBLAS's there, not bitwise alike: its GPU check is a tolerance (docs/optimizers.md)
      std::printf("[ note ] %s left out: matrices only, and not bitwise across BLAS libraries\n",
                  algo.name.c_str());
      continue;
    }
    const int parts_before = result.total_part_count();
    const std::vector<float> p0 = pack(pl, random_tensors(rng, pl), TestTensor::kCanary);
    std::vector<float> cpu_p = p0, cpu_g(gl.total);
    DeviceArray<float> gpu_p(p0), gpu_g(gl.total);

    Optimizer cpu(algo.name), gpu(algo.name, Device::cuda);
    set_options(cpu, rich_options(algo.name));
    set_options(gpu, rich_options(algo.name));
    add_params(cpu, cpu_p.data(), DType::f32, pl);
    add_params(gpu, gpu_p.get(), DType::f32, pl);

    for (int t = 1; t <= 5; ++t) {
      SCOPED_TRACE("step " + std::to_string(t));
      step_both(rng, cpu, cpu_p, cpu_g, gpu, gpu_p, gpu_g, pl, gl);
      // One failing step is enough for this algorithm: the later ones would repeat it.
      if (result.total_part_count() != parts_before) break;
    }
  }
}

// Every algorithm but muon (a tolerance, MuonGpu) in one optimizer, params dealt to them in
// turn, options through "name.key": the groups of one step launch each algorithm's own
// kernels with the largest workspace any of them needs, and every bit equals the CPU's.
TEST(Cuda, MixedAlgorithmsEqualCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  std::vector<std::string> names;
  for (const auto& algo : dense_algorithms())
    if (!algo.matrix_only) names.push_back(algo.name);
  const Layout pl = carve(odd_sizes(rng, 3 * names.size()), rng);
  const Layout gl = carve(pl.sizes, rng);
  const std::vector<float> p0 = pack(pl, random_tensors(rng, pl), TestTensor::kCanary);
  std::vector<float> cpu_p = p0, cpu_g(gl.total);
  DeviceArray<float> gpu_p(p0), gpu_g(gl.total);
  Optimizer cpu(names.front()), gpu(names.front(), Device::cuda);
  for (const std::string& name : names)
    for (const auto& [key, value] : rich_options(name)) {
      cpu.set_option(name + "." + key, value);
      gpu.set_option(name + "." + key, value);
    }
  for (std::size_t i = 0; i < pl.sizes.size(); ++i) {
    const std::string& algorithm = names[i % names.size()];
    const std::string name = "p" + std::to_string(i);
    cpu.add_param(name, cpu_p.data() + pl.offsets[i], DType::f32, {pl.sizes[i]}, algorithm);
    gpu.add_param(name, gpu_p.get() + pl.offsets[i], DType::f32, {pl.sizes[i]}, algorithm);
  }
  for (int t = 1; t <= 4; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    step_both(rng, cpu, cpu_p, cpu_g, gpu, gpu_p, gpu_g, pl, gl);
  }
}

// Algorithms with factored states (adafactor): matrices, a batch of matrices and a vector
// (their row, column and per-element statistics), five steps, every bit of the params and
// the states equal to the CPU's (kernels/factored.hpp: one order of every sum on both).
TEST(Cuda, FactoredParamsEqualCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const std::vector<std::vector<std::int64_t>> shapes = {{33, 31},     {3, 40, 70}, {257, 1031},
                                                         {2, 3, 5, 9}, {1, 37},     {77}};
  int factored = 0;
  for (const auto& algo : dense_algorithms()) {
    try {
      ref::factored_state_names(algo.name, {2, 2});
    } catch (const std::invalid_argument&) {
      continue;  // no factored states: GpuEqualsCpuBitwise covers it
    }
    SCOPED_TRACE(algo.name);
    ++factored;
    Optimizer cpu(algo.name), gpu(algo.name, Device::cuda);
    set_options(cpu, rich_options(algo.name));
    set_options(gpu, rich_options(algo.name));
    std::vector<std::vector<float>> cpu_p;
    std::vector<std::unique_ptr<DeviceArray<float>>> gpu_p;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      std::int64_t n = 1;
      for (auto d : shapes[i]) n *= d;
      cpu_p.push_back(random_floats(rng, static_cast<std::size_t>(n)));
      gpu_p.push_back(std::make_unique<DeviceArray<float>>(cpu_p.back()));
      cpu.add_param("p" + std::to_string(i), cpu_p.back().data(), DType::f32, shapes[i]);
      gpu.add_param("p" + std::to_string(i), gpu_p.back()->get(), DType::f32, shapes[i]);
    }
    for (int t = 1; t <= 5; ++t) {
      SCOPED_TRACE("step " + std::to_string(t));
      std::vector<std::vector<float>> g;
      std::vector<std::unique_ptr<DeviceArray<float>>> gg;
      std::vector<const void*> cg, dg;
      for (const auto& p : cpu_p) {
        g.push_back(random_floats(rng, p.size()));
        gg.push_back(std::make_unique<DeviceArray<float>>(g.back()));
        cg.push_back(g.back().data());
        dg.push_back(gg.back()->get());
      }
      cpu.step(cg.data());
      gpu.step(dg.data());
      for (std::size_t i = 0; i < cpu_p.size(); ++i)
        EXPECT_TRUE(bitwise_equal(gpu_p[i]->download(), cpu_p[i]))
            << "param " << i << ": " << first_difference(gpu_p[i]->download(), cpu_p[i]);
      expect_same(holdings(gpu), holdings(cpu), "states");
    }
  }
  EXPECT_GT(factored, 0) << "no algorithm with factored states is registered";
}

// bf16 and f16 params with f32 master weights and f32 grads: the master copy is stepped in
// fp32 exactly as a float32 param on the CPU that starts at the widened 16-bit values, and the
// 16-bit param is the master rounded to nearest even after every step.
TEST(Cuda, Bf16AndF16ParamsWithMasterWeights) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {1, 3, 4097, 8193, 100003, 7, 0, 16};
  const Layout bl = carve(sizes, rng), hl = carve(sizes, rng);
  std::vector<std::int64_t> both = sizes;  // the bf16 params, then the f16 ones
  both.insert(both.end(), sizes.begin(), sizes.end());
  const Layout gl = carve(both, rng);  // the grads, and the CPU's float32 params

  // Initial values: random floats rounded to each format; the CPU starts from their widening.
  std::vector<std::vector<bf16>> b0;
  std::vector<std::vector<f16>> h0;
  std::vector<std::vector<float>> wide;
  for (const auto& v : random_tensors(rng, bl)) {
    b0.emplace_back();
    for (float x : v) b0.back().push_back(to_bf16(x));
  }
  for (const auto& v : random_tensors(rng, hl)) {
    h0.emplace_back();
    for (float x : v) h0.back().push_back(to_f16(x));
  }
  for (const auto& v : b0) {
    wide.emplace_back();
    for (bf16 x : v) wide.back().push_back(to_float(x));
  }
  for (const auto& v : h0) {
    wide.emplace_back();
    for (f16 x : v) wide.back().push_back(to_float(x));
  }
  DeviceArray<bf16> gpu_b(pack(bl, b0, bf16{0}));
  DeviceArray<f16> gpu_h(pack(hl, h0, f16{0}));
  // The CPU params: the bf16 ones as p0..p7, the f16 ones as p8..p15, in the grads' layout.
  std::vector<float> cpu_p = pack(gl, wide, TestTensor::kCanary);

  Optimizer gpu("adamw", Device::cuda), cpu("adamw");
  gpu.set_option("master_weights", 1);
  gpu.set_option("fp32_grads", 1);
  for (std::size_t i = 0; i < sizes.size(); ++i)
    gpu.add_param(pname(i), gpu_b.get() + bl.offsets[i], DType::bf16, {sizes[i]});
  for (std::size_t i = 0; i < sizes.size(); ++i)
    gpu.add_param(pname(sizes.size() + i), gpu_h.get() + hl.offsets[i], DType::f16, {sizes[i]});
  add_params(cpu, cpu_p.data(), DType::f32, gl);
  for (std::size_t i = 0; i < gpu.num_params(); ++i)
    ASSERT_EQ(gpu.state_names(pname(i)),
              (std::vector<std::string>{"exp_avg", "exp_avg_sq", "master"}));

  DeviceArray<float> gpu_g(gl.total);
  for (int t = 1; t <= 10; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    const std::vector<float> g = pack(gl, random_tensors(rng, gl), 0.0f);
    gpu_g.upload(g);
    gpu.step(pointers(gpu_g.get(), gl).data());
    cpu.step(pointers(g.data(), gl).data());
  }
  const std::vector<bf16> b = gpu_b.download();
  const std::vector<f16> h = gpu_h.download();
  for (std::size_t i = 0; i < gl.sizes.size(); ++i) {
    const std::string name = pname(i);
    SCOPED_TRACE(name + (i < sizes.size() ? " (bf16)" : " (f16)"));
    const std::vector<float> master = gpu.state(name, "master");
    const std::vector<float> want = slice(gl, cpu_p, i);
    EXPECT_TRUE(bitwise_equal(master, want)) << "master: " << first_difference(master, want);
    for (const char* s : {"exp_avg", "exp_avg_sq"}) {
      const std::vector<float> a = gpu.state(name, s), c = cpu.state(name, s);
      EXPECT_TRUE(bitwise_equal(a, c)) << s << ": " << first_difference(a, c);
    }
    EXPECT_EQ(gpu.step_count(name), 10);
    std::vector<std::uint16_t> got, rounded;
    if (i < sizes.size()) {
      got = bits_of(slice(bl, b, i));
      for (float x : master) rounded.push_back(to_bf16(x).bits);
    } else {
      got = bits_of(slice(hl, h, i - sizes.size()));
      for (float x : master) rounded.push_back(to_f16(x).bits);
    }
    EXPECT_EQ(got, rounded) << "param is not its master rounded to nearest even: "
                            << first_bits_difference(got, rounded);
  }
}

// The weight EMA of bf16 params with master weights follows the master (the f32 trajectory):
// bitwise the CPU's EMA of the same float32 params. swap_ema exchanges master and EMA and
// rounds the new master into the param; twice restores all three (no stochastic rounding).
TEST(Cuda, WeightEmaFollowsTheMasterAndSwapsBack) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {1, 3, 4097, 100003, 0, 16};
  const Layout bl = carve(sizes, rng), gl = carve(sizes, rng);
  std::vector<std::vector<bf16>> b0;
  std::vector<std::vector<float>> wide;
  for (const auto& v : random_tensors(rng, bl)) {
    b0.emplace_back();
    wide.emplace_back();
    for (float x : v) {
      b0.back().push_back(to_bf16(x));
      wide.back().push_back(to_float(to_bf16(x)));
    }
  }
  DeviceArray<bf16> gpu_b(pack(bl, b0, bf16{0}));
  std::vector<float> cpu_p = pack(gl, wide, TestTensor::kCanary);
  Optimizer gpu("adamw", Device::cuda), cpu("adamw");
  gpu.set_option("master_weights", 1);
  gpu.set_option("fp32_grads", 1);
  gpu.set_option("ema_decay", 0.9);
  cpu.set_option("ema_decay", 0.9);
  for (std::size_t i = 0; i < sizes.size(); ++i)
    gpu.add_param(pname(i), gpu_b.get() + bl.offsets[i], DType::bf16, {sizes[i]});
  add_params(cpu, cpu_p.data(), DType::f32, gl);
  DeviceArray<float> gpu_g(gl.total);
  for (int t = 1; t <= 5; ++t) {
    const std::vector<float> g = pack(gl, random_tensors(rng, gl), 0.0f);
    gpu_g.upload(g);
    gpu.step(pointers(gpu_g.get(), gl).data());
    cpu.step(pointers(g.data(), gl).data());
  }
  std::vector<std::vector<float>> master, ema;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    master.push_back(gpu.state(pname(i), "master"));
    ema.push_back(gpu.state(pname(i), "ema"));
    const std::vector<float> want = cpu.state(pname(i), "ema");
    EXPECT_TRUE(bitwise_equal(ema.back(), want))
        << pname(i) << ": " << first_difference(ema.back(), want);
  }
  const std::vector<bf16> b1 = gpu_b.download();
  gpu.swap_ema();
  const std::vector<bf16> b2 = gpu_b.download();
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(gpu.state(pname(i), "master"), ema[i])) << pname(i);
    EXPECT_TRUE(bitwise_equal(gpu.state(pname(i), "ema"), master[i])) << pname(i);
    std::vector<std::uint16_t> rounded;
    for (float x : ema[i]) rounded.push_back(to_bf16(x).bits);
    EXPECT_EQ(bits_of(slice(bl, b2, i)), rounded) << pname(i);
  }
  gpu.swap_ema();
  EXPECT_EQ(bits_of(gpu_b.download()), bits_of(b1));
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(gpu.state(pname(i), "master"), master[i])) << pname(i);
    EXPECT_TRUE(bitwise_equal(gpu.state(pname(i), "ema"), ema[i])) << pname(i);
  }
}

// bfloat16 states: Adam's moments are stored rounded to nearest even after every step, so
// the result drifts from the float32 run by their rounding, and no further.
//
// Tolerance. A bf16 value has 8 significant bits: rounding to nearest is off by at most half
// an ulp, 2^-8 relative (2^-9 to 2^-8 depending on where in its binade). exp_avg_sq is a positive
// average, so its relative error after t steps is at most about t * 2^-8; exp_avg can cancel, but
// its error stays a few 2^-8 of the grads' size while sqrt(exp_avg_sq) is of that size too. An Adam
// update is lr * m_hat / sqrt(v_hat) with |m_hat / sqrt(v_hat)| about 1 or less, so each step moves
// the param by at most a few lr * 2^-8 more or less than in fp32, and
//   |p_gpu - p_cpu| <= 5 steps * lr * 2^-7  (+ the fp32 rounding of p + update, 2^-24|p| a step)
// is generous: a host simulation of these grads (per-tensor scales 0.1 to 10) over 2 million
// elements saw at most half of it. Truncation instead of rounding, an error that piles up, or a
// moment read back with the wrong bits is far outside; a state left in fp32 shows in the
// check that every state read back is a bf16 value.
TEST(Cuda, Bf16States) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Layout l = carve({1, 17, 4097, 100003, 262147, 8193}, rng);
  const std::vector<float> p0 = pack(l, random_tensors(rng, l), TestTensor::kCanary);
  std::vector<float> cpu_p = p0;
  DeviceArray<float> gpu_p(p0), gpu_g(l.total);
  Optimizer gpu("adam", Device::cuda), cpu("adam");
  gpu.set_option("state_dtype", 2);
  const double lr = cpu.option("lr");
  add_params(gpu, gpu_p.get(), DType::f32, l);
  add_params(cpu, cpu_p.data(), DType::f32, l);
  constexpr int kSteps = 5;
  for (int t = 1; t <= kSteps; ++t) {
    const std::vector<float> g = pack(l, random_tensors(rng, l), 0.0f);
    gpu_g.upload(g);
    gpu.step(pointers(gpu_g.get(), l).data());
    cpu.step(pointers(g.data(), l).data());
  }
  const std::vector<float> got = gpu_p.download();
  EXPECT_TRUE(gaps_intact(l, got));
  const double u8 = std::ldexp(1.0, -8), u24 = std::ldexp(1.0, -24);
  for (std::size_t i = 0; i < l.sizes.size(); ++i) {
    const std::string name = pname(i);
    SCOPED_TRACE(name);
    const auto a = slice(l, got, i), c = slice(l, cpu_p, i);
    int bad = 0;
    for (std::size_t j = 0; j < a.size(); ++j) {
      const double tol = kSteps * lr * 2 * u8 + 2 * kSteps * u24 * std::abs(c[j]);
      if (!(std::abs(static_cast<double>(a[j]) - c[j]) <= tol) && ++bad <= 5)
        ADD_FAILURE() << "param[" << j << "]: gpu " << a[j] << ", cpu " << c[j] << ", tol " << tol;
    }
    EXPECT_EQ(bad, 0);
    for (const char* s : {"exp_avg", "exp_avg_sq"}) {
      const std::vector<float> st = gpu.state(name, s);
      for (std::size_t j = 0; j < st.size(); ++j) {
        const float back = to_float(to_bf16(st[j]));
        ASSERT_EQ(std::memcmp(&back, &st[j], sizeof(float)), 0)
            << s << "[" << j << "] = " << st[j] << " is not a bfloat16 value";
      }
    }
    // exp_avg_sq: each step's stored value is a positive average of the previous one (off by
    // its relative error) and g^2, rounded once more: relative error <= t * 2^-8 (+ fp32).
    const std::vector<float> v = gpu.state(name, "exp_avg_sq"), w = cpu.state(name, "exp_avg_sq");
    for (std::size_t j = 0; j < v.size(); ++j)
      ASSERT_LE(std::abs(static_cast<double>(v[j]) - w[j]), (kSteps + 1) * u8 * w[j])
          << "exp_avg_sq[" << j << "]";
  }
}

// Stochastic rounding of bf16 params (no master weights): updates far below half a bf16 ulp
// vanish under round to nearest, and survive on average under stochastic rounding, with
// draws that depend on the seed and nothing else.
TEST(Cuda, StochasticRoundingIsReproducibleAndUnbiased) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  constexpr std::size_t n = 1000000;
  constexpr int kSteps = 3;
  // Params in [1, 2]: a bf16 ulp of 2^-7 (2^-8 just below 1). The update lr * g = 0.01 *
  // 0.078125 ~ 2^-10.3 is a tenth of an ulp: round to nearest never moves a param, stochastic
  // rounding moves one a whole ulp with probability ~0.1.
  std::vector<bf16> p0(n);
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  for (auto& x : p0) x = to_bf16(unit(rng));
  const float lr = 0.01f, g = 0.078125f;  // g = 5 * 2^-6: exact in bf16
  const std::vector<bf16> grad(n, to_bf16(g));
  DeviceArray<bf16> d_grad(grad);

  // `offset` elements into its allocation: 1 puts the param off the 8-byte alignment of the
  // kernel's vector path, whose draws must be those of the scalar path.
  auto run = [&](bool stochastic, double seed, std::size_t offset) {
    std::vector<bf16> host(offset, bf16{0});
    host.insert(host.end(), p0.begin(), p0.end());
    DeviceArray<bf16> p(host);
    Optimizer opt("sgd", Device::cuda);
    opt.set_option("lr", lr);
    opt.set_option("stochastic_rounding", stochastic ? 1 : 0);
    opt.set_option("seed", seed);
    opt.add_param("w", p.get() + offset, DType::bf16, {static_cast<std::int64_t>(n)});
    for (int t = 0; t < kSteps; ++t) opt.step({d_grad.get()});
    return bits_of(p.download(offset, n));
  };
  const std::vector<std::uint16_t> start = bits_of(p0);
  const auto a = run(true, 7, 0), b = run(true, 7, 0), c = run(true, 8, 0);
  const auto shifted = run(true, 7, 1), nearest = run(false, 7, 0);
  EXPECT_EQ(a, b) << "two runs with seed 7 differ: " << first_bits_difference(a, b);
  EXPECT_EQ(shifted, a) << "the draws depend on the alignment: "
                        << first_bits_difference(shifted, a);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < n; ++i) differ += a[i] != c[i];
  EXPECT_GT(differ, n / 100) << "seeds 7 and 8 give (nearly) the same draws";
  EXPECT_EQ(nearest, start) << "round to nearest moved a param by less than half an ulp: "
                            << first_bits_difference(nearest, start);
  // Unbiased: the mean change is kSteps * (-lr * g). Its standard deviation over 10^6 params
  // is about 2^-7 * sqrt(kSteps * 0.09 / 10^6) ~ 4e-6, against 5% of 2.3e-3 = 1.2e-4.
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i)
    sum += static_cast<double>(to_float(bf16{a[i]})) - to_float(p0[i]);
  const double mean = sum / static_cast<double>(n);
  const double want = -kSteps * static_cast<double>(lr) * g;
  EXPECT_NEAR(mean, want, 0.05 * std::abs(want));
}

// ------------------------------------------------------------------ every storage, both backends

/// A storage combination of a dense step (the step settings that choose it).
struct StorageCase {
  DType param;
  bool fp32_grads;
  DType state;
  bool master;
  bool stochastic;
  bool ema;
};

std::string describe(const StorageCase& c) {
  return std::string(dtype_name(c.param)) + " params, " +
         (c.fp32_grads ? "float32" : dtype_name(c.param)) + " grads, " + dtype_name(c.state) +
         " states" + (c.master ? ", master" : "") + (c.stochastic ? ", stochastic" : "") +
         (c.ema ? ", ema" : "");
}

/// `all` (one image of a Layout, as float) stored as `dtype`: its bytes, rounded to nearest.
std::vector<unsigned char> encode(const std::vector<float>& all, DType dtype) {
  std::vector<unsigned char> out(all.size() * dtype_size(dtype));
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (dtype == DType::f32) {
      std::memcpy(out.data() + 4 * i, &all[i], 4);
    } else {
      const std::uint16_t b = dtype == DType::bf16 ? to_bf16(all[i]).bits : to_f16(all[i]).bits;
      std::memcpy(out.data() + 2 * i, &b, 2);
    }
  }
  return out;
}

void configure(Optimizer& opt, const StorageCase& c,
               const std::vector<std::pair<std::string, double>>& options) {
  set_options(opt, options);
  opt.set_option("master_weights", c.master ? 1 : 0);
  opt.set_option("fp32_grads", c.fp32_grads ? 1 : 0);
  opt.set_option("state_dtype", static_cast<double>(static_cast<int>(c.state)));
  opt.set_option("stochastic_rounding", c.stochastic ? 1 : 0);
  opt.set_option("seed", 12345);
  if (c.ema) opt.set_option("ema_decay", 0.9);
  if (c.master || !c.stochastic) {  // the norm pass over 16-bit or f32 grads, clipping by it
    opt.set_option("max_grad_norm", 0.5);
    opt.set_option("skip_nonfinite", 1);
  }
}

/// `steps` steps of `algorithm` with storage `c` on a CPU and a CUDA optimizer, the same
/// params and grads: after each, every byte of the params (the gaps' canaries too) and every
/// state, master and EMA (as float32) equal. Returns false where the CPU refused the
/// storage for this algorithm (fo::Error unsupported, before anything changed).
bool steps_equal(std::mt19937_64& rng, const std::string& algorithm, const StorageCase& c,
                 const std::vector<std::vector<std::int64_t>>& shapes, int steps) {
  SCOPED_TRACE(algorithm + ": " + describe(c));
  std::vector<std::int64_t> sizes;
  for (const auto& shape : shapes) {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    sizes.push_back(n);
  }
  const Layout pl = carve(sizes, rng), gl = carve(sizes, rng);
  const std::size_t pe = dtype_size(c.param);
  const DType grad_dtype = c.fp32_grads ? DType::f32 : c.param;
  const std::size_t ge = dtype_size(grad_dtype);
  std::vector<unsigned char> cpu_p =
      encode(pack(pl, random_tensors(rng, pl), TestTensor::kCanary), c.param);
  DeviceArray<unsigned char> gpu_p(cpu_p), gpu_g(gl.total * ge);
  Optimizer cpu(algorithm), gpu(algorithm, Device::cuda);
  configure(cpu, c, rich_options(algorithm));
  configure(gpu, c, rich_options(algorithm));
  // Fresh grads: their host bytes, uploaded, and each param's grad pointer on both sides.
  const auto next_grads = [&](std::vector<unsigned char>& g, std::vector<const void*>& cg,
                              std::vector<const void*>& dg) {
    g = encode(pack(gl, random_tensors(rng, gl), 0.0f), grad_dtype);
    gpu_g.upload(g);
    for (std::size_t off : gl.offsets) {
      cg.push_back(g.data() + off * ge);
      dg.push_back(gpu_g.get() + off * ge);
    }
  };
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    cpu.add_param(pname(i), cpu_p.data() + pl.offsets[i] * pe, c.param, shapes[i]);
    gpu.add_param(pname(i), gpu_p.get() + pl.offsets[i] * pe, c.param, shapes[i]);
  }
  const ::testing::TestResult& result =
      *::testing::UnitTest::GetInstance()->current_test_info()->result();
  const int parts_before = result.total_part_count();
  for (int t = 1; t <= steps; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    std::vector<unsigned char> g;
    std::vector<const void*> cg, dg;
    next_grads(g, cg, dg);
    if (t == 1) {
      const std::vector<unsigned char> before = cpu_p;
      try {
        cpu.step(cg.data());
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), StatusCode::unsupported) << e.what();
        EXPECT_EQ(cpu_p, before) << "a refused step changed the params";
        EXPECT_EQ(cpu.step_count(pname(0)), 0);
        return false;
      }
    } else {
      cpu.step(cg.data());
    }
    gpu.step(dg.data());
    const std::vector<unsigned char> got = gpu_p.download();
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const auto at = static_cast<std::ptrdiff_t>(pl.offsets[i] * pe);
      const auto len = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(sizes[i]) * pe);
      EXPECT_TRUE(std::equal(got.begin() + at, got.begin() + at + len, cpu_p.begin() + at))
          << "the bytes of param " << pname(i) << " (" << sizes[i] << " elements) differ";
    }
    EXPECT_EQ(got, cpu_p) << "the params' allocations differ (a write outside a param?)";
    expect_same(holdings(gpu), holdings(cpu), "states");
    const float cpu_norm = cpu.grad_norm(), gpu_norm = gpu.grad_norm();
    EXPECT_EQ(std::memcmp(&cpu_norm, &gpu_norm, sizeof(float)), 0)
        << "grad_norm: cpu " << cpu_norm << ", cuda " << gpu_norm;
    if (result.total_part_count() != parts_before) break;  // the later steps would repeat it
  }
  if (result.total_part_count() != parts_before) return true;
  const auto same_bytes = [&](const Optimizer& c_opt, const std::vector<unsigned char>& c_p,
                              const std::string& what) {
    EXPECT_EQ(gpu_p.download(), c_p) << what << ": the params' bytes differ";
    expect_same(holdings(gpu), holdings(c_opt), what);
  };
  // A CPU fallback resumes the CUDA run as it was: its checkpoint loaded onto the CPU (the
  // params' bytes copied), one more step on both.
  {
    std::string dir = (std::filesystem::temp_directory_path() / "fusedopt-storage-XXXXXX").string();
    if (!::mkdtemp(dir.data())) throw std::runtime_error("mkdtemp failed");
    gpu.save(dir + "/ckpt");
    std::vector<unsigned char> resumed_p = gpu_p.download();
    Optimizer resumed(algorithm);
    configure(resumed, c, rich_options(algorithm));  // its state storage is its own, as the run's
    for (std::size_t i = 0; i < sizes.size(); ++i)
      resumed.add_param(pname(i), resumed_p.data() + pl.offsets[i] * pe, c.param, shapes[i]);
    resumed.load(dir + "/ckpt");
    std::filesystem::remove_all(dir);
    std::vector<unsigned char> g;
    std::vector<const void*> cg, dg;
    next_grads(g, cg, dg);
    resumed.step(cg.data());
    cpu.step(cg.data());
    gpu.step(dg.data());
    same_bytes(resumed, resumed_p, "resumed from the CUDA checkpoint");
    EXPECT_EQ(resumed_p, cpu_p) << "the resumed CPU run left the CPU run";
  }
  // The evaluation form (Schedule-Free) and the weight EMA into the params: the same bytes.
  for (const auto& d : dense_algorithms()) {
    if (d.name != algorithm || !d.eval) continue;
    cpu.eval();
    gpu.eval();
    same_bytes(cpu, cpu_p, "eval()");
    cpu.train();
    gpu.train();
    same_bytes(cpu, cpu_p, "train()");
  }
  if (c.ema) {
    if (c.master || c.param == DType::f32) {
      cpu.swap_ema();
      gpu.swap_ema();
      same_bytes(cpu, cpu_p, "swap_ema()");
    } else {
      cpu.copy_ema_to_params();
      gpu.copy_ema_to_params();
      same_bytes(cpu, cpu_p, "copy_ema_to_params()");
    }
  }
  return true;
}

/// steps_equal of vectors of these sizes.
bool steps_equal(std::mt19937_64& rng, const std::string& algorithm, const StorageCase& c,
                 const std::vector<std::int64_t>& sizes, int steps) {
  std::vector<std::vector<std::int64_t>> shapes;
  for (std::int64_t n : sizes) shapes.push_back({n});
  return steps_equal(rng, algorithm, c, shapes, steps);
}

// Every storage the CUDA backend takes, stepped by the CPU's storage layer (cpu_backend.hpp,
// Storage): bf16 and f16 params with their own or f32 grads, f32 or bf16 states, with and
// without f32 master weights, rounded to nearest or stochastically, with a weight EMA: the
// same bytes as the CUDA kernel (in emulation, its own source). Every combination with adam,
// mixed ones with every algorithm but muon (matrices only: MultiPassKinds... below).
TEST(Cuda, EveryStorageEqualsTheCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {1, 3, 4097, 30001, 0, 1025};
  int cases = 0;
  for (DType param : {DType::f32, DType::bf16, DType::f16})
    for (bool fp32_grads : {false, true})
      for (DType state : {DType::f32, DType::bf16})
        for (bool master : {false, true})
          for (bool stochastic : {false, true}) {
            if (param == DType::f32 && (fp32_grads || master)) continue;  // the same storage
            const StorageCase c{param, fp32_grads, state, master, stochastic, cases % 3 == 0};
            EXPECT_TRUE(steps_equal(rng, "adam", c, sizes, 3)) << "refused: " << describe(c);
            ++cases;
          }
  EXPECT_EQ(cases, 36);
  // Block-quantized states (docs/quantized-states.md): params under min_quant_size (1, 3,
  // 1025) keep float32 states, so each step launches both kinds of group.
  for (DType param : {DType::f32, DType::bf16})
    for (DType state : {DType::q8, DType::q4})
      for (bool stochastic : {false, true}) {
        const StorageCase c{param, false, state, param != DType::f32, stochastic, stochastic};
        EXPECT_TRUE(steps_equal(rng, "adamw", c, sizes, 3)) << "refused: " << describe(c);
      }
  const std::vector<StorageCase> mixed = {{DType::bf16, true, DType::bf16, true, true, true},
                                          {DType::f16, false, DType::bf16, false, false, false},
                                          {DType::f32, false, DType::q8, false, true, false},
                                          {DType::bf16, true, DType::q4, true, false, true}};
  // Quantized states are refused, on both backends, by the kinds whose step is not one
  // elementwise pass (trust ratio, factored) and by Schedule-Free (its z copies the weights);
  // a stateless algorithm (signsgd) has nothing to quantize and steps.
  const std::vector<std::string> multi_pass = {"lamb", "lars", "adafactor"};
  for (const auto& algo : dense_algorithms()) {
    if (algo.matrix_only) continue;  // muon: matrices only (below)
    const bool two_pass =
        std::find(multi_pass.begin(), multi_pass.end(), algo.name) != multi_pass.end();
    for (const StorageCase& c : mixed) {
      const bool quantized = c.state == DType::q8 || c.state == DType::q4;
      if (two_pass && !quantized) continue;  // every float storage: the test below
      const bool from_weights =
          algo.name == "sgd_schedule_free" || algo.name == "adamw_schedule_free";
      const bool refused = quantized && !algo.states.empty() && (!algo.quantizable || from_weights);
      EXPECT_EQ(steps_equal(rng, algo.name, c, sizes, 3), !refused)
          << algo.name << ", " << describe(c);
    }
  }
}

// The kinds of more than one pass over a tensor take every float storage on the CPU as on
// CUDA: lamb and lars (a trust ratio between two passes; bf16 states rounded as stored before
// pass one's norm uses them) and adafactor (its row, column or per-element statistics rounded
// as stored before the normalizer, the norms and the update use them), over matrices (a
// batch of them too) and vectors, each storage combination, every byte equal for three steps
// and through a checkpoint. (Muon's elementwise passes take the same storage layer; its
// iteration is cuBLAS, which emulation cannot run: CpuStorage.MatrixAndFloat32StateStepsAre...)
TEST(Cuda, MultiPassKindsEveryStorageEqualsTheCpuBitwise) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  // Shapes: a scalar, matrices (one row; a batch), a vector of two chunks of pass one (8192
  // elements: the CPU's unit there), an empty one.
  const std::vector<std::vector<std::int64_t>> shapes = {{1},    {37, 45},  {3, 33, 70},
                                                         {8193}, {2, 1, 5}, {0}};
  // Half the 36 combinations per algorithm: those of one parity of the settings' sum (a
  // half fraction: each algorithm meets every value of every setting, and every pair of
  // settings' values but one; the emulated launches cost about a second a combination).
  const std::vector<std::string> algorithms = {"lamb", "lars", "adafactor"};
  for (std::size_t a = 0; a < algorithms.size(); ++a) {
    int cases = 0, run = 0;
    for (int pi = 0; pi < 3; ++pi)
      for (bool fp32_grads : {false, true})
        for (DType state : {DType::f32, DType::bf16})
          for (bool master : {false, true})
            for (bool stochastic : {false, true}) {
              const DType param = pi == 0 ? DType::f32 : pi == 1 ? DType::bf16 : DType::f16;
              if (param == DType::f32 && (fp32_grads || master)) continue;  // the same storage
              ++cases;
              const int settings = pi + fp32_grads + (state == DType::bf16) + master + stochastic;
              if ((settings + static_cast<int>(a)) % 2 != 0) continue;
              const StorageCase c{param, fp32_grads, state, master, stochastic, run % 3 == 0};
              EXPECT_TRUE(steps_equal(rng, algorithms[a], c, shapes, 3))
                  << algorithms[a] << " refused: " << describe(c);
              ++run;
            }
    EXPECT_EQ(cases, 36) << algorithms[a];
    EXPECT_EQ(run, 18) << algorithms[a];
  }
}

// skip_nonfinite: a NaN or inf anywhere in any grad skips the whole step on every param,
// checked on the device with no host round trip; the step counts stay where they were, so a
// skipped first step leaves the next one a first step.
TEST(Cuda, SkipNonFinite) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Layout pl = carve({37, 1000, 1, 4099, 8193}, rng), gl = carve(pl.sizes, rng);
  const std::vector<std::pair<std::string, std::vector<std::pair<std::string, double>>>> algos = {
      {"adam", {}}, {"sgd", {{"momentum", 0.9}}}};
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (const auto& entry : algos) {
      const std::string algorithm = entry.first;  // (lambdas capture no structured bindings
      const auto opts = entry.second;             // in C++17)
      SCOPED_TRACE(algorithm + (std::isnan(bad) ? ", NaN" : ", +inf"));
      const std::vector<float> p0 = pack(pl, random_tensors(rng, pl), TestTensor::kCanary);
      auto bad_grads = [&] {
        std::vector<float> g = pack(gl, random_tensors(rng, gl), 0.0f);
        g[gl.offsets[1] + rng() % 1000] = bad;  // one element of the second param's grad
        return g;
      };
      struct Run {
        std::vector<float> cpu_p;
        DeviceArray<float> gpu_p, gpu_g;
        Optimizer cpu, gpu;
        Run(const std::vector<float>& p, std::size_t grad_total, const std::string& a)
            : cpu_p(p), gpu_p(p), gpu_g(grad_total), cpu(a), gpu(a, Device::cuda) {}
        std::pair<std::vector<float>, Holdings> gpu_snapshot() const {
          return {gpu_p.download(), holdings(gpu)};
        }
      };
      auto make_run = [&] {
        auto r = std::make_unique<Run>(p0, gl.total, algorithm);
        set_options(r->cpu, opts);
        set_options(r->gpu, opts);
        r->gpu.set_option("skip_nonfinite", 1);
        add_params(r->cpu, r->cpu_p.data(), DType::f32, pl);
        add_params(r->gpu, r->gpu_p.get(), DType::f32, pl);
        return r;
      };
      auto gpu_step = [&](Run& r, const std::vector<float>& g) {
        r.gpu_g.upload(g);
        r.gpu.step(pointers(r.gpu_g.get(), gl).data());
      };
      auto good_step = [&](Run& r) {  // the same good grads on both
        const std::vector<float> g = pack(gl, random_tensors(rng, gl), 0.0f);
        gpu_step(r, g);
        r.cpu.step(pointers(g.data(), gl).data());
        return g;
      };
      auto expect_unchanged = [&](const Run& r, const std::pair<std::vector<float>, Holdings>& s,
                                  const std::string& what) {
        const auto now = r.gpu_snapshot();
        expect_same_params(pl, now.first, s.first, what);
        expect_same(now.second, s.second, what);
      };
      auto expect_equals_cpu = [&](const Run& r, const std::string& what) {
        expect_same_params(pl, r.gpu_p.download(), r.cpu_p, what);
        expect_same(holdings(r.gpu), holdings(r.cpu), what);
      };

      {  // The very first step is bad.
        auto r = make_run();
        const auto before = r->gpu_snapshot();
        gpu_step(*r, bad_grads());
        expect_unchanged(*r, before, "after a skipped first step");
        EXPECT_FALSE(std::isfinite(r->gpu.grad_norm()));
        for (std::size_t i = 0; i < pl.sizes.size(); ++i) EXPECT_EQ(r->gpu.step_count(pname(i)), 0);
        const std::vector<float> g = good_step(*r);
        expect_equals_cpu(*r, "a good step after a skipped first step");
        for (std::size_t i = 0; i < pl.sizes.size(); ++i) {
          EXPECT_EQ(r->gpu.step_count(pname(i)), 1);
          if (algorithm == "sgd") {  // a first step: the buffer starts as g
            const auto buf = r->gpu.state(pname(i), "momentum_buffer"), gi = slice(gl, g, i);
            EXPECT_TRUE(bitwise_equal(buf, gi)) << first_difference(buf, gi);
          }
        }
      }
      {  // Three good steps, a bad one, and a good one: the CPU's fourth step.
        auto r = make_run();
        for (int t = 0; t < 3; ++t) good_step(*r);
        expect_equals_cpu(*r, "three good steps");
        const auto before = r->gpu_snapshot();
        gpu_step(*r, bad_grads());
        expect_unchanged(*r, before, "after a skipped fourth step");
        good_step(*r);
        expect_equals_cpu(*r, "the good step after the skipped one");
        for (std::size_t i = 0; i < pl.sizes.size(); ++i) EXPECT_EQ(r->gpu.step_count(pname(i)), 4);
      }
    }
  }
}

// Global-norm clipping on the GPU against the CPU. Both square the scaled float gradients and
// sum the squares in double, the GPU in a fixed tree order and the CPU over fixed chunks: the
// sums differ by reordering only (relative 1e-10 at these sizes), so the float norms agree
// to within the final float rounding: 2 ulp, not bitwise. The
// coefficient scales every grad; one off by 1e-6 relative moves SGD's three updates of
// ~lr * coef * |g| (~1e-3 here) by ~1e-9, far below 1e-7 + 1e-6 |p|, while a coefficient that is
// not applied at all moves them 20-fold. (Adam is nearly scale invariant: only its SGD case can
// see a missing coefficient; Adam checks that clipping leaves it alone as it should.)
TEST(Cuda, ClippingMatchesCpu) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Layout pl = carve({37, 1000, 1, 4099, 100003}, rng), gl = carve(pl.sizes, rng);
  const std::vector<std::pair<std::string, std::vector<std::pair<std::string, double>>>> algos = {
      {"sgd", {{"lr", 0.1}, {"momentum", 0.9}}}, {"adam", {}}};
  // Grads rescaled to a global norm of ~10, twenty times the limit.
  auto grads = [&] {
    auto g = random_tensors(rng, gl);
    double s = 0.0;
    for (const auto& v : g)
      for (float x : v) s += static_cast<double>(x) * x;
    const auto k = static_cast<float>(10.0 / std::sqrt(s));
    for (auto& v : g)
      for (auto& x : v) x *= k;
    return pack(gl, g, 0.0f);
  };
  for (const auto& [algorithm, opts] : algos) {
    SCOPED_TRACE(algorithm);
    const std::vector<float> p0 = pack(pl, random_tensors(rng, pl), TestTensor::kCanary);
    {  // Clipping active: close to the CPU.
      std::vector<float> cpu_p = p0;
      DeviceArray<float> gpu_p(p0), gpu_g(gl.total);
      Optimizer cpu(algorithm), gpu(algorithm, Device::cuda);
      for (Optimizer* o : {&cpu, &gpu}) {
        set_options(*o, opts);
        o->set_option("max_grad_norm", 0.5);
      }
      add_params(cpu, cpu_p.data(), DType::f32, pl);
      add_params(gpu, gpu_p.get(), DType::f32, pl);
      for (int t = 0; t < 3; ++t) {
        const std::vector<float> g = grads();
        gpu_g.upload(g);
        gpu.step(pointers(gpu_g.get(), gl).data());
        cpu.step(pointers(g.data(), gl).data());
        const float gn = gpu.grad_norm(), cn = cpu.grad_norm();
        EXPECT_NEAR(gn, cn, 2.0 * std::numeric_limits<float>::epsilon() * cn) << "step " << t + 1;
        EXPECT_NEAR(cn, 10.0, 0.01);
      }
      const std::vector<float> got = gpu_p.download();
      EXPECT_TRUE(gaps_intact(pl, got));
      int bad = 0;
      for (std::size_t j = 0; j < pl.total; ++j) {
        const double tol = 1e-6 * std::abs(cpu_p[j]) + 1e-7;
        if (!(std::abs(static_cast<double>(got[j]) - cpu_p[j]) <= tol) && ++bad <= 5)
          ADD_FAILURE() << "param element " << j << " of the allocation: gpu " << got[j] << ", cpu "
                        << cpu_p[j];
      }
      EXPECT_EQ(bad, 0);
    }
    {  // A limit above the norm: the coefficient is exactly 1, bitwise no clipping.
      DeviceArray<float> a_p(p0), b_p(p0), d_g(gl.total);
      Optimizer loose(algorithm, Device::cuda), none(algorithm, Device::cuda);
      set_options(loose, opts);
      set_options(none, opts);
      loose.set_option("max_grad_norm", 1e6);
      add_params(loose, a_p.get(), DType::f32, pl);
      add_params(none, b_p.get(), DType::f32, pl);
      for (int t = 0; t < 3; ++t) {
        d_g.upload(grads());
        loose.step(pointers(d_g.get(), gl).data());
        none.step(pointers(d_g.get(), gl).data());
      }
      expect_same_params(pl, a_p.download(), b_p.download(), "max_grad_norm above the norm");
      expect_same(holdings(loose), holdings(none), "max_grad_norm above the norm");
    }
  }
}

// After an out-of-memory, which the library reports as changing nothing, the caller may go
// on: the failed cudaMalloc's error must not stay behind as the thread's last error for the
// next launch check to throw (as it did with cudaPeekAtLastError and no clearing).
TEST(Cuda, AnOutOfMemoryLeavesLaterStepsWorking) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  DeviceArray<float> p(64), g(std::vector<float>(64, 0.5f));
  {
    Optimizer huge("adam", Device::cuda);
    // States of 2^38 floats (1 TiB each): more than any GPU has. No kernel ever runs on the
    // too-small buffers: the states are allocated before the step.
    huge.add_param("w", p.get(), DType::f32, {std::int64_t{1} << 38});
    try {
      huge.step({g.get()});
      ADD_FAILURE() << "a 1 TiB state was allocated";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::out_of_memory) << e.what();
    }
  }
  Optimizer ok("adam", Device::cuda);
  ok.add_param("w", p.get(), DType::f32, {64});
  EXPECT_NO_THROW(ok.step({g.get()}));
  EXPECT_NO_THROW(ok.step({g.get()}));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(ok.step_count("w"), 2);
}

// Clipping and the non-finite check with every grad null: the norm pass still runs, over
// nothing, so grad_norm() is 0 as on the CPU (it once read unwritten device memory).
TEST(Cuda, GradNormWithEveryGradNullIsZeroAsOnTheCpu) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  std::vector<float> host_p(100, 1.0f);
  DeviceArray<float> p(host_p);
  Optimizer gpu("sgd", Device::cuda), cpu("sgd");
  for (Optimizer* o : {&gpu, &cpu}) {
    o->set_option("max_grad_norm", 1.0);
    o->set_option("skip_nonfinite", 1);
  }
  gpu.add_param("w", p.get(), DType::f32, {100});
  cpu.add_param("w", host_p.data(), DType::f32, {100});
  gpu.step({nullptr});
  cpu.step({nullptr});
  EXPECT_EQ(cpu.grad_norm(), 0.0f);
  EXPECT_EQ(gpu.grad_norm(), cpu.grad_norm());
  EXPECT_EQ(gpu.step_count("w"), 0);
}

// A loss scale of 1024 with grads 1024 times larger is exactly no loss scale: multiplying by
// 2^10 and by 2^-10 is exact in fp32 (no overflow or underflow at these magnitudes).
TEST(Cuda, GradScale) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const Layout pl = carve({37, 1000, 1, 4099, 100003}, rng), gl = carve(pl.sizes, rng);
  for (const auto& algo : dense_algorithms()) {
    SCOPED_TRACE(algo.name);
    if (algo.matrix_only) {  // muon steps no vectors (these params are vectors)
      std::printf("[ note ] %s left out: it steps matrices only\n", algo.name.c_str());
      continue;
    }
    const std::vector<float> p0 = pack(pl, random_tensors(rng, pl), TestTensor::kCanary);
    DeviceArray<float> a_p(p0), b_p(p0), a_g(gl.total), b_g(gl.total);
    Optimizer scaled(algo.name, Device::cuda), plain(algo.name, Device::cuda);
    set_options(scaled, rich_options(algo.name));
    set_options(plain, rich_options(algo.name));
    scaled.set_option("grad_scale", 1024);
    add_params(scaled, a_p.get(), DType::f32, pl);
    add_params(plain, b_p.get(), DType::f32, pl);
    for (int t = 0; t < 3; ++t) {
      std::vector<float> g = pack(gl, random_tensors(rng, gl), 0.0f);
      b_g.upload(g);
      for (float& x : g) x *= 1024.0f;
      a_g.upload(g);
      scaled.step(pointers(a_g.get(), gl).data());
      plain.step(pointers(b_g.get(), gl).data());
    }
    expect_same_params(pl, a_p.download(), b_p.download(), "grad_scale 1024");
    expect_same(holdings(scaled), holdings(plain), "grad_scale 1024");
  }
}

// Host memory handed to a CUDA optimizer is refused before any kernel could touch it (an
// illegal address would end the CUDA context for the whole process), and nothing changes.
TEST(Cuda, HostPointersAreRejected) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto rng = make_rng();
  const std::vector<float> p0 = random_floats(rng, 1000);
  DeviceArray<float> p(p0), g(random_floats(rng, 1000));
  std::vector<float> host_grad = random_floats(rng, 1000);
  Optimizer opt("adam", Device::cuda);
  opt.add_param("w", p.get(), DType::f32, {1000});
  opt.step({g.get()});  // a device grad: checked once, then remembered
  const std::vector<float> after_one = p.download();
  const std::vector<float> exp_avg = opt.state("w", "exp_avg");
  auto expect_refused = [&](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "accepted host memory";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::invalid_argument) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_TRUE(bitwise_equal(p.download(), after_one));
    EXPECT_TRUE(bitwise_equal(opt.state("w", "exp_avg"), exp_avg));
    EXPECT_EQ(opt.step_count("w"), 1);
  };
  expect_refused([&] { opt.step({host_grad.data()}); }, "not memory of CUDA device");
  Adam::Options o;
  DenseTensors t;
  t.param = p.get();
  t.grad = host_grad.data();
  t.numel = 1000;
  DeviceArray<float> m(1000), v(1000);
  t.states[0] = m.get();
  t.states[1] = v.get();
  expect_refused(
      [&] {
        fused_step<Adam>(o, 2, t, Exec{Device::cuda, nullptr});
      },
      "not CUDA device memory");
  Optimizer table("lazyadam", Device::cuda);
  table.add_param("emb", p.get(), DType::f32, {100, 10});
  std::vector<std::int64_t> host_idx = {1, 2};
  DeviceArray<std::int64_t> idx(host_idx);
  EXPECT_THROW(table.step_sparse("emb", host_idx.data(), DType::i64, 2, g.get()), Error);
  EXPECT_THROW(table.step_sparse("emb", idx.get(), DType::i64, 2, host_grad.data()), Error);
  EXPECT_EQ(table.step_count("emb"), 0);
  EXPECT_TRUE(bitwise_equal(p.download(), after_one));
  cuda_ok(cudaGetLastError(), "the CUDA context after the refusals");
}

// A step captured into a CUDA graph and replayed: the lr comes from device memory at run time
// and the step count from the device, so ten replays are ten real steps, with the lr set
// between them. The CPU takes the same eleven steps with the same lrs (as floats, so that both
// sides see the same value) and must agree bitwise.
TEST(Cuda, CapturedStepReplays) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
#if defined(FUSEDOPT_EMULATED_DEVICE)
  GTEST_SKIP() << "the emulated device has no graphs";
#else
  auto rng = make_rng();
  const Layout pl = carve({37, 1000, 4099, 100003}, rng), gl = carve(pl.sizes, rng);
  constexpr int kReplays = 10;
  for (const std::string algorithm : {"adam", "adamw"}) {
    SCOPED_TRACE(algorithm);
    const std::vector<float> p0 = pack(pl, random_tensors(rng, pl), TestTensor::kCanary);
    std::vector<std::vector<float>> grads;  // kept alive: the async copies read from them
    std::vector<float> lrs;
    for (int t = 0; t <= kReplays; ++t) {
      grads.push_back(pack(gl, random_tensors(rng, gl), 0.0f));
      // A new lr before every other replay; the same one before the others.
      lrs.push_back(t == 0 ? 1e-3f : t % 2 == 1 ? 1e-3f * static_cast<float>(t + 1) : lrs.back());
    }
    std::vector<float> cpu_p = p0;
    // The device value scales each param's lr option: 0.5 * (2 * lr) is lr exactly.
    std::vector<float> scales;
    for (float lr : lrs) scales.push_back(2.0f * lr);
    DeviceArray<float> gpu_p(p0), gpu_g(grads[0]), d_lr(std::vector<float>{scales[0]});
    Optimizer cpu(algorithm), gpu(algorithm, Device::cuda);
    gpu.set_option("lr", 0.5);
    add_params(cpu, cpu_p.data(), DType::f32, pl);
    add_params(gpu, gpu_p.get(), DType::f32, pl);
    gpu.set_device_scalars(d_lr.get(), nullptr, nullptr);
    Stream stream;
    CHECK_CUDA(cudaStreamCreate(&stream.s));
    const std::vector<const void*> gp = pointers(gpu_g.get(), gl);

    gpu.step(gp.data(), stream.s);  // the first step allocates the state: not capturable
    CHECK_CUDA(cudaStreamSynchronize(stream.s));

    Graph graph;
    CHECK_CUDA(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal));
    std::string step_error;
    try {
      gpu.step(gp.data(), stream.s);
    } catch (const std::exception& e) {
      step_error = e.what();
    }
    const cudaError_t end = cudaStreamEndCapture(stream.s, &graph.g);
    ASSERT_TRUE(step_error.empty()) << "step threw while capturing: " << step_error;
    CHECK_CUDA(end);
    GraphExec exec;
    CHECK_CUDA(cudaGraphInstantiateWithFlags(&exec.e, graph.g, 0));
    for (int t = 1; t <= kReplays; ++t) {
      CHECK_CUDA(cudaMemcpyAsync(gpu_g.get(), grads[t].data(), gl.total * sizeof(float),
                                 cudaMemcpyHostToDevice, stream.s));
      if (lrs[t] != lrs[t - 1])
        CHECK_CUDA(cudaMemcpyAsync(d_lr.get(), &scales[t], sizeof(float), cudaMemcpyHostToDevice,
                                   stream.s));
      CHECK_CUDA(cudaGraphLaunch(exec.e, stream.s));
    }
    CHECK_CUDA(cudaStreamSynchronize(stream.s));

    for (int t = 0; t <= kReplays; ++t) {
      cpu.set_option("lr", static_cast<double>(lrs[t]));
      cpu.step(pointers(grads[t].data(), gl).data());
    }
    const std::vector<float> got = gpu_p.download();
    EXPECT_TRUE(gaps_intact(pl, got));
    expect_same_params(pl, got, cpu_p, "after the replays");
    expect_same(holdings(gpu), holdings(cpu), "after the replays");
    for (std::size_t i = 0; i < pl.sizes.size(); ++i)
      EXPECT_EQ(gpu.step_count(pname(i)), kReplays + 1);
  }
#endif
}

// 64-bit indexing: one param of 2^31 + 5 floats (8 GiB, and 8 GiB of grad). SGD with lr 0.5
// and grad 2 takes every 1 exactly to 0; an index that wrapped at 2^31 leaves elements at 1
// (or writes somewhere else).
TEST(Cuda, HugeTensorOver2To31Elements) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  constexpr std::size_t n = (std::size_t{1} << 31) + 5;
  std::size_t free_bytes = 0, total_bytes = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  constexpr std::size_t kNeed = std::size_t{20} << 30;
  if (free_bytes < kNeed)
    GTEST_SKIP() << "needs 20 GiB of free device memory for two 8 GiB buffers, "
                 << (free_bytes >> 20) << " MiB free";
  DeviceArray<float> p(n), g(n);
  constexpr std::size_t kChunk = std::size_t{1} << 26;
  {
    std::vector<float> host(kChunk, 1.0f);
    for (std::size_t at = 0; at < n; at += kChunk)
      CHECK_CUDA(cudaMemcpy(p.get() + at, host.data(), std::min(kChunk, n - at) * sizeof(float),
                            cudaMemcpyHostToDevice));
    std::fill(host.begin(), host.end(), 2.0f);
    for (std::size_t at = 0; at < n; at += kChunk)
      CHECK_CUDA(cudaMemcpy(g.get() + at, host.data(), std::min(kChunk, n - at) * sizeof(float),
                            cudaMemcpyHostToDevice));
  }
  Optimizer opt("sgd", Device::cuda);
  opt.set_option("lr", 0.5);
  opt.add_param("huge", p.get(), DType::f32, {static_cast<std::int64_t>(n)});
  opt.step({g.get()});
  EXPECT_EQ(opt.step_count("huge"), 1);
  const std::size_t mid = std::size_t{1} << 31;
  for (std::size_t start : {std::size_t{0}, mid - 500, n - 1000}) {
    const std::vector<float> got = p.download(start, 1000), grad = g.download(start, 1000);
    for (std::size_t j = 0; j < 1000; ++j) {
      ASSERT_EQ(got[j], 0.0f) << "param element " << start + j;
      ASSERT_EQ(grad[j], 2.0f) << "grad element " << start + j << " was written";
    }
  }
}

// cuSOLVER is loaded on first use, not linked (a program that steps only on the CPU must not
// need it): it must load, GPU or not, from the toolkit this build was made with.
TEST(CudaLibraries, CuSolverLoadsWhenFirstNeededWithoutAGpu) {
#if defined(FUSEDOPT_EMULATED_DEVICE)
  GTEST_SKIP() << "the emulated device has no cuSOLVER";
#endif
  EXPECT_NO_THROW(cuda::require_cusolver());
  EXPECT_NO_THROW(cuda::require_cusolver());  // once per process, then the same entry points
}

}  // namespace
}  // namespace fo::test

#else  // neither FUSEDOPT_WITH_CUDA nor FUSEDOPT_EMULATED_DEVICE

TEST(Cuda, Skipped) { GTEST_SKIP() << "built without CUDA"; }

#endif
