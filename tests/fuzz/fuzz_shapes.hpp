// The optimizers the fuzz target loads into and the seed generator saves from: the same
// algorithms and params, so seeds get past the shape checks into the state checks.
#pragma once

#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"

namespace fo::fuzz {

inline constexpr const char* kAlgorithms[] = {"adam", "sgd", "lazyadam"};

inline void add_params(Optimizer& opt, std::vector<std::vector<float>>& storage) {
  const std::vector<std::vector<std::int64_t>> shapes = {{3}, {2, 5}, {17}};
  storage.clear();
  for (const auto& s : shapes)
    storage.emplace_back(static_cast<std::size_t>(s.size() == 2 ? s[0] * s[1] : s[0]), 0.5f);
  for (std::size_t i = 0; i < shapes.size(); ++i)
    opt.add_param("p" + std::to_string(i), storage[i].data(), DType::f32, shapes[i]);
}

}  // namespace fo::fuzz
