// libFuzzer target for the checkpoint loader: arbitrary bytes through the decoder and then
// through Optimizer::load into an optimizer shaped like the seed corpus's checkpoints. Any
// crash, leak or sanitizer report is a bug; a clean fo::Error is the expected answer.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "fusedopt/fusedopt.hpp"
#include "fuzz_shapes.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    (void)fo::detail::decode_checkpoint(data, size);
  } catch (const fo::Error&) {
  }
  static const std::string path = "/tmp/fusedopt-fuzz-" + std::to_string(::getpid());
  if (std::FILE* f = std::fopen(path.c_str(), "wb")) {
    std::fwrite(data, 1, size, f);
    std::fclose(f);
  }
  for (const char* algorithm : fo::fuzz::kAlgorithms) {
    std::vector<std::vector<float>> params;
    fo::Optimizer opt(algorithm);
    fo::fuzz::add_params(opt, params);
    try {
      opt.load(path);
    } catch (const fo::Error&) {
    }
  }
  return 0;
}
