// Checkpoints: resuming equals never stopping, bitwise, for every optimizer; a save is atomic;
// every kind of bad file is rejected with the optimizer exactly as it was.
#include "checkpoint.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "reference/reference.hpp"
#include "tensor_buffer.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

namespace fs = std::filesystem;

/// A fresh folder per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string t = (fs::temp_directory_path() / "fusedopt-ckpt-XXXXXX").string();
    path_ = ::mkdtemp(t.data());
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::size_t entries() const {
    return static_cast<std::size_t>(std::distance(fs::directory_iterator(path_), {}));
  }

 private:
  fs::path path_;
};

std::vector<unsigned char> bytes_of(const std::string& path) { return detail::read_file(path); }
void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Options that give every algorithm all its states (its reference's richest variant), a
// per-param override and step settings.
std::vector<std::pair<std::string, double>> rich(const std::string& algorithm) {
  std::vector<std::pair<std::string, double>> o = {{"grad_scale", 4.0}, {"max_grad_norm", 100.0}};
  for (const auto& kv : ref::richest_options(algorithm)) o.push_back(kv);
  return o;
}

struct Model {
  std::vector<std::int64_t> sizes = {37, 1000, 4099};
  std::vector<std::vector<float>> params;
  Optimizer opt;
  Model(const std::string& algorithm, const std::vector<std::vector<float>>& init,
        const std::vector<std::pair<std::string, double>>& options)
      : params(init), opt(algorithm) {
    for (const auto& [k, v] : options) opt.set_option(k, v);
    for (std::size_t i = 0; i < sizes.size(); ++i)
      opt.add_param("p" + std::to_string(i), params[i].data(), DType::f32,
                    shape_for(algorithm, {sizes[i]}));
    if (!options.empty()) opt.set_param_option("p1", "lr", opt.option("lr") * 0.5);
  }
  void step(const std::vector<std::vector<float>>& g) {
    std::vector<const void*> ptrs;
    for (const auto& x : g) ptrs.push_back(x.data());
    opt.step(ptrs.data());
  }
  std::vector<std::vector<float>> everything() const {
    std::vector<std::vector<float>> all = params;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string n = "p" + std::to_string(i);
      for (const auto& s : opt.state_names(n)) all.push_back(opt.state(n, s));
      all.push_back(
          {static_cast<float>(opt.step_count(n)), static_cast<float>(opt.param_option(n, "lr"))});
    }
    for (const auto& d : dense_algorithms())
      if (d.name == opt.algorithm())
        for (const auto& k : d.options) all.push_back({static_cast<float>(opt.option(k))});
    for (const char* k : {"grad_scale", "max_grad_norm", "skip_nonfinite"})
      all.push_back({static_cast<float>(opt.option(k))});
    return all;
  }
};

class Checkpoint : public ::testing::TestWithParam<std::string> {};

TEST_P(Checkpoint, ResumingEqualsNeverStopping) {
  const std::string algorithm = GetParam();
  auto rng = make_rng();
  TempDir dir;
  std::vector<std::vector<float>> init;
  for (auto n : {37, 1000, 4099}) init.push_back(random_floats(rng, static_cast<std::size_t>(n)));
  std::vector<std::vector<std::vector<float>>> grads(100);
  for (auto& g : grads)
    for (auto n : {37, 1000, 4099}) g.push_back(random_floats(rng, static_cast<std::size_t>(n)));

  Model straight(algorithm, init, rich(algorithm));
  for (const auto& g : grads) straight.step(g);

  Model first(algorithm, init, rich(algorithm));
  for (int t = 0; t < 50; ++t) first.step(grads[t]);
  first.opt.save(dir.file("ckpt"));
  // The resumed run starts from a default optimizer: the file brings options and state.
  Model resumed(algorithm, first.params, {});
  resumed.opt.load(dir.file("ckpt"));
  for (int t = 50; t < 100; ++t) resumed.step(grads[t]);
  expect_same(resumed.everything(), straight.everything(), "50 + save/load + 50 vs 100");
  EXPECT_EQ(dir.entries(), 1u) << "a temporary file was left behind";
}

INSTANTIATE_TEST_SUITE_P(All, Checkpoint, ::testing::ValuesIn([] {
                           std::vector<std::string> v;
                           for (const auto& a : dense_algorithms()) v.push_back(a.name);
                           return v;
                         }()),
                         [](const auto& param_info) { return param_info.param; });

/// A stepped adam model and its checkpoint, for the failure tests.
struct Saved {
  TempDir dir;
  std::vector<std::vector<float>> init;
  Model model;
  std::vector<unsigned char> file;
  Saved() : init(make_init()), model("adam", init, rich("adam")) {
    auto rng = make_rng("grads");
    for (int t = 0; t < 3; ++t) {
      std::vector<std::vector<float>> g;
      for (auto n : model.sizes) g.push_back(random_floats(rng, static_cast<std::size_t>(n)));
      model.step(g);
    }
    model.opt.save(dir.file("ckpt"));
    file = bytes_of(dir.file("ckpt"));
  }
  static std::vector<std::vector<float>> make_init() {
    auto rng = make_rng("init");
    std::vector<std::vector<float>> v;
    for (auto n : {37, 1000, 4099}) v.push_back(random_floats(rng, static_cast<std::size_t>(n)));
    return v;
  }
};

/// Loads `bytes` into a stepped optimizer: it must throw `code` and change nothing.
void expect_rejected(const std::vector<unsigned char>& bytes, StatusCode code,
                     const std::string& needle, const std::string& what) {
  Saved other;  // a different optimizer state than the file's: a load would show
  auto rng = make_rng("other");
  std::vector<std::vector<float>> g;
  for (auto n : other.model.sizes) g.push_back(random_floats(rng, static_cast<std::size_t>(n)));
  other.model.step(g);
  const auto before = other.model.everything();
  write_bytes(other.dir.file("bad"), bytes);
  try {
    other.model.opt.load(other.dir.file("bad"));
    ADD_FAILURE() << what << ": accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << what << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << what << ": " << e.what();
  }
  expect_same(other.model.everything(), before, what + ": the optimizer changed");
}

TEST(CheckpointErrors, WrongMagicNewerVersionAndTruncation) {
  Saved s;
  auto f = s.file;
  f[0] = 'X';
  expect_rejected(f, StatusCode::corrupt_data, "magic", "wrong magic");
  f = s.file;
  f[8] = 99;  // format version
  expect_rejected(f, StatusCode::unsupported, "newer", "a newer version");
  f = s.file;
  std::swap(f[12], f[15]);  // the byte-order mark
  expect_rejected(f, StatusCode::corrupt_data, "byte order", "the other byte order");
  for (std::size_t len : {std::size_t{0}, std::size_t{7}, std::size_t{31}, std::size_t{100},
                          s.file.size() / 2, s.file.size() - 1}) {
    expect_rejected(std::vector<unsigned char>(s.file.begin(),
                                               s.file.begin() + static_cast<std::ptrdiff_t>(len)),
                    StatusCode::corrupt_data, "corrupt checkpoint",
                    "truncated to " + std::to_string(len));
  }
  auto longer = s.file;
  longer.push_back(0);
  expect_rejected(longer, StatusCode::corrupt_data, "bytes", "one byte appended");
}

// A flipped bit is rejected, or (in alignment padding, which holds no data) harmless: a load
// that succeeds must give bitwise what the intact file gives.
TEST(CheckpointErrors, FlippedBitsAreCaught) {
  Saved s;
  Saved intact;
  intact.model.opt.load(s.dir.file("ckpt"));  // the file as saved loads
  auto rng = make_rng();
  int rejected = 0;
  for (int trial = 0; trial < 200; ++trial) {
    auto f = s.file;
    const std::size_t at = std::uniform_int_distribution<std::size_t>(0, f.size() - 1)(rng);
    f[at] ^= static_cast<unsigned char>(1u << std::uniform_int_distribution<int>(0, 7)(rng));
    Saved target;
    const auto before = target.model.everything();
    write_bytes(target.dir.file("flipped"), f);
    try {
      target.model.opt.load(target.dir.file("flipped"));
      ADD_FAILURE() << "a flipped bit at byte " << at << " of " << f.size() << " loaded";
    } catch (const Error& e) {
      ++rejected;
      EXPECT_TRUE(e.code() == StatusCode::corrupt_data || e.code() == StatusCode::unsupported ||
                  e.code() == StatusCode::invalid_argument)
          << e.what();
      expect_same(target.model.everything(), before,
                  "after a rejected flip at " + std::to_string(at));
    }
  }
  EXPECT_EQ(rejected, 200) << "every byte is checksummed or checked as zero padding";
}

TEST(CheckpointErrors, AnotherAlgorithmOrOtherParamsNameEveryMismatch) {
  Saved s;
  {
    Optimizer sgd("sgd");
    std::vector<float> w(37);
    sgd.add_param("p0", w.data(), DType::f32, {37});
    try {
      sgd.load(s.dir.file("ckpt"));
      ADD_FAILURE() << "an adam checkpoint loaded into sgd";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("of adam, this optimizer is sgd"), std::string::npos)
          << e.what();
    }
  }
  Optimizer other("adam");
  std::vector<float> a(37), b(999), c(4099);
  other.add_param("p0", a.data(), DType::f32, {37});
  other.add_param("p1", b.data(), DType::f32, {999});   // another shape
  other.add_param("q2", c.data(), DType::f32, {4099});  // another name
  try {
    other.load(s.dir.file("ckpt"));
    ADD_FAILURE() << "loaded into other params";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'p1' has shape [999], the checkpoint [1000]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'q2' is not in the checkpoint"), std::string::npos) << msg;
    EXPECT_NE(msg.find("checkpoint's param 'p2' is not in this optimizer"), std::string::npos)
        << msg;
  }
  EXPECT_EQ(other.step_count("p0"), 0);
  EXPECT_THROW(other.load(s.dir.file("no-such-file")), Error);
}

TEST(CheckpointErrors, ASaveThatFailsPartWayLeavesThePreviousFile) {
  Saved s;
  const std::string path = s.dir.file("ckpt");
  auto rng = make_rng();
  std::vector<std::vector<float>> g;
  for (auto n : s.model.sizes) g.push_back(random_floats(rng, static_cast<std::size_t>(n)));
  s.model.step(g);  // now the optimizer differs from the file
  for (long long after : {0LL, 10LL, static_cast<long long>(s.file.size() / 2),
                          static_cast<long long>(s.file.size())}) {
    detail::fail_next_write_after(after);
    try {
      s.model.opt.save(path);
      ADD_FAILURE() << "the injected failure did not fail the save";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::io_error) << e.what();
    }
    EXPECT_EQ(bytes_of(path), s.file)
        << "the previous checkpoint changed (failure after " << after << ")";
    EXPECT_EQ(s.dir.entries(), 1u) << "a temporary file was left behind";
  }
  s.model.opt.save(path);  // and without the failure, the new state lands
  EXPECT_NE(bytes_of(path), s.file);
}

TEST(CheckpointErrors, DecoderSurvivesEveryPrefixAndSuffix) {
  Saved s;
  // Every prefix must be rejected without reading out of bounds (run under ASan in CI).
  for (std::size_t len = 0; len < s.file.size(); len += 1 + len / 16)
    EXPECT_THROW(detail::decode_checkpoint(s.file.data(), len), Error) << "prefix " << len;
}

TEST(CheckpointErrors, StateFreeParamsRoundTrip) {
  // sgd without momentum keeps no state: a stepped param saves no tensors and loads back.
  TempDir dir;
  std::vector<float> a(10, 1.0f), b(10, 1.0f), g(10, 0.5f);
  Optimizer saved("sgd");
  saved.add_param("a", a.data(), DType::f32, {10});
  saved.add_param("b", b.data(), DType::f32, {10});
  saved.set_param_option("a", "momentum", 0.9);  // a mixed group: one param with state
  saved.step({g.data(), g.data()});
  saved.save(dir.file("ckpt"));
  Optimizer loaded("sgd");
  loaded.add_param("a", a.data(), DType::f32, {10});
  loaded.add_param("b", b.data(), DType::f32, {10});
  loaded.load(dir.file("ckpt"));
  EXPECT_EQ(loaded.step_count("b"), 1);
  EXPECT_EQ(loaded.param_option("a", "momentum"), 0.9);
  EXPECT_EQ(loaded.state("a", "momentum_buffer"), saved.state("a", "momentum_buffer"));
}

// Row-wise AdaGrad keeps [rows] state beside a [rows x dim] table: resuming from a checkpoint
// equals never stopping, and a state tensor of any other length is corrupt.
TEST(CheckpointRowwise, ResumingEqualsNeverStoppingAndSizesAreChecked) {
  TempDir dir;
  auto rng = make_rng();
  const std::int64_t rows = 50, dim = 9;
  const std::vector<float> init = random_floats(rng, rows * dim);
  std::vector<std::vector<std::int64_t>> idx(10);
  std::vector<std::vector<float>> grads(10);
  for (int t = 0; t < 10; ++t) {
    idx[t].resize(30);
    for (auto& i : idx[t]) i = std::uniform_int_distribution<std::int64_t>(0, rows - 1)(rng);
    grads[t] = random_floats(rng, 30 * dim);
  }
  struct Table {
    std::vector<float> w;
    Optimizer opt{"adagrad"};
    explicit Table(const std::vector<float>& init) : w(init) {
      opt.set_option("rowwise", 1);
      opt.set_option("lr_decay", 0.01);
      opt.add_param("emb", w.data(), DType::f32, {50, 9});
    }
    void steps(int from, int to, const std::vector<std::vector<std::int64_t>>& idx,
               const std::vector<std::vector<float>>& grads) {
      for (int t = from; t < to; ++t)
        opt.step_sparse("emb", idx[t].data(), DType::i64, 30, grads[t].data());
    }
  };
  Table straight(init), first(init), resumed(init);
  straight.steps(0, 10, idx, grads);
  first.steps(0, 5, idx, grads);
  first.opt.save(dir.file("ckpt"));
  resumed.w = first.w;
  resumed.opt.load(dir.file("ckpt"));
  EXPECT_EQ(resumed.opt.state("emb", "sum").size(), static_cast<std::size_t>(rows));
  resumed.steps(5, 10, idx, grads);
  EXPECT_TRUE(bitwise_equal(resumed.w, straight.w)) << first_difference(resumed.w, straight.w);
  EXPECT_TRUE(bitwise_equal(resumed.opt.state("emb", "sum"), straight.opt.state("emb", "sum")));
  EXPECT_EQ(resumed.opt.step_count("emb"), 10);

  // The accumulator with one value per element instead of per row: corrupt, nothing changes.
  const std::vector<unsigned char> file = bytes_of(dir.file("ckpt"));
  detail::CheckpointData d = detail::decode_checkpoint(file.data(), file.size());
  ASSERT_EQ(d.tensors.size(), 1u);
  d.tensors[0].values.resize(static_cast<std::size_t>(rows * dim), 0.5f);
  write_bytes(dir.file("bad"), detail::encode_checkpoint(d));
  const std::vector<float> sum_before = resumed.opt.state("emb", "sum");
  try {
    resumed.opt.load(dir.file("bad"));
    ADD_FAILURE() << "loaded a per-element accumulator into a row-wise table";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::corrupt_data);
    EXPECT_NE(std::string(e.what()).find("expected 50"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(bitwise_equal(resumed.opt.state("emb", "sum"), sum_before));
}

TEST(CheckpointErrors, DuplicateOrUnknownEntriesAreCorrupt) {
  Saved s;
  const detail::CheckpointData good = detail::decode_checkpoint(s.file.data(), s.file.size());
  auto reject = [&](detail::CheckpointData d, const std::string& needle) {
    expect_rejected(detail::encode_checkpoint(d), StatusCode::corrupt_data, needle, needle);
  };
  auto d = good;
  d.params.push_back(d.params[0]);
  reject(d, "appears twice");
  d = good;
  d.tensors.push_back({"nobody", "exp_avg", {1.0f}});
  reject(d, "unknown param 'nobody'");
  d = good;
  d.options.push_back(d.options[0]);
  reject(d, "option 'lr' appears twice");
}

TEST(CheckpointDevices, CpuCheckpointLoadsOnTheGpuAndBack) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  Saved s;
  TestTensor p0(Device::cuda, s.model.params[0]), p1(Device::cuda, s.model.params[1]),
      p2(Device::cuda, s.model.params[2]);
  Optimizer gpu("adam", Device::cuda);
  gpu.add_param("p0", p0.data(), DType::f32, {37});
  gpu.add_param("p1", p1.data(), DType::f32, {1000});
  gpu.add_param("p2", p2.data(), DType::f32, {4099});
  gpu.load(s.dir.file("ckpt"));
  for (const char* n : {"p0", "p1", "p2"}) {
    EXPECT_EQ(gpu.step_count(n), s.model.opt.step_count(n));
    for (const auto& st : gpu.state_names(n))
      EXPECT_TRUE(bitwise_equal(gpu.state(n, st), s.model.opt.state(n, st))) << n << "/" << st;
  }
  gpu.save(s.dir.file("from-gpu"));
  Saved back;
  back.model.opt.load(s.dir.file("from-gpu"));
  expect_same(back.model.everything(), s.model.everything(), "CPU -> GPU -> CPU");
}

}  // namespace
}  // namespace fo::test
