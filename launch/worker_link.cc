#include "launch/worker_link.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "comm/coordinator_client.h"
#include "common/auth_token.h"
#include "common/logging.h"
#include "common/process_memory.h"
#include "common/status.h"
#include "runtime/profiler.h"

namespace shoal::launch {
namespace {

// Leave is a courtesy on the way out: the lease would expire anyway, so never hold an exit long.
constexpr absl::Duration kLeaveDeadline = absl::Seconds(2);
// A warning about an unreachable coordinator at most this often (heartbeats come every ~2 s).
constexpr absl::Duration kWarnEvery = absl::Minutes(1);

absl::Status Named(const std::string& coordinator, const absl::Status& s,
                   const std::string& hint = "") {
  return absl::Status(s.code(), absl::StrCat("coordinator ", coordinator, ": ", s.message(),
                                             hint.empty() ? "" : " (", hint,
                                             hint.empty() ? "" : ")"));
}

std::string HintFor(absl::StatusCode code) {
  if (code == absl::StatusCode::kUnauthenticated || code == absl::StatusCode::kPermissionDenied) {
    return "check --coordinator-token-file: it must hold the coordinator's token";
  }
  return "";
}

std::string JobName(const std::string& source) {
  // The config file's stem: every rank names the job the same, whatever folder it ran from.
  std::string name = source.substr(source.find_last_of('/') + 1);
  const size_t dot = name.rfind('.');
  if (dot != std::string::npos && dot > 0) name = name.substr(0, dot);
  if (name.empty()) name = "shoal";
  return name.substr(0, 128);
}

std::string Describe(const v1::Assignment& a) {
  return absl::StrFormat(
      "layout v%d: tp %d x pp %d x dp %d; this rank: replica %d, stage %d, tp rank %d, "
      "blocks [%d, %d), "
      "micro-batch %d x %d, predicted step %.3f s",
      a.version(), a.tp(), a.pp(), a.dp(), a.replica(), a.stage(), a.tp_rank(), a.first_layer(),
      a.end_layer(),
      a.micro_batch_size(), a.micro_batches(), a.predicted_step_s());
}

}  // namespace

v1::JobSpec JobSpecFor(const runtime::Config& config, int world_size) {
  v1::JobSpec job;
  job.set_name(JobName(config.source));
  v1::ModelSpec* m = job.mutable_model();
  m->set_n_layer(config.model.n_layer);
  m->set_n_head(config.model.n_head);
  m->set_n_embd(config.model.n_embd);
  m->set_block_size(config.model.block_size);
  m->set_vocab_size(config.model.vocab_size);
  // fp32 AdamW: weights 4, gradients 4, two moments 8 bytes per parameter.
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job.set_global_batch(config.train.batch_size * config.train.grad_accum * world_size);
  job.set_expected_workers(world_size);
  // The launcher started world_size ranks and each runs a share of the mesh: none may be left out.
  job.set_place_all(true);
  // parallel.tp and parallel.pp bound what the solver may choose (1 and 1: data parallelism).
  job.set_max_tp(config.parallel.tp);
  job.set_max_pp(config.parallel.pp);
  job.set_max_micro_batch(config.train.batch_size);
  return job;
}

parallel::Layout LayoutOf(const v1::Assignment& a) {
  parallel::Layout l;
  l.shape = {a.tp(), a.pp(), a.dp()};
  l.coord = {a.tp_rank(), a.stage(), a.replica()};
  l.first_block = a.first_layer();
  l.end_block = a.end_layer();
  l.micro_batch_size = a.micro_batch_size();
  l.micro_batches = a.micro_batches();
  return l;
}

absl::Status CheckAssignment(const v1::Assignment& a, int world_size, int n_layer) {
  if (!a.placed()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the coordinator's layout v", a.version(), " leaves this worker out: ",
        a.reason().empty() ? "no reason given" : a.reason()));
  }
  // The layout's own check (parallel/layout.h); the trainer checks it across the job too.
  const absl::Status s = LayoutOf(a).Validate(world_size, n_layer);
  if (!s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the coordinator's layout v", a.version(), " (", Describe(a), ") cannot run on this job's ",
        world_size, " ranks: ", s.message()));
  }
  return absl::OkStatus();
}

struct WorkerLink::Impl {
  WorkerLinkOptions options;
  comm::CoordinatorClientOptions client_options;
  std::unique_ptr<comm::CoordinatorClient> client;       // join, status
  std::unique_ptr<comm::CoordinatorClient> beat_client;  // heartbeats: deadline ~ the interval
  std::string worker_id;
  v1::JoinRequest join;  // as accepted (with worker_id as its name), to join again
  v1::Assignment assignment;
  v1::DeviceProfile profile;
  absl::Duration interval = absl::Seconds(2);
  std::atomic<bool>* stop = nullptr;
  std::atomic<bool> drained{false};
  // The accepted layout's version, for the heartbeat thread (0 while waiting for the first).
  std::atomic<uint64_t> running_version{0};
  bool closed = false;
  std::thread thread;

  absl::Mutex mu;
  bool closing ABSL_GUARDED_BY(mu) = false;
  v1::StepStats latest ABSL_GUARDED_BY(mu);
  bool have_stats ABSL_GUARDED_BY(mu) = false;

  // Heartbeat thread only.
  absl::Time last_warning = absl::InfinitePast();
  uint64_t newest_version_seen = 0;
  int64_t last_sent_step = -1;  // read by Close() after the thread has ended

  void HeartbeatLoop();
  void Warn(const std::string& what);
};

void WorkerLink::Impl::Warn(const std::string& what) {
  const absl::Time now = absl::Now();
  if (now - last_warning < kWarnEvery) return;
  last_warning = now;
  SHOAL_LOG(Warning) << "coordinator " << options.coordinator << ": " << what
                     << "; training goes on (warned at most once a minute)";
}

void WorkerLink::Impl::HeartbeatLoop() {
  while (true) {
    v1::HeartbeatRequest request;
    {
      absl::MutexLock lock(&mu);
      mu.AwaitWithTimeout(absl::Condition(&closing), interval);
      if (closing) return;
      // No stats before the first step: the heartbeat then only renews the lease, and the
      // coordinator's loss history does not start with a made-up point.
      if (have_stats) *request.mutable_stats() = latest;
    }
    request.set_worker_id(worker_id);
    if (request.has_stats()) {
      request.mutable_stats()->mutable_memory_used()->set_host_bytes(ResidentBytes());
    }
    absl::StatusOr<v1::HeartbeatResponse> r = beat_client->Heartbeat(request);
    if (!r.ok()) {
      // The coordinator restarted (it does not know this worker) or declared it dead (a long
      // stall): join again under the same name, so the job shows up again without a restart.
      const absl::StatusCode code = r.status().code();
      if (code == absl::StatusCode::kNotFound || code == absl::StatusCode::kFailedPrecondition) {
        // It says which layout it trains with, so that a coordinator now running another job
        // refuses it rather than mixing it in.
        v1::JoinRequest rejoin = join;
        rejoin.set_running_layout_version(running_version.load());
        absl::StatusOr<v1::JoinResponse> again = beat_client->Join(rejoin);
        if (again.ok()) {
          SHOAL_LOG(Warning) << "coordinator " << options.coordinator << " no longer knew "
                             << worker_id << " (" << r.status().message() << "); joined again";
          continue;
        }
        Warn(absl::StrCat("heartbeat refused (", r.status().message(),
                          ") and joining again failed: ", again.status().message()));
        continue;
      }
      Warn(absl::StrCat("heartbeat failed: ", r.status().message()));
      continue;
    }
    if (request.has_stats()) last_sent_step = request.stats().step();
    if (r->drain() && !drained.exchange(true)) {
      SHOAL_LOG(Warning) << "coordinator " << options.coordinator << " drains worker " << worker_id
                         << ": checkpointing and stopping at the next step";
      if (stop != nullptr) stop->store(true);
    }
    const uint64_t running = running_version.load();
    if (running > 0 && r->assignment_version() > running &&
        r->assignment_version() > newest_version_seen) {
      newest_version_seen = r->assignment_version();
      SHOAL_LOG(Info) << "coordinator " << options.coordinator << " has a new layout (v"
                      << newest_version_seen << "); this trainer keeps layout v" << running
                      << " until it restarts";
    }
  }
}

WorkerLink::WorkerLink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

WorkerLink::~WorkerLink() { Close("worker exiting"); }

absl::StatusOr<std::unique_ptr<WorkerLink>> WorkerLink::Start(const WorkerLinkOptions& options,
                                                              const runtime::Config& config,
                                                              const DistributedEnv& env,
                                                              comm::Backend* group,
                                                              std::atomic<bool>* stop) {
  const std::string& where = options.coordinator;
  if (where.empty() || where.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--coordinator must be HOST:PORT, got '", where, "'"));
  }
  SHOAL_RETURN_IF_ERROR(runtime::Throttle::CheckFactor(options.throttle, "--throttle"));
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("--coordinator-timeout must be > 0, got ",
                                                   absl::FormatDuration(options.timeout)));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->stop = stop;
  const absl::Time deadline = absl::Now() + options.timeout;

  comm::CoordinatorClientOptions& co = impl->client_options;
  co.address = where;
  co.tls_ca_file = options.tls_ca_file;
  co.timeout = std::min(absl::Seconds(10), options.timeout);
  if (!options.token_file.empty()) {
    SHOAL_ASSIGN_OR_RETURN(co.token, ReadTokenFile(options.token_file));
  }
  {
    auto client = comm::CoordinatorClient::Connect(co);
    if (!client.ok()) return Named(where, client.status());
    impl->client = std::move(*client);
  }

  // 1. The first contact, before anything slow: the round trip. A coordinator that is not up yet
  // (or restarting) gets until the deadline; a refusal (wrong token, TLS mismatch) ends it at
  // once.
  double rtt_ms = 0;
  bool waiting_logged = false;
  while (true) {
    absl::StatusOr<double> rtt = impl->client->MeasureRttMs(5);
    if (rtt.ok()) {
      rtt_ms = *rtt;
      break;
    }
    const absl::StatusCode code = rtt.status().code();
    const bool transient =
        code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded;
    if (!transient) return Named(where, rtt.status(), HintFor(code));
    if (absl::Now() + absl::Milliseconds(500) >= deadline) {
      return absl::UnavailableError(absl::StrCat(
          "coordinator ", where, " unreachable for ", absl::FormatDuration(options.timeout),
          " (--coordinator-timeout): ", rtt.status().message()));
    }
    if (!waiting_logged) {
      SHOAL_LOG(Info) << "waiting for coordinator " << where << " (" << rtt.status().message()
                      << ")";
      waiting_logged = true;
    }
    absl::SleepFor(absl::Milliseconds(500));
  }

  // 2. The device profile. Ranks sharing a host take turns: the first rank of each host measures
  // with the whole machine to itself, the others then read its cache (same host, CPU, cores and
  // throttle), instead of all measuring at once and each seeing a fraction of the machine.
  runtime::ProfileOptions po;
  po.throttle = options.throttle;
  po.disk_path = options.disk_path;
  absl::StatusOr<v1::DeviceProfile> profile = absl::UnknownError("not profiled");
  const bool first_on_host = env.local_rank == 0;
  if (first_on_host) profile = runtime::ProfileDevice(po);
  if (group != nullptr && group->size() > 1) {
    SHOAL_RETURN_IF_ERROR(
        group->Barrier({absl::Seconds(config.parallel.timeout_s)})->Wait());
  }
  if (!first_on_host) profile = runtime::ProfileDevice(po);
  if (!profile.ok()) return profile.status();
  impl->profile = std::move(*profile);
  // The configured budgets bound what the solver may plan on this worker.
  auto cap = [](const runtime::ByteSize& budget, int64_t measured) {
    return budget.set() ? std::min(measured, budget.bytes) : measured;
  };
  v1::MemoryTiers* tiers = impl->profile.mutable_memory();
  int64_t host = cap(config.memory.host_budget, tiers->host_bytes());
  if (!config.memory.disk_path.empty() && config.memory.host_budget.set()) {
    // With a disk tier, memory.host_budget is the trainer's budget for model states (the rest is
    // paged to disk), not for the activations beside them, which the solver also places in RAM:
    // add memory.activation_budget when set, else leave the RAM measured.
    const int64_t activations = config.memory.activation_budget.set()
                                    ? config.memory.activation_budget.bytes
                                    : tiers->host_bytes();
    host = std::min(tiers->host_bytes(), host + activations);
  }
  const int64_t disk = cap(config.memory.disk_budget, tiers->disk_bytes());
  const int64_t gpu = cap(config.memory.device_budget, tiers->gpu_bytes());
  tiers->set_gpu_bytes(gpu);
  tiers->set_host_bytes(host);
  tiers->set_disk_bytes(disk);
  impl->profile.set_rtt_ms(rtt_ms);

  // 3. Upload bandwidth (after the profile, so it does not disturb the measurements).
  if (absl::StatusOr<double> gbps = impl->client->MeasureUploadGbps(); gbps.ok()) {
    impl->profile.set_net_gbps(*gbps);
  } else {
    SHOAL_LOG(Warning) << "coordinator " << where
                       << ": bandwidth not measured: " << gbps.status().message();
  }

  // 4. Join. The stable name "rank<N>" reads well in `shoal status`; if a previous incarnation
  // of this rank still holds it (crashed, lease not yet expired), a unique name instead.
  v1::JoinRequest join;
  join.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
  *join.mutable_device() = impl->profile;
  *join.mutable_job() = JobSpecFor(config, env.world_size);
  join.set_mesh_rank(env.rank);
  auto join_once = [&]() {
    join.set_name(absl::StrCat("rank", env.rank));
    absl::StatusOr<v1::JoinResponse> r = impl->client->Join(join);
    if (!r.ok() && r.status().code() == absl::StatusCode::kAlreadyExists) {
      join.set_name(absl::StrCat("rank", env.rank, "-", impl->profile.host(), "-", ::getpid()));
      r = impl->client->Join(join);
    }
    return r;
  };
  absl::StatusOr<v1::JoinResponse> joined = join_once();
  // kUnavailable: the coordinator is unreachable for a moment, or an earlier run of this job
  // still holds it (a rank that crashed keeps its lease for a while): it says which, and the
  // join is retried until the deadline.
  bool busy_logged = false;
  while (!joined.ok() && joined.status().code() == absl::StatusCode::kUnavailable &&
         absl::Now() + absl::Seconds(1) < deadline) {
    if (!busy_logged) {
      SHOAL_LOG(Info) << "coordinator " << where << ": " << joined.status().message()
                      << "; joining again until --coordinator-timeout";
      busy_logged = true;
    }
    absl::SleepFor(absl::Seconds(1));
    joined = join_once();
  }
  if (!joined.ok()) return Named(where, joined.status(), HintFor(joined.status().code()));
  impl->worker_id = joined->worker_id();
  join.set_name(impl->worker_id);
  impl->join = join;
  if (joined->heartbeat_interval_ms() > 0) {
    impl->interval = absl::Milliseconds(joined->heartbeat_interval_ms());
  }
  SHOAL_LOG(Info) << "coordinator " << where << ": joined as " << impl->worker_id << " (rank "
                  << env.rank << ", " << impl->profile.device_name() << ", "
                  << absl::StrFormat("%.1f GFLOP/s fp32, rtt %.2f ms, %.2f GB/s",
                                     impl->profile.fp32_gflops(), impl->profile.rtt_ms(),
                                     impl->profile.net_gbps())
                  << "; lease " << joined->lease_ms() << " ms)";

  // The link exists from here on: an error below still leaves (through the destructor).
  std::unique_ptr<WorkerLink> link(new WorkerLink(std::move(impl)));
  Impl& im = *link->impl_;
  comm::CoordinatorClientOptions bo = im.client_options;
  bo.timeout = std::clamp(im.interval, absl::Seconds(1), absl::Seconds(5));
  {
    auto beat = comm::CoordinatorClient::Connect(bo);
    if (!beat.ok()) return Named(where, beat.status());
    im.beat_client = std::move(*beat);
  }
  // Heartbeats start before the wait: the first layout waits for every rank to join, and the
  // lease must not run out meanwhile.
  im.thread = std::thread([&im] { im.HeartbeatLoop(); });

  // 5. The first layout, and whether this trainer can run its part.
  // In slices, so that a solve that failed (a model no arrangement of these workers holds) is
  // reported at once with the coordinator's reason instead of as a timeout.
  absl::StatusOr<v1::Assignment> a = absl::DeadlineExceededError("no layout yet");
  while (true) {
    const absl::Duration left = deadline - absl::Now();
    a = im.client->WaitForAssignment(im.worker_id, 1,
                                     std::clamp(left, absl::Seconds(1), absl::Seconds(2)));
    if (a.ok() || a.status().code() != absl::StatusCode::kDeadlineExceeded) break;
    absl::StatusOr<v1::ClusterStatus> cluster = im.client->GetStatus();
    if (cluster.ok() && !cluster->layout_error().empty() && cluster->layout().version() == 0) {
      return Named(where, absl::FailedPreconditionError(absl::StrCat(
                              "the coordinator cannot lay this job out on its ",
                              cluster->workers_size(), " workers: ", cluster->layout_error())));
    }
    if (left <= absl::Seconds(2)) break;
  }
  if (!a.ok()) {
    return Named(where, a.status(),
                 absl::StrCat("waiting for the first layout, which needs all ", env.world_size,
                              " ranks joined"));
  }
  SHOAL_RETURN_IF_ERROR(CheckAssignment(*a, env.world_size, config.model.n_layer));
  im.assignment = *a;
  im.running_version.store(a->version());
  SHOAL_LOG(Info) << "coordinator " << where << ": " << im.worker_id << " " << Describe(*a);
  if (env.rank == 0) {
    if (auto status = im.client->GetStatus(); status.ok() && !status->layout().summary().empty()) {
      SHOAL_LOG(Info) << "coordinator " << where << ": " << status->layout().summary();
    }
  }
  return link;
}

void WorkerLink::OnStep(const runtime::StepReport& report) {
  absl::MutexLock lock(&impl_->mu);
  v1::StepStats& s = impl_->latest;
  s.set_step(report.step);
  s.set_loss(report.loss);
  s.set_lr(report.lr);
  s.set_tokens_per_s(report.tokens_per_s);
  s.set_step_time_s(report.step_seconds);
  s.mutable_memory_used()->set_disk_bytes(report.disk_bytes);
  if (report.predicted_step_seconds > 0) {
    // The chunk manager's own plan: the paged states (the rest of the budget's worth in RAM, the
    // rest on disk), its predicted peak and its budget.
    s.set_predicted_step_s(report.predicted_step_seconds);
    v1::MemoryPlan* plan = s.mutable_memory_plan();
    plan->clear_states();
    v1::StatePlacement* states = plan->add_states();
    states->set_state("paged_states");
    states->mutable_bytes()->set_disk_bytes(report.disk_bytes);
    states->mutable_bytes()->set_host_bytes(std::max<int64_t>(0, report.state_bytes - report.disk_bytes));
    plan->mutable_peak()->set_host_bytes(report.predicted_peak_host_bytes);
    plan->mutable_peak()->set_disk_bytes(report.state_bytes);
    plan->mutable_budget()->set_host_bytes(report.host_budget_bytes);
  }
  impl_->have_stats = true;
}

void WorkerLink::Close(const std::string& reason) {
  Impl& im = *impl_;
  if (im.closed) return;
  im.closed = true;
  {
    absl::MutexLock lock(&im.mu);
    im.closing = true;
  }
  if (im.thread.joinable()) im.thread.join();
  comm::CoordinatorClientOptions lo = im.client_options;
  lo.timeout = kLeaveDeadline;
  auto client = comm::CoordinatorClient::Connect(lo);
  // The steps since the last heartbeat (the final one, at least) go out first, so the
  // coordinator's last word on this worker is where it really stopped.
  v1::HeartbeatRequest last;
  {
    absl::MutexLock lock(&im.mu);
    if (im.have_stats) *last.mutable_stats() = im.latest;
  }
  if (client.ok() && last.has_stats() && last.stats().step() > im.last_sent_step) {
    last.set_worker_id(im.worker_id);
    last.mutable_stats()->mutable_memory_used()->set_host_bytes(ResidentBytes());
    (void)(*client)->Heartbeat(last);  // best effort, like the Leave below
  }
  absl::Status s = client.ok() ? (*client)->Leave(im.worker_id, reason) : client.status();
  if (s.ok()) {
    SHOAL_LOG(Info) << "coordinator " << im.options.coordinator << ": " << im.worker_id
                    << " left (" << reason << ")";
  } else {
    SHOAL_LOG(Warning) << "coordinator " << im.options.coordinator << ": leave failed ("
                       << s.message() << "); its lease will expire instead";
  }
}

const std::string& WorkerLink::worker_id() const { return impl_->worker_id; }
const v1::Assignment& WorkerLink::assignment() const { return impl_->assignment; }

parallel::Layout WorkerLink::layout() const { return LayoutOf(impl_->assignment); }
const v1::DeviceProfile& WorkerLink::profile() const { return impl_->profile; }
bool WorkerLink::drained() const { return impl_->drained.load(); }

}  // namespace shoal::launch
