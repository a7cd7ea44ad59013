// Reading the digits CSV through zlib (gzread also reads an uncompressed file as it is).
#include "data.hpp"

#include <zlib.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <numeric>
#include <stdexcept>

#ifndef FUSEDOPT_DEMO_DATA
#define FUSEDOPT_DEMO_DATA "demo/data/digits.csv.gz"
#endif

namespace fo::demo {

std::string default_data_path() { return FUSEDOPT_DEMO_DATA; }

namespace {

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};

[[noreturn]] void bad_line(const std::string& path, long line, const std::string& why) {
  throw std::runtime_error(path + ":" + std::to_string(line) + ": " + why);
}

// Parses one CSV row of kFeatures + 1 small non-negative integers into `x` and the label.
void parse_row(const std::string& path, long line_no, const char* s, float* x, int* label) {
  for (int col = 0; col <= kFeatures; ++col) {
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end == s) bad_line(path, line_no, "expected a number in column " + std::to_string(col + 1));
    s = end;
    if (col < kFeatures) {
      if (v < 0 || v > 16) bad_line(path, line_no, "pixel value outside 0..16");
      x[col] = static_cast<float>(v) / 16.0f;
      if (*s != ',')
        bad_line(path, line_no, "expected " + std::to_string(kFeatures + 1) + " columns");
      ++s;
    } else {
      if (v < 0 || v >= kClasses) bad_line(path, line_no, "label outside 0..9");
      *label = static_cast<int>(v);
    }
  }
  while (*s == '\r' || *s == '\n' || *s == ' ') ++s;
  if (*s != '\0')
    bad_line(path, line_no, "more than " + std::to_string(kFeatures + 1) + " columns");
}

}  // namespace

Dataset load_digits(const std::string& path) {
  // gzopen opens a directory, and its read error would say only "Is a directory".
  if (std::filesystem::is_directory(path))
    throw std::runtime_error("'" + path + "' is a directory, not the digits data (digits.csv.gz)");
  std::unique_ptr<gzFile_s, GzCloser> f(gzopen(path.c_str(), "rb"));
  if (!f)
    throw std::runtime_error("cannot open the digits data '" + path +
                             "' (give its path with --data)");
  Dataset d;
  char buf[1024];  // a row is at most 65 * 3 characters
  long line_no = 0;
  while (gzgets(f.get(), buf, sizeof buf)) {
    ++line_no;
    if (buf[0] == '\n' || buf[0] == '\r' || buf[0] == '\0') continue;
    d.x.resize(d.x.size() + kFeatures);
    d.y.push_back(0);
    parse_row(path, line_no, buf, d.x.data() + d.x.size() - kFeatures, &d.y.back());
  }
  int err = Z_OK;
  const char* msg = gzerror(f.get(), &err);
  if (err != Z_OK && err != Z_STREAM_END)
    throw std::runtime_error(path + ": " + (msg ? msg : "read error"));
  if (d.size() == 0) throw std::runtime_error(path + ": no examples");
  return d;
}

Split split_dataset(const Dataset& all, std::size_t test_size, std::uint64_t seed) {
  if (test_size >= all.size())
    throw std::invalid_argument("split_dataset: the test set would take every example");
  std::vector<std::size_t> order(all.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  Rng rng(seed);
  rng.shuffle(order);
  Split s;
  const std::size_t n_train = all.size() - test_size;
  for (std::size_t k = 0; k < order.size(); ++k) {
    Dataset& to = k < n_train ? s.train : s.test;
    const float* row = all.x.data() + order[k] * kFeatures;
    to.x.insert(to.x.end(), row, row + kFeatures);
    to.y.push_back(all.y[order[k]]);
  }
  return s;
}

}  // namespace fo::demo
