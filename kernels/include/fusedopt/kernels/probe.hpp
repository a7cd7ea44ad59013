// The traffic probe: a stand-in "optimizer" that reads and writes exactly the streams of a
// step (param, grad, and each state that is present) with one add each. Run through the
// same kernels as a real step, it measures the bandwidth limit of that step's traffic on
// this machine; benchmarks report steps as a percentage of it. Not a registered optimizer.
#pragma once

#include <cstdint>

#include "fusedopt/kernels/config.hpp"

namespace fo {

struct ProbeOp {
  template <class V>
  FO_HOST_DEVICE void operator()(V& p, V g, V* s) const {
    p = p + g;
    s[0] = s[0] + g;
    s[1] = s[1] + g;
    s[2] = s[2] + g;
  }
};

struct TrafficProbe {
  static constexpr const char* kName = "probe";
  struct Options {
    double lr = 0.0;  // unused; every algorithm's Options has lr
  };
  using Op = ProbeOp;
  FO_HOST_DEVICE static Op make_op(const Options&, std::int64_t) { return {}; }
};

}  // namespace fo
