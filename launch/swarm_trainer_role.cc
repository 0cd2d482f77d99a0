// `shoal worker --join --trainer`: a swarm trainer (swarm_worker.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/swarm_client.h"
#include "common/file_util.h"
#include "common/gpt_arithmetic.h"
#include "common/logging.h"
#include "common/sha256.h"
#include "common/status.h"
#include "launch/swarm_worker.h"
#include "parallel/swarm_router.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/metrics.h"
#include "runtime/sampler.h"
#include "runtime/swarm_sync.h"
#include "runtime/token_file.h"

namespace shoal::launch {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

v1::TensorCodec CodecOf(const std::string& name) {
  if (name == "bf16") return v1::TENSOR_CODEC_BF16;
  if (name == "int8") return v1::TENSOR_CODEC_INT8_BLOCKWISE;
  return v1::TENSOR_CODEC_FP32;
}

class Trainer {
 public:
  Trainer(const SwarmWorkerOptions& options, std::atomic<bool>* stop)
      : options_(options), stop_(stop) {}

  int Run() {
    absl::Status s = RunOrError();
    StopWorkers();  // after an early error (the normal end has stopped them already)
    if (link_ != nullptr) link_->Close(s.ok() ? "done" : std::string(s.message()));
    if (s.ok()) return 0;
    return WorkerFail(s);
  }

 private:
  // A leased micro-batch for the threads (StartWorkers).
  struct Job {
    int64_t step = 0;
    int64_t rollbacks = 0;  // the lease's epoch
    v1::SwarmLeaseEntry lease;
  };

  absl::Status RunOrError() {
    // The data first: a trainer without it must not join.
    std::string probe_dir = options_.data_dir;
    std::string sha;
    if (!probe_dir.empty()) {
      SHOAL_ASSIGN_OR_RETURN(sha, Sha256File(probe_dir + "/train.bin"));
    }
    v1::JoinRequest join;
    join.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    join.set_role(v1::WORKER_ROLE_TRAINER);
    join.set_name(options_.name);
    join.set_train_sha256(sha);
    SHOAL_ASSIGN_OR_RETURN(link_, SwarmLink::Join(options_, join));
    const v1::SwarmJobInfo& job = link_->job();
    SHOAL_ASSIGN_OR_RETURN(config_, runtime::ParseConfig(job.config_toml(), "the swarm's config"));
    stages_ = job.stages();
    micro_batches_ = job.micro_batches();
    flops_per_token_ = GptFlopsPerToken(runtime::ShapeOf(config_.model));
    total_steps_ = job.total_steps();
    const std::string dir = options_.data_dir.empty() ? config_.data.dir : options_.data_dir;
    if (sha.empty() && !job.train_sha256().empty()) {
      SHOAL_ASSIGN_OR_RETURN(sha, Sha256File(dir + "/train.bin"));
      if (sha != job.train_sha256()) {
        return absl::FailedPreconditionError(absl::StrCat(
            dir, "/train.bin (sha256 ", sha, ") is not the job's (", job.train_sha256(),
            "): every trainer must read the same tokens (--data)"));
      }
    }
    SHOAL_ASSIGN_OR_RETURN(data_, runtime::OpenTokenDataset(dir, config_.model.vocab_size,
                                                            config_.model.block_size,
                                                            config_.data.verify_checksums));
    runtime::BatchSpec spec;
    spec.batch_size = config_.train.batch_size;
    spec.block_size = config_.model.block_size;
    spec.grad_accum = micro_batches_;
    sampler_ = std::make_unique<runtime::BatchSampler>(*data_.train, config_.train.seed, spec);
    comm::StageClientOptions co;
    co.token = options_.token;
    co.tls_ca_file = options_.tls_ca_file;
    co.codec = CodecOf(job.codec());
    SHOAL_ASSIGN_OR_RETURN(client_, comm::StageClient::Create(co));
    for (int s = 0; s < stages_; ++s) {
      parallel::StageRouterOptions ro;
      ro.stage = absl::StrCat("stage ", s);
      ro.seed = static_cast<uint64_t>(s) * 7919 + std::hash<std::string>()(link_->id());
      SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<parallel::StageRouter> r,
                             parallel::StageRouter::Create(ro));
      routers_.push_back(std::move(r));
    }
    out_dir_ = options_.out_dir.empty() ? config_.train.out_dir : options_.out_dir;
    SHOAL_RETURN_IF_ERROR(MakeDirs(out_dir_));
    SHOAL_ASSIGN_OR_RETURN(runtime::MetricsFile metrics,
                           runtime::MetricsFile::Open(out_dir_ + "/metrics.jsonl"));
    metrics_ = std::make_unique<runtime::MetricsFile>(std::move(metrics));
    SHOAL_LOG(Info) << "swarm trainer " << link_->id() << ": " << stages_ << " stages, M = "
                    << micro_batches_ << ", " << total_steps_ << " steps, data " << dir;
    started_ = Now();

    StartWorkers();
    while (!stop_->load()) {
      absl::StatusOr<v1::SwarmRoster> r = link_->Await(
          [](const v1::SwarmRoster&) { return true; }, absl::Seconds(5), stop_);
      if (!r.ok()) {
        if (absl::IsCancelled(r.status())) break;
        if (absl::IsDeadlineExceeded(r.status())) continue;
        return r.status();
      }
      Observe(*r);
      if (r->finished()) break;
      if (checkpoint_due_ > r->checkpoint_step() && checkpoint_due_ <= r->next_step()) {
        SaveAndReport(*r, checkpoint_due_);
        checkpoint_due_ = -1;
      }
      if (!r->rollback().empty()) {
        return absl::UnimplementedError(absl::StrCat(
            "the swarm needs a rollback (", r->rollback(), "), which trainers cannot follow yet"));
      }
      int free = 0;
      std::vector<int64_t> release;
      {
        std::unique_lock<std::mutex> lock(pool_mu_);
        auto busy = [&] { return static_cast<int>(running_.size()) >= options_.in_flight; };
        if (busy() && failed_.empty()) {
          // Every slot busy: wait for one to come free (or a new roster).
          pool_cv_.wait_for(lock, std::chrono::milliseconds(200),
                            [&] { return !busy() || !failed_.empty(); });
          continue;
        }
        free = options_.in_flight - static_cast<int>(running_.size());
        // An id this trainer runs again already (a failure from before a rollback, whose id the
        // ledger leased anew) is not given back: that would end the new lease.
        for (int64_t id : failed_) {
          if (running_.count(id) == 0) release.push_back(id);
        }
        failed_.clear();
      }
      v1::LeaseRequest lr;
      lr.set_worker_id(link_->id());
      lr.set_max(free);
      for (int64_t id : release) lr.add_release(id);
      SHOAL_ASSIGN_OR_RETURN(const v1::LeaseResponse leases, link_->client().Lease(lr));
      if (!leases.step_open() || leases.leases_size() == 0) {
        WaitForWork(r->version());  // nothing to lease until the roster moves on
        continue;
      }
      Observe(link_->latest());
      std::lock_guard<std::mutex> lock(pool_mu_);
      if (running_.empty()) {
        idle_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - idle_since_)
                       .count();
      }
      for (const v1::SwarmLeaseEntry& lease : leases.leases()) {
        queue_.push_back({leases.step(), leases.rollbacks(), lease});
        running_.insert(lease.id());
      }
      pool_cv_.notify_all();
    }
    // Micro-batches not run (or cut short by the stop) go back to the pool.
    StopWorkers();
    const int64_t steps = link_->latest().next_step();
    if (steps > 0) {
      SHOAL_LOG(Info) << "swarm trainer " << link_->id() << ": nothing in flight for "
                      << std::llround(idle_s_) << " s of " << std::llround(Now() - started_)
                      << " s (" << std::llround(1e3 * idle_s_ / static_cast<double>(steps))
                      << " ms a step over " << steps
                      << " steps: the step boundaries and the wait for the first)";
      LogCalls();
    }
    if (!failed_.empty()) {
      v1::LeaseRequest lr;
      lr.set_worker_id(link_->id());
      lr.set_max(0);
      for (int64_t id : failed_) lr.add_release(id);
      (void)link_->client().Lease(lr);
    }
    const v1::SwarmRoster last = link_->latest();
    Observe(last);
    if (last.finished() && !stop_->load()) {
      SHOAL_RETURN_IF_ERROR(SaveCheckpoint(last, last.next_step(), absl::Seconds(60)).status());
    }
    return absl::OkStatus();
  }

  // The micro-batches leased run on options_.in_flight threads at once, each its chain of calls
  // through the stages: the peers compute one call at a time each, so several micro-batches in
  // flight keep every stage busy (a pipeline), where one at a time would leave all but one peer
  // idle. A micro-batch that fails is given back with the next lease request.
  void StartWorkers() {
    for (int i = 0; i < options_.in_flight; ++i) {
      workers_.emplace_back([this] { WorkerLoop(); });
    }
  }

  void WorkerLoop() {
    while (true) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(pool_mu_);
        pool_cv_.wait(lock, [&] { return closing_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      absl::Status s = stop_->load() ? absl::CancelledError("stopping") : RunMicroBatch(job);
      if (!s.ok() && !absl::IsCancelled(s)) {
        SHOAL_LOG(Warning) << "swarm trainer: micro-batch " << job.lease.id() << " of step "
                           << job.step << ": " << s << " (given back)";
      }
      std::lock_guard<std::mutex> lock(pool_mu_);
      running_.erase(running_.find(job.lease.id()));
      if (running_.empty()) idle_since_ = std::chrono::steady_clock::now();
      if (!s.ok()) failed_.push_back(job.lease.id());
      pool_cv_.notify_all();
    }
  }

  // Runs what is queued (cut short once stop_ is set), then ends the threads.
  void StopWorkers() {
    {
      std::lock_guard<std::mutex> lock(pool_mu_);
      closing_ = true;
    }
    pool_cv_.notify_all();
    for (std::thread& t : workers_) t.join();
    workers_.clear();
  }

  // Up to a second for a roster past `version` or a micro-batch to give back.
  void WaitForWork(uint64_t version) {
    for (int i = 0; i < 10 && !stop_->load(); ++i) {
      if (link_->Await([&](const v1::SwarmRoster& n) { return n.version() != version; },
                       absl::Milliseconds(100), stop_)
              .ok()) {
        return;
      }
      std::lock_guard<std::mutex> lock(pool_mu_);
      if (!failed_.empty()) return;
    }
  }

  // A checkpoint during the run (checkpoint.every), written by one trainer (the first of the
  // roster's live trainers) and reported, so a rollback goes back to it. A step the swarm has
  // moved past is skipped.
  void SaveAndReport(const v1::SwarmRoster& r, int64_t step) {
    if (r.trainers_size() == 0 || r.trainers(0) != link_->id()) return;
    absl::StatusOr<std::string> path = SaveCheckpoint(r, step, absl::Seconds(10));
    if (!path.ok()) {
      SHOAL_LOG(Warning) << "swarm trainer: no checkpoint of step " << step << ": "
                         << path.status();
      return;
    }
    v1::CheckpointSavedRequest saved;
    saved.set_worker_id(link_->id());
    saved.set_step(step);
    // Absolute: the peers that load it do not share this process's working directory.
    std::error_code error;
    const std::filesystem::path absolute = std::filesystem::absolute(*path, error);
    saved.set_path(error ? *path : absolute.string());
    if (absl::Status s = link_->client().CheckpointSaved(saved); !s.ok()) {
      SHOAL_LOG(Warning) << "swarm trainer: checkpoint of step " << step << " not recorded: " << s;
    }
  }

  // Installs the roster's serving peers in the routers and logs the newly applied steps.
  void Observe(const v1::SwarmRoster& r) {
    if (r.version() > routed_version_) {
      routed_version_ = r.version();
      for (const v1::SwarmStageEntry& st : r.stages()) {
        std::vector<std::string> serving, draining;
        for (const v1::SwarmPeerEntry& p : st.peers()) {
          {
            std::lock_guard<std::mutex> lock(address_mu_);
            address_[p.id()] = p.address();
          }
          if (!p.in_round()) continue;
          (p.state() == "SERVING" ? serving : draining).push_back(p.id());
        }
        if (st.index() < 0 || st.index() >= stages_) continue;
        (void)routers_[st.index()]->SetRoster(r.version(), serving.empty() ? draining : serving);
      }
    }
    if (r.counters().rollbacks() > rollbacks_seen_) {
      if (rollbacks_seen_ >= 0) {
        SHOAL_LOG(Warning) << "swarm trainer: the swarm rolled back to step " << r.next_step()
                           << " (a stage lost every peer); its steps run again";
        logged_step_ = std::min(logged_step_, r.next_step() - 1);
      }
      rollbacks_seen_ = r.counters().rollbacks();
    }
    for (const v1::SwarmDecision& d : r.decisions()) {
      if (d.step() <= logged_step_) continue;
      logged_step_ = d.step();
      const double now = Now();
      const double tokens = static_cast<double>(micro_batches_) * config_.train.batch_size *
                            config_.model.block_size;
      runtime::TrainLogRecord rec;
      rec.step = d.step() + 1;
      rec.total_steps = total_steps_;
      rec.loss = d.loss();
      rec.lr = d.lr();
      rec.grad_norm = d.grad_norm();
      rec.tokens_per_s = last_decision_s_ > 0 ? tokens / std::max(1e-9, now - last_decision_s_)
                                              : 0;
      // Model FLOPs per second over the peak of the hardware serving the stages now.
      const double peak = SwarmPeakGflops(r);
      rec.mfu = peak > 0 ? rec.tokens_per_s * flops_per_token_ / (peak * 1e9) : 0;
      rec.elapsed_s = now - started_;
      rec.eta_s = rec.elapsed_s / static_cast<double>(rec.step) *
                  static_cast<double>(total_steps_ - rec.step);
      last_decision_s_ = now;
      if (config_.checkpoint.every > 0 && rec.step % config_.checkpoint.every == 0 &&
          rec.step < total_steps_) {
        checkpoint_due_ = rec.step;
      }
      SHOAL_LOG(Info) << runtime::FormatTrainLine(rec);
      metrics_->Write({{"kind", "train"}, {"step", rec.step}, {"loss", rec.loss},
                       {"step_loss", rec.loss}, {"lr", rec.lr}, {"grad_norm", rec.grad_norm},
                       {"clip_scale", d.clip_scale()}, {"tokens_per_s", rec.tokens_per_s},
                       {"mfu", rec.mfu}, {"elapsed_s", rec.elapsed_s}, {"eta_s", rec.eta_s}});
      v1::StepStats stats;
      stats.set_step(rec.step);
      stats.set_loss(rec.loss);
      stats.set_lr(rec.lr);
      stats.set_tokens_per_s(rec.tokens_per_s);
      link_->SetStats(stats);
    }
  }

  // The work a micro-batch holds on one peer per stage (StageRouter::Choose's hold): from the
  // forward that picks the peer to the stage's last call, given back then or however the
  // micro-batch ends.
  class Holds {
   public:
    explicit Holds(std::vector<std::unique_ptr<parallel::StageRouter>>& routers)
        : routers_(routers), held_(routers.size()) {}
    ~Holds() {
      for (size_t s = 0; s < held_.size(); ++s) Release(static_cast<int>(s));
    }
    void Add(int stage, const std::string& peer, double work) { held_[stage] = {peer, work}; }
    void Release(int stage) {
      auto& [peer, work] = held_[stage];
      if (work > 0) (void)routers_[stage]->Release(peer, work);  // kNotFound: it left
      work = 0;
    }

   private:
    std::vector<std::unique_ptr<parallel::StageRouter>>& routers_;
    std::vector<std::pair<std::string, double>> held_;  // per stage
  };

  // A peer of `stage` for a task, and its address: `same` when it can still serve (the peer that
  // ran the micro-batch's forward holds its activations, so its backward skips the recompute).
  // A fresh choice holds `hold` on the peer in `holds` (the task and what must follow it there).
  absl::StatusOr<std::pair<std::string, std::string>> Choose(int stage, double size,
                                                             Holds& holds, double hold,
                                                             const std::string& same = "") {
    SHOAL_ASSIGN_OR_RETURN(std::string peer, same.empty()
                                                 ? routers_[stage]->Choose(size, hold)
                                                 : routers_[stage]->ChooseSame(same, size));
    if (same.empty()) holds.Add(stage, peer, hold);
    std::lock_guard<std::mutex> lock(address_mu_);
    return std::make_pair(peer, address_[peer]);
  }

  // After a call to `peer` failed: banned here (the router lifts the ban after a number of the
  // stage's choices, or when the roster changes), and reported when it could not be reached.
  // The coordinator fences it only when it cannot reach it either; a peer it reaches stays in
  // the roster, and this trainer tries it again once the ban expires.
  void Failed(int stage, const std::string& peer, const absl::Status& s) {
    if (absl::IsDeadlineExceeded(s)) return;
    (void)routers_[stage]->Ban(peer);
    if (absl::IsUnavailable(s)) {
      v1::ReportPeerRequest rp;
      rp.set_worker_id(link_->id());
      rp.set_peer_id(peer);
      rp.set_reason(std::string(s.message()).substr(0, 200));
      absl::StatusOr<v1::ReportPeerResponse> r = link_->client().ReportPeer(rp);
      if (r.ok()) {
        SHOAL_LOG(Info) << "swarm trainer: peer " << peer << " of stage " << stage
                        << (r->fenced() ? " is gone; the coordinator fenced it"
                                        : " failed a call but the coordinator reaches it; it is "
                                          "tried again when its ban expires");
      }
    }
  }

  absl::Status RunMicroBatch(const Job& job) {
    const int64_t step = job.step;
    const v1::SwarmLeaseEntry& lease = job.lease;
    const int64_t micro = lease.id() - step * micro_batches_;
    if (micro < 0 || micro >= micro_batches_ || lease.stages_size() == 0) {
      return absl::InternalError(absl::StrCat("lease ", lease.id(), " is not of step ", step));
    }
    const std::set<int> accumulate(lease.stages().begin(), lease.stages().end());
    const int lowest = *accumulate.begin();
    const int64_t B = config_.train.batch_size, T = config_.model.block_size;
    at::Tensor x = at::empty({B, T}, at::kLong), y = at::empty({B, T}, at::kLong);
    sampler_->TrainBatch(step, static_cast<int>(micro), x.data_ptr<int64_t>(),
                         y.data_ptr<int64_t>());
    std::vector<at::Tensor> inputs(stages_);
    std::vector<std::string> forward_peer(stages_);
    inputs[0] = x;
    comm::StageCall call;
    call.step = step;
    call.micro_batch = micro;
    call.trainer_id = link_->id();
    call.rollbacks = job.rollbacks;
    Holds holds(routers_);
    for (int s = 0; s + 1 < stages_; ++s) {
      const double work = parallel::kSwarmForwardWork * static_cast<double>(B);
      // The stage's backward follows on the same peer (the stages from `lowest` on).
      const double hold = s >= lowest ? work + parallel::kSwarmBackwardWork * static_cast<double>(B)
                                      : work;
      SHOAL_ASSIGN_OR_RETURN(auto peer, Choose(s, work, holds, hold));
      call.stage = s;
      const double t0 = Now();
      absl::StatusOr<comm::StageReply> out = client_->Forward(peer.second, call, inputs[s]);
      if (!out.ok()) {
        Failed(s, peer.first, out.status());
        return out.status();
      }
      Timed(s, peer.first, work, t0, *out);
      if (s < lowest) holds.Release(s);
      forward_peer[s] = peer.first;
      inputs[s + 1] = out->tensor;
    }
    const int last = stages_ - 1;
    const double fb_work = parallel::kSwarmForwardBackwardWork * static_cast<double>(B);
    SHOAL_ASSIGN_OR_RETURN(auto peer, Choose(last, fb_work, holds, fb_work));
    call.stage = last;
    double t0 = Now();
    absl::StatusOr<comm::StageReply> fb =
        client_->ForwardBackward(peer.second, call, inputs[last], y,
                                 1.0 / static_cast<double>(micro_batches_),
                                 accumulate.count(last) > 0);
    if (!fb.ok()) {
      Failed(last, peer.first, fb.status());
      return fb.status();
    }
    Timed(last, peer.first, fb_work, t0, *fb);
    holds.Release(last);
    at::Tensor grad = fb->tensor;
    for (int s = last - 1; s >= lowest; --s) {
      const double work = parallel::kSwarmBackwardWork * static_cast<double>(B);
      // Another peer than the forward's (that one cannot serve): its hold is void.
      SHOAL_ASSIGN_OR_RETURN(auto bp, Choose(s, work, holds, 0, forward_peer[s]));
      if (bp.first != forward_peer[s]) holds.Release(s);
      call.stage = s;
      t0 = Now();
      absl::StatusOr<comm::StageReply> b = client_->Backward(bp.second, call, inputs[s], grad,
                                                             accumulate.count(s) > 0);
      if (!b.ok()) {
        Failed(s, bp.first, b.status());
        return b.status();
      }
      Timed(s, bp.first, work, t0, *b);
      holds.Release(s);
      grad = b->tensor;
    }
    return absl::OkStatus();
  }

  // A call of `work` to `peer` of `stage` ended now, begun at t0, with the peer's reply (its
  // compute and queueing times): the router's measurement, and the exit log's figures.
  void Timed(int stage, const std::string& peer, double work, double t0,
             const comm::StageReply& reply) {
    const double compute_s = reply.compute_s, queued_s = reply.queued_s;
    const double end = Now();
    // The call's time less what it waited at the peer behind other calls (this trainer's or
    // another's): transit and compute, the peer's cost for one more task (see ThroughputEma).
    // A peer's queued_s outside [0, the call's time] is not believed: the whole call counts.
    const double wall = end - t0;
    const bool believed = std::isfinite(queued_s) && queued_s >= 0 && queued_s <= wall;
    const double measured = believed ? wall - queued_s : wall;
    (void)routers_[stage]->Report(peer, work, measured);
    std::lock_guard<std::mutex> lock(calls_mu_);
    CallTimes& c = calls_[{stage, peer}];
    ++c.calls;
    c.seconds += end - t0;
    c.compute_s += compute_s;
    c.measured_s += measured;
  }

  // Where the calls' time went, per peer (logged at the end).
  void LogCalls() {
    std::lock_guard<std::mutex> lock(calls_mu_);
    for (const auto& [key, c] : calls_) {
      const std::optional<double> rate = routers_[key.first]->Throughput(key.second);
      SHOAL_LOG(Info) << "swarm trainer " << link_->id() << ": stage " << key.first << " peer "
                      << key.second << ": " << c.calls
                      << " calls, " << std::llround(1e3 * c.seconds / c.calls) << " ms each, "
                      << std::llround(1e3 * c.compute_s / c.calls)
                      << " ms of it computing at the peer (the rest queued there or in transit), "
                      << std::llround(1e3 * c.measured_s / c.calls)
                      << " ms as the router measured it (less the queue)"
                      << (rate.has_value() ? absl::StrFormat("; its rate at the end: %.1f", *rate)
                                           : std::string("; gone from the router"));
    }
  }

  // Every stage's state `step`, pulled from a serving peer, as one checkpoint in the usual
  // format. Its folder.
  absl::StatusOr<std::string> SaveCheckpoint(const v1::SwarmRoster& r, int64_t step,
                                             absl::Duration patience) {
    runtime::CheckpointState state;
    state.step = step;
    state.config_toml = link_->job().config_toml();
    state.data = {{"next_step", step}, {"swarm", true}};
    std::set<std::string> have;
    int64_t optimizer_steps = -1;
    for (const v1::SwarmStageEntry& st : r.stages()) {
      absl::Status last = absl::UnavailableError(
          absl::StrCat("no serving peer of stage ", st.index()));
      std::optional<runtime::StageSnapshot> snap;
      // The peers apply the last step as the trainer learns of it: ask until one holds it.
      const absl::Time deadline = absl::Now() + patience;
      while (!snap.has_value() && absl::Now() < deadline) {
        for (const v1::SwarmPeerEntry& p : st.peers()) {
          if (p.state() != "SERVING" && p.state() != "DRAINING") continue;
          runtime::FetchOptions fo;
          fo.token = options_.token;
          fo.tls_ca_file = options_.tls_ca_file;
          fo.attempts = 1;
          absl::StatusOr<runtime::StageSnapshot> got =
              runtime::FetchStageState(p.address(), st.index(), step, fo);
          if (got.ok()) {
            snap = *std::move(got);
            break;
          }
          last = got.status();
        }
        if (!snap.has_value()) absl::SleepFor(absl::Milliseconds(50));
      }
      if (!snap.has_value()) return last;
      optimizer_steps = snap->manifest.step();
      for (const v1::StateEntry& e : snap->manifest.entries()) {
        // As the one-process engines name them (a DeMo residual is the serving peer's, kept as
        // replica 0's).
        const std::string name = e.kind() == "param"        ? e.name()
                                 : e.kind() == "demo_delta" ? "demo.r0.delta." + e.name()
                                                            : absl::StrCat(e.kind(), ".", e.name());
        if (!have.insert(name).second) continue;  // the tied wte's second copy
        std::vector<int64_t> shape(e.shape().begin(), e.shape().end());
        at::Tensor t = at::empty(shape, at::kFloat);
        if (e.bytes() != t.numel() * 4 || e.offset() < 0 ||
            e.offset() + e.bytes() > static_cast<int64_t>(snap->bytes.size())) {
          return absl::DataLossError(absl::StrCat("stage ", st.index(), "'s state: entry ",
                                                  name, " does not fit its stream"));
        }
        std::memcpy(t.data_ptr(), snap->bytes.data() + e.offset(), static_cast<size_t>(e.bytes()));
        (e.kind() == "param" ? state.model : state.optimizer).emplace_back(name, t);
      }
    }
    state.optimizer.emplace_back(config_.optim.name == "demo" ? "demo.step" : "step",
                                 at::scalar_tensor(optimizer_steps, at::kLong));
    const std::string root = config_.checkpoint.dir.empty() ? out_dir_ + "/checkpoints"
                                                            : config_.checkpoint.dir;
    runtime::CheckpointStore store(root, config_.checkpoint.keep);
    SHOAL_ASSIGN_OR_RETURN(std::string path, store.Save(state));
    SHOAL_LOG(Info) << "swarm trainer: saved " << path << " (every stage's state after step "
                    << step << ")";
    return path;
  }

  SwarmWorkerOptions options_;
  std::atomic<bool>* stop_;
  std::unique_ptr<SwarmLink> link_;
  runtime::Config config_;
  runtime::TokenDataset data_;
  std::unique_ptr<runtime::BatchSampler> sampler_;
  std::unique_ptr<comm::StageClient> client_;
  std::vector<std::unique_ptr<parallel::StageRouter>> routers_;
  std::mutex address_mu_;
  std::map<std::string, std::string> address_;  // guarded by address_mu_
  // The micro-batch threads (StartWorkers), guarded by pool_mu_.
  std::mutex pool_mu_;
  std::condition_variable pool_cv_;
  std::deque<Job> queue_;         // leased, not started
  std::multiset<int64_t> running_;  // lease ids queued or running (at most in_flight)
  // Time with nothing queued or running (the step boundaries as this trainer sees them, and the
  // wait for the first step): since when, and in all.
  std::chrono::steady_clock::time_point idle_since_ = std::chrono::steady_clock::now();
  double idle_s_ = 0;
  std::vector<int64_t> failed_;   // lease ids to give back
  bool closing_ = false;
  std::vector<std::thread> workers_;
  std::unique_ptr<runtime::MetricsFile> metrics_;
  struct CallTimes {
    int64_t calls = 0;
    double seconds = 0, compute_s = 0;
    double measured_s = 0;  // what the router was told (the call's time less its queue)
  };
  std::mutex calls_mu_;
  std::map<std::pair<int, std::string>, CallTimes> calls_;  // per (stage, peer), calls_mu_
  std::string out_dir_;
  int stages_ = 1, micro_batches_ = 1;
  double flops_per_token_ = 0;  // the model's, forward and backward (MFU's numerator per token)
  int64_t total_steps_ = 0;
  uint64_t routed_version_ = 0;
  int64_t logged_step_ = -1;
  int64_t rollbacks_seen_ = -1;
  int64_t checkpoint_due_ = -1;  // a checkpoint of this step is to be written
  double started_ = 0, last_decision_s_ = 0;
};

}  // namespace

int RunSwarmTrainer(const SwarmWorkerOptions& options, std::atomic<bool>* stop) {
  Trainer trainer(options, stop);
  return trainer.Run();
}

}  // namespace shoal::launch
