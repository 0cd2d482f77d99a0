// The state and activation plans (memory/state_plan.h) against numbers worked out by hand.
#include "memory/state_plan.h"

#include <gtest/gtest.h>

namespace shoal::memory {
namespace {

TEST(StatePlanTest, PlacementFollowsTheBudget) {
  // 100,000 elements: 1.6 MB of states, 800 kB of parameters and gradients; moment chunks of
  // max(4096, 3136) = 4096 elements, 32 KiB each.
  const int64_t decay = 99000, other = 1000;
  EXPECT_EQ(MomentChunkElements(100000), 4096);
  EXPECT_EQ(PlaceStates({0, true}, decay, other), StatePlacement::kInRam);          // no budget
  EXPECT_EQ(PlaceStates({1000, false}, decay, other), StatePlacement::kInRam);      // no disk
  EXPECT_EQ(PlaceStates({1600000, true}, decay, other), StatePlacement::kInRam);    // all fit
  EXPECT_EQ(PlaceStates({800000 + 65536, true}, decay, other),
            StatePlacement::kMomentsOffloaded);
  EXPECT_EQ(PlaceStates({800000 + 65535, true}, decay, other), StatePlacement::kPaged);
  EXPECT_EQ(PagedStateBudget({500000, true}, other), 500000 - 8 * (1000 + 64));
  // Large models: about 32 chunks, 16-aligned, at most 2^20 elements.
  EXPECT_EQ(MomentChunkElements(32 * 100000), 100000);
  EXPECT_EQ(MomentChunkElements(int64_t{1} << 40), int64_t{1} << 20);
}

TEST(StatePlanTest, MomentOffloadTakesWhatTheParametersLeave) {
  absl::StatusOr<MomentOffloadPlan> p = PlanMomentOffload({1000000, true}, 800000, 100000);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->chunk_elements, 4096);
  EXPECT_EQ(p->host_budget_bytes, 200000);
  // Everything fits, or nothing to offload to: no offload.
  EXPECT_EQ(PlanMomentOffload({1600000, true}, 800000, 100000)->host_budget_bytes, 0);
  EXPECT_EQ(PlanMomentOffload({1000000, false}, 800000, 100000)->host_budget_bytes, 0);
  // Below two chunks of moments (65,536 bytes) beside the parameters: refused, by name.
  p = PlanMomentOffload({800000 + 65535, true}, 800000, 100000);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("memory.host_budget"), absl::string_view::npos);
  EXPECT_NE(p.status().message().find("at least 865536"), absl::string_view::npos);
}

TEST(StatePlanTest, ActivationBlocksGiveUpFirstToLast) {
  // 10 blocks of 100 bytes kept or 10 as outputs: 550 bytes keep (550 - 100) / 90 = 5 blocks.
  const ActivationBudget b{10, 550, 100, 10};
  EXPECT_EQ(BlocksKept(b, 550), 5);
  EXPECT_EQ(BlocksKept(b, 1e9), 10);
  EXPECT_EQ(BlocksKept(b, 0), 0);
  // "never", or no measured disk: recompute.
  ActivationRates r;
  ActivationChoice c = ChooseActivations(b, "auto", r);
  EXPECT_EQ(c.kept, 5);
  EXPECT_FALSE(c.offload);
  EXPECT_DOUBLE_EQ(c.peak_bytes, 5 * 100 + 5 * 10);
  // A disk at 1000 B/s: 2 x 20 bytes take 0.04 s against 0.1 s to recompute 10 FLOPs at 100 FLOP/s.
  r.disk_bytes_per_s = 1000;
  r.slot_bytes = 20;
  r.staging_bytes = 40;
  r.gemm_flops_per_s = 100;
  r.block_forward_flops = 10;
  c = ChooseActivations(b, "auto", r);
  EXPECT_TRUE(c.offload);
  EXPECT_DOUBLE_EQ(c.offload_seconds, 0.04);
  EXPECT_DOUBLE_EQ(c.recompute_seconds, 0.1);
  EXPECT_EQ(c.kept, 4);  // (510 - 100) / 90 = 4.6: the staging buffers cost a block
  EXPECT_EQ(BlocksKept(b, 510), 4);
  EXPECT_EQ(ChooseActivations(b, "auto", r).kept, 4);
  EXPECT_DOUBLE_EQ(ChooseActivations(b, "auto", r).peak_bytes, 4 * 100 + 6 * 10 + 40);
  EXPECT_FALSE(ChooseActivations(b, "never", r).offload);
  // A slow disk: "auto" recomputes, "always" offloads anyway.
  r.disk_bytes_per_s = 100;
  EXPECT_FALSE(ChooseActivations(b, "auto", r).offload);
  EXPECT_TRUE(ChooseActivations(b, "always", r).offload);
}

}  // namespace
}  // namespace shoal::memory
