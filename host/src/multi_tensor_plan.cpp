#include "multi_tensor_plan.hpp"

#include <string>

#include "fusedopt/types.hpp"

namespace fo::detail {

std::vector<LaunchGroup> plan_launches(const std::vector<std::int64_t>& numels, std::int64_t chunk,
                                       int max_tensors, std::int64_t max_blocks) {
  if (chunk <= 0 || max_tensors <= 0 || max_blocks <= 0)
    throw Error(StatusCode::invalid_argument, "plan_launches: bad limits");
  std::vector<LaunchGroup> plan;
  for (std::size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] <= 0) continue;
    const std::int64_t blocks = (numels[i] + chunk - 1) / chunk;
    if (blocks > max_blocks)
      throw Error(StatusCode::invalid_argument, "a tensor of " + std::to_string(numels[i]) +
                                                    " elements needs more than " +
                                                    std::to_string(max_blocks) + " blocks");
    if (plan.empty() || static_cast<int>(plan.back().tensors.size()) == max_tensors ||
        plan.back().blocks + blocks > max_blocks)
      plan.emplace_back();
    LaunchGroup& g = plan.back();
    g.tensors.push_back(i);
    g.block_start.push_back(g.blocks);
    g.blocks += blocks;
  }
  return plan;
}

}  // namespace fo::detail
