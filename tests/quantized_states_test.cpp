// Block-quantized optimizer states on the CPU (state_dtype 5: 8-bit, 6: 4-bit;
// docs/quantized-states.md): every step against the contract (decode, the float32 step, encode
// to nearest) for every algorithm that takes them, one step against the double reference
// within a code's spacing, the size threshold and per-param storage, checkpoints (bitwise
// resume, conversion both ways, corrupt files), and what is refused. (The CUDA kernel's
// bytes against the same contract: emulation_test's quantized cases.)
#include <gtest/gtest.h>
#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

constexpr double kQ8 = 5.0, kQ4 = 6.0;

const AlgorithmDescription& describe(const std::string& name) {
  for (const auto& a : dense_algorithms())
    if (a.name == name) return a;
  throw std::invalid_argument("no algorithm " + name);
}

/// The algorithms whose states may be quantized with their richest options: their step is one
/// elementwise pass and no state starts as a copy of the weights.
std::vector<std::string> quantizable_algorithms() {
  std::vector<std::string> names;
  for (const auto& a : dense_algorithms()) {
    if (!a.quantizable) continue;
    bool copies_weights = false;
    for (const auto& s : a.states) copies_weights |= ref::state_starts_as_param(a.name, s);
    if (!copies_weights) names.push_back(a.name);
  }
  return names;
}

/// What a quantized state decodes to after it is written with these float32 values: the
/// serial block functions of quantize.hpp, to nearest.
std::vector<float> quantized_values(const std::vector<float>& x, double state_dtype,
                                    bool non_negative) {
  std::vector<float> out(x.size());
  const int w = state_dtype == kQ8 ? kQuant8BlockSize : kQuant4BlockSize;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(w));
  for (std::size_t b = 0; b < x.size(); b += static_cast<std::size_t>(w)) {
    const int n =
        static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(w), x.size() - b));
    if (state_dtype == kQ8) {
      const QuantMap<8>& q = non_negative ? kQuantMap8Unsigned : kQuantMap8Signed;
      const float a = quantize_block8(q, x.data() + b, n, codes.data(), NearestRounding{});
      dequantize_block8(q, codes.data(), n, a, out.data() + b);
    } else {
      const QuantMap<4>& q = non_negative ? kQuantMap4Unsigned : kQuantMap4Signed;
      const float a = quantize_block4(q, x.data() + b, n, codes.data(), NearestRounding{});
      dequantize_block4(q, codes.data(), n, a, out.data() + b);
    }
  }
  return out;
}

void set_options(Optimizer& opt, const std::string& algorithm) {
  for (const auto& [key, value] : ref::richest_options(algorithm)) opt.set_option(key, value);
}

std::string temp_dir() {
  std::string dir = (std::filesystem::temp_directory_path() / "fusedopt-quant-XXXXXX").string();
  if (!::mkdtemp(dir.data())) throw std::runtime_error("mkdtemp failed");
  return dir;
}

const std::vector<std::int64_t> kSizes = {0, 1, 127, 128, 129, 255, 256, 257, 70001};

std::string name_of(std::size_t i) { return "p" + std::to_string(i); }

// Every step of a quantized optimizer is the contract: the float32 step from the decoded
// states (an f32 optimizer loaded from its checkpoint, which decodes exactly), its params
// bitwise, its states those values encoded to nearest. Sizes on both sides of both block
// sizes, several steps, every algorithm that takes quantized states, with its richest options.
TEST(QuantizedStates, EveryStepIsTheFloat32StepOfTheDecodedStatesEncodedToNearest) {
  auto rng = make_rng();
  const std::string dir = temp_dir();
  const std::string file = dir + "/q.ckpt";
  for (const std::string& algorithm : quantizable_algorithms())
    for (double dtype : {kQ8, kQ4}) {
      SCOPED_TRACE(algorithm + (dtype == kQ8 ? " 8-bit" : " 4-bit"));
      const AlgorithmDescription& a = describe(algorithm);
      Optimizer q(algorithm);
      set_options(q, algorithm);
      q.set_option("state_dtype", dtype);
      q.set_option("min_quant_size", 0);
      std::vector<std::vector<float>> params;
      for (std::int64_t n : kSizes)
        params.push_back(random_floats(rng, static_cast<std::size_t>(n)));
      for (std::size_t i = 0; i < kSizes.size(); ++i)
        q.add_param(name_of(i), params[i].data(), DType::f32, {kSizes[i]});
      for (int t = 1; t <= 4; ++t) {
        SCOPED_TRACE("step " + std::to_string(t));
        q.save(file);
        std::vector<std::vector<float>> fparams = params;
        Optimizer f(algorithm);  // float32 states: the checkpoint's are decoded into them
        for (std::size_t i = 0; i < kSizes.size(); ++i)
          f.add_param(name_of(i), fparams[i].data(), DType::f32, {kSizes[i]});
        f.load(file);
        std::vector<std::vector<float>> grads;
        std::vector<const void*> g;
        for (std::int64_t n : kSizes)
          grads.push_back(random_floats(rng, static_cast<std::size_t>(n)));
        for (const auto& x : grads) g.push_back(x.data());
        q.step(g.data());
        f.step(g.data());
        for (std::size_t i = 0; i < kSizes.size(); ++i) {
          SCOPED_TRACE(name_of(i));
          EXPECT_TRUE(bitwise_equal(params[i], fparams[i]))
              << first_difference(params[i], fparams[i]);
          for (const std::string& s : q.state_names(name_of(i))) {
            const auto k = static_cast<std::size_t>(std::find(a.states.begin(), a.states.end(), s) -
                                                    a.states.begin());
            const std::vector<float> want =
                quantized_values(f.state(name_of(i), s), dtype, a.non_negative[k]);
            const std::vector<float> got = q.state(name_of(i), s);
            EXPECT_TRUE(bitwise_equal(got, want)) << s << ": " << first_difference(got, want);
          }
        }
      }
    }
  std::filesystem::remove_all(dir);
}

// One step from the initial states against the double reference: the params as float32 steps
// them (the initial states decode exactly), each state within one code of the double value
// (the gap between the two codes around it, times the block's absmax, plus float32 rounding).
TEST(QuantizedStates, OneStepIsWithinOneCodeOfTheDoubleReference) {
  auto rng = make_rng();
  const std::int64_t n = 1000;
  for (const std::string& algorithm : quantizable_algorithms())
    for (double dtype : {kQ8, kQ4}) {
      SCOPED_TRACE(algorithm + (dtype == kQ8 ? " 8-bit" : " 4-bit"));
      const AlgorithmDescription& a = describe(algorithm);
      const ref::OptionMap options = ref::test_variants(algorithm).back();
      Optimizer q(algorithm);
      set_options(q, algorithm);
      q.set_option("state_dtype", dtype);
      std::vector<float> p = random_floats(rng, n), g = random_floats(rng, n);
      std::vector<double> rp(p.begin(), p.end()), rg(g.begin(), g.end());
      ref::StateMap states;
      for (const auto& s : ref::state_names(algorithm, options))
        states[s].assign(static_cast<std::size_t>(n),
                         ref::state_initial_value(algorithm, options, s));
      q.add_param("p", p.data(), DType::f32, {n});
      q.step({g.data()});
      ref::step(algorithm, options, 1, rp, rg, states);
      for (std::size_t i = 0; i < p.size(); ++i)
        ASSERT_NEAR(p[i], rp[i], 1e-5 * (1.0 + std::fabs(rp[i]))) << "param at " << i;
      const int w = dtype == kQ8 ? kQuant8BlockSize : kQuant4BlockSize;
      for (const std::string& s : q.state_names("p")) {
        const auto k = static_cast<std::size_t>(std::find(a.states.begin(), a.states.end(), s) -
                                                a.states.begin());
        const std::vector<float> got = q.state("p", s);
        const std::vector<double>& want = states.at(s);
        // The largest gap between neighbouring values of the state's map.
        float gap = 0.0f;
        if (dtype == kQ8) {
          const QuantMap<8>& m = a.non_negative[k] ? kQuantMap8Unsigned : kQuantMap8Signed;
          for (int c = 0; c + 1 < 256; ++c) gap = std::max(gap, m.value[c + 1] - m.value[c]);
        } else {
          const QuantMap<4>& m = a.non_negative[k] ? kQuantMap4Unsigned : kQuantMap4Signed;
          for (int c = 0; c + 1 < 16; ++c) gap = std::max(gap, m.value[c + 1] - m.value[c]);
          gap = std::max(gap, m.value[0]);  // the unsigned map has no zero: 1/16 at least
        }
        for (std::size_t b = 0; b < want.size(); b += static_cast<std::size_t>(w)) {
          double absmax = 0.0;
          const std::size_t end = std::min(want.size(), b + static_cast<std::size_t>(w));
          for (std::size_t i = b; i < end; ++i) absmax = std::max(absmax, std::fabs(want[i]));
          for (std::size_t i = b; i < end; ++i)
            ASSERT_LE(std::fabs(got[i] - want[i]), gap * absmax * (1 + 1e-5) + 1e-30)
                << s << " at " << i << ": " << got[i] << " vs " << want[i];
        }
      }
    }
}

// Params under min_quant_size keep float32 states, bitwise those of a float32 run; larger
// ones hold 1 (8-bit) or 1/2 (4-bit) byte per value and a float per block; a param's own
// state_dtype overrides both, and cannot change once it has stepped.
TEST(QuantizedStates, SmallParamsKeepFloat32AndAParamsOwnStorageWins) {
  auto rng = make_rng();
  const std::int64_t small = 4095, large = 4096 * 3 + 1;
  std::vector<float> ps = random_floats(rng, small), pl = random_floats(rng, large);
  std::vector<float> fs = ps, fl = pl, po = pl;
  Optimizer q("adamw"), f("adamw");
  q.set_option("state_dtype", kQ8);
  q.add_param("small", ps.data(), DType::f32, {small});
  q.add_param("large", pl.data(), DType::f32, {large});
  q.add_param("own", po.data(), DType::f32, {large});
  q.set_param_option("own", "state_dtype", 0);
  EXPECT_EQ(q.param_option("small", "state_dtype"), 0.0);
  EXPECT_EQ(q.param_option("large", "state_dtype"), kQ8);
  EXPECT_EQ(q.param_option("own", "state_dtype"), 0.0);
  f.add_param("small", fs.data(), DType::f32, {small});
  f.add_param("large", fl.data(), DType::f32, {large});
  const std::vector<float> gs = random_floats(rng, small), gl = random_floats(rng, large);
  q.step({gs.data(), gl.data(), gl.data()});
  f.step({gs.data(), gl.data()});
  EXPECT_TRUE(bitwise_equal(ps, fs));
  EXPECT_TRUE(bitwise_equal(q.state("small", "exp_avg_sq"), f.state("small", "exp_avg_sq")));
  EXPECT_TRUE(bitwise_equal(q.state("own", "exp_avg"), f.state("large", "exp_avg")));
  const std::size_t f32_bytes = 2 * 4 * static_cast<std::size_t>(small + 2 * large);
  const std::size_t q8_large = 2 * (static_cast<std::size_t>((large + 15) / 16 * 16) +
                                    4 * static_cast<std::size_t>((large + 255) / 256));
  EXPECT_EQ(q.state_memory_bytes(), f32_bytes - 2 * 4 * static_cast<std::size_t>(large) + q8_large);
  try {
    q.set_param_option("own", "state_dtype", kQ4);
    FAIL() << "a stepped param's state_dtype changed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::invalid_argument);
  }
  EXPECT_EQ(q.param_option("own", "state_dtype"), 0.0);
  EXPECT_THROW(q.set_param_option("own", "state_dtype", 3), Error);
  EXPECT_THROW(q.set_option("state_dtype", 4), Error);
  EXPECT_THROW(q.set_option("min_quant_size", -1), Error);
  EXPECT_THROW(q.set_option("min_quant_size", 0.5), Error);
}

// Stochastic rounding of quantized states: the same bytes on any number of threads (the draws
// are keyed by element), and not the bytes of rounding to nearest.
TEST(QuantizedStates, StochasticRoundingIsThreadInvariant) {
  auto rng = make_rng();
  const std::int64_t n = 3 * 65536 + 77;  // several threads' ranges
  const std::vector<float> p0 = random_floats(rng, n);
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 3; ++t) grads.push_back(random_floats(rng, n));
  const int before = cpu::num_threads();
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2, 3}) {
    cpu::set_num_threads(threads);
    for (bool stochastic : {true, false}) {
      if (!stochastic && threads != 1) continue;
      std::vector<float> p = p0;
      Optimizer q("adam");
      q.set_option("state_dtype", kQ4);
      q.set_option("stochastic_rounding", stochastic ? 1 : 0);
      q.set_option("seed", 7);
      q.add_param("p", p.data(), DType::f32, {n});
      for (const auto& g : grads) q.step({g.data()});
      std::vector<float> all = p;
      for (const char* s : {"exp_avg", "exp_avg_sq"}) {
        const std::vector<float> v = q.state("p", s);
        all.insert(all.end(), v.begin(), v.end());
      }
      results.push_back(all);
    }
  }
  cpu::set_num_threads(before);
  ASSERT_EQ(results.size(), 4u);  // stochastic x 1, nearest x 1, stochastic x 2, x 3
  EXPECT_TRUE(bitwise_equal(results[0], results[2]));
  EXPECT_TRUE(bitwise_equal(results[0], results[3]));
  EXPECT_FALSE(bitwise_equal(results[0], results[1]));
}

// Encoding to nearest runs 16 lanes at a time on AVX-512 (cpu/quant_encode.hpp): the same
// bytes as the scalar table on every instruction set, in blocks with zeros, a NaN and huge
// values, and full and partial blocks.
TEST(QuantizedStates, SameBytesOnEveryInstructionSet) {
  auto rng = make_rng();
  const std::vector<std::int64_t> sizes = {1, 15, 17, 255, 257, 5000, 70001};
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 3; ++t) {
    std::vector<float> all;
    for (std::int64_t n : sizes) {
      std::vector<float> g = random_floats(rng, static_cast<std::size_t>(n));
      if (n > 300) {
        std::fill(g.begin() + 256, g.begin() + 300, 0.0f);  // a zero run across blocks
        g[7] = 3e38f;
      }
      if (t == 2 && n == 5000) g[1000] = std::numeric_limits<float>::quiet_NaN();
      all.insert(all.end(), g.begin(), g.end());
    }
    grads.push_back(all);
  }
  const cpu::Isa saved = cpu::isa();
  for (double dtype : {kQ8, kQ4}) {
    std::vector<std::vector<float>> results;
    for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
      if (!cpu::isa_supported(isa)) continue;
      cpu::set_isa(isa);
      std::vector<std::vector<float>> params;
      for (std::int64_t n : sizes) params.emplace_back(static_cast<std::size_t>(n), 0.5f);
      Optimizer q("adam");
      q.set_option("state_dtype", dtype);
      q.set_option("min_quant_size", 0);
      for (std::size_t i = 0; i < sizes.size(); ++i)
        q.add_param(name_of(i), params[i].data(), DType::f32, {sizes[i]});
      for (const auto& g : grads) {
        std::vector<const void*> ptrs;
        std::size_t at = 0;
        for (std::int64_t n : sizes) {
          ptrs.push_back(g.data() + at);
          at += static_cast<std::size_t>(n);
        }
        q.step(ptrs.data());
      }
      std::vector<float> all;
      for (std::size_t i = 0; i < sizes.size(); ++i)
        for (const char* s : {"exp_avg", "exp_avg_sq"}) {
          const std::vector<float> v = q.state(name_of(i), s);
          all.insert(all.end(), v.begin(), v.end());
        }
      results.push_back(all);
    }
    for (std::size_t r = 1; r < results.size(); ++r)
      EXPECT_TRUE(bitwise_equal(results[r], results[0]))
          << first_difference(results[r], results[0]);
  }
  cpu::set_isa(saved);
}

// A bf16 param with master weights and 8-bit states: the master steps as a float32 param with
// the same quantized states.
TEST(QuantizedStates, TakeBfloat16ParamsWithMasterWeights) {
  auto rng = make_rng();
  const std::int64_t n = 5003;
  std::vector<float> p32 = random_floats(rng, n);
  std::vector<std::uint16_t> p16(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < p16.size(); ++i) {
    p16[i] = to_bf16(p32[i]).bits;
    p32[i] = to_float(bf16{p16[i]});
  }
  Optimizer low("adamw"), f32("adamw");
  for (Optimizer* o : {&low, &f32}) o->set_option("state_dtype", kQ8);
  low.set_option("master_weights", 1);
  low.set_option("fp32_grads", 1);
  low.add_param("p", p16.data(), DType::bf16, {n});
  f32.add_param("p", p32.data(), DType::f32, {n});
  for (int t = 0; t < 3; ++t) {
    const std::vector<float> g = random_floats(rng, n);
    low.step({g.data()});
    f32.step({g.data()});
  }
  EXPECT_TRUE(bitwise_equal(low.state("p", "master"), p32));
  EXPECT_TRUE(bitwise_equal(low.state("p", "exp_avg"), f32.state("p", "exp_avg")));
  for (std::size_t i = 0; i < p16.size(); ++i) ASSERT_EQ(p16[i], to_bf16(p32[i]).bits);
}

// Checkpoints hold quantized states as they are: a resume is bitwise. Loading converts into
// the loading optimizer's storage: float32 into 8-bit encodes to nearest; 8-bit into 4-bit
// decodes and encodes; 8-bit into float32 decodes exactly.
TEST(QuantizedStates, CheckpointsResumeBitwiseAndConvertBothWays) {
  auto rng = make_rng();
  const std::string dir = temp_dir();
  const std::int64_t n = 9001;
  const std::vector<float> p0 = random_floats(rng, n);
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < 6; ++t) grads.push_back(random_floats(rng, n));
  const auto make = [&](std::vector<float>& p, double dtype) {
    auto o = std::make_unique<Optimizer>("adam");
    o->set_option("amsgrad", 1);
    o->set_option("state_dtype", dtype);
    o->add_param("p", p.data(), DType::f32, {n});
    return o;
  };
  std::vector<float> pa = p0, pb;
  auto a = make(pa, kQ8);
  for (int t = 0; t < 3; ++t) a->step({grads[t].data()});
  a->save(dir + "/q8.ckpt");
  pb = pa;
  auto b = make(pb, kQ8);
  b->load(dir + "/q8.ckpt");
  for (int t = 3; t < 6; ++t) {
    a->step({grads[t].data()});
    b->step({grads[t].data()});
  }
  EXPECT_TRUE(bitwise_equal(pa, pb));
  for (const char* s : {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
    EXPECT_TRUE(bitwise_equal(a->state("p", s), b->state("p", s))) << s;

  // 8-bit into float32: decoded exactly.
  a->save(dir + "/q8b.ckpt");
  std::vector<float> pc = pa;
  auto c = make(pc, 0.0);
  c->load(dir + "/q8b.ckpt");
  for (const char* s : {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
    EXPECT_TRUE(bitwise_equal(c->state("p", s), a->state("p", s))) << s;
  // float32 into 4-bit: encoded to nearest.
  for (int t = 0; t < 2; ++t) c->step({grads[t].data()});
  c->save(dir + "/f32.ckpt");
  std::vector<float> pd = pc;
  auto d = make(pd, kQ4);
  d->load(dir + "/f32.ckpt");
  const AlgorithmDescription& adam = describe("adam");
  for (std::size_t k = 0; k < adam.states.size(); ++k)
    EXPECT_TRUE(
        bitwise_equal(d->state("p", adam.states[k]),
                      quantized_values(c->state("p", adam.states[k]), kQ4, adam.non_negative[k])))
        << adam.states[k];
  std::filesystem::remove_all(dir);
}

// A truncated file holding quantized states: corrupt_data, and the loading optimizer (of the
// other width) unchanged.
TEST(QuantizedStates, ACorruptQuantizedCheckpointIsRefusedAndChangesNothing) {
  auto rng = make_rng();
  const std::string dir = temp_dir();
  const std::int64_t n = 5000;
  std::vector<float> p = random_floats(rng, n);
  Optimizer q("adamw");
  q.set_option("state_dtype", kQ8);
  q.add_param("p", p.data(), DType::f32, {n});
  const std::vector<float> g = random_floats(rng, n);
  q.step({g.data()});
  q.save(dir + "/a.ckpt");
  std::vector<float> p4 = p;
  Optimizer q4("adamw");
  q4.set_option("state_dtype", kQ4);
  q4.add_param("p", p4.data(), DType::f32, {n});
  q4.step({g.data()});
  const std::vector<float> before = q4.state("p", "exp_avg");
  const std::vector<float> params_before = p4;
  // Truncated file.
  std::ifstream in(dir + "/a.ckpt", std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (std::size_t cut : {bytes.size() / 2, bytes.size() - 7}) {
    std::ofstream(dir + "/cut.ckpt", std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(cut));
    try {
      q4.load(dir + "/cut.ckpt");
      FAIL() << "a truncated file loaded";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::corrupt_data) << e.what();
    }
  }
  EXPECT_TRUE(bitwise_equal(q4.state("p", "exp_avg"), before));
  EXPECT_TRUE(bitwise_equal(p4, params_before));
  EXPECT_EQ(q4.option("state_dtype"), kQ4);
  std::filesystem::remove_all(dir);
}

// What cannot take quantized states is refused before anything changes, with the reason:
// a step that is not one elementwise pass (lamb), a state that copies the weights
// (Schedule-Free's z), sparse steps over rows that are not whole blocks, row-wise states.
TEST(QuantizedStates, WhatCannotTakeThemIsRefusedAndChangesNothing) {
  auto rng = make_rng();
  const std::int64_t n = 8192;
  for (const char* algorithm : {"lamb", "adamw_schedule_free"}) {
    SCOPED_TRACE(algorithm);
    std::vector<float> p = random_floats(rng, n);
    const std::vector<float> p0 = p, g = random_floats(rng, n);
    Optimizer q(algorithm);
    q.set_option("state_dtype", kQ8);
    q.add_param("p", p.data(), DType::f32, {n});
    try {
      q.step({g.data()});
      FAIL() << "stepped";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::unsupported);
      EXPECT_NE(std::string(e.what()).find("state_dtype"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(bitwise_equal(p, p0));
    EXPECT_EQ(q.step_count("p"), 0);
    q.set_param_option("p", "state_dtype", 0);  // the remedy the message names
    q.step({g.data()});
    EXPECT_EQ(q.step_count("p"), 1);
  }
  // Sparse steps need rows of whole blocks, and per-element states.
  std::vector<float> table = random_floats(rng, 64 * 100);
  const std::vector<float> t0 = table;
  Optimizer lazy("lazyadam");
  lazy.set_option("state_dtype", kQ8);
  lazy.set_option("min_quant_size", 0);
  lazy.add_param("emb", table.data(), DType::f32, {64, 100});
  const std::int64_t rows[] = {3};
  const std::vector<float> grad_rows = random_floats(rng, 100);
  try {
    lazy.step_sparse("emb", rows, DType::i64, 1, grad_rows.data());
    FAIL() << "a row of 100 elements stepped in 256-element blocks";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("256"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(bitwise_equal(table, t0));
  std::vector<float> table2 = random_floats(rng, 64 * 256);
  const std::vector<float> t2 = table2;
  Optimizer rowwise("adagrad");
  rowwise.set_option("rowwise", 1);
  rowwise.set_option("state_dtype", kQ8);
  rowwise.set_option("min_quant_size", 0);
  rowwise.add_param("emb", table2.data(), DType::f32, {64, 256});
  const std::vector<float> g2 = random_floats(rng, 256);
  EXPECT_THROW(rowwise.step_sparse("emb", rows, DType::i64, 1, g2.data()), Error);
  EXPECT_TRUE(bitwise_equal(table2, t2));
}

// Sparse steps over quantized states: the named rows' blocks are the float32 sparse step of
// their decoded states encoded to nearest (each row owns whole blocks); the other rows' codes
// and scales are not touched. Repeated indices, several steps, both widths.
TEST(QuantizedStates, SparseStepsReencodeOnlyTheNamedRows) {
  auto rng = make_rng();
  const std::string dir = temp_dir();
  for (const char* algorithm : {"lazyadam", "adagrad"})
    for (double dtype : {kQ8, kQ4}) {
      SCOPED_TRACE(std::string(algorithm) + (dtype == kQ8 ? " 8-bit" : " 4-bit"));
      const AlgorithmDescription& a = describe(algorithm);
      const std::int64_t rows = 40, dim = dtype == kQ8 ? 512 : 256;
      std::vector<float> table = random_floats(rng, static_cast<std::size_t>(rows * dim));
      Optimizer q(algorithm);
      q.set_option("state_dtype", dtype);
      q.add_param("emb", table.data(), DType::f32, {rows, dim});
      std::uniform_int_distribution<std::int64_t> pick(0, rows - 1);
      for (int t = 0; t < 4; ++t) {
        SCOPED_TRACE("step " + std::to_string(t + 1));
        std::vector<std::int64_t> idx(9);
        for (auto& i : idx) i = pick(rng);
        idx[8] = idx[0];  // a repeat: its gradient rows are summed
        const std::vector<float> grads =
            random_floats(rng, idx.size() * static_cast<std::size_t>(dim));
        std::vector<float> ftable = table;
        Optimizer f(algorithm);
        f.add_param("emb", ftable.data(), DType::f32, {rows, dim});
        if (t > 0) {
          q.save(dir + "/s.ckpt");
          f.load(dir + "/s.ckpt");  // its states: q's decoded exactly
        }
        std::vector<std::vector<float>> before;
        for (const std::string& s : q.state_names("emb")) before.push_back(q.state("emb", s));
        q.step_sparse("emb", idx.data(), DType::i64, static_cast<std::int64_t>(idx.size()),
                      grads.data());
        f.step_sparse("emb", idx.data(), DType::i64, static_cast<std::int64_t>(idx.size()),
                      grads.data());
        EXPECT_TRUE(bitwise_equal(table, ftable)) << first_difference(table, ftable);
        const std::vector<std::string> names = q.state_names("emb");
        for (std::size_t k = 0; k < names.size(); ++k) {
          const std::vector<float> got = q.state("emb", names[k]), fs = f.state("emb", names[k]);
          const auto nn = a.non_negative[static_cast<std::size_t>(
              std::find(a.states.begin(), a.states.end(), names[k]) - a.states.begin())];
          for (std::int64_t r = 0; r < rows; ++r) {
            const auto first = static_cast<std::ptrdiff_t>(r * dim);
            const std::vector<float> row(got.begin() + first, got.begin() + first + dim);
            const bool named = std::find(idx.begin(), idx.end(), r) != idx.end();
            const std::vector<float> want =
                named ? quantized_values(
                            std::vector<float>(fs.begin() + first, fs.begin() + first + dim), dtype,
                            nn)
                      : std::vector<float>(before[k].begin() + first,
                                           before[k].begin() + first + dim);
            ASSERT_TRUE(bitwise_equal(row, want))
                << names[k] << " row " << r << (named ? " (named)" : " (not named)") << ": "
                << first_difference(row, want);
          }
        }
      }
    }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fo::test
