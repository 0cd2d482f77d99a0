#include "scheduler/swarm_coordinator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/net_util.h"
#include "common/status.h"

namespace shoal::scheduler {
namespace {

const char* RoleName(v1::WorkerRole role) {
  switch (role) {
    case v1::WORKER_ROLE_PEER: return "peer";
    case v1::WORKER_ROLE_TRAINER: return "trainer";
    default: return "mesh worker";
  }
}

std::string PeerStateName(SwarmPeerState s) {
  switch (s) {
    case SwarmPeerState::kSyncing: return "SYNCING";
    case SwarmPeerState::kServing: return "SERVING";
    case SwarmPeerState::kDraining: return "DRAINING";
  }
  return "?";
}

const char* SourceName(SwarmSyncSource s) {
  switch (s) {
    case SwarmSyncSource::kDonor: return "donor";
    case SwarmSyncSource::kWaitForDonor: return "wait";
    case SwarmSyncSource::kCheckpoint: return "checkpoint";
    case SwarmSyncSource::kInit: return "init";
  }
  return "?";
}

// How a job's stage rounds read in the log.
const char* RoundsName(const std::string& sync) {
  return sync == "demo" ? "DeMo payloads" : "fp32 gradient sums";
}

void FillJoin(const SwarmJoin& join, v1::SwarmJobInfo* info) {
  info->set_stage(join.stage);
  info->set_sync_source(SourceName(join.source));
  info->set_donor(join.donor);
  info->set_donor_address(join.donor_address);
  info->set_sync_step(join.step);
}

}  // namespace

struct SwarmCoordinator::Impl {
  SwarmCoordinatorOptions options;
  const Clock* clock = nullptr;
  std::unique_ptr<SwarmState> state;

  struct Worker {
    std::string id;
    v1::WorkerRole role = v1::WORKER_ROLE_PEER;
    std::string address;
    v1::DeviceProfile device;
    v1::WorkerState state = v1::WORKER_STATE_ALIVE;
    int64_t joined_ms = 0;
    int64_t last_heartbeat_ms = 0;
    v1::StepStats last_stats;
  };

  mutable absl::Mutex mu;
  std::map<std::string, Worker> workers ABSL_GUARDED_BY(mu);
  int64_t next_worker ABSL_GUARDED_BY(mu) = 0;
  uint64_t version ABSL_GUARDED_BY(mu) = 1;
  uint64_t seen_state_version ABSL_GUARDED_BY(mu) = 0;
  // step -> id -> loss committed by the last stage.
  std::map<int64_t, std::map<int64_t, double>> losses ABSL_GUARDED_BY(mu);
  std::deque<v1::SwarmDecision> decisions ABSL_GUARDED_BY(mu);
  std::deque<v1::LossPoint> history ABSL_GUARDED_BY(mu);
  int64_t started_ms = 0;
  v1::Counters counters ABSL_GUARDED_BY(mu);
  std::string checkpoint_path ABSL_GUARDED_BY(mu);

  int64_t last_rebalance_ms ABSL_GUARDED_BY(mu) = 0;  // the rebalancer's last check
  int64_t rebalance_period ABSL_GUARDED_BY(mu) = 0;    // checks so far
  int64_t job ABSL_GUARDED_BY(mu) = 1;  // the job's number under this coordinator
  // The job's stage rounds, "fp32" or "demo"; with "auto", empty until its first worker joins.
  std::string sync ABSL_GUARDED_BY(mu);
  std::deque<std::string> evictions ABSL_GUARDED_BY(mu);  // the newest drift evictions' messages

  // A finished job whose workers are all gone (left or dead) gives way to the next one, which
  // the next accepted join begins: a fresh state at step 0 from the init, the names free again,
  // the history and checkpoint cleared. The coordinator is long-lived; jobs come and go under it
  // (the same config, run again).
  bool JobOver() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (state->next_step() < options.info.total_steps()) return false;
    for (const auto& [id, w] : workers) {
      if (w.state != v1::WORKER_STATE_DEAD && w.state != v1::WORKER_STATE_LEFT) return false;
    }
    return true;
  }
  // A job's state at its start (the first job's may start at the checkpoint), its rounds `sync`.
  absl::StatusOr<std::unique_ptr<SwarmState>> JobState(bool first,
                                                       const std::string& rounds) const {
    SwarmJob next = options.job;
    if (!first) next.checkpoint_step = -1;
    // DeMo's peers clip their own gradients and report their own norms.
    next.own_norms = rounds == "demo";
    return SwarmState::Create(next, options.state);
  }
  // The rounds a job whose first worker measured its link at `gbps` (0: not measured) runs, and
  // why (for the log).
  std::pair<std::string, std::string> DecideSync(double gbps) const {
    if (options.sync != "auto") return {options.sync, "as the config sets"};
    const std::string measured =
        absl::StrCat("its first worker's link to the coordinator measured ",
                     absl::SixDigits(gbps * 8e3), " Mb/s");
    if (!(gbps > 0)) return {"fp32", "swarm.sync = auto: its first worker's link was not measured"};
    if (gbps < options.slow_link_gbps) {
      return {"demo", absl::StrCat("swarm.sync = auto: ", measured, " < slow_link_mbit ",
                                   absl::SixDigits(options.slow_link_gbps * 8e3))};
    }
    return {"fp32", absl::StrCat("swarm.sync = auto: ", measured, " >= slow_link_mbit ",
                                 absl::SixDigits(options.slow_link_gbps * 8e3))};
  }
  // What the joiners of a job whose rounds are `rounds` get.
  v1::SwarmJobInfo JobInfo(const std::string& rounds) const {
    v1::SwarmJobInfo info = options.info;
    if (rounds == "demo") info.set_config_toml(options.demo_config_toml);
    info.set_sync(rounds);
    return info;
  }
  void BeginNextJob(std::unique_ptr<SwarmState> next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    state = std::move(next);
    workers.clear();
    losses.clear();
    decisions.clear();
    history.clear();
    checkpoint_path.clear();
    evictions.clear();
    seen_state_version = 0;
    ++job;
    started_ms = clock->NowUnixMs();
    if (options.log_events) {
      SHOAL_LOG(Info) << "swarm: job " << job - 1 << " finished and its workers are gone; job "
                      << job << " begins at step 0";
    }
  }

  // After any call that may have changed what workers act on: a new roster version when the
  // state's changed (or `force`), waking the watchers.
  void Touch(bool force) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    // Only membership and report events can leave a stage without its state; a commit cannot,
    // and it is the hot call, so it skips the snapshot this takes.
    if (force) RollBackIfNeeded();
    const uint64_t v = state->roster_version();
    if (force || v != seen_state_version) {
      seen_state_version = v;
      ++version;
    }
  }

  absl::StatusOr<Worker*> Live(const std::string& id, const char* field)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    SHOAL_RETURN_IF_ERROR(ValidateWorkerId(id, field, options.limits));
    auto it = workers.find(id);
    if (it == workers.end()) {
      return absl::NotFoundError(absl::StrCat(field, " ", id, ": no such worker in this swarm"));
    }
    if (it->second.state == v1::WORKER_STATE_DEAD || it->second.state == v1::WORKER_STATE_LEFT) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker ", id, " is ", it->second.state == v1::WORKER_STATE_DEAD ? "dead" : "gone",
          " (its lease ran out, or it left): join again"));
    }
    return &it->second;
  }

  // The decision of a step the state just made, with the step's loss.
  void Record(const SwarmApply& apply) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    v1::SwarmDecision d;
    d.set_step(apply.step);
    d.set_clip_scale(apply.clip_scale);
    d.set_lr(apply.lr);
    d.set_grad_norm(apply.grad_norm);
    double sum = 0;
    const auto it = losses.find(apply.step);
    int64_t n = 0;
    if (it != losses.end()) {
      for (const auto& [id, loss] : it->second) {
        sum += loss;
        ++n;
      }
    }
    d.set_loss(n > 0 ? sum / static_cast<double>(n) : std::nan(""));
    for (uint64_t h : apply.stage_hashes) d.add_stage_hashes(h);
    losses.erase(losses.begin(), losses.upper_bound(apply.step));
    decisions.push_back(d);
    while (static_cast<int>(decisions.size()) > options.roster_decisions) decisions.pop_front();
    v1::LossPoint p;
    p.set_step(apply.step);
    p.set_loss(d.loss());
    p.set_unix_ms(clock->NowUnixMs());
    history.push_back(p);
    while (static_cast<int>(history.size()) > options.history_points) history.pop_front();
    if (options.log_events) {
      SHOAL_LOG(Info) << "swarm: step " << apply.step << " applied: loss " << d.loss()
                      << ", grad norm " << apply.grad_norm << ", clip " << apply.clip_scale
                      << ", lr " << apply.lr;
    }
  }

  bool Finished() const { return state->next_step() >= options.info.total_steps(); }

  // A stage lost every peer holding its newest state: the swarm goes back to the newest
  // checkpoint (or the init) at once; the roster tells the peers, which sync it again. Decisions
  // and losses of the steps undone are forgotten.
  void RollBackIfNeeded() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const SwarmSnapshot snap = state->Snapshot();
    if (!snap.rollback.has_value() || Finished()) return;
    const SwarmRollback rb = *snap.rollback;
    absl::StatusOr<int64_t> target = state->RollBack();
    if (!target.ok()) {
      SHOAL_LOG(Error) << "swarm: rollback failed: " << target.status();
      return;
    }
    while (!decisions.empty() && decisions.back().step() >= *target) decisions.pop_back();
    losses.erase(losses.lower_bound(*target), losses.end());
    SHOAL_LOG(Warning) << "swarm: rollback: " << rb.reason << "; every stage goes back from step "
                       << rb.from_step << " to step " << *target << " ("
                       << SourceName(rb.source) << ")";
  }

  // A peer or trainer is gone.
  void Remove(Worker& w, v1::WorkerState how, SwarmLeaveReason reason, const std::string& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    w.state = how;
    if (w.role == v1::WORKER_ROLE_PEER) {
      absl::StatusOr<SwarmRemoval> r = state->RemovePeer(w.id, reason);
      if (options.log_events) {
        SHOAL_LOG(Info) << "swarm: peer " << w.id << " " << why
                        << (r.ok() ? absl::StrCat(": ", r->dropped, " micro-batch(es) to replay",
                                                  r->needs_rollback && !Finished()
                                                      ? "; rollback needed" : "")
                                   : absl::StrCat(" (", r.status().message(), ")"));
      }
    } else {
      absl::StatusOr<int64_t> r = state->RemoveTrainer(w.id);
      if (options.log_events) {
        SHOAL_LOG(Info) << "swarm: trainer " << w.id << " " << why
                        << (r.ok() ? absl::StrCat(": ", *r, " lease(s) back to the pool") : "");
      }
    }
    Touch(true);
  }

  v1::SwarmRoster BuildRoster() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const SwarmSnapshot snap = state->Snapshot();
    v1::SwarmRoster r;
    r.set_version(version);
    r.set_step_open(snap.open_step.has_value());
    r.set_open_step(snap.open_step.value_or(-1));
    r.set_open_lr(snap.open_lr);
    r.set_next_step(snap.next_step);
    r.set_total_steps(options.info.total_steps());
    r.set_finished(snap.next_step >= options.info.total_steps());
    r.set_job(job);
    for (const std::string& e : evictions) r.add_evictions(e);
    r.set_waiting(snap.waiting);
    // A finished job is not rolled back (RollBackIfNeeded): its peers leave one by one, and a
    // stage emptied by them says nothing to those still leaving.
    if (snap.rollback.has_value() && !r.finished()) r.set_rollback(snap.rollback->reason);
    r.set_micro_batches(options.job.micro_batches);
    r.set_checkpoint_step(snap.checkpoint_step);
    if (snap.checkpoint_step >= 0) r.set_checkpoint_path(checkpoint_path);
    std::map<std::string, std::string> address;
    for (const SwarmStageInfo& st : snap.stages) {
      for (const SwarmPeerInfo& p : st.peers) address[p.id] = p.address;
    }
    for (const SwarmStageInfo& st : snap.stages) {
      v1::SwarmStageEntry* e = r.add_stages();
      e->set_index(st.index);
      e->set_first_layer(options.info.first_layer(st.index));
      e->set_end_layer(options.info.end_layer(st.index));
      e->set_phase(snap.open_step.has_value() ? SwarmStagePhaseName(st.phase) : "");
      e->set_missing(st.missing);
      e->set_capacity(st.capacity);
      for (const std::string& p : st.reported) e->add_reported(p);
      if (st.reduction.has_value()) {
        v1::SwarmReductionPlan* plan = e->mutable_reduction();
        plan->set_step(st.reduction->step);
        plan->set_plan(st.reduction->plan);
        for (const std::string& p : st.reduction->peers) {
          plan->add_peers(p);
          plan->add_addresses(address[p]);
          v1::SwarmPlanIds* ids = plan->add_ids();
          ids->set_peer(p);
          const auto it = st.reduction->ids.find(p);
          if (it != st.reduction->ids.end()) {
            for (int64_t id : it->second) ids->add_ids(id);
          }
        }
      }
      for (const SwarmPeerInfo& p : st.peers) {
        v1::SwarmPeerEntry* pe = e->add_peers();
        pe->set_id(p.id);
        pe->set_address(p.address);
        pe->set_stage(p.stage);
        pe->set_state(PeerStateName(p.state));
        pe->set_throughput(p.throughput);
        pe->set_queue(p.queue_length);
        pe->set_accumulated(p.accumulated);
        pe->set_in_round(p.in_round);
        pe->set_donor(p.donor);
        pe->set_synced(p.synced);
        pe->set_drifts(p.drifts);
        pe->set_can_leave(p.can_leave);
        pe->set_moving_to(p.moving_to);
        if (const auto w = workers.find(p.id); w != workers.end()) {
          pe->set_host(w->second.device.host());
          pe->set_peak_gflops(w->second.device.peak_gflops());
        }
        if (p.state == SwarmPeerState::kSyncing) pe->set_sync_source(SourceName(p.source));
      }
    }
    v1::SwarmCounters* c = r.mutable_counters();
    c->set_joins(snap.counters.joins);
    c->set_leaves(snap.counters.leaves);
    c->set_deaths(snap.counters.deaths);
    c->set_evictions(snap.counters.evictions);
    c->set_drifts(snap.counters.drifts);
    c->set_fences(snap.counters.fences);
    c->set_replays(snap.ledger.replays);
    c->set_syncs_refused(snap.counters.syncs_refused);
    c->set_moves(snap.counters.moves);
    c->set_rollbacks(snap.counters.rollbacks);
    c->set_steps_applied(snap.counters.steps_applied);
    c->set_duplicates(snap.ledger.duplicates_refused);
    c->set_lost(snap.ledger.lost);
    for (const v1::SwarmDecision& d : decisions) *r.add_decisions() = d;
    for (const SwarmTrainerInfo& t : snap.trainers) {
      if (t.alive) r.add_trainers(t.id);
    }
    return r;
  }
};

absl::StatusOr<std::unique_ptr<SwarmCoordinator>> SwarmCoordinator::Create(
    SwarmCoordinatorOptions options, const Clock* clock) {
  const v1::SwarmJobInfo& info = options.info;
  if (info.stages() != options.job.stages || info.first_layer_size() != info.stages() ||
      info.end_layer_size() != info.stages()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm job: ", info.stages(), " stages in the job info, ", options.job.stages,
        " in the job, ", info.first_layer_size(), " layer ranges"));
  }
  if (info.total_steps() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm job: total_steps must be >= 1, got ", info.total_steps()));
  }
  if (options.lease_ms <= 0 || options.heartbeat_interval_ms <= 0 ||
      options.heartbeat_interval_ms > options.lease_ms || options.history_points < 1 ||
      options.roster_decisions < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm coordinator: need 0 < heartbeat interval <= lease, history and decisions >= 1; "
        "got heartbeat ", options.heartbeat_interval_ms, " ms, lease ", options.lease_ms, " ms"));
  }
  if (options.checkpoint_path.empty() != (options.job.checkpoint_step < 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm coordinator: a starting checkpoint needs both its step and its path (step ",
        options.job.checkpoint_step, ", path '", options.checkpoint_path, "')"));
  }
  if (!(std::isfinite(options.rebalance_s) && options.rebalance_s >= 0 &&
        options.rebalance_s <= 86400)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm coordinator: the rebalancing period must be in [0, 86400] s, got ",
        options.rebalance_s));
  }
  if (options.rebalance_s > 0) options.state.rebalance.period_s = options.rebalance_s;
  if (options.sync != "fp32" && options.sync != "demo" && options.sync != "auto") {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm coordinator: sync must be fp32, demo or auto, got '", options.sync, "'"));
  }
  if (options.sync != "fp32" && options.demo_config_toml.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("swarm coordinator: sync ", options.sync,
                                                   " needs the DeMo config (demo_config_toml)"));
  }
  if (!(std::isfinite(options.slow_link_gbps) && options.slow_link_gbps > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm coordinator: slow_link_gbps must be > 0, got ", options.slow_link_gbps));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->clock = clock != nullptr ? clock : SystemClock::Get();
  // A fixed choice holds from the start; "auto" waits for the first worker (an fp32 state until
  // then, which its join replaces).
  const std::string initial = impl->options.sync == "auto" ? "fp32" : impl->options.sync;
  auto state = impl->JobState(/*first=*/true, initial);
  if (!state.ok()) return state.status();
  impl->state = std::move(*state);
  if (impl->options.sync != "auto") {
    absl::MutexLock lock(&impl->mu);
    impl->sync = impl->options.sync;
    if (impl->options.log_events) {
      SHOAL_LOG(Info) << "swarm: job 1's stage rounds: " << RoundsName(impl->sync)
                      << " (as the config sets)";
    }
  }
  impl->started_ms = impl->clock->NowUnixMs();
  impl->last_rebalance_ms = impl->started_ms;
  {
    absl::MutexLock lock(&impl->mu);
    impl->checkpoint_path = impl->options.checkpoint_path;
  }
  return std::unique_ptr<SwarmCoordinator>(new SwarmCoordinator(std::move(impl)));
}

SwarmCoordinator::SwarmCoordinator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SwarmCoordinator::~SwarmCoordinator() = default;

const SwarmCoordinatorOptions& SwarmCoordinator::options() const { return impl_->options; }

absl::StatusOr<v1::JoinResponse> SwarmCoordinator::Join(const v1::JoinRequest& request) {
  Impl& m = *impl_;
  if (request.protocol_version() != v1::PROTOCOL_VERSION_CURRENT) {
    return absl::FailedPreconditionError(absl::StrCat(
        "protocol version ", request.protocol_version(), " is not this coordinator's (",
        static_cast<int>(v1::PROTOCOL_VERSION_CURRENT), ")"));
  }
  if (request.role() != v1::WORKER_ROLE_PEER && request.role() != v1::WORKER_ROLE_TRAINER) {
    return absl::FailedPreconditionError(
        "this coordinator runs a swarm (--swarm): join it with `shoal worker --join`, not "
        "`shoal train --coordinator`");
  }
  if (request.has_device()) {
    SHOAL_RETURN_IF_ERROR(ValidateDeviceProfile(request.device(), m.options.limits));
  }
  if (!(std::isfinite(request.link_gbps()) && request.link_gbps() >= 0 &&
        request.link_gbps() <= m.options.limits.max_gbps)) {
    return absl::InvalidArgumentError(absl::StrCat("link_gbps must be in [0, ",
                                                   m.options.limits.max_gbps, "], got ",
                                                   request.link_gbps()));
  }
  if (!request.name().empty()) {
    SHOAL_RETURN_IF_ERROR(ValidateWorkerId(request.name(), "name", m.options.limits));
  }
  const bool peer = request.role() == v1::WORKER_ROLE_PEER;
  if (peer) {
    std::string host;
    int port = 0;
    SHOAL_RETURN_IF_ERROR(SplitHostPort(request.advertise(), "advertise", 1, &host, &port));
    if (m.options.reachable && !m.options.reachable(request.advertise())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the coordinator cannot dial this peer at its address ", request.advertise(),
          " (trainers and other peers must reach it there): give the address they can dial "
          "with --advertise, or join with --trainer, which needs no inbound port"));
    }
  } else if (!m.options.info.train_sha256().empty() && !request.train_sha256().empty() &&
             request.train_sha256() != m.options.info.train_sha256()) {
    // A trainer that names no sha256 checks the job's itself once it has the job.
    return absl::FailedPreconditionError(absl::StrCat(
        "this trainer's train.bin (sha256 ", request.train_sha256(), ") is not the job's (",
        m.options.info.train_sha256(), "): every trainer must read the same tokens"));
  }
  absl::MutexLock lock(&m.mu);
  // Joined to the next job when this one is over, or the first worker of the first job under
  // "auto": to a new state with the job's rounds decided, installed only if it takes the worker
  // (a refused join changes nothing).
  const bool next_job = m.JobOver();
  std::unique_ptr<SwarmState> next;
  std::pair<std::string, std::string> sync;
  if (next_job || m.sync.empty()) {
    sync = m.DecideSync(request.link_gbps());
    SHOAL_ASSIGN_OR_RETURN(next, m.JobState(/*first=*/!next_job, sync.first));
  }
  SwarmState& target = next != nullptr ? *next : *m.state;
  auto taken = [&](const std::string& name) {
    return next == nullptr && m.workers.count(name) > 0;
  };
  std::string id = request.name();
  if (id.empty()) {
    do {
      id = absl::StrCat(peer ? "peer" : "trainer", m.next_worker++);
    } while (taken(id));
  } else if (taken(id)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "the name ", id, " was taken by a worker of this swarm: choose another"));
  }
  const bool decided = next != nullptr;
  v1::JoinResponse response;
  *response.mutable_swarm() = m.JobInfo(decided ? sync.first : m.sync);
  if (peer) {
    absl::StatusOr<SwarmJoin> join =
        target.AddPeer(id, request.advertise(), request.device().memory().host_bytes(),
                       request.device().net_gbps() * 1e9);
    if (!join.ok()) return join.status();
    FillJoin(*join, response.mutable_swarm());
  } else {
    SHOAL_RETURN_IF_ERROR(target.AddTrainer(id));
  }
  if (next_job) {
    m.BeginNextJob(std::move(next));
  } else if (next != nullptr) {
    m.state = std::move(next);
  }
  if (decided) {
    m.sync = sync.first;
    if (m.options.log_events) {
      SHOAL_LOG(Info) << "swarm: job " << m.job << "'s stage rounds: " << RoundsName(m.sync)
                      << " (" << sync.second << ")";
    }
  }
  Impl::Worker& w = m.workers[id];
  w.id = id;
  w.role = request.role();
  w.address = request.advertise();
  w.device = request.device();
  w.joined_ms = w.last_heartbeat_ms = m.clock->NowUnixMs();
  m.counters.set_joins_total(m.counters.joins_total() + 1);
  m.Touch(true);
  if (m.options.log_events) {
    SHOAL_LOG(Info) << "swarm: " << RoleName(request.role()) << " " << id << " joined"
                    << (peer ? absl::StrCat(" at ", request.advertise(), ": stage ",
                                            response.swarm().stage(), ", syncs from ",
                                            response.swarm().sync_source(),
                                            response.swarm().donor().empty()
                                                ? "" : " " + response.swarm().donor())
                             : "");
  }
  response.set_worker_id(id);
  response.set_lease_ms(m.options.lease_ms);
  response.set_heartbeat_interval_ms(m.options.heartbeat_interval_ms);
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> SwarmCoordinator::Heartbeat(
    const v1::HeartbeatRequest& request) {
  Impl& m = *impl_;
  SHOAL_RETURN_IF_ERROR(ValidateHeartbeat(request, m.options.limits));
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> w = m.Live(request.worker_id(), "worker_id");
  if (!w.ok()) return w.status();
  (*w)->last_heartbeat_ms = m.clock->NowUnixMs();
  m.counters.set_heartbeats_total(m.counters.heartbeats_total() + 1);
  if (request.has_stats()) {
    (*w)->last_stats = request.stats();
    if ((*w)->role == v1::WORKER_ROLE_PEER && request.stats().samples_per_s() > 0) {
      // Best effort: a load report never fails the heartbeat.
      (void)m.state->ReportLoad((*w)->id, request.stats().samples_per_s(), 0);
    }
  }
  v1::HeartbeatResponse response;
  response.set_lease_ms(m.options.lease_ms);
  response.set_assignment_version(m.version);
  response.set_drain((*w)->state == v1::WORKER_STATE_DRAINING);
  return response;
}

absl::Status SwarmCoordinator::Leave(const v1::LeaveRequest& request) {
  Impl& m = *impl_;
  SHOAL_RETURN_IF_ERROR(ValidateLeave(request, m.options.limits));
  absl::MutexLock lock(&m.mu);
  auto it = m.workers.find(request.worker_id());
  if (it == m.workers.end()) {
    return absl::NotFoundError(absl::StrCat("worker_id ", request.worker_id(), ": no such worker"));
  }
  Impl::Worker& w = it->second;
  if (w.state == v1::WORKER_STATE_DEAD || w.state == v1::WORKER_STATE_LEFT) {
    return absl::OkStatus();
  }
  m.counters.set_leaves_total(m.counters.leaves_total() + 1);
  m.Remove(w, v1::WORKER_STATE_LEFT, SwarmLeaveReason::kLeft,
           absl::StrCat("left", request.reason().empty() ? "" : " (" + request.reason() + ")"));
  return absl::OkStatus();
}

absl::Status SwarmCoordinator::Drain(const std::string& worker_id) {
  Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> w = m.Live(worker_id, "worker_id");
  if (!w.ok()) return w.status();
  if ((*w)->role == v1::WORKER_ROLE_PEER) SHOAL_RETURN_IF_ERROR(m.state->Drain(worker_id));
  (*w)->state = v1::WORKER_STATE_DRAINING;
  m.Touch(true);
  return absl::OkStatus();
}

absl::StatusOr<v1::SwarmRoster> SwarmCoordinator::WaitRoster(const std::string& worker_id,
                                                             uint64_t known_version,
                                                             absl::Duration timeout) {
  Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  if (absl::StatusOr<Impl::Worker*> w = m.Live(worker_id, "worker_id"); !w.ok()) {
    return w.status();
  }
  auto changed = [&m, known_version]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(m.mu) {
    return m.version != known_version;
  };
  m.mu.AwaitWithTimeout(absl::Condition(&changed), timeout);
  if (absl::StatusOr<Impl::Worker*> w = m.Live(worker_id, "worker_id"); !w.ok()) {
    return w.status();
  }
  return m.BuildRoster();
}

absl::StatusOr<v1::LeaseResponse> SwarmCoordinator::Lease(const v1::LeaseRequest& request) {
  Impl& m = *impl_;
  if (request.max() < 0 || request.max() > 4096 || request.release_size() > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max must be in [0, 4096] and release at most 4096 ids; got max ", request.max(), ", ",
        request.release_size(), " to release"));
  }
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> w = m.Live(request.worker_id(), "worker_id");
  if (!w.ok()) return w.status();
  if ((*w)->role != v1::WORKER_ROLE_TRAINER) {
    return absl::FailedPreconditionError(absl::StrCat(request.worker_id(), " is not a trainer"));
  }
  v1::LeaseResponse response;
  for (int64_t id : request.release()) {
    (void)m.state->Release(request.worker_id(), id);  // a lease already gone is not an error
  }
  response.set_roster_version(m.version);
  const SwarmSnapshot snap = m.state->Snapshot();
  response.set_rollbacks(snap.counters.rollbacks);
  if (!snap.open_step.has_value() || request.max() == 0) {
    response.set_step_open(snap.open_step.has_value());
    response.set_step(snap.open_step.value_or(snap.next_step));
    return response;
  }
  absl::StatusOr<std::vector<SwarmLease>> leases = m.state->Lease(request.worker_id(),
                                                                  request.max());
  if (!leases.ok()) {
    if (leases.status().code() == absl::StatusCode::kFailedPrecondition) {
      response.set_step_open(false);
      response.set_step(snap.next_step);
      return response;
    }
    return leases.status();
  }
  response.set_step_open(true);
  response.set_step(*snap.open_step);
  for (const SwarmLease& l : *leases) {
    v1::SwarmLeaseEntry* e = response.add_leases();
    e->set_id(l.id);
    for (int s : l.stages) e->add_stages(s);
    e->set_replay(l.replay);
  }
  return response;
}

absl::Status SwarmCoordinator::Commit(const v1::CommitRequest& request) {
  Impl& m = *impl_;
  if (request.has_loss() && !std::isfinite(request.loss())) {
    return absl::InvalidArgumentError(absl::StrCat("loss must be finite, got ", request.loss()));
  }
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> p = m.Live(request.peer_id(), "peer_id");
  if (!p.ok()) return p.status();
  // The id names its step (step * M + i); the state refuses ids outside the open step.
  if (request.step() < 0 || request.id() < 0 ||
      request.id() / m.options.job.micro_batches != request.step()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "commit: id ", request.id(), " is not a micro-batch of step ", request.step(), " (M = ",
        m.options.job.micro_batches, ")"));
  }
  if (const int64_t epoch = m.state->rollbacks(); request.rollbacks() != epoch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "commit of micro-batch ", request.id(), ": leased before rollback ", epoch,
        " (its call carries epoch ", request.rollbacks(), "), which voided the lease"));
  }
  SHOAL_RETURN_IF_ERROR(m.state->Commit(request.peer_id(), request.trainer_id(), request.id()));
  if (request.has_loss()) m.losses[request.step()][request.id()] = request.loss();
  m.Touch(false);
  return absl::OkStatus();
}

absl::StatusOr<v1::ReportPeerResponse> SwarmCoordinator::ReportPeer(
    const v1::ReportPeerRequest& request) {
  Impl& m = *impl_;
  std::string address;
  {
    absl::MutexLock lock(&m.mu);
    absl::StatusOr<Impl::Worker*> r = m.Live(request.worker_id(), "worker_id");
    if (!r.ok()) return r.status();
    SHOAL_RETURN_IF_ERROR(ValidateWorkerId(request.peer_id(), "peer_id", m.options.limits));
    if (m.workers.count(request.peer_id()) == 0) {
      return absl::NotFoundError(
          absl::StrCat("peer_id ", request.peer_id(), ": no such worker in this swarm"));
    }
    absl::StatusOr<Impl::Worker*> p = m.Live(request.peer_id(), "peer_id");
    if (!p.ok()) {
      // Dead or gone already: out of the roster, as a fence would leave it.
      v1::ReportPeerResponse response;
      response.set_fenced(true);
      return response;
    }
    if ((*p)->role != v1::WORKER_ROLE_PEER) {
      return absl::InvalidArgumentError(absl::StrCat(request.peer_id(), " is not a peer"));
    }
    address = (*p)->address;
  }
  v1::ReportPeerResponse response;
  response.set_fenced(FenceIfUnreachable(
      request.peer_id(), address,
      absl::StrCat("reported by ", request.worker_id(), ": ", request.reason())));
  return response;
}

bool SwarmCoordinator::WatchEnded(const std::string& worker_id) {
  Impl& m = *impl_;
  std::string address;
  {
    absl::MutexLock lock(&m.mu);
    absl::StatusOr<Impl::Worker*> p = m.Live(worker_id, "worker_id");
    if (!p.ok() || (*p)->role != v1::WORKER_ROLE_PEER) return false;
    address = (*p)->address;
  }
  return FenceIfUnreachable(worker_id, address, "its roster watch ended");
}

bool SwarmCoordinator::FenceIfUnreachable(const std::string& peer_id, const std::string& address,
                                          const std::string& why) {
  Impl& m = *impl_;
  // The dial runs without the lock: it may take a moment.
  const bool reachable = !m.options.reachable || m.options.reachable(address);
  if (reachable) return false;
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> p = m.Live(peer_id, "peer_id");
  if (p.ok()) {
    m.Remove(**p, v1::WORKER_STATE_DEAD, SwarmLeaveReason::kDead,
             absl::StrCat("is unreachable at ", address, " (", why, "): fenced"));
  }
  return true;
}

absl::StatusOr<v1::PeerSyncedResponse> SwarmCoordinator::PeerSynced(
    const v1::PeerSyncedRequest& request) {
  Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> p = m.Live(request.peer_id(), "peer_id");
  if (!p.ok()) return p.status();
  v1::PeerSyncedResponse response;
  if (!request.failed_donor().empty()) {
    absl::StatusOr<SwarmJoin> next = m.state->DonorFailed(request.peer_id(),
                                                          request.failed_donor());
    if (!next.ok()) return next.status();
    *response.mutable_swarm() = m.JobInfo(m.sync);
    FillJoin(*next, response.mutable_swarm());
    if (m.options.log_events) {
      SHOAL_LOG(Info) << "swarm: peer " << request.peer_id() << " could not sync from "
                      << request.failed_donor() << " (" << request.error() << "); now from "
                      << response.swarm().sync_source() << " " << response.swarm().donor();
    }
    m.Touch(true);
    return response;
  }
  SHOAL_RETURN_IF_ERROR(m.state->PeerSynced(request.peer_id(), request.step(),
                                            request.param_hash()));
  if (m.options.log_events) {
    SHOAL_LOG(Info) << "swarm: peer " << request.peer_id() << " synced state " << request.step();
  }
  m.Touch(true);
  return response;
}

absl::StatusOr<v1::StageReportResponse> SwarmCoordinator::StageReport(
    const v1::StageReportRequest& request) {
  Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> p = m.Live(request.peer_id(), "peer_id");
  if (!p.ok()) return p.status();
  SwarmStageReport report;
  report.peer = request.peer_id();
  report.step = request.step();
  report.plan = request.plan();
  report.ids.assign(request.ids().begin(), request.ids().end());
  report.sum_squares = request.sum_squares();
  report.param_hash = request.param_hash();
  absl::StatusOr<SwarmReportOutcome> outcome = m.state->StageReport(report);
  if (!outcome.ok()) return outcome.status();
  v1::StageReportResponse response;
  response.set_phase(SwarmStagePhaseName(outcome->stage_phase));
  for (const SwarmDrift& d : outcome->drifted) {
    std::string message = d.message;
    auto w = m.workers.find(d.peer);
    if (d.evicted && w != m.workers.end()) {
      // Drifting twice is the machine's arithmetic, not bad luck: name what computes it.
      absl::StrAppend(&message, " (its CPU: ", w->second.device.device_name().empty()
                                                    ? "unknown" : w->second.device.device_name(),
                      "; BLAS: ", w->second.device.blas().empty() ? "unknown"
                                                                   : w->second.device.blas(),
                      "; the peers of a stage must compute bit-identically: one BLAS build "
                      "and CPU family per stage)");
    }
    response.add_drifted(message);
    if (d.evicted) {
      m.evictions.push_back(message);
      while (m.evictions.size() > 16) m.evictions.pop_front();
    }
    if (m.options.log_events) SHOAL_LOG(Warning) << "swarm: " << message;
  }
  if (outcome->apply.has_value()) {
    m.Record(*outcome->apply);
    response.set_decided(true);
    *response.mutable_decision() = m.decisions.back();
  }
  m.Touch(true);
  return response;
}

absl::Status SwarmCoordinator::CheckpointSaved(const v1::CheckpointSavedRequest& request) {
  Impl& m = *impl_;
  if (request.path().empty() || request.path().size() > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(
        "path: a checkpoint folder of 1..4096 bytes, got ", request.path().size()));
  }
  absl::MutexLock lock(&m.mu);
  absl::StatusOr<Impl::Worker*> w = m.Live(request.worker_id(), "worker_id");
  if (!w.ok()) return w.status();
  if ((*w)->role != v1::WORKER_ROLE_TRAINER) {
    return absl::FailedPreconditionError(absl::StrCat(request.worker_id(), " is not a trainer"));
  }
  SHOAL_RETURN_IF_ERROR(m.state->CheckpointSaved(request.step()));
  m.checkpoint_path = request.path();
  if (m.options.log_events) {
    SHOAL_LOG(Info) << "swarm: checkpoint of step " << request.step() << " at " << request.path()
                    << " (by " << request.worker_id() << ")";
  }
  m.Touch(true);
  return absl::OkStatus();
}

int SwarmCoordinator::ExpireLeases() {
  Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  const int64_t now = m.clock->NowUnixMs();
  int n = 0;
  for (auto& [id, w] : m.workers) {
    if (w.state != v1::WORKER_STATE_ALIVE && w.state != v1::WORKER_STATE_DRAINING) continue;
    if (now - w.last_heartbeat_ms <= m.options.lease_ms) continue;
    m.counters.set_expirations_total(m.counters.expirations_total() + 1);
    m.Remove(w, v1::WORKER_STATE_DEAD, SwarmLeaveReason::kDead,
             absl::StrCat("sent no heartbeat for ", now - w.last_heartbeat_ms, " ms: dead"));
    ++n;
  }
  return n;
}

std::optional<SwarmMove> SwarmCoordinator::Rebalance() {
  Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  const int64_t now = m.clock->NowUnixMs();
  if (m.options.rebalance_s <= 0 ||
      static_cast<double>(now - m.last_rebalance_ms) < m.options.rebalance_s * 1000) {
    return std::nullopt;
  }
  m.last_rebalance_ms = now;
  absl::StatusOr<std::optional<SwarmMove>> move = m.state->Rebalance(++m.rebalance_period);
  if (!move.ok()) {
    SHOAL_LOG(Error) << "swarm: rebalancing: " << move.status();
    return std::nullopt;
  }
  if (!move->has_value()) return std::nullopt;
  const SwarmMove& mv = **move;
  if (m.options.log_events) {
    SHOAL_LOG(Info) << "swarm: rebalancing: peer " << mv.peer << " moves from stage " << mv.from
                    << " to stage " << mv.to << ", the bottleneck (" << mv.bottleneck_before
                    << " -> " << mv.bottleneck_after << " samples/s expected; the peer "
                    << mv.peer_throughput << ", the stages "
                    << absl::StrJoin(mv.capacities, " / ",
                                     [](std::string* out, double c) {
                                       absl::StrAppend(out, absl::SixDigits(c));
                                     })
                    << ")";
  }
  m.Touch(true);
  return mv;
}

v1::SwarmRoster SwarmCoordinator::Roster() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->BuildRoster();
}

void SwarmCoordinator::CountRejected() {
  absl::MutexLock lock(&impl_->mu);
  impl_->counters.set_rejected_requests_total(impl_->counters.rejected_requests_total() + 1);
}

v1::ClusterStatus SwarmCoordinator::Status() const {
  const Impl& m = *impl_;
  absl::MutexLock lock(&m.mu);
  v1::ClusterStatus s;
  s.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
  s.set_coordinator_version(m.options.version);
  s.set_now_unix_ms(m.clock->NowUnixMs());
  s.set_started_unix_ms(m.started_ms);
  *s.mutable_swarm() = m.BuildRoster();
  const v1::SwarmRoster& r = s.swarm();
  s.set_health(!r.rollback().empty() ? "degraded"
               : r.step_open() || r.finished() ? "healthy" : "waiting");
  v1::JobSpec* job = s.mutable_job();
  job->set_name("swarm");
  *s.mutable_counters() = m.counters;
  for (const auto& [id, w] : m.workers) {
    v1::WorkerStatus* ws = s.add_workers();
    ws->set_worker_id(id);
    ws->set_mesh_rank(-1);
    *ws->mutable_device() = w.device;
    ws->set_state(w.state);
    ws->set_joined_unix_ms(w.joined_ms);
    ws->set_last_heartbeat_unix_ms(w.last_heartbeat_ms);
    *ws->mutable_last_stats() = w.last_stats;
    v1::Assignment* a = ws->mutable_assignment();
    a->set_worker_id(id);
    a->set_placed(w.role == v1::WORKER_ROLE_PEER);
    a->set_reason(w.role == v1::WORKER_ROLE_PEER ? "peer" : "trainer");
    for (const v1::SwarmStageEntry& st : r.stages()) {
      for (const v1::SwarmPeerEntry& p : st.peers()) {
        if (p.id() != id) continue;
        a->set_stage(st.index());
        a->set_first_layer(st.first_layer());
        a->set_end_layer(st.end_layer());
        a->set_drain(p.state() == "DRAINING");
      }
    }
  }
  v1::JobStatus* js = s.mutable_job_status();
  if (!m.decisions.empty()) {
    js->set_step(m.decisions.back().step());
    js->set_loss(m.decisions.back().loss());
  }
  double tps = 0;
  for (const auto& [id, w] : m.workers) {
    if (w.role == v1::WORKER_ROLE_TRAINER && w.state == v1::WORKER_STATE_ALIVE) {
      tps += w.last_stats.tokens_per_s();
    }
  }
  js->set_tokens_per_s(tps);
  for (const v1::LossPoint& p : m.history) *js->add_history() = p;
  return s;
}

}  // namespace shoal::scheduler
