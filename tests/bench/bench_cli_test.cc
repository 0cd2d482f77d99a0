// The pipeline benchmarks through the CLI: `shoal bench pipeline` (the executor on stages of fixed
// cost, several real rank processes) and `shoal bench hetero` (two real ranks training a 2-stage
// pipeline, one throttled). Their figures are machine-dependent and not asserted; what is checked
// is what does not depend on timing: the JSON line, the schedule theory, the activation slots
// against the schedule's bound, the solver giving the fast stage more blocks (`bench split` on
// measured block times, `bench hetero` end to end).
#include <gtest/gtest.h>

#include <algorithm>

#include <nlohmann/json.hpp>
#include <filesystem>
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

// `shoal bench` itself: one table lists every benchmark and dispatches to it.
TEST(BenchTableTest, HelpListsEveryBenchAndUnknownNamesAreUsageErrors) {
  CommandResult r = RunCommand(std::string(SHOAL_BINARY) + " bench --help");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Usage"), std::string::npos) << r.output;
  for (const char* name : {"train", "dp", "comm", "split", "pipeline", "hetero", "demo", "memory",
                           "swarm", "allocator", "coordinator"}) {
    EXPECT_NE(r.output.find(std::string("  ") + name + " "), std::string::npos)
        << name << "\n" << r.output;
  }
  r = RunCommand(std::string(SHOAL_BINARY) + " bench no-such-bench");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no-such-bench"), std::string::npos) << r.output;
  EXPECT_EQ(RunCommand(std::string(SHOAL_BINARY) + " bench").exit_code, 2);
  for (const char* name :
       {"dp", "comm", "split", "hetero", "demo", "memory", "swarm", "allocator", "coordinator"}) {
    r = RunCommand(std::string(SHOAL_BINARY) + " bench " + name + " --help");
    EXPECT_EQ(r.exit_code, 0) << name << "\n" << r.output;
    EXPECT_NE(r.output.find(std::string("shoal bench ") + name), std::string::npos) << r.output;
  }
}

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

// Synthetic text prepared into `tmp`/data with the real CLI.
void PrepareData(const TempDir& tmp) {
  testing::WriteTextFile(tmp / "text.txt", testing::SyntheticText(100000));
  CommandResult r = RunCommand(std::string(SHOAL_BINARY) + " prepare-data --no-progress --input " +
                               (tmp / "text.txt") + " --out " + (tmp / "data"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

TEST(BenchHeteroTest, TrainsBothSplitsAndGivesTheFastStageMoreBlocks) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  ASSERT_NO_FATAL_FAILURE(PrepareData(tmp));
  CommandResult r = RunCommand("timeout -k 5 240 " + std::string(SHOAL_BINARY) +
                               " bench hetero --config " +
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


TEST(BenchDemoTest, TrainsBothOptimizersAndReportsBytesAndLosses) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  ASSERT_NO_FATAL_FAILURE(PrepareData(tmp));
  // n_embd 64 and block 64: every 2-D weight is cut into whole 64 x 64 tiles.
  CommandResult r = RunCommand("timeout -k 5 240 " + std::string(SHOAL_BINARY) +
                               " bench demo --config " +
                 SHOAL_SOURCE_DIR + "/configs/tiny.toml --set data.dir=" + (tmp / "data") +
                 " model.n_layer=1 model.n_embd=64 model.n_head=2 model.block_size=64 "
                 "train.batch_size=2 train.eval_batches=1 train.log_every=2 --ranks 2 --steps 4 "
                 "--keep " + (tmp / "runs"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = LastJsonLine(r.output);
  ASSERT_EQ(j["bench"], "demo") << r.output;
  // AdamW's ring all-reduce over 2 ranks sends the fp32 gradient buffers once; DeMo sends its
  // payload once: 16 bytes, then per tensor tiles x min(32, tile) x (2 + 2) bytes (bf16).
  // Tensors of the model (n_embd C = 64, vocab 256, context 64, one block):
  //   2-D: wte 256x64 (4 tiles), wpe 64x64 (1), qkv 192x64 (3), attn.proj 64x64 (1),
  //        fc 256x64 (4), mlp.proj 64x256 (4): 17 tiles of 32 picks;
  //   1-D of 64 (ln1 w/b, ln2 w/b, ln_f w/b, attn.proj bias, mlp.proj bias): 8 x 32 picks,
  //   qkv bias 192 (3 chunks of 64, 32 each), fc bias 256 (4 chunks): 7 x 32 picks.
  const int64_t demo_bytes = 16 + (17 + 8 + 7) * 32 * 4;
  EXPECT_EQ(j["bytes_demo"].get<int64_t>(), demo_bytes) << r.output;
  const int64_t params = 256 * 64 + 64 * 64 + 192 * 64 + 64 * 64 + 256 * 64 + 64 * 256 +
                         8 * 64 + 192 + 256;
  const int64_t adamw_bytes = j["bytes_adamw"].get<int64_t>();
  EXPECT_GE(adamw_bytes, 4 * params);  // fp32 gradients, plus alignment padding
  EXPECT_LT(adamw_bytes, 4 * params + 64 * 40);
  EXPECT_NEAR(j["bytes_ratio"].get<double>(), static_cast<double>(adamw_bytes) / demo_bytes, 1e-9);
  for (const char* k : {"val_loss_adamw", "val_loss_demo"}) {
    EXPECT_GT(j[k].get<double>(), 0) << k;
    EXPECT_LT(j[k].get<double>(), 5.6) << k;  // below or near ln 256 after 4 steps
  }
  EXPECT_NEAR(j["val_loss_gap"].get<double>(),
              j["val_loss_demo"].get<double>() / j["val_loss_adamw"].get<double>() - 1, 1e-9);
  EXPECT_DOUBLE_EQ(j["lr_demo"].get<double>(), 2 * j["lr_adamw"].get<double>());
  // Both runs really ran: their metrics are kept.
  EXPECT_TRUE(std::filesystem::exists(tmp / "runs/adamw/metrics.jsonl"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "runs/demo/metrics.jsonl"));

  r = RunCommand(std::string(SHOAL_BINARY) + " bench demo --config " + SHOAL_SOURCE_DIR +
                 "/configs/tiny.toml --ranks 1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--ranks must be >= 2"), std::string::npos) << r.output;
}

// Both arms of `bench allocator` train, each under its policy (the children's thread lines say
// which), and glibc's own settings in the environment are refused (they would override both).
TEST(BenchAllocatorTest, TrainsUnderBothPoliciesAndRefusesGlibcSettings) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  ASSERT_NO_FATAL_FAILURE(PrepareData(tmp));
  const std::string args = " bench allocator --config " + std::string(SHOAL_SOURCE_DIR) +
                           "/configs/tiny.toml --set data.dir=" + (tmp / "data") +
                           " optim.name=demo train.out_dir=" + (tmp / "runs") +
                           " --steps 2 --rounds 1";
  CommandResult r = RunCommand("timeout -k 5 240 " + std::string(SHOAL_BINARY) + args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = LastJsonLine(r.output);
  ASSERT_EQ(j["bench"], "allocator") << r.output;
  EXPECT_EQ(j["rounds"], 1);
  for (const char* k :
       {"tokens_per_s_system", "tokens_per_s_keep", "peak_rss_mb_system", "peak_rss_mb_keep"}) {
    EXPECT_GT(j[k].get<double>(), 0) << k;
  }
  EXPECT_NEAR(j["ratio"].get<double>(),
              j["tokens_per_s_keep"].get<double>() / j["tokens_per_s_system"].get<double>(), 1e-9);
  EXPECT_NE(r.output.find("host allocator: the C library's defaults"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("MiB of freed memory kept for reuse"), std::string::npos) << r.output;

  r = RunCommand("MALLOC_TRIM_THRESHOLD_=1048576 " + std::string(SHOAL_BINARY) + args);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("MALLOC_"), std::string::npos) << r.output;
  r = RunCommand("SHOAL_HOST_ALLOCATOR=fast " + std::string(SHOAL_BINARY) + " bench --help");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("SHOAL_HOST_ALLOCATOR must be \"keep\" or \"system\" (got \"fast\")"),
            std::string::npos)
      << r.output;
}

// GPT parameters at width 64, context 32, byte vocabulary (the output head shares the token
// embedding): embeddings, L blocks of 12 C^2 + 13 C, the final layer norm.
int64_t TinyGptParams(int64_t n_layer) {
  const int64_t c = 64;
  return 256 * c + 32 * c + n_layer * (12 * c * c + 13 * c) + 2 * c;
}

TEST(BenchMemoryTest, TrainsBeyondTheBudgetWithTheDiskTierAndReportsBothParts) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  TempDir tmp;
  ASSERT_NO_FATAL_FAILURE(PrepareData(tmp));
  const int64_t budget = 3 * 1024 * 1024;
  // n_layer 10 for part (b): a quarter of its states still holds the 4 parameter/gradient chunks
  // and 2 moment chunks of one block's 12 C^2 weights that paging needs.
  const std::string common = std::string(SHOAL_BINARY) + " bench memory --config " +
                             SHOAL_SOURCE_DIR + "/configs/tiny.toml --set data.dir=" +
                             (tmp / "data") +
                             " model.n_embd=64 model.n_head=2 model.block_size=32 "
                             "train.batch_size=2 model.n_layer=10 ";
  CommandResult r = RunCommand("timeout -k 5 200 " + common +
                               "--budget 3MiB --max-params 1.5e6 --steps 2 --repeat 2 --disk-path " +
                               (tmp / "disk"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = LastJsonLine(r.output);
  ASSERT_EQ(j["bench"], "memory") << r.output;
  for (const char* k :
       {"budget", "steps", "params", "params_in_ram", "states_over_budget", "throughput_ratio",
        "tokens_per_s_offload", "tokens_per_s_ram", "peak_rss_mb_offload", "peak_rss_mb_ram",
        "n_layer_offload", "n_layer_ram", "b_params", "b_states_over_budget", "b_throughput_ratio",
        "b_tokens_per_s_offload", "b_tokens_per_s_ram", "b_peak_rss_mb_offload",
        "b_peak_rss_mb_ram"}) {
    EXPECT_TRUE(j.contains(k)) << k << "\n" << j.dump();
  }
  EXPECT_EQ(j["budget"].get<int64_t>(), budget);
  EXPECT_EQ(j["steps"].get<int64_t>(), 2);
  // Part (a): the in-RAM model is the largest whose 16 bytes per parameter fit 0.8 of the
  // budget, the offloaded one the largest under --max-params: counted here from the shape.
  const int64_t l_ram = j["n_layer_ram"].get<int64_t>(), l_off = j["n_layer_offload"].get<int64_t>();
  EXPECT_LE(16 * TinyGptParams(l_ram), 0.8 * budget);
  EXPECT_GT(16 * TinyGptParams(l_ram + 1), 0.8 * budget);
  EXPECT_LE(TinyGptParams(l_off), 1.5e6);
  EXPECT_GT(TinyGptParams(l_off + 1), 1.5e6);
  EXPECT_GE(l_off, 20);  // a few tens of layers
  const int64_t params = TinyGptParams(l_off);
  EXPECT_EQ(j["params"].get<int64_t>(), params);
  EXPECT_EQ(j["params_in_ram"].get<int64_t>(), TinyGptParams(l_ram));
  EXPECT_GT(params, j["params_in_ram"].get<int64_t>());
  EXPECT_NEAR(j["states_over_budget"].get<double>(), 16.0 * params / budget, 1e-9);
  EXPECT_GT(j["states_over_budget"].get<double>(), 1);
  for (const char* k : {"tokens_per_s_offload", "tokens_per_s_ram", "b_tokens_per_s_offload",
                        "b_tokens_per_s_ram"}) {
    EXPECT_GT(j[k].get<double>(), 0) << k;
  }
  EXPECT_NEAR(j["throughput_ratio"].get<double>(),
              j["tokens_per_s_offload"].get<double>() / j["tokens_per_s_ram"].get<double>(), 1e-9);
  // Part (b) ran twice: the ratio is the median of the two (the lower middle one), with the
  // spread beside it.
  ASSERT_EQ(j["b_throughput_ratios"].size(), 2u) << j.dump();
  const double r0 = j["b_throughput_ratios"][0].get<double>(),
               r1 = j["b_throughput_ratios"][1].get<double>();
  EXPECT_DOUBLE_EQ(j["b_throughput_ratio_min"].get<double>(), std::min(r0, r1));
  EXPECT_DOUBLE_EQ(j["b_throughput_ratio_max"].get<double>(), std::max(r0, r1));
  EXPECT_DOUBLE_EQ(j["b_throughput_ratio"].get<double>(), std::min(r0, r1));
  EXPECT_EQ(j["b_repeat"].get<int64_t>(), 2);
  // Part (b): the config's 10 layers, states 4x the budget, both runs.
  EXPECT_EQ(j["b_params"].get<int64_t>(), TinyGptParams(10));
  EXPECT_NEAR(j["b_states_over_budget"].get<double>(), 4.0, 0.04);
  // The offloaded runs really paged their parameters and gradients (the trainer's plan line).
  EXPECT_NE(j["plan_offload"].get<std::string>().find("paged states"), std::string::npos) << r.output;
  EXPECT_NE(j["b_plan_offload"].get<std::string>().find("paged states"), std::string::npos)
      << r.output;
  // Without --keep the disk tier's folder is gone after the runs.
  EXPECT_TRUE(std::filesystem::is_empty(tmp / "disk")) << r.output;

  for (const std::string flag : {"--budget 0", "--over 0.5", "--part x"}) {
    r = RunCommand(common + flag);
    EXPECT_EQ(r.exit_code, 2) << flag << "\n" << r.output;
    EXPECT_NE(r.output.find(flag.substr(0, flag.find(' '))), std::string::npos) << r.output;
  }
  // A budget that cannot hold even one layer in RAM is named.
  r = RunCommand(common + "--budget 100KiB --part a");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--budget 100KiB is too small"), std::string::npos) << r.output;
}

TEST(BenchSplitTest, UnevenSplitBeatsUniformOnMeasuredTimes) {
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  // 8 blocks, a fast device (throttle 1) and a slow one (throttle 3: a 3:1 split is about twice
  // as fast as 4:4, a margin no load noise closes). One BLAS thread keeps the
  // block times steady on a shared 2-core machine.
  CommandResult r = RunCommand(
      "timeout -k 5 180 " + std::string(SHOAL_BINARY) + " bench split --config " +
      SHOAL_SOURCE_DIR + "/configs/tiny.toml --throttle 3 --set model.n_layer=8 " +
      "train.batch_size=8 train.blas_threads=1 --reps 3 --refresh --profile-seconds 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = LastJsonLine(r.output);
  ASSERT_TRUE(j.is_object()) << r.output;
  const auto uneven = j["uneven_split"].get<std::vector<int>>();
  const auto uniform = j["uniform_split"].get<std::vector<int>>();
  ASSERT_EQ(uneven.size(), 2u);
  EXPECT_EQ(uniform, (std::vector<int>{4, 4}));
  EXPECT_EQ(uneven[0] + uneven[1], 8);
  // Stage 0 runs on the fast device: it gets more blocks.
  EXPECT_GT(uneven[0], uneven[1]) << r.output;
  // The throttle shows in what was measured: the slow device's profile and its blocks.
  EXPECT_GT(j["fast_gflops"].get<double>(), j["slow_gflops"].get<double>()) << r.output;
  EXPECT_GT(j["measured_block_s_slow"].get<double>(), j["measured_block_s_fast"].get<double>());
  // And the uneven split is faster on the measured times.
  EXPECT_GT(j["ratio"].get<double>(), 1.0) << r.output;
  EXPECT_LT(j["measured_step_s_uneven"].get<double>(), j["measured_step_s_uniform"].get<double>());
  EXPECT_GT(j["predicted_step_s_uneven"].get<double>(), 0);
}

}  // namespace
}  // namespace shoal
