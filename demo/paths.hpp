// `fusedopt-demo paths`: optimizer trajectories on 2-D test functions, drawn over their
// contours (demo/paths.cpp).
#pragma once

namespace fo::demo {

/// `fusedopt-demo paths [options]`; argv[0] is "paths". Returns the exit status.
int run_paths(int argc, char** argv);

}  // namespace fo::demo
