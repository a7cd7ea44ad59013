// fusedopt-demo: the program a new user runs first. Subcommands:
//   train   optimizers compared on handwritten digits (train.cpp)
//   paths   optimizer trajectories on 2-D test functions (paths.cpp)
#include <cstdio>
#include <cstring>

#include "paths.hpp"
#include "train.hpp"

namespace {

const char kUsage[] =
    "usage: fusedopt-demo <command> [options]\n"
    "\n"
    "commands:\n"
    "  train   train small models on handwritten digits with each optimizer and compare them\n"
    "  paths   draw optimizer trajectories on 2-D test functions\n"
    "\n"
    "fusedopt-demo <command> --help describes a command's options.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const char* command = argv[1];
  // Each command sees its own name as argv[0].
  if (std::strcmp(command, "train") == 0) return fo::demo::run_train(argc - 1, argv + 1);
  if (std::strcmp(command, "paths") == 0) return fo::demo::run_paths(argc - 1, argv + 1);
  if (std::strcmp(command, "-h") == 0 || std::strcmp(command, "--help") == 0) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::fprintf(stderr, "fusedopt-demo: unknown command '%s'\n\n%s", command, kUsage);
  return 2;
}
