// Mesh-mode ranks and the coordinator, end to end with real processes:
//   - `shoal coordinator` (the CLI) and `shoal run --nproc-per-node 2 -- train --coordinator ...`:
//     `shoal status --json`, the HTTP /api/status, a real Prometheus scraping /metrics and headless
//     Chromium rendering the dashboard all see both ranks training (screenshot kept as
//     dashboard-e2e.png under $SHOAL_ARTIFACT_DIR, default <build>/artifacts);
//   - against a coordinator server started in this process (a real gRPC server on 127.0.0.1): a
//     wrong token fails fast with exit 2, a drained worker checkpoints and exits 0, an
//     unreachable coordinator fails within --coordinator-timeout, TLS works with the
//     coordinator's CA (and plaintext against it does not);
//   - one `shoal coordinator` serving jobs one after another, each with a layout of its own.
// Every command runs under `timeout`, so nothing here can hang the suite.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launch/worker_link.h"
#include "scheduler/coordinator_service.h"
#include "tests/monitoring_util.h"
#include "tests/json_util.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using Clock = std::chrono::steady_clock;
using testing::CommandResult;
using testing::Contains;
using testing::ReadTextFile;
using testing::RunCommand;
using testing::TempDir;
using testing::WaitUntil;
using testing::WriteTextFile;

using testing::LastJsonLine;

// proto3 JSON prints 64-bit integers as strings; either form reads here.
constexpr auto Number = testing::JsonNumber;

// A field under its proto name or its lowerCamelCase JSON name.
const nlohmann::json& Field(const nlohmann::json& j, const std::string& snake) {
  static const nlohmann::json kNull;
  if (!j.is_object()) return kNull;
  if (j.contains(snake)) return j[snake];
  std::string camel;
  bool up = false;
  for (char c : snake) {
    if (c == '_') {
      up = true;
    } else {
      camel += up ? static_cast<char>(std::toupper(c)) : c;
      up = false;
    }
  }
  return j.contains(camel) ? j[camel] : kNull;
}

// Waits up to `limit` for `pid`; its exit code (128 + signal), or -1 after killing it.
int WaitExit(pid_t pid, std::chrono::seconds limit) {
  int status = 0;
  const bool done = WaitUntil([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, limit);
  if (!done) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

class CoordinatorTest : public ::testing::Test {
 protected:
  // Token files, the training data (prepared once per test through the real CLI).
  void SetUp() override {
    // shoal re-executes itself once when OMP_WAIT_POLICY is unset; set it to save that.
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    WriteTextFile(tmp_ / "token", "s3cret-token\n");
    WriteTextFile(tmp_ / "wrong-token", "not-the-token\n");
    WriteTextFile(tmp_ / "text.txt", testing::SyntheticText(200000));
    CommandResult r = RunCommand("timeout -k 5 60 " + std::string(SHOAL_BINARY) +
                                 " prepare-data --no-progress --input " + (tmp_ / "text.txt") +
                                 " --out " + (tmp_ / "data"));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }

  // `train` arguments for configs/tiny.toml with a small batch, made quick.
  std::string TrainArgs(int steps, const std::string& extra = "") {
    return std::string(" train --config ") + SHOAL_SOURCE_DIR + "/configs/tiny.toml --set data.dir=" +
           (tmp_ / "data") + " train.out_dir=" + (tmp_ / "run") + " train.steps=" +
           std::to_string(steps) +
           " train.batch_size=4 train.log_every=5 train.eval_every=0 train.eval_batches=1"
           " checkpoint.every=0 optim.warmup_steps=2" +
           extra;
  }

  // A coordinator in this process: the real gRPC service on 127.0.0.1, port 0.
  std::unique_ptr<scheduler::CoordinatorServer> StartServer(const std::string& token) {
    scheduler::CoordinatorServerOptions o;
    o.listen = "127.0.0.1:0";
    o.token = token;
    o.core.heartbeat_interval_ms = 200;
    o.core.lease_ms = 10000;
    auto server = scheduler::CoordinatorServer::Start(o);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  // Starts `shoal ARGS` in the background under `timeout`, output to `log`.
  pid_t Spawn(const std::string& args, const std::string& log, int limit_s = 120) {
    const std::string cmd = "exec timeout -k 5 " + std::to_string(limit_s) + " " + SHOAL_BINARY +
                            " " + args + " >" + log + " 2>&1";
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    return pid;
  }

  // Two ranks of `TrainArgs(steps, train_sets) + flags` against a coordinator in this process,
  // to the end. Returns the job's log; `*status` receives the coordinator's view after it.
  std::string RunTwoRanks(int steps, const std::string& train_sets, const std::string& flags,
                          v1::ClusterStatus* status) {
    auto server = StartServer("s3cret-token");
    EXPECT_NE(server, nullptr);
    if (server == nullptr) return "";
    const std::string where = "127.0.0.1:" + std::to_string(server->port());
    const pid_t pid = Spawn("run --standalone --nproc-per-node 2 --" + TrainArgs(steps, train_sets) +
                                flags + " --coordinator " + where + " --coordinator-token-file " +
                                (tmp_ / "token"),
                            tmp_ / "train.log");
    const int code = WaitExit(pid, std::chrono::seconds(110));
    const std::string log = ReadTextFile(tmp_ / "train.log");
    EXPECT_EQ(code, 0) << log;
    *status = server->core().Status();
    return log;
  }

  TempDir tmp_;
};

// ---------------------------------------------------------------------------------------------
// Against a coordinator in this process

TEST_F(CoordinatorTest, WrongTokenFailsFastNamingTheCoordinator) {
  auto server = StartServer("s3cret-token");
  ASSERT_NE(server, nullptr);
  const std::string where = "127.0.0.1:" + std::to_string(server->port());
  CommandResult r = RunCommand("timeout -k 5 60 " + std::string(SHOAL_BINARY) + TrainArgs(5) +
                               " --coordinator " + where + " --coordinator-token-file " +
                               (tmp_ / "wrong-token"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "coordinator " + where)) << r.output;
  EXPECT_TRUE(Contains(r.output, "--coordinator-token-file")) << r.output;
  // Refused at the door: nobody joined, and the coordinator counted the refusal.
  const v1::ClusterStatus status = server->core().Status();
  EXPECT_EQ(status.workers_size(), 0);
  EXPECT_GT(status.counters().rejected_requests_total(), 0);
  // Nothing trained.
  EXPECT_FALSE(Contains(r.output, "step 5/5")) << r.output;
}

TEST_F(CoordinatorTest, DrainedWorkerCheckpointsAndExitsCleanly) {
  auto server = StartServer("s3cret-token");
  ASSERT_NE(server, nullptr);
  const std::string where = "127.0.0.1:" + std::to_string(server->port());
  const int steps = 100000;  // never reached: the drain stops it
  const pid_t pid = Spawn(TrainArgs(steps, " train.log_every=1") + " --coordinator " + where +
                              " --coordinator-token-file " + (tmp_ / "token"),
                          tmp_ / "train.log");
  std::string worker;
  const bool training = WaitUntil(
      [&] {
        const v1::ClusterStatus now = server->core().Status();
        for (const v1::WorkerStatus& w : now.workers()) {
          if (w.last_stats().step() >= 3) {
            worker = w.worker_id();
            return true;
          }
        }
        return false;
      },
      std::chrono::seconds(90));
  ASSERT_TRUE(training) << ReadTextFile(tmp_ / "train.log");
  // Its heartbeats carried the trainer's numbers.
  v1::ClusterStatus status = server->core().Status();
  ASSERT_EQ(status.workers_size(), 1);
  const v1::WorkerStatus& w = status.workers(0);
  EXPECT_EQ(w.worker_id(), "rank0");
  EXPECT_EQ(w.mesh_rank(), 0);
  EXPECT_TRUE(w.assignment().placed());
  EXPECT_EQ(w.assignment().dp(), 1);
  EXPECT_GT(w.last_stats().loss(), 0);
  EXPECT_LT(w.last_stats().loss(), 2 * std::log(256.0));  // below twice the uniform guess
  EXPECT_GT(w.last_stats().tokens_per_s(), 0);
  EXPECT_GT(w.last_stats().step_time_s(), 0);
  // tokens/s is this rank's tokens (4 x 128 per step) over its step time.
  EXPECT_NEAR(w.last_stats().tokens_per_s() * w.last_stats().step_time_s(), 4 * 128, 1e-6 * 512);
  EXPECT_GT(w.last_stats().memory_used().host_bytes(), 0);
  EXPECT_EQ(w.device().kind(), v1::DEVICE_KIND_CPU);
  EXPECT_GT(w.device().fp32_gflops(), 0);
  EXPECT_GT(w.device().rtt_ms(), 0);

  ASSERT_TRUE(server->core().Drain(worker).ok());
  const int code = WaitExit(pid, std::chrono::seconds(60));
  const std::string log = ReadTextFile(tmp_ / "train.log");
  EXPECT_EQ(code, 0) << log;
  EXPECT_TRUE(Contains(log, "drains worker rank0")) << log;
  EXPECT_TRUE(Contains(log, "drained by coordinator " + where)) << log;
  // The stop came with a checkpoint, at a step well before the end.
  const size_t at = log.find("checkpoint: ");
  ASSERT_NE(at, std::string::npos) << log;
  const std::string dir = log.substr(at + 12, log.find('\n', at) - at - 12);
  EXPECT_TRUE(Contains(dir, "step_")) << dir;
  EXPECT_TRUE(testing::ReadTextFile(dir + "/manifest.json").size() > 0) << dir;
  // It said goodbye.
  status = server->core().Status();
  ASSERT_EQ(status.workers_size(), 1);
  EXPECT_EQ(status.workers(0).state(), v1::WORKER_STATE_LEFT);
}

// A worker whose states are paged (4 MB of RAM for tiny's 12.8 MB of states) tells the
// coordinator its chunk manager's plan once the warm-up step has made one: where the states are,
// the predicted peak and step time, the budget.
TEST_F(CoordinatorTest, PagedWorkerReportsItsMemoryPlan) {
  auto server = StartServer("s3cret-token");
  ASSERT_NE(server, nullptr);
  const std::string where = "127.0.0.1:" + std::to_string(server->port());
  const pid_t pid = Spawn(TrainArgs(100000, " train.log_every=1 memory.host_budget=4MB "
                                            "memory.disk_path=" + (tmp_ / "tier")) +
                              " --coordinator " + where + " --coordinator-token-file " +
                              (tmp_ / "token"),
                          tmp_ / "train.log");
  v1::StepStats stats;
  const bool planned = WaitUntil(
      [&] {
        const v1::ClusterStatus now = server->core().Status();  // outlives the loop
        for (const v1::WorkerStatus& w : now.workers()) {
          if (w.last_stats().predicted_step_s() > 0) {
            stats = w.last_stats();
            return true;
          }
        }
        return false;
      },
      std::chrono::seconds(120));
  ASSERT_TRUE(planned) << ReadTextFile(tmp_ / "train.log");
  const v1::MemoryPlan& plan = stats.memory_plan();
  ASSERT_EQ(plan.states_size(), 1);
  EXPECT_EQ(plan.states(0).state(), "paged_states");
  const int64_t state_bytes = plan.peak().disk_bytes();
  // Most of the states are on disk, and RAM and disk together hold them all.
  EXPECT_GT(plan.states(0).bytes().disk_bytes(), state_bytes / 2);
  EXPECT_EQ(plan.states(0).bytes().host_bytes() + plan.states(0).bytes().disk_bytes(), state_bytes);
  EXPECT_EQ(plan.states(0).bytes().disk_bytes(), stats.memory_used().disk_bytes());
  // The chunk budgets fit the 4 MB host budget; the predicted peak adds the memory outside them.
  EXPECT_GT(plan.budget().host_bytes(), 0);
  EXPECT_LE(plan.budget().host_bytes(), 4'000'000);
  EXPECT_GT(plan.peak().host_bytes(), plan.budget().host_bytes());
  EXPECT_LT(stats.predicted_step_s(), 60);
  ASSERT_TRUE(server->core().Drain("rank0").ok());
  EXPECT_EQ(WaitExit(pid, std::chrono::seconds(60)), 0) << ReadTextFile(tmp_ / "train.log");
}

TEST_F(CoordinatorTest, TheSolversPipelineLayoutRuns) {
  // Two ranks whose memory budget cannot hold the model alone: tiny's states (842 k parameters,
  // 16 bytes each: 13.5 MB) and one sequence's activations (5.5 MB) need 19 MB on one device,
  // more than 90 % of 14 MiB of RAM and 1 MiB of disk (14.1 MB). Two stages need at most 12.4 MB
  // each (stage 0: two blocks and the embeddings, two micro-batches in flight). So the layout
  // is a 2-stage pipeline whatever the measured speeds, and the trainers build exactly the
  // stages it assigned. (At 20 MiB one device fit with 0.1 MB on disk, and the measured speeds
  // chose between the layouts.)
  v1::ClusterStatus status;
  const std::string log =
      RunTwoRanks(8,
                  " train.batch_size=2 train.grad_accum=4 train.log_every=1 parallel.pp=2 "
                  "memory.host_budget=14MiB memory.disk_budget=1MiB",
                  "", &status);
  ASSERT_EQ(status.workers_size(), 2) << log;
  std::set<int> stages;
  int blocks = 0;
  for (const v1::WorkerStatus& w : status.workers()) {
    const v1::Assignment& a = w.assignment();
    EXPECT_EQ(a.pp(), 2) << a.DebugString();
    EXPECT_EQ(a.tp(), 1);
    EXPECT_EQ(a.dp(), 1);
    stages.insert(a.stage());
    blocks += a.end_layer() - a.first_layer();
    EXPECT_EQ(w.last_stats().step(), 8);
  }
  EXPECT_EQ(stages, (std::set<int>{0, 1}));
  EXPECT_EQ(blocks, 4);  // tiny's 4 blocks, each on one stage
  EXPECT_TRUE(Contains(log, "mesh (tp 1, pp 2, dp 1)")) << log;
  EXPECT_TRUE(Contains(log, "step 8/8")) << log;
}

TEST_F(CoordinatorTest, UnevenReplicasTakeUnevenSharesOfTheSameBatch) {
  // Rank 1 three times slower: the solver gives its replica fewer micro-batches of the job's 16
  // sequences, the trainers follow that plan, and the result is still the step of one process
  // over the same 16 sequences (the sampler numbers the step's micro-batches globally).
  v1::ClusterStatus status;
  const std::string log =
      RunTwoRanks(6, " train.batch_size=4 train.grad_accum=2 train.log_every=1",
                  " --throttle 3 --throttle-rank 1", &status);
  ASSERT_EQ(status.workers_size(), 2) << log;
  int size = 0, total = 0, fast = 0, slow = 0;
  for (const v1::WorkerStatus& w : status.workers()) {
    const v1::Assignment& a = w.assignment();
    size = a.micro_batch_size();
    total += a.micro_batches();
    (w.worker_id() == "rank1" ? slow : fast) = a.micro_batches();
  }
  EXPECT_EQ(size * total, 16) << log;  // the job's global batch: 4 x 2 per rank x 2 ranks
  EXPECT_GT(fast, slow) << log;
  EXPECT_TRUE(Contains(log, "batch plan from the layout")) << log;
  // The reference: one process, the same micro-batches in one step.
  CommandResult ref = RunCommand(
      "timeout -k 5 120 " + std::string(SHOAL_BINARY) +
      TrainArgs(6, " train.log_every=1 train.out_dir=" + (tmp_ / "ref") + " train.batch_size=" +
                       std::to_string(size) + " train.grad_accum=" + std::to_string(total)));
  ASSERT_EQ(ref.exit_code, 0) << ref.output;
  const std::vector<double> got = testing::StepLosses(tmp_ / "run/metrics.jsonl");
  const std::vector<double> want = testing::StepLosses(tmp_ / "ref/metrics.jsonl");
  ASSERT_EQ(got.size(), 6u) << log;
  ASSERT_EQ(want.size(), 6u) << ref.output;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << "step " << i + 1;
  }
}

TEST_F(CoordinatorTest, AJobNoLayoutHoldsFailsAtOnceWithTheSolversReason) {
  // 4 MB of host RAM per rank (3.6 MB usable) cannot hold tiny's activations even for one
  // sequence (4 blocks x 128 tokens x (64 C + 4 H T + 16) bytes = 5.3 MB, plus its logits),
  // which do not spill to disk: the solve fails, and both ranks say why well before the
  // 60-second wait for a first layout would run out.
  auto server = StartServer("s3cret-token");
  ASSERT_NE(server, nullptr);
  const std::string where = "127.0.0.1:" + std::to_string(server->port());
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = Spawn("run --standalone --nproc-per-node 2 --" +
                              TrainArgs(4, " memory.host_budget=4MB") + " --coordinator " + where +
                              " --coordinator-token-file " + (tmp_ / "token"),
                          tmp_ / "train.log");
  const int code = WaitExit(pid, std::chrono::seconds(110));
  const std::string log = ReadTextFile(tmp_ / "train.log");
  EXPECT_NE(code, 0) << log;
  EXPECT_TRUE(Contains(log, "the coordinator cannot lay this job out on its 2 workers")) << log;
  EXPECT_TRUE(Contains(log, "no arrangement")) << log;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(50)) << log;
}

TEST_F(CoordinatorTest, RanksJoinAgainWhenTheCoordinatorRestarts) {
  auto server = StartServer("s3cret-token");
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  const std::string where = "127.0.0.1:" + std::to_string(port);
  const pid_t pid = Spawn(TrainArgs(100000, " train.log_every=1") + " --coordinator " + where +
                              " --coordinator-token-file " + (tmp_ / "token"),
                          tmp_ / "train.log");
  auto training_on = [&](scheduler::CoordinatorServer* s) {
    const v1::ClusterStatus status = s->core().Status();
    for (const v1::WorkerStatus& w : status.workers()) {
      if (w.worker_id() == "rank0" && w.state() == v1::WORKER_STATE_ALIVE &&
          w.last_stats().step() >= 2) {
        return true;
      }
    }
    return false;
  };
  ASSERT_TRUE(WaitUntil([&] { return training_on(server.get()); }, std::chrono::seconds(90)))
      << ReadTextFile(tmp_ / "train.log");
  // The coordinator goes away (its state with it) and a new one comes up on the same port.
  server.reset();
  scheduler::CoordinatorServerOptions o;
  o.listen = where;
  o.token = "s3cret-token";
  o.core.heartbeat_interval_ms = 200;
  auto again = scheduler::CoordinatorServer::Start(o);
  ASSERT_TRUE(again.ok()) << again.status();
  // The rank joins it again, with its name, and reports steps after the restart.
  EXPECT_TRUE(WaitUntil([&] { return training_on(again->get()); }, std::chrono::seconds(30)))
      << ReadTextFile(tmp_ / "train.log");
  const v1::ClusterStatus status = (*again)->core().Status();
  ASSERT_EQ(status.workers_size(), 1);
  EXPECT_EQ(status.workers(0).worker_id(), "rank0");
  EXPECT_EQ(status.workers(0).mesh_rank(), 0);
  EXPECT_GE(status.layout().version(), 1u);
  ::kill(-pid, SIGTERM);
  ::kill(pid, SIGTERM);
  EXPECT_NE(WaitExit(pid, std::chrono::seconds(60)), -1);
  EXPECT_TRUE(Contains(ReadTextFile(tmp_ / "train.log"), "joined again"))
      << ReadTextFile(tmp_ / "train.log");
}

TEST_F(CoordinatorTest, UnreachableCoordinatorFailsWithinTheTimeout) {
  const std::string where = "127.0.0.1:" + std::to_string(testing::FreePort());
  const auto t0 = Clock::now();
  CommandResult r = RunCommand("timeout -k 5 60 " + std::string(SHOAL_BINARY) + TrainArgs(5) +
                               " --coordinator " + where + " --coordinator-timeout 2");
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 1) << r.output;  // not 124: it ended by itself
  EXPECT_TRUE(Contains(r.output, "coordinator " + where + " unreachable for 2s")) << r.output;
  EXPECT_FALSE(Contains(r.output, "step 5/5")) << r.output;
  std::printf("unreachable coordinator: failed after %.1f s (timeout 2 s)\n", seconds);
}

TEST_F(CoordinatorTest, TlsWithTheCoordinatorsCa) {
  // A self-signed certificate for 127.0.0.1 (an IP SAN: gRPC checks the name against it).
  CommandResult cert = RunCommand(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext "
      "subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout " + (tmp_ / "server.key") + " -out " +
      (tmp_ / "server.crt"));
  ASSERT_EQ(cert.exit_code, 0) << cert.output;
  scheduler::CoordinatorServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = "s3cret-token";
  o.tls_cert_file = tmp_ / "server.crt";
  o.tls_key_file = tmp_ / "server.key";
  auto server = scheduler::CoordinatorServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string where = "127.0.0.1:" + std::to_string((*server)->port());
  const std::string train = "timeout -k 5 60 " + std::string(SHOAL_BINARY) + TrainArgs(2) +
                            " --coordinator " + where + " --coordinator-token-file " +
                            (tmp_ / "token");
  CommandResult r = RunCommand(train + " --coordinator-ca " + (tmp_ / "server.crt"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const v1::ClusterStatus status = (*server)->core().Status();
  ASSERT_EQ(status.workers_size(), 1);
  EXPECT_EQ(status.workers(0).last_stats().step(), 2);
  // Plaintext against the TLS port never gets through: it fails when the timeout runs out.
  r = RunCommand(train + " --coordinator-timeout 2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(Contains(r.output, "coordinator " + where + " unreachable")) << r.output;
}

TEST_F(CoordinatorTest, BadFlagsAreNamed) {
  const std::string shoal = "timeout -k 5 60 " + std::string(SHOAL_BINARY);
  CommandResult r = RunCommand(shoal + TrainArgs(5) + " --throttle 0.5");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "--throttle must be a finite number >= 1")) << r.output;
  r = RunCommand(shoal + TrainArgs(5) + " --coordinator-token-file " + (tmp_ / "token"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "need --coordinator")) << r.output;
  r = RunCommand(shoal + TrainArgs(5) + " --coordinator 127.0.0.1:1 --coordinator-token-file " +
                 (tmp_ / "missing-token"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(Contains(r.output, tmp_ / "missing-token")) << r.output;
  r = RunCommand(shoal + TrainArgs(5) + " --coordinator nohostport");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "--coordinator must be HOST:PORT")) << r.output;
}

TEST_F(CoordinatorTest, ThrottleWorksWithoutACoordinator) {
  CommandResult r = RunCommand("timeout -k 5 60 " + std::string(SHOAL_BINARY) + TrainArgs(3) +
                               " --throttle 2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "throttle: rank 0 sleeps 1 x its compute time")) << r.output;
}

// What a mesh rank sends and accepts (pure functions of the link).
TEST(WorkerLinkTest, JobSpecAndAssignmentChecks) {
  runtime::Config c;
  c.source = "/some/where/configs/small.toml";
  c.model.n_layer = 6;
  c.model.n_head = 4;
  c.model.n_embd = 256;
  c.model.block_size = 64;
  c.model.vocab_size = 512;
  c.train.batch_size = 8;
  c.train.grad_accum = 3;
  const v1::JobSpec job = launch::JobSpecFor(c, 4);
  EXPECT_EQ(job.name(), "small");
  EXPECT_EQ(job.model().n_layer(), 6);
  EXPECT_EQ(job.model().n_head(), 4);
  EXPECT_EQ(job.model().n_embd(), 256);
  EXPECT_EQ(job.model().block_size(), 64);
  EXPECT_EQ(job.model().vocab_size(), 512);
  EXPECT_EQ(job.model().param_bytes() + job.model().grad_bytes() + job.model().optimizer_bytes(),
            16);  // fp32 AdamW
  EXPECT_EQ(job.global_batch(), 8 * 3 * 4);
  EXPECT_EQ(job.expected_workers(), 4);
  EXPECT_EQ(job.max_tp(), 1);
  EXPECT_EQ(job.max_pp(), 1);
  EXPECT_TRUE(scheduler::ValidateJobSpec(job).ok());

  v1::Assignment a;
  a.set_version(1);
  a.set_placed(true);
  a.set_tp(1);
  a.set_pp(1);
  a.set_dp(4);
  a.set_micro_batch_size(4);
  a.set_micro_batches(2);
  a.set_first_layer(0);
  a.set_end_layer(12);
  EXPECT_TRUE(launch::CheckAssignment(a, 4, 12).ok());
  a.set_micro_batches(0);  // a replica with no share of the batch
  EXPECT_EQ(launch::CheckAssignment(a, 4, 12).code(), absl::StatusCode::kFailedPrecondition);
  a.set_micro_batches(2);
  a.set_pp(2);  // a pipeline of 2 stages, 2 replicas: 4 ranks
  a.set_dp(2);
  a.set_stage(1);
  a.set_replica(1);
  a.set_first_layer(6);
  EXPECT_TRUE(launch::CheckAssignment(a, 4, 12).ok());
  a.set_end_layer(11);  // the last stage must end at the model's last block
  EXPECT_EQ(launch::CheckAssignment(a, 4, 12).code(), absl::StatusCode::kFailedPrecondition);
  a.set_end_layer(12);
  a.set_stage(2);  // no such stage
  absl::Status s = launch::CheckAssignment(a, 4, 12);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(std::string(s.message()), "outside the mesh")) << s;
  a.set_stage(0);
  a.set_first_layer(0);
  // parallel.tp / pp are the solver's bounds.
  c.parallel.tp = 2;
  c.parallel.pp = 3;
  EXPECT_EQ(launch::JobSpecFor(c, 4).max_tp(), 2);
  EXPECT_EQ(launch::JobSpecFor(c, 4).max_pp(), 3);
  a.set_pp(1);
  a.set_dp(3);  // 3 of 4 ranks placed
  s = launch::CheckAssignment(a, 4, 12);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(std::string(s.message()), "needs 3 ranks; the job has 4")) << s;
  a.set_placed(false);
  a.set_reason("not enough memory");
  s = launch::CheckAssignment(a, 4, 12);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(std::string(s.message()), "not enough memory")) << s;
}

// ---------------------------------------------------------------------------------------------
// The whole thing through the CLIs

// One `shoal coordinator` outlives its jobs: a job, then another with a different model, then
// that one again, each `shoal run` of two ranks to the end, each with a layout of its own.
TEST_F(CoordinatorTest, JobsOneAfterAnotherUnderOneCoordinator) {
  const std::string port_file = tmp_ / "ports";
  const pid_t coordinator = testing::SpawnLogged(
      {"/usr/bin/timeout", "-k", "5", "240", SHOAL_BINARY, "coordinator", "--listen",
       "127.0.0.1:0", "--port-file", port_file, "--token-file", tmp_ / "token"},
      tmp_ / "coordinator.log");
  ASSERT_GT(coordinator, 0);
  struct Stop {
    pid_t pid;
    ~Stop() { testing::TerminateProcess(pid, std::chrono::seconds(10)); }
  } stop_coordinator{coordinator};
  int port = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        const nlohmann::json ports =
            nlohmann::json::parse(ReadTextFile(port_file), nullptr, /*allow_exceptions=*/false);
        port = ports.is_object() ? static_cast<int>(Number(Field(ports, "grpc"))) : 0;
        return port > 0;
      },
      std::chrono::seconds(30)))
      << ReadTextFile(tmp_ / "coordinator.log");
  const std::string where = "127.0.0.1:" + std::to_string(port);
  const std::string status_cmd = "timeout -k 5 30 " + std::string(SHOAL_BINARY) +
                                 " status --coordinator " + where + " --token-file " +
                                 (tmp_ / "token") + " --json";

  // Runs two ranks of tiny with `sets` for 3 steps; returns the coordinator's status after.
  auto run_job = [&](const std::string& name, const std::string& sets) {
    const std::string log = tmp_ / (name + ".log");
    const pid_t pid = Spawn("run --standalone --nproc-per-node 2 --" +
                                TrainArgs(3, " train.log_every=1 train.out_dir=" +
                                                 (tmp_ / name) + sets) +
                                " --coordinator " + where + " --coordinator-token-file " +
                                (tmp_ / "token"),
                            log, 100);
    const int code = WaitExit(pid, std::chrono::seconds(110));
    EXPECT_EQ(code, 0) << name << ":\n"
                       << ReadTextFile(log) << "\ncoordinator:\n"
                       << ReadTextFile(tmp_ / "coordinator.log");
    EXPECT_TRUE(Contains(ReadTextFile(log), "step 3/3")) << ReadTextFile(log);
    CommandResult r = RunCommand(status_cmd);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return LastJsonLine(r.output);
  };
  // The layout's version, the blocks the job's model has, and whether both ranks of this job
  // (the only workers listed: each run's rank<N> replaces the last one's) were placed in that
  // layout, ran the 3 steps and left.
  auto check = [&](const nlohmann::json& status, int version, int n_layer) {
    EXPECT_EQ(Number(Field(Field(status, "layout"), "version")), version) << status.dump();
    EXPECT_EQ(Number(Field(Field(Field(status, "job"), "model"), "n_layer")), n_layer)
        << status.dump();
    std::set<std::string> ids;
    for (const auto& w : Field(status, "workers")) {
      ids.insert(Field(w, "worker_id").get<std::string>());
      const auto& a = Field(w, "assignment");
      EXPECT_EQ(Number(Field(a, "version")), version) << w.dump();
      EXPECT_EQ(Number(Field(a, "dp")), 2) << w.dump();
      EXPECT_EQ(Number(Field(Field(w, "last_stats"), "step")), 3) << w.dump();
      const auto& state = Field(w, "state");
      EXPECT_TRUE(state == "WORKER_STATE_LEFT" || Number(state) == v1::WORKER_STATE_LEFT)
          << w.dump();
    }
    EXPECT_EQ(ids, (std::set<std::string>{"rank0", "rank1"})) << status.dump();
  };
  check(run_job("first", ""), 1, 4);
  check(run_job("second", " model.n_layer=2"), 2, 2);  // another job: another model
  check(run_job("again", " model.n_layer=2"), 3, 2);   // the same job restarted
}

TEST_F(CoordinatorTest, EndToEndTwoRanksStatusPrometheusDashboard) {
  // 1. The coordinator, ports picked by the kernel and written to a file.
  const std::string port_file = tmp_ / "ports";
  const pid_t coordinator =
      testing::SpawnLogged({"/usr/bin/timeout", "-k", "5", "240", SHOAL_BINARY, "coordinator",
                            "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--port-file",
                            port_file, "--token-file", tmp_ / "token", "--lease-s", "60",
                            "--heartbeat-s", "0.5"},
                           tmp_ / "coordinator.log");
  ASSERT_GT(coordinator, 0);
  struct Stop {
    pid_t pid;
    ~Stop() { testing::TerminateProcess(pid, std::chrono::seconds(10)); }
  } stop_coordinator{coordinator};
  int grpc_port = 0, http_port = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        const nlohmann::json ports =
            nlohmann::json::parse(ReadTextFile(port_file), nullptr, /*allow_exceptions=*/false);
        if (!ports.is_object()) return false;
        grpc_port = static_cast<int>(Number(Field(ports, "grpc")));
        http_port = static_cast<int>(Number(Field(ports, "http")));
        return grpc_port > 0 && http_port > 0;
      },
      std::chrono::seconds(30)))
      << ReadTextFile(port_file) << ReadTextFile(tmp_ / "coordinator.log");
  const std::string where = "127.0.0.1:" + std::to_string(grpc_port);

  // 2. Two ranks, joined to it.
  const pid_t run =
      Spawn("run --standalone --nproc-per-node 2 --" + TrainArgs(80) + " --coordinator " +
                where + " --coordinator-token-file " + (tmp_ / "token"),
            tmp_ / "run.log", 180);
  const std::string status_cmd = "timeout -k 5 30 " + std::string(SHOAL_BINARY) +
                                 " status --coordinator " + where + " --token-file " +
                                 (tmp_ / "token") + " --json";

  // 3. `shoal status --json`: both ranks placed, stepping, and the job's loss.
  nlohmann::json status;
  const bool stepping = WaitUntil(
      [&] {
        CommandResult r = RunCommand(status_cmd);
        if (r.exit_code != 0) return false;
        status = LastJsonLine(r.output);
        int moving = 0;
        for (const auto& w : Field(status, "workers")) {
          if (Number(Field(Field(w, "last_stats"), "step")) > 0) ++moving;
        }
        return moving == 2 && Number(Field(Field(status, "job_status"), "step")) > 0;
      },
      std::chrono::seconds(120));
  ASSERT_TRUE(stepping) << status.dump() << "\n" << ReadTextFile(tmp_ / "run.log");
  std::set<std::string> ids;
  for (const auto& w : Field(status, "workers")) {
    ids.insert(Field(w, "worker_id").get<std::string>());
    const auto& a = Field(w, "assignment");
    EXPECT_TRUE(Field(a, "placed").get<bool>()) << w.dump();
    EXPECT_EQ(Number(Field(a, "dp")), 2) << w.dump();
    EXPECT_GE(Number(Field(a, "version")), 1) << w.dump();
    EXPECT_GT(Number(Field(Field(w, "device"), "fp32_gflops")), 0) << w.dump();
  }
  EXPECT_EQ(ids, (std::set<std::string>{"rank0", "rank1"})) << status.dump();
  const double loss = Number(Field(Field(status, "job_status"), "loss"));
  EXPECT_GT(loss, 0) << status.dump();
  EXPECT_LT(loss, 2 * std::log(256.0)) << status.dump();
  // Every point of the loss history comes from a real step (a cross-entropy is > 0).
  for (const auto& p : Field(Field(status, "job_status"), "history")) {
    EXPECT_GT(Number(Field(p, "step")), 0) << p.dump();
    EXPECT_GT(Number(Field(p, "loss")), 0) << p.dump();
  }
  EXPECT_EQ(Field(Field(status, "job"), "name").get<std::string>(), "tiny");
  EXPECT_EQ(Number(Field(Field(status, "layout"), "dp")), 2) << status.dump();

  // 4. The HTTP status says the same.
  testing::HttpResponse http = testing::HttpGet("127.0.0.1", http_port, "/api/status");
  ASSERT_EQ(http.status, 200) << http.error;
  const nlohmann::json api = nlohmann::json::parse(http.body, nullptr, false);
  ASSERT_TRUE(api.is_object()) << http.body;
  std::set<std::string> api_ids;
  for (const auto& w : Field(api, "workers")) api_ids.insert(Field(w, "worker_id").get<std::string>());
  EXPECT_EQ(api_ids, ids);
  EXPECT_GE(Number(Field(Field(api, "job_status"), "step")),
            Number(Field(Field(status, "job_status"), "step")));

  // 5. A real Prometheus scrapes /metrics.
  std::string error;
  auto prometheus = testing::PrometheusServer::Start({"127.0.0.1:" + std::to_string(http_port)},
                                                     "shoal", &error);
  ASSERT_NE(prometheus, nullptr) << error;
  auto query = [&](const std::string& promql) {
    nlohmann::json result;
    WaitUntil(
        [&] {
          testing::HttpResponse q = prometheus->Query(promql);
          if (q.status != 200) return false;
          result = nlohmann::json::parse(q.body, nullptr, false);
          return result.is_object() && result["status"] == "success" &&
                 !result["data"]["result"].empty();
        },
        std::chrono::seconds(30));
    return result;
  };
  nlohmann::json step = query("shoal_job_step");
  ASSERT_FALSE(step["data"]["result"].empty()) << step.dump() << prometheus->log();
  EXPECT_GT(std::stod(step["data"]["result"][0]["value"][1].get<std::string>()), 0);
  nlohmann::json workers = query("sum(shoal_workers)");
  ASSERT_FALSE(workers["data"]["result"].empty()) << workers.dump();
  EXPECT_GE(std::stod(workers["data"]["result"][0]["value"][1].get<std::string>()), 2);

  // 6. The dashboard, rendered by a real browser, shows both workers; the screenshot is kept.
  testing::HeadlessChromium chromium;
  const std::string url = "http://127.0.0.1:" + std::to_string(http_port) + "/";
  testing::BrowserResult dom = chromium.DumpDom(url);
  ASSERT_EQ(dom.exit_code, 0) << dom.log;
  EXPECT_TRUE(Contains(dom.output, "rank0")) << dom.output.substr(0, 2000);
  EXPECT_TRUE(Contains(dom.output, "rank1")) << dom.output.substr(0, 2000);
  const std::string png = testing::ArtifactDir() + "/dashboard-e2e.png";
  testing::BrowserResult shot = chromium.Screenshot(url, png);
  EXPECT_EQ(shot.exit_code, 0) << shot.log;
  EXPECT_GT(ReadTextFile(png).size(), 1000u) << png;

  // 7. The run ends by itself, both ranks leave.
  const int code = WaitExit(run, std::chrono::seconds(150));
  ASSERT_EQ(code, 0) << ReadTextFile(tmp_ / "run.log");
  CommandResult after = RunCommand(status_cmd);
  ASSERT_EQ(after.exit_code, 0) << after.output;
  const nlohmann::json final_status = LastJsonLine(after.output);
  for (const auto& w : Field(final_status, "workers")) {
    const auto& state = Field(w, "state");
    EXPECT_TRUE(state == "WORKER_STATE_LEFT" || Number(state) == v1::WORKER_STATE_LEFT)
        << w.dump();
    EXPECT_EQ(Number(Field(Field(w, "last_stats"), "step")), 80) << w.dump();
  }
}

}  // namespace
}  // namespace shoal
