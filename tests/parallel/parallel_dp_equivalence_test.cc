// Data parallelism is exact: N ranks with batch B train like 1 rank with batch N*B (same losses
// and weights to within 1e-5 relative over 20 fp32 steps), over Gloo and MPI, with and without
// ZeRO-1; and checkpoints written by N ranks resume on M ranks. Real `shoal train` processes
// talking over 127.0.0.1; real mpirun.
#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/prepare_data.h"
#include "runtime/safetensors.h"
#include "tests/parallel/train_runs.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::TempDir;

constexpr int kSteps = 20;
constexpr int kPerRankBatch = 2;

constexpr char kConfig[] = R"([model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
vocab_size = 256

[train]
steps = 20
log_every = 1
eval_every = 0
eval_batches = 1
seed = 11
omp_threads = 1
blas_threads = 1

[optim]
lr = 3e-3
warmup_steps = 4

[parallel]
timeout_s = 60
)";

class DataParallelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir();
    testing::PrepareCorpus(tmp_->path(), 80000);
    testing::WriteTextFile(*tmp_ / "cfg.toml", kConfig);
    // The reference: one rank with the whole global batch of 2 ranks (and of 4: same windows,
    // since the sampler indexes samples globally).
    for (int n : {2, 4}) {
      CommandResult r = RunCommand(TrainCommand(StrRun("ref", n), n * kPerRankBatch, ""));
      ASSERT_EQ(r.exit_code, 0) << r.output;
    }
  }
  static void TearDownTestSuite() { delete tmp_; }

  static std::string StrRun(const std::string& name, int n) {
    return name + std::to_string(n);
  }

  // `shoal train` for run `run` with per-rank batch `batch`, plus extra --set items.
  static std::string TrainCommand(const std::string& run, int batch, const std::string& sets,
                                  const std::string& extra = "") {
    return std::string(SHOAL_BINARY) + " train --config " + (*tmp_ / "cfg.toml") +
           " --set data.dir=" + (*tmp_ / "data") + " train.out_dir=" + (*tmp_ / run) +
           " train.batch_size=" + std::to_string(batch) + " " + sets + " " + extra;
  }

  static std::vector<CommandResult> RunRanks(int n, const std::string& command) {
    return testing::RunRanks(n, command);
  }

  static std::vector<double> StepLosses(const std::string& run) {
    return testing::StepLosses(*tmp_ / (run + "/metrics.jsonl"));
  }

  static std::string Weights(const std::string& run) {
    return *tmp_ / (run + "/checkpoints/step_00000020/model.safetensors");
  }

  // Losses and final weights of `run` against the reference for `n` ranks.
  static void ExpectMatchesReference(const std::string& run, int n) {
    const std::vector<double> ref = StepLosses(StrRun("ref", n)), got = StepLosses(run);
    ASSERT_EQ(ref.size(), static_cast<size_t>(kSteps));
    ASSERT_EQ(got.size(), static_cast<size_t>(kSteps));
    for (int i = 0; i < kSteps; ++i) {
      EXPECT_NEAR(got[i], ref[i], 1e-5 * std::abs(ref[i])) << "step " << i + 1;
    }
    testing::ExpectWeightsClose(Weights(StrRun("ref", n)), Weights(run), 1e-5);
  }

  static TempDir* tmp_;
};

TempDir* DataParallelTest::tmp_ = nullptr;

struct Case {
  const char* backend;
  int ranks;
  int zero;
};

class DataParallelEquivalence : public DataParallelTest,
                                public ::testing::WithParamInterface<Case> {};

TEST_P(DataParallelEquivalence, MatchesOneRankWithTheGlobalBatch) {
  const Case c = GetParam();
  const std::string run = std::string(c.backend) + std::to_string(c.ranks) + "z" +
                          std::to_string(c.zero);
  const std::string sets = std::string("parallel.backend=") + c.backend +
                           " parallel.zero=" + std::to_string(c.zero) +
                           " parallel.bucket_mb=0.02";  // several buckets even for a tiny model
  std::vector<CommandResult> results;
  if (std::string(c.backend) == "mpi") {
    CommandResult r = RunCommand("mpirun --allow-run-as-root --oversubscribe -np " +
                                 std::to_string(c.ranks) + " " +
                                 TrainCommand(run, kPerRankBatch, sets));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  } else {
    results = RunRanks(c.ranks, TrainCommand(run, kPerRankBatch, sets));
    for (int r = 0; r < c.ranks; ++r) ASSERT_EQ(results[r].exit_code, 0) << results[r].output;
  }
  ExpectMatchesReference(run, c.ranks);
}

INSTANTIATE_TEST_SUITE_P(
    Backends, DataParallelEquivalence,
    ::testing::Values(Case{"gloo", 2, 0}, Case{"gloo", 4, 0}, Case{"gloo", 2, 1},
                      Case{"gloo", 4, 1}, Case{"mpi", 2, 0}, Case{"mpi", 4, 0},
                      Case{"mpi", 2, 1}, Case{"mpi", 4, 1}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::string(info.param.backend) + std::to_string(info.param.ranks) + "ranks" +
             (info.param.zero ? "Zero1" : "AllReduce");
    });

TEST_F(DataParallelTest, CheckpointOfTwoRanksResumesOnFourAndOnOne) {
  // 2 ranks (ZeRO-1: the optimizer state is gathered into one file) for 10 steps ...
  const std::string sets = "parallel.zero=1";
  for (const auto& [resume_ranks, run] : {std::make_pair(4, std::string("reshard4")),
                                          std::make_pair(1, std::string("reshard1"))}) {
    auto first = RunRanks(2, TrainCommand(run, kPerRankBatch, sets, "--stop-after 10"));
    ASSERT_EQ(first[0].exit_code, 0) << first[0].output;
    // ... then the same global batch of 4 sequences on `resume_ranks` ranks.
    const int batch = 2 * kPerRankBatch / resume_ranks;
    if (resume_ranks == 1) {
      CommandResult r = RunCommand(TrainCommand(run, batch, sets, "--resume"));
      ASSERT_EQ(r.exit_code, 0) << r.output;
      EXPECT_NE(r.output.find("resumed"), std::string::npos) << r.output;
    } else {
      auto second = RunRanks(resume_ranks, TrainCommand(run, batch, sets, "--resume"));
      ASSERT_EQ(second[0].exit_code, 0) << second[0].output;
      EXPECT_NE(second[0].output.find("resumed"), std::string::npos) << second[0].output;
    }
    ExpectMatchesReference(run, 2);
  }
}

TEST_F(DataParallelTest, GradientAccumulationSyncsTheSameMean) {
  // 2 ranks x 2 micro-batches of 1 sequence cover the same 4 global samples per step as the
  // 1-rank reference with batch 4 (the sampler numbers samples globally).
  auto results = RunRanks(2, TrainCommand("accum", 1, "train.grad_accum=2 parallel.bucket_mb=0.02"));
  for (auto& r : results) ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectMatchesReference("accum", 2);
}

TEST_F(DataParallelTest, UnreachableMasterFailsWithinTheTimeout) {
  const int port = ::shoal::testing::FreePort();  // nobody listens there
  const auto start = std::chrono::steady_clock::now();
  CommandResult r = RunCommand("RANK=1 LOCAL_RANK=1 WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 "
                               "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " +
                               TrainCommand("unreachable", 2, "parallel.timeout_s=3"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(std::to_string(port)), std::string::npos) << r.output;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));  // no hang
}

TEST_F(DataParallelTest, TakenMasterPortIsAClearError) {
  // Something else already listens on the master port.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  CommandResult r = RunCommand("RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 "
                               "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " +
                               TrainCommand("taken", 2, "parallel.timeout_s=3"));
  ::close(fd);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(std::to_string(port)), std::string::npos) << r.output;
}

TEST_F(DataParallelTest, WrongWorldSizeFailsWithinTheTimeout) {
  // Two ranks start, but each was told the job has three.
  const int port = ::shoal::testing::FreePort();
  const std::string env = "WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                          std::to_string(port) + " ";
  const auto start = std::chrono::steady_clock::now();
  CommandResult r = RunCommand(
      "bash -c '(RANK=0 LOCAL_RANK=0 " + env + TrainCommand("world", 2, "parallel.timeout_s=3") +
      ") & (RANK=1 LOCAL_RANK=1 " + env + TrainCommand("world", 2, "parallel.timeout_s=3") +
      "); wait'");
  EXPECT_NE(r.output.find("error"), std::string::npos) << r.output;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));  // no hang
}

TEST_F(DataParallelTest, RanksWithDifferentConfigsAreRefused) {
  const int port = ::shoal::testing::FreePort();
  const std::string env = "WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                          std::to_string(port) + " ";
  const std::string cmd0 = "RANK=0 LOCAL_RANK=0 " + env + TrainCommand("bad", 2, "parallel.timeout_s=10");
  const std::string cmd1 = "RANK=1 LOCAL_RANK=1 " + env + TrainCommand("bad", 2, "parallel.timeout_s=10 optim.lr=1e-2");
  CommandResult r = RunCommand("bash -c '(" + cmd0 + ") & (" + cmd1 + "); wait'");
  EXPECT_NE(r.output.find("different config"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace shoal
