// The memory plan's cost model against hand-computed cases.
#include "memory/cost_model.h"

#include <gtest/gtest.h>

namespace shoal::memory {
namespace {

WarmupProfile Base() {
  WarmupProfile p;
  p.compute_seconds = 2.0;       // 100 accesses: 20 ms each
  p.accesses = 100;
  p.read_bytes_per_s = 1e9;
  p.write_bytes_per_s = 0.5e9;
  p.chunk_bytes = 50'000'000;    // a load takes 50 ms, a write-back 100 ms
  p.loads_per_step = 10;
  p.write_backs_per_step = 4;
  p.capacity_chunks = 12;
  p.pinned_chunks = 2;
  p.chunk_budget_bytes = 600'000'000;
  p.non_chunk_peak_bytes = 123'000'000;
  return p;
}

TEST(CostModelTest, DepthCoversOneLoadAndIoIsHiddenWhenItFits) {
  auto e = PlanFromProfile(Base());
  ASSERT_TRUE(e.ok()) << e.status();
  // ceil(50 ms / 20 ms) + 1 = 4 accesses ahead, within the 10 free chunks.
  EXPECT_EQ(e->prefetch_depth, 4);
  EXPECT_DOUBLE_EQ(e->io_seconds, 10 * 0.05 + 4 * 0.1);
  EXPECT_DOUBLE_EQ(e->step_seconds_hidden, 2.0);
  EXPECT_DOUBLE_EQ(e->step_seconds_serial, 2.9);
  EXPECT_DOUBLE_EQ(e->step_seconds, 2.0);
  EXPECT_EQ(e->peak_bytes, 723'000'000);
}

TEST(CostModelTest, IoBoundStepsTakeTheIoTime) {
  WarmupProfile p = Base();
  p.loads_per_step = 60;  // 3 s of loads + 0.4 s of write-backs against 2 s of compute
  auto e = PlanFromProfile(p);
  ASSERT_TRUE(e.ok());
  EXPECT_DOUBLE_EQ(e->step_seconds_hidden, 3.4);
  EXPECT_DOUBLE_EQ(e->step_seconds, 3.4);
}

TEST(CostModelTest, TooLittleRoomLimitsTheDepthAndHidesOnlyAShare) {
  WarmupProfile p = Base();
  p.capacity_chunks = 4;  // 2 free chunks against the 4 wanted: half of the I/O hides
  auto e = PlanFromProfile(p);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->prefetch_depth, 2);
  EXPECT_DOUBLE_EQ(e->step_seconds, 2.9 - 0.5 * (2.9 - 2.0));
}

TEST(CostModelTest, FastDiskNeedsDepthOne) {
  WarmupProfile p = Base();
  p.read_bytes_per_s = 100e9;  // a load takes 0.5 ms, under one access
  auto e = PlanFromProfile(p);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->prefetch_depth, 2);  // ceil(0.025) + 1
}

TEST(CostModelTest, BadProfilesNameTheField) {
  WarmupProfile p = Base();
  p.read_bytes_per_s = 0;
  auto e = PlanFromProfile(p);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("read_bytes_per_s"), std::string::npos);
  p = Base();
  p.capacity_chunks = 1;
  EXPECT_NE(PlanFromProfile(p).status().message().find("capacity_chunks"), std::string::npos);
  p = Base();
  p.accesses = 0;
  EXPECT_NE(PlanFromProfile(p).status().message().find("accesses"), std::string::npos);
}

}  // namespace
}  // namespace shoal::memory
