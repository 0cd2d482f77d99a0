// SwarmCoordinator: membership around SwarmState, driven call by call on a manual clock (the
// processes' view is launch_swarm_test's). Checked against what the contract says: refusals and
// their codes, stage choice and sync sources, a step carried through leases, commits and reports
// to its decision (the loss the mean of the committed ones), lease expiry fencing a peer and
// turning its micro-batches into replays, ReportPeer fencing only what cannot be dialled, the end
// of the job, and the next job once every worker of the last one is gone.
#include "scheduler/swarm_coordinator.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <vector>
#include <string>

namespace shoal::scheduler {
namespace {

constexpr int kStages = 2;
constexpr int kM = 4;
constexpr const char* kDemoToml = "[model]\n[optim]\nname = \"demo\"\n";

class SwarmCoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override { MakeSwarm(/*max_drifts=*/2); }

  void MakeSwarm(int max_drifts, double rebalance_s = 0, const std::string& sync = "fp32",
                 int64_t total_steps = 2) {
    SwarmCoordinatorOptions o;
    o.rebalance_s = rebalance_s;
    o.sync = sync;
    if (sync != "fp32") o.demo_config_toml = kDemoToml;
    o.slow_link_gbps = 0.125;  // 1000 Mb/s
    o.state.max_drifts = max_drifts;
    o.job.stages = kStages;
    o.job.micro_batches = kM;
    o.job.stage_bytes = {1000, 1000};
    o.job.grad_clip = 1.0;
    o.state.learning_rate = [total_steps](int64_t step) {
      return step < total_steps ? 0.01 : std::nan("");
    };
    o.info.set_config_toml("[model]\n");
    o.info.set_stages(kStages);
    o.info.set_micro_batches(kM);
    o.info.set_total_steps(total_steps);
    o.info.add_first_layer(0);
    o.info.add_end_layer(1);
    o.info.add_first_layer(1);
    o.info.add_end_layer(2);
    o.info.set_train_sha256("abc");
    o.lease_ms = 1000;
    o.heartbeat_interval_ms = 100;
    o.reachable = [this](const std::string& address) { return dead_.count(address) == 0; };
    auto made = SwarmCoordinator::Create(std::move(o), &clock_);
    ASSERT_TRUE(made.ok()) << made.status();
    swarm_ = std::move(*made);
  }

  // Four peers p0..p3 at 127.0.0.1:1..4, which the join rule puts two in each stage: their ids
  // by stage, and their addresses.
  void JoinFourPeers(std::map<int, std::vector<std::string>>* by_stage,
                     std::map<std::string, std::string>* address) {
    for (int i = 0; i < 4; ++i) {
      const std::string id = "p" + std::to_string(i);
      (*address)[id] = "127.0.0.1:" + std::to_string(i + 1);
      auto j = JoinPeer(id, (*address)[id]);
      ASSERT_TRUE(j.ok()) << j.status();
      (*by_stage)[j->swarm().stage()].push_back(id);
    }
    ASSERT_EQ((*by_stage)[0].size(), 2u);
    ASSERT_EQ((*by_stage)[1].size(), 2u);
  }

  absl::StatusOr<v1::JoinResponse> JoinPeer(const std::string& name, const std::string& address,
                                            int64_t bytes = 1 << 20, double net_gbps = 0) {
    v1::JoinRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    r.set_role(v1::WORKER_ROLE_PEER);
    r.set_name(name);
    r.set_advertise(address);
    r.mutable_device()->set_host("node1");
    r.mutable_device()->set_device_name("cpu");
    r.mutable_device()->set_cores(2);
    r.mutable_device()->set_throttle(1);
    r.mutable_device()->set_kind(v1::DEVICE_KIND_CPU);
    r.mutable_device()->set_fp32_gflops(10);
    r.mutable_device()->set_blas("OpenBLAS 0.3.21 (test)");
    r.mutable_device()->mutable_memory()->set_host_bytes(bytes);
    r.mutable_device()->set_net_gbps(net_gbps);
    r.set_link_gbps(net_gbps);
    return swarm_->Join(r);
  }

  absl::StatusOr<v1::JoinResponse> JoinTrainer(const std::string& name,
                                               const std::string& sha = "abc",
                                               double link_gbps = 0) {
    v1::JoinRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    r.set_role(v1::WORKER_ROLE_TRAINER);
    r.set_name(name);
    r.set_train_sha256(sha);
    r.set_link_gbps(link_gbps);
    return swarm_->Join(r);
  }

  absl::Status Synced(const std::string& peer, int64_t step, uint64_t hash) {
    v1::PeerSyncedRequest r;
    r.set_peer_id(peer);
    r.set_step(step);
    r.set_param_hash(hash);
    return swarm_->PeerSynced(r).status();
  }

  absl::Status Commit(const std::string& peer, const std::string& trainer, int64_t step,
                      int64_t id, double loss = std::nan(""), int64_t rollbacks = 0) {
    v1::CommitRequest c;
    c.set_rollbacks(rollbacks);
    c.set_peer_id(peer);
    c.set_trainer_id(trainer);
    c.set_step(step);
    c.set_id(id);
    if (std::isfinite(loss)) {
      c.set_has_loss(true);
      c.set_loss(loss);
    }
    return swarm_->Commit(c);
  }

  absl::StatusOr<v1::StageReportResponse> Report(const v1::SwarmRoster& r, int stage,
                                                 const std::string& peer, uint64_t hash,
                                                 double sum_squares = 0.25) {
    const v1::SwarmReductionPlan& plan = r.stages(stage).reduction();
    v1::StageReportRequest q;
    q.set_peer_id(peer);
    q.set_step(plan.step());
    q.set_plan(plan.plan());
    for (const v1::SwarmPlanIds& e : plan.ids()) {
      if (e.peer() == peer) q.mutable_ids()->CopyFrom(e.ids());
    }
    q.set_sum_squares(sum_squares);
    q.set_param_hash(hash);
    return swarm_->StageReport(q);
  }

  ManualClock clock_{1000000};
  std::set<std::string> dead_;
  std::unique_ptr<SwarmCoordinator> swarm_;
};

// Every rebalance_s of the clock, one check: a move needs two winning checks in a row, and then
// the roster shows the peer on its way (or arrived) and the counter.
TEST_F(SwarmCoordinatorTest, RebalancesEveryPeriodOnItsClock) {
  MakeSwarm(2, /*rebalance_s=*/10);
  for (const char* name : {"a", "b", "c"}) {
    ASSERT_TRUE(JoinPeer(name, std::string(name) + ".host:7").ok()) << name;
  }
  ASSERT_TRUE(JoinTrainer("t").ok());
  ASSERT_TRUE(Synced("a", 0, 11).ok());
  ASSERT_TRUE(Synced("b", 0, 22).ok());
  ASSERT_EQ(swarm_->Roster().stages(0).peers(1).id(), "c");  // stage 0: a, c; stage 1: b
  ASSERT_TRUE(Synced("c", 0, 11).ok());
  // c syncs during step 0 and serves from step 1: run step 0 with a and b.
  v1::LeaseRequest lease;
  lease.set_worker_id("t");
  lease.set_max(kM);
  absl::StatusOr<v1::LeaseResponse> leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok()) << leased.status();
  for (const v1::SwarmLeaseEntry& l : leased->leases()) {
    ASSERT_TRUE(Commit("b", "t", 0, l.id(), 2.0).ok());
    ASSERT_TRUE(Commit("a", "t", 0, l.id()).ok());
  }
  v1::SwarmRoster r = swarm_->Roster();
  ASSERT_TRUE(Report(r, 0, "a", 11).ok());
  ASSERT_TRUE(Report(r, 1, "b", 22).ok());
  ASSERT_EQ(swarm_->Roster().open_step(), 1);
  auto load = [&](const std::string& id, double samples_per_s) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(id);
    hb.mutable_stats()->set_samples_per_s(samples_per_s);
    ASSERT_TRUE(swarm_->Heartbeat(hb).ok()) << id;
  };
  load("a", 10);
  load("c", 10);
  load("b", 2);  // stage 1 is the bottleneck: 2 against 20
  EXPECT_FALSE(swarm_->Rebalance().has_value());  // no period has passed
  clock_.AdvanceMs(10000);
  EXPECT_FALSE(swarm_->Rebalance().has_value());  // the first winning check
  clock_.AdvanceMs(5000);
  EXPECT_FALSE(swarm_->Rebalance().has_value());  // half a period: no check
  clock_.AdvanceMs(5000);
  std::optional<SwarmMove> move = swarm_->Rebalance();
  ASSERT_TRUE(move.has_value());
  EXPECT_EQ(move->from, 0);
  EXPECT_EQ(move->to, 1);
  EXPECT_DOUBLE_EQ(move->bottleneck_before, 2);
  EXPECT_DOUBLE_EQ(move->bottleneck_after, 10);
  r = swarm_->Roster();
  EXPECT_EQ(r.counters().moves(), 1);  // it held nothing of step 1: it moved at once
  bool found = false;
  for (const v1::SwarmPeerEntry& p : r.stages(1).peers()) {
    if (p.id() != move->peer) continue;
    found = true;
    EXPECT_EQ(p.state(), "SYNCING");
    EXPECT_EQ(p.donor(), "b");
    EXPECT_EQ(p.moving_to(), -1);
  }
  EXPECT_TRUE(found) << r.DebugString();
  // A bad period is refused when the coordinator is made.
  SwarmCoordinatorOptions bad;
  bad.rebalance_s = -1;
  EXPECT_EQ(SwarmCoordinator::Create(bad, &clock_).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SwarmCoordinatorTest, RefusesWhatItCannotServe) {
  v1::JoinRequest mesh;
  mesh.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
  EXPECT_EQ(swarm_->Join(mesh).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::JoinRequest old = mesh;
  old.set_protocol_version(99);
  old.set_role(v1::WORKER_ROLE_TRAINER);
  EXPECT_EQ(swarm_->Join(old).status().code(), absl::StatusCode::kFailedPrecondition);
  // An address that is not HOST:PORT, and one the coordinator cannot dial (the hint named).
  EXPECT_EQ(JoinPeer("a", "nohost").status().code(), absl::StatusCode::kInvalidArgument);
  dead_.insert("10.0.0.1:5");
  absl::Status unreachable = JoinPeer("a", "10.0.0.1:5").status();
  EXPECT_EQ(unreachable.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(unreachable.message()).find("--advertise"), std::string::npos);
  // Memory that fits no stage.
  EXPECT_EQ(JoinPeer("a", "127.0.0.1:1", 10).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Another train.bin.
  absl::Status sha = JoinTrainer("t", "other").status();
  EXPECT_EQ(sha.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(sha.message()).find("sha256"), std::string::npos);
  // A name in use.
  ASSERT_TRUE(JoinPeer("a", "127.0.0.1:1").ok());
  EXPECT_EQ(JoinPeer("a", "127.0.0.1:2").status().code(), absl::StatusCode::kAlreadyExists);
  // Calls from strangers and trainer-only calls from a peer.
  v1::LeaseRequest lease;
  lease.set_worker_id("nobody");
  lease.set_max(1);
  EXPECT_EQ(swarm_->Lease(lease).status().code(), absl::StatusCode::kNotFound);
  lease.set_worker_id("a");
  EXPECT_EQ(swarm_->Lease(lease).status().code(), absl::StatusCode::kFailedPrecondition);
  lease.set_max(-1);
  EXPECT_EQ(swarm_->Lease(lease).status().code(), absl::StatusCode::kInvalidArgument);
  v1::CommitRequest bad;
  bad.set_peer_id("a");
  bad.set_has_loss(true);
  bad.set_loss(std::nan(""));
  EXPECT_EQ(swarm_->Commit(bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SwarmCoordinatorTest, RunsAStepToItsDecisionAndTheJobToItsEnd) {
  auto p0 = JoinPeer("p0", "127.0.0.1:1");
  auto p1 = JoinPeer("p1", "127.0.0.1:2");
  ASSERT_TRUE(p0.ok() && p1.ok()) << p0.status() << p1.status();
  // One stage each, the first peers sync from the init.
  EXPECT_NE(p0->swarm().stage(), p1->swarm().stage());
  EXPECT_EQ(p0->swarm().sync_source(), "init");
  EXPECT_EQ(p0->swarm().config_toml(), "[model]\n");
  const std::string first = p0->swarm().stage() == 0 ? "p0" : "p1";
  const std::string last = first == "p0" ? "p1" : "p0";
  ASSERT_TRUE(Synced("p0", 0, 7).ok());
  ASSERT_TRUE(Synced("p1", 0, 7).ok());
  ASSERT_TRUE(JoinTrainer("t").ok());
  v1::SwarmRoster r = swarm_->Roster();
  ASSERT_TRUE(r.step_open());
  EXPECT_EQ(r.open_step(), 0);
  // A commit for another step is refused; the step's leases cover its M micro-batches.
  EXPECT_EQ(Commit(last, "t", 1, kM).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(Commit(last, "t", 1, 0).code(), absl::StatusCode::kInvalidArgument);
  v1::LeaseRequest lease;
  lease.set_worker_id("t");
  lease.set_max(kM);
  absl::StatusOr<v1::LeaseResponse> leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok()) << leased.status();
  ASSERT_EQ(leased->leases_size(), kM);
  double loss_sum = 0;
  for (const v1::SwarmLeaseEntry& l : leased->leases()) {
    EXPECT_EQ(l.stages_size(), kStages);
    const double loss = 2.0 + 0.5 * static_cast<double>(l.id());
    loss_sum += loss;
    ASSERT_TRUE(Commit(last, "t", 0, l.id(), loss).ok());
    ASSERT_TRUE(Commit(first, "t", 0, l.id()).ok());
  }
  // A second commit of a held micro-batch is a duplicate.
  EXPECT_EQ(Commit(last, "t", 0, 0).code(), absl::StatusCode::kAlreadyExists);
  r = swarm_->Roster();
  ASSERT_EQ(r.stages(0).phase(), "reducing");
  ASSERT_TRUE(Report(r, 0, first, 7).ok());
  absl::StatusOr<v1::StageReportResponse> done = Report(r, 1, last, 7);
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_TRUE(done->decided());
  EXPECT_DOUBLE_EQ(done->decision().loss(), loss_sum / kM);
  EXPECT_DOUBLE_EQ(done->decision().lr(), 0.01);
  // norm = sqrt(0.25 + 0.25); clip 1 / (norm + 1e-6) capped at 1.
  EXPECT_NEAR(done->decision().grad_norm(), std::sqrt(0.5), 1e-12);
  EXPECT_DOUBLE_EQ(done->decision().clip_scale(), 1.0);
  r = swarm_->Roster();
  ASSERT_EQ(r.decisions_size(), 1);
  // A checkpoint of state 1: a trainer's word, with a folder; the roster carries it.
  EXPECT_EQ(r.checkpoint_step(), -1);
  v1::CheckpointSavedRequest saved;
  saved.set_worker_id(first);
  saved.set_step(1);
  saved.set_path("/ck/step_00000001");
  EXPECT_EQ(swarm_->CheckpointSaved(saved).code(), absl::StatusCode::kFailedPrecondition);
  saved.set_worker_id("t");
  saved.set_path("");
  EXPECT_EQ(swarm_->CheckpointSaved(saved).code(), absl::StatusCode::kInvalidArgument);
  saved.set_path("/ck/step_00000001");
  saved.set_step(5);
  EXPECT_EQ(swarm_->CheckpointSaved(saved).code(), absl::StatusCode::kOutOfRange);
  saved.set_step(1);
  ASSERT_TRUE(swarm_->CheckpointSaved(saved).ok());
  r = swarm_->Roster();
  EXPECT_EQ(r.checkpoint_step(), 1);
  EXPECT_EQ(r.checkpoint_path(), "/ck/step_00000001");
  EXPECT_EQ(r.counters().duplicates(), 1);
  EXPECT_FALSE(r.finished());
  // The last step, then the end: no step opens past total_steps.
  leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok() && leased->step_open());
  for (const v1::SwarmLeaseEntry& l : leased->leases()) {
    ASSERT_TRUE(Commit(last, "t", 1, l.id(), 1.0).ok());
    ASSERT_TRUE(Commit(first, "t", 1, l.id()).ok());
  }
  r = swarm_->Roster();
  ASSERT_TRUE(Report(r, 0, first, 8).ok());
  ASSERT_TRUE(Report(r, 1, last, 9).ok());
  r = swarm_->Roster();
  EXPECT_TRUE(r.finished());
  EXPECT_FALSE(r.step_open());
  leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok());
  EXPECT_FALSE(leased->step_open());
  const v1::ClusterStatus status = swarm_->Status();
  EXPECT_EQ(status.job_status().step(), 1);
  EXPECT_EQ(status.job_status().history_size(), 2);
  EXPECT_EQ(status.health(), "healthy");

  // The coordinator outlives the job. While a worker of the finished job is still there, a new
  // worker joins that job (nothing left to do); once every one is gone, the next join begins
  // job 2 at step 0 from the init, with the names free again.
  auto late = JoinTrainer("late");
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(swarm_->Roster().job(), 1);
  EXPECT_TRUE(swarm_->Roster().finished());
  for (const std::string id : {"p0", "p1", "t", "late"}) {
    v1::LeaveRequest leave;
    leave.set_worker_id(id);
    ASSERT_TRUE(swarm_->Leave(leave).ok()) << id;
  }
  auto again = JoinPeer("p0", "127.0.0.1:1");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->swarm().sync_source(), "init");
  r = swarm_->Roster();
  EXPECT_EQ(r.job(), 2);
  EXPECT_EQ(r.next_step(), 0);
  EXPECT_FALSE(r.finished());
  EXPECT_EQ(r.decisions_size(), 0);
  EXPECT_EQ(r.checkpoint_step(), -1);
  auto other = JoinPeer("p1", "127.0.0.1:2");
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE(Synced("p0", 0, 7).ok());
  ASSERT_TRUE(Synced("p1", 0, 7).ok());
  ASSERT_TRUE(JoinTrainer("t").ok());
  r = swarm_->Roster();
  EXPECT_TRUE(r.step_open());
  EXPECT_EQ(r.open_step(), 0);
  EXPECT_EQ(swarm_->Status().job_status().history_size(), 0);
}

TEST_F(SwarmCoordinatorTest, ExpiredOrUnreachablePeersAreFencedAndTheirWorkReplayed) {
  // Four peers, two per stage; every one of stage 0 syncs before the first round opens, so that
  // round has two peers there.
  std::map<int, std::vector<std::string>> by_stage;
  std::map<std::string, std::string> address;
  ASSERT_NO_FATAL_FAILURE(JoinFourPeers(&by_stage, &address));
  ASSERT_TRUE(Synced(by_stage[0][0], 0, 1).ok());
  ASSERT_TRUE(Synced(by_stage[0][1], 0, 1).ok());
  ASSERT_TRUE(Synced(by_stage[1][0], 0, 2).ok());
  ASSERT_TRUE(JoinTrainer("t").ok());
  v1::SwarmRoster r = swarm_->Roster();
  ASSERT_TRUE(r.step_open());
  const std::string victim = by_stage[0][1];
  v1::LeaseRequest lease;
  lease.set_worker_id("t");
  lease.set_max(2);
  absl::StatusOr<v1::LeaseResponse> leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok() && leased->leases_size() == 2);
  for (const v1::SwarmLeaseEntry& l : leased->leases()) {
    ASSERT_TRUE(Commit(by_stage[1][0], "t", 0, l.id()).ok());
    ASSERT_TRUE(Commit(victim, "t", 0, l.id()).ok());
  }
  // ReportPeer of a reachable peer changes nothing; of an unreachable one fences it, and its two
  // micro-batches are needed again at stage 0 only.
  v1::ReportPeerRequest report;
  report.set_worker_id("t");
  report.set_peer_id(victim);
  report.set_reason("test");
  absl::StatusOr<v1::ReportPeerResponse> kept = swarm_->ReportPeer(report);
  ASSERT_TRUE(kept.ok());
  EXPECT_FALSE(kept->fenced());
  // So does the end of a reachable peer's roster watch (it reconnects), and of a trainer's or an
  // unknown worker's.
  EXPECT_FALSE(swarm_->WatchEnded(victim));
  EXPECT_FALSE(swarm_->WatchEnded("t"));
  EXPECT_FALSE(swarm_->WatchEnded("nobody"));
  EXPECT_EQ(swarm_->Roster().counters().fences(), 0);
  dead_.insert(address[victim]);
  EXPECT_FALSE(swarm_->WatchEnded("t"));  // a trainer is never dialled
  absl::StatusOr<v1::ReportPeerResponse> fenced = swarm_->ReportPeer(report);
  ASSERT_TRUE(fenced.ok());
  EXPECT_TRUE(fenced->fenced());
  r = swarm_->Roster();
  EXPECT_EQ(r.counters().deaths(), 1);
  EXPECT_EQ(r.counters().fences(), 1);
  lease.set_max(kM);
  leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok()) << leased.status();
  int replays = 0;
  for (const v1::SwarmLeaseEntry& l : leased->leases()) {
    if (!l.replay()) continue;
    ++replays;
    ASSERT_EQ(l.stages_size(), 1);
    EXPECT_EQ(l.stages(0), 0);
  }
  EXPECT_EQ(replays, 2);
  // A peer whose lease runs out (no heartbeat for lease_ms) is dead too; the others keep theirs.
  clock_.AdvanceMs(600);
  for (const std::string& id : {by_stage[0][0], by_stage[1][0], std::string("t")}) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(id);
    ASSERT_TRUE(swarm_->Heartbeat(hb).ok()) << id;
  }
  clock_.AdvanceMs(600);
  EXPECT_EQ(swarm_->ExpireLeases(), 1);
  v1::HeartbeatRequest hb;
  hb.set_worker_id(by_stage[1][1]);
  EXPECT_EQ(swarm_->Heartbeat(hb).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(swarm_->Roster().counters().lost(), 0);
}

// A call still in flight across a rollback carries its lease's epoch: its commit is refused
// once the rollback voided that lease, even where the trainer holds the id again (the ledger
// would otherwise count the stale call for the new lease and refuse the new call as a
// duplicate); a commit of the current epoch counts, once.
TEST_F(SwarmCoordinatorTest, APeerWhoseWatchEndsUnreachableIsDeadAndAJoinerTakesItsStage) {
  // Two peers a stage. One of stage 1 is killed: its watch ends and it cannot be dialled, so it
  // is fenced before any call to it failed, and the next peer to join goes to stage 1 (the join
  // rule's emptiest stage), not to stage 0 as it would while the dead peer still counted.
  std::map<int, std::vector<std::string>> by_stage;
  std::map<std::string, std::string> address;
  ASSERT_NO_FATAL_FAILURE(JoinFourPeers(&by_stage, &address));
  const std::string victim = by_stage[1][1];
  dead_.insert(address[victim]);
  EXPECT_TRUE(swarm_->WatchEnded(victim));
  // (A death, not a fence: no round has opened, so it held nothing.)
  EXPECT_EQ(swarm_->Roster().counters().deaths(), 1);
  EXPECT_FALSE(swarm_->WatchEnded(victim));  // gone already: nothing more
  EXPECT_EQ(swarm_->Roster().counters().deaths(), 1);
  auto joiner = JoinPeer("p4", "127.0.0.1:5");
  ASSERT_TRUE(joiner.ok()) << joiner.status();
  EXPECT_EQ(joiner->swarm().stage(), 1);
}

TEST_F(SwarmCoordinatorTest, ACommitLeasedBeforeARollbackIsRefused) {
  std::map<int, std::string> at;
  const std::map<std::string, std::string> address = {{"a", "127.0.0.1:11"},
                                                      {"b", "127.0.0.1:12"}};
  for (const auto& [id, where] : address) {
    auto j = JoinPeer(id, where);
    ASSERT_TRUE(j.ok()) << j.status();
    at[j->swarm().stage()] = id;
  }
  ASSERT_EQ(at.size(), 2u);
  ASSERT_TRUE(Synced(at[0], 0, 1).ok());
  ASSERT_TRUE(Synced(at[1], 0, 2).ok());
  ASSERT_TRUE(JoinTrainer("t").ok());
  ASSERT_TRUE(swarm_->Roster().step_open());
  v1::LeaseRequest lease;
  lease.set_worker_id("t");
  lease.set_max(1);
  absl::StatusOr<v1::LeaseResponse> before = swarm_->Lease(lease);
  ASSERT_TRUE(before.ok() && before->leases_size() == 1) << before.status();
  EXPECT_EQ(before->rollbacks(), 0);
  const int64_t id = before->leases(0).id();
  // Stage 0's only peer dies: the swarm rolls back (to the init) and waits for a successor.
  dead_.insert(address.at(at[0]));
  v1::ReportPeerRequest report;
  report.set_worker_id("t");
  report.set_peer_id(at[0]);
  report.set_reason("test");
  ASSERT_TRUE(swarm_->ReportPeer(report).ok());
  EXPECT_EQ(swarm_->Roster().counters().rollbacks(), 1);
  auto c = JoinPeer("c", "127.0.0.1:13");
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->swarm().stage(), 0);
  ASSERT_TRUE(Synced("c", 0, 1).ok());
  (void)Synced(at[1], 0, 2);  // sent back to syncing by the rollback, or still serving
  ASSERT_TRUE(swarm_->Roster().step_open());
  lease.set_max(kM);
  absl::StatusOr<v1::LeaseResponse> after = swarm_->Lease(lease);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->rollbacks(), 1);
  bool again = false;
  for (const v1::SwarmLeaseEntry& l : after->leases()) again = again || l.id() == id;
  ASSERT_TRUE(again) << "the rollback voided every lease: the id is leased anew";
  const absl::Status stale = Commit(at[1], "t", 0, id, 1.0, /*rollbacks=*/0);
  EXPECT_EQ(stale.code(), absl::StatusCode::kFailedPrecondition) << stale;
  EXPECT_NE(stale.message().find("rollback"), std::string::npos) << stale;
  EXPECT_TRUE(Commit(at[1], "t", 0, id, 1.0, /*rollbacks=*/1).ok());
  EXPECT_EQ(Commit(at[1], "t", 0, id, 1.0, 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(swarm_->Roster().counters().duplicates(), 1);
}

// A peer whose parameters differ from its stage's at a report drifts; at max_drifts it is
// evicted, and the message names its CPU and BLAS (what makes a peer's arithmetic differ).
TEST_F(SwarmCoordinatorTest, APeerThatDriftsTooOftenIsEvictedNamingItsCpuAndBlas) {
  MakeSwarm(/*max_drifts=*/1);
  std::map<int, std::vector<std::string>> by_stage;
  for (int i = 0; i < 4; ++i) {
    const std::string id = "p" + std::to_string(i);
    auto j = JoinPeer(id, "127.0.0.1:" + std::to_string(i + 1));
    ASSERT_TRUE(j.ok()) << j.status();
    by_stage[j->swarm().stage()].push_back(id);
  }
  ASSERT_EQ(by_stage[0].size(), 2u);
  ASSERT_EQ(by_stage[1].size(), 2u);
  for (int s = 0; s < 2; ++s) {
    for (const std::string& id : by_stage[s]) ASSERT_TRUE(Synced(id, 0, 10 + s).ok()) << id;
  }
  ASSERT_TRUE(JoinTrainer("t").ok());
  v1::LeaseRequest lease;
  lease.set_worker_id("t");
  lease.set_max(kM);
  absl::StatusOr<v1::LeaseResponse> leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok() && leased->leases_size() == kM) << leased.status();
  for (const v1::SwarmLeaseEntry& l : leased->leases()) {
    ASSERT_TRUE(Commit(by_stage[1][0], "t", 0, l.id(), 1.0).ok());
    ASSERT_TRUE(Commit(by_stage[0][l.id() % 2], "t", 0, l.id()).ok());
  }
  v1::SwarmRoster r = swarm_->Roster();
  ASSERT_EQ(r.stages(0).phase(), "reducing");
  auto senior = Report(r, 0, by_stage[0][0], 10);
  ASSERT_TRUE(senior.ok()) << senior.status();
  auto junior = Report(r, 0, by_stage[0][1], 99);
  ASSERT_TRUE(junior.ok()) << junior.status();
  ASSERT_EQ(junior->drifted_size(), 1);
  const std::string& message = junior->drifted(0);
  EXPECT_NE(message.find(by_stage[0][1]), std::string::npos) << message;
  EXPECT_NE(message.find("evicted"), std::string::npos) << message;
  EXPECT_NE(message.find("CPU: cpu"), std::string::npos) << message;
  EXPECT_NE(message.find("BLAS: OpenBLAS 0.3.21 (test)"), std::string::npos) << message;
  r = swarm_->Roster();
  EXPECT_EQ(r.counters().drifts(), 1);
  EXPECT_EQ(r.counters().evictions(), 1);
  ASSERT_EQ(r.evictions_size(), 1);  // where the evicted peer reads why
  EXPECT_EQ(r.evictions(0), message);
  // Its micro-batches are needed again at stage 0.
  leased = swarm_->Lease(lease);
  ASSERT_TRUE(leased.ok()) << leased.status();
  int replays = 0;
  for (const v1::SwarmLeaseEntry& l : leased->leases()) replays += l.replay() ? 1 : 0;
  EXPECT_EQ(replays, kM / 2);
}

}  // namespace
}  // namespace shoal::scheduler

namespace shoal::scheduler {
namespace {

// swarm.sync = auto: a job's stage rounds are decided once, when its first worker (of either
// role) joins, from that worker's measured link (slower than slow_link_gbps: DeMo); every later
// joiner of the job gets the same, whatever its own link; the next job decides again. DeMo's
// peers clip their own gradients (their norms differ), so its decision's clip scale is 1 where
// fp32's clips.
TEST_F(SwarmCoordinatorTest, AutoSyncIsDecidedOncePerJobFromItsFirstWorkersLink) {
  MakeSwarm(/*max_drifts=*/2, /*rebalance_s=*/0, "auto", /*total_steps=*/1);
  // Job 1: the first worker, a trainer, measured 100 Mb/s (0.0125 GB/s): DeMo, for the fast
  // peers too.
  auto t = JoinTrainer("t", "abc", /*link_gbps=*/0.0125);
  ASSERT_TRUE(t.ok()) << t.status();
  auto p0 = JoinPeer("p0", "127.0.0.1:1", 1 << 20, /*net_gbps=*/10);
  auto p1 = JoinPeer("p1", "127.0.0.1:2", 1 << 20, /*net_gbps=*/10);
  ASSERT_TRUE(p0.ok() && p1.ok()) << p0.status() << p1.status();
  for (const auto* j : {&*p0, &*p1, &*t}) {
    EXPECT_EQ(j->swarm().sync(), "demo");
    EXPECT_EQ(j->swarm().config_toml(), kDemoToml);
  }
  auto run_step = [&](const std::string& first, const std::string& last) {
    v1::LeaseRequest lease;
    lease.set_worker_id("t");
    lease.set_max(kM);
    absl::StatusOr<v1::LeaseResponse> leased = swarm_->Lease(lease);
    EXPECT_TRUE(leased.ok() && leased->leases_size() == kM);
    if (!leased.ok()) return v1::SwarmDecision();
    for (const v1::SwarmLeaseEntry& l : leased->leases()) {
      EXPECT_TRUE(Commit(last, "t", 0, l.id(), 1.0).ok());
      EXPECT_TRUE(Commit(first, "t", 0, l.id()).ok());
    }
    // Norm sqrt(4 + 4) = 2.83 over the clip of 1.
    v1::SwarmRoster r = swarm_->Roster();
    EXPECT_TRUE(Report(r, 0, first, 7, 4.0).ok());
    absl::StatusOr<v1::StageReportResponse> done = Report(r, 1, last, 7, 4.0);
    EXPECT_TRUE(done.ok() && done->decided());
    return done.ok() ? done->decision() : v1::SwarmDecision();
  };
  const std::string first = p0->swarm().stage() == 0 ? "p0" : "p1";
  const std::string last = first == "p0" ? "p1" : "p0";
  ASSERT_TRUE(Synced("p0", 0, 7).ok());
  ASSERT_TRUE(Synced("p1", 0, 7).ok());
  v1::SwarmDecision d = run_step(first, last);
  EXPECT_NEAR(d.grad_norm(), std::sqrt(8.0), 1e-12);
  EXPECT_DOUBLE_EQ(d.clip_scale(), 1.0);
  ASSERT_TRUE(swarm_->Roster().finished());
  auto leave_all = [&](std::vector<std::string> ids) {
    for (const std::string& id : ids) {
      v1::LeaveRequest leave;
      leave.set_worker_id(id);
      ASSERT_TRUE(swarm_->Leave(leave).ok()) << id;
    }
  };
  leave_all({"p0", "p1", "t"});
  // Job 2: its first worker's link is fast: fp32 sums, which the decision clips.
  auto q1 = JoinPeer("p1", "127.0.0.1:2", 1 << 20, /*net_gbps=*/10);
  auto q0 = JoinPeer("p0", "127.0.0.1:1", 1 << 20, /*net_gbps=*/0.0125);
  ASSERT_TRUE(q0.ok() && q1.ok()) << q0.status() << q1.status();
  EXPECT_EQ(swarm_->Roster().job(), 2);
  ASSERT_TRUE(JoinTrainer("t").ok());
  for (const auto* j : {&*q0, &*q1}) {
    EXPECT_EQ(j->swarm().sync(), "fp32");
    EXPECT_EQ(j->swarm().config_toml(), "[model]\n");
  }
  const std::string first2 = q0->swarm().stage() == 0 ? "p0" : "p1";
  ASSERT_TRUE(Synced("p0", 0, 7).ok());
  ASSERT_TRUE(Synced("p1", 0, 7).ok());
  d = run_step(first2, first2 == "p0" ? "p1" : "p0");
  EXPECT_NEAR(d.clip_scale(), 1.0 / (std::sqrt(8.0) + 1e-6), 1e-9);
  leave_all({"p0", "p1", "t"});
  // Job 3: a first worker that measured nothing (net_gbps 0) runs fp32.
  auto u = JoinTrainer("t");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->swarm().sync(), "fp32");
  EXPECT_EQ(swarm_->Roster().job(), 3);
}

TEST_F(SwarmCoordinatorTest, ARoundsChoiceItCannotServeIsRefused) {
  auto create = [&](const std::string& sync, const std::string& demo_toml, double gbps) {
    SwarmCoordinatorOptions o;
    o.job.stages = 1;
    o.job.micro_batches = 1;
    o.job.stage_bytes = {1};
    o.state.learning_rate = [](int64_t) { return 0.01; };
    o.info.set_stages(1);
    o.info.set_micro_batches(1);
    o.info.set_total_steps(1);
    o.info.add_first_layer(0);
    o.info.add_end_layer(1);
    o.sync = sync;
    o.demo_config_toml = demo_toml;
    o.slow_link_gbps = gbps;
    return SwarmCoordinator::Create(std::move(o), &clock_).status();
  };
  EXPECT_TRUE(create("auto", kDemoToml, 0.125).ok());
  EXPECT_TRUE(create("fp32", "", 0.125).ok());
  absl::Status bad = create("sgd", kDemoToml, 0.125);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("sgd"), std::string::npos) << bad;
  bad = create("demo", "", 0.125);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("demo_config_toml"), std::string::npos) << bad;
  EXPECT_EQ(create("auto", kDemoToml, 0).code(), absl::StatusCode::kInvalidArgument);
  // A measured link that cannot be is refused at the join, naming it.
  for (double bad_link : {-1.0, std::nan(""), 1e9}) {
    absl::Status refused = JoinTrainer("x", "abc", bad_link).status();
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << bad_link;
    EXPECT_NE(refused.message().find("link_gbps"), std::string::npos) << refused;
  }
  EXPECT_EQ(create("auto", kDemoToml, std::nan("")).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace shoal::scheduler
