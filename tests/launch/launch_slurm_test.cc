// The Slurm job scripts in deploy/slurm/ on a real one-node Slurm cluster, started in a temporary
// folder by scripts/slurm-start (installing the packages if they are missing) and always stopped
// by scripts/slurm-stop. Each job runs `shoal env` on every rank, which prints the rank
// discovery's view as JSON, so no training is involved:
//   train-1node.sbatch      srun, 2 tasks          -> source "slurm"
//   train-multinode.sbatch  srun + `shoal run`     -> source "torchrun" (one node, 2 ranks)
//   train-mpirun.sbatch     mpirun in the job      -> source "openmpi"
// and a failing rank fails the job with its exit code. The suite skips, printing why, only when
// the cluster could not be started at all (no root to install Slurm, no package mirror, ...).
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::Contains;
using testing::ReadTextFile;
using testing::RunCommand;
using testing::TempDir;

std::string ShortHostname() {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  std::string host = name;
  return host.substr(0, host.find('.'));
}

// The cluster of the whole suite: started once, stopped by the destructor whatever happened.
class Cluster {
 public:
  Cluster() {
    const auto start = std::chrono::steady_clock::now();
    // Installing the packages may wait for another apt's lock; the daemons need ~1 s.
    start_ = RunCommand("timeout -k 10 400 " + Script("slurm-start") + " " + dir_.path());
    start_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                         .count();
  }
  ~Cluster() {
    const CommandResult stop = RunCommand("timeout -k 5 60 " + Script("slurm-stop") + " " +
                                          dir_.path());
    std::fprintf(stderr, "slurm-stop (exit %d):\n%s", stop.exit_code, stop.output.c_str());
  }

  bool up() const { return start_.exit_code == 0; }
  const CommandResult& start() const { return start_; }
  double start_seconds() const { return start_seconds_; }
  std::string path(const std::string& name) const { return dir_ / name; }

  // Runs a Slurm client command against this cluster.
  CommandResult Client(const std::string& command) const {
    return RunCommand("SLURM_CONF=" + path("slurm.conf") + " timeout -k 5 30 " + command);
  }

  static std::string Script(const std::string& name) {
    return std::string(SHOAL_SOURCE_DIR) + "/scripts/" + name;
  }

 private:
  TempDir dir_;
  CommandResult start_;
  double start_seconds_ = 0;
};

struct Job {
  std::string id;
  std::string state;      // JobState, e.g. COMPLETED
  std::string exit_code;  // ExitCode, e.g. 0:0
  std::string output;     // the job's output file
};

class SlurmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { cluster_ = new Cluster(); }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    if (!cluster_->up()) {
      GTEST_SKIP() << "could not start a one-node Slurm cluster with scripts/slurm-start "
                      "(exit "
                   << cluster_->start().exit_code << "):\n"
                   << cluster_->start().output;
    }
  }

  // Submits deploy/slurm/SCRIPT with sbatch FLAGS and shoal ARGS, waits (bounded) for the job to
  // end, and returns its final state and output.
  static Job RunJob(const std::string& script, const std::string& flags,
                    const std::string& args, const std::string& env = "") {
    Job job;
    const std::string out = cluster_->path(script + "-%j.out");
    CommandResult submit = cluster_->Client(
        "env " + env + " SHOAL_BIN=" + SHOAL_BINARY + " OMP_WAIT_POLICY=passive sbatch " +
        "--parsable --output=" + out + " --chdir=" + cluster_->path("") + " " + flags + " " +
        SHOAL_SOURCE_DIR + "/deploy/slurm/" + script + " " + args);
    EXPECT_EQ(submit.exit_code, 0) << submit.output;
    if (submit.exit_code != 0) return job;
    job.id = submit.output.substr(0, submit.output.find_first_of(";\n"));

    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    std::string info;
    while (std::chrono::steady_clock::now() < deadline) {
      info = cluster_->Client("scontrol show job -o " + job.id).output;
      job.state = Field(info, "JobState");
      if (!job.state.empty() && job.state != "PENDING" && job.state != "RUNNING" &&
          job.state != "CONFIGURING" && job.state != "COMPLETING") {
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    job.exit_code = Field(info, "ExitCode");
    job.output = ReadTextFile(cluster_->path(script + "-" + job.id + ".out"));
    if (job.state == "PENDING" || job.state == "RUNNING") {
      cluster_->Client("scancel " + job.id);
      ADD_FAILURE() << "job " << job.id << " did not end within 120 s: " << info;
    }
    return job;
  }

  // "KEY=value" out of `scontrol show job -o`.
  static std::string Field(const std::string& info, const std::string& key) {
    const size_t at = info.find(" " + key + "=");
    if (at == std::string::npos) return "";
    const size_t start = at + key.size() + 2;
    return info.substr(start, info.find_first_of(" \n", start) - start);
  }

  // The JSON line `shoal env` printed for `rank`, with whatever label precedes it.
  static std::string RankLine(const std::string& output, int rank) {
    const std::string needle = "\"rank\":" + std::to_string(rank) + ",";
    const size_t at = output.find(needle);
    if (at == std::string::npos) return "";
    const size_t start = output.rfind('\n', at) == std::string::npos ? 0 : output.rfind('\n', at) + 1;
    return output.substr(start, output.find('\n', at) - start);
  }

  static Cluster* cluster_;
};

Cluster* SlurmTest::cluster_ = nullptr;

TEST_F(SlurmTest, OneNodeScriptRanksSeeSlurm) {
  const auto start = std::chrono::steady_clock::now();
  Job job = RunJob("train-1node.sbatch", "--ntasks=2", "env");
  std::fprintf(stderr, "cluster start %.1f s, job %.1f s\n", cluster_->start_seconds(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  ASSERT_EQ(job.state, "COMPLETED") << job.output;
  EXPECT_EQ(job.exit_code, "0:0");
  const int port = 20000 + std::stoi(job.id) % 10000;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string line = RankLine(job.output, rank);
    ASSERT_FALSE(line.empty()) << "no line for rank " << rank << ":\n" << job.output;
    EXPECT_EQ(line.rfind(std::to_string(rank) + ": {", 0), 0u) << line;  // srun --label
    EXPECT_TRUE(Contains(line, "\"source\":\"slurm\"")) << line;
    EXPECT_TRUE(Contains(line, "\"world_size\":2")) << line;
    EXPECT_TRUE(Contains(line, "\"local_rank\":" + std::to_string(rank))) << line;
    EXPECT_TRUE(Contains(line, "\"local_world_size\":2")) << line;
    EXPECT_TRUE(Contains(line, "\"master_addr\":\"" + ShortHostname() + "\"")) << line;
    EXPECT_TRUE(Contains(line, "\"master_port\":" + std::to_string(port))) << line;
  }
}

TEST_F(SlurmTest, MultinodeScriptStartsLaunchers) {
  Job job = RunJob("train-multinode.sbatch", "--nodes=1 --cpus-per-task=2", "env",
                   "NPROC_PER_NODE=2");
  ASSERT_EQ(job.state, "COMPLETED") << job.output;
  EXPECT_EQ(job.exit_code, "0:0");
  for (int rank = 0; rank < 2; ++rank) {
    const std::string line = RankLine(job.output, rank);
    ASSERT_FALSE(line.empty()) << "no line for rank " << rank << ":\n" << job.output;
    EXPECT_EQ(line.rfind("[rank" + std::to_string(rank) + "]: {", 0), 0u) << line;
    EXPECT_TRUE(Contains(line, "\"source\":\"torchrun\"")) << line;
    EXPECT_TRUE(Contains(line, "\"world_size\":2")) << line;
    EXPECT_TRUE(Contains(line, "\"node_rank\":0")) << line;
    EXPECT_TRUE(Contains(line, "\"master_addr\":\"" + ShortHostname() + "\"")) << line;
  }
}

TEST_F(SlurmTest, MpirunScriptRanksSeeOpenMpi) {
  Job job = RunJob("train-mpirun.sbatch", "--ntasks=2", "env");
  ASSERT_EQ(job.state, "COMPLETED") << job.output;
  EXPECT_EQ(job.exit_code, "0:0");
  for (int rank = 0; rank < 2; ++rank) {
    const std::string line = RankLine(job.output, rank);
    ASSERT_FALSE(line.empty()) << "no line for rank " << rank << ":\n" << job.output;
    EXPECT_TRUE(Contains(line, "\"source\":\"openmpi\"")) << line;
    EXPECT_TRUE(Contains(line, "\"world_size\":2")) << line;
    EXPECT_TRUE(Contains(line, "\"local_rank\":" + std::to_string(rank))) << line;
  }
}

TEST_F(SlurmTest, FailingRanksFailTheJob) {
  Job job = RunJob("train-1node.sbatch", "--ntasks=2",
                   "train --config " + cluster_->path("missing.toml"));
  EXPECT_EQ(job.state, "FAILED") << job.output;
  // shoal exits 2 for bad input; which task's status srun passes on first depends on timing
  // (the other task may be killed once one fails), so only require a failure.
  EXPECT_NE(job.exit_code, "0:0") << job.output;
  EXPECT_TRUE(Contains(job.output, "missing.toml")) << job.output;
}

TEST_F(SlurmTest, OneNodeScriptTrainsTwoDataParallelRanks) {
  // A real training job: 2 Slurm tasks, data parallel over Gloo, a few steps of a small GPT.
  testing::WriteTextFile(cluster_->path("corpus.txt"), testing::SyntheticText(40000));
  CommandResult prep = RunCommand(std::string(SHOAL_BINARY) + " prepare-data --no-progress --input " +
                                  cluster_->path("corpus.txt") + " --out " + cluster_->path("data"));
  ASSERT_EQ(prep.exit_code, 0) << prep.output;
  testing::WriteTextFile(cluster_->path("tiny.toml"), R"([model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
[train]
steps = 10
batch_size = 4
log_every = 5
eval_every = 0
eval_batches = 1
blas_threads = 1
[optim]
lr = 3e-3
warmup_steps = 2
)");
  Job job = RunJob("train-1node.sbatch", "--ntasks=2",
                   "train --config " + cluster_->path("tiny.toml") + " --set data.dir=" +
                       cluster_->path("data") + " train.out_dir=" + cluster_->path("run"));
  ASSERT_EQ(job.state, "COMPLETED") << job.output;
  EXPECT_TRUE(Contains(job.output, "data parallel: 2 ranks over gloo")) << job.output;
  EXPECT_TRUE(Contains(job.output, "step 10/10")) << job.output;
  EXPECT_TRUE(testing::ReadTextFile(cluster_->path("run/checkpoints/step_00000010/manifest.json"))
                  .find("\"step\": 10") != std::string::npos);
}

}  // namespace
}  // namespace shoal
