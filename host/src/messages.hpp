// What the host layer's error messages are built from: one spelling of each helper.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "fusedopt/types.hpp"

namespace fo::detail {

[[noreturn]] inline void invalid(const std::string& msg) {
  throw Error(StatusCode::invalid_argument, msg);
}
[[noreturn]] inline void unsupported(const std::string& msg) {
  throw Error(StatusCode::unsupported, msg);
}

/// A number as messages print it (%g).
inline std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

/// "a, b, c".
inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

}  // namespace fo::detail
