// The multi-tensor launch plan, tested on the CPU: every element of every tensor is covered
// by exactly one block, in order, within the launch limits.
#include "multi_tensor_plan.hpp"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "fusedopt/types.hpp"
#include "test_util.hpp"

namespace fo::test {
namespace {

using detail::plan_launches;

// Walks the plan as the kernel does (block b -> last tensor with block_start <= b) and counts
// how often each element is covered.
void expect_exact_cover(const std::vector<std::int64_t>& numels, std::int64_t chunk,
                        int max_tensors, std::int64_t max_blocks) {
  const auto plan = plan_launches(numels, chunk, max_tensors, max_blocks);
  std::vector<std::int64_t> covered(numels.size(), 0);
  std::size_t last_tensor = 0;
  bool first = true;
  for (const auto& g : plan) {
    ASSERT_FALSE(g.tensors.empty());
    ASSERT_LE(static_cast<int>(g.tensors.size()), max_tensors);
    ASSERT_LE(g.blocks, max_blocks);
    ASSERT_EQ(g.block_start.size(), g.tensors.size());
    for (std::int64_t b = 0; b < g.blocks; ++b) {
      std::size_t t = 0;
      while (t + 1 < g.block_start.size() && g.block_start[t + 1] <= b) ++t;
      const std::size_t id = g.tensors[t];
      const std::int64_t begin = (b - g.block_start[t]) * chunk;
      ASSERT_LT(begin, numels[id]) << "block " << b << " starts past its tensor";
      ASSERT_EQ(begin, covered[id]) << "chunks out of order or overlapping";
      covered[id] += std::min(chunk, numels[id] - begin);
      if (!first) {
        ASSERT_GE(id, last_tensor) << "tensors out of order";
      }
      last_tensor = id;
      first = false;
    }
  }
  for (std::size_t i = 0; i < numels.size(); ++i)
    EXPECT_EQ(covered[i], std::max<std::int64_t>(numels[i], 0)) << "tensor " << i;
}

TEST(MultiTensorPlan, CoversMixedSizesExactly) {
  expect_exact_cover({1, 0, 8192, 8193, 3, 100000, 0, 7}, 8192, 256, 1 << 30);
  expect_exact_cover({}, 8192, 256, 1 << 30);
  expect_exact_cover({0, 0}, 8192, 256, 1 << 30);
}

TEST(MultiTensorPlan, SplitsAtTheTensorAndBlockLimits) {
  std::vector<std::int64_t> many(1000, 5);
  const auto plan = plan_launches(many, 4, 256, 1 << 30);
  ASSERT_EQ(plan.size(), 4u);  // 256 + 256 + 256 + 232 tensors
  EXPECT_EQ(plan.back().tensors.size(), 232u);
  expect_exact_cover(many, 4, 256, 1 << 30);
  expect_exact_cover({10, 10, 10, 10}, 4, 256, 6);  // 3 blocks each: two tensors a launch
  EXPECT_EQ(plan_launches({10, 10, 10, 10}, 4, 256, 6).size(), 2u);
}

TEST(MultiTensorPlan, RandomListsLikeAModel) {
  auto rng = make_rng();
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<std::int64_t> numels(std::uniform_int_distribution<int>(0, 400)(rng));
    for (auto& n : numels) n = std::uniform_int_distribution<std::int64_t>(0, 200000)(rng);
    const std::int64_t chunk = std::int64_t{1} << std::uniform_int_distribution<int>(2, 14)(rng);
    expect_exact_cover(numels, chunk, std::uniform_int_distribution<int>(1, 300)(rng), 1 << 20);
  }
}

TEST(MultiTensorPlan, RejectsImpossibleLimits) {
  EXPECT_THROW(plan_launches({100}, 1, 8, 10), Error);  // one tensor needs 100 blocks
  EXPECT_THROW(plan_launches({100}, 0, 8, 10), Error);
}

}  // namespace
}  // namespace fo::test
