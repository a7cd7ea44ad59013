// fusedopt-demo: the program a new user runs first. Commands:
//   train   optimizers compared on handwritten digits (train_cli.cpp)
//   paths   optimizer trajectories on 2-D test functions (paths.cpp)
//   help    the usage below
#include "cli.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <system_error>

#include "paths.hpp"
#include "train.hpp"

namespace fo::demo {

namespace {

const char kUsage[] =
    "usage: fusedopt-demo <command> [options]\n"
    "\n"
    "commands:\n"
    "  train   train small models on handwritten digits with each optimizer and compare them\n"
    "  paths   draw optimizer trajectories on 2-D test functions\n"
    "  help    this text; help COMMAND describes a command's options (as COMMAND --help)\n";

bool is_help(const char* arg) {
  return std::strcmp(arg, "help") == 0 || std::strcmp(arg, "-h") == 0 ||
         std::strcmp(arg, "--help") == 0;
}

}  // namespace

int run_demo(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const char* command = argv[1];
  // Each command sees its own name as argv[0].
  if (std::strcmp(command, "train") == 0) return run_train(argc - 1, argv + 1);
  if (std::strcmp(command, "paths") == 0) return run_paths(argc - 1, argv + 1);
  if (is_help(command)) {
    if (argc > 2 && (std::strcmp(argv[2], "train") == 0 || std::strcmp(argv[2], "paths") == 0)) {
      char help[] = "--help";
      char* args[] = {argv[2], help, nullptr};
      return std::strcmp(argv[2], "train") == 0 ? run_train(2, args) : run_paths(2, args);
    }
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::fprintf(stderr, "fusedopt-demo: unknown command '%s'\n\n%s", command, kUsage);
  return 2;
}

void prepare_out_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string what = "--out " + dir + ": ";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(what + "cannot create the directory (" + ec.message() + ")");
  if (!fs::is_directory(dir, ec)) throw std::runtime_error(what + "not a directory");
  // Permissions, a read-only file system or a full disk all show on a real file.
  const fs::path probe = fs::path(dir) / (".fusedopt-demo-probe-" + std::to_string(getpid()));
  std::ofstream out(probe, std::ios::binary | std::ios::trunc);
  const bool opened = out.is_open();
  out << "probe\n";
  out.close();
  const bool written = opened && !out.fail();
  if (opened) fs::remove(probe, ec);
  if (!written) throw std::runtime_error(what + "cannot write files in this directory");
}

}  // namespace fo::demo
