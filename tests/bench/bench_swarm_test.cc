// `shoal bench swarm` end to end, short: the static pipeline and the swarm, each with a worker
// killed every few seconds, as real processes. The rates depend on the machine and are not
// asserted; what is: the JSON line, the kills it says it made (the static pipeline restarted,
// the swarm replaced each peer), and that the swarm through those kills lost and repeated
// no micro-batch (its coordinator's ledger). Bad flags are refused by name.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "tests/json_util.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::TempDir;

TEST(BenchSwarmTest, ChurnArmsKillAndTheSwarmLosesNothing) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  testing::WriteTextFile(tmp / "text.txt", testing::SyntheticText(200000));
  CommandResult r = RunCommand("timeout -k 5 60 " + std::string(SHOAL_BINARY) +
                               " prepare-data --no-progress --input " + (tmp / "text.txt") +
                               " --out " + (tmp / "data"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = RunCommand("timeout -k 5 200 " + std::string(SHOAL_BINARY) + " bench swarm --config " +
                 SHOAL_SOURCE_DIR + "/configs/tiny.toml --set data.dir=" + (tmp / "data") +
                 " --arms churn --seconds 16 --kill-every 5 --throttle 1 --work-dir " +
                 (tmp / "runs"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = testing::LastJsonLine(r.output);
  ASSERT_TRUE(j.is_object()) << r.output;
  for (const char* key : {"churn_free_ratio", "tokens_per_s_swarm_no_kills",
                          "tokens_per_s_static_no_kills"}) {
    ASSERT_TRUE(j.contains(key) && j[key].is_number()) << key << "\n" << r.output;
    EXPECT_GT(j[key].get<double>(), 0) << key << "\n" << r.output;
  }
  // With a kill every few seconds on a loaded machine either side may commit nothing in so
  // short an arm (the swarm's kills can land while its peers still join; the static job may
  // never reach a checkpoint): then the ratio is null, else a positive number.
  ASSERT_TRUE(j["tokens_per_s_static"].is_number()) << r.output;
  ASSERT_TRUE(j["tokens_per_s_swarm"].is_number()) << r.output;
  EXPECT_GE(j["tokens_per_s_swarm"].get<double>(), 0) << r.output;
  if (j["tokens_per_s_static"].get<double>() > 0) {
    ASSERT_TRUE(j["churn_ratio"].is_number()) << r.output;
    EXPECT_GT(j["churn_ratio"].get<double>(), 0) << r.output;
  } else {
    EXPECT_TRUE(j["churn_ratio"].is_null()) << r.output;
  }
  EXPECT_GE(j["kills"].get<int>(), 1) << r.output;
  EXPECT_GE(j["static_kills"].get<int>(), 1) << r.output;
  // The launcher restarts after each kill; the last restart may still be under way when the
  // arm's time is up.
  EXPECT_GE(j["static_restarts"].get<int>(), 1) << r.output;
  EXPECT_LE(j["static_restarts"].get<int>(), j["static_kills"].get<int>()) << r.output;
  EXPECT_EQ(j["lost_microbatches"].get<int>(), 0) << r.output;
  EXPECT_EQ(j["duplicate_microbatches"].get<int>(), 0) << r.output;
  EXPECT_FALSE(j.contains("straggler_ratio")) << r.output;  // only the arms asked for
}

TEST(BenchSwarmTest, BadFlagsAreNamed) {
  const std::string bin = std::string(SHOAL_BINARY) + " bench swarm";
  for (const auto& [flags, named] : std::vector<std::pair<std::string, std::string>>{
           {" --arms none", "--arms"},
           {" --seconds 1", "--seconds"},
           {" --throttle 0.5", "--throttle"},
           {" --batch-size 3", "--batch-size"},
           {" --config /nonexistent.toml", "nonexistent"},
       }) {
    CommandResult r = RunCommand("timeout -k 5 30 " + bin + flags);
    EXPECT_EQ(r.exit_code, 2) << flags << ": " << r.output;
    EXPECT_NE(r.output.find(named), std::string::npos) << flags << ": " << r.output;
  }
}

}  // namespace
}  // namespace shoal
