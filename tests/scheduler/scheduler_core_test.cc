// CoordinatorCore on a manual clock: membership (ids, name collisions, rejoin), leases and their
// expiry, leave and drain, layout versions, WaitAssignment wake-ups, health, the job statistics
// aggregated from heartbeats (checked against values computed here from the assignments), the
// bounded history, the job-spec check, the rebalancer's effect on a straggler, and jobs that
// follow one another under one coordinator (a new spec, a new layout, no stragglers mixed in).
#include "scheduler/coordinator_core.h"

#include <gtest/gtest.h>

#include <sstream>

#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "scheduler/status_table.h"
#include "tests/scheduler/test_job.h"

namespace shoal::scheduler {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

v1::DeviceProfile Cpu(const std::string& host, double gflops = 200) {
  v1::DeviceProfile p;
  p.set_host(host);
  p.set_kind(v1::DEVICE_KIND_CPU);
  p.set_device_name("test CPU (8 cores)");
  p.mutable_memory()->set_host_bytes(static_cast<int64_t>(16 * kGiB));
  p.mutable_memory()->set_disk_bytes(static_cast<int64_t>(100 * kGiB));
  p.set_fp32_gflops(gflops);
  p.set_host_copy_gbps(10);
  p.set_net_gbps(1);
  p.set_cores(8);
  p.set_throttle(1);
  return p;
}

v1::JobSpec Job(int expected_workers, int n_layer = 4) {
  return ::shoal::testing::SmallJob("core-test", expected_workers, n_layer);
}

v1::JoinRequest JoinReq(const v1::JobSpec& job, const std::string& name = "", int mesh_rank = -1,
                        const v1::DeviceProfile& device = Cpu("host-a")) {
  v1::JoinRequest r;
  r.set_protocol_version(kProtocolVersion);
  *r.mutable_device() = device;
  *r.mutable_job() = job;
  r.set_mesh_rank(mesh_rank);
  r.set_name(name);
  return r;
}

v1::HeartbeatRequest Beat(const std::string& id, int64_t step = 0, double loss = 0,
                          double tokens_per_s = 0, double step_time_s = 0) {
  v1::HeartbeatRequest r;
  r.set_worker_id(id);
  r.mutable_stats()->set_step(step);
  r.mutable_stats()->set_loss(loss);
  r.mutable_stats()->set_tokens_per_s(tokens_per_s);
  r.mutable_stats()->set_step_time_s(step_time_s);
  return r;
}

class CoreTest : public ::testing::Test {
 protected:
  CoreTest() : clock_(1'700'000'000'000) {
    options_.lease_ms = 1000;
    options_.heartbeat_interval_ms = 250;
  }
  CoordinatorCore& core() {
    if (!core_) core_ = std::make_unique<CoordinatorCore>(options_, &clock_);
    return *core_;
  }
  std::string MustJoin(const v1::JoinRequest& r) {
    auto j = core().Join(r);
    EXPECT_TRUE(j.ok()) << j.status();
    return j.ok() ? j->worker_id() : "";
  }
  const v1::WorkerStatus* Find(const v1::ClusterStatus& s, const std::string& id) {
    for (const auto& w : s.workers()) {
      if (w.worker_id() == id) return &w;
    }
    return nullptr;
  }

  ManualClock clock_;
  CoordinatorOptions options_;
  std::unique_ptr<CoordinatorCore> core_;
};

TEST_F(CoreTest, IdsComeFromNameThenMeshRankThenASequence) {
  const v1::JobSpec job = Job(0);
  auto a = core().Join(JoinReq(job, "alpha"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->worker_id(), "alpha");
  EXPECT_EQ(a->lease_ms(), 1000);
  EXPECT_EQ(a->heartbeat_interval_ms(), 250);
  EXPECT_EQ(MustJoin(JoinReq(job, "", 3)), "rank3");
  EXPECT_EQ(MustJoin(JoinReq(job)), "w0");
  EXPECT_EQ(MustJoin(JoinReq(job)), "w1");
  EXPECT_EQ(core().Status().counters().joins_total(), 4);
}

TEST_F(CoreTest, AnonymousIdsSkipNamesAlreadyTaken) {
  const v1::JobSpec job = Job(0);
  MustJoin(JoinReq(job, "w0"));
  EXPECT_EQ(MustJoin(JoinReq(job)), "w1");
}

TEST_F(CoreTest, WrongProtocolVersionNamesBoth) {
  v1::JoinRequest r = JoinReq(Job(0));
  r.set_protocol_version(kProtocolVersion + 1);
  auto j = core().Join(r);
  ASSERT_EQ(j.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(j.status().message().find(absl::StrCat(kProtocolVersion + 1)), std::string::npos);
  EXPECT_NE(j.status().message().find(absl::StrCat("version ", kProtocolVersion)),
            std::string::npos)
      << j.status();
}

TEST_F(CoreTest, LaterJoinsMustMatchTheFirstJobSpec) {
  MustJoin(JoinReq(Job(0, 4)));
  auto j = core().Join(JoinReq(Job(0, 6)));
  ASSERT_EQ(j.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(j.status().message().find("job.model.n_layer"), std::string::npos) << j.status();
  v1::JobSpec other = Job(0, 4);
  other.set_global_batch(32);
  j = core().Join(JoinReq(other));
  ASSERT_EQ(j.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(j.status().message().find("job.global_batch"), std::string::npos) << j.status();
  // The job keeps the first spec.
  EXPECT_EQ(core().Status().job().model().n_layer(), 4);
  EXPECT_EQ(core().Status().counters().rejected_requests_total(), 2);
}

TEST_F(CoreTest, InvalidJoinIsRefusedAndCounted) {
  v1::JoinRequest r = JoinReq(Job(0));
  r.mutable_device()->mutable_memory()->set_host_bytes(-1);
  auto j = core().Join(r);
  ASSERT_EQ(j.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(j.status().message().find("device.memory.host_bytes"), std::string::npos);
  EXPECT_EQ(core().Status().counters().rejected_requests_total(), 1);
  EXPECT_EQ(core().Status().workers_size(), 0);
}

TEST_F(CoreTest, LiveNameCollidesButADeadOneIsReplaced) {
  const v1::JobSpec job = Job(0);
  MustJoin(JoinReq(job, "alpha"));
  auto again = core().Join(JoinReq(job, "alpha"));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  clock_.AdvanceMs(1001);
  EXPECT_EQ(core().ExpireLeases(), 1);
  auto replaced = core().Join(JoinReq(job, "alpha"));
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  const v1::ClusterStatus s = core().Status();
  ASSERT_EQ(s.workers_size(), 1);
  EXPECT_EQ(s.workers(0).state(), v1::WORKER_STATE_ALIVE);
  EXPECT_EQ(s.workers(0).joined_unix_ms(), clock_.NowUnixMs());
}

TEST_F(CoreTest, SameMeshRankReplacesTheWorkerAndResolves) {
  const v1::JobSpec job = Job(2);
  MustJoin(JoinReq(job, "", 0, Cpu("h0")));
  MustJoin(JoinReq(job, "", 1, Cpu("h1")));
  const uint64_t v = core().Status().layout().version();
  ASSERT_EQ(v, 1u);
  // The launcher restarted rank 1 before its old lease ran out.
  EXPECT_EQ(MustJoin(JoinReq(job, "", 1, Cpu("h1-new"))), "rank1");
  const v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.workers_size(), 2);
  EXPECT_EQ(Find(s, "rank1")->device().host(), "h1-new");
  EXPECT_EQ(s.layout().version(), v + 1);
}

TEST_F(CoreTest, LeaseKeepsAWorkerAliveUntilItRunsOut) {
  const std::string id = MustJoin(JoinReq(Job(0)));
  for (int i = 0; i < 5; ++i) {
    clock_.AdvanceMs(999);
    EXPECT_EQ(core().ExpireLeases(), 0);
    auto hb = core().Heartbeat(Beat(id));
    ASSERT_TRUE(hb.ok()) << hb.status();
    EXPECT_EQ(hb->lease_ms(), 1000);
  }
  clock_.AdvanceMs(1001);
  EXPECT_EQ(core().ExpireLeases(), 1);
  const v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.workers(0).state(), v1::WORKER_STATE_DEAD);
  EXPECT_EQ(s.counters().expirations_total(), 1);
  EXPECT_EQ(s.counters().heartbeats_total(), 5);
  auto late = core().Heartbeat(Beat(id));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(late.status().message().find("join again"), std::string::npos);
}

TEST_F(CoreTest, HeartbeatAfterTheLeaseIsRefusedEvenBeforeTheSweep) {
  const std::string id = MustJoin(JoinReq(Job(0)));
  clock_.AdvanceMs(1500);
  EXPECT_EQ(core().Heartbeat(Beat(id)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core().Status().workers(0).state(), v1::WORKER_STATE_DEAD);
  EXPECT_EQ(core().ExpireLeases(), 0);  // already counted
  EXPECT_EQ(core().Status().counters().expirations_total(), 1);
}

TEST_F(CoreTest, HeartbeatFromUnknownIdIsNotFound) {
  EXPECT_EQ(core().Heartbeat(Beat("nobody")).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(core().Heartbeat(Beat("bad id!")).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CoreTest, LayoutWaitsForExpectedWorkersThenVersionsIncreaseByOne) {
  const v1::JobSpec job = Job(2);
  const std::string a = MustJoin(JoinReq(job, "a", -1, Cpu("h0")));
  v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.health(), "waiting");
  EXPECT_EQ(s.layout().version(), 0u);
  EXPECT_EQ(Find(s, "a")->assignment().version(), 0u);
  EXPECT_FALSE(Find(s, "a")->assignment().placed());

  MustJoin(JoinReq(job, "b", -1, Cpu("h1")));
  s = core().Status();
  ASSERT_EQ(s.layout().version(), 1u) << s.layout_error();
  EXPECT_EQ(s.health(), "healthy");
  EXPECT_EQ(s.counters().layouts_total(), 1);
  // Every assignment agrees with the layout: placed exactly when it has a placement, with the
  // stage's layer range, and each replica's stages cover the blocks once.
  std::set<std::string> placed_ids;
  for (const auto& p : s.layout().placements()) placed_ids.insert(p.worker_id());
  std::map<int, std::vector<std::pair<int, int>>> ranges;
  for (const auto& w : s.workers()) {
    const v1::Assignment& asg = w.assignment();
    EXPECT_EQ(asg.version(), 1u);
    EXPECT_EQ(asg.placed(), placed_ids.count(w.worker_id()) == 1) << w.worker_id();
    if (!asg.placed()) continue;
    EXPECT_EQ(asg.tp(), s.layout().tp());
    EXPECT_EQ(asg.pp(), s.layout().pp());
    EXPECT_EQ(asg.dp(), s.layout().dp());
    EXPECT_GT(asg.micro_batches(), 0);
    if (asg.tp_rank() == 0) ranges[asg.replica()].push_back({asg.first_layer(), asg.end_layer()});
  }
  for (auto& [replica, r] : ranges) {
    std::sort(r.begin(), r.end());
    int next = 0;
    for (auto [first, end] : r) {
      EXPECT_EQ(first, next);
      next = end;
    }
    EXPECT_EQ(next, job.model().n_layer());
  }

  // Each membership change: exactly one more version.
  MustJoin(JoinReq(job, "c", -1, Cpu("h2")));
  EXPECT_EQ(core().Status().layout().version(), 2u);
  ASSERT_TRUE(core().Leave([] {
                      v1::LeaveRequest r;
                      r.set_worker_id("c");
                      r.set_reason("done");
                      return r;
                    }()).ok());
  s = core().Status();
  EXPECT_EQ(s.layout().version(), 3u);
  EXPECT_EQ(Find(s, "c")->state(), v1::WORKER_STATE_LEFT);
  EXPECT_FALSE(Find(s, "c")->assignment().placed());
  EXPECT_EQ(s.counters().leaves_total(), 1);
  EXPECT_EQ(core().Heartbeat(Beat("c")).status().code(), absl::StatusCode::kFailedPrecondition);
  // Leaving twice is not an error; an unknown id is.
  v1::LeaveRequest again;
  again.set_worker_id("c");
  EXPECT_TRUE(core().Leave(again).ok());
  again.set_worker_id("zz");
  EXPECT_EQ(core().Leave(again).code(), absl::StatusCode::kNotFound);
  (void)a;
}

TEST_F(CoreTest, HealthIsDegradedWhenAPlacedWorkerDies) {
  const v1::JobSpec job = Job(2);
  MustJoin(JoinReq(job, "a", -1, Cpu("h0")));
  MustJoin(JoinReq(job, "b", -1, Cpu("h1")));
  ASSERT_EQ(core().Status().health(), "healthy");
  clock_.AdvanceMs(600);
  ASSERT_TRUE(core().Heartbeat(Beat("a")).ok());
  clock_.AdvanceMs(600);
  EXPECT_EQ(core().ExpireLeases(), 1);  // b
  const v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.health(), "degraded");
  // Fewer than expected: no new solve, the layout still names b.
  EXPECT_EQ(s.layout().version(), 1u);
}

TEST_F(CoreTest, DrainMarksTheWorkerAndSolvesWithoutIt) {
  const v1::JobSpec job = Job(0);
  MustJoin(JoinReq(job, "a", -1, Cpu("h0")));
  MustJoin(JoinReq(job, "b", -1, Cpu("h1")));
  const uint64_t v = core().Status().layout().version();
  auto layout = core().Drain("b");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->version(), v + 1);
  for (const auto& p : layout->placements()) EXPECT_NE(p.worker_id(), "b");
  const v1::ClusterStatus s = core().Status();
  EXPECT_EQ(Find(s, "b")->state(), v1::WORKER_STATE_DRAINING);
  EXPECT_TRUE(Find(s, "b")->assignment().drain());
  EXPECT_FALSE(Find(s, "b")->assignment().placed());
  EXPECT_FALSE(Find(s, "a")->assignment().drain());
  auto hb = core().Heartbeat(Beat("b"));
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->drain());
  EXPECT_FALSE(core().Heartbeat(Beat("a"))->drain());
  EXPECT_EQ(core().Drain("nobody").status().code(), absl::StatusCode::kNotFound);
  v1::LeaveRequest leave;
  leave.set_worker_id("b");
  ASSERT_TRUE(core().Leave(leave).ok());
  EXPECT_EQ(core().Drain("b").status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoreTest, WaitAssignmentWakesOnANewLayout) {
  const v1::JobSpec job = Job(2);
  MustJoin(JoinReq(job, "a", -1, Cpu("h0")));
  // Nothing changes: the wait times out and answers with the same version.
  auto same = core().WaitAssignment("a", 0, absl::Milliseconds(20));
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->version(), 0u);
  // A different known version answers at once.
  auto now = core().WaitAssignment("a", 7, absl::Hours(1));
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(now->version(), 0u);

  // Woken by the second join (an hour-long timeout: if the wake-up were lost the test would
  // hang and ctest would fail it).
  absl::StatusOr<v1::Assignment> woken;
  std::thread waiter([&] { woken = core().WaitAssignment("a", 0, absl::Hours(1)); });
  MustJoin(JoinReq(job, "b", -1, Cpu("h1")));
  waiter.join();
  ASSERT_TRUE(woken.ok()) << woken.status();
  EXPECT_EQ(woken->version(), 1u);

  // A worker that leaves ends its wait with kFailedPrecondition.
  absl::StatusOr<v1::Assignment> ended;
  std::thread leaver([&] { ended = core().WaitAssignment("b", 1, absl::Hours(1)); });
  v1::LeaveRequest leave;
  leave.set_worker_id("b");
  ASSERT_TRUE(core().Leave(leave).ok());
  leaver.join();
  EXPECT_EQ(ended.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core().WaitAssignment("zz", 0, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(CoreTest, JobStatisticsAggregateOverReplicas) {
  const v1::JobSpec job = Job(3);
  for (int i = 0; i < 3; ++i) MustJoin(JoinReq(job, "", i, Cpu(absl::StrCat("h", i))));
  v1::ClusterStatus s = core().Status();
  ASSERT_EQ(s.layout().version(), 1u) << s.layout_error();
  // Each worker reports distinct numbers; the expected aggregates follow from the roles.
  std::map<std::string, double> loss, tps;
  int i = 0;
  for (const auto& w : s.workers()) {
    loss[w.worker_id()] = 2.0 + 0.25 * i;
    tps[w.worker_id()] = 1000.0 * (i + 1);
    ++i;
  }
  // Step 10 from everyone, then step 11 from the workers in sorted order.
  for (int step : {10, 11}) {
    for (const auto& w : s.workers()) {
      ASSERT_TRUE(core()
                      .Heartbeat(Beat(w.worker_id(), step, loss[w.worker_id()] - 0.01 * step,
                                      tps[w.worker_id()] + step))
                      .ok());
    }
  }
  double expect_loss = 0, expect_tps = 0;
  int reporters = 0;
  for (const auto& w : s.workers()) {
    const v1::Assignment& a = w.assignment();
    if (!a.placed() || a.tp_rank() != 0) continue;
    if (a.stage() == 0) expect_tps += tps[w.worker_id()] + 11;
    if (a.has_head()) {
      expect_loss += loss[w.worker_id()] - 0.11;
      ++reporters;
    }
  }
  ASSERT_GT(reporters, 0);
  expect_loss /= reporters;
  const v1::ClusterStatus after = core().Status();
  EXPECT_EQ(after.job_status().step(), 11);
  EXPECT_NEAR(after.job_status().loss(), expect_loss, 1e-12);
  EXPECT_NEAR(after.job_status().tokens_per_s(), expect_tps, 1e-9);
  ASSERT_EQ(after.job_status().history_size(), 2);
  EXPECT_EQ(after.job_status().history(0).step(), 10);
  EXPECT_EQ(after.job_status().history(1).step(), 11);
  EXPECT_NEAR(after.job_status().history(1).loss(), expect_loss, 1e-12);
  // A heartbeat repeating the same step does not count its loss twice.
  for (const auto& w : s.workers()) {
    ASSERT_TRUE(core().Heartbeat(Beat(w.worker_id(), 11, 100.0, tps[w.worker_id()] + 11)).ok());
  }
  EXPECT_NEAR(core().Status().job_status().loss(), expect_loss, 1e-12);
}

TEST_F(CoreTest, HistoryKeepsTheNewestPointsOldestFirst) {
  options_.history_points = 5;
  const std::string id = MustJoin(JoinReq(Job(0)));
  ASSERT_TRUE(Find(core().Status(), id)->assignment().placed());
  for (int step = 1; step <= 20; ++step) {
    ASSERT_TRUE(core().Heartbeat(Beat(id, step, 10.0 / step, 500)).ok());
    clock_.AdvanceMs(100);
  }
  const v1::JobStatus js = core().Status().job_status();
  ASSERT_EQ(js.history_size(), 5);
  for (int k = 0; k < 5; ++k) {
    EXPECT_EQ(js.history(k).step(), 16 + k);
    EXPECT_DOUBLE_EQ(js.history(k).loss(), 10.0 / (16 + k));
    EXPECT_DOUBLE_EQ(js.history(k).tokens_per_s(), 500);
  }
  EXPECT_LT(js.history(0).unix_ms(), js.history(4).unix_ms());
}

TEST_F(CoreTest, RebalanceGivesAStragglerLessWork) {
  // Two equal devices in a pipeline-friendly job; then one measures twice its predicted time.
  const v1::JobSpec job = Job(2, 8);
  MustJoin(JoinReq(job, "fast", -1, Cpu("h0")));
  MustJoin(JoinReq(job, "slow", -1, Cpu("h1")));
  v1::ClusterStatus s = core().Status();
  ASSERT_EQ(s.layout().version(), 1u) << s.layout_error();
  auto work = [&](const v1::ClusterStatus& st, const std::string& id) {
    const v1::Assignment& a = Find(st, id)->assignment();
    return a.placed() ? 1.0 * a.micro_batches() * (a.end_layer() - a.first_layer()) : 0.0;
  };
  const double fast0 = work(s, "fast"), slow0 = work(s, "slow");
  ASSERT_GT(fast0, 0);
  ASSERT_DOUBLE_EQ(fast0, slow0);  // equal devices, equal shares
  std::map<std::string, double> predicted;
  for (const auto& p : s.layout().placements()) predicted[p.worker_id()] = p.predicted_compute_s();
  ASSERT_TRUE(core().Heartbeat(Beat("fast", 1, 3.0, 100, predicted["fast"])).ok());
  ASSERT_TRUE(core().Heartbeat(Beat("slow", 1, 3.0, 100, 3 * predicted["slow"])).ok());
  auto layout = core().Rebalance();
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->version(), 2u);
  s = core().Status();
  EXPECT_LT(work(s, "slow"), work(s, "fast"));
}

TEST_F(CoreTest, RebalanceBeforeEnoughWorkersIsAPreconditionError) {
  MustJoin(JoinReq(Job(3)));
  EXPECT_EQ(core().Rebalance().status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoreTest, AFailedSolveKeepsTheLayoutAndSaysWhy) {
  // 16 GiB of RAM and no disk cannot hold a 2.7-billion-parameter model's AdamW states.
  v1::DeviceProfile small = Cpu("h0");
  small.mutable_memory()->set_disk_bytes(0);
  v1::JobSpec big = Job(0, 32);
  big.mutable_model()->set_n_embd(2560);
  big.mutable_model()->set_n_head(20);
  MustJoin(JoinReq(big, "a", -1, small));
  const v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.layout().version(), 0u);
  EXPECT_FALSE(s.layout_error().empty());
  EXPECT_EQ(s.health(), "waiting");
  EXPECT_EQ(core().Rebalance().status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(CoreTest, RetiredRecordsAreBounded) {
  const v1::JobSpec job = Job(0, 2);
  options_.solver.compute_efficiency = 0.6;
  for (int i = 0; i < 1100; ++i) {
    const std::string id = MustJoin(JoinReq(job, "", -1, Cpu("h")));
    v1::LeaveRequest leave;
    leave.set_worker_id(id);
    ASSERT_TRUE(core().Leave(leave).ok());
  }
  const v1::ClusterStatus s = core().Status();
  EXPECT_LE(s.workers_size(), 1024);
  EXPECT_EQ(s.counters().leaves_total(), 1100);
}

TEST_F(CoreTest, StatusTableHasAHeaderAndOneAlignedRowPerWorker) {
  const v1::JobSpec job = Job(2);
  MustJoin(JoinReq(job, "alpha", -1, Cpu("node-a")));
  MustJoin(JoinReq(job, "b", -1, Cpu("node-b")));
  v1::HeartbeatRequest hb = Beat("alpha", 7, 2.5, 1234567);
  hb.mutable_stats()->mutable_memory_used()->set_host_bytes(int64_t{3} << 30);
  ASSERT_TRUE(core().Heartbeat(hb).ok());
  ASSERT_TRUE(core().Drain("b").ok());
  const std::string table = FormatStatusTable(core().Status());
  std::istringstream in(table);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_GE(lines.size(), 5u) << table;
  EXPECT_NE(lines[0].find("health: degraded"), std::string::npos) << table;  // 1 of 2 usable
  EXPECT_NE(lines[1].find("step 7"), std::string::npos) << table;
  // The worker rows follow the column header; every column starts where its title does.
  size_t header = 0;
  while (header < lines.size() && lines[header].rfind("WORKER", 0) != 0) ++header;
  ASSERT_LT(header + 2, lines.size()) << table;
  const std::string& titles = lines[header];
  const std::string& alpha = lines[header + 1];
  const std::string& b = lines[header + 2];
  EXPECT_EQ(alpha.rfind("alpha", 0), 0u) << table;
  EXPECT_EQ(b.rfind("b ", 0), 0u) << table;
  const size_t state_col = titles.find("STATE");
  ASSERT_NE(state_col, std::string::npos);
  EXPECT_EQ(alpha.substr(state_col), "ALIVE") << table;
  EXPECT_EQ(b.substr(state_col), "DRAINING") << table;
  EXPECT_NE(alpha.find("1,234,567"), std::string::npos) << table;
  EXPECT_NE(alpha.find("3.0G"), std::string::npos) << table;
  EXPECT_NE(b.find("draining"), std::string::npos) << table;
}

// ---------------------------------------------------------------------------------------------
// Jobs come and go under one coordinator.

// A fixed world of `ranks` mesh ranks, as `shoal train --coordinator` sends it.
v1::JobSpec MeshJob(const std::string& name, int ranks, int n_layer) {
  v1::JobSpec job = ::shoal::testing::SmallJob(name, ranks, n_layer);
  job.set_place_all(true);
  return job;
}

v1::LeaveRequest LeaveReq(const std::string& id) {
  v1::LeaveRequest r;
  r.set_worker_id(id);
  r.set_reason("finished");
  return r;
}

TEST_F(CoreTest, ANewJobAfterTheLastOneEndedGetsItsOwnLayout) {
  // Job 1: two ranks, laid out, a step reported, then both leave.
  const v1::JobSpec one = MeshJob("job-one", 2, 4);
  MustJoin(JoinReq(one, "rank0", 0, Cpu("old0")));
  MustJoin(JoinReq(one, "rank1", 1, Cpu("old1")));
  ASSERT_EQ(core().Status().layout().version(), 1u) << core().Status().layout_error();
  ASSERT_TRUE(core().Heartbeat(Beat("rank0", 5, 3.0, 100)).ok());
  ASSERT_TRUE(core().Heartbeat(Beat("rank1", 5, 3.0, 100)).ok());
  ASSERT_EQ(core().Status().job_status().step(), 5);
  ASSERT_TRUE(core().Leave(LeaveReq("rank0")).ok());
  ASSERT_TRUE(core().Leave(LeaveReq("rank1")).ok());
  v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.layout().version(), 1u) << "nobody left to solve for: the layout stays";

  // Job 2: another spec (three ranks, six blocks). Its first Join is admitted and begins it.
  const v1::JobSpec two = MeshJob("job-two", 3, 6);
  MustJoin(JoinReq(two, "rank0", 0, Cpu("new0")));
  s = core().Status();
  EXPECT_EQ(s.job().name(), "job-two");
  EXPECT_EQ(s.job().model().n_layer(), 6);
  // Layout v1 is retired: its version stays (versions never go back) but it places nobody, and
  // the health is not "healthy" until the new job has its own.
  EXPECT_EQ(s.layout().version(), 1u);
  EXPECT_EQ(s.layout().placements_size(), 0);
  EXPECT_NE(s.health(), "healthy");
  EXPECT_EQ(s.job_status().step(), 0) << "job 1's statistics are not job 2's";
  EXPECT_EQ(s.job_status().history_size(), 0);
  // The new rank waits for a first layout (version 0), not for "the next after v1".
  const v1::Assignment& waiting = Find(s, "rank0")->assignment();
  EXPECT_EQ(waiting.version(), 0u);
  EXPECT_FALSE(waiting.placed());
  EXPECT_NE(waiting.reason().find("1 of 3"), std::string::npos) << waiting.reason();
  // Job 1's rank1 is still listed, as it ended.
  ASSERT_NE(Find(s, "rank1"), nullptr);
  EXPECT_EQ(Find(s, "rank1")->state(), v1::WORKER_STATE_LEFT);
  EXPECT_EQ(Find(s, "rank1")->device().host(), "old1");

  MustJoin(JoinReq(two, "rank1", 1, Cpu("new1")));
  EXPECT_EQ(core().Status().layout().version(), 1u) << "2 of 3 ranks: no layout yet";
  MustJoin(JoinReq(two, "rank2", 2, Cpu("new2")));
  s = core().Status();
  ASSERT_EQ(s.layout().version(), 2u) << s.layout_error();
  EXPECT_EQ(s.health(), "healthy");
  // Exactly job 2's workers, all of them (a fixed world), on the hosts they joined from.
  std::set<std::string> placed;
  for (const auto& p : s.layout().placements()) placed.insert(p.worker_id());
  EXPECT_EQ(placed, (std::set<std::string>{"rank0", "rank1", "rank2"}));
  int blocks = 0;
  for (const auto& w : s.workers()) {
    EXPECT_EQ(w.device().host(), absl::StrCat("new", w.mesh_rank())) << w.worker_id();
    const v1::Assignment& a = w.assignment();
    EXPECT_TRUE(a.placed()) << w.worker_id() << ": " << a.reason();
    EXPECT_EQ(a.version(), 2u);
    EXPECT_EQ(a.tp() * a.pp() * a.dp(), 3);
    if (a.tp_rank() == 0 && a.replica() == 0) blocks += a.end_layer() - a.first_layer();
  }
  EXPECT_EQ(blocks, 6) << "replica 0's stages cover job 2's blocks once";
  EXPECT_EQ(s.counters().layouts_total(), 2);
  EXPECT_EQ(s.counters().joins_total(), 5);

  // The same job run again, after this one ended: a third layout, with the next version.
  for (const char* id : {"rank0", "rank1", "rank2"}) ASSERT_TRUE(core().Leave(LeaveReq(id)).ok());
  for (int r = 0; r < 3; ++r) {
    MustJoin(JoinReq(two, absl::StrCat("rank", r), r, Cpu(absl::StrCat("new", r))));
  }
  s = core().Status();
  EXPECT_EQ(s.layout().version(), 3u) << s.layout_error();
  for (const auto& w : s.workers()) {
    EXPECT_TRUE(w.assignment().placed()) << w.worker_id();
    EXPECT_EQ(w.assignment().version(), 3u);
  }
}

TEST_F(CoreTest, ANewJobWaitsUntilEveryWorkerOfTheLastOneIsGone) {
  const v1::JobSpec one = MeshJob("job-one", 2, 4);
  MustJoin(JoinReq(one, "rank0", 0, Cpu("h0")));
  MustJoin(JoinReq(one, "rank1", 1, Cpu("h1")));
  ASSERT_EQ(core().Status().layout().version(), 1u);
  ASSERT_TRUE(core().Leave(LeaveReq("rank0")).ok());
  // rank1 is still alive (a straggler): another job is refused, naming it and why.
  const v1::JobSpec two = MeshJob("job-two", 2, 6);
  auto refused = core().Join(JoinReq(two, "x0", 0, Cpu("h2")));
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  const std::string why(refused.status().message());
  EXPECT_NE(why.find("job.name is \"job-two\" in this request, \"job-one\" in the job"),
            std::string::npos)
      << why;
  EXPECT_NE(why.find("still running on 1 live worker (rank1)"), std::string::npos) << why;
  EXPECT_NE(why.find("lease"), std::string::npos) << why;
  // A fresh run of the same job is not solved in beside it either: try again later.
  auto again = core().Join(JoinReq(one, "y0", 0, Cpu("h3")));
  ASSERT_EQ(again.status().code(), absl::StatusCode::kUnavailable) << again.status();
  EXPECT_NE(again.status().message().find("(rank1)"), std::string::npos) << again.status();
  v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.job().name(), "job-one");
  EXPECT_EQ(s.workers_size(), 2) << "neither refused join was admitted";
  EXPECT_EQ(s.counters().rejected_requests_total(), 2);

  // rank1's lease runs out; the sweep has not run yet, but the next Join sees it and begins
  // job 2.
  clock_.AdvanceMs(options_.lease_ms + 1);
  MustJoin(JoinReq(two, "x0", 0, Cpu("h2")));
  s = core().Status();
  EXPECT_EQ(s.job().name(), "job-two");
  EXPECT_EQ(Find(s, "rank1")->state(), v1::WORKER_STATE_DEAD);
  EXPECT_FALSE(Find(s, "rank1")->assignment().placed()) << "its layout was retired";
  EXPECT_EQ(s.counters().expirations_total(), 1);
  MustJoin(JoinReq(two, "x1", 1, Cpu("h3")));
  s = core().Status();
  ASSERT_EQ(s.layout().version(), 2u) << s.layout_error();
  std::set<std::string> placed;
  for (const auto& p : s.layout().placements()) placed.insert(p.worker_id());
  EXPECT_EQ(placed, (std::set<std::string>{"x0", "x1"}));
}

TEST_F(CoreTest, AWorkerComingBackResumesItsJobUnlessThatJobHasEnded) {
  const v1::JobSpec one = MeshJob("job-one", 2, 4);
  MustJoin(JoinReq(one, "rank0", 0, Cpu("h0")));
  MustJoin(JoinReq(one, "rank1", 1, Cpu("h1")));
  ASSERT_EQ(core().Status().layout().version(), 1u);
  // A stall outlasts both leases; the trainers go on with layout v1 and join again.
  clock_.AdvanceMs(options_.lease_ms + 1);
  ASSERT_EQ(core().ExpireLeases(), 2);
  v1::JoinRequest back = JoinReq(one, "rank0", 0, Cpu("h0"));
  back.set_running_layout_version(1);
  MustJoin(back);
  EXPECT_EQ(core().Status().job().name(), "job-one") << "a returning worker resumes job 1";
  back = JoinReq(one, "rank1", 1, Cpu("h1"));
  back.set_running_layout_version(1);
  MustJoin(back);
  v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.layout().version(), 2u) << s.layout_error();
  EXPECT_EQ(s.health(), "healthy");

  // Job 1 ends; job 2 begins with one of its ranks.
  ASSERT_TRUE(core().Leave(LeaveReq("rank0")).ok());
  ASSERT_TRUE(core().Leave(LeaveReq("rank1")).ok());
  const v1::JobSpec two = MeshJob("job-two", 2, 4);
  MustJoin(JoinReq(two, "n0", 0, Cpu("h2")));
  // A trainer of job 1 that never stopped comes back: same spec or not, it is not mixed in.
  for (const v1::JobSpec& spec : {one, two}) {
    back = JoinReq(spec, "rank1", 1, Cpu("h1"));
    back.set_running_layout_version(2);
    auto refused = core().Join(back);
    ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
    EXPECT_NE(refused.status().message().find("layout v2, of a job that has ended"),
              std::string::npos)
        << refused.status();
  }
  s = core().Status();
  EXPECT_EQ(Find(s, "rank1")->state(), v1::WORKER_STATE_LEFT);
  MustJoin(JoinReq(two, "n1", 1, Cpu("h3")));
  s = core().Status();
  EXPECT_EQ(s.layout().version(), 3u) << s.layout_error();
  std::set<std::string> placed;
  for (const auto& p : s.layout().placements()) placed.insert(p.worker_id());
  EXPECT_EQ(placed, (std::set<std::string>{"n0", "n1"}));
}

// The gain a third device brings, from the solver itself: the threshold is then set on either side
// of it.
double ThirdDeviceGain(const v1::JobSpec& job) {
  std::vector<SolverDevice> two = {{"a", Cpu("h0")}, {"b", Cpu("h1")}};
  std::vector<SolverDevice> three = two;
  three.push_back({"c", Cpu("h2")});
  auto l2 = SolveLayout(two, job);
  auto l3 = SolveLayout(three, job);
  EXPECT_TRUE(l2.ok() && l3.ok());
  if (!l2.ok() || !l3.ok()) return 0;
  return l3->predicted_tokens_per_s() / l2->predicted_tokens_per_s() - 1;
}

TEST_F(CoreTest, AJoinReplacesARunningLayoutOnlyForEnoughGain) {
  const v1::JobSpec job = Job(2);
  const double gain = ThirdDeviceGain(job);
  ASSERT_GT(gain, 0.01);
  options_.relayout_min_gain = 2 * gain;
  MustJoin(JoinReq(job, "a", -1, Cpu("h0")));
  MustJoin(JoinReq(job, "b", -1, Cpu("h1")));
  ASSERT_EQ(core().Status().layout().version(), 1u);
  MustJoin(JoinReq(job, "c", -1, Cpu("h2")));
  v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.layout().version(), 1u) << "a join worth less than the threshold kept the layout";
  ASSERT_NE(Find(s, "c"), nullptr);
  EXPECT_FALSE(Find(s, "c")->assignment().placed());
  EXPECT_NE(Find(s, "c")->assignment().reason().find("kept"), std::string::npos)
      << Find(s, "c")->assignment().reason();
  EXPECT_TRUE(Find(s, "a")->assignment().placed());

  // A placed worker dies: the layout no longer runs, so the next one comes whatever its gain.
  clock_.AdvanceMs(600);
  ASSERT_TRUE(core().Heartbeat(Beat("b")).ok());
  ASSERT_TRUE(core().Heartbeat(Beat("c")).ok());
  clock_.AdvanceMs(600);
  EXPECT_EQ(core().ExpireLeases(), 1);
  s = core().Status();
  EXPECT_EQ(s.layout().version(), 2u);
  EXPECT_TRUE(Find(s, "c")->assignment().placed());
}

TEST_F(CoreTest, AJoinWorthTheThresholdReplacesTheLayout) {
  const v1::JobSpec job = Job(2);
  const double gain = ThirdDeviceGain(job);
  ASSERT_GT(gain, 0.01);
  options_.relayout_min_gain = gain / 2;
  MustJoin(JoinReq(job, "a", -1, Cpu("h0")));
  MustJoin(JoinReq(job, "b", -1, Cpu("h1")));
  MustJoin(JoinReq(job, "c", -1, Cpu("h2")));
  const v1::ClusterStatus s = core().Status();
  EXPECT_EQ(s.layout().version(), 2u);
  EXPECT_TRUE(Find(s, "c")->assignment().placed());
}

}  // namespace
}  // namespace shoal::scheduler
