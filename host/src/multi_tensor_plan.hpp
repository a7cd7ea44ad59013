// Launch planning of multi-tensor steps: which tensors share a launch and where each one's
// blocks start. Host code with no CUDA dependency, so CI tests it on any machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fo::detail {

/// One launch: tensors (indices into the caller's list) and the first block of each.
struct LaunchGroup {
  std::vector<std::size_t> tensors;
  std::vector<std::int64_t> block_start;
  std::int64_t blocks = 0;
};

/// Splits tensors of the given sizes into launches of at most `max_tensors` tensors and
/// `max_blocks` blocks, each block covering `chunk` elements of one tensor; tensors keep
/// their order, empty tensors get no block. Throws fo::Error if one tensor alone needs more
/// than `max_blocks` blocks.
std::vector<LaunchGroup> plan_launches(const std::vector<std::int64_t>& numels, std::int64_t chunk,
                                       int max_tensors, std::int64_t max_blocks);

}  // namespace fo::detail
