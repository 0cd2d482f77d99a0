// Tensor, pipeline and data parallelism are exact: every (tp, pp, dp) layout, with uneven stage
// splits and any schedule (1F1B, GPipe, interleaved 1F1B), trains like one process with the same global batch (losses within
// 1e-4 relative over 10 fp32 steps, final weights within 1e-4 in relative norm), and a
// checkpoint written by one layout resumes on another. Real `shoal train` processes over
// 127.0.0.1.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/prepare_data.h"
#include "tests/parallel/train_runs.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::TempDir;

constexpr int kSteps = 10;
constexpr int kBatch = 2;  // sequences per micro-batch per replica

// 6 blocks so that pipelines of 2 and 4 stages can be split unevenly; 4 heads for tp 2.
constexpr char kConfig[] = R"([model]
n_layer = 6
n_head = 4
n_embd = 32
block_size = 32
vocab_size = 256

[train]
steps = 10
grad_accum = 4
log_every = 1
eval_every = 5
eval_batches = 2
seed = 5
omp_threads = 1
blas_threads = 1

[optim]
lr = 3e-3
warmup_steps = 2

[parallel]
timeout_s = 60
)";

struct Layout {
  int tp, pp, dp;
  const char* stages;    // "" for an even split
  const char* schedule;  // "1f1b", "gpipe" or "interleaved"
  int virtual_stages = 1;
  std::string Name() const {
    std::string n = "tp" + std::to_string(tp) + "pp" + std::to_string(pp) + "dp" +
                    std::to_string(dp) + schedule +
                    (virtual_stages > 1 ? "v" + std::to_string(virtual_stages) : "");
    for (const char* c = stages; *c; ++c) {
      if (*c >= '0' && *c <= '9') n += *c;
    }
    return n;
  }
  int ranks() const { return tp * pp * dp; }
  std::string Sets() const {
    std::string s = "parallel.tp=" + std::to_string(tp) + " parallel.pp=" + std::to_string(pp) +
                    " parallel.schedule=" + schedule;
    if (*stages) s += std::string(" parallel.stages=") + stages;
    if (virtual_stages > 1) s += " parallel.virtual_stages=" + std::to_string(virtual_stages);
    return s;
  }
};

class MeshTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir();
    testing::PrepareCorpus(tmp_->path(), 60000);
    testing::WriteTextFile(*tmp_ / "cfg.toml", kConfig);
    // References: one process with the global batch of 1 and of 2 replicas.
    for (int dp : {1, 2}) {
      CommandResult r = RunCommand(TrainCommand(Ref(dp), dp * kBatch, ""));
      ASSERT_EQ(r.exit_code, 0) << r.output;
    }
  }
  static void TearDownTestSuite() { delete tmp_; }

  static std::string Ref(int dp) { return "ref" + std::to_string(dp); }

  static std::string TrainCommand(const std::string& run, int batch, const std::string& sets,
                                  const std::string& extra = "") {
    // Single quotes would end the `bash -c '...'` of RunRanks: stage lists go unquoted.
    return std::string(SHOAL_BINARY) + " train --config " + (*tmp_ / "cfg.toml") +
           " --set data.dir=" + (*tmp_ / "data") + " train.out_dir=" + (*tmp_ / run) +
           " train.batch_size=" + std::to_string(batch) + " " + sets + " " + extra;
  }

  static void Run(const Layout& l, const std::string& run, const std::string& extra = "") {
    if (l.ranks() == 1) {
      CommandResult r = RunCommand(TrainCommand(run, kBatch * l.dp, l.Sets(), extra));
      ASSERT_EQ(r.exit_code, 0) << r.output;
      return;
    }
    auto results = testing::RunRanks(l.ranks(), TrainCommand(run, kBatch, l.Sets(), extra));
    for (size_t r = 0; r < results.size(); ++r) {
      ASSERT_EQ(results[r].exit_code, 0) << "rank " << r << ":\n" << results[r].output;
    }
  }

  static std::vector<double> Losses(const std::string& run, const std::string& kind = "train") {
    return testing::StepLosses(*tmp_ / (run + "/metrics.jsonl"), kind);
  }

  static void ExpectMatchesReference(const std::string& run, int dp) {
    const std::vector<double> ref = Losses(Ref(dp)), got = Losses(run);
    ASSERT_EQ(ref.size(), static_cast<size_t>(kSteps));
    ASSERT_EQ(got.size(), static_cast<size_t>(kSteps));
    for (int i = 0; i < kSteps; ++i) {
      EXPECT_NEAR(got[i], ref[i], 1e-4 * std::abs(ref[i])) << run << " step " << i + 1;
    }
    if (dp == 1) {
      // Validation runs forward through the pipeline (and over the same windows only when the
      // replica's batch is the reference's).
      const std::vector<double> ref_val = Losses(Ref(dp), "val"), got_val = Losses(run, "val");
      ASSERT_EQ(ref_val.size(), 3u);  // steps 0, 5 and 10
      ASSERT_EQ(got_val.size(), ref_val.size());
      for (size_t i = 0; i < ref_val.size(); ++i) {
        EXPECT_NEAR(got_val[i], ref_val[i], 1e-4 * std::abs(ref_val[i])) << run << " val " << i;
      }
    }
    const std::string last = "/checkpoints/step_00000010/model.safetensors";
    testing::ExpectWeightsClose(*tmp_ / (Ref(dp) + last), *tmp_ / (run + last), 1e-4);
  }

  static TempDir* tmp_;
};

TempDir* MeshTest::tmp_ = nullptr;

class MeshEquivalence : public MeshTest, public ::testing::WithParamInterface<Layout> {};

TEST_P(MeshEquivalence, MatchesOneProcessWithTheGlobalBatch) {
  const Layout l = GetParam();
  Run(l, l.Name());
  ExpectMatchesReference(l.Name(), l.dp);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, MeshEquivalence,
    ::testing::Values(Layout{2, 1, 1, "", "1f1b"},          // tensor parallel only
                      Layout{1, 2, 1, "[4,2]", "1f1b"},     // uneven pipeline
                      Layout{1, 2, 1, "[1,5]", "gpipe"},    // the other schedule
                      Layout{1, 4, 1, "[1,2,2,1]", "1f1b"},
                      Layout{2, 2, 1, "[5,1]", "1f1b"},
                      Layout{1, 2, 2, "", "1f1b"},
                      Layout{2, 2, 2, "[2,4]", "1f1b"},
                      // two chunks per rank: model stages 0..3 on ranks 0, 1, 0, 1
                      Layout{1, 2, 1, "[1,2,2,1]", "interleaved", 2},
                      Layout{2, 2, 1, "", "interleaved", 2}),
    [](const ::testing::TestParamInfo<Layout>& info) { return info.param.Name(); });

TEST_F(MeshTest, CheckpointsResumeOnAnotherLayout) {
  // Half the run on one layout, the rest on another: the same losses and weights as the
  // uninterrupted single process (checkpoints hold model-wide tensors).
  struct Hop {
    Layout from, to;
  };
  for (const Hop& h : {Hop{{1, 2, 1, "[4,2]", "1f1b"}, {2, 1, 1, "", "1f1b"}},
                       Hop{{2, 2, 1, "[2,4]", "1f1b"}, {1, 1, 1, "", "1f1b"}},
                       Hop{{1, 1, 1, "", "1f1b"}, {1, 4, 1, "", "gpipe"}},
                       Hop{{1, 2, 1, "[2,1,1,2]", "interleaved", 2}, {1, 1, 1, "", "1f1b"}}}) {
    const std::string run = "hop_" + h.from.Name() + "_" + h.to.Name();
    Run(h.from, run, "--stop-after 5");
    Run(h.to, run, "--resume");
    ExpectMatchesReference(run, 1);
  }
}

TEST_F(MeshTest, LayoutsThatDoNotFitAreRefusedWithTheNumbers) {
  // One process cannot be a pipeline of two.
  CommandResult r = RunCommand(TrainCommand("bad1", kBatch, "parallel.pp=2"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("1 ranks cannot be split"), std::string::npos) << r.output;
  // tp must divide the heads.
  r = RunCommand(TrainCommand("bad2", kBatch, "parallel.tp=3"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("parallel.tp = 3 must divide model.n_head = 4"), std::string::npos)
      << r.output;
  // Stage block counts must add up to the model's blocks.
  r = RunCommand(TrainCommand("bad3", kBatch, "parallel.pp=2 parallel.stages=[4,4]"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("parallel.stages"), std::string::npos) << r.output;
  // 3 ranks do not make tp 2 groups.
  auto results = testing::RunRanks(3, TrainCommand("bad4", kBatch, "parallel.tp=2 parallel.timeout_s=10"));
  EXPECT_NE(results[0].exit_code, 0);
  EXPECT_NE(results[0].output.find("2 does not divide 3"), std::string::npos) << results[0].output;
}

}  // namespace
}  // namespace shoal
