// Block-quantized states (q8, q4) through the stateless layer (functional.hpp): the caller's
// buffers step bitwise as fo::Optimizer's with state_dtype 5 / 6 (params, decoded states and
// the buffers' bytes, which a checkpoint stores as they are), and what cannot take them (a
// misaligned buffer, lamb, schedule-free, eval_params) is refused with nothing changed.
#include <gtest/gtest.h>
#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "fusedopt/kernels/quantize.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

/// A quantized state buffer with a 16-byte aligned start (`offset` bytes past it: misaligned
/// on purpose where offset is not a multiple of 16).
struct QuantBuffer {
  std::vector<unsigned char> storage;
  std::size_t offset = 0;
  unsigned char* data() {
    auto at = reinterpret_cast<std::uintptr_t>(storage.data());
    return storage.data() + ((16 - at % 16) % 16) + offset;
  }
  std::vector<unsigned char> bytes(std::size_t n) {
    return std::vector<unsigned char>(data(), data() + n);
  }
};

QuantBuffer make_state(DType q, const StateSpec& spec, std::int64_t n, std::size_t offset = 0) {
  QuantBuffer b;
  b.offset = offset;
  b.storage.resize(quantized_state_bytes(q, n) + 32);
  fill_quantized_state(b.data(), q, spec.non_negative, static_cast<float>(spec.init), n);
  return b;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool contains(const std::vector<char>& file, const std::vector<unsigned char>& bytes) {
  return std::search(file.begin(), file.end(), bytes.begin(), bytes.end(),
                     [](char a, unsigned char b) { return static_cast<unsigned char>(a) == b; }) !=
         file.end();
}

struct Case {
  const char* algorithm;
  NamedOptions options;
};

// Each case, 8-bit and 4-bit, over two params in one list (lengths that leave a short last
// block), six steps: the functional step with the caller's buffers against fo::Optimizer.
TEST(FunctionalQuantized, StepsBitwiseAsTheOptimizerWithQuantizedStates) {
  const std::vector<Case> cases = {
      {"adamw", {{"lr", 1e-2}, {"weight_decay", 0.1}}},
      {"adam", {{"lr", 1e-2}, {"amsgrad", 1}, {"weight_decay", 0.01}}},
      {"sgd", {{"lr", 0.05}, {"momentum", 0.9}, {"nesterov", 1}}},
      {"lion", {{"lr", 1e-3}, {"weight_decay", 0.1}}},
      {"rmsprop", {{"lr", 1e-2}, {"centered", 1}, {"momentum", 0.9}}},
  };
  const std::int64_t sizes[] = {5000, 777};
  const std::string dir = [] {
    std::string d = (std::filesystem::temp_directory_path() / "fusedopt-fq-XXXXXX").string();
    if (!::mkdtemp(d.data())) throw std::runtime_error("mkdtemp failed");
    return d;
  }();
  auto rng = make_rng();
  for (const Case& c : cases) {
    for (const DType q : {DType::q8, DType::q4}) {
      SCOPED_TRACE(std::string(c.algorithm) + " " + dtype_name(q));
      const std::vector<StateSpec> specs = step_states(c.algorithm, c.options);
      ASSERT_FALSE(specs.empty());
      std::vector<std::vector<float>> pf, po, grads[6];
      std::vector<std::vector<QuantBuffer>> states;  // [param][spec]
      Optimizer opt(c.algorithm);
      for (const auto& [key, value] : c.options) opt.set_option(key, value);
      opt.set_option("state_dtype", q == DType::q8 ? 5.0 : 6.0);
      opt.set_option("min_quant_size", 0);
      for (std::size_t i = 0; i < 2; ++i) {
        pf.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
        po.push_back(pf.back());
        for (auto& g : grads) g.push_back(random_floats(rng, static_cast<std::size_t>(sizes[i])));
        std::vector<QuantBuffer> mine;
        for (const StateSpec& s : specs) mine.push_back(make_state(q, s, sizes[i]));
        states.push_back(std::move(mine));
      }
      for (std::size_t i = 0; i < 2; ++i)
        opt.add_param("p" + std::to_string(i), po[i].data(), DType::f32, {sizes[i]});
      for (int t = 0; t < 6; ++t) {
        std::vector<DenseTensors> ts(2);
        const std::int64_t steps[] = {t + 1, t + 1};
        for (std::size_t i = 0; i < 2; ++i) {
          ts[i].param = pf[i].data();
          ts[i].grad = grads[t][i].data();
          ts[i].numel = sizes[i];
          ts[i].state_dtype = q;
          for (std::size_t j = 0; j < specs.size(); ++j)
            ts[i].states[specs[j].index] = states[i][j].data();
        }
        fused_step_list(c.algorithm, c.options, ts.data(), steps, 2);
        opt.step({grads[t][0].data(), grads[t][1].data()});
        for (std::size_t i = 0; i < 2; ++i) {
          ASSERT_TRUE(bitwise_equal(pf[i], po[i]))
              << "step " << t + 1 << " param " << i << ": " << first_difference(pf[i], po[i]);
          for (std::size_t j = 0; j < specs.size(); ++j) {
            std::vector<float> decoded(static_cast<std::size_t>(sizes[i]));
            dequantize_state(decoded.data(), states[i][j].data(), q, specs[j].non_negative,
                             sizes[i]);
            ASSERT_TRUE(bitwise_equal(decoded, opt.state("p" + std::to_string(i), specs[j].name)))
                << "step " << t + 1 << " param " << i << " state " << specs[j].name;
          }
        }
      }
      // The buffers' bytes: a checkpoint keeps the optimizer's as they are.
      const std::string path = dir + "/" + c.algorithm + ".ckpt";
      opt.save(path);
      const std::vector<char> file = read_file(path);
      for (std::size_t i = 0; i < 2; ++i)
        for (std::size_t j = 0; j < specs.size(); ++j)
          EXPECT_TRUE(contains(file, states[i][j].bytes(quantized_state_bytes(q, sizes[i]))))
              << "param " << i << " state " << specs[j].name;
    }
  }
  std::filesystem::remove_all(dir);
}

// The typed single-tensor step takes them too, and a bfloat16 param with them (the storage
// layer's other streams) steps as the Optimizer's.
TEST(FunctionalQuantized, TheTypedStepAndBfloat16ParamsTakeThem) {
  auto rng = make_rng();
  const std::int64_t n = 4099;
  const std::vector<float> p0 = random_floats(rng, n);
  std::vector<std::uint16_t> pf(static_cast<std::size_t>(n)), po;
  for (std::size_t i = 0; i < pf.size(); ++i) pf[i] = to_bf16(p0[i]).bits;
  po = pf;
  const std::vector<StateSpec> specs = step_states("adamw", {});
  std::vector<QuantBuffer> states;
  for (const StateSpec& s : specs) states.push_back(make_state(DType::q4, s, n));
  Optimizer opt("adamw");
  opt.set_option("state_dtype", 6);
  opt.set_option("min_quant_size", 0);
  opt.set_option("fp32_grads", 1);
  opt.add_param("p", po.data(), DType::bf16, {n});
  AdamW::Options o;
  for (int t = 1; t <= 3; ++t) {
    const std::vector<float> g = random_floats(rng, n);
    DenseTensors d;
    d.param = pf.data();
    d.grad = g.data();
    d.numel = n;
    d.param_dtype = DType::bf16;
    d.grad_dtype = DType::f32;
    d.state_dtype = DType::q4;
    for (std::size_t j = 0; j < specs.size(); ++j) d.states[specs[j].index] = states[j].data();
    fused_step<AdamW>(o, t, d);
    opt.step({g.data()});
    ASSERT_EQ(std::memcmp(pf.data(), po.data(), pf.size() * sizeof(std::uint16_t)), 0)
        << "step " << t;
  }
}

// Refusals: a misaligned buffer (invalid_argument), lamb and schedule-free (unsupported),
// and the evaluation form; each with nothing changed.
TEST(FunctionalQuantized, WhatCannotTakeThemIsRefusedAndChangesNothing) {
  auto rng = make_rng();
  const std::int64_t n = 4096;
  std::vector<float> p = random_floats(rng, n);
  const std::vector<float> p0 = p, g = random_floats(rng, n);
  const auto expect_refused = [&](const char* algorithm, const NamedOptions& options,
                                  std::size_t offset, StatusCode code, const char* words) {
    SCOPED_TRACE(std::string(algorithm) + " offset " + std::to_string(offset));
    const std::vector<StateSpec> specs = step_states(algorithm, options);
    std::vector<QuantBuffer> states;
    std::vector<std::vector<unsigned char>> before;
    for (const StateSpec& s : specs) {
      states.push_back(make_state(DType::q8, s, n, offset));
      before.push_back(states.back().storage);
    }
    DenseTensors t;
    t.param = p.data();
    t.grad = g.data();
    t.numel = n;
    t.state_dtype = DType::q8;
    for (std::size_t j = 0; j < specs.size(); ++j) t.states[specs[j].index] = states[j].data();
    const std::int64_t step = 1;
    double scalars[kMaxScalars] = {};
    const std::vector<ScalarSpec> scalar_specs = step_scalars(algorithm);
    for (std::size_t k = 0; k < scalar_specs.size(); ++k) scalars[k] = scalar_specs[k].init;
    if (!scalar_specs.empty()) t.scalars = scalars;
    try {
      fused_step_list(algorithm, options, &t, &step, 1);
      ADD_FAILURE() << "stepped";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
    EXPECT_TRUE(bitwise_equal(p, p0));
    for (std::size_t j = 0; j < specs.size(); ++j) EXPECT_TRUE(states[j].storage == before[j]);
  };
  expect_refused("adamw", {}, 4, StatusCode::invalid_argument, "16-byte aligned");
  expect_refused("adamw", {}, 8, StatusCode::invalid_argument, "16-byte aligned");
  expect_refused("lamb", {}, 0, StatusCode::unsupported, "one elementwise pass");
  expect_refused("adamw_schedule_free", {}, 0, StatusCode::unsupported, "copy of the weights");

  // The evaluation form never takes them.
  const std::vector<StateSpec> specs = step_states("sgd_schedule_free", {});
  std::vector<QuantBuffer> states;
  for (const StateSpec& s : specs) states.push_back(make_state(DType::q8, s, n));
  DenseTensors t;
  t.param = p.data();
  t.numel = n;
  t.state_dtype = DType::q8;
  for (std::size_t j = 0; j < specs.size(); ++j) t.states[specs[j].index] = states[j].data();
  EXPECT_THROW(eval_params("sgd_schedule_free", {}, &t, 1), Error);
  EXPECT_TRUE(bitwise_equal(p, p0));

  // The buffer functions check their dtype.
  EXPECT_THROW(quantized_state_bytes(DType::bf16, 10), Error);
  EXPECT_EQ(quantized_state_bytes(DType::q8, 257), 272u + 8u);
  EXPECT_EQ(quantized_state_bytes(DType::q4, 129), 80u + 8u);
}

}  // namespace
}  // namespace fo::test
