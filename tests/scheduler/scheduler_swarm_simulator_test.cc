// The swarm simulator: a real SwarmState driven by virtual peers and trainers. Checks its clock
// against closed forms worked out by hand from the cost model in swarm_simulator.h (not against
// captured output), that it is deterministic, that churn costs replays but never a step applied
// twice or lost, that rollbacks resume from the newest checkpoint, that more peers per stage
// train faster, and that bad options and flags are refused by name.
#include <dirent.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "scheduler/simulator.h"
#include "scheduler/swarm_simulator.h"
#include "scheduler/swarm_simulator_output.h"
#include "tests/test_util.h"

namespace shoal::scheduler {
namespace {

// The model of every test: 4 blocks, C = 256, T = 128, V = 512; 16 sequences per step.
constexpr double kC = 256, kT = 128, kV = 512, kLayers = 4, kGlobalBatch = 16;
// Each device: fp32_gflops (slow, so that steps take seconds and failures land inside them) and
// net_gbps (GB/s).
constexpr double kGflops = 10, kNetGBps = 1;

// The model of every test with `n_layer` blocks (4 unless said), and the [simulation] table.
std::string JobToml(int n_layer, const std::string& simulation) {
  return absl::StrFormat(R"(
[job]
name = "swarm-test"
n_layer = %d
n_head = 4
n_embd = 256
block_size = 128
vocab_size = 512
global_batch = 16

[simulation]
%s)",
                         n_layer, simulation);
}

// `count` devices alike (kGflops, kNetGBps), with `extra` keys.
std::string GroupToml(const char* name, int count, const std::string& extra) {
  return absl::StrFormat(
      "\n[[group]]\nname = \"%s\"\ncount = %d\nkind = \"cpu\"\nfp32_gflops = 10\n"
      "host_memory_gib = 8\nnet_gbps = 1\n%s",
      name, count, extra);
}

// `core` on-demand devices, then `spot` preemptible ones.
std::string SwarmToml(int core, int spot) {
  std::string text =
      JobToml(4, "lease_s = 5\nheartbeat_s = 1\nreplace_after_s = 30\nreport_every_s = 60\n");
  if (core > 0) absl::StrAppend(&text, GroupToml("core", core, "preemptible = false\n"));
  if (spot > 0) absl::StrAppend(&text, GroupToml("spot", spot, "preemptible = true\n"));
  return text;
}

ClusterSpec Parse(const std::string& text) {
  absl::StatusOr<ClusterSpec> spec = ParseClusterToml(text, "test.toml");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : ClusterSpec();
}

SwarmSimulationResult RunSwarm(const ClusterSpec& spec, const SwarmSimulationOptions& o) {
  absl::StatusOr<SwarmSimulationResult> r = SimulateSwarm(spec, o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : SwarmSimulationResult();
}

// By hand, for the model above. A block's training FLOPs per token: 6 per weight that multiplies
// an activation (qkv 3C² + 3C, projection C² + C, MLP 4C² + 4C and 4C² + C, LayerNorms 4C: 12C² +
// 13C in all) plus attention's 12·T·C; the head's: 6 (V·C + 2C) (the tied wte and the final
// LayerNorm). Stage s of S (even split) has 4/S blocks, the last also the head.
double StageFlopsPerToken(int s, int stages) {
  const double block = 6 * (12 * kC * kC + 13 * kC) + 12 * kT * kC;
  const double head = 6 * (kV * kC + 2 * kC);
  return (kLayers / stages) * block + (s == stages - 1 ? head : 0);
}

// One micro-batch's forward and backward at stage s: mbs = 16 / M sequences of T tokens.
double MicroBatchSeconds(int s, int stages, int micro_batches) {
  const double tokens = (kGlobalBatch / micro_batches) * kT;
  return StageFlopsPerToken(s, stages) * tokens / (kGflops * 1e9);
}

TEST(SwarmSimulatorTest, OnePeerPerStageOneTrainerMatchesTheClosedForm) {
  // S = 2 stages, one peer each, one trainer, M = 4. The trainer runs one micro-batch at a time:
  // forward at stage 0 (c0/3), forward+backward at stage 1 (c1), backward at stage 0 (2c0/3), so
  // a micro-batch takes c0 + c1 and a step M (c0 + c1). With one peer per stage the reduction
  // moves nothing (2(P-1)/P = 0), the step's last commit completes it, and the next step opens
  // at once; both peers sync from the init at time 0 in no time. So step k is applied at
  //   t_k = (k + 1) · M · (c0 + c1).
  const ClusterSpec spec = Parse(SwarmToml(2, 0));
  SwarmSimulationOptions o;
  o.in_flight = 1;
  o.stages = 2;
  o.micro_batches = 4;
  o.steps = 6;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  const double step_s = 4 * (MicroBatchSeconds(0, 2, 4) + MicroBatchSeconds(1, 2, 4));
  ASSERT_EQ(r.applied.size(), 6u);
  for (int k = 0; k < 6; ++k) {
    EXPECT_EQ(r.applied[k].step, k);
    EXPECT_NEAR(r.applied[k].time_s, (k + 1) * step_s, 1e-9 * step_s) << "step " << k;
  }
  EXPECT_TRUE(r.summary.finished);
  EXPECT_NEAR(r.summary.virtual_s, 6 * step_s, 1e-9 * step_s);
  // Tokens per step: M · mbs · T = 4 · 4 · 128.
  EXPECT_EQ(r.summary.tokens_per_step, 2048);
  EXPECT_NEAR(r.summary.mean_tokens_per_s, 2048 / step_s, 1e-9 * 2048 / step_s);
  EXPECT_EQ(r.summary.idle_s, 0);
  EXPECT_EQ(r.summary.replays, 0);
  EXPECT_EQ(r.summary.rollbacks, 0);
  // Each peer computes its own stage's share of every step.
  EXPECT_NEAR(r.summary.utilisation, 0.5, 1e-9);
}

TEST(SwarmSimulatorTest, TheRoundsFixedCostAddsToEveryStep) {
  // The closed form above with simulation.round_s = R: every stage's round ends R after its last
  // backward, the step's Apply comes with stage 0's (its backward is the step's last work), and
  // the next step opens only then, so t_k = (k + 1) · (M · (c0 + c1) + R).
  constexpr double kRound = 0.375;
  const ClusterSpec spec = Parse(
      JobToml(4, absl::StrCat("lease_s = 5\nheartbeat_s = 1\nround_s = ", kRound, "\n")) +
      GroupToml("core", 2, ""));
  EXPECT_EQ(spec.settings.round_s, kRound);
  SwarmSimulationOptions o;
  o.in_flight = 1;
  o.stages = 2;
  o.micro_batches = 4;
  o.steps = 5;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  const double step_s = 4 * (MicroBatchSeconds(0, 2, 4) + MicroBatchSeconds(1, 2, 4)) + kRound;
  ASSERT_EQ(r.applied.size(), 5u);
  for (int k = 0; k < 5; ++k) {
    EXPECT_NEAR(r.applied[k].time_s, (k + 1) * step_s, 1e-9 * step_s) << "step " << k;
  }
  // Out of range: named.
  for (const char* bad : {"-1", "3601"}) {
    absl::StatusOr<ClusterSpec> s = ParseClusterToml(
        JobToml(4, absl::StrCat("round_s = ", bad, "\n")) + GroupToml("core", 2, ""), "r.toml");
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_NE(s.status().message().find("simulation.round_s"), std::string::npos) << s.status();
  }
}

// A trainer with several micro-batches in flight keeps both stages busy at once (a pipeline):
// a step takes less than one micro-batch after another, M (c0 + c1), and no less than the
// busier peer's own work, M · max(c0, c1); with M in flight and the step's micro-batches
// queued at once, stage 0's forwards run back to back, so the step is within one micro-batch of
// that bound.
TEST(SwarmSimulatorTest, MicroBatchesInFlightPipelineTheStages) {
  const ClusterSpec spec = Parse(SwarmToml(2, 0));
  SwarmSimulationOptions o;
  o.stages = 2;
  o.micro_batches = 4;
  o.steps = 6;
  o.in_flight = 4;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  const double c0 = MicroBatchSeconds(0, 2, 4), c1 = MicroBatchSeconds(1, 2, 4);
  ASSERT_EQ(r.applied.size(), 6u);
  const double step_s = r.applied[5].time_s - r.applied[4].time_s;
  EXPECT_LT(step_s, 4 * (c0 + c1) * (1 - 1e-9));
  EXPECT_GE(step_s, 4 * std::max(c0, c1) * (1 - 1e-9));
  EXPECT_LE(step_s, 4 * std::max(c0, c1) + c0 + c1);
  EXPECT_EQ(r.summary.duplicates, 0);
  // And the option is checked.
  o.in_flight = 0;
  absl::StatusOr<SwarmSimulationResult> bad = SimulateSwarm(spec, o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("in_flight"), std::string::npos) << bad.status();
}

TEST(SwarmSimulatorTest, TwoPeersOfOneStageAddTheRingReduction) {
  // S = 1, two peers, one trainer, M = 4. Both peers sync from the init at time 0, but the round
  // of step 0 opens as soon as the first has synced: the second enters at step 1 (a joiner never
  // enters the round in progress). From step 1 the plan has P = 2 peers and its reduction takes
  // gradient bytes · 2(P-1)/P / net = 4 · N / (1 GB/s) with N every parameter of the model:
  // 4 (12C² + 13C) + (V + T) C + 2C. Every micro-batch goes to the senior peer (both are idle
  // when it is routed, and ties go to seniority), so
  //   t_0 = M c,   t_k = M c + k (M c + R)
  // (with the trainer's micro-batches one at a time: --in-flight 1).
  const ClusterSpec spec = Parse(SwarmToml(2, 0));
  SwarmSimulationOptions o;
  o.in_flight = 1;
  o.stages = 1;
  o.micro_batches = 4;
  o.steps = 5;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  const double step_s = 4 * MicroBatchSeconds(0, 1, 4);
  const double params = kLayers * (12 * kC * kC + 13 * kC) + (kV + kT) * kC + 2 * kC;
  const double reduce_s = 4 * params * 2 * (2 - 1) / 2 / (kNetGBps * 1e9);
  ASSERT_EQ(r.applied.size(), 5u);
  for (int k = 0; k < 5; ++k) {
    EXPECT_NEAR(r.applied[k].time_s, step_s + k * (step_s + reduce_s), 1e-9 * step_s)
        << "step " << k;
  }
  ASSERT_FALSE(r.rows.empty());
  EXPECT_EQ(r.rows.back().serving, std::vector<int>{2});
}

TEST(SwarmSimulatorTest, SameSeedSameRows) {
  const ClusterSpec spec = Parse(SwarmToml(2, 4));
  SwarmSimulationOptions o;
  o.stages = 2;
  o.trainers = 2;
  o.steps = 30;
  o.churn_per_hour = 60;
  o.seed = 7;
  const std::string a = FormatSwarmSimulationJson(RunSwarm(spec, o));
  const std::string b = FormatSwarmSimulationJson(RunSwarm(spec, o));
  EXPECT_EQ(a, b);
  o.seed = 8;
  EXPECT_NE(a, FormatSwarmSimulationJson(RunSwarm(spec, o)));
}

TEST(SwarmSimulatorTest, ChurnCostsReplaysButEveryStepIsAppliedOnce) {
  // Each stage keeps an on-demand peer (the first joiners fill the empty stages), so no stage is
  // ever lost: preemptions cost their micro-batches, which trainers replay, and nothing else.
  const ClusterSpec spec = Parse(SwarmToml(2, 4));
  SwarmSimulationOptions o;
  o.stages = 2;
  o.trainers = 2;
  o.micro_batches = 8;
  o.steps = 40;
  o.churn_per_hour = 60;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  EXPECT_TRUE(r.summary.finished);
  EXPECT_EQ(r.summary.steps, 40);
  EXPECT_EQ(r.summary.applied, 40);
  ASSERT_EQ(r.applied.size(), 40u);
  for (int k = 0; k < 40; ++k) EXPECT_EQ(r.applied[k].step, k);
  EXPECT_GT(r.summary.deaths, 0);
  // Some peer died holding micro-batches, and each of them was leased again as a replay.
  EXPECT_GT(r.summary.accumulations_fenced, 0);
  EXPECT_GT(r.summary.replays, 0);
  // A replay re-runs one micro-batch at every stage that lost it.
  EXPECT_LE(r.summary.replays, r.summary.accumulations_fenced);
  EXPECT_GT(r.summary.fences, 0);
  EXPECT_EQ(r.summary.duplicates, 0);
  EXPECT_EQ(r.summary.max_lost, 0);
  EXPECT_EQ(r.summary.rollbacks, 0);
  // Replacements joined (beyond the 6 at the start) and rows count them.
  EXPECT_GT(r.summary.joins, 6);
  EXPECT_EQ(r.rows.back().joins, r.summary.joins);
  EXPECT_EQ(r.rows.back().deaths, r.summary.deaths);
}

TEST(SwarmSimulatorTest, KillsComeOnTheirScheduleAndOnlyToPreemptiblePeers) {
  // kill_every_s = 7 over 100 s of virtual time: kills at 7, 14, ..., 98, 14 of them, each of a
  // preemptible peer (never an on-demand one), each replaced; with an on-demand peer in every
  // stage, nothing is lost or rolled back.
  std::string text =
      JobToml(4, "lease_s = 1\nheartbeat_s = 0.25\nreplace_after_s = 2\nreport_every_s = 1\n"
                 "max_hours = 0.02777777777777778\n");
  absl::StrAppend(&text, GroupToml("core", 2, "preemptible = false\n"),
                  GroupToml("spot", 4, "preemptible = true\n"));
  const ClusterSpec spec = Parse(text);
  SwarmSimulationOptions o;
  o.stages = 2;
  o.trainers = 2;
  o.micro_batches = 8;
  o.steps = 1000000;
  o.kill_every_s = 7;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  EXPECT_EQ(r.summary.deaths, 14);
  int fails = 0;
  for (const SwarmSimulationRow& row : r.rows) {
    EXPECT_EQ(row.events.find("fail core"), std::string::npos) << row.events;
    for (size_t at = row.events.find("fail spot"); at != std::string::npos;
         at = row.events.find("fail spot", at + 1)) {
      ++fails;
      // Rows come every second: the kill at 7k s shows in the row of 7k s.
      const double k = row.time_s / 7;
      EXPECT_NEAR(k, std::round(k), 1e-9) << "a kill in the row of " << row.time_s << " s";
    }
  }
  EXPECT_EQ(fails, 14);
  EXPECT_EQ(r.summary.rollbacks, 0);
  EXPECT_EQ(r.summary.duplicates, 0);
  EXPECT_EQ(r.summary.max_lost, 0);
  EXPECT_GT(r.summary.joins, 6 + 10);  // the replacements, 2 s after each kill
  // Without preemptible peers nothing is killed.
  std::string core_only = JobToml(4, "lease_s = 1\nheartbeat_s = 0.25\nreport_every_s = 1\n"
                                     "max_hours = 0.02777777777777778\n");
  absl::StrAppend(&core_only, GroupToml("core", 4, "preemptible = false\n"));
  EXPECT_EQ(RunSwarm(Parse(core_only), o).summary.deaths, 0);
}

TEST(SwarmSimulatorTest, LostStageRollsBackToTheNewestCheckpoint) {
  // One preemptible peer per stage: each death loses a stage, and the swarm resumes from the
  // newest checkpoint (every 5 steps) once the replacement has loaded it.
  const ClusterSpec spec = Parse(SwarmToml(0, 2));
  SwarmSimulationOptions o;
  o.stages = 2;
  o.steps = 20;
  o.churn_per_hour = 20;
  o.checkpoint_every = 5;
  const SwarmSimulationResult r = RunSwarm(spec, o);
  EXPECT_TRUE(r.summary.finished);
  EXPECT_EQ(r.summary.steps, 20);
  EXPECT_GT(r.summary.rollbacks, 0);
  EXPECT_GT(r.summary.idle_s, 0);
  ASSERT_FALSE(r.applied.empty());
  EXPECT_EQ(r.applied.front().step, 0);
  for (size_t i = 1; i < r.applied.size(); ++i) {
    const int64_t prev = r.applied[i - 1].step, step = r.applied[i].step;
    // Either the next step, or a step after a rollback: one a checkpoint saved (a multiple of 5).
    EXPECT_TRUE(step == prev + 1 || (step <= prev && step % 5 == 0))
        << "step " << step << " after " << prev;
  }
  EXPECT_GT(r.summary.applied, 20);
}

TEST(SwarmSimulatorTest, MorePeersPerStageTrainFaster) {
  // Four trainers keep several micro-batches in flight: with one peer per stage the slower stage
  // (the one with the head) bounds the rate; a second peer per stage halves its queue.
  SwarmSimulationOptions o;
  o.stages = 2;
  o.trainers = 4;
  o.micro_batches = 8;
  o.steps = 20;
  const SwarmSimulationResult one = RunSwarm(Parse(SwarmToml(2, 0)), o);
  const SwarmSimulationResult two = RunSwarm(Parse(SwarmToml(4, 0)), o);
  EXPECT_TRUE(one.summary.finished);
  EXPECT_TRUE(two.summary.finished);
  EXPECT_GT(two.summary.mean_tokens_per_s, 1.5 * one.summary.mean_tokens_per_s)
      << one.summary.mean_tokens_per_s << " vs " << two.summary.mean_tokens_per_s;
  // One peer per stage cannot beat the slower stage: M micro-batches of c1 each per step, of
  // M · mbs · T = 8 · 2 · 128 tokens.
  const double bound = 2048.0 / (8 * MicroBatchSeconds(1, 2, 8));
  EXPECT_LE(one.summary.mean_tokens_per_s, bound * (1 + 1e-9));
}

// Seven equal devices in 3 stages; the second to join (stage 1) turns 3x slower at `slow_after`
// seconds. The rebalancer (every 30 s) moves one peer of another stage into stage 1 and the swarm
// regains most of its rate; without it stage 1 bounds the rate from then on.
std::string StragglerToml(double slow_after) {
  std::string text = JobToml(6, "report_every_s = 30\n");
  absl::StrAppend(&text, GroupToml("first", 1, ""),
                  GroupToml("straggler", 1,
                            absl::StrFormat("slow_after_s = %g\nslow_factor = 3\n", slow_after)),
                  GroupToml("rest", 5, ""));
  return text;
}

// Tokens per second of the steps applied in [from_s, to_s) of virtual time.
double RateBetween(const SwarmSimulationResult& r, double from_s, double to_s) {
  int64_t steps = 0;
  double first = -1, last = -1;
  for (const SwarmAppliedStep& a : r.applied) {
    if (a.time_s < from_s || a.time_s >= to_s) continue;
    if (first < 0) first = a.time_s;
    last = a.time_s;
    ++steps;
  }
  if (steps < 2) return 0;
  return static_cast<double>(steps - 1) * r.summary.tokens_per_step / (last - first);
}

TEST(SwarmSimulatorTest, TheRebalancerMovesAPeerToAStragglersStage) {
  ClusterSpec timed = Parse(StragglerToml(300));
  timed.settings.max_hours = 1200.0 / 3600;  // 20 virtual minutes
  SwarmSimulationOptions o;
  o.stages = 3;
  o.trainers = 6;
  o.micro_batches = 8;
  o.steps = 100000;
  o.report_every_s = 30;
  const SwarmSimulationResult still = RunSwarm(timed, o);
  o.rebalance_s = 30;
  const SwarmSimulationResult moved = RunSwarm(timed, o);
  EXPECT_EQ(still.summary.moves, 0);
  EXPECT_EQ(moved.summary.moves, 1);
  for (const SwarmSimulationResult* r : {&still, &moved}) {
    EXPECT_EQ(r->summary.duplicates, 0);
    EXPECT_EQ(r->summary.max_lost, 0);
  }
  // Before the slow-down both runs are one and the same.
  const double before = RateBetween(still, 60, 300);
  EXPECT_NEAR(RateBetween(moved, 60, 300), before, 1e-9 * before);
  // After it (and the move, within a few checks): stage 1 has three peers, and the rate.
  const SwarmSimulationRow& end = moved.rows.back();
  ASSERT_EQ(end.serving.size(), 3u);
  EXPECT_EQ(end.serving[1], 3) << end.events;
  const double slow = RateBetween(still, 600, 1200), regained = RateBetween(moved, 600, 1200);
  EXPECT_LT(slow, 0.9 * before);
  EXPECT_GE(regained, 1.25 * slow) << slow << " -> " << regained;
  std::printf("{\"simulated_straggler\": {\"before\": %.1f, \"slowed\": %.1f, "
              "\"rebalanced\": %.1f, \"ratio\": %.3f}}\n",
              before, slow, regained, regained / slow);
}

TEST(SwarmSimulatorTest, BadOptionsAreNamed) {
  const ClusterSpec spec = Parse(SwarmToml(2, 0));
  auto refused = [&](SwarmSimulationOptions o, const std::string& name) {
    absl::StatusOr<SwarmSimulationResult> r = SimulateSwarm(spec, o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_NE(r.status().message().find(name), absl::string_view::npos) << r.status();
  };
  SwarmSimulationOptions o;
  o.stages = 2;
  o.stages = 0;
  refused(o, "stages");
  o.stages = 5;  // above n_layer = 4
  refused(o, "stages");
  o.stages = 2;
  o.micro_batches = 0;
  refused(o, "micro_batches");
  o.micro_batches = 8;
  o.trainers = 0;
  refused(o, "trainers");
  o.trainers = 1;
  o.steps = 0;
  refused(o, "steps");
  o.steps = 10;
  o.churn_per_hour = -1;
  refused(o, "churn");
  o.churn_per_hour = 0;
  o.checkpoint_every = -1;
  refused(o, "checkpoint_every");
  o.checkpoint_every = 0;
  o.report_every_s = 0.5;
  refused(o, "report_every_s");
  o.report_every_s = 0;
  o.rebalance_s = -1;
  refused(o, "rebalance_s");
  o.rebalance_s = 0;
  o.kill_every_s = -1;
  refused(o, "kill_every_s");
  o.kill_every_s = NAN;
  refused(o, "kill_every_s");
  o.kill_every_s = 0;
  std::string no_net = SwarmToml(2, 0);
  no_net.replace(no_net.find("net_gbps = 1"), 12, "net_gbps = 0");
  absl::StatusOr<SwarmSimulationResult> r = SimulateSwarm(Parse(no_net), o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("group[0].net_gbps"), absl::string_view::npos) << r.status();
}

TEST(SwarmSimulatorTest, StageThatFitsNoDeviceIsAnError) {
  std::string tiny = SwarmToml(2, 0);
  tiny.replace(tiny.find("host_memory_gib = 8"), 19, "host_memory_gib = 0.01");
  SwarmSimulationOptions o;
  o.stages = 2;
  absl::StatusOr<SwarmSimulationResult> r = SimulateSwarm(Parse(tiny), o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
}

TEST(SwarmSimulatorTest, ExampleClusterFilesRunAsSwarms) {
  const std::string dir = std::string(SHOAL_SOURCE_DIR) + "/configs/clusters";
  DIR* d = opendir(dir.c_str());
  ASSERT_NE(d, nullptr) << dir;
  int files = 0;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() < 5 || name.substr(name.size() - 5) != ".toml") continue;
    SCOPED_TRACE(name);
    ++files;
    absl::StatusOr<ClusterSpec> spec = LoadClusterFile(dir + "/" + name);
    ASSERT_TRUE(spec.ok()) << spec.status();
    SwarmSimulationOptions o;
    o.stages = 4;
    o.trainers = 4;
    o.steps = 10;
    o.churn_per_hour = 1;
    absl::StatusOr<SwarmSimulationResult> r = SimulateSwarm(*spec, o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->summary.finished);
    EXPECT_GT(r->summary.mean_tokens_per_s, 0);
  }
  closedir(d);
  EXPECT_GE(files, 2);
}

// The binary under test; each run costs about a second of start-up, so the cases are few.
std::string SimulateCommand(const testing::TempDir& tmp) {
  testing::WriteTextFile(tmp / "swarm.toml", SwarmToml(2, 2));
  return std::string(SHOAL_BINARY) + " simulate --devices " + (tmp / "swarm.toml") + " ";
}

void ExpectRefused(const std::string& command, const std::string& flag) {
  const testing::CommandResult r = testing::RunCommand(command);
  EXPECT_EQ(r.exit_code, 2) << command << ": " << r.output;
  EXPECT_NE(r.output.find(flag), std::string::npos) << command << ": " << r.output;
}

TEST(SwarmSimulatorTest, CommandLineRuns) {
  testing::TempDir tmp;
  const std::string run = SimulateCommand(tmp);
  testing::CommandResult json = testing::RunCommand(run + "--swarm --stages 2 --steps 5 --json");
  ASSERT_EQ(json.exit_code, 0) << json.output;
  EXPECT_NE(json.output.find("\"type\":\"summary\""), std::string::npos) << json.output;
  EXPECT_NE(json.output.find("\"finished\":true"), std::string::npos) << json.output;
  testing::CommandResult table =
      testing::RunCommand(run + "--swarm --stages 2 --trainers 2 --steps 5 --churn 10");
  ASSERT_EQ(table.exit_code, 0) << table.output;
  EXPECT_NE(table.output.find("serving+syncing/stage"), std::string::npos) << table.output;
  EXPECT_NE(table.output.find("finished after"), std::string::npos) << table.output;
}

TEST(SwarmSimulatorTest, CommandLineRefusesStagesOutsideTheModel) {
  testing::TempDir tmp;
  const std::string run = SimulateCommand(tmp);
  ExpectRefused(run + "--swarm --steps 5", "--stages");
  ExpectRefused(run + "--swarm --stages 0", "--stages");
  ExpectRefused(run + "--swarm --stages 5", "--stages");  // n_layer = 4
}

TEST(SwarmSimulatorTest, CommandLineRefusesBadCounts) {
  testing::TempDir tmp;
  const std::string run = SimulateCommand(tmp);
  ExpectRefused(run + "--swarm --stages 2 --micro-batches 0", "--micro-batches");
  ExpectRefused(run + "--swarm --stages 2 --trainers 0", "--trainers");
  ExpectRefused(run + "--stages 2", "--stages needs --swarm");
  ExpectRefused(run + "--swarm --stages 2 --kill-every -1", "--kill-every");
  ExpectRefused(run + "--kill-every 5", "--kill-every needs --swarm");
}

}  // namespace
}  // namespace shoal::scheduler
