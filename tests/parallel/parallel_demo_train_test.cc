// DeMo in real training jobs: `shoal train` processes with optim.name = "demo" over Gloo and MPI
// on 127.0.0.1. Replicas stay bit-identical (each rank prints its own parameter hash; the test
// compares them, and the in-run check runs every step), MPI and Gloo move the same bytes and so
// end on the same weights, a stopped job resumes exactly, the bytes in the metrics equal the
// closed form for the model's shapes, and an AdamW checkpoint is not resumed as DeMo. (Ranks with
// different settings never get this far: the trainer compares configs at start. The exchange's
// own checks of peers, and the drift check failing, are tested in parallel_demo_exchange_test.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/safetensors.h"
#include "tests/parallel/train_runs.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::TempDir;

constexpr int kSteps = 50;

// Widths of 64 and more so that 2-D weights are cut into full 64 x 64 tiles, plus axes below
// the chunk (context 32) and 1-D tensors (biases, norms).
constexpr char kConfig[] = R"([model]
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
vocab_size = 256

[train]
steps = 50
batch_size = 2
log_every = 1
eval_every = 0
eval_batches = 1
seed = 5
omp_threads = 1
blas_threads = 1

[optim]
name = "demo"
lr = 1e-3
warmup_steps = 5
demo_drift_check = 1

[parallel]
timeout_s = 60
)";

class DemoTrainTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir();
    testing::PrepareCorpus(tmp_->path(), 60000);
    testing::WriteTextFile(*tmp_ / "cfg.toml", kConfig);
  }
  static void TearDownTestSuite() { delete tmp_; }

  static std::string Train(const std::string& run, const std::string& sets = "",
                           const std::string& extra = "") {
    return std::string(SHOAL_BINARY) + " train --config " + (*tmp_ / "cfg.toml") +
           " --set data.dir=" + (*tmp_ / "data") + " train.out_dir=" + (*tmp_ / run) + " " +
           sets + " " + extra;
  }

  static std::string Weights(const std::string& run, int step = kSteps) {
    char name[64];
    std::snprintf(name, sizeof(name), "/checkpoints/step_%08d/model.safetensors", step);
    return *tmp_ / (run + name);
  }

  // Runs `run` on `n` Gloo ranks once per test suite (the runs are shared between tests).
  static void RunGlooOnce(const std::string& run, int n) {
    if (done_.count(run)) return;
    auto results = testing::RunRanks(n, Train(run));
    for (int r = 0; r < n; ++r) ASSERT_EQ(results[r].exit_code, 0) << results[r].output;
    outputs_[run] = results;
    done_.insert(run);
  }

  static TempDir* tmp_;
  static std::set<std::string> done_;
  static std::map<std::string, std::vector<CommandResult>> outputs_;
};

TempDir* DemoTrainTest::tmp_ = nullptr;
std::set<std::string> DemoTrainTest::done_;
std::map<std::string, std::vector<CommandResult>> DemoTrainTest::outputs_;

// The hash rank `r` printed at the end ("rank R: DeMo replica parameters hash H after step S").
std::string PrintedHash(const std::string& output, int rank) {
  const std::regex re("rank " + std::to_string(rank) +
                      ": DeMo replica parameters hash ([0-9a-f]{16}) after step (\\d+)");
  std::smatch m;
  if (!std::regex_search(output, m, re)) return "";
  return m[1].str() + "@" + m[2].str();
}

// Chunk length along an axis, written out here from the rule (not from shoal's code): the
// target if it divides the size, else the largest divisor below it (the size itself if smaller).
int64_t Chunk(int64_t dim, int64_t target) {
  if (dim % target == 0) return target;
  int64_t best = 1;
  for (int64_t d = 1; d < target && d <= dim; ++d) {
    if (dim % d == 0) best = d;
  }
  return best;
}

// The payload of one worker for these tensors: 16 header bytes plus, per tensor, tiles · k
// picks of an int16 index and a bf16 value.
int64_t PayloadBytes(const std::map<std::string, at::Tensor>& tensors, int64_t chunk,
                     int64_t topk) {
  int64_t bytes = 16;
  for (const auto& [name, t] : tensors) {
    const int64_t rows = t.dim() == 2 ? t.size(0) : 1, cols = t.dim() == 2 ? t.size(1) : t.numel();
    const int64_t n1 = Chunk(rows, chunk), n2 = Chunk(cols, chunk);
    const int64_t tiles = (rows / n1) * (cols / n2);
    bytes += tiles * std::min(topk, n1 * n2) * (2 + 2);
  }
  return bytes;
}

TEST_F(DemoTrainTest, ReplicasStayBitIdenticalOverFiftyStepsOnTwoAndFourRanks) {
  for (int n : {2, 4}) {
    const std::string run = "gloo" + std::to_string(n);
    RunGlooOnce(run, n);
    const std::vector<CommandResult>& out = outputs_[run];
    const std::string first = PrintedHash(out[0].output, 0);
    ASSERT_FALSE(first.empty()) << out[0].output;
    EXPECT_EQ(first.substr(17), std::to_string(kSteps));
    for (int r = 1; r < n; ++r) EXPECT_EQ(PrintedHash(out[r].output, r), first) << "rank " << r;
    // It trained: the loss fell.
    const std::vector<double> losses = testing::StepLosses(*tmp_ / (run + "/metrics.jsonl"));
    ASSERT_EQ(losses.size(), static_cast<size_t>(kSteps));
    EXPECT_LT(losses.back(), losses.front() - 0.3) << run;
  }
}

TEST_F(DemoTrainTest, BytesInTheMetricsEqualTheClosedForm) {
  RunGlooOnce("gloo2", 2);
  RunGlooOnce("gloo4", 4);
  auto model = runtime::ReadSafetensors(Weights("gloo2"));
  ASSERT_TRUE(model.ok()) << model.status();
  std::map<std::string, at::Tensor> shapes(model->tensors.begin(), model->tensors.end());
  const int64_t payload = PayloadBytes(shapes, 64, 32);
  for (int n : {2, 4}) {
    std::istringstream in(testing::ReadTextFile(*tmp_ / ("gloo" + std::to_string(n) +
                                                          "/metrics.jsonl")));
    std::string line;
    int records = 0;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line);
      if (j["kind"] != "train") continue;
      ++records;
      // A ring all-gather: each rank sends and receives the other W - 1 payloads once.
      EXPECT_EQ(j["bytes_sent"].get<int64_t>(), (n - 1) * payload) << line;
      EXPECT_EQ(j["bytes_received"].get<int64_t>(), (n - 1) * payload) << line;
    }
    EXPECT_EQ(records, kSteps);
  }
  // And the log line shows the traffic.
  EXPECT_NE(outputs_["gloo2"][0].output.find(" out "), std::string::npos);
}

TEST_F(DemoTrainTest, MpiMovesTheSameBytesAndEndsOnTheSameWeights) {
  RunGlooOnce("gloo2", 2);
  CommandResult r = RunCommand("mpirun --allow-run-as-root --oversubscribe -np 2 " +
                               Train("mpi2", "parallel.backend=mpi"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto a = runtime::ReadSafetensors(Weights("gloo2"));
  auto b = runtime::ReadSafetensors(Weights("mpi2"));
  ASSERT_TRUE(a.ok() && b.ok());
  for (const auto& [name, t] : a->tensors) {
    ASSERT_TRUE(b->tensors.count(name)) << name;
    EXPECT_TRUE(at::equal(t, b->tensors.at(name))) << name;
  }
}

TEST_F(DemoTrainTest, StoppedJobResumesExactlyAndOnMoreRanks) {
  RunGlooOnce("gloo2", 2);
  auto first = testing::RunRanks(2, Train("resume", "", "--stop-after 20"));
  ASSERT_EQ(first[0].exit_code, 0) << first[0].output;
  // The checkpoint at step 20 holds both replicas' residuals.
  auto opt = runtime::ReadSafetensors(*tmp_ /
                                      "resume/checkpoints/step_00000020/optimizer.safetensors");
  ASSERT_TRUE(opt.ok()) << opt.status();
  int r0 = 0, r1 = 0;
  for (const auto& [name, t] : opt->tensors) {
    r0 += name.rfind("demo.r0.delta.", 0) == 0;
    r1 += name.rfind("demo.r1.delta.", 0) == 0;
  }
  EXPECT_GT(r0, 0);
  EXPECT_EQ(r0, r1);
  // Copy it before resuming, for the 3-rank resume below.
  ASSERT_EQ(RunCommand("cp -r " + (*tmp_ / "resume") + " " + (*tmp_ / "resume3")).exit_code, 0);

  auto second = testing::RunRanks(2, Train("resume", "", "--resume"));
  ASSERT_EQ(second[0].exit_code, 0) << second[0].output;
  auto a = runtime::ReadSafetensors(Weights("gloo2"));
  auto b = runtime::ReadSafetensors(Weights("resume"));
  ASSERT_TRUE(a.ok() && b.ok());
  for (const auto& [name, t] : a->tensors) {
    EXPECT_TRUE(at::equal(t, b->tensors.at(name))) << name << " differs after resuming";
  }

  // Three ranks from a two-replica checkpoint: the new replica starts from a zero residual.
  auto third = testing::RunRanks(3, Train("resume3", "train.steps=24", "--resume"));
  for (int r = 0; r < 3; ++r) ASSERT_EQ(third[r].exit_code, 0) << third[r].output;
  EXPECT_NE(third[2].output.find("holds no DeMo residual for this replica"), std::string::npos)
      << third[2].output;
  EXPECT_EQ(PrintedHash(third[1].output, 1), PrintedHash(third[0].output, 0));
  EXPECT_EQ(PrintedHash(third[2].output, 2), PrintedHash(third[0].output, 0));
}

TEST_F(DemoTrainTest, ResumingAnAdamWCheckpointWithDemoIsRefused) {
  CommandResult a = RunCommand(Train("switch", "optim.name=adamw train.steps=2"));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  CommandResult b = RunCommand(Train("switch", "train.steps=4", "--resume"));
  EXPECT_NE(b.exit_code, 0);
  EXPECT_NE(b.output.find("switching optimizers on resume is not supported"), std::string::npos)
      << b.output;
}

}  // namespace
}  // namespace shoal
