// The pipeline benchmarks through the CLI: `shoal bench pipeline` (the executor on stages of fixed
// cost, several real rank processes) and `shoal bench hetero` (two real ranks training a 2-stage
// pipeline, one throttled). Their figures are machine-dependent and not asserted; what is checked
// is what does not depend on timing: the JSON line, the schedule theory, the activation slots
// against the schedule's bound, the solver giving the fast stage more blocks.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tests/json_util.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::TempDir;

using testing::LastJsonLine;

TEST(BenchPipelineTest, ReportsEveryCaseWithItsTheoryAndSlots) {
  CommandResult r = RunCommand("timeout -k 5 120 " + std::string(SHOAL_BINARY) +
                               " bench pipeline --stages 2,3 --micro-batches 4 --forward-ms 2 "
                               "--backward-ms 4 --steps 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = LastJsonLine(r.output);
  ASSERT_EQ(j["bench"], "pipeline") << r.output;
  ASSERT_EQ(j["cases"].size(), 4u) << r.output;  // 2 schedules x 2 pipeline sizes
  for (const nlohmann::json& c : j["cases"]) {
    const int p = c["stages"].get<int>(), m = c["micro_batches"].get<int>();
    EXPECT_EQ(m, 4);
    EXPECT_DOUBLE_EQ(c["bubble_theory"].get<double>(), (p - 1.0) / (m + p - 1.0));
    const double measured = c["bubble_measured"].get<double>();
    EXPECT_GE(measured, 0.0);
    EXPECT_LT(measured, 1.0);
    // Slots held at once: exactly the schedule's bound (GPipe m, 1F1B p - rank).
    const auto slots = c["peak_slots"].get<std::vector<int>>();
    ASSERT_EQ(slots.size(), static_cast<size_t>(p));
    for (int rank = 0; rank < p; ++rank) {
      EXPECT_EQ(slots[rank], c["schedule"] == "gpipe" ? m : p - rank) << c.dump();
    }
  }
}

TEST(BenchPipelineTest, BadFlagsAreNamed) {
  CommandResult r = RunCommand(std::string(SHOAL_BINARY) + " bench pipeline --stages 2,x");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("--stages"), std::string::npos) << r.output;
  r = RunCommand(std::string(SHOAL_BINARY) + " bench hetero --config /nonexistent.toml");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("/nonexistent.toml"), std::string::npos) << r.output;
}

TEST(BenchHeteroTest, TrainsBothSplitsAndGivesTheFastStageMoreBlocks) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  testing::WriteTextFile(tmp / "text.txt", testing::SyntheticText(100000));
  CommandResult r = RunCommand(std::string(SHOAL_BINARY) + " prepare-data --no-progress --input " +
                               (tmp / "text.txt") + " --out " + (tmp / "data"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = RunCommand("timeout -k 5 240 " + std::string(SHOAL_BINARY) + " bench hetero --config " +
                 SHOAL_SOURCE_DIR + "/configs/tiny.toml --set data.dir=" + (tmp / "data") +
                 " model.n_layer=6 train.batch_size=1 --throttle 3 --micro-batches 2 --steps 1 "
                 "--rounds 1 --profile-seconds 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = LastJsonLine(r.output);
  ASSERT_EQ(j["bench"], "hetero") << r.output;
  const auto uneven = j["uneven_split"].get<std::vector<int>>();
  EXPECT_EQ(j["uniform_split"].get<std::vector<int>>(), (std::vector<int>{3, 3}));
  ASSERT_EQ(uneven.size(), 2u);
  EXPECT_EQ(uneven[0] + uneven[1], 6);
  EXPECT_GT(uneven[0], uneven[1]) << r.output;  // rank 0 is the fast one
  EXPECT_GT(j["tokens_per_s_uneven"].get<double>(), 0);
  EXPECT_GT(j["tokens_per_s_uniform"].get<double>(), 0);
  EXPECT_NEAR(j["ratio"].get<double>(),
              j["tokens_per_s_uneven"].get<double>() / j["tokens_per_s_uniform"].get<double>(),
              1e-9);
  // Both runs really were pipelines with the slow rank throttled.
  EXPECT_NE(r.output.find("mesh (tp 1, pp 2, dp 1)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("throttle: rank 1"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace shoal
