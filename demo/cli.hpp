// fusedopt-demo's command line (cli.cpp): which command runs, and what the commands share.
//
//   int main(int argc, char** argv) { return fo::demo::run_demo(argc, argv); }
#pragma once

namespace fo::demo {

/// `fusedopt-demo <command> [options]`: train, paths, or help (also -h, --help), which prints
/// the usage to stdout and returns 0; no command or an unknown one prints it to stderr and
/// returns 2. `help COMMAND` is `COMMAND --help`. Returns the exit status.
int run_demo(int argc, char** argv);

}  // namespace fo::demo
