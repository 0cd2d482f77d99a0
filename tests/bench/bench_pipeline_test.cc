// The body of `shoal bench pipeline` (bench/pipeline_bench.h): one stage in this process, and two
// stages as two threads over a real Gloo group; the multi-rank runs through the CLI are
// bench_cli_test's.
#include "tests/gloo_pair.h"
#include "bench/pipeline_bench.h"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "parallel/pipeline_schedule.h"
#include "tests/test_util.h"

namespace shoal::bench {
namespace {

using ::shoal::parallel::PeakInFlightBound;
using ::shoal::parallel::ScheduleKind;


TEST(PipelineBenchTest, OneStageRunsBothSchedulesAndBothWorks) {
  for (PipelineBenchWork work : {PipelineBenchWork::kSleep, PipelineBenchWork::kGemm}) {
    PipelineBenchOptions o;
    o.schedules = {ScheduleKind::k1F1B, ScheduleKind::kGPipe};
    o.micro_batches = 3;
    o.forward_ms = 1;
    o.backward_ms = 1;
    o.steps = 2;
    o.work = work;
    auto cases = RunPipelineBench(nullptr, o);
    ASSERT_TRUE(cases.ok()) << cases.status();
    ASSERT_EQ(cases->size(), 2u);
    for (const PipelineBenchCase& c : *cases) {
      EXPECT_EQ(c.stages, 1);
      EXPECT_EQ(c.micro_batches, 3);
      EXPECT_EQ(c.virtual_stages, 1);
      EXPECT_EQ(c.bubble_theory, 0.0);
      // One stage computes whenever it runs: what is not compute is bookkeeping, never negative.
      EXPECT_GE(c.bubble_measured, 0.0);
      EXPECT_LT(c.bubble_measured, 1.0);
      EXPECT_GT(c.compute_s, 0.0);
      EXPECT_GE(c.step_s, c.compute_s);
    }
    EXPECT_EQ((*cases)[0].schedule, ScheduleKind::k1F1B);
    EXPECT_EQ((*cases)[0].peak_slots, std::vector<int>{1});
    EXPECT_EQ((*cases)[1].peak_slots, std::vector<int>{3});
    EXPECT_EQ((*cases)[1].peak_bound, std::vector<int>{3});
    const std::string table = FormatPipelineBenchTable(*cases);
    EXPECT_TRUE(absl::StrContains(table, "GPipe")) << table;
    EXPECT_TRUE(absl::StrContains(table, "3/3")) << table;
  }
}

// Two ranks as two threads of this process over a real Gloo group: every schedule, interleaved
// included, with chunks that take 1/v of the rank's time.
TEST(PipelineBenchTest, TwoStagesRunAllSchedules) {
  ::shoal::testing::TempDir dir;
  auto store = comm::MakeFileStore(dir / "store", 2, absl::Seconds(10));
  ASSERT_TRUE(store.ok()) << store.status();
  PipelineBenchOptions o;
  o.schedules = {ScheduleKind::k1F1B, ScheduleKind::kGPipe, ScheduleKind::kInterleaved1F1B};
  o.micro_batches = 4;
  o.virtual_stages = 2;
  o.forward_ms = 2;
  o.backward_ms = 4;
  o.steps = 2;
  o.activation_shape = {4, 8};
  o.transfer.timeout = absl::Seconds(20);
  std::unique_ptr<comm::Backend> groups[2];
  ASSERT_NO_FATAL_FAILURE(MakePairInThreads(*store, groups));
  absl::StatusOr<std::vector<PipelineBenchCase>> results[2];
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] { results[r] = RunPipelineBench(groups[r].get(), o); });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(results[0].ok()) << results[0].status();
  ASSERT_TRUE(results[1].ok()) << results[1].status();
  const std::vector<PipelineBenchCase>& cases = *results[0];
  ASSERT_EQ(cases.size(), 3u);
  ASSERT_EQ(results[1]->size(), 3u);
  for (size_t i = 0; i < cases.size(); ++i) {
    const PipelineBenchCase& c = cases[i];
    SCOPED_TRACE(ToString(c.schedule));
    EXPECT_EQ(c.schedule, o.schedules[i]);
    EXPECT_EQ(c.stages, 2);
    const bool interleaved = c.schedule == ScheduleKind::kInterleaved1F1B;
    EXPECT_EQ(c.virtual_stages, interleaved ? 2 : 1);
    // p = 2, m = 4: 1 / 5 without interleaving, 1 / (2 * 4 + 1) with v = 2.
    EXPECT_DOUBLE_EQ(c.bubble_theory, interleaved ? 1.0 / 9 : 1.0 / 5);
    // Every rank does m (forward + backward) of work in each schedule: 4 x 6 ms at least.
    EXPECT_GE(c.compute_s, 0.024);
    EXPECT_GE(c.step_s, c.compute_s);
    EXPECT_GE(c.bubble_measured, 0.0);
    EXPECT_LT(c.bubble_measured, 1.0);
    // Both ranks gathered the same figures.
    EXPECT_EQ((*results[1])[i].step_s, c.step_s);
    ASSERT_EQ(c.peak_slots.size(), 2u);
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(c.peak_bound[r], PeakInFlightBound(c.schedule, 2, 4, r, c.virtual_stages));
      EXPECT_EQ(c.peak_slots[r], c.peak_bound[r]) << "rank " << r;
    }
  }
  // Interleaved p = 2, v = 2: rank 0 warms up 2 + 2 chunk-forwards and holds one more.
  EXPECT_EQ(cases[2].peak_bound, (std::vector<int>{5, 3}));
  const std::string table = FormatPipelineBenchTable(cases);
  EXPECT_TRUE(absl::StrContains(table, "interleaved 1F1B")) << table;
  EXPECT_TRUE(absl::StrContains(table, "5/5 3/3")) << table;
}

TEST(PipelineBenchTest, BadOptionsAreRefusedByName) {
  auto refused = [](const PipelineBenchOptions& o, const std::string& name) {
    const absl::Status s = ValidatePipelineBenchOptions(o);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), name)) << s;
    EXPECT_TRUE(absl::IsInvalidArgument(RunPipelineBench(nullptr, o).status()));
  };
  PipelineBenchOptions o;
  o.micro_batches = 0;
  refused(o, "micro-batches");
  o = {};
  o.steps = 0;
  refused(o, "steps");
  o = {};
  o.forward_ms = -1;
  refused(o, "forward-ms");
  o = {};
  o.backward_ms = std::nan("");
  refused(o, "backward-ms");
  o = {};
  o.schedules = {};
  refused(o, "schedule");
  o = {};
  o.schedules = {ScheduleKind::k1F1B, ScheduleKind::kInterleaved1F1B};
  o.virtual_stages = 1;
  refused(o, "virtual-stages");
  // Without an interleaved schedule the number of chunks is not used.
  o.schedules = {ScheduleKind::k1F1B};
  EXPECT_TRUE(ValidatePipelineBenchOptions(o).ok());
  // What depends on the stage count: one stage cannot interleave, m must be a multiple of p.
  o = {};
  o.schedules = {ScheduleKind::kInterleaved1F1B};
  EXPECT_TRUE(ValidatePipelineBenchOptions(o).ok());
  absl::Status s = CheckPipelineBenchStages(o, 1);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "at least 2 stages, got 1")) << s;
  EXPECT_TRUE(absl::IsInvalidArgument(RunPipelineBench(nullptr, o).status()));
  o.micro_batches = 6;
  s = CheckPipelineBenchStages(o, 4);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "micro-batches (6)")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "stages (4)")) << s;
  EXPECT_TRUE(CheckPipelineBenchStages(o, 3).ok());
  o.schedules = {ScheduleKind::kGPipe};
  EXPECT_TRUE(CheckPipelineBenchStages(o, 4).ok());
  EXPECT_TRUE(CheckPipelineBenchStages(o, 1).ok());
  o = {};
  o.activation_shape = {4, 0};
  refused(o, "activation shape");
  EXPECT_TRUE(ValidatePipelineBenchOptions(PipelineBenchOptions{}).ok());
}

}  // namespace
}  // namespace shoal::bench
