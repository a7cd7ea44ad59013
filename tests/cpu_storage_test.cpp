// The CPU's storage layer (cpu_backend.hpp, Storage): bfloat16 and float16 params, bfloat16
// states, f32 master weights and stochastic rounding on the CPU. Against float32 runs and
// against a per-step reference (widen, the f32 step, round as multi_tensor.cuh does), over
// every instruction set and thread count, through checkpoints; every kind of step.
// (Its bytes against the CUDA kernel's: Cuda.EveryStorageEqualsTheCpuBitwise.)
#include <gtest/gtest.h>
#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/convert.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

/// 16-bit storage of floats (rounded to nearest) and back.
std::vector<std::uint16_t> narrow16(const std::vector<float>& v, DType dtype) {
  std::vector<std::uint16_t> out;
  for (float x : v) out.push_back(dtype == DType::bf16 ? to_bf16(x).bits : to_f16(x).bits);
  return out;
}

std::vector<float> widen16(const std::vector<std::uint16_t>& v, DType dtype) {
  std::vector<float> out;
  for (std::uint16_t b : v)
    out.push_back(dtype == DType::bf16 ? to_float(bf16{b}) : to_float(f16{b}));
  return out;
}

// A bf16 or f16 param with f32 master weights steps its master exactly as a float32 param
// that starts at the widened values (with the widened grads), and holds the master rounded to
// nearest even after every step.
TEST(CpuStorage, MasterWeightsStepAsFloat32AndRoundToNearest) {
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {1, 3, 4097, 70001};
  for (DType dtype : {DType::bf16, DType::f16})
    for (bool fp32_grads : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + (fp32_grads ? ", f32 grads" : ""));
      Optimizer low("adamw"), f32("adamw");
      low.set_option("master_weights", 1);
      low.set_option("fp32_grads", fp32_grads ? 1 : 0);
      std::vector<std::vector<std::uint16_t>> p16;
      std::vector<std::vector<float>> p32;
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        p16.push_back(narrow16(random_floats(rng, static_cast<std::size_t>(sizes[i])), dtype));
        p32.push_back(widen16(p16.back(), dtype));
      }
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        low.add_param("p" + std::to_string(i), p16[i].data(), dtype, {sizes[i]});
        f32.add_param("p" + std::to_string(i), p32[i].data(), DType::f32, {sizes[i]});
      }
      for (int t = 1; t <= 4; ++t) {
        SCOPED_TRACE("step " + std::to_string(t));
        std::vector<std::vector<float>> g32;
        std::vector<std::vector<std::uint16_t>> g16;
        std::vector<const void*> gl, gf;
        for (std::int64_t n : sizes) {
          g32.push_back(random_floats(rng, static_cast<std::size_t>(n)));
          if (!fp32_grads) {  // the f32 run takes the 16-bit grads' values
            g16.push_back(narrow16(g32.back(), dtype));
            g32.back() = widen16(g16.back(), dtype);
          }
        }
        for (std::size_t i = 0; i < sizes.size(); ++i) {
          gl.push_back(fp32_grads ? static_cast<const void*>(g32[i].data()) : g16[i].data());
          gf.push_back(g32[i].data());
        }
        low.step(gl.data());
        f32.step(gf.data());
        for (std::size_t i = 0; i < sizes.size(); ++i) {
          const std::string name = "p" + std::to_string(i);
          const std::vector<float> master = low.state(name, "master");
          EXPECT_TRUE(bitwise_equal(master, p32[i]))
              << name << ": " << first_difference(master, p32[i]);
          EXPECT_EQ(p16[i], narrow16(master, dtype))
              << name << ": not its master rounded to nearest";
          for (const char* s : {"exp_avg", "exp_avg_sq"})
            EXPECT_TRUE(bitwise_equal(low.state(name, s), f32.state(name, s))) << name << "." << s;
        }
      }
    }
}

/// The names of `algorithm`'s states, in its order (state k: counter 4i + 1 + k).
std::vector<std::string> algorithm_states(const std::string& algorithm) {
  for (const AlgorithmDescription& d : dense_algorithms())
    if (d.name == algorithm) return d.states;
  throw std::runtime_error("no algorithm " + algorithm);
}

/// Param `name`'s states as float32, by the algorithm's state index (empty where not kept).
std::vector<std::vector<float>> states_of(const Optimizer& opt, const std::string& algorithm,
                                          const std::string& name) {
  const std::vector<std::string> kept = opt.state_names(name);
  std::vector<std::vector<float>> out;
  for (const std::string& s : algorithm_states(algorithm))
    out.push_back(std::find(kept.begin(), kept.end(), s) != kept.end() ? opt.state(name, s)
                                                                       : std::vector<float>{});
  return out;
}

/// One step of `algorithm` on the values of a param stored as `dtype` (`bits`, without master
/// weights, viewed as `view`) with bf16 states (`states`, read back as f32, exact; float32
/// ones where !bf16_states), done by hand: widen, the float32 step of the functional layer,
/// then rounding as multi_tensor_step_kernel rounds (stochastically with the draws of param
/// key `key`: counter 4i for the param, 4i + 1 + k for state k). Updates bits and states.
void reference_step(const std::string& algorithm, const NamedOptions& options, std::int64_t step,
                    std::vector<std::uint16_t>& bits, DType dtype,
                    std::vector<std::vector<float>>& states, const std::vector<float>& grad,
                    bool stochastic, std::uint64_t seed, int key, const MatrixView& view = {},
                    bool bf16_states = true) {
  std::vector<float> p = widen16(bits, dtype);
  DenseTensors t;
  t.param = p.data();
  t.grad = grad.data();
  t.numel = static_cast<std::int64_t>(p.size());
  t.view = view;
  for (std::size_t k = 0; k < states.size(); ++k)
    t.states[k] = states[k].empty() ? nullptr : states[k].data();
  fused_step_list(algorithm, options, &t, &step, 1);
  const std::uint64_t mixed = seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(key + 1));
  const auto round = [&](float x, DType d, std::uint64_t counter) -> std::uint16_t {
    if (!stochastic) return d == DType::bf16 ? to_bf16(x).bits : to_f16(x).bits;
    const std::uint32_t r = random_bits(mixed, static_cast<std::uint64_t>(step), counter);
    return d == DType::bf16 ? to_bf16_stochastic(x, r).bits : to_f16_stochastic(x, r).bits;
  };
  for (std::size_t i = 0; i < p.size(); ++i) bits[i] = round(p[i], dtype, 4 * i);
  if (bf16_states)
    for (std::size_t k = 0; k < states.size(); ++k)
      for (std::size_t i = 0; i < states[k].size(); ++i)
        states[k][i] = to_float(bf16{round(states[k][i], DType::bf16, 4 * i + 1 + k)});
}

/// Param `name`'s states equal `want` (states_of's order) bit for bit.
void expect_states(const Optimizer& opt, const std::string& algorithm, const std::string& name,
                   const std::vector<std::vector<float>>& want) {
  const std::vector<std::vector<float>> got = states_of(opt, algorithm, name);
  const std::vector<std::string> names = algorithm_states(algorithm);
  for (std::size_t k = 0; k < names.size(); ++k)
    EXPECT_TRUE(bitwise_equal(got[k], want[k]))
        << name << "." << names[k] << ": " << first_difference(got[k], want[k]);
}

/// Three steps of `algorithm` with `options`, on `dtype` params of `shapes` (fresh random
/// values and grads) without master weights, with bf16 states or float32 ones, each checked
/// against reference_step: the params' bits and every state, bit for bit.
void expect_widen_step_round(std::mt19937_64& rng, const std::string& algorithm,
                             const NamedOptions& options,
                             const std::vector<std::vector<std::int64_t>>& shapes, DType dtype,
                             bool stochastic, bool bf16_states) {
  constexpr std::uint64_t kSeed = 99;
  Optimizer opt(algorithm);
  for (const auto& [k, v] : options) opt.set_option(k, v);
  opt.set_option("state_dtype", bf16_states ? 2 : 0);
  opt.set_option("stochastic_rounding", stochastic ? 1 : 0);
  opt.set_option("seed", static_cast<double>(kSeed));
  std::vector<std::int64_t> sizes;
  std::vector<std::vector<std::uint16_t>> bits, want;
  for (const auto& shape : shapes) {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    sizes.push_back(n);
    bits.push_back(narrow16(random_floats(rng, static_cast<std::size_t>(n)), dtype));
  }
  want = bits;
  for (std::size_t i = 0; i < shapes.size(); ++i)
    opt.add_param("p" + std::to_string(i), bits[i].data(), dtype, shapes[i]);
  for (int t = 1; t <= 3; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    std::vector<std::vector<float>> g32;
    std::vector<std::vector<std::uint16_t>> g16;
    std::vector<const void*> g;
    for (std::int64_t n : sizes) {
      g16.push_back(narrow16(random_floats(rng, static_cast<std::size_t>(n)), dtype));
      g32.push_back(widen16(g16.back(), dtype));
      g.push_back(g16.back().data());
    }
    std::vector<std::vector<std::vector<float>>> states;
    for (std::size_t i = 0; i < shapes.size(); ++i)
      states.push_back(states_of(opt, algorithm, "p" + std::to_string(i)));
    opt.step(g.data());
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const std::string name = "p" + std::to_string(i);
      const MatrixView view = matrix_view(shapes[i].data(), static_cast<int>(shapes[i].size()));
      reference_step(algorithm, options, t, want[i], dtype, states[i], g32[i], stochastic, kSeed,
                     static_cast<int>(i), view, bf16_states);
      EXPECT_EQ(bits[i], want[i]) << name << ": the param's bits";
      expect_states(opt, algorithm, name, states[i]);
    }
  }
}

// Each step of a 16-bit param with bf16 states (no master weights) is widen, the float32
// step, round, element by element: against reference_step for both roundings, several
// algorithms (each state count), sizes on both sides of the storage layer's blocks.
TEST(CpuStorage, EachStepIsWidenStepRound) {
  auto rng = make_rng();
  const std::vector<std::vector<std::int64_t>> shapes = {{1}, {3}, {1023}, {1025}, {4097}, {70001}};
  for (const std::string algorithm : {"adam", "sgd", "lion", "rmsprop", "adadelta"})
    for (DType dtype : {DType::bf16, DType::f16})
      for (bool stochastic : {false, true}) {
        SCOPED_TRACE(algorithm + ", " + dtype_name(dtype) + (stochastic ? ", stochastic" : ""));
        expect_widen_step_round(rng, algorithm, ref::richest_options(algorithm), shapes, dtype,
                                stochastic, true);
      }
}

/// Bytes of a bf16 run of `algorithm` with master weights, bf16 states, stochastic rounding
/// or to nearest, and an EMA over params of `shapes` large enough to split over threads: the
/// params' bits, then every state's.
std::vector<std::vector<float>> storage_run(std::uint64_t seed, const std::string& algorithm,
                                            const std::vector<std::vector<std::int64_t>>& shapes,
                                            bool stochastic) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<std::uint16_t>> bits;
  std::vector<std::int64_t> sizes;
  Optimizer opt(algorithm);
  opt.set_option("master_weights", 1);
  opt.set_option("state_dtype", 2);
  opt.set_option("stochastic_rounding", stochastic ? 1 : 0);
  opt.set_option("ema_decay", 0.99);
  for (const auto& shape : shapes) {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    sizes.push_back(n);
    bits.push_back(narrow16(random_floats(rng, static_cast<std::size_t>(n)), DType::bf16));
  }
  for (std::size_t i = 0; i < shapes.size(); ++i)
    opt.add_param("p" + std::to_string(i), bits[i].data(), DType::bf16, shapes[i]);
  for (int t = 0; t < 3; ++t) {
    std::vector<std::vector<std::uint16_t>> g;
    std::vector<const void*> gp;
    for (std::int64_t n : sizes) {
      g.push_back(narrow16(random_floats(rng, static_cast<std::size_t>(n)), DType::bf16));
      gp.push_back(g.back().data());
    }
    opt.step(gp.data());
  }
  std::vector<std::vector<float>> out;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    out.push_back(widen16(bits[i], DType::bf16));
    for (const std::string& s : opt.state_names("p" + std::to_string(i)))
      out.push_back(opt.state("p" + std::to_string(i), s));
  }
  return out;
}

// The storage layer's blocks and draws follow the element's index in the tensor: the same
// bits on every instruction set and thread count, for every kind of step (elementwise, trust
// ratio, factored and not, matrix).
TEST(CpuStorage, SameBitsOnEveryIsaAndThreadCount) {
  const std::uint64_t seed = run_seed();
  const cpu::Isa saved = cpu::isa();
  const int saved_threads = cpu::num_threads();
  const std::vector<std::pair<std::string, std::vector<std::vector<std::int64_t>>>> runs = {
      {"adam", {{200003}, {70001}, {5}}},
      {"lamb", {{200003}, {5}}},
      {"adafactor", {{301, 677}, {70001}}},
      {"muon", {{129, 200}, {2, 3, 5}}}};
  for (const auto& [algorithm, shapes] : runs)
    for (bool stochastic : {false, true}) {
      SCOPED_TRACE(algorithm + (stochastic ? ", stochastic" : ", to nearest"));
      cpu::set_isa(cpu::Isa::scalar);
      cpu::set_num_threads(1);
      const auto want = storage_run(seed, algorithm, shapes, stochastic);
      for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
        if (!cpu::isa_supported(isa)) continue;
        for (int threads : {1, 2, 3, 5}) {
          SCOPED_TRACE(std::string(cpu::isa_name(isa)) + ", " + std::to_string(threads) +
                       " threads");
          cpu::set_isa(isa);
          cpu::set_num_threads(threads);
          expect_same(storage_run(seed, algorithm, shapes, stochastic), want, "params and states");
        }
      }
    }
  cpu::set_isa(saved);
  cpu::set_num_threads(saved_threads);
}

// A checkpoint of bf16 params with master weights and bf16 states resumes bitwise on the CPU,
// its states still bf16.
TEST(CpuStorage, Bf16CheckpointResumesBitwise) {
  auto rng = make_rng();
  const std::int64_t n = 5003;
  std::vector<std::uint16_t> p = narrow16(random_floats(rng, n), DType::bf16);
  std::vector<std::vector<std::uint16_t>> grads;
  for (int t = 0; t < 5; ++t) grads.push_back(narrow16(random_floats(rng, n), DType::bf16));
  const auto configure = [](Optimizer& o) {
    o.set_option("master_weights", 1);
    o.set_option("state_dtype", 2);
    o.set_option("stochastic_rounding", 1);
    o.set_option("seed", 3);
  };
  Optimizer a("adamw");
  configure(a);
  a.add_param("w", p.data(), DType::bf16, {n});
  for (int t = 0; t < 3; ++t) a.step({grads[t].data()});
  std::string dir = (std::filesystem::temp_directory_path() / "fusedopt-cpustore-XXXXXX").string();
  ASSERT_NE(::mkdtemp(dir.data()), nullptr);
  const std::string path = dir + "/ckpt";
  a.save(path);
  std::vector<std::uint16_t> q = p;  // the param at the save
  for (int t = 3; t < 5; ++t) a.step({grads[t].data()});

  // The state storage is the loading optimizer's own (load converts into it): one with float32
  // states holds the file's bf16 states widened exactly; one with bf16 states resumes bitwise.
  std::vector<std::uint16_t> q32 = p;
  Optimizer f("adamw");
  f.add_param("w", q32.data(), DType::bf16, {n});
  f.load(path);
  EXPECT_EQ(f.option("state_dtype"), 0.0);
  Optimizer b("adamw");
  b.set_option("state_dtype", 2);
  b.add_param("w", q.data(), DType::bf16, {n});
  b.load(path);
  std::filesystem::remove_all(dir);
  for (const char* s : {"exp_avg", "exp_avg_sq", "master"})
    EXPECT_TRUE(bitwise_equal(f.state("w", s), b.state("w", s))) << s;
  EXPECT_EQ(b.option("state_dtype"), 2.0);
  EXPECT_EQ(b.option("master_weights"), 1.0);
  for (int t = 3; t < 5; ++t) b.step({grads[t].data()});
  EXPECT_EQ(q, p);
  for (const char* s : {"exp_avg", "exp_avg_sq", "master"})
    EXPECT_TRUE(bitwise_equal(b.state("w", s), a.state("w", s))) << s;
  EXPECT_EQ(b.step_count("w"), 5);
}

// The kinds of more than one pass take 16-bit params on the CPU as on CUDA. With float32
// states each step is widen, the float32 step, round the param (its states are the float32
// step's): lamb, lars, adafactor (factored matrices and per-element vectors) and muon. Muon's
// bf16 states too: they are stored once, after the one pass that reads them. (The others'
// bf16 states are rounded between passes, as CUDA's kernels round them, so no float32 step
// describes them: Cuda.MultiPassKindsEveryStorageEqualsTheCpuBitwise holds their bytes.)
TEST(CpuStorage, MultiPassKindsAreWidenStepRound) {
  auto rng = make_rng();
  const std::vector<std::vector<std::int64_t>> matrices = {
      {37, 45}, {3, 33, 70}, {1, 1}, {130, 257}};
  const std::vector<std::vector<std::int64_t>> vectors = {{1}, {8193}, {70001}};
  for (const std::string algorithm : {"lamb", "lars", "adafactor", "muon"})
    for (DType dtype : {DType::bf16, DType::f16})
      for (bool stochastic : {false, true})
        for (bool bf16_states : {false, true}) {
          if (bf16_states && algorithm != "muon") continue;
          SCOPED_TRACE(algorithm + ", " + dtype_name(dtype) + (stochastic ? ", stochastic" : "") +
                       (bf16_states ? ", bf16 states" : ""));
          std::vector<std::vector<std::int64_t>> shapes = matrices;
          if (algorithm != "muon") shapes.insert(shapes.end(), vectors.begin(), vectors.end());
          expect_widen_step_round(rng, algorithm, ref::richest_options(algorithm), shapes, dtype,
                                  stochastic, bf16_states);
        }
}

}  // namespace
}  // namespace fo::test
