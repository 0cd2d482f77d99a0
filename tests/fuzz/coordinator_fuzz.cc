// libFuzzer target for what reaches the coordinator from the network, mesh and swarm. The first
// byte, modulo 22, picks a mode:
//   - 0..5: the rest is parsed (ParseFromArray) as one request type and, if it parses, validated
//     and handed to a fresh CoordinatorCore (Join, Heartbeat, Leave, Drain, WatchAssignment,
//     Ping's validation);
//   - 6..7: the rest is a program of Join / Heartbeat / Leave / Drain / Rebalance / Status /
//     clock-advance / WaitAssignment calls against one CoordinatorCore on a ManualClock;
//   - 8..19: the rest is parsed as one swarm request (JoinRequest as a peer, as a trainer,
//     LeaseRequest, CommitRequest, ReportPeerRequest, PeerSyncedRequest, StageReportRequest,
//     CheckpointSavedRequest, WatchRosterRequest, HeartbeatRequest, LeaveRequest, DrainRequest)
//     and handed to a fresh SwarmCoordinator holding a small swarm at work (2 stages, M = 4, two
//     peers serving step 0, one stage reducing, two joiners syncing, two trainers);
//   - 20..21: the rest is a program of swarm calls (peers and trainers joining with fuzzed fields,
//     honest and wrong syncs, leases, commits of leased and random ids, stage reports from the
//     roster's plans or corrupted, ReportPeer, heartbeats, clock advances with ExpireLeases,
//     Leave, Drain, CheckpointSaved, WaitRoster, Status) against one SwarmCoordinator on a
//     ManualClock: from an empty swarm of a job the program picks (20) or from the small one (21).
//     The coordinator's dial check (`reachable`) is a set of addresses the program marks
//     unreachable: no socket is opened.
// Besides "no crash" (and AddressSanitizer's checks), every call must end in one of the status
// codes its contract documents (kInternal, documented only as a bug, never is), a refused swarm
// call must leave the roster as it was, and the status must stay consistent (see CheckStatus,
// SwarmFuzz::CheckRoster and SwarmFuzz::CheckStatus). A broken invariant aborts, which libFuzzer
// reports as a crash with the input that caused it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "proto/coordinator.pb.h"
#include "scheduler/clock.h"
#include "scheduler/coordinator_core.h"
#include "scheduler/swarm_coordinator.h"
#include "scheduler/validate.h"

namespace shoal::scheduler {
namespace {

[[noreturn]] void Violation(const std::string& what) {
  std::fprintf(stderr, "coordinator_fuzz: invariant broken: %s\n", what.c_str());
  std::abort();
}

void ExpectCode(const char* call, const absl::Status& s,
                std::initializer_list<absl::StatusCode> allowed) {
  for (absl::StatusCode c : allowed) {
    if (s.code() == c) return;
  }
  Violation(absl::StrCat(call, " returned an undocumented status: ", s.ToString()));
}

// What must hold of any status the core reports, given the versions it reported before.
void CheckStatus(const CoordinatorCore& core, uint64_t* last_version) {
  const v1::ClusterStatus s = core.Status();
  const uint64_t v = s.layout().version();
  if (v < *last_version) {
    Violation(absl::StrCat("layout version went back from ", *last_version, " to ", v));
  }
  *last_version = v;
  if (s.health() != "waiting" && s.health() != "healthy" && s.health() != "degraded") {
    Violation("health is " + s.health());
  }
  if ((v == 0) != (s.health() == "waiting")) {
    Violation(absl::StrCat("health ", s.health(), " with layout version ", v));
  }
  if (s.job_status().history_size() > core.options().history_points) {
    Violation("history longer than its bound");
  }
  std::set<std::string> ids, in_layout;
  for (const v1::Placement& p : s.layout().placements()) in_layout.insert(p.worker_id());
  for (const v1::WorkerStatus& w : s.workers()) {
    if (!ids.insert(w.worker_id()).second) Violation("worker listed twice: " + w.worker_id());
    if (w.assignment().version() > v) Violation("assignment newer than the layout");
    // A dead or draining worker may still hold its place until the next solve; one that left
    // may not, and nobody is placed outside the layout.
    if (w.assignment().placed() && w.state() == v1::WORKER_STATE_LEFT) {
      Violation(absl::StrCat("worker ", w.worker_id(), " left but is still placed"));
    }
    if (w.assignment().placed() && in_layout.count(w.worker_id()) == 0) {
      Violation(absl::StrCat("worker ", w.worker_id(), " placed but not in the layout"));
    }
    if (w.assignment().placed() &&
        (w.assignment().first_layer() < 0 ||
         w.assignment().end_layer() <= w.assignment().first_layer() ||
         w.assignment().end_layer() > s.job().model().n_layer())) {
      Violation(absl::StrCat("worker ", w.worker_id(), " got layers [",
                             w.assignment().first_layer(), ", ", w.assignment().end_layer(),
                             ")"));
    }
  }
  const v1::Counters& c = s.counters();
  if (c.joins_total() < 0 || c.leaves_total() < 0 || c.heartbeats_total() < 0 ||
      c.expirations_total() < 0 || c.layouts_total() < 0 || c.rejected_requests_total() < 0) {
    Violation("a counter is negative");
  }
  if (c.layouts_total() != static_cast<int64_t>(v)) {
    Violation(absl::StrCat(c.layouts_total(), " layouts counted, version ", v));
  }
}

CoordinatorOptions Options() {
  CoordinatorOptions o;
  o.lease_ms = 1000;
  o.heartbeat_interval_ms = 250;
  o.history_points = 8;
  return o;
}

// Reads the program bytes; 0 once they run out.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t U8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | U8();
    return v;
  }
  double F64() {
    uint64_t bits = 0;
    for (int i = 0; i < 8; ++i) bits = (bits << 8) | U8();
    double d;
    std::memcpy(&d, &bits, sizeof(d));
    return d;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

v1::JobSpec SmallJob(int variant) {
  v1::JobSpec job;
  job.set_name("fuzz");
  v1::ModelSpec* m = job.mutable_model();
  m->set_n_layer(2 + variant % 7);
  m->set_n_head(2);
  m->set_n_embd(64);
  m->set_block_size(32);
  m->set_vocab_size(256);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job.set_global_batch(1 + variant % 16);
  job.set_expected_workers(variant % 4);
  return job;
}

v1::DeviceProfile Device(Bytes& in) {
  v1::DeviceProfile p;
  const uint8_t b = in.U8();
  p.set_host(absl::StrCat("h", b % 4));
  p.set_kind(b & 0x80 ? v1::DEVICE_KIND_CUDA : v1::DEVICE_KIND_CPU);
  p.set_device_name("fuzz device");
  if (p.kind() == v1::DEVICE_KIND_CUDA) p.mutable_memory()->set_gpu_bytes(int64_t{1} << (20 + b % 20));
  p.mutable_memory()->set_host_bytes(int64_t{1} << (16 + in.U8() % 24));
  p.mutable_memory()->set_disk_bytes((b & 0x40) ? int64_t{1} << 34 : 0);
  p.set_fp32_gflops(1 + in.U8() * 10.0);
  p.set_net_gbps((b & 0x20) ? 0 : 1 + b % 10);
  p.set_cores(1 + b % 8);
  p.set_throttle(1);
  if ((b & 0x0f) == 0x0f) p.set_fp32_gflops(in.F64());  // anything, NaN included
  return p;
}

// The ids the program refers to: some joined, some never.
std::string PickId(Bytes& in, const std::vector<std::string>& joined) {
  const uint8_t b = in.U8();
  if (!joined.empty() && b < 200) return joined[b % joined.size()];
  return b % 2 ? "nobody" : "bad id!";
}

void RunProgram(Bytes& in) {
  ManualClock clock(1'000'000);
  CoordinatorCore core(Options(), &clock);
  const int job_variant = in.U8();
  std::vector<std::string> joined;
  uint64_t version = 0;
  for (int op = 0; op < 64 && !in.empty(); ++op) {
    switch (in.U8() % 8) {
      case 0: {  // Join
        v1::JoinRequest r;
        r.set_protocol_version(in.U8() == 0xff ? 2 : kProtocolVersion);
        *r.mutable_device() = Device(in);
        const uint8_t j = in.U8();
        *r.mutable_job() = SmallJob(j < 224 ? job_variant : j);  // mostly the job's own spec
        const uint8_t n = in.U8();
        r.set_mesh_rank(n % 3 == 0 ? n % 5 : -1);
        if (n % 3 == 1) r.set_name(absl::StrCat("n", n % 6));
        auto s = core.Join(r);
        ExpectCode("Join", s.status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kFailedPrecondition, absl::StatusCode::kAlreadyExists,
                    absl::StatusCode::kResourceExhausted});
        if (s.ok()) {
          if (s->lease_ms() != 1000 || s->heartbeat_interval_ms() != 250) {
            Violation("Join returned other lease terms");
          }
          joined.push_back(s->worker_id());
        }
        break;
      }
      case 1: {  // Heartbeat
        v1::HeartbeatRequest r;
        r.set_worker_id(PickId(in, joined));
        const uint8_t b = in.U8();
        if (b & 1) {
          v1::StepStats* st = r.mutable_stats();
          st->set_step(in.U8());
          st->set_loss((b & 2) ? in.F64() : 2.0 + in.U8() / 64.0);
          st->set_tokens_per_s(in.U8() * 100.0);
          st->set_step_time_s((b & 4) ? in.F64() : in.U8() / 16.0);
        }
        auto s = core.Heartbeat(r);
        ExpectCode("Heartbeat", s.status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kNotFound, absl::StatusCode::kFailedPrecondition});
        if (s.ok() && s->assignment_version() > core.Status().layout().version()) {
          Violation("heartbeat names a future layout");
        }
        break;
      }
      case 2: {  // Leave
        v1::LeaveRequest r;
        r.set_worker_id(PickId(in, joined));
        r.set_reason("fuzz");
        ExpectCode("Leave", core.Leave(r),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kNotFound});
        break;
      }
      case 3: {  // Drain
        ExpectCode("Drain", core.Drain(PickId(in, joined)).status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kNotFound, absl::StatusCode::kFailedPrecondition});
        break;
      }
      case 4: {  // Rebalance
        ExpectCode("Rebalance", core.Rebalance().status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kFailedPrecondition,
                    absl::StatusCode::kResourceExhausted, absl::StatusCode::kInvalidArgument});
        break;
      }
      case 5:
        CheckStatus(core, &version);
        break;
      case 6:
        clock.AdvanceMs(in.U8() * 20);
        core.ExpireLeases();
        break;
      case 7: {
        auto s = core.WaitAssignment(PickId(in, joined), in.U8() % 4, absl::ZeroDuration());
        ExpectCode("WaitAssignment", s.status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kNotFound,
                    absl::StatusCode::kFailedPrecondition});
        break;
      }
    }
  }
  CheckStatus(core, &version);
}

// One message of the wire, parsed and sent to a fresh core (which validates it itself).
void RunMessage(uint8_t mode, const uint8_t* data, size_t size) {
  ManualClock clock(1'000'000);
  CoordinatorCore core(Options(), &clock);
  uint64_t version = 0;
  const int n = static_cast<int>(size);
  switch (mode) {
    case 0: {
      v1::JoinRequest r;
      if (!r.ParseFromArray(data, n)) return;
      const absl::Status v = ValidateJoin(r);
      auto s = core.Join(r);
      if (v.ok() != s.ok() && s.status().code() != absl::StatusCode::kResourceExhausted) {
        Violation("Join and ValidateJoin disagree: " + v.ToString() + " / " + s.status().ToString());
      }
      ExpectCode("Join", s.status(),
                 {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                  absl::StatusCode::kFailedPrecondition});
      break;
    }
    case 1: {
      v1::HeartbeatRequest r;
      if (!r.ParseFromArray(data, n)) return;
      (void)ValidateHeartbeat(r);
      ExpectCode("Heartbeat", core.Heartbeat(r).status(),
                 {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound});
      break;
    }
    case 2: {
      v1::LeaveRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("Leave", core.Leave(r),
                 {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound});
      break;
    }
    case 3: {
      v1::DrainRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("Drain", core.Drain(r.worker_id()).status(),
                 {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound});
      break;
    }
    case 4: {
      v1::WatchAssignmentRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("WaitAssignment",
                 core.WaitAssignment(r.worker_id(), 0, absl::ZeroDuration()).status(),
                 {absl::StatusCode::kNotFound});
      break;
    }
    case 5: {
      v1::PingRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("Ping", ValidatePing(r), {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument});
      break;
    }
  }
  CheckStatus(core, &version);
}


// --- Swarm mode ----------------------------------------------------------------------------------
//
// A SwarmCoordinator on a ManualClock, its dial check (`reachable`) a set of addresses the input
// marks unreachable: no socket is opened. Every call's status is checked against the codes its
// contract lists (swarm_coordinator.h's errors plus SwarmState's "Errors" in swarm_state.h, without
// kInternal, which is documented only as a bug); a refused call must leave the roster as it was
// (swarm_state.h: "a refused call changes nothing"); and every roster and status keeps the
// invariants of CheckRoster and CheckStatus.

constexpr int64_t kSwarmLeaseMs = 1000;

// COORDINATOR_FUZZ_TRACE=1 prints every swarm call and its status (to read a crashing input).
bool Tracing() {
  static const bool on = std::getenv("COORDINATOR_FUZZ_TRACE") != nullptr;
  return on;
}
constexpr const char* kTrainSha = "abc";

// The addresses the coordinator cannot dial now, set by the program.
struct SwarmNet {
  std::set<std::string> unreachable;
};

// The swarm a program runs: its job and the knobs the invariants depend on.
struct SwarmConfig {
  int stages = 2;
  int micro_batches = 4;        // M
  int64_t total_steps = 3;
  int64_t lr_hole = -1;         // a step the schedule gives no lr (NaN): the swarm waits there
  int64_t checkpoint_step = -1;
  int max_joiners_per_donor = 2;
  int max_drifts = 2;
  int roster_decisions = 4;
};

// What an honest peer reports for a stage's state `step` (its parameters' hash) and for that
// step's reduced gradient (its sum of squares): the same for every peer of the stage.
uint64_t HonestHash(int stage, int64_t step) {
  return 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(step + 1) + static_cast<uint64_t>(stage);
}
double HonestSumSquares(int stage, int64_t step) {
  return 0.25 + stage + 0.001 * static_cast<double>(step);
}

SwarmCoordinatorOptions SwarmOptions(const SwarmConfig& cfg, const SwarmNet* net) {
  SwarmCoordinatorOptions o;
  o.job.stages = cfg.stages;
  o.job.micro_batches = cfg.micro_batches;
  // Stage s needs 1000 (s + 1) bytes: a 1500-byte joiner fits stage 0 only, a 500-byte one none.
  for (int s = 0; s < cfg.stages; ++s) o.job.stage_bytes.push_back(1000 * (s + 1));
  o.job.grad_clip = 1.0;
  o.job.checkpoint_step = cfg.checkpoint_step;
  if (cfg.checkpoint_step >= 0) o.checkpoint_path = "/ckpt/start";
  o.state.max_joiners_per_donor = cfg.max_joiners_per_donor;
  o.state.max_drifts = cfg.max_drifts;
  o.state.learning_rate = [total = cfg.total_steps, hole = cfg.lr_hole](int64_t step) {
    return step < total && step != hole ? 0.01 : std::nan("");
  };
  o.info.set_config_toml("[model]\n");
  o.info.set_stages(cfg.stages);
  o.info.set_micro_batches(cfg.micro_batches);
  o.info.set_total_steps(cfg.total_steps);
  for (int s = 0; s < cfg.stages; ++s) {
    o.info.add_first_layer(s);
    o.info.add_end_layer(s + 1);
  }
  o.info.set_codec("fp32");
  o.info.set_train_sha256(kTrainSha);
  o.lease_ms = kSwarmLeaseMs;
  o.heartbeat_interval_ms = 250;
  o.history_points = 8;
  o.roster_decisions = cfg.roster_decisions;
  o.reachable = [net](const std::string& address) { return net->unreachable.count(address) == 0; };
  return o;
}

// The addresses peers advertise: six dialable ones (until the program marks them unreachable)
// and two malformed.
std::string SwarmAddress(uint8_t b) {
  switch (b % 8) {
    case 6: return "nohost";
    case 7: return "[::1";
    default: return absl::StrCat("127.0.0.1:", 1 + b % 8);
  }
}

const v1::SwarmPeerEntry* FindPeer(const v1::SwarmRoster& r, const std::string& id) {
  for (const v1::SwarmStageEntry& st : r.stages()) {
    for (const v1::SwarmPeerEntry& p : st.peers()) {
      if (p.id() == id) return &p;
    }
  }
  return nullptr;
}

bool IsTrainer(const v1::SwarmRoster& r, const std::string& id) {
  for (const std::string& t : r.trainers()) {
    if (t == id) return true;
  }
  return false;
}

// The sync source a join (or a failed donor's answer) names must be one the contract knows, with
// a donor exactly when it is "donor", and the step to sync the one swarm_state.h's SwarmJoin says.
void CheckJoinInfo(const char* call, const v1::SwarmJobInfo& j, const SwarmConfig& cfg,
                   const v1::SwarmRoster& after) {
  if (j.stage() < 0 || j.stage() >= cfg.stages) {
    Violation(absl::StrCat(call, " placed a peer at stage ", j.stage()));
  }
  const std::string& src = j.sync_source();
  if (src != "donor" && src != "wait" && src != "checkpoint" && src != "init") {
    Violation(absl::StrCat(call, " named the sync source '", src, "'"));
  }
  if ((src == "donor") != !j.donor().empty()) {
    Violation(absl::StrCat(call, ": sync source ", src, " with donor '", j.donor(), "'"));
  }
  if (src == "donor") {
    const v1::SwarmPeerEntry* d = FindPeer(after, j.donor());
    if (d == nullptr || d->stage() != j.stage() || d->state() == "SYNCING") {
      Violation(absl::StrCat(call, ": donor '", j.donor(), "' holds no state of stage ", j.stage()));
    }
  }
  const int64_t want = src == "checkpoint" ? after.checkpoint_step()
                       : src == "init"     ? 0
                                           : after.next_step();
  if (j.sync_step() != want) {
    Violation(absl::StrCat(call, ": sync from ", src, " of state ", j.sync_step(), ", want ", want));
  }
  if (j.stages() != cfg.stages || j.micro_batches() != cfg.micro_batches ||
      j.total_steps() != cfg.total_steps) {
    Violation(absl::StrCat(call, " returned another job"));
  }
}

// One lease the program holds, as the coordinator granted it.
struct SwarmHeldLease {
  std::string trainer;
  std::set<int> stages;  // still to commit
};

class SwarmFuzz {
 public:
  explicit SwarmFuzz(const SwarmConfig& cfg) : cfg_(cfg), clock_(1'000'000) {
    auto made = SwarmCoordinator::Create(SwarmOptions(cfg_, &net_), &clock_);
    if (!made.ok()) Violation("swarm setup: " + made.status().ToString());
    swarm_ = std::move(*made);
    roster_ = swarm_->Roster();
    CheckRoster(roster_);
  }

  // A small swarm at work: 2 stages, M = 4; p0 (stage 0) and p1 (stage 1) synced and serving
  // step 0; trainers t0 and t1; t0 leased the 4 micro-batches and stage 1 holds them all (it is
  // reducing), stage 0 none; joiners p2 and p3 syncing from donors; p3's address unreachable now.
  static SwarmConfig SmallConfig() { return SwarmConfig{}; }
  void SetUpSmall() {
    auto must = [](const char* what, const absl::Status& s) {
      if (!s.ok()) Violation(absl::StrCat("small swarm: ", what, ": ", s.ToString()));
    };
    must("join p0", JoinPeer("p0", "127.0.0.1:1", int64_t{1} << 20).status());
    must("join p1", JoinPeer("p1", "127.0.0.1:2", int64_t{1} << 20).status());
    for (const char* p : {"p0", "p1"}) {
      v1::PeerSyncedRequest r;
      r.set_peer_id(p);
      r.set_step(0);
      r.set_param_hash(HonestHash(FindPeer(swarm_->Roster(), p)->stage(), 0));
      must("sync", swarm_->PeerSynced(r).status());
    }
    for (const char* t : {"t0", "t1"}) {
      v1::JoinRequest r;
      r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
      r.set_role(v1::WORKER_ROLE_TRAINER);
      r.set_name(t);
      r.set_train_sha256(kTrainSha);
      must("join trainer", swarm_->Join(r).status());
      ids_.push_back(t);
      trainers_.push_back(t);
    }
    v1::LeaseRequest lease;
    lease.set_worker_id("t0");
    lease.set_max(cfg_.micro_batches);
    auto leased = swarm_->Lease(lease);
    must("lease", leased.status());
    if (leased->leases_size() != cfg_.micro_batches) Violation("small swarm: short lease");
    const std::string last = FindPeer(swarm_->Roster(), "p0")->stage() == 1 ? "p0" : "p1";
    for (const v1::SwarmLeaseEntry& l : leased->leases()) {
      v1::CommitRequest c;
      c.set_peer_id(last);
      c.set_trainer_id("t0");
      c.set_step(0);
      c.set_id(l.id());
      c.set_has_loss(true);
      c.set_loss(2.5);
      must("commit", swarm_->Commit(c));
      leases_[l.id()] = SwarmHeldLease{"t0", {0}};
    }
    must("join p2", JoinPeer("p2", "127.0.0.1:3", int64_t{1} << 20).status());
    must("join p3", JoinPeer("p3", "127.0.0.1:4", int64_t{1} << 20).status());
    net_.unreachable.insert("127.0.0.1:4");
    roster_ = swarm_->Roster();
    CheckRoster(roster_);
    epoch_ = Epoch();
    if (!roster_.step_open() || roster_.stages(1).phase() != "reducing") {
      Violation("small swarm: " + roster_.ShortDebugString());
    }
  }

  // --- The calls, each checked -------------------------------------------------------------------

  void Join(const v1::JoinRequest& r) {
    auto s = swarm_->Join(r);
    After("Join", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
           absl::StatusCode::kFailedPrecondition, absl::StatusCode::kAlreadyExists,
           absl::StatusCode::kResourceExhausted});
    if (!s.ok()) return;
    if (s->worker_id().empty() || (!r.name().empty() && s->worker_id() != r.name())) {
      Violation(absl::StrCat("Join named '", r.name(), "' returned id '", s->worker_id(), "'"));
    }
    if (s->lease_ms() != kSwarmLeaseMs || s->heartbeat_interval_ms() != 250) {
      Violation("Join returned other lease terms");
    }
    ids_.push_back(s->worker_id());
    if (r.role() == v1::WORKER_ROLE_PEER) {
      CheckJoinInfo("Join", s->swarm(), cfg_, roster_);
      const v1::SwarmPeerEntry* p = FindPeer(roster_, s->worker_id());
      if (p == nullptr || p->stage() != s->swarm().stage() || p->state() != "SYNCING") {
        Violation(absl::StrCat("peer ", s->worker_id(), " joined stage ", s->swarm().stage(),
                               " but the roster has ", p ? p->ShortDebugString() : "nothing"));
      }
    } else {
      trainers_.push_back(s->worker_id());
      if (!IsTrainer(roster_, s->worker_id())) {
        Violation("trainer " + s->worker_id() + " joined but is not in the roster");
      }
    }
  }

  void Heartbeat(const v1::HeartbeatRequest& r) {
    auto s = swarm_->Heartbeat(r);
    After("Heartbeat", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition});
    if (s.ok() && (s->lease_ms() != kSwarmLeaseMs || s->assignment_version() != roster_.version())) {
      Violation("Heartbeat answered " + s->ShortDebugString() + " at roster version " +
                absl::StrCat(roster_.version()));
    }
  }

  void Leave(const v1::LeaveRequest& r) {
    const absl::Status s = swarm_->Leave(r);
    After("Leave", s,
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition});
    if (s.ok() && (FindPeer(roster_, r.worker_id()) != nullptr || IsTrainer(roster_, r.worker_id()))) {
      Violation(r.worker_id() + " left but is still in the roster");
    }
  }

  void Drain(const std::string& id) {
    const v1::SwarmPeerEntry* before = FindPeer(roster_, id);
    const bool held = before != nullptr && before->state() != "SYNCING";
    const absl::Status s = swarm_->Drain(id);
    After("Drain", s,
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition});
    const v1::SwarmPeerEntry* p = FindPeer(roster_, id);
    if (s.ok() && held && (p == nullptr || p->state() != "DRAINING")) {
      Violation(absl::StrCat("peer ", id, " drained but the roster has ",
                             p ? p->ShortDebugString() : "nothing"));
    }
  }

  void WaitRoster(const v1::WatchRosterRequest& r) {
    auto s = swarm_->WaitRoster(r.worker_id(), r.known_version(), absl::ZeroDuration());
    After("WaitRoster", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition});
    if (s.ok() && s->SerializeAsString() != roster_.SerializeAsString()) {
      Violation("WaitRoster returned another roster than Roster()");
    }
  }

  void Lease(const v1::LeaseRequest& r) {
    auto s = swarm_->Lease(r);
    After("Lease", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition});
    if (!s.ok()) return;
    for (int64_t id : r.release()) {
      auto it = leases_.find(id);
      if (it != leases_.end() && it->second.trainer == r.worker_id()) leases_.erase(it);
    }
    if (s->step_open() != roster_.step_open() ||
        s->step() != (roster_.step_open() ? roster_.open_step() : roster_.next_step())) {
      Violation("Lease answered " + s->ShortDebugString() + " at " + roster_.ShortDebugString());
    }
    if (s->leases_size() > r.max()) {
      Violation(absl::StrCat("Lease granted ", s->leases_size(), " of at most ", r.max()));
    }
    const int64_t first = s->step() * cfg_.micro_batches;
    for (const v1::SwarmLeaseEntry& l : s->leases()) {
      if (s->step() != roster_.open_step() || l.id() < first ||
          l.id() >= first + cfg_.micro_batches) {
        Violation(absl::StrCat("Lease granted id ", l.id(), " of step ", s->step(),
                               " with step ", roster_.open_step(), " open"));
      }
      std::set<int> stages;
      for (int st : l.stages()) {
        if (st < 0 || st >= cfg_.stages || !stages.insert(st).second ||
            st != *stages.rbegin()) {
          Violation("Lease named stages " + l.ShortDebugString());
        }
      }
      if (stages.empty() || l.replay() != (l.stages_size() < cfg_.stages)) {
        Violation("Lease: a replay is exactly a lease of fewer stages than all: " +
                  l.ShortDebugString());
      }
      // The ledger's "one holder per id at a time".
      auto held = leases_.find(l.id());
      if (held != leases_.end()) {
        Violation(absl::StrCat("Lease granted id ", l.id(), " to ", r.worker_id(),
                               " while ", held->second.trainer, " holds it"));
      }
      leases_[l.id()] = SwarmHeldLease{r.worker_id(), stages};
    }
  }

  void Commit(const v1::CommitRequest& r) {
    const v1::SwarmPeerEntry* p = FindPeer(roster_, r.peer_id());
    const int stage = p != nullptr ? p->stage() : -1;
    const absl::Status s = swarm_->Commit(r);
    After("Commit", s,
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition, absl::StatusCode::kAlreadyExists,
           absl::StatusCode::kOutOfRange});
    if (!s.ok()) return;
    // Accepted: the id was leased to that trainer and still needed the peer's stage.
    auto held = leases_.find(r.id());
    if (stage < 0 || held == leases_.end() || held->second.trainer != r.trainer_id() ||
        held->second.stages.erase(stage) == 0) {
      Violation(absl::StrCat("Commit of id ", r.id(), " at stage ", stage, " by ", r.peer_id(),
                             " for ", r.trainer_id(), " accepted, but ",
                             held == leases_.end() ? std::string("nobody holds its lease")
                                                   : "its lease is " + held->second.trainer +
                                                         "'s for other stages"));
    }
    if (held->second.stages.empty()) leases_.erase(held);
  }

  void ReportPeer(const v1::ReportPeerRequest& r) {
    const v1::SwarmRoster before = roster_;
    auto s = swarm_->ReportPeer(r);
    After("ReportPeer", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition});
    if (!s.ok()) return;
    if (s->fenced() && FindPeer(roster_, r.peer_id()) != nullptr) {
      Violation("ReportPeer fenced " + r.peer_id() + ", still in the roster");
    }
    if (!s->fenced() && roster_.SerializeAsString() != before.SerializeAsString()) {
      Violation("ReportPeer reached " + r.peer_id() + " and changed the roster");
    }
  }

  void PeerSynced(const v1::PeerSyncedRequest& r) {
    auto s = swarm_->PeerSynced(r);
    After("PeerSynced", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition, absl::StatusCode::kOutOfRange,
           absl::StatusCode::kDataLoss});
    if (!s.ok()) return;
    const v1::SwarmPeerEntry* p = FindPeer(roster_, r.peer_id());
    if (!r.failed_donor().empty()) {
      CheckJoinInfo("PeerSynced (failed donor)", s->swarm(), cfg_, roster_);
    } else if (p == nullptr || (p->state() == "SYNCING" && !p->synced()) ||
               (p->state() != "SYNCING" && !p->in_round() &&
                !(p->state() == "SERVING" && !roster_.step_open() &&
                  roster_.trainers_size() == 0 &&
                  absl::StrContains(roster_.waiting(), "waits for a trainer")))) {
      // An accepted claim: synced, already serving in a round that opened with it, or serving
      // while the next round waits for a trainer.
      Violation(absl::StrCat("PeerSynced of ", r.peer_id(), " accepted; the roster has ",
                             p ? p->ShortDebugString() : "nothing"));
    }
  }

  void StageReport(const v1::StageReportRequest& r) {
    auto s = swarm_->StageReport(r);
    After("StageReport", s.status(),
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition, absl::StatusCode::kOutOfRange,
           absl::StatusCode::kAlreadyExists});
    if (!s.ok()) return;
    if (s->phase() != "collecting" && s->phase() != "reducing" && s->phase() != "agreed") {
      Violation("StageReport answered phase " + s->phase());
    }
    if (s->decided()) {
      const v1::SwarmDecision& d = s->decision();
      if (d.step() != r.step() || d.stage_hashes_size() != cfg_.stages) {
        Violation(absl::StrCat("StageReport of step ", r.step(), " decided ", d.ShortDebugString()));
      }
      CheckDecision(d);
    }
  }

  void CheckpointSaved(const v1::CheckpointSavedRequest& r) {
    const absl::Status s = swarm_->CheckpointSaved(r);
    After("CheckpointSaved", s,
          {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
           absl::StatusCode::kFailedPrecondition, absl::StatusCode::kOutOfRange});
    if (s.ok() && (roster_.checkpoint_step() != r.step() || roster_.checkpoint_path() != r.path())) {
      Violation(absl::StrCat("checkpoint of state ", r.step(), " saved; the roster says state ",
                             roster_.checkpoint_step(), " at '", roster_.checkpoint_path(), "'"));
    }
  }

  // Time passes; workers silent for longer than a lease are dead.
  void Advance(int64_t ms) {
    clock_.AdvanceMs(ms);
    if (swarm_->ExpireLeases() < 0) Violation("ExpireLeases counted below zero");
    Refresh();
    const v1::ClusterStatus st = swarm_->Status();
    for (const v1::WorkerStatus& w : st.workers()) {
      if ((w.state() == v1::WORKER_STATE_ALIVE || w.state() == v1::WORKER_STATE_DRAINING) &&
          st.now_unix_ms() - w.last_heartbeat_unix_ms() > kSwarmLeaseMs) {
        Violation("worker " + w.worker_id() + " outlived its lease");
      }
    }
  }

  // --- The program -------------------------------------------------------------------------------

  void Run(Bytes& in) {
    for (int op = 0; op < 256 && !in.empty(); ++op) {
      switch (in.U8() % 18) {
        case 0: OpJoinPeer(in); break;
        case 1: OpJoinTrainer(in); break;
        case 2: OpSync(in); break;
        case 3: OpLease(in); break;
        case 4:
        case 5: OpCommit(in); break;
        case 6:
        case 7: OpStageReport(in); break;
        case 8: OpReportPeer(in); break;
        case 9: {  // the network: an address becomes (un)reachable
          const std::string a = SwarmAddress(in.U8());
          if (!net_.unreachable.erase(a)) net_.unreachable.insert(a);
          break;
        }
        case 10: OpHeartbeat(in); break;
        case 11: Advance(in.U8() * 20); break;
        case 12: {
          v1::LeaveRequest r;
          r.set_worker_id(PickWorker(in));
          r.set_reason("fuzz");
          Leave(r);
          break;
        }
        case 13: Drain(PickWorker(in)); break;
        case 14: OpCheckpoint(in); break;
        case 15: {
          if (in.U8() & 1) {
            CheckStatus();
          } else {
            v1::WatchRosterRequest r;
            r.set_worker_id(PickWorker(in));
            const uint8_t b = in.U8();
            r.set_known_version(b < 128 ? roster_.version() : b);
            WaitRoster(r);
          }
          break;
        }
        case 16: OpSyncAll(); break;
        case 17: OpDriveStep(in); break;
      }
    }
    CheckStatus();
    if (Tracing()) {
      std::fprintf(stderr, "swarm: next step %lld, counters %s\n",
                   static_cast<long long>(roster_.next_step()),
                   roster_.counters().ShortDebugString().c_str());
    }
  }

  // What must hold of any status: the roster's invariants, a known health that says what the
  // roster says, and every worker the roster lists being a live worker of its role.
  void CheckStatus() {
    const v1::ClusterStatus s = swarm_->Status();
    CheckRoster(s.swarm());
    if (s.swarm().SerializeAsString() != roster_.SerializeAsString()) {
      Violation("Status() shows another roster than Roster() did, nothing having happened");
    }
    const std::string& h = s.health();
    if (h != "waiting" && h != "healthy" && h != "degraded") Violation("health is " + h);
    const v1::SwarmRoster& r = s.swarm();
    const std::string want = !r.rollback().empty()              ? "degraded"
                             : r.step_open() || r.finished() ? "healthy"
                                                             : "waiting";
    if (h != want) Violation(absl::StrCat("health ", h, " for ", r.ShortDebugString()));
    if (s.job_status().history_size() > 8) Violation("history longer than its bound");
    const v1::Counters& c = s.counters();
    if (c.joins_total() < 0 || c.leaves_total() < 0 || c.heartbeats_total() < 0 ||
        c.expirations_total() < 0 || c.rejected_requests_total() < 0) {
      Violation("a counter is negative");
    }
    std::map<std::string, const v1::WorkerStatus*> workers;
    std::set<std::string> live_trainers;
    for (const v1::WorkerStatus& w : s.workers()) {
      if (!workers.emplace(w.worker_id(), &w).second) Violation("worker listed twice: " + w.worker_id());
      const bool live = w.state() == v1::WORKER_STATE_ALIVE || w.state() == v1::WORKER_STATE_DRAINING;
      if (live && w.assignment().reason() == "trainer") live_trainers.insert(w.worker_id());
    }
    for (const v1::SwarmStageEntry& st : r.stages()) {
      for (const v1::SwarmPeerEntry& p : st.peers()) {
        auto w = workers.find(p.id());
        if (w == workers.end() || w->second->assignment().reason() != "peer" ||
            (w->second->state() != v1::WORKER_STATE_ALIVE &&
             w->second->state() != v1::WORKER_STATE_DRAINING)) {
          Violation("the roster lists peer " + p.id() + ", no live peer of that id");
        }
      }
    }
    std::set<std::string> roster_trainers(r.trainers().begin(), r.trainers().end());
    if (roster_trainers != live_trainers) {
      Violation(absl::StrCat("the roster's trainers (", r.trainers_size(),
                             ") are not the live trainers (", live_trainers.size(), ")"));
    }
  }

 private:
  // --- Ops built from the program's bytes --------------------------------------------------------

  absl::StatusOr<v1::JoinResponse> JoinPeer(const std::string& name, const std::string& address,
                                            int64_t bytes) {
    v1::JoinRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    r.set_role(v1::WORKER_ROLE_PEER);
    r.set_name(name);
    r.set_advertise(address);
    SetDevice(&r, bytes);
    auto s = swarm_->Join(r);
    if (s.ok()) ids_.push_back(s->worker_id());
    return s;
  }

  static void SetDevice(v1::JoinRequest* r, int64_t bytes) {
    v1::DeviceProfile* d = r->mutable_device();
    d->set_host("node1");
    d->set_device_name("cpu");
    d->set_cores(2);
    d->set_throttle(1);
    d->set_kind(v1::DEVICE_KIND_CPU);
    d->set_fp32_gflops(10);
    d->mutable_memory()->set_host_bytes(bytes);
  }

  // Any id the program met (peers and trainers), or a stranger, or a malformed one.
  std::string PickWorker(Bytes& in) {
    const uint8_t b = in.U8();
    if (!ids_.empty() && b < 224) return ids_[b % ids_.size()];
    switch (b % 4) {
      case 0: return "nobody";
      case 1: return "bad id!";
      case 2: return "";
      default: return std::string(300, 'x');
    }
  }

  std::string PickTrainer(Bytes& in) {
    const uint8_t b = in.U8();
    if (!trainers_.empty() && b < 200) return trainers_[b % trainers_.size()];
    return PickWorker(in);
  }

  // The peers of a stage in its open round.
  std::vector<std::string> RoundPeers(int stage) const {
    std::vector<std::string> out;
    if (stage < 0 || stage >= roster_.stages_size()) return out;
    for (const v1::SwarmPeerEntry& p : roster_.stages(stage).peers()) {
      if (p.in_round()) out.push_back(p.id());
    }
    return out;
  }

  void OpJoinPeer(Bytes& in) {
    const uint8_t a = in.U8(), b = in.U8();
    v1::JoinRequest r;
    r.set_protocol_version(a == 0xff ? 2 : v1::PROTOCOL_VERSION_CURRENT);
    r.set_role(v1::WORKER_ROLE_PEER);
    switch (a % 8) {
      case 5: case 6: break;  // the coordinator names it
      case 7: r.set_name(a & 0x80 ? "bad id!" : "t0"); break;
      default: r.set_name(absl::StrCat("p", a % 8 + 8 * ((a >> 3) % 2))); break;
    }
    r.set_advertise(SwarmAddress(b));
    if ((a & 0x40) == 0) {
      static constexpr int64_t kBytes[] = {int64_t{1} << 20, int64_t{1} << 20, 1500, 500};
      SetDevice(&r, kBytes[(b >> 3) % 4]);
      if ((b & 0xe0) == 0xe0) r.mutable_device()->set_fp32_gflops(std::nan(""));
    }
    Join(r);
  }

  void OpJoinTrainer(Bytes& in) {
    const uint8_t a = in.U8();
    v1::JoinRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    r.set_role(v1::WORKER_ROLE_TRAINER);
    switch (a % 8) {
      case 4: case 5: break;
      case 6: r.set_name("p0"); break;
      case 7: r.set_name("bad id!"); break;
      default: r.set_name(absl::StrCat("t", a % 8)); break;
    }
    switch ((a >> 3) % 4) {
      case 0: case 1: r.set_train_sha256(kTrainSha); break;
      case 2: break;
      default: r.set_train_sha256("other"); break;
    }
    Join(r);
  }

  void OpSync(Bytes& in) {
    const uint8_t a = in.U8(), b = in.U8();
    std::vector<const v1::SwarmPeerEntry*> syncing;
    for (const v1::SwarmStageEntry& st : roster_.stages()) {
      for (const v1::SwarmPeerEntry& p : st.peers()) {
        if (p.state() == "SYNCING") syncing.push_back(&p);
      }
    }
    v1::PeerSyncedRequest r;
    const v1::SwarmPeerEntry* p = nullptr;
    if (a < 192 && !syncing.empty()) {
      p = syncing[in.U8() % syncing.size()];
      r.set_peer_id(p->id());
    } else {
      r.set_peer_id(PickWorker(in));
      p = FindPeer(roster_, r.peer_id());
    }
    const int stage = p != nullptr ? p->stage() : 0;
    const int64_t next = roster_.next_step();
    r.set_step(next);
    r.set_param_hash(HonestHash(stage, next));
    switch (b % 8) {
      case 4: r.set_param_hash(HonestHash(stage, next) ^ (1 + (b >> 4))); break;  // a bad copy
      case 5:
        r.set_step(b & 0x10 ? next + 1 : next - 1);
        r.set_param_hash(HonestHash(stage, r.step()));
        break;
      case 6:
        r.set_failed_donor(p != nullptr && !p->donor().empty() ? p->donor() : "p0");
        r.set_error("fuzz");
        break;
      case 7:
        r.set_failed_donor(PickWorker(in));
        break;
      default: break;  // an honest claim
    }
    PeerSynced(r);
  }

  void OpLease(Bytes& in) {
    const uint8_t b = in.U8();
    v1::LeaseRequest r;
    r.set_worker_id(PickTrainer(in));
    r.set_max(b == 0xff ? -1 : b == 0xfe ? 5000 : b % 6);
    if (b & 0x40) {
      for (const auto& [id, held] : leases_) {
        if (held.trainer == r.worker_id() && r.release_size() < 2) r.add_release(id);
      }
    }
    if (b & 0x80) r.add_release(roster_.next_step() * cfg_.micro_batches + in.U8() % 8 - 2);
    Lease(r);
  }

  void OpCommit(Bytes& in) {
    const uint8_t a = in.U8(), b = in.U8();
    v1::CommitRequest r;
    const int64_t step = roster_.step_open() ? roster_.open_step() : roster_.next_step();
    int stage = -1;
    if (a < 208 && !leases_.empty()) {
      // A lease the program holds, committed at one of its stages by a round peer of that stage.
      auto it = std::next(leases_.begin(), b % leases_.size());
      stage = *std::next(it->second.stages.begin(), (b >> 4) % it->second.stages.size());
      const std::vector<std::string> round = RoundPeers(stage);
      r.set_peer_id(!round.empty() ? round[in.U8() % round.size()] : PickWorker(in));
      r.set_trainer_id(it->second.trainer);
      r.set_step(step);
      r.set_id(it->first);
    } else {
      r.set_peer_id(PickWorker(in));
      r.set_trainer_id(PickTrainer(in));
      r.set_step(a % 4 == 0 ? step + (b % 3) - 1 : step);
      r.set_id(step * cfg_.micro_batches + static_cast<int64_t>(in.U8() % (cfg_.micro_batches + 2)) - 1);
    }
    if (stage == cfg_.stages - 1 || (a & 0x20)) {
      r.set_has_loss(true);
      r.set_loss((a & 0x0f) == 0x0f ? std::nan("") : 2.0 + b / 64.0);
    }
    Commit(r);
  }

  void OpStageReport(Bytes& in) {
    const uint8_t a = in.U8(), b = in.U8(), c = in.U8();
    const int stage = a % cfg_.stages;
    const v1::SwarmStageEntry& st = roster_.stages(stage);
    const int64_t step = roster_.step_open() ? roster_.open_step() : roster_.next_step();
    v1::StageReportRequest r;
    r.set_step(step);
    if (st.has_reduction() && st.reduction().peers_size() > 0) {
      // A plan peer's report from the roster's plan; one that has not reported yet, mostly.
      const v1::SwarmReductionPlan& plan = st.reduction();
      std::vector<int> pending;
      for (int i = 0; i < plan.peers_size(); ++i) {
        if (std::find(st.reported().begin(), st.reported().end(), plan.peers(i)) ==
            st.reported().end()) {
          pending.push_back(i);
        }
      }
      const int i = !pending.empty() && (b & 1) == 0 ? pending[(b >> 1) % pending.size()]
                                                     : (b >> 1) % plan.peers_size();
      r.set_peer_id(plan.peers(i));
      r.set_step(plan.step());
      r.set_plan(plan.plan());
      for (const v1::SwarmPlanIds& e : plan.ids()) {
        if (e.peer() == plan.peers(i)) r.mutable_ids()->CopyFrom(e.ids());
      }
    } else {
      r.set_peer_id(PickWorker(in));
      r.set_plan(b % 4);
      for (int i = 0; i < b % 3; ++i) r.add_ids(step * cfg_.micro_batches + i);
    }
    r.set_sum_squares(HonestSumSquares(stage, r.step()));
    r.set_param_hash(HonestHash(stage, r.step()));
    switch (c % 16) {
      case 10: r.set_param_hash(r.param_hash() ^ (1 + (c >> 4) % 2)); break;  // drifted
      case 11: r.set_sum_squares(r.sum_squares() + 1); break;
      case 12: {
        static constexpr double kBad[] = {-1, 1e308, std::numeric_limits<double>::infinity(), 0};
        r.set_sum_squares((c >> 4) % 4 == 3 ? std::nan("") : kBad[(c >> 4) % 4]);
        break;
      }
      case 13:
        switch ((c >> 4) % 3) {
          case 0: if (r.ids_size() > 0) r.mutable_ids()->RemoveLast(); break;
          case 1: r.add_ids((step + 1) * cfg_.micro_batches); break;
          default: if (r.ids_size() > 0) r.add_ids(r.ids(0)); break;
        }
        break;
      case 14: r.set_plan(r.plan() + (c & 0x10 ? 1 : -1)); break;
      case 15: r.set_step(r.step() + (c & 0x10 ? 1 : -1)); break;
      default: break;  // honest
    }
    StageReport(r);
  }

  // Every joiner not synced yet claims the newest state, honestly: the program reaches the next
  // rounds, with more than one peer a stage, in one op.
  void OpSyncAll() {
    std::vector<std::pair<std::string, int>> joiners;
    for (const v1::SwarmStageEntry& st : roster_.stages()) {
      for (const v1::SwarmPeerEntry& p : st.peers()) {
        if (p.state() == "SYNCING" && !p.synced()) joiners.emplace_back(p.id(), st.index());
      }
    }
    for (const auto& [id, stage] : joiners) {
      v1::PeerSyncedRequest r;
      r.set_peer_id(id);
      r.set_step(roster_.next_step());
      r.set_param_hash(HonestHash(stage, roster_.next_step()));
      PeerSynced(r);
    }
  }

  // The open step carried as far as it goes honestly, in one op: a trainer leases what is free,
  // every lease the program holds is committed at round peers of its stages, and (unless the op's
  // byte is odd: then the program's own reports may come first) every plan peer that has not
  // reported reports what its stage's honest peers do (one that reported otherwise is then found
  // drifting).
  void OpDriveStep(Bytes& in) {
    const uint8_t b = in.U8();
    if (!roster_.step_open()) return;
    if (!trainers_.empty()) {
      v1::LeaseRequest r;
      r.set_worker_id(trainers_[b % trainers_.size()]);
      r.set_max(cfg_.micro_batches);
      Lease(r);
    }
    const std::vector<std::pair<int64_t, SwarmHeldLease>> held(leases_.begin(), leases_.end());
    for (const auto& [id, lease] : held) {
      for (int stage : lease.stages) {
        if (!roster_.step_open()) return;
        const std::vector<std::string> round = RoundPeers(stage);
        if (round.empty()) continue;
        v1::CommitRequest r;
        r.set_peer_id(round[static_cast<size_t>(id + (b >> 4)) % round.size()]);
        r.set_trainer_id(lease.trainer);
        r.set_step(roster_.open_step());
        r.set_id(id);
        if (stage == cfg_.stages - 1) {
          r.set_has_loss(true);
          r.set_loss(2.0 + static_cast<double>(id % 7) / 8);
        }
        Commit(r);
      }
    }
    if (b & 1) return;
    for (int n = 0; n < 4 * cfg_.stages && roster_.step_open(); ++n) {
      bool found = false;
      v1::StageReportRequest r;
      for (const v1::SwarmStageEntry& st : roster_.stages()) {
        if (st.phase() != "reducing" || found) continue;
        const v1::SwarmReductionPlan& plan = st.reduction();
        for (int i = 0; i < plan.peers_size() && !found; ++i) {
          if (std::find(st.reported().begin(), st.reported().end(), plan.peers(i)) !=
              st.reported().end()) {
            continue;
          }
          r.set_peer_id(plan.peers(i));
          r.set_step(plan.step());
          r.set_plan(plan.plan());
          r.mutable_ids()->CopyFrom(plan.ids(i).ids());
          r.set_sum_squares(HonestSumSquares(st.index(), plan.step()));
          r.set_param_hash(HonestHash(st.index(), plan.step()));
          found = true;
        }
      }
      if (!found) return;
      StageReport(r);
    }
  }

  void OpReportPeer(Bytes& in) {
    const uint8_t a = in.U8();
    v1::ReportPeerRequest r;
    r.set_worker_id(PickWorker(in));
    r.set_peer_id(PickWorker(in));
    r.set_reason("fuzz");
    if (a & 1) {
      // The peer is down: the coordinator's dial fails too.
      if (const v1::SwarmPeerEntry* p = FindPeer(roster_, r.peer_id())) {
        net_.unreachable.insert(p->address());
      }
    }
    ReportPeer(r);
  }

  void OpHeartbeat(Bytes& in) {
    const uint8_t b = in.U8();
    v1::HeartbeatRequest r;
    r.set_worker_id(PickWorker(in));
    if (b & 1) {
      v1::StepStats* st = r.mutable_stats();
      st->set_step(in.U8());
      st->set_loss(2.0);
      st->set_tokens_per_s((b & 2) ? std::nan("") : in.U8() * 10.0);  // > 0: a load report
    }
    Heartbeat(r);
  }

  void OpCheckpoint(Bytes& in) {
    const uint8_t b = in.U8();
    v1::CheckpointSavedRequest r;
    r.set_worker_id(PickTrainer(in));
    const int64_t next = roster_.next_step();
    switch (b % 8) {
      case 0: r.set_step(roster_.checkpoint_step()); break;
      case 1: r.set_step(next + 1); break;
      case 2: r.set_step(next - 1); break;
      case 3: r.set_step(-1 - (b >> 3)); break;
      default: r.set_step(next); break;
    }
    r.set_path(b & 0x80 ? "" : (b & 0x40) ? std::string(5000, 'c') : absl::StrCat("ckpt/step_", r.step()));
    CheckpointSaved(r);
  }

  // --- Oracles -----------------------------------------------------------------------------------

  // (step open, open step, rollbacks): the ledger's leases live within one such epoch.
  std::tuple<bool, int64_t, int64_t> Epoch() const {
    return {roster_.step_open(), roster_.open_step(), roster_.counters().rollbacks()};
  }

  // A new roster after something happened: checked, and the program's leases brought up to date
  // (a new round or a rollback ends them all; a trainer that is gone gave its own back).
  void Refresh() {
    v1::SwarmRoster now = swarm_->Roster();
    CheckRoster(now);
    roster_ = std::move(now);
    if (Epoch() != epoch_) {
      leases_.clear();
      epoch_ = Epoch();
    }
    for (auto it = leases_.begin(); it != leases_.end();) {
      it = IsTrainer(roster_, it->second.trainer) ? std::next(it) : leases_.erase(it);
    }
  }

  // After a call: its code is one of `allowed`, and a refused call changed nothing (the count of
  // refused duplicate commits aside).
  void After(const char* call, const absl::Status& s,
             std::initializer_list<absl::StatusCode> allowed) {
    if (Tracing()) std::fprintf(stderr, "swarm: %s -> %s\n", call, s.ToString().c_str());
    ExpectCode(call, s, allowed);
    const v1::SwarmRoster before = roster_;
    Refresh();
    if (!s.ok()) {
      v1::SwarmRoster a = before, b = roster_;
      a.mutable_counters()->clear_duplicates();
      b.mutable_counters()->clear_duplicates();
      if (a.SerializeAsString() != b.SerializeAsString()) {
        Violation(absl::StrCat(call, " was refused (", s.ToString(),
                               ") but changed the roster:\n  before ", before.ShortDebugString(),
                               "\n  after  ", roster_.ShortDebugString()));
      }
    }
  }

  void CheckDecision(const v1::SwarmDecision& d) const {
    // clip_scale = min(1, grad_clip / (norm + 1e-6)) with grad_clip 1 (swarm_state.h).
    const double want = std::min(1.0, 1.0 / (d.grad_norm() + 1e-6));
    if (!(d.grad_norm() >= 0) || !(d.clip_scale() >= 0 && d.clip_scale() <= 1) ||
        std::fabs(d.clip_scale() - want) > 1e-12 || !(d.lr() == 0.01)) {
      Violation("decision " + d.ShortDebugString());
    }
  }

  // What must hold of every roster, and between one and the next.
  void CheckRoster(const v1::SwarmRoster& r) {
    const int S = cfg_.stages, M = cfg_.micro_batches;
    const v1::SwarmCounters& c = r.counters();
    if (seen_ && r.job() != last_.job()) {
      // The next job: only once every worker of the last one is gone after its end; it starts
      // afresh at step 0 from the init.
      const v1::SwarmRoster& o = last_;
      if (r.job() != o.job() + 1 || !o.finished() || r.next_step() != 0 ||
          r.checkpoint_step() != -1 || r.decisions_size() != 0 || r.version() <= o.version()) {
        Violation(absl::StrCat("job ", o.job(), " -> ", r.job(), ": ", o.ShortDebugString(),
                               " -> ", r.ShortDebugString()));
      }
    } else if (seen_) {
      const v1::SwarmRoster& o = last_;
      const v1::SwarmCounters& oc = o.counters();
      if (r.version() < o.version()) {
        Violation(absl::StrCat("roster version went back from ", o.version(), " to ", r.version()));
      }
      // Every counter but `lost` counts events: it never goes down.
      const int64_t now[] = {c.joins(), c.leaves(), c.deaths(), c.evictions(), c.drifts(),
                             c.fences(), c.replays(), c.syncs_refused(), c.moves(),
                             c.rollbacks(), c.steps_applied(), c.duplicates()};
      const int64_t then[] = {oc.joins(), oc.leaves(), oc.deaths(), oc.evictions(), oc.drifts(),
                              oc.fences(), oc.replays(), oc.syncs_refused(), oc.moves(),
                              oc.rollbacks(), oc.steps_applied(), oc.duplicates()};
      for (size_t i = 0; i < sizeof(now) / sizeof(now[0]); ++i) {
        if (now[i] < then[i]) {
          Violation(absl::StrCat("counter ", i, " went back: ", oc.ShortDebugString(), " -> ",
                                 c.ShortDebugString()));
        }
      }
      // next_step moves back only through a counted rollback; without one it moves exactly by
      // the steps applied.
      if (r.next_step() < o.next_step() && c.rollbacks() == oc.rollbacks()) {
        Violation(absl::StrCat("next step went back from ", o.next_step(), " to ", r.next_step(),
                               " without a rollback"));
      }
      if (c.rollbacks() == oc.rollbacks() &&
          r.next_step() - o.next_step() != c.steps_applied() - oc.steps_applied()) {
        Violation(absl::StrCat("next step ", o.next_step(), " -> ", r.next_step(), " with ",
                               c.steps_applied() - oc.steps_applied(), " steps applied"));
      }
      if (r.checkpoint_step() < o.checkpoint_step()) {
        Violation(absl::StrCat("the newest checkpoint went back from ", o.checkpoint_step(),
                               " to ", r.checkpoint_step()));
      }
    }
    seen_ = true;
    last_ = r;

    // `lost` (swarm_ledger.h): micro-batches still needed at a stage with no live round peer.
    // Such a stage has no peer holding its state, which (swarm_state.h) is a pending rollback;
    // and the coordinator carries a rollback out at once, so one shows only once the job is
    // finished (it then stays pending, no step opening). Together: lost is 0 in every roster.
    for (int64_t v : {c.joins(), c.leaves(), c.deaths(), c.evictions(), c.drifts(), c.fences(),
                      c.replays(), c.syncs_refused(), c.moves(), c.rollbacks(), c.steps_applied(),
                      c.duplicates(), c.lost()}) {
      if (v < 0) Violation("a swarm counter is negative: " + c.ShortDebugString());
    }
    if (c.lost() > 0 && r.rollback().empty()) {
      Violation(absl::StrCat(c.lost(), " micro-batches lost with no rollback pending"));
    }
    if (!r.rollback().empty() && !r.finished()) {
      Violation("a rollback is pending and the coordinator did not carry it out: " + r.rollback());
    }
    if (r.finished() != (r.next_step() >= cfg_.total_steps) || r.total_steps() != cfg_.total_steps ||
        r.micro_batches() != M || r.stages_size() != S) {
      Violation("roster job fields: " + r.ShortDebugString());
    }
    if (r.step_open() ? (r.open_step() != r.next_step() || r.finished()) : r.open_step() != -1) {
      Violation(absl::StrCat("step_open ", r.step_open(), " open_step ", r.open_step(),
                             " next_step ", r.next_step()));
    }
    if (r.checkpoint_step() > r.next_step() || r.checkpoint_step() < -1) {
      Violation(absl::StrCat("checkpoint of state ", r.checkpoint_step(), " at step ",
                             r.next_step()));
    }

    // Decisions: the newest ones, oldest first, of steps already applied.
    if (r.decisions_size() > cfg_.roster_decisions) Violation("too many decisions in the roster");
    for (int i = 0; i < r.decisions_size(); ++i) {
      const v1::SwarmDecision& d = r.decisions(i);
      if (i > 0 && d.step() <= r.decisions(i - 1).step()) {
        Violation(absl::StrCat("decisions out of order: step ", r.decisions(i - 1).step(),
                               " then ", d.step()));
      }
      if (d.step() >= r.next_step() || d.stage_hashes_size() != S) {
        Violation(absl::StrCat("decision of step ", d.step(), " at next step ", r.next_step()));
      }
      CheckDecision(d);
    }

    // Peers: each in one stage, once; states the contract knows; donors that hold the state and
    // carry no more joiners than allowed; a round only while a step is open, serving peers
    // exactly the round's.
    std::map<std::string, int> stage_of;
    std::map<std::string, int> joiners;
    for (int s = 0; s < S; ++s) {
      const v1::SwarmStageEntry& st = r.stages(s);
      if (st.index() != s) Violation(absl::StrCat("stage ", s, " has index ", st.index()));
      for (const v1::SwarmPeerEntry& p : st.peers()) {
        auto [it, fresh] = stage_of.emplace(p.id(), s);
        if (!fresh) {
          Violation(absl::StrCat("peer ", p.id(), " in stage ", it->second, " and stage ", s));
        }
        if (p.stage() != s) Violation(absl::StrCat("peer ", p.id(), " of stage ", p.stage(), " listed in ", s));
        const std::string& state = p.state();
        if (state != "SYNCING" && state != "SERVING" && state != "DRAINING") {
          Violation("peer " + p.id() + " is " + state);
        }
        if (p.in_round() && (!r.step_open() || state == "SYNCING")) {
          Violation("peer " + p.id() + " in a round: " + p.ShortDebugString());
        }
        if (r.step_open() && state == "SERVING" && !p.in_round()) {
          Violation("serving peer " + p.id() + " outside the open round");
        }
        if (!p.in_round() && p.accumulated() != 0) {
          Violation("peer " + p.id() + " accumulates outside a round");
        }
        if (state == "SYNCING") {
          const std::string& src = p.sync_source();
          if (src != "donor" && src != "wait" && src != "checkpoint" && src != "init") {
            Violation("peer " + p.id() + " syncs from '" + src + "'");
          }
          if (!p.synced() && (src == "donor") != !p.donor().empty()) {
            Violation("peer " + p.id() + ": " + p.ShortDebugString());
          }
          if (!p.synced() && src == "donor") {
            // "Every donor is at the newest state": a peer of the joiner's stage that holds it.
            const v1::SwarmPeerEntry* d = FindPeer(r, p.donor());
            if (d == nullptr || d->stage() != s || d->state() == "SYNCING") {
              Violation("peer " + p.id() + " syncs from " + p.donor() + ", which holds no state " +
                        "of stage " + absl::StrCat(s));
            }
            ++joiners[p.donor()];
          }
        } else if (!p.sync_source().empty() || p.synced()) {
          Violation("peer " + p.id() + " is " + state + " and syncing: " + p.ShortDebugString());
        }
      }
    }
    for (const auto& [donor, n] : joiners) {
      if (n > cfg_.max_joiners_per_donor) {
        Violation(absl::StrCat(n, " joiners sync from ", donor, ", at most ",
                               cfg_.max_joiners_per_donor, " allowed"));
      }
    }

    // The open round's stages: a phase, what is missing, and a plan that lists only peers of the
    // stage (in reduction: its round peers) with the step's ids, each exactly once.
    for (int s = 0; s < S; ++s) {
      const v1::SwarmStageEntry& st = r.stages(s);
      if (!r.step_open()) {
        if (!st.phase().empty() || st.has_reduction() || st.reported_size() > 0) {
          Violation(absl::StrCat("stage ", s, " has a round with no step open: ",
                                 st.ShortDebugString()));
        }
        continue;
      }
      const std::string& ph = st.phase();
      if (ph != "collecting" && ph != "reducing" && ph != "agreed") {
        Violation(absl::StrCat("stage ", s, " phase '", ph, "'"));
      }
      if (st.missing() < 0 || st.missing() > M || (ph == "collecting") != (st.missing() > 0)) {
        Violation(absl::StrCat("stage ", s, " ", ph, " with ", st.missing(), " missing"));
      }
      int64_t accumulated = 0;
      for (const v1::SwarmPeerEntry& p : st.peers()) accumulated += p.accumulated();
      if (accumulated > M - st.missing()) {
        Violation(absl::StrCat("stage ", s, "'s peers hold ", accumulated, " with ",
                               st.missing(), " missing of ", M));
      }
      if (ph == "collecting") {
        if (st.has_reduction()) Violation(absl::StrCat("stage ", s, " collecting with a plan"));
        continue;
      }
      const v1::SwarmReductionPlan& plan = st.reduction();
      if (plan.step() != r.open_step() || plan.plan() == 0 || plan.peers_size() == 0 ||
          plan.ids_size() != plan.peers_size() || plan.addresses_size() != plan.peers_size()) {
        Violation(absl::StrCat("stage ", s, " plan ", plan.ShortDebugString()));
      }
      std::set<int64_t> ids;
      for (int i = 0; i < plan.peers_size(); ++i) {
        const std::string& id = plan.peers(i);
        auto where = stage_of.find(id);
        if (where != stage_of.end() && where->second != s) {
          Violation(absl::StrCat("stage ", s, "'s plan lists ", id, " of stage ", where->second));
        }
        if (ph == "reducing") {
          const v1::SwarmPeerEntry* p = FindPeer(r, id);
          if (p == nullptr || !p->in_round()) {
            Violation(absl::StrCat("stage ", s, "'s plan ", plan.plan(), " lists ", id,
                                   ", not a round peer of the stage"));
          }
        }
        if (plan.ids(i).peer() != id) Violation("plan ids out of the peers' order");
        for (int k = 0; k < plan.ids(i).ids_size(); ++k) {
          const int64_t x = plan.ids(i).ids(k);
          if (x < r.open_step() * M || x >= (r.open_step() + 1) * M || !ids.insert(x).second ||
              (k > 0 && x <= plan.ids(i).ids(k - 1))) {
            Violation(absl::StrCat("stage ", s, "'s plan gives ", id, " id ", x));
          }
        }
      }
      if (static_cast<int>(ids.size()) != M) {
        Violation(absl::StrCat("stage ", s, "'s plan covers ", ids.size(), " of ", M, " ids"));
      }
      for (const std::string& id : st.reported()) {
        if (std::find(plan.peers().begin(), plan.peers().end(), id) == plan.peers().end()) {
          Violation(absl::StrCat("stage ", s, ": ", id, " reported, not in the plan"));
        }
      }
    }
    std::set<std::string> trainers;
    for (const std::string& t : r.trainers()) {
      if (!trainers.insert(t).second) Violation("trainer listed twice: " + t);
    }
  }

  SwarmConfig cfg_;
  SwarmNet net_;
  ManualClock clock_;
  std::unique_ptr<SwarmCoordinator> swarm_;
  v1::SwarmRoster roster_;  // the newest, checked
  v1::SwarmRoster last_;    // what CheckRoster saw last
  bool seen_ = false;
  std::vector<std::string> ids_;       // every worker id that joined
  std::vector<std::string> trainers_;  // the trainers among them
  std::map<int64_t, SwarmHeldLease> leases_;
  std::tuple<bool, int64_t, int64_t> epoch_{false, -1, 0};
};

// A swarm program's job, from its first two bytes: 1..3 stages of M = 1..4, 1..4 steps, maybe a
// step with no learning rate, a checkpoint to start from, one or two joiners per donor, eviction
// on the first or second drift.
SwarmConfig ProgramConfig(Bytes& in) {
  const uint8_t a = in.U8(), b = in.U8();
  SwarmConfig cfg;
  cfg.stages = 1 + a % 3;
  cfg.micro_batches = 1 + (a >> 2) % 4;
  cfg.total_steps = 1 + (a >> 4) % 4;
  cfg.lr_hole = (a >> 6) == 3 ? b % 4 : -1;
  cfg.checkpoint_step = (b >> 2) % 4 == 3 ? (b >> 4) % 2 : -1;
  cfg.max_joiners_per_donor = 1 + (b >> 5) % 2;
  cfg.max_drifts = 1 + (b >> 6) % 2;
  cfg.roster_decisions = 1 + (b >> 7) * 3;
  return cfg;
}

// One swarm message off the wire, handed to the small swarm.
void RunSwarmMessage(uint8_t mode, const uint8_t* data, size_t size) {
  SwarmFuzz f(SwarmFuzz::SmallConfig());
  f.SetUpSmall();
  const int n = static_cast<int>(size);
  switch (mode) {
    case 8:
    case 9: {
      v1::JoinRequest r;
      if (!r.ParseFromArray(data, n)) return;
      r.set_role(mode == 8 ? v1::WORKER_ROLE_PEER : v1::WORKER_ROLE_TRAINER);
      f.Join(r);
      break;
    }
    case 10: {
      v1::LeaseRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.Lease(r);
      break;
    }
    case 11: {
      v1::CommitRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.Commit(r);
      break;
    }
    case 12: {
      v1::ReportPeerRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.ReportPeer(r);
      break;
    }
    case 13: {
      v1::PeerSyncedRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.PeerSynced(r);
      break;
    }
    case 14: {
      v1::StageReportRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.StageReport(r);
      break;
    }
    case 15: {
      v1::CheckpointSavedRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.CheckpointSaved(r);
      break;
    }
    case 16: {
      v1::WatchRosterRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.WaitRoster(r);
      break;
    }
    case 17: {
      v1::HeartbeatRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.Heartbeat(r);
      break;
    }
    case 18: {
      v1::LeaveRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.Leave(r);
      break;
    }
    case 19: {
      v1::DrainRequest r;
      if (!r.ParseFromArray(data, n)) return;
      f.Drain(r.worker_id());
      break;
    }
  }
  f.CheckStatus();
}

// A program of swarm calls: from an empty swarm of the program's own job (mode 20), or from the
// small swarm (mode 21).
void RunSwarmProgram(uint8_t mode, Bytes& in) {
  if (mode == 20) {
    SwarmFuzz f(ProgramConfig(in));
    f.Run(in);
  } else {
    SwarmFuzz f(SwarmFuzz::SmallConfig());
    f.SetUpSmall();
    f.Run(in);
  }
}
}  // namespace
}  // namespace shoal::scheduler

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  shoal::SetLogLevel(shoal::LogLevel::kError);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 22;
  shoal::scheduler::Bytes in(data + 1, size - 1);
  if (mode < 6) {
    shoal::scheduler::RunMessage(mode, data + 1, size - 1);
  } else if (mode < 8) {
    shoal::scheduler::RunProgram(in);
  } else if (mode < 20) {
    shoal::scheduler::RunSwarmMessage(mode, data + 1, size - 1);
  } else {
    shoal::scheduler::RunSwarmProgram(mode, in);
  }
  return 0;
}
