#include "scheduler/coordinator_core.h"

#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <google/protobuf/text_format.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"

namespace shoal::scheduler {
namespace {

// Dead and departed workers stay in the status so an operator sees what happened, but a swarm
// with churn would grow without bound: beyond this many the oldest retired records go.
constexpr size_t kMaxRetiredWorkers = 1024;

bool IsLive(v1::WorkerState s) {
  return s == v1::WORKER_STATE_ALIVE || s == v1::WORKER_STATE_DRAINING;
}

// The first field (depth first, in declaration order) where `theirs` differs from `ours`, as
// "job.model.n_layer is 4 in this request, 6 in the job"; empty when they are equal. Reflection
// keeps this right when fields are added to JobSpec.
std::string FirstDifference(const google::protobuf::Message& ours,
                            const google::protobuf::Message& theirs, const std::string& prefix) {
  using google::protobuf::FieldDescriptor;
  const google::protobuf::Descriptor* d = ours.GetDescriptor();
  const google::protobuf::Reflection* r = ours.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    const std::string path = absl::StrCat(prefix, ".", f->name());
    if (!f->is_repeated() && f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      std::string diff = FirstDifference(r->GetMessage(ours, f), r->GetMessage(theirs, f), path);
      if (!diff.empty()) return diff;
      continue;
    }
    std::string a, b;
    google::protobuf::TextFormat::PrintFieldValueToString(ours, f, -1, &a);
    google::protobuf::TextFormat::PrintFieldValueToString(theirs, f, -1, &b);
    if (a != b) return absl::StrCat(path, " is ", b, " in this request, ", a, " in the job");
  }
  return "";
}

}  // namespace

namespace core_internal {

// One worker as the coordinator knows it. Besides what the status shows, it carries what the
// heartbeat path needs in O(1): its role in the current layout and its contribution to the job's
// aggregated statistics.
struct Worker {
  std::string id;
  int mesh_rank = -1;
  v1::DeviceProfile device;
  v1::WorkerState state = v1::WORKER_STATE_ALIVE;
  int64_t joined_ms = 0;
  int64_t last_heartbeat_ms = 0;
  v1::StepStats last_stats;
  v1::Assignment assignment;
  uint64_t retired_seq = 0;  // when it died or left (for pruning); 0 while live

  // Role in the current layout.
  bool placed = false;
  bool replica_leader = false;  // first stage, tp rank 0: reports its replica's tokens/s
  bool loss_reporter = false;   // last stage, tp rank 0: computes its replica's loss
  double predicted_compute_s = 0;

  // Job statistics already counted from this worker.
  int64_t loss_counted_step = -1;
  double tokens_counted = 0;

  // Rebalancing: the current speed factor and the latest usable measurement.
  double speed_factor = 1.0;
  double measured_step_s = 0;     // from the latest heartbeat with step_time_s > 0
  double measured_predicted_s = 0;  // predicted_compute_s of the placement at that time
  double measured_factor = 1.0;     // speed_factor the prediction was made with
};

}  // namespace core_internal

using core_internal::Worker;

struct CoordinatorCore::State {
  mutable absl::Mutex mu;
  absl::CondVar changed;  // a layout was installed or a worker's state or drain flag changed

  // The job, fixed by the Join that began it. Jobs come and go under one coordinator: a job is
  // over once none of its workers is live, and the next fresh Join begins the next one (Join).
  // Layout versions run on across jobs; the current job's layouts are those numbered above
  // job_start_version.
  bool have_job = false;
  v1::JobSpec job;
  uint64_t job_number = 0;         // 1 for the first job
  uint64_t job_start_version = 0;  // last_version when the current job began
  std::map<std::string, std::unique_ptr<Worker>> workers;  // by id: the status lists them sorted
  std::deque<std::pair<uint64_t, std::string>> retired;   // (retired_seq, id), oldest first
  uint64_t retire_seq = 0;
  size_t retired_count = 0;
  uint64_t next_anonymous = 0;  // for "w<N>" ids

  // Layout. Solves run outside the mutex (a large one takes a while and heartbeats must go on):
  // a membership change sets `dirty`, and whichever caller finds no solve running solves until
  // the layout is current, so a burst of joins costs a few solves, not one each.
  v1::Layout layout;
  uint64_t last_version = 0;
  std::string layout_error;
  absl::Status last_solve = absl::OkStatus();
  bool dirty = false;
  bool force = false;  // solve even if the usable set did not change (Rebalance)
  bool solving = false;
  uint64_t solves_done = 0;

  // Job statistics, kept incrementally so a heartbeat costs O(1).
  int64_t job_step = 0;
  bool have_step = false;
  double loss = 0;
  double loss_sum = 0;
  int loss_count = 0;
  double tokens_sum = 0;
  std::deque<v1::LossPoint> history;

  v1::Counters counters;
  int64_t started_ms = 0;
};

namespace {

using State = CoordinatorCore::State;

void Retire(State* st, Worker* w, v1::WorkerState state) {
  w->state = state;
  w->placed = false;
  w->replica_leader = false;
  w->loss_reporter = false;
  if (w->tokens_counted != 0) {
    st->tokens_sum -= w->tokens_counted;
    w->tokens_counted = 0;
  }
  w->retired_seq = ++st->retire_seq;
  st->retired.emplace_back(w->retired_seq, w->id);
  ++st->retired_count;
  while (st->retired_count > kMaxRetiredWorkers && !st->retired.empty()) {
    auto [seq, id] = st->retired.front();
    st->retired.pop_front();
    auto it = st->workers.find(id);
    // A stale entry: the id rejoined (and maybe retired again) since.
    if (it == st->workers.end() || it->second->retired_seq != seq) continue;
    st->workers.erase(it);
    --st->retired_count;
  }
  st->changed.SignalAll();
}

int CountUsable(const State& st) {
  int n = 0;
  for (const auto& [id, w] : st.workers) n += w->state == v1::WORKER_STATE_ALIVE;
  return n;
}

std::string WaitingReason(const State& st) {
  const int need = std::max(1, st.job.expected_workers());
  return absl::StrCat("waiting for workers: ", CountUsable(st), " of ", need, " usable");
}

// The current job's layout version, 0 while it has none. st.layout may then still hold the last
// version of the job before (retired, no placements): a version never goes back.
uint64_t JobLayoutVersion(const State& st) {
  return st.layout.version() > st.job_start_version ? st.layout.version() : 0;
}

// Live workers whose lease has not run out at `now` (the periodic sweep may lag behind), in id
// order.
std::vector<const Worker*> LeasedWorkers(const State& st, int64_t now, int64_t lease_ms) {
  std::vector<const Worker*> out;
  for (const auto& [id, w] : st.workers) {
    if (IsLive(w->state) && now - w->last_heartbeat_ms <= lease_ms) out.push_back(w.get());
  }
  return out;
}

// "rank0, rank1", or "w0, w1, w2, w3 and 6 more": enough to find them in `shoal status`.
std::string NameSome(const std::vector<const Worker*>& workers) {
  constexpr size_t kNamed = 4;
  std::string out;
  for (size_t i = 0; i < workers.size() && i < kNamed; ++i) {
    absl::StrAppend(&out, i == 0 ? "" : ", ", workers[i]->id);
  }
  if (workers.size() > kNamed) absl::StrAppend(&out, " and ", workers.size() - kNamed, " more");
  return out;
}

// Every worker's assignment and role from st->layout; the aggregated tokens/s recomputed.
void DeriveAssignments(State* st) {
  const v1::Layout& layout = st->layout;
  std::map<std::string, const v1::Placement*> placement_of;
  for (const v1::Placement& p : layout.placements()) placement_of[p.worker_id()] = &p;
  std::map<int, const v1::Pipeline*> pipeline_of;
  for (const v1::Pipeline& p : layout.pipelines()) pipeline_of[p.replica()] = &p;

  st->tokens_sum = 0;
  for (auto& [id, wp] : st->workers) {
    Worker& w = *wp;
    v1::Assignment& a = w.assignment;
    const std::string old_reason = a.reason();
    a.Clear();
    a.set_version(layout.version());
    a.set_worker_id(id);
    a.set_drain(w.state == v1::WORKER_STATE_DRAINING);
    w.placed = w.replica_leader = w.loss_reporter = false;
    w.predicted_compute_s = 0;
    w.tokens_counted = 0;
    auto pit = placement_of.find(id);
    if (!IsLive(w.state)) {
      a.set_reason(old_reason);  // why it is gone
      continue;
    }
    if (w.state == v1::WORKER_STATE_DRAINING) {
      a.set_reason("draining: finish the step and leave");
      continue;
    }
    if (pit == placement_of.end()) {
      a.set_reason(absl::StrCat("not placed in layout v", layout.version(), ": ",
                                layout.summary()));
      continue;
    }
    const v1::Placement& p = *pit->second;
    auto lit = pipeline_of.find(p.replica());
    const v1::Stage* stage = nullptr;
    if (lit != pipeline_of.end()) {
      for (const v1::Stage& s : lit->second->stages()) {
        if (s.index() == p.stage()) stage = &s;
      }
    }
    if (stage == nullptr) {
      // The solver's output names a pipeline stage that does not exist: a solver bug, but the
      // worker must not be sent a half-filled assignment.
      a.set_reason(absl::StrCat("layout v", layout.version(), " places this worker in replica ",
                                p.replica(), " stage ", p.stage(), ", which it does not list"));
      continue;
    }
    a.set_placed(true);
    a.set_tp(layout.tp());
    a.set_pp(layout.pp());
    a.set_dp(layout.dp());
    a.set_tp_rank(p.tp_rank());
    a.set_stage(p.stage());
    a.set_replica(p.replica());
    a.set_first_layer(stage->first_layer());
    a.set_end_layer(stage->end_layer());
    a.set_has_embedding(stage->has_embedding());
    a.set_has_head(stage->has_head());
    a.set_micro_batch_size(layout.micro_batch_size());
    a.set_micro_batches(lit->second->micro_batches());
    *a.mutable_memory() = p.memory();
    a.set_predicted_step_s(layout.predicted_step_s());
    *a.mutable_stage_peers() = stage->workers();
    w.placed = true;
    w.predicted_compute_s = p.predicted_compute_s();
    w.replica_leader = p.tp_rank() == 0 && p.stage() == 0;
    w.loss_reporter = p.tp_rank() == 0 && stage->has_head();
    if (w.replica_leader) {
      w.tokens_counted = w.last_stats.tokens_per_s();
      st->tokens_sum += w.tokens_counted;
    }
  }
}

// Folds one placed worker's latest stats into the job's step, loss, throughput and history.
void UpdateJobStats(State* st, Worker* w, int64_t now_ms, int history_points) {
  const v1::StepStats& s = w->last_stats;
  if (!st->have_step || s.step() > st->job_step) {
    st->have_step = true;
    st->job_step = s.step();
    st->loss_sum = 0;
    st->loss_count = 0;
    v1::LossPoint point;
    point.set_step(s.step());
    point.set_loss(st->loss);  // carried until this step's loss arrives
    point.set_tokens_per_s(st->tokens_sum);
    point.set_unix_ms(now_ms);
    st->history.push_back(std::move(point));
    while (st->history.size() > static_cast<size_t>(std::max(1, history_points))) {
      st->history.pop_front();
    }
  }
  if (w->replica_leader) {
    st->tokens_sum += s.tokens_per_s() - w->tokens_counted;
    w->tokens_counted = s.tokens_per_s();
  }
  if (w->loss_reporter && s.step() == st->job_step && w->loss_counted_step != s.step()) {
    w->loss_counted_step = s.step();
    st->loss_sum += s.loss();
    ++st->loss_count;
    st->loss = st->loss_sum / st->loss_count;
  }
  if (!st->history.empty() && st->history.back().step() == st->job_step) {
    st->history.back().set_loss(st->loss);
    st->history.back().set_tokens_per_s(st->tokens_sum);
  }
}

}  // namespace

CoordinatorCore::CoordinatorCore(const CoordinatorOptions& options, const Clock* clock)
    : options_(options), clock_(clock), state_(new State) {
  state_->started_ms = clock_->NowUnixMs();
}

CoordinatorCore::~CoordinatorCore() { delete state_; }

namespace {

// True while every worker the current layout places is alive (not draining, dead or gone): the
// layout can go on running as it is.
bool LayoutStillRuns(const State& st) {
  if (JobLayoutVersion(st) == 0) return false;
  for (const v1::Placement& p : st.layout.placements()) {
    auto it = st.workers.find(p.worker_id());
    if (it == st.workers.end() || it->second->state != v1::WORKER_STATE_ALIVE) return false;
  }
  return true;
}

void InstallSolve(State* st, const absl::StatusOr<v1::Layout>& result, bool force,
                  const CoordinatorOptions& options) {
  const bool log_events = options.log_events;
  ++st->solves_done;
  st->last_solve = result.status();
  // Keep a running layout when the new one is not worth a restart.
  if (result.ok() && !force && options.relayout_min_gain > 0 && LayoutStillRuns(*st) &&
      result->predicted_tokens_per_s() <
          st->layout.predicted_tokens_per_s() * (1 + options.relayout_min_gain)) {
    st->layout_error.clear();
    const std::string why = absl::StrFormat(
        "standing by: layout v%d kept (a new one would predict %.4g tokens/s against %.4g, "
        "less than the %g%% gain a change must bring)",
        st->layout.version(), result->predicted_tokens_per_s(),
        st->layout.predicted_tokens_per_s(), 100 * options.relayout_min_gain);
    DeriveAssignments(st);  // same version; a re-joined worker gets its placement back
    for (auto& [id, w] : st->workers) {
      if (w->state == v1::WORKER_STATE_ALIVE && !w->placed) w->assignment.set_reason(why);
    }
    if (log_events) SHOAL_LOG(Info) << "layout: " << why;
    st->changed.SignalAll();
    return;
  }
  if (!result.ok()) {
    st->layout_error = std::string(result.status().message());
    if (log_events) {
      SHOAL_LOG(Warning) << "layout: solve failed, keeping v" << st->layout.version() << ": "
                         << st->layout_error;
    }
    st->changed.SignalAll();
    return;
  }
  st->layout = *result;
  st->layout.set_version(++st->last_version);
  st->layout_error.clear();
  st->counters.set_layouts_total(st->counters.layouts_total() + 1);
  DeriveAssignments(st);
  if (log_events) {
    SHOAL_LOG(Info) << "layout v" << st->layout.version() << ": " << st->layout.summary();
  }
  st->changed.SignalAll();
}

// Solves until the layout reflects the current usable set. Called without the mutex held; with
// `wait`, returns only once no solve is pending or running (another caller's included).
void RunSolves(State* st, const CoordinatorOptions& options, bool wait) {
  st->mu.Lock();
  while (st->dirty && !st->solving) {
    st->dirty = false;
    const bool force = st->force;
    st->force = false;
    std::vector<SolverDevice> devices;
    for (const auto& [id, w] : st->workers) {
      if (w->state != v1::WORKER_STATE_ALIVE) continue;
      SolverDevice d{id, w->device};
      d.profile.set_fp32_gflops(d.profile.fp32_gflops() * w->speed_factor);
      d.profile.set_bf16_gflops(d.profile.bf16_gflops() * w->speed_factor);
      devices.push_back(std::move(d));
    }
    const size_t need = static_cast<size_t>(std::max(1, st->job.expected_workers()));
    if (!st->have_job || devices.size() < need) {
      if (force) {
        st->last_solve = absl::FailedPreconditionError(WaitingReason(*st));
        ++st->solves_done;
      }
      continue;
    }
    const v1::JobSpec job = st->job;
    const uint64_t job_number = st->job_number;
    st->solving = true;
    st->mu.Unlock();
    absl::StatusOr<v1::Layout> result = SolveLayout(devices, job, options.solver);
    st->mu.Lock();
    st->solving = false;
    if (st->job_number != job_number) {
      // Every worker of that job left during the solve and the next job began: its layout
      // would place workers that are gone under a spec that no longer holds. The new job's
      // Join has set `dirty`, so the loop solves for it instead.
      if (force) {
        ++st->solves_done;
        st->last_solve = absl::FailedPreconditionError(absl::StrCat(
            "job ", job_number, " ended during the solve; job ", st->job_number, " began"));
      }
      continue;
    }
    InstallSolve(st, result, force, options);
  }
  if (wait) {
    while (st->solving || st->dirty) st->changed.Wait(&st->mu);
  }
  st->changed.SignalAll();
  st->mu.Unlock();
}

void AddRejected(State* st) {
  st->counters.set_rejected_requests_total(st->counters.rejected_requests_total() + 1);
}

// Marks live workers whose lease ran out by `now` as dead; returns how many. Requires st->mu.
int ExpireLapsed(State* st, int64_t now, const CoordinatorOptions& options) {
  std::vector<Worker*> lapsed;
  for (auto& [id, w] : st->workers) {
    if (IsLive(w->state) && now - w->last_heartbeat_ms > options.lease_ms) {
      lapsed.push_back(w.get());
    }
  }
  // Retired after the scan: retiring may prune records from the map being walked.
  for (Worker* w : lapsed) {
    if (w->state == v1::WORKER_STATE_ALIVE) st->dirty = true;
    w->assignment.set_reason("lease expired");
    if (options.log_events) {
      SHOAL_LOG(Info) << "expired: " << w->id << " (no heartbeat for "
                      << now - w->last_heartbeat_ms << " ms)";
    }
    Retire(st, w, v1::WORKER_STATE_DEAD);
  }
  const int n = static_cast<int>(lapsed.size());
  st->counters.set_expirations_total(st->counters.expirations_total() + n);
  return n;
}

// Begins the next job with `job` as its spec. Requires st->mu and no live worker: the workers
// of the job before stay in the status as they ended (left or dead). Its layout is retired:
// st->layout keeps its version (so the versions a client saw never repeat or go back) but places
// nobody, and this job's first layout gets the next version once job.expected_workers have
// joined. The job statistics start over; the counters go on.
void BeginJob(State* st, const v1::JobSpec& job, const CoordinatorOptions& options) {
  const bool had_job = st->have_job;
  const std::string previous = st->job.name();
  ++st->job_number;
  st->job = job;
  st->have_job = true;
  st->job_start_version = st->last_version;
  if (st->layout.version() > 0) {
    v1::Layout retired;
    retired.set_version(st->layout.version());
    retired.set_summary(absl::StrCat("layout v", st->layout.version(), " retired with job ",
                                     st->job_number - 1, " ('", previous, "'); job ",
                                     st->job_number, " ('", job.name(),
                                     "') waits for its first layout"));
    st->layout = std::move(retired);
  }
  // A worker that died still holds its place until the next solve; that layout is gone now.
  for (auto& [id, w] : st->workers) w->assignment.set_placed(false);
  st->layout_error.clear();
  st->last_solve = absl::OkStatus();
  st->job_step = 0;
  st->have_step = false;
  st->loss = 0;
  st->loss_sum = 0;
  st->loss_count = 0;
  st->tokens_sum = 0;
  st->history.clear();
  st->dirty = true;
  if (options.log_events) {
    SHOAL_LOG(Info) << "job " << st->job_number << " ('" << job.name() << "') begins"
                    << (had_job ? absl::StrCat(" after job ", st->job_number - 1, " ('",
                                               previous, "') ended")
                                : "")
                    << "; expects " << job.expected_workers() << " workers";
  }
}

}  // namespace

absl::StatusOr<v1::JoinResponse> CoordinatorCore::Join(const v1::JoinRequest& request) {
  State* st = state_;
  const absl::Status valid = ValidateJoin(request, options_.limits);
  v1::JoinResponse response;
  {
    absl::MutexLock lock(&st->mu);
    if (!valid.ok()) {
      AddRejected(st);
      return valid;
    }
    const int64_t now = clock_->NowUnixMs();
    const uint64_t running = request.running_layout_version();
    if (running > 0 && running <= st->job_start_version) {
      // It trains with a layout of a job that has ended: mixing it into this one would give the
      // solver a worker whose trainer follows another layout (or another model).
      AddRejected(st);
      return absl::FailedPreconditionError(absl::StrCat(
          "this worker still trains with layout v", running, ", of a job that has ended; job ",
          st->job_number, " ('", st->job.name(), "') began after layout v",
          st->job_start_version, ": stop this worker, or restart it to join the new job"));
    }
    std::vector<const Worker*> leased = LeasedWorkers(*st, now, options_.lease_ms);
    // No worker of the job is live: it is over, and a fresh start begins the next job (a
    // worker of this job coming back, running > 0, resumes it instead). Leases that ran out
    // are retired first, so the old job's workers show as dead, not alive.
    if (!st->have_job || (leased.empty() && running == 0)) {
      ExpireLapsed(st, now, options_);
      BeginJob(st, request.job(), options_);
    }
    const std::string diff = FirstDifference(st->job, request.job(), "job");
    if (!diff.empty()) {
      AddRejected(st);
      return absl::FailedPreconditionError(absl::StrCat(
          "the job spec differs from the coordinator's job ", st->job_number, " ('",
          st->job.name(), "'): ", diff,
          leased.empty()
              ? ""
              : absl::StrCat("; that job is still running on ", leased.size(), " live worker",
                             leased.size() == 1 ? "" : "s", " (", NameSome(leased),
                             "), and a new job begins only once every one of them has left or "
                             "its lease (",
                             options_.lease_ms, " ms) has run out")));
    }
    if (running == 0 && st->job.place_all() && JobLayoutVersion(*st) > 0 && !leased.empty()) {
      // A fixed world already laid out: its trainers keep their mesh until they restart, so a
      // fresh rank is a new run of the job (a restart after a crash, or the same job started
      // twice) while some of the old run still hold leases. It may join once they are gone;
      // solving it in beside them would hand both runs a layout neither can run.
      AddRejected(st);
      return absl::UnavailableError(absl::StrCat(
          "job ", st->job_number, " ('", st->job.name(), "') already runs layout v",
          st->layout.version(), " and ", leased.size(), " of its workers are live (",
          NameSome(leased), "); a new run of it can join once they have left or their leases (",
          options_.lease_ms, " ms) have run out"));
    }
    std::string id;
    if (!request.name().empty()) {
      id = request.name();
      auto it = st->workers.find(id);
      if (it != st->workers.end() && IsLive(it->second->state)) {
        AddRejected(st);
        return absl::AlreadyExistsError(absl::StrCat(
            "a live worker is already named ", id, " (host ", it->second->device.host(),
            "); pick another name or wait ", options_.lease_ms, " ms for its lease to expire"));
      }
    } else if (request.mesh_rank() >= 0) {
      // The launcher restarted this rank: the new process replaces the old one, live or not.
      id = absl::StrCat("rank", request.mesh_rank());
    } else {
      do {
        id = absl::StrCat("w", st->next_anonymous++);
      } while (st->workers.count(id) != 0);
    }
    auto it = st->workers.find(id);
    const bool replaced = it != st->workers.end();
    if (!replaced) {
      int live = 0;
      for (const auto& [wid, w] : st->workers) live += IsLive(w->state);
      if (live >= options_.limits.max_workers) {
        AddRejected(st);
        return absl::ResourceExhaustedError(
            absl::StrCat("the coordinator already has ", live, " live workers, its limit"));
      }
    }
    std::unique_ptr<Worker>& slot = st->workers[id];
    if (replaced) {
      if (!IsLive(slot->state)) --st->retired_count;
      st->tokens_sum -= slot->tokens_counted;
    }
    slot = std::make_unique<Worker>();
    Worker& w = *slot;
    w.id = id;
    w.mesh_rank = request.mesh_rank();
    w.device = request.device();
    w.joined_ms = now;
    w.last_heartbeat_ms = now;
    w.assignment.set_version(JobLayoutVersion(*st));
    w.assignment.set_worker_id(id);
    w.assignment.set_reason(JobLayoutVersion(*st) == 0
                                ? WaitingReason(*st)
                                : absl::StrCat("joined after layout v", st->layout.version(),
                                               " was solved; waiting for the next"));
    st->counters.set_joins_total(st->counters.joins_total() + 1);
    st->dirty = true;
    st->changed.SignalAll();
    if (options_.log_events) {
      SHOAL_LOG(Info) << "join: " << id << (replaced ? " (replaces an earlier one)" : "")
                      << ", host " << w.device.host() << ", " << w.device.device_name() << ", "
                      << w.device.fp32_gflops() << " GFLOP/s fp32; " << CountUsable(*st)
                      << " usable";
    }
    response.set_worker_id(id);
    response.set_lease_ms(options_.lease_ms);
    response.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  }
  RunSolves(st, options_, /*wait=*/false);
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> CoordinatorCore::Heartbeat(
    const v1::HeartbeatRequest& request) {
  State* st = state_;
  const absl::Status valid = ValidateHeartbeat(request, options_.limits);
  v1::HeartbeatResponse response;
  bool expired = false;
  {
    absl::MutexLock lock(&st->mu);
    if (!valid.ok()) {
      AddRejected(st);
      return valid;
    }
    auto it = st->workers.find(request.worker_id());
    if (it == st->workers.end()) {
      return absl::NotFoundError(
          absl::StrCat("no worker ", request.worker_id(), " has joined; join first"));
    }
    Worker* w = it->second.get();
    const int64_t now = clock_->NowUnixMs();
    if (IsLive(w->state) && now - w->last_heartbeat_ms > options_.lease_ms) {
      // The lease ran out before the periodic sweep noticed: the same verdict as the sweep.
      if (w->state == v1::WORKER_STATE_ALIVE) st->dirty = true;
      st->counters.set_expirations_total(st->counters.expirations_total() + 1);
      w->assignment.set_reason("lease expired");
      Retire(st, w, v1::WORKER_STATE_DEAD);
      if (options_.log_events) {
        SHOAL_LOG(Info) << "expired: " << w->id << " (heartbeat " << now - w->last_heartbeat_ms
                        << " ms after the last)";
      }
      expired = true;
    } else if (!IsLive(w->state)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker ", w->id,
          w->state == v1::WORKER_STATE_LEFT ? " has left" : "'s lease expired",
          "; join again"));
    } else {
      w->last_heartbeat_ms = now;
      st->counters.set_heartbeats_total(st->counters.heartbeats_total() + 1);
      if (request.has_stats()) {
        w->last_stats.CopyFrom(request.stats());
        if (w->placed) {
          UpdateJobStats(st, w, now, options_.history_points);
          if (request.stats().step_time_s() > 0 && w->predicted_compute_s > 0) {
            w->measured_step_s = request.stats().step_time_s();
            w->measured_predicted_s = w->predicted_compute_s;
            w->measured_factor = w->speed_factor;
          }
        }
      }
      response.set_lease_ms(options_.lease_ms);
      response.set_assignment_version(w->assignment.version());
      response.set_drain(w->state == v1::WORKER_STATE_DRAINING);
    }
  }
  if (expired) {
    RunSolves(st, options_, /*wait=*/false);
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", request.worker_id(), "'s lease expired; join again"));
  }
  return response;
}

absl::Status CoordinatorCore::Leave(const v1::LeaveRequest& request) {
  State* st = state_;
  const absl::Status valid = ValidateLeave(request, options_.limits);
  {
    absl::MutexLock lock(&st->mu);
    if (!valid.ok()) {
      AddRejected(st);
      return valid;
    }
    auto it = st->workers.find(request.worker_id());
    if (it == st->workers.end()) {
      return absl::NotFoundError(absl::StrCat("no worker ", request.worker_id(), " has joined"));
    }
    Worker* w = it->second.get();
    if (w->state == v1::WORKER_STATE_LEFT) return absl::OkStatus();
    st->counters.set_leaves_total(st->counters.leaves_total() + 1);
    if (w->state == v1::WORKER_STATE_ALIVE) st->dirty = true;
    w->assignment.set_placed(false);
    w->assignment.set_reason(
        request.reason().empty() ? "left" : absl::StrCat("left: ", request.reason()));
    if (IsLive(w->state)) {
      Retire(st, w, v1::WORKER_STATE_LEFT);
    } else {
      w->state = v1::WORKER_STATE_LEFT;  // said goodbye after its lease ran out
      st->changed.SignalAll();
    }
    if (options_.log_events) {
      SHOAL_LOG(Info) << "leave: " << w->id
                      << (request.reason().empty() ? "" : " (" + request.reason() + ")");
    }
  }
  RunSolves(st, options_, /*wait=*/false);
  return absl::OkStatus();
}

absl::StatusOr<v1::Layout> CoordinatorCore::Drain(const std::string& worker_id) {
  State* st = state_;
  const absl::Status valid = ValidateWorkerId(worker_id, "worker_id", options_.limits);
  {
    absl::MutexLock lock(&st->mu);
    if (!valid.ok()) {
      AddRejected(st);
      return valid;
    }
    auto it = st->workers.find(worker_id);
    if (it == st->workers.end()) {
      return absl::NotFoundError(absl::StrCat("no worker ", worker_id, " has joined"));
    }
    Worker* w = it->second.get();
    if (!IsLive(w->state)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker ", worker_id, w->state == v1::WORKER_STATE_LEFT ? " has left" : " is dead",
          "; nothing to drain"));
    }
    if (w->state == v1::WORKER_STATE_ALIVE) {
      w->state = v1::WORKER_STATE_DRAINING;
      w->assignment.set_drain(true);
      st->dirty = true;
      st->changed.SignalAll();
      if (options_.log_events) SHOAL_LOG(Info) << "drain: " << worker_id;
    }
  }
  RunSolves(st, options_, /*wait=*/true);
  absl::MutexLock lock(&st->mu);
  return st->layout;
}

absl::StatusOr<v1::Layout> CoordinatorCore::Rebalance() {
  State* st = state_;
  uint64_t solves_before;
  {
    absl::MutexLock lock(&st->mu);
    for (auto& [id, w] : st->workers) {
      if (w->state != v1::WORKER_STATE_ALIVE || w->measured_step_s <= 0) continue;
      // The prediction was made with measured_factor; the device ran at measured/predicted of
      // that speed, so this is the factor that would have predicted the measurement.
      const double f = w->measured_factor * w->measured_predicted_s / w->measured_step_s;
      w->speed_factor = std::clamp(f, 0.01, 100.0);
    }
    st->dirty = true;
    st->force = true;
    solves_before = st->solves_done;
  }
  RunSolves(st, options_, /*wait=*/true);
  absl::MutexLock lock(&st->mu);
  if (st->solves_done == solves_before) {
    return absl::FailedPreconditionError(WaitingReason(*st));
  }
  if (!st->last_solve.ok()) return st->last_solve;
  return st->layout;
}

v1::ClusterStatus CoordinatorCore::Status() const {
  State* st = state_;
  v1::ClusterStatus status;
  absl::MutexLock lock(&st->mu);
  const int64_t now = clock_->NowUnixMs();
  status.set_protocol_version(kProtocolVersion);
  status.set_coordinator_version(options_.version);
  status.set_now_unix_ms(now);
  status.set_started_unix_ms(st->started_ms);
  if (st->have_job) *status.mutable_job() = st->job;
  *status.mutable_layout() = st->layout;
  bool placed_down = false;
  int usable = 0;
  for (const auto& [id, w] : st->workers) {
    v1::WorkerStatus* ws = status.add_workers();
    ws->set_worker_id(id);
    ws->set_mesh_rank(w->mesh_rank);
    *ws->mutable_device() = w->device;
    ws->set_state(w->state);
    *ws->mutable_assignment() = w->assignment;
    *ws->mutable_last_stats() = w->last_stats;
    ws->set_joined_unix_ms(w->joined_ms);
    ws->set_last_heartbeat_unix_ms(w->last_heartbeat_ms);
    usable += w->state == v1::WORKER_STATE_ALIVE;
  }
  // A placed worker that is gone (its replacement not solved in yet) degrades the job.
  for (const v1::Placement& p : st->layout.placements()) {
    auto it = st->workers.find(p.worker_id());
    if (it == st->workers.end() || !IsLive(it->second->state)) placed_down = true;
  }
  // Between jobs the layout is the retired one: its version stays (versions never go back), so
  // the health is not "waiting", which means no layout ever, but "degraded" until this job's own.
  if (st->layout.version() == 0) {
    status.set_health("waiting");
  } else if (JobLayoutVersion(*st) == 0 || placed_down || usable < st->job.expected_workers()) {
    status.set_health("degraded");
  } else {
    status.set_health("healthy");
  }
  v1::JobStatus* js = status.mutable_job_status();
  js->set_step(st->job_step);
  js->set_loss(st->loss);
  js->set_tokens_per_s(st->tokens_sum);
  for (const v1::LossPoint& p : st->history) *js->add_history() = p;
  *status.mutable_counters() = st->counters;
  status.set_layout_error(st->layout_error);
  return status;
}

absl::StatusOr<v1::Assignment> CoordinatorCore::WaitAssignment(const std::string& worker_id,
                                                               uint64_t known_version,
                                                               absl::Duration timeout) {
  State* st = state_;
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&st->mu);
  while (true) {
    auto it = st->workers.find(worker_id);
    if (it == st->workers.end()) {
      return absl::NotFoundError(absl::StrCat("no worker ", worker_id, " has joined"));
    }
    const Worker& w = *it->second;
    if (!IsLive(w.state)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker ", worker_id, w.state == v1::WORKER_STATE_LEFT ? " has left" : "'s lease expired",
          "; join again"));
    }
    if (w.assignment.version() != known_version) return w.assignment;
    // The deadline check comes after the wait returns, so a timed-out wait still answers with
    // the assignment as it is (unchanged, or a flag changed without a new version).
    if (st->changed.WaitWithDeadline(&st->mu, deadline)) {
      auto again = st->workers.find(worker_id);
      if (again == st->workers.end()) {
        return absl::NotFoundError(absl::StrCat("no worker ", worker_id, " has joined"));
      }
      if (!IsLive(again->second->state)) continue;
      return again->second->assignment;
    }
  }
}

int CoordinatorCore::ExpireLeases() {
  State* st = state_;
  int expired = 0;
  {
    absl::MutexLock lock(&st->mu);
    expired = ExpireLapsed(st, clock_->NowUnixMs(), options_);
  }
  if (expired > 0) RunSolves(st, options_, /*wait=*/false);
  return expired;
}

void CoordinatorCore::CountRejected() {
  absl::MutexLock lock(&state_->mu);
  AddRejected(state_);
}

}  // namespace shoal::scheduler
