// `shoal bench swarm` end to end, short: the static pipeline and the swarm, each with a worker
// killed every few seconds, as real processes. The rates depend on the machine and are not
// asserted; what is: the JSON line, the kills it says it made (the static pipeline restarted,
// the swarm replaced each peer), and that the swarm through those kills lost and repeated
// no micro-batch (its coordinator's ledger). Bad flags are refused by name.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "tests/json_util.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::TempDir;

// A small byte-token corpus in `dir`.
void PrepareData(const std::string& dir) {
  testing::WriteTextFile(dir + ".txt", testing::SyntheticText(200000));
  const CommandResult r = RunCommand("timeout -k 5 60 " + std::string(SHOAL_BINARY) +
                                     " prepare-data --no-progress --input " + dir + ".txt" +
                                     " --out " + dir);
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

TEST(BenchSwarmTest, ChurnArmsKillAndTheSwarmLosesNothing) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  ASSERT_NO_FATAL_FAILURE(PrepareData(tmp / "data"));
  CommandResult r;
  r = RunCommand("timeout -k 5 200 " + std::string(SHOAL_BINARY) + " bench swarm --config " +
                 SHOAL_SOURCE_DIR + "/configs/tiny.toml --set data.dir=" + (tmp / "data") +
                 " --arms churn --seconds 24 --kill-every 5 --throttle 1 --work-dir " +
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
  // never reach a checkpoint): the ratio is null when the static job committed nothing, else a
  // number >= 0. (The arms count from their first process, so a machine busy with other tests
  // can spend much of an arm on joins: 24 s leaves room for the kills at 5, 10, 15 and 20 s.)
  ASSERT_TRUE(j["tokens_per_s_static"].is_number()) << r.output;
  ASSERT_TRUE(j["tokens_per_s_swarm"].is_number()) << r.output;
  EXPECT_GE(j["tokens_per_s_swarm"].get<double>(), 0) << r.output;
  if (j["tokens_per_s_static"].get<double>() > 0) {
    ASSERT_TRUE(j["churn_ratio"].is_number()) << r.output;
    EXPECT_GE(j["churn_ratio"].get<double>(), 0) << r.output;
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
  // The simulated arms: from the static no-kill arm's start on. The static model commits nothing
  // when a start and a step outlast the kills' interval (null then); the no-kill prediction
  // always exists.
  ASSERT_TRUE(j["static_start_s"].is_number()) << r.output;
  const double start = j["static_start_s"].get<double>();
  EXPECT_GT(start, 0) << r.output;
  EXPECT_LT(start, 24) << r.output;
  ASSERT_TRUE(j["simulated_churn_free_ratio"].is_number()) << r.output;
  EXPECT_GT(j["simulated_churn_free_ratio"].get<double>(), 0) << r.output;
  // The swarm's round time the model was calibrated with is reported (clamped at 0 by its fit).
  ASSERT_TRUE(j["simulated_round_s"].is_number()) << r.output;
  if (j["simulated_churn_ratio"].is_number()) {
    // Kills cost the static pipeline more than the swarm, in the model too: the swarm loses a
    // peer's share for a start, the static job every rank's plus the steps since its checkpoint.
    EXPECT_GT(j["simulated_churn_ratio"].get<double>(),
              j["simulated_churn_free_ratio"].get<double>())
        << r.output;
  } else {
    ASSERT_TRUE(j["simulated_churn_ratio"].is_null()) << r.output;
    EXPECT_GT(start, 4) << "a start of " << start << " s leaves the 5 s between kills room for "
                        << "steps\n" << r.output;
  }
}

// The network namespaces and the links of this machine's own namespace, by name.
std::set<std::string> NetNames() {
  std::set<std::string> names;
  std::istringstream netns(RunCommand("ip netns list").output);
  for (std::string line; std::getline(netns, line);) {
    if (!line.empty()) names.insert("netns " + line.substr(0, line.find(' ')));
  }
  std::istringstream links(RunCommand("ip -o link show").output);
  for (std::string line; std::getline(links, line);) {
    // "5: sh1234@if5: <BROADCAST,...": the name, without its peer's index.
    const size_t colon = line.find(": ");
    if (colon == std::string::npos) continue;
    const std::string rest = line.substr(colon + 2);
    names.insert("link " + rest.substr(0, rest.find_first_of("@:")));
  }
  return names;
}

// The links arms (root only): every process in a network namespace of its own behind a veth
// shaped to 100 Mb/s. What is asserted: the coordinator measured the first worker's link as
// shaped (tens of Mb/s, where 127.0.0.1 gives thousands) and chose DeMo by swarm.sync = auto
// (the bench fails otherwise), every arm trained, no namespace or link is left behind, and one
// an earlier killed run left is removed.
// 30 s an arm: each spends several seconds starting its 8 processes, more on a busy machine.
TEST(BenchSwarmTest, LinksArmsRunBehindShapedLinksAndLeaveNothing) {
  if (::geteuid() != 0) GTEST_SKIP() << "network namespaces need root";
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  ASSERT_NO_FATAL_FAILURE(PrepareData(tmp / "data"));
  CommandResult r;
  // A namespace an earlier, killed run left behind (named after a pid no longer running): the
  // bench removes it.
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  ASSERT_EQ(::waitpid(dead, nullptr, 0), dead);
  const std::string stale = "shoal" + std::to_string(dead) + "-0";
  ASSERT_EQ(RunCommand("ip netns add " + stale).exit_code, 0);
  const std::set<std::string> before = NetNames();
  const std::string tiny = std::string(SHOAL_SOURCE_DIR) + "/configs/tiny.toml";
  r = RunCommand("timeout -k 5 200 " + std::string(SHOAL_BINARY) + " bench swarm --config " +
                 tiny + " --links-config " + tiny + " --set data.dir=" + (tmp / "data") +
                 " --arms links --link-mbit 100 --seconds 30 --throttle 1 --work-dir " +
                 (tmp / "runs"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = testing::LastJsonLine(r.output);
  ASSERT_TRUE(j.is_object()) << r.output;
  for (const char* key : {"tokens_per_s_links_demo", "tokens_per_s_links_fp32",
                          "tokens_per_s_links_demo_unshaped", "demo_speedup_shaped",
                          "shaped_over_unshaped"}) {
    ASSERT_TRUE(j.contains(key) && j[key].is_number()) << key << "\n" << r.output;
    EXPECT_GT(j[key].get<double>(), 0) << key << "\n" << r.output;
  }
  // "... measured 91.2 Mb/s < slow_link_mbit 1000": the shaped link, not the loopback.
  const std::string log = testing::ReadTextFile(tmp / "runs/links-demo-coordinator.log");
  const size_t at = log.find("coordinator measured ");
  ASSERT_NE(at, std::string::npos) << log;
  const double mbit = std::atof(log.c_str() + at + 21);
  EXPECT_GT(mbit, 20) << log;
  EXPECT_LT(mbit, 110) << log;
  EXPECT_NE(log.find("stage rounds: DeMo payloads (swarm.sync = auto"), std::string::npos) << log;
  // Its namespaces and its own veth are gone (a namespace's veth pairs go with it, soon after).
  std::set<std::string> left;
  for (int i = 0; i < 50; ++i) {
    left.clear();
    for (const std::string& name : NetNames()) {
      if (before.count(name) == 0) left.insert(name);
    }
    if (left.empty()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(left.empty()) << "left behind: " << *left.begin();
  EXPECT_EQ(NetNames().count("netns " + stale), 0u) << stale << " was not removed";
  (void)RunCommand("ip netns del " + stale + " 2>/dev/null");
}

// Without root the links arms are refused before anything starts, saying why.
TEST(BenchSwarmTest, LinksArmsNeedRoot) {
  std::string prefix;
  if (::geteuid() == 0) {
    if (RunCommand("command -v setpriv").exit_code != 0) GTEST_SKIP() << "no setpriv";
    prefix = "setpriv --reuid=65534 --regid=65534 --clear-groups ";
  }
  CommandResult r = RunCommand("timeout -k 5 30 " + prefix + std::string(SHOAL_BINARY) +
                               " bench swarm --arms links --config " + SHOAL_SOURCE_DIR +
                               "/configs/tiny.toml");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("needs root"), std::string::npos) << r.output;
}

TEST(BenchSwarmTest, BadFlagsAreNamed) {
  const std::string bin = std::string(SHOAL_BINARY) + " bench swarm";
  for (const auto& [flags, named] : std::vector<std::pair<std::string, std::string>>{
           {" --arms none", "--arms"},
           {" --arms churn,links2", "links2"},
           {" --link-mbit 0", "--link-mbit"},
           {" --links-batch-size 0", "--links-batch-size"},
           {" --seconds 1", "--seconds"},
           {" --throttle 0.5", "--throttle"},
           {" --batch-size 0", "--batch-size"},
           {" --in-flight 0", "--in-flight"},
           {" --config /nonexistent.toml", "nonexistent"},
       }) {
    CommandResult r = RunCommand("timeout -k 5 30 " + bin + flags);
    EXPECT_EQ(r.exit_code, 2) << flags << ": " << r.output;
    EXPECT_NE(r.output.find(named), std::string::npos) << flags << ": " << r.output;
  }
}

}  // namespace
}  // namespace shoal
