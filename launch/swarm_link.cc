#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "launch/exit_code.h"
#include "launch/swarm_worker.h"

namespace shoal::launch {

struct SwarmLink::Impl {
  comm::CoordinatorClient* client = nullptr;
  std::string id;
  int64_t heartbeat_ms = 2000;

  mutable absl::Mutex mu;
  v1::SwarmRoster roster ABSL_GUARDED_BY(mu);
  bool have_roster ABSL_GUARDED_BY(mu) = false;
  absl::Status lost ABSL_GUARDED_BY(mu);  // not OK: the coordinator no longer knows us
  bool stopping ABSL_GUARDED_BY(mu) = false;
  bool closed ABSL_GUARDED_BY(mu) = false;
  bool drain ABSL_GUARDED_BY(mu) = false;
  v1::StepStats stats ABSL_GUARDED_BY(mu);
  std::thread watcher, heartbeats;

  bool Stopping() {
    absl::MutexLock lock(&mu);
    return stopping;
  }

  void Lose(const absl::Status& s) {
    absl::MutexLock lock(&mu);
    if (lost.ok()) lost = s;
  }

  void Watch() {
    uint64_t known = 0;
    while (!Stopping()) {
      absl::Status s = client->WatchRoster(
          id, known,
          [&](const v1::SwarmRoster& r) {
            absl::MutexLock lock(&mu);
            roster = r;
            have_roster = true;
            known = r.version();
            return !stopping;
          },
          absl::Seconds(1));
      if (s.ok() || absl::IsDeadlineExceeded(s)) continue;
      if (absl::IsFailedPrecondition(s) || absl::IsNotFound(s)) {
        Lose(s);
        return;
      }
      // The coordinator is unreachable for now: try again shortly.
      absl::MutexLock lock(&mu);
      mu.AwaitWithTimeout(absl::Condition(&stopping), absl::Milliseconds(200));
    }
  }

  void Beat() {
    int64_t failures = 0;
    while (true) {
      v1::HeartbeatRequest request;
      {
        absl::MutexLock lock(&mu);
        mu.AwaitWithTimeout(absl::Condition(&stopping), absl::Milliseconds(heartbeat_ms));
        if (stopping) return;
        request.set_worker_id(id);
        *request.mutable_stats() = stats;
      }
      absl::StatusOr<v1::HeartbeatResponse> r = client->Heartbeat(request);
      if (r.ok()) {
        failures = 0;
        absl::MutexLock lock(&mu);
        if (r->drain()) drain = true;
        continue;
      }
      if (absl::IsFailedPrecondition(r.status()) || absl::IsNotFound(r.status())) {
        Lose(r.status());
        return;
      }
      if (failures++ % 30 == 0) {
        SHOAL_LOG(Warning) << "swarm: heartbeat failed (training goes on): " << r.status();
      }
    }
  }
};

absl::StatusOr<std::unique_ptr<SwarmLink>> SwarmLink::Join(const SwarmWorkerOptions& options,
                                                           const v1::JoinRequest& request) {
  comm::CoordinatorClientOptions co;
  co.address = options.coordinator;
  co.token = options.token;
  co.tls_ca_file = options.tls_ca_file;
  co.timeout = options.call_timeout;
  auto client = comm::CoordinatorClient::Connect(co);
  if (!client.ok()) return client.status();
  std::unique_ptr<SwarmLink> link(new SwarmLink());
  link->client_ = std::move(*client);
  const absl::Time deadline = absl::Now() + options.join_timeout;
  // The link to the coordinator, measured once it answers, whatever the role: its speed goes in
  // the join (and a peer's profile); the coordinator picks a job's stage rounds from its first
  // worker's (swarm.sync = auto) and the rebalancer's transfer times from a peer's.
  v1::JoinRequest measured = request;
  bool link_measured = false;
  while (true) {
    absl::Status probe;
    if (!link_measured) {
      absl::StatusOr<double> rtt = link->client_->MeasureRttMs(3);
      absl::StatusOr<double> gbps =
          rtt.ok() ? link->client_->MeasureUploadGbps(int64_t{1} << 20, 3) : rtt.status();
      if (gbps.ok()) {
        measured.set_link_gbps(*gbps);
        if (measured.has_device()) {
          measured.mutable_device()->set_rtt_ms(*rtt);
          measured.mutable_device()->set_net_gbps(*gbps);
        }
        link_measured = true;
      } else {
        probe = gbps.status();
      }
    }
    absl::StatusOr<v1::JoinResponse> joined =
        link_measured ? link->client_->Join(measured) : absl::StatusOr<v1::JoinResponse>(probe);
    if (joined.ok()) {
      link->joined_ = *std::move(joined);
      break;
    }
    const bool retry = absl::IsUnavailable(joined.status()) ||
                       absl::IsDeadlineExceeded(joined.status());
    if (!retry || absl::Now() > deadline) return joined.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  if (!link->joined_.has_swarm() || link->joined_.swarm().stages() < 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the coordinator at ", options.coordinator, " answered the join without a swarm job"));
  }
  link->impl_ = std::make_unique<Impl>();
  Impl* impl = link->impl_.get();
  impl->client = link->client_.get();
  impl->id = link->joined_.worker_id();
  impl->heartbeat_ms = std::max<int64_t>(50, link->joined_.heartbeat_interval_ms());
  impl->watcher = std::thread([impl] { impl->Watch(); });
  impl->heartbeats = std::thread([impl] { impl->Beat(); });
  return link;
}

SwarmLink::~SwarmLink() { Close("exiting"); }

absl::StatusOr<v1::SwarmRoster> SwarmLink::Await(
    const std::function<bool(const v1::SwarmRoster&)>& done, absl::Duration timeout,
    const std::atomic<bool>* stop) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&impl_->mu);
  uint64_t checked = 0;
  bool any = false;
  while (true) {
    if (!impl_->lost.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the coordinator no longer counts this worker (", impl_->lost.message(), ")"));
    }
    if (impl_->have_roster && (!any || impl_->roster.version() != checked)) {
      any = true;
      checked = impl_->roster.version();
      if (done(impl_->roster)) return impl_->roster;
    }
    if (stop != nullptr && stop->load()) return absl::CancelledError("stopping");
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError("no roster with what this worker waits for");
    }
    // Wakes on a new roster, a lost link, `stop` (seen when the mutex is released, as Wake
    // does), or every 100 ms to look at `stop`.
    Impl* impl = impl_.get();
    auto changed = [impl, checked, stop]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return !impl->lost.ok() || (impl->have_roster && impl->roster.version() != checked) ||
             (stop != nullptr && stop->load());
    };
    impl_->mu.AwaitWithDeadline(absl::Condition(&changed),
        std::min(deadline, absl::Now() + absl::Milliseconds(100)));
  }
}

void SwarmLink::Wake() {
  // absl::Mutex evaluates its waiters' conditions when it is released.
  absl::MutexLock lock(&impl_->mu);
}

v1::SwarmRoster SwarmLink::latest() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->roster;
}

void SwarmLink::SetStats(const v1::StepStats& stats) {
  absl::MutexLock lock(&impl_->mu);
  impl_->stats = stats;
}

bool SwarmLink::drain_requested() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->drain;
}

void SwarmLink::Close(const std::string& reason) {
  if (impl_ == nullptr) return;
  {
    absl::MutexLock lock(&impl_->mu);
    if (impl_->closed) return;
    impl_->closed = true;
    impl_->stopping = true;
  }
  if (impl_->heartbeats.joinable()) impl_->heartbeats.join();
  if (impl_->watcher.joinable()) impl_->watcher.join();
  bool lost = false;
  {
    absl::MutexLock lock(&impl_->mu);
    lost = !impl_->lost.ok();
  }
  if (!lost) {
    if (absl::Status s = client_->Leave(id(), reason); !s.ok()) {
      SHOAL_LOG(Warning) << "swarm: leaving: " << s;
    }
  }
}

int WorkerFail(const absl::Status& status) {
  std::fprintf(stderr, "shoal worker: error: %s\n", std::string(status.message()).c_str());
  // A join refused for a name in use or for memory that fits no stage is the user's to fix too.
  if (absl::IsAlreadyExists(status) || absl::IsResourceExhausted(status)) return 2;
  return ExitCodeFor(status);
}

double SwarmPeakGflops(const v1::SwarmRoster& roster) {
  std::map<std::string, double> host_peak;
  for (const v1::SwarmStageEntry& st : roster.stages()) {
    for (const v1::SwarmPeerEntry& p : st.peers()) {
      if (p.state() != "SERVING" && p.state() != "DRAINING") continue;
      if (!std::isfinite(p.peak_gflops()) || p.peak_gflops() <= 0) continue;
      // A peer without a host is a host of its own (ids and host names cannot collide: "\n").
      const std::string host = p.host().empty() ? "\n" + p.id() : p.host();
      double& peak = host_peak[host];
      peak = std::max(peak, p.peak_gflops());
    }
  }
  double sum = 0;
  for (const auto& [host, peak] : host_peak) sum += peak;
  return sum;
}

}  // namespace shoal::launch
