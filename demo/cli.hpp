// fusedopt-demo's command line (cli.cpp): which command runs, and what the commands share.
//
//   int main(int argc, char** argv) { return fo::demo::run_demo(argc, argv); }
#pragma once

#include <string>

namespace fo::demo {

/// `fusedopt-demo <command> [options]`: train, paths, or help (also -h, --help), which prints
/// the usage to stdout and returns 0; no command or an unknown one prints it to stderr and
/// returns 2. `help COMMAND` is `COMMAND --help`. Returns the exit status.
int run_demo(int argc, char** argv);

/// Creates the output directory `dir` if needed and writes and removes a probe file there, so
/// that a command fails before its work, not after. Throws std::runtime_error naming --out,
/// `dir` and the reason.
void prepare_out_dir(const std::string& dir);

}  // namespace fo::demo
