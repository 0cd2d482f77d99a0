#include "scheduler/swarm_simulator.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/gpt_arithmetic.h"
#include "common/status.h"
#include "scheduler/layout_solver.h"
#include "scheduler/splitmix.h"
#include "scheduler/swarm_policy.h"
#include "scheduler/swarm_state.h"

namespace shoal::scheduler {
namespace {

constexpr double kBytesPerGB = 1e9;        // net_gbps is GB/s
constexpr int kMaxStaleSyncs = 20;         // launch/swarm_peer_role.cc gives up after as many
constexpr int64_t kMaxEvents = 200000000;  // a guard against a run that cannot end
constexpr size_t kMaxRowEvents = 6;        // events named per row; the rest are counted

// The hash of stage `stage`'s state `step`. Simulated peers are exact, so any fixed function of
// (stage, step) is what real peers would report: it changes with every applied step (a joiner
// must claim the newest state's) and comes back the same after a rollback replays the steps.
uint64_t StateHash(int stage, int64_t step) {
  SplitMix mix((static_cast<uint64_t>(stage) << 48) ^ static_cast<uint64_t>(step) ^
               0x737761726D686173ull);  // "swarmhas"
  return mix.Next();
}

// What the policy and the clock need of one stage.
struct StageModel {
  int64_t bytes = 0;          // SwarmStageBytes: what a peer needs to serve it
  double forward_flops = 0;   // one micro-batch's forward; the backward is twice this
  double transfer_bytes = 0;  // a sync: parameters and AdamW moments
  double gradient_bytes = 0;  // a reduction's payload
  double sum_squares = 0;     // every report's (any fixed positive number)
};

enum class EventKind {
  kRow, kJoin, kFail, kRemove, kSynced, kHopDone, kReduced, kSlow, kRebalance, kKill
};

struct Event {
  double t = 0;
  uint64_t seq = 0;  // ties in time run in the order they were scheduled
  EventKind kind = EventKind::kRow;
  int index = -1;    // a peer (kFail, kRemove, kSynced), a trainer (kHopDone), a group (kJoin,
                     // kSlow), a stage (kReduced)
  uint64_t tag = 0;  // the epoch (kSynced, kHopDone) or the plan (kReduced) it belongs to
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
};

struct VirtualPeer {
  std::string id;
  int group = 0;
  int stage = 0;
  bool alive = true;     // false from its failure on (it stops at once)
  bool in_swarm = true;  // false once the state has removed it
  double joined_s = 0;
  double left_s = -1;
  double net_bytes_per_s = 0;
  double forward_s = 0;   // one micro-batch's forward at its stage; the backward is twice this
  double busy_until = 0;  // its queue: the end of the last hop routed to it
  // The sync in flight, if any (a real joiner keeps to the donor it started with).
  bool sync_in_flight = false;
  uint64_t sync_epoch = 0;
  SwarmSyncSource sync_source = SwarmSyncSource::kInit;
  int sync_donor = -1;
  int64_t sync_step = 0;
  int stale_syncs = 0;
};

enum class HopKind { kForward, kForwardBackward, kBackward };

// One lane of a trainer (SwarmSimulationOptions::in_flight lanes each).
struct VirtualTrainer {
  std::string id;     // the trainer's
  bool busy = false;  // holds a micro-batch
  SwarmLease lease;
  int lowest = 0;               // the lowest stage its backward must reach
  std::vector<int> forward_on;  // per stage: the peer that ran its forward, -1 none yet
  int stage = 0;
  HopKind kind = HopKind::kForward;
  int peer = -1;       // where the hop in flight runs; -1 while it waits for a peer
  double hop_s = 0;    // that hop's compute
  uint64_t epoch = 0;  // a cancelled hop's completion carries an older one
};

class SwarmSimulation {
 public:
  SwarmSimulation(const ClusterSpec& spec, const SwarmSimulationOptions& options,
                  std::vector<StageModel> stages, double tokens_per_micro_batch)
      : spec_(spec),
        options_(options),
        stages_(std::move(stages)),
        tokens_per_micro_batch_(tokens_per_micro_batch),
        rng_(options.seed ^ 0x7377636875726eull),  // "swchurn": its own stream
        next_index_(spec.groups.size(), 0),
        reduced_plan_(options.stages, 0) {
    report_every_s_ =
        options.report_every_s > 0 ? options.report_every_s : spec.settings.report_every_s;
    result_.summary.tokens_per_step = tokens_per_micro_batch * options.micro_batches;
  }

  absl::Status Init() {
    SwarmJob job;
    job.stages = options_.stages;
    job.micro_batches = options_.micro_batches;
    for (const StageModel& s : stages_) job.stage_bytes.push_back(s.bytes);
    SwarmStateOptions so;
    // The learning rate does not move the clock; any finite value opens every step.
    so.learning_rate = [](int64_t) { return 1e-4; };
    if (options_.rebalance_s > 0) so.rebalance.period_s = options_.rebalance_s;
    SHOAL_ASSIGN_OR_RETURN(state_, SwarmState::Create(job, std::move(so)));
    for (int t = 0; t < options_.trainers; ++t) {
      const std::string id = absl::StrCat("trainer-", t);
      SHOAL_RETURN_IF_ERROR(Internal(state_->AddTrainer(id), "AddTrainer"));
      for (int lane = 0; lane < options_.in_flight; ++lane) {
        VirtualTrainer trainer;  // one lane of trainer t
        trainer.id = id;
        trainers_.push_back(std::move(trainer));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<SwarmSimulationResult> Run() {
    // Every device of the file joins at time 0, in file order.
    for (size_t g = 0; g < spec_.groups.size(); ++g) {
      for (int k = 0; k < spec_.groups[g].count; ++k) {
        SHOAL_RETURN_IF_ERROR(Join(static_cast<int>(g)));
      }
    }
    const SwarmSnapshot& start = Mirror();
    for (const SwarmStageInfo& stage : start.stages) {
      if (stage.peers.empty()) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "no device of ", spec_.source, " can serve stage ", stage.index, " of ",
            options_.stages, ": it needs ", stage.bytes, " bytes (fewer stages need more)"));
      }
    }
    Note(absl::StrCat("start: ", peers_.size(), " peers joined",
                      result_.summary.refused > 0
                          ? absl::StrCat(", ", result_.summary.refused, " too small for any stage")
                          : ""));
    SHOAL_RETURN_IF_ERROR(Reconcile());
    open_ = Mirror().open_step.has_value();
    Schedule(0, EventKind::kRow);  // after the syncs from the init, which take no time
    for (size_t g = 0; g < spec_.groups.size(); ++g) {
      if (spec_.groups[g].slow_after_s >= 0) {
        Schedule(spec_.groups[g].slow_after_s, EventKind::kSlow, static_cast<int>(g));
      }
    }
    if (options_.rebalance_s > 0) Schedule(options_.rebalance_s, EventKind::kRebalance);
    if (options_.kill_every_s > 0) Schedule(options_.kill_every_s, EventKind::kKill);
    const double end_s = spec_.settings.max_hours * 3600;
    int64_t processed = 0;
    while (!done_ && !events_.empty()) {
      const Event e = events_.top();
      events_.pop();
      if (e.t > end_s) {
        AdvanceTo(end_s);
        Note("time limit");
        AddRow();
        break;
      }
      if (++processed > kMaxEvents) {
        return absl::ResourceExhaustedError(absl::StrCat("swarm simulation: more than ", kMaxEvents,
                                                         " events by virtual time ", now_s_, " s"));
      }
      AdvanceTo(e.t);
      SHOAL_RETURN_IF_ERROR(Handle(e));
      SHOAL_RETURN_IF_ERROR(Reconcile());
      open_ = Mirror().open_step.has_value();
    }
    if (done_) {
      Note(absl::StrCat("done: ", options_.steps, " steps"));
      AddRow();
    }
    Summarize();
    return std::move(result_);
  }

 private:
  // --- Events ---------------------------------------------------------------------------------

  void Schedule(double t, EventKind kind, int index = -1, uint64_t tag = 0) {
    events_.push(Event{t, next_seq_++, kind, index, tag});
  }

  void AdvanceTo(double t) {
    if (!open_) result_.summary.idle_s += t - now_s_;
    now_s_ = t;
  }

  absl::Status Handle(const Event& e) {
    switch (e.kind) {
      case EventKind::kRow:
        AddRow();
        Schedule(now_s_ + report_every_s_, EventKind::kRow);
        return absl::OkStatus();
      case EventKind::kJoin:
        return Join(e.index);
      case EventKind::kFail:
        return Fail(e.index);
      case EventKind::kRemove:
        return Remove(e.index);
      case EventKind::kSynced:
        return Synced(e.index, e.tag);
      case EventKind::kHopDone:
        return HopDone(e.index, e.tag);
      case EventKind::kReduced:
        return Reduced(e.index, e.tag);
      case EventKind::kSlow:
        return SlowDown(e.index);
      case EventKind::kRebalance:
        Schedule(now_s_ + options_.rebalance_s, EventKind::kRebalance);
        return Rebalance();
      case EventKind::kKill:
        Schedule(now_s_ + options_.kill_every_s, EventKind::kKill);
        return Kill();
    }
    return absl::OkStatus();
  }

  // A refusal by the state of a call the simulated peers make by its rules is a bug: say which.
  static absl::Status Internal(const absl::Status& s, const std::string& call) {
    if (s.ok()) return s;
    return absl::InternalError(
        absl::StrCat("swarm simulation: the swarm state refused ", call, ": ", s.ToString()));
  }

  // The state as of its last roster change: refreshed whenever the roster version moves, which
  // is all that routing, syncs and reductions read. Leases and commits do not move it, so the
  // counts of replays and of micro-batches held need a `fresh` one.
  const SwarmSnapshot& Mirror(bool fresh = false) {
    if (fresh || !mirror_valid_ || state_->roster_version() != mirror_.roster_version) {
      mirror_ = state_->Snapshot();
      mirror_valid_ = true;
      result_.summary.max_lost = std::max(result_.summary.max_lost, mirror_.ledger.lost);
    }
    return mirror_;
  }

  void Note(const std::string& event) { events_text_.push_back(event); }

  // --- Peers ----------------------------------------------------------------------------------

  absl::Status Join(int group) {
    const DeviceGroupSpec& g = spec_.groups[group];
    VirtualPeer p;
    p.id = absl::StrCat(g.name, "-", next_index_[group]++);
    p.group = group;
    const bool cuda = g.profile.kind() == v1::DEVICE_KIND_CUDA;
    const int64_t memory = cuda ? g.profile.memory().gpu_bytes() : g.profile.memory().host_bytes();
    absl::StatusOr<SwarmJoin> join = state_->AddPeer(p.id, absl::StrCat("sim://", p.id), memory);
    if (absl::IsResourceExhausted(join.status())) {
      // Its memory fits no stage: the coordinator refuses it, and it does not come back.
      ++result_.summary.refused;
      return absl::OkStatus();
    }
    SHOAL_RETURN_IF_ERROR(Internal(join.status(), absl::StrCat("AddPeer(", p.id, ")")));
    p.stage = join->stage;
    p.joined_s = now_s_;
    p.net_bytes_per_s = g.profile.net_gbps() * kBytesPerGB;
    // What the peer measures once serving, reported at once so that ChooseStage balances the
    // stages by what each peer really adds (samples per second through the stage).
    SHOAL_RETURN_IF_ERROR(Measure(p));
    const int index = static_cast<int>(peers_.size());
    peer_index_[p.id] = index;
    peers_.push_back(std::move(p));
    if (now_s_ > 0) Note(absl::StrCat("join ", peers_[index].id, " (stage ", join->stage, ")"));
    // It syncs from what the join named, at once (a wait ends when the roster names a donor).
    StartNamedSync(peers_[index], join->source, join->donor, join->step);
    if (g.preemptible && options_.churn_per_hour > 0) {
      // Exponential lifetime with mean 1/rate hours; u in (0, 1].
      const double u = rng_.Uniform() + 0x1.0p-53;
      const double life_s = -std::log(u) / options_.churn_per_hour * 3600;
      Schedule(now_s_ + std::max(1e-3, life_s), EventKind::kFail, index);
    }
    return absl::OkStatus();
  }

  // The peer's compute at its stage, now (a straggler group's slow-down counted), reported as
  // the throughput it measures.
  absl::Status Measure(VirtualPeer& p) {
    const DeviceGroupSpec& g = spec_.groups[p.group];
    const bool slowed = g.slow_after_s >= 0 && now_s_ >= g.slow_after_s;
    p.forward_s = stages_[p.stage].forward_flops / (g.profile.fp32_gflops() * 1e9) *
                  (slowed ? g.slow_factor : 1.0);
    const double samples_per_s = static_cast<double>(tokens_per_micro_batch_) /
                                 spec_.job.model().block_size() / (3 * p.forward_s);
    return Internal(state_->ReportLoad(p.id, samples_per_s, 0), "ReportLoad");
  }

  // A straggler group slows down: its live peers compute slower and say so.
  absl::Status SlowDown(int group) {
    int n = 0;
    for (VirtualPeer& p : peers_) {
      if (p.group != group || !p.alive || !p.in_swarm) continue;
      SHOAL_RETURN_IF_ERROR(Measure(p));
      ++n;
    }
    Note(absl::StrCat(spec_.groups[group].name, " slows down ", spec_.groups[group].slow_factor,
                      "x (", n, " peer", n == 1 ? "" : "s", ")"));
    return absl::OkStatus();
  }

  // The coordinator's rebalancing check; a move shows in the roster (Reconcile follows it).
  absl::Status Rebalance() {
    absl::StatusOr<std::optional<SwarmMove>> move = state_->Rebalance(++rebalance_period_);
    SHOAL_RETURN_IF_ERROR(Internal(move.status(), "Rebalance"));
    if (move->has_value()) {
      const SwarmMove& m = **move;
      Note(absl::StrCat("move ", m.peer, " from stage ", m.from, " to stage ", m.to));
    }
    return absl::OkStatus();
  }

  // A scheduled kill: one live peer of a preemptible group, drawn uniformly (none: nothing).
  absl::Status Kill() {
    std::vector<int> live;
    for (size_t i = 0; i < peers_.size(); ++i) {
      if (peers_[i].alive && spec_.groups[peers_[i].group].preemptible) {
        live.push_back(static_cast<int>(i));
      }
    }
    if (live.empty()) return absl::OkStatus();
    const size_t pick = std::min(
        live.size() - 1, static_cast<size_t>(rng_.Uniform() * static_cast<double>(live.size())));
    return Fail(live[pick]);
  }

  absl::Status Fail(int index) {
    VirtualPeer& p = peers_[index];
    if (!p.alive) return absl::OkStatus();
    p.alive = false;
    p.left_s = now_s_;
    p.sync_in_flight = false;
    ++p.sync_epoch;
    ++deaths_;
    int64_t held = 0;
    for (const SwarmPeerInfo& info : Mirror(/*fresh=*/true).stages[p.stage].peers) {
      if (info.id == p.id) held = info.accumulated;
    }
    Note(absl::StrCat("fail ", p.id, " (stage ", p.stage, held > 0 ? ", holding " : "",
                      held > 0 ? absl::StrCat(held) : "", ")"));
    // Its connections break now: the hops it was running go elsewhere...
    for (size_t t = 0; t < trainers_.size(); ++t) {
      if (trainers_[t].busy && trainers_[t].peer == index) Dispatch(static_cast<int>(t));
    }
    // ...and joiners fetching from it ask for another donor. The state may have moved such a
    // joiner to another donor already (after a step): then it follows the roster instead.
    for (VirtualPeer& j : peers_) {
      if (!j.alive || !j.sync_in_flight || j.sync_source != SwarmSyncSource::kDonor ||
          j.sync_donor != index) {
        continue;
      }
      j.sync_in_flight = false;
      ++j.sync_epoch;
      absl::StatusOr<SwarmJoin> next = state_->DonorFailed(j.id, p.id);
      if (!next.ok() && !absl::IsFailedPrecondition(next.status())) {
        return Internal(next.status(), absl::StrCat("DonorFailed(", j.id, ", ", p.id, ")"));
      }
    }
    // A joiner whose donor the state had already replaced asked nothing that moved the roster:
    // it still fetches from what the roster names now.
    force_reconcile_ = true;
    // The coordinator notices when its lease runs out; its device is replaced later.
    Schedule(now_s_ + spec_.settings.lease_s, EventKind::kRemove, index);
    Schedule(now_s_ + spec_.settings.replace_after_s, EventKind::kJoin, p.group);
    return absl::OkStatus();
  }

  absl::Status Remove(int index) {
    VirtualPeer& p = peers_[index];
    if (!p.in_swarm) return absl::OkStatus();
    p.in_swarm = false;
    absl::StatusOr<SwarmRemoval> removal = state_->RemovePeer(p.id, SwarmLeaveReason::kDead);
    SHOAL_RETURN_IF_ERROR(Internal(removal.status(), absl::StrCat("RemovePeer(", p.id, ")")));
    if (removal->dropped > 0) {
      Note(absl::StrCat("removed ", p.id, ": ", removal->dropped, " micro-batch",
                        removal->dropped == 1 ? "" : "es", " to replay"));
    }
    Mirror();  // the ledger's `lost` before the rollback drops the round
    if (removal->needs_rollback) return RollBack();
    return absl::OkStatus();
  }

  absl::Status RollBack() {
    const int64_t from = state_->next_step();
    absl::StatusOr<int64_t> target = state_->RollBack();
    SHOAL_RETURN_IF_ERROR(Internal(target.status(), "RollBack"));
    ++rollbacks_;
    Note(absl::StrCat("rollback from step ", from, " to ", *target));
    // The round is gone: every micro-batch in flight is dropped and the peers stop its work.
    for (VirtualTrainer& t : trainers_) {
      t.busy = false;
      t.peer = -1;
      ++t.epoch;
    }
    for (VirtualPeer& p : peers_) p.busy_until = now_s_;
    if (*target < from) {
      // Every peer loads the target state: syncs of newer ones are void.
      for (VirtualPeer& p : peers_) {
        p.sync_in_flight = false;
        ++p.sync_epoch;
        p.stale_syncs = 0;
      }
    }
    return absl::OkStatus();
  }

  void StartSync(VirtualPeer& p, SwarmSyncSource source, int donor, int64_t step) {
    double seconds = 0;  // the init is computed, not fetched
    const double bytes = stages_[p.stage].transfer_bytes;
    if (source == SwarmSyncSource::kCheckpoint) seconds = bytes / p.net_bytes_per_s;
    if (source == SwarmSyncSource::kDonor) {
      seconds = bytes / std::min(p.net_bytes_per_s, peers_[donor].net_bytes_per_s);
    }
    p.sync_in_flight = true;
    p.sync_source = source;
    p.sync_donor = donor;
    p.sync_step = step;
    Schedule(now_s_ + seconds, EventKind::kSynced, peer_index_.at(p.id), ++p.sync_epoch);
  }

  // Starts the sync the state named, unless it is a wait or a donor that has died (still listed
  // until its lease runs out): the roster names the next source then.
  void StartNamedSync(VirtualPeer& p, SwarmSyncSource source, const std::string& donor,
                      int64_t step) {
    if (source == SwarmSyncSource::kWaitForDonor) return;
    int donor_index = -1;
    if (source == SwarmSyncSource::kDonor) {
      donor_index = peer_index_.at(donor);
      if (!peers_[donor_index].alive) return;
    }
    StartSync(p, source, donor_index, step);
  }

  absl::Status Synced(int index, uint64_t epoch) {
    VirtualPeer& p = peers_[index];
    if (!p.alive || !p.sync_in_flight || epoch != p.sync_epoch) return absl::OkStatus();
    p.sync_in_flight = false;
    const absl::Status claimed =
        state_->PeerSynced(p.id, p.sync_step, StateHash(p.stage, p.sync_step));
    if (claimed.ok()) {
      p.stale_syncs = 0;
      return absl::OkStatus();
    }
    if (absl::IsOutOfRange(claimed) && p.sync_source == SwarmSyncSource::kDonor) {
      // The swarm applied a step while the state travelled.
      ++result_.summary.stale_syncs;
      if (++p.stale_syncs >= kMaxStaleSyncs) {
        // The real peer gives up; its device is restarted and joins again.
        Note(absl::StrCat(p.id, " gave up after ", kMaxStaleSyncs, " stale syncs"));
        p.alive = false;
        p.in_swarm = false;
        p.left_s = now_s_;
        SHOAL_RETURN_IF_ERROR(Internal(state_->RemovePeer(p.id, SwarmLeaveReason::kLeft).status(),
                                       absl::StrCat("RemovePeer(", p.id, ")")));
        Schedule(now_s_ + spec_.settings.replace_after_s, EventKind::kJoin, p.group);
        return absl::OkStatus();
      }
      if (peers_[p.sync_donor].alive) {
        StartSync(p, SwarmSyncSource::kDonor, p.sync_donor, state_->next_step());
      } else {
        force_reconcile_ = true;  // the roster names the next source
      }
      return absl::OkStatus();
    }
    // Overtaken otherwise (a rollback, a claim of a source that moved on): the roster says what
    // to fetch next. A hash the stage disagrees with cannot happen with exact peers.
    if (absl::IsOutOfRange(claimed) || absl::IsFailedPrecondition(claimed)) {
      force_reconcile_ = true;
      return absl::OkStatus();
    }
    return Internal(claimed, absl::StrCat("PeerSynced(", p.id, ", ", p.sync_step, ")"));
  }

  // --- Trainers -------------------------------------------------------------------------------

  // The live SERVING round peers of a stage (DRAINING ones where none serves), by seniority.
  std::vector<int> RoundPeers(int stage) {
    std::vector<int> serving, draining;
    for (const SwarmPeerInfo& info : Mirror().stages[stage].peers) {
      if (!info.in_round) continue;
      const int index = peer_index_.at(info.id);
      if (!peers_[index].alive) continue;
      if (info.state == SwarmPeerState::kServing) serving.push_back(index);
      if (info.state == SwarmPeerState::kDraining) draining.push_back(index);
    }
    return serving.empty() ? draining : serving;
  }

  double HopSeconds(const VirtualTrainer& t, int peer) const {
    const double forward = peers_[peer].forward_s;
    switch (t.kind) {
      case HopKind::kForward:
        return forward;
      case HopKind::kForwardBackward:
        return 3 * forward;
      case HopKind::kBackward:
        // A peer without the forward's activations runs it again first.
        return 2 * forward + (t.forward_on[t.stage] == peer ? 0 : forward);
    }
    return forward;
  }

  // Sends the trainer's current hop to the peer that would finish it first; with none live, it
  // waits for the roster to change.
  void Dispatch(int index) {
    VirtualTrainer& t = trainers_[index];
    ++t.epoch;
    t.peer = -1;
    double best_finish = std::numeric_limits<double>::infinity();
    for (int q : RoundPeers(t.stage)) {
      const double finish = std::max(now_s_, peers_[q].busy_until) + HopSeconds(t, q);
      if (finish < best_finish) {
        best_finish = finish;
        t.peer = q;
      }
    }
    if (t.peer < 0) return;
    t.hop_s = HopSeconds(t, t.peer);
    peers_[t.peer].busy_until = best_finish;
    Schedule(best_finish, EventKind::kHopDone, index, t.epoch);
  }

  absl::Status TryLease(int index) {
    VirtualTrainer& t = trainers_[index];
    if (t.busy || !Mirror().open_step.has_value()) return absl::OkStatus();
    absl::StatusOr<std::vector<SwarmLease>> leases = state_->Lease(t.id, 1);
    if (absl::IsFailedPrecondition(leases.status())) return absl::OkStatus();  // nothing open
    SHOAL_RETURN_IF_ERROR(Internal(leases.status(), absl::StrCat("Lease(", t.id, ")")));
    if (leases->empty()) return absl::OkStatus();  // every micro-batch is held or in flight
    t.busy = true;
    t.lease = leases->front();
    t.lowest = t.lease.stages.front();
    t.forward_on.assign(options_.stages, -1);
    t.stage = 0;
    t.kind = options_.stages == 1 ? HopKind::kForwardBackward : HopKind::kForward;
    Dispatch(index);
    return absl::OkStatus();
  }

  absl::Status HopDone(int index, uint64_t epoch) {
    VirtualTrainer& t = trainers_[index];
    if (!t.busy || epoch != t.epoch || t.peer < 0) return absl::OkStatus();
    busy_s_ += t.hop_s;
    const int peer = t.peer;
    const int last = options_.stages - 1;
    if (t.kind == HopKind::kForward) {
      t.forward_on[t.stage] = peer;
      ++t.stage;
      t.kind = t.stage == last ? HopKind::kForwardBackward : HopKind::kForward;
      Dispatch(index);
      return absl::OkStatus();
    }
    if (peers_[peer].stage != t.stage) {
      // The rebalancer moved the peer meanwhile: its commit would be refused; the hop runs
      // again on a peer of the stage.
      Dispatch(index);
      return absl::OkStatus();
    }
    if (t.kind == HopKind::kForwardBackward) t.forward_on[t.stage] = peer;
    // The backward at this stage is done: its peer commits where the lease needs it.
    if (std::binary_search(t.lease.stages.begin(), t.lease.stages.end(), t.stage)) {
      SHOAL_RETURN_IF_ERROR(
          Internal(state_->Commit(peers_[peer].id, t.id, t.lease.id),
                   absl::StrCat("Commit(", peers_[peer].id, ", ", t.id, ", ", t.lease.id, ")")));
    }
    if (t.stage == t.lowest) {
      t.busy = false;
      t.peer = -1;
      return TryLease(index);
    }
    --t.stage;
    t.kind = HopKind::kBackward;
    Dispatch(index);
    return absl::OkStatus();
  }

  // --- Reductions -----------------------------------------------------------------------------

  absl::Status Reduced(int stage, uint64_t plan) {
    const SwarmStageInfo& info = Mirror().stages[stage];
    if (info.phase != SwarmStagePhase::kReducing || !info.reduction.has_value() ||
        info.reduction->plan != plan) {
      return absl::OkStatus();  // a fence voided the plan: a new one is under way
    }
    const SwarmReduction reduction = *info.reduction;
    for (const std::string& id : reduction.peers) {
      // A reduction with a dead member does not finish; its removal brings a new plan.
      if (!peers_[peer_index_.at(id)].alive) return absl::OkStatus();
    }
    for (const std::string& id : reduction.peers) {
      SwarmStageReport report;
      report.peer = id;
      report.step = reduction.step;
      report.plan = plan;
      report.ids = reduction.ids.at(id);
      report.sum_squares = stages_[stage].sum_squares;
      report.param_hash = StateHash(stage, reduction.step);
      absl::StatusOr<SwarmReportOutcome> outcome = state_->StageReport(report);
      SHOAL_RETURN_IF_ERROR(Internal(outcome.status(), absl::StrCat("StageReport(", id, ")")));
      if (!outcome->drifted.empty() || !outcome->syncs_refused.empty()) {
        return absl::InternalError(
            absl::StrCat("swarm simulation: exact peers disagree at stage ", stage, ": ",
                         outcome->drifted.empty() ? outcome->syncs_refused.front()
                                                  : outcome->drifted.front().message));
      }
      if (outcome->apply.has_value()) return Applied(*outcome->apply);
    }
    return absl::OkStatus();
  }

  absl::Status Applied(const SwarmApply& apply) {
    result_.applied.push_back({apply.step, now_s_});
    const int64_t next = apply.step + 1;
    if (options_.checkpoint_every > 0 && next % options_.checkpoint_every == 0) {
      SHOAL_RETURN_IF_ERROR(Internal(state_->CheckpointSaved(next), "CheckpointSaved"));
    }
    if (next >= options_.steps) done_ = true;
    return absl::OkStatus();
  }

  // After every event: whatever the roster now asks of the peers and trainers.
  absl::Status Reconcile() {
    while (force_reconcile_ || Mirror().roster_version != reconciled_version_) {
      force_reconcile_ = false;
      const SwarmSnapshot& snap = Mirror();
      reconciled_version_ = snap.roster_version;
      // Stages with a new reduction plan: its peers sum their gradients.
      for (const SwarmStageInfo& info : snap.stages) {
        if (info.phase != SwarmStagePhase::kReducing || !info.reduction.has_value() ||
            info.reduction->plan <= reduced_plan_[info.index]) {
          continue;
        }
        reduced_plan_[info.index] = info.reduction->plan;
        const std::vector<std::string>& plan_peers = info.reduction->peers;
        double slowest = std::numeric_limits<double>::infinity();
        for (const std::string& id : plan_peers) {
          slowest = std::min(slowest, peers_[peer_index_.at(id)].net_bytes_per_s);
        }
        const double n = static_cast<double>(plan_peers.size());
        const double seconds = stages_[info.index].gradient_bytes * 2 * (n - 1) / n / slowest +
                               spec_.settings.round_s;
        Schedule(now_s_ + seconds, EventKind::kReduced, info.index, info.reduction->plan);
      }
      // Joiners with no sync in flight fetch from the source the roster names, by seniority
      // (the order of peers_): after a rollback, the stages' first peers go first. A peer the
      // rebalancer moved is a joiner of its new stage.
      std::map<int, const SwarmPeerInfo*> joiners;
      for (const SwarmStageInfo& info : snap.stages) {
        for (const SwarmPeerInfo& pi : info.peers) {
          VirtualPeer& moved = peers_[peer_index_.at(pi.id)];
          if (moved.stage != pi.stage) {
            moved.stage = pi.stage;
            moved.sync_in_flight = false;
            ++moved.sync_epoch;
            SHOAL_RETURN_IF_ERROR(Measure(moved));
          }
          if (pi.state == SwarmPeerState::kSyncing && !pi.synced) {
            joiners[peer_index_.at(pi.id)] = &pi;
          }
        }
      }
      for (const auto& [index, pi] : joiners) {
        VirtualPeer& p = peers_[index];
        if (!p.alive || p.sync_in_flight) continue;
        // The roster's source: a donor at the newest state, else the checkpoint's or the init's.
        const int64_t step = pi->source == SwarmSyncSource::kDonor        ? snap.next_step
                             : pi->source == SwarmSyncSource::kCheckpoint ? snap.checkpoint_step
                                                                          : 0;
        StartNamedSync(p, pi->source, pi->donor, step);
      }
      // Idle trainers lease; hops that found no peer try again.
      for (size_t t = 0; t < trainers_.size(); ++t) {
        if (!trainers_[t].busy) {
          SHOAL_RETURN_IF_ERROR(TryLease(static_cast<int>(t)));
        } else if (trainers_[t].peer < 0) {
          Dispatch(static_cast<int>(t));
        }
      }
    }
    return absl::OkStatus();
  }

  // --- Rows -----------------------------------------------------------------------------------

  void AddRow() {
    const SwarmSnapshot& snap = Mirror(/*fresh=*/true);
    const int64_t applied = static_cast<int64_t>(result_.applied.size());
    SwarmSimulationRow row;
    row.time_s = now_s_;
    row.steps = snap.next_step;
    row.applied = applied;
    // Rows of one instant merge (the last report and the end, say): the merged row's rate is
    // over the interval before the first of them.
    const bool merge = !result_.rows.empty() && result_.rows.back().time_s == now_s_;
    if (!merge) {
      base_s_ = last_row_s_;
      base_applied_ = last_row_applied_;
    }
    if (now_s_ > base_s_) {
      row.tokens_per_s = static_cast<double>(applied - base_applied_) *
                         result_.summary.tokens_per_step / (now_s_ - base_s_);
    }
    for (const SwarmStageInfo& info : snap.stages) {
      int serving = 0, syncing = 0;
      for (const SwarmPeerInfo& pi : info.peers) {
        serving += pi.state == SwarmPeerState::kServing;
        syncing += pi.state == SwarmPeerState::kSyncing;
      }
      row.serving.push_back(serving);
      row.syncing.push_back(syncing);
    }
    row.replays = snap.counters.replays;
    row.fences = snap.counters.fences;
    row.joins = snap.counters.joins;
    row.deaths = deaths_;
    row.rollbacks = rollbacks_;
    std::vector<std::string> shown(
        events_text_.begin(),
        events_text_.begin() + static_cast<long>(std::min(events_text_.size(), kMaxRowEvents)));
    if (events_text_.size() > kMaxRowEvents) {
      shown.push_back(absl::StrCat("and ", events_text_.size() - kMaxRowEvents, " more"));
    }
    row.events = absl::StrJoin(shown, "; ");
    events_text_.clear();
    if (merge) {
      SwarmSimulationRow& prev = result_.rows.back();
      if (!prev.events.empty() && !row.events.empty()) row.events = "; " + row.events;
      row.events = prev.events + row.events;
      prev = std::move(row);
    } else {
      result_.rows.push_back(std::move(row));
    }
    last_row_s_ = now_s_;
    last_row_applied_ = applied;
  }

  void Summarize() {
    const SwarmSnapshot& snap = Mirror(/*fresh=*/true);
    SwarmSimulationSummary& s = result_.summary;
    s.virtual_s = now_s_;
    s.steps = snap.next_step;
    s.applied = static_cast<int64_t>(result_.applied.size());
    s.mean_tokens_per_s =
        now_s_ > 0 ? static_cast<double>(s.steps) * s.tokens_per_step / now_s_ : 0;
    s.replays = snap.counters.replays;
    s.fences = snap.counters.fences;
    s.accumulations_fenced = snap.ledger.accumulations_fenced;
    s.duplicates = snap.ledger.duplicates_refused;
    s.joins = snap.counters.joins;
    s.moves = snap.counters.moves;
    s.deaths = deaths_;
    s.rollbacks = rollbacks_;
    s.finished = done_;
    double present_s = 0;
    for (const VirtualPeer& p : peers_) {
      present_s += (p.left_s >= 0 ? p.left_s : now_s_) - p.joined_s;
    }
    s.utilisation = present_s > 0 ? std::min(1.0, busy_s_ / present_s) : 0;
  }

  const ClusterSpec& spec_;
  const SwarmSimulationOptions& options_;
  const std::vector<StageModel> stages_;
  const double tokens_per_micro_batch_;
  double report_every_s_ = 0;
  std::unique_ptr<SwarmState> state_;
  SwarmSnapshot mirror_;
  bool mirror_valid_ = false;
  uint64_t reconciled_version_ = 0;  // the roster version Reconcile last acted on
  bool force_reconcile_ = false;     // act again though the version has not moved
  SplitMix rng_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t next_seq_ = 0;
  std::vector<VirtualPeer> peers_;
  std::map<std::string, int> peer_index_;
  std::vector<int> next_index_;  // per group: the next device number for names
  std::vector<VirtualTrainer> trainers_;
  std::vector<uint64_t> reduced_plan_;  // per stage: the newest plan its peers reduce (plans grow)
  std::vector<std::string> events_text_;
  double now_s_ = 0;
  bool open_ = false;
  bool done_ = false;
  double busy_s_ = 0;
  int64_t deaths_ = 0;
  int64_t rebalance_period_ = 0;
  int64_t rollbacks_ = 0;
  double last_row_s_ = 0;  // the newest row
  int64_t last_row_applied_ = 0;
  double base_s_ = 0;  // the row before it: where the newest row's rate starts
  int64_t base_applied_ = 0;
  SwarmSimulationResult result_;
};

absl::Status CheckOptions(const ClusterSpec& spec, const SwarmSimulationOptions& o) {
  const int n_layer = spec.job.model().n_layer();
  if (o.stages < 1 || o.stages > n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("stages must be in [1, ", n_layer,
                                                   "] (the model's n_layer in ", spec.source,
                                                   "), got ", o.stages));
  }
  if (o.micro_batches < 1 || o.micro_batches > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("micro_batches must be in [1, 65536], got ", o.micro_batches));
  }
  if (o.steps < 1 || o.steps > 1000000000) {
    return absl::InvalidArgumentError(absl::StrCat("steps must be in [1, 1e9], got ", o.steps));
  }
  if (o.trainers < 1 || o.trainers > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("trainers must be in [1, 4096], got ", o.trainers));
  }
  if (o.in_flight < 1 || o.in_flight > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("in_flight must be in [1, 256], got ", o.in_flight));
  }
  if (!std::isfinite(o.churn_per_hour) || o.churn_per_hour < 0 || o.churn_per_hour > 3600) {
    return absl::InvalidArgumentError(absl::StrCat(
        "churn must be in [0, 3600] failures per device-hour, got ", o.churn_per_hour));
  }
  if (!std::isfinite(o.kill_every_s) || o.kill_every_s < 0 || o.kill_every_s > 1e7) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kill_every_s must be in [0, 1e7] (0: no kills), got ", o.kill_every_s));
  }
  if (!std::isfinite(o.rebalance_s) || o.rebalance_s < 0 || o.rebalance_s > 86400) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rebalance_s must be in [0, 86400] (0: never), got ", o.rebalance_s));
  }
  if (o.checkpoint_every < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint_every must be >= 0 (0: none), got ", o.checkpoint_every));
  }
  if (!std::isfinite(o.report_every_s) || o.report_every_s < 0 ||
      (o.report_every_s > 0 && (o.report_every_s < 1 || o.report_every_s > 1e7))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "report_every_s must be 0 (the file's) or in [1, 1e7], got ", o.report_every_s));
  }
  if (spec.groups.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("group: no devices in ", spec.source));
  }
  for (size_t g = 0; g < spec.groups.size(); ++g) {
    // Peers sync and reduce over the network: without a bandwidth they never could.
    if (!(spec.groups[g].profile.net_gbps() > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("group[", g,
                       "].net_gbps must be > 0 in a swarm (peers sync and reduce over the "
                       "network), got ",
                       spec.groups[g].profile.net_gbps(), " in ", spec.source));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SwarmSimulationResult> SimulateSwarm(const ClusterSpec& spec,
                                                    const SwarmSimulationOptions& options) {
  SHOAL_RETURN_IF_ERROR(CheckOptions(spec, options));
  const v1::ModelSpec& model = spec.job.model();
  const GptShape shape = ShapeOf(model);
  const std::vector<int> split = UniformSplit(model.n_layer(), options.stages);
  const int64_t mbs = std::max<int64_t>(1, spec.job.global_batch() / options.micro_batches);
  const double tokens = static_cast<double>(mbs) * model.block_size();
  std::vector<StageModel> stages(options.stages);
  int first = 0;
  for (int s = 0; s < options.stages; ++s) {
    const int end = first + split[s];
    SHOAL_ASSIGN_OR_RETURN(const int64_t params, SwarmStageParameters(shape, first, end));
    // The coordinator sizes stages without an activation budget (launch/cmd_coordinator.cc).
    SHOAL_ASSIGN_OR_RETURN(stages[s].bytes, SwarmStageBytesInSplit(shape, split, s, 0));
    double flops_per_token = split[s] * GptBlockFlopsPerToken(shape);
    if (end == model.n_layer()) flops_per_token += GptHeadFlopsPerToken(shape);
    stages[s].forward_flops = flops_per_token * tokens / 3;
    stages[s].transfer_bytes =
        static_cast<double>(params) * (model.param_bytes() + model.optimizer_bytes());
    stages[s].gradient_bytes = static_cast<double>(params) * model.grad_bytes();
    stages[s].sum_squares = 0.25 * (s + 1);
    first = end;
  }
  SwarmSimulation sim(spec, options, std::move(stages), tokens);
  SHOAL_RETURN_IF_ERROR(sim.Init());
  return sim.Run();
}

}  // namespace shoal::scheduler
