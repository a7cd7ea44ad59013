// Writes the fuzzer's seed corpus: small valid checkpoints of the optimizers the fuzz target
// loads into (stepped, with overrides and settings, and one never stepped). Generated at CI
// time from the library itself rather than committed, so the seeds always match the format.
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"
#include "fuzz_shapes.hpp"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  int n = 0;
  for (const char* algorithm : fo::fuzz::kAlgorithms)
    for (int steps : {0, 1, 3}) {
      std::vector<std::vector<float>> params;
      fo::Optimizer opt(algorithm);
      if (std::string(algorithm) == "sgd") opt.set_option("momentum", 0.9);
      opt.set_option("grad_scale", 2.0);
      fo::fuzz::add_params(opt, params);
      opt.set_param_option("p1", "lr", 0.25);
      std::vector<std::vector<float>> grads;
      for (const auto& p : params) grads.emplace_back(p.size(), 0.125f);
      for (int t = 0; t < steps; ++t) opt.step({grads[0].data(), grads[1].data(), grads[2].data()});
      opt.save(dir + "/seed-" + std::to_string(n++));
    }
  return 0;
}
