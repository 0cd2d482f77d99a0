// `shoal worker --join`: a swarm peer (swarm_worker.h).
#include <unistd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/peer_group.h"
#include "common/host_allocator.h"
#include "common/logging.h"
#include "common/status.h"
#include "launch/swarm_worker.h"
#include "parallel/adamw.h"
#include "parallel/demo.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/device_probe.h"
#include "runtime/profiler.h"
#include "runtime/step_engine.h"
#include "runtime/swarm_peer.h"
#include "runtime/swarm_stage.h"
#include "runtime/swarm_sync.h"

namespace shoal::launch {
namespace {

const v1::SwarmStageEntry* StageOf(const v1::SwarmRoster& r, int stage) {
  for (const v1::SwarmStageEntry& s : r.stages()) {
    if (s.index() == stage) return &s;
  }
  return nullptr;
}

const v1::SwarmPeerEntry* PeerOf(const v1::SwarmRoster& r, const std::string& id) {
  for (const v1::SwarmStageEntry& s : r.stages()) {
    for (const v1::SwarmPeerEntry& p : s.peers()) {
      if (p.id() == id) return &p;
    }
  }
  return nullptr;
}

const v1::SwarmDecision* DecisionOf(const v1::SwarmRoster& r, int64_t step) {
  for (const v1::SwarmDecision& d : r.decisions()) {
    if (d.step() == step) return &d;
  }
  return nullptr;
}

// This peer's index in a plan, or -1.
int RankIn(const v1::SwarmReductionPlan& plan, const std::string& id) {
  for (int i = 0; i < plan.peers_size(); ++i) {
    if (plan.peers(i) == id) return i;
  }
  return -1;
}

class Peer {
 public:
  Peer(const SwarmWorkerOptions& options, std::atomic<bool>* stop)
      : options_(options), stop_(stop) {}

  int Run() {
    absl::Status s = RunOrError();
    if (rounds_ > 0) {
      SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": " << rounds_ << " round(s) of stage "
                      << stage_index_ << " ("
                      << (stage_->demo() ? "DeMo payloads" : "gradient sums") << "), "
                      << round_bytes_ << " bytes sent in them, " << round_bytes_ / rounds_
                      << " per round; " << std::llround(1e3 * round_s_ / rounds_)
                      << " ms a round reducing and reporting, "
                      << std::llround(1e3 * apply_s_ / rounds_) << " ms applying the decision";
    }
    if (link_ != nullptr) link_->Close(s.ok() ? "done" : std::string(s.message()));
    if (server_ != nullptr) server_->Shutdown();
    if (busy_s_ > 0) {
      const double span = std::max(1e-9, absl::ToDoubleSeconds(busy_to_ - busy_from_));
      SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": computed " << std::llround(busy_s_)
                      << " s of the " << std::llround(span) << " s from its first call on ("
                      << std::llround(100 * busy_s_ / span) << " % busy), "
                      << std::llround(1e3 * commit_s_) << " ms of it waiting for the ledger";
    }
    if (stage_ != nullptr && stage_->recomputes() > 0) {
      SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": " << stage_->recomputes()
                      << " backward(s) ran their forward again (not cached here)";
    }
    if (s.ok()) return 0;
    return WorkerFail(s);
  }

 private:
  absl::Status RunOrError() {
    mailbox_ = std::make_shared<comm::ExchangeMailbox>();
    runtime::SwarmPeerOptions so;
    so.listen = options_.listen;
    so.token = options_.token;
    so.tls_cert_file = options_.tls_cert_file;
    so.tls_key_file = options_.tls_key_file;
    so.commit = [this](const v1::CallInfo& call, double loss) { return Commit(call, loss); };
    if (options_.throttle > 1 || options_.slow_after_s >= 0) {
      const absl::Time start = absl::Now();
      so.slowdown = [this, start] {
        const bool slowed = options_.slow_after_s >= 0 &&
                            absl::Now() - start >= absl::Seconds(options_.slow_after_s);
        return options_.throttle * (slowed ? options_.slow_factor : 1.0);
      };
    }
    SHOAL_ASSIGN_OR_RETURN(server_, runtime::SwarmPeerServer::Start(nullptr, mailbox_, so));
    const std::string advertise =
        options_.advertise.empty() ? server_->address() : options_.advertise;

    v1::JoinRequest join;
    join.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    join.set_role(v1::WORKER_ROLE_PEER);
    join.set_advertise(advertise);
    join.set_name(options_.name);
    // The profile is cached per machine (runtime/profiler.h): measured once, then read.
    runtime::ProfileOptions po;
    SHOAL_ASSIGN_OR_RETURN(*join.mutable_device(), runtime::ProfileDevice(po));
    SHOAL_ASSIGN_OR_RETURN(link_, SwarmLink::Join(options_, join));
    const v1::SwarmJobInfo& job = link_->job();
    SHOAL_ASSIGN_OR_RETURN(config_, runtime::ParseConfig(job.config_toml(), "the swarm's config"));
    {
      // The job's train.omp_threads / blas_threads, as `shoal train` takes them (0: this
      // machine's cores for BLAS, one thread for shoal's kernels).
      const runtime::ThreadPlan plan = runtime::ChooseThreadPlan(
          config_.model, config_.train.omp_threads, config_.train.blas_threads);
      SHOAL_RETURN_IF_ERROR(runtime::ApplyThreadPlan(plan));
      SHOAL_LOG(Info) << "swarm peer: " << plan.omp_threads << " OpenMP thread(s), "
                      << plan.blas_threads << " BLAS thread(s) (" << plan.reason << "); "
                      << AppliedHostAllocator();
    }
    stage_index_ = job.stage();
    stages_ = job.stages();
    micro_batches_ = job.micro_batches();
    if (stage_index_ < 0 || stage_index_ >= stages_ || job.first_layer_size() != stages_ ||
        job.end_layer_size() != stages_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the coordinator assigned stage ", stage_index_, " of ", stages_, " stages"));
    }
    first_ = job.first_layer(stage_index_);
    end_ = job.end_layer(stage_index_);
    SHOAL_ASSIGN_OR_RETURN(stage_, MakeStage());  // checks the blocks against the model
    SHOAL_LOG(Info) << "swarm peer " << link_->id() << " at " << advertise << ": stage "
                    << stage_index_ << " of " << stages_ << " (blocks [" << first_ << ", " << end_
                    << ")), syncing from " << job.sync_source()
                    << (job.donor().empty() ? "" : " " + job.donor());
    SHOAL_RETURN_IF_ERROR(Sync(job.sync_source(), job.donor(), job.donor_address(),
                               job.sync_step()));
    server_->Attach(stage_.get(), first_, end_);
    attached_ = true;
    return Serve();
  }

  // Brings the stage to state `step` from `source` and tells the coordinator; a failed donor is
  // reported and the coordinator names the next source.
  absl::Status Sync(std::string source, std::string donor, std::string donor_address,
                    int64_t step) {
    int stale_syncs = 0;
    while (true) {
      if (source == "init") {
        if (step != 0) {
          return absl::FailedPreconditionError(
              absl::StrCat("asked to sync state ", step, " from the init"));
        }
        SHOAL_RETURN_IF_ERROR(ResetToInit());
      } else if (source == "donor") {
        runtime::FetchOptions fo;
        fo.token = options_.token;
        fo.tls_ca_file = options_.tls_ca_file;
        absl::StatusOr<runtime::StageSnapshot> snap =
            runtime::FetchStageState(donor_address, stage_index_, step, fo);
        absl::Status loaded = snap.ok() ? runtime::LoadSnapshot(*stage_, *snap) : snap.status();
        if (!loaded.ok()) {
          SHOAL_LOG(Warning) << "swarm peer: sync from " << donor << " failed: " << loaded;
          v1::PeerSyncedRequest failed;
          failed.set_peer_id(link_->id());
          failed.set_failed_donor(donor);
          failed.set_error(std::string(loaded.message()).substr(0, 200));
          absl::StatusOr<v1::PeerSyncedResponse> got = link_->client().PeerSynced(failed);
          if (absl::IsFailedPrecondition(got.status())) {
            // The coordinator had already given this joiner another source (a step was applied
            // meanwhile): follow the roster.
            source = "wait";
            continue;
          }
          SHOAL_ASSIGN_OR_RETURN(v1::PeerSyncedResponse next, std::move(got));
          source = next.swarm().sync_source();
          donor = next.swarm().donor();
          donor_address = next.swarm().donor_address();
          step = next.swarm().sync_step();
          continue;
        }
      } else if (source == "wait") {
        // Every donor is busy: the roster names ours once one frees up.
        SHOAL_ASSIGN_OR_RETURN(
            v1::SwarmRoster r,
            link_->Await(
                [&](const v1::SwarmRoster& r) {
                  const v1::SwarmPeerEntry* me = PeerOf(r, link_->id());
                  return me == nullptr || me->sync_source() != "wait";
                },
                absl::Minutes(10), stop_));
        const v1::SwarmPeerEntry* me = PeerOf(r, link_->id());
        if (me == nullptr) return absl::FailedPreconditionError("removed from the swarm");
        source = me->sync_source().empty() ? "donor" : me->sync_source();
        donor = me->donor();
        const v1::SwarmPeerEntry* d = PeerOf(r, donor);
        donor_address = d != nullptr ? d->address() : "";
        step = r.next_step();
        continue;
      } else if (source == "claim") {
        // The state is loaded (and caught up): claim it again.
        source = "donor";
      } else if (source == "checkpoint") {
        SHOAL_RETURN_IF_ERROR(LoadCheckpoint(step));
      } else {
        return absl::InvalidArgumentError(absl::StrCat("an unknown sync source '", source, "'"));
      }
      v1::PeerSyncedRequest synced;
      synced.set_peer_id(link_->id());
      synced.set_step(stage_->optimizer_steps());
      synced.set_param_hash(stage_->ParamHash());
      absl::Status claimed = link_->client().PeerSynced(synced).status();
      if (absl::IsOutOfRange(claimed) && source == "donor" && ++stale_syncs < 20) {
        // The swarm applied a step while the state travelled: take the steps since from the
        // donor's catch-up log, or, when its log does not reach back, its newest state.
        SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": " << claimed.message();
        absl::StatusOr<int> taken = TakeUpdates(donor_address, stage_->optimizer_steps() + 1, 0);
        if (taken.ok() && *taken > 0) {
          SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": took " << *taken
                          << " step(s) from " << donor << "'s catch-up log, now at state "
                          << stage_->optimizer_steps();
          source = "claim";
        } else {
          if (!taken.ok()) SHOAL_LOG(Info) << "swarm peer: catch-up log: " << taken.status();
          step = -1;
        }
        continue;
      }
      SHOAL_RETURN_IF_ERROR(claimed);
      break;
    }
    // Until the roster shows the claim, an older roster would still say "syncing".
    SHOAL_RETURN_IF_ERROR(link_->Await(
        [&](const v1::SwarmRoster& r) {
          const v1::SwarmPeerEntry* me = PeerOf(r, link_->id());
          return me == nullptr || me->synced() || me->state() != "SYNCING";
        },
        absl::Seconds(60), stop_).status());
    SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": synced state "
                    << stage_->optimizer_steps() << " (hash " << stage_->ParamHash() << ")";
    return absl::OkStatus();
  }

  // This peer's stage at the init: AdamW, or DeMo when the job's optim.name says so.
  absl::StatusOr<std::unique_ptr<runtime::SwarmStage>> MakeStage() const {
    runtime::SwarmStageOptions so;
    so.catchup_steps = options_.catchup_steps;
    so.cache_slots = options_.cache_slots;
    // The coordinator refuses train.dtype other than fp32 for a swarm.
    SHOAL_ASSIGN_OR_RETURN(so.kernels, runtime::ParseKernels(config_.train.kernels,
                                                             runtime::Precision::kFp32));
    if (config_.optim.name == "demo") {
      SHOAL_ASSIGN_OR_RETURN(so.demo, runtime::DemoOptionsOf(config_.optim));
    }
    return runtime::SwarmStage::Create(config_.model, config_.train.seed, stage_index_, stages_,
                                       first_, end_, runtime::AdamWOptionsOf(config_.optim), so);
  }

  // The stage as the init made it (after a rollback to step 0; at the join it is that already).
  absl::Status ResetToInit() {
    if (!attached_) return absl::OkStatus();
    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<runtime::SwarmStage> fresh, MakeStage());
    const runtime::StageSnapshot init = runtime::SnapshotOf(*fresh, first_, end_);
    return server_->WithStage([&](runtime::SwarmStage& st) {
      st.DropStep();
      return runtime::LoadSnapshot(st, init);
    });
  }

  // The stage's part of the swarm's newest checkpoint (the folder the roster names, which this
  // peer must be able to read: one machine, or a shared file system).
  absl::Status LoadCheckpoint(int64_t step) {
    SHOAL_ASSIGN_OR_RETURN(
        v1::SwarmRoster r,
        link_->Await([](const v1::SwarmRoster& r) { return r.checkpoint_step() >= 0; },
                     absl::Seconds(30), stop_));
    const std::string& path = r.checkpoint_path();
    if (r.checkpoint_step() != step) {
      return absl::FailedPreconditionError(absl::StrCat(
          "asked to sync state ", step, " from the checkpoint, whose step is ",
          r.checkpoint_step()));
    }
    absl::StatusOr<runtime::CheckpointState> ck = runtime::CheckpointStore::Load(path);
    if (!ck.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the swarm's checkpoint ", path, " cannot be read here (a peer syncing from a "
          "checkpoint needs its folder: one machine or a shared file system): ",
          ck.status().message()));
    }
    if (ck->step != step) {
      return absl::DataLossError(
          absl::StrCat(path, " holds step ", ck->step, ", the swarm expects ", step));
    }
    std::map<std::string, at::Tensor> model(ck->model.begin(), ck->model.end());
    std::map<std::string, at::Tensor> optimizer(ck->optimizer.begin(), ck->optimizer.end());
    auto pick = [&](const std::vector<std::pair<std::string, at::Tensor>>& want,
                    const std::map<std::string, at::Tensor>& from, const char* what)
        -> absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> {
      std::vector<std::pair<std::string, at::Tensor>> out;
      for (const auto& [name, t] : want) {
        auto it = from.find(name);
        if (it == from.end()) {
          return absl::DataLossError(absl::StrCat(path, ": no ", what, " ", name));
        }
        out.emplace_back(name, it->second);
      }
      return out;
    };
    SHOAL_ASSIGN_OR_RETURN(auto params, pick(stage_->NamedParameters(), model, "parameter"));
    std::vector<std::pair<std::string, at::Tensor>> moments;
    if (stage_->demo()) {
      // Every peer's residual restarts from zero: the checkpoint holds one peer's at most.
      moments.emplace_back("step", at::scalar_tensor(step, at::kLong));
    } else {
      SHOAL_ASSIGN_OR_RETURN(moments, pick(stage_->OptimizerState(), optimizer, "optimizer state"));
    }
    auto load = [&](runtime::SwarmStage& st) {
      st.DropStep();
      return st.LoadState(params, moments);
    };
    SHOAL_RETURN_IF_ERROR(attached_ ? server_->WithStage(load) : load(*stage_));
    SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": loaded stage " << stage_index_
                    << " of " << path;
    return absl::OkStatus();
  }

  // The commit callback: called by the server under its compute lock.
  absl::Status Commit(const v1::CallInfo& call, double loss) {
    if (link_ == nullptr) return absl::FailedPreconditionError("not joined yet");
    if (call.micro_batch() >= micro_batches_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "micro-batch ", call.micro_batch(), " of a step of ", micro_batches_));
    }
    v1::CommitRequest c;
    c.set_peer_id(link_->id());
    c.set_trainer_id(call.trainer_id());
    c.set_step(call.step());
    c.set_id(call.step() * micro_batches_ + call.micro_batch());
    c.set_rollbacks(call.rollbacks());
    if (std::isfinite(loss)) {
      c.set_has_loss(true);
      c.set_loss(loss);
    }
    return link_->client().Commit(c);
  }

  // The work behind the load reports (ReportLoad): the window being filled, the one before it,
  // and when the current one began.
  static constexpr int kLoadWindowS = 4;  // ReportLoad's window
  struct LoadWindows {
    runtime::SwarmPeerLoad current, previous;
    absl::Time start = absl::Now();
  };

  // The plans this peer's reduction follows: its stage's, and for the first and the last stage
  // (when they differ) the other one's, which the tied wte is summed over.
  struct Plans {
    const v1::SwarmReductionPlan* own = nullptr;
    const v1::SwarmReductionPlan* other = nullptr;  // tied partner stage's, when needed
    std::string key;
  };

  bool Tied() const { return stages_ > 1 && (stage_index_ == 0 || stage_index_ == stages_ - 1); }

  std::optional<Plans> PlansOf(const v1::SwarmRoster& r, int64_t step) const {
    if (!r.step_open() || r.open_step() != step) return std::nullopt;
    const v1::SwarmStageEntry* own = StageOf(r, stage_index_);
    if (own == nullptr || !own->has_reduction() || own->reduction().step() != step ||
        RankIn(own->reduction(), link_->id()) < 0) {
      return std::nullopt;
    }
    Plans p;
    p.own = &own->reduction();
    p.key = absl::StrCat(own->reduction().plan());
    if (Tied()) {
      const v1::SwarmStageEntry* other = StageOf(r, stage_index_ == 0 ? stages_ - 1 : 0);
      if (other == nullptr || !other->has_reduction() || other->reduction().step() != step) {
        return std::nullopt;
      }
      p.other = &other->reduction();
      absl::StrAppend(&p.key, ".", other->reduction().plan());
    }
    return p;
  }

  absl::StatusOr<std::unique_ptr<comm::PeerGroup>> Group(std::vector<std::string> roster,
                                                          int rank, const std::string& name) {
    comm::PeerGroupOptions o;
    o.roster = std::move(roster);
    o.rank = rank;
    o.group = name;
    o.token = options_.token;
    o.tls_ca_file = options_.tls_ca_file;
    o.timeout = absl::Seconds(60);
    return comm::PeerGroup::Create(o, mailbox_);
  }

  // The step's round over the plan(s), then the report. AdamW sums the accumulation; DeMo
  // all-gathers every peer's payloads. Either result waits in round_ for the step's decision.
  absl::Status Reduce(const Plans& plans, int64_t step, double lr) {
    const auto t0 = std::chrono::steady_clock::now();
    const v1::SwarmReductionPlan& own = *plans.own;
    const int rank = RankIn(own, link_->id());
    std::vector<int64_t> ids;
    for (const v1::SwarmPlanIds& e : own.ids()) {
      if (e.peer() == link_->id()) ids.assign(e.ids().begin(), e.ids().end());
    }
    // Named by the plans alone, so every peer of them names it alike; a peer reduces once per
    // plan, so no name comes twice in a process.
    const std::string name = absl::StrCat("s", stage_index_, ".k", step, ".p", plans.key);
    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<comm::PeerGroup> group,
                           Group({own.addresses().begin(), own.addresses().end()}, rank, name));
    std::unique_ptr<comm::PeerGroup> tied;
    int tied_peers = 0;
    if (plans.other != nullptr) {
      // Stage 0's peers first, then the last stage's: the same order everywhere.
      const v1::SwarmReductionPlan& first = stage_index_ == 0 ? own : *plans.other;
      const v1::SwarmReductionPlan& last = stage_index_ == 0 ? *plans.other : own;
      std::vector<std::string> roster(first.addresses().begin(), first.addresses().end());
      roster.insert(roster.end(), last.addresses().begin(), last.addresses().end());
      tied_peers = static_cast<int>(roster.size());
      const int tied_rank = stage_index_ == 0 ? rank : first.peers_size() + rank;
      SHOAL_ASSIGN_OR_RETURN(
          tied, Group(std::move(roster), tied_rank,
                      absl::StrCat("tied.k", step, ".p", first.plan(), ".", last.plan())));
    }
    // A rollback voids the round while it runs (its partner may never join, having acted on it).
    RollbackWatch watch(*link_, rollbacks_seen_, {group.get(), tied.get()});
    RoundResult result;
    result.lr = lr;
    double sum_squares = 0;
    uint64_t hash = 0;  // the parameters the step starts from, taken under the compute lock
    if (stage_->demo()) {
      // Compressed under the compute lock; exchanged without it.
      runtime::SwarmStage::DemoPayloads mine;
      SHOAL_RETURN_IF_ERROR(server_->WithStage([&](runtime::SwarmStage& st) -> absl::Status {
        SHOAL_RETURN_IF_ERROR(CheckHeld(st, ids, step));
        SHOAL_ASSIGN_OR_RETURN(mine, st.DemoCompress(lr, own.peers_size(), tied_peers,
                                                     config_.optim.grad_clip));
        hash = st.ParamHash();
        return absl::OkStatus();
      }));
      sum_squares = mine.sum_squares;
      SHOAL_ASSIGN_OR_RETURN(result.own_payloads,
                             parallel::MakeBackendExchange(group.get())->AllGather(mine.own));
      if (tied != nullptr) {
        SHOAL_ASSIGN_OR_RETURN(result.tied_payloads,
                               parallel::MakeBackendExchange(tied.get())->AllGather(mine.tied));
      }
    } else {
      // The accumulation stays as it is (this peer's micro-batches, and any replay added after
      // a failed or voided round); the sums live beside it until the step is decided.
      std::vector<at::Tensor> held;
      SHOAL_RETURN_IF_ERROR(server_->WithStage([&](runtime::SwarmStage& st) -> absl::Status {
        SHOAL_RETURN_IF_ERROR(CheckHeld(st, ids, step));
        for (const at::Tensor& g : st.Gradients()) held.push_back(g.clone());
        return absl::OkStatus();
      }));
      // Without the compute lock, so a joiner can copy this peer's state meanwhile.
      SHOAL_ASSIGN_OR_RETURN(result.sums,
                             runtime::SumOverRound(*stage_, held, group.get(), tied.get()));
      // The sums' squares as the stage counts them (each model element once).
      sum_squares = stage_->SumSquaresOf(result.sums);
      SHOAL_RETURN_IF_ERROR(server_->WithStage([&](runtime::SwarmStage& st) {
        hash = st.ParamHash();
        return absl::OkStatus();
      }));
    }
    // What the round cost this peer's uplink (the frames it delivered).
    ++rounds_;
    round_bytes_ += group->bytes_sent() + (tied != nullptr ? tied->bytes_sent() : 0);
    v1::StageReportRequest report;
    report.set_peer_id(link_->id());
    report.set_step(step);
    report.set_plan(own.plan());
    for (int64_t id : ids) report.add_ids(id);
    report.set_sum_squares(sum_squares);
    report.set_param_hash(hash);
    absl::StatusOr<v1::StageReportResponse> r = link_->client().StageReport(report);
    if (!r.ok() && !absl::IsAlreadyExists(r.status())) return r.status();  // else: reported
    round_ = std::move(result);
    round_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return absl::OkStatus();
  }

  // While a round's collectives run: aborts its groups (kAborted) once the roster counts a
  // rollback past `epoch`, instead of leaving them to their timeout.
  class RollbackWatch {
   public:
    RollbackWatch(SwarmLink& link, int64_t epoch, std::vector<comm::PeerGroup*> groups)
        : link_(link), thread_([this, epoch, groups] {
            absl::StatusOr<v1::SwarmRoster> r = link_.Await(
                [epoch](const v1::SwarmRoster& n) { return n.counters().rollbacks() != epoch; },
                absl::InfiniteDuration(), &done_);
            if (!r.ok()) return;  // the round ended first (or the link is gone)
            const absl::Status why = absl::AbortedError(absl::StrCat(
                "the swarm rolled back (rollback ", r->counters().rollbacks(),
                "): this round is void"));
            for (comm::PeerGroup* g : groups) {
              if (g != nullptr) g->Abort(why);
            }
          }) {}
    ~RollbackWatch() {
      done_ = true;
      link_.Wake();  // the round's end costs no Await period
      thread_.join();
    }
    RollbackWatch(const RollbackWatch&) = delete;
    RollbackWatch& operator=(const RollbackWatch&) = delete;

   private:
    SwarmLink& link_;
    std::atomic<bool> done_{false};
    std::thread thread_;
  };

  static absl::Status CheckHeld(const runtime::SwarmStage& st, const std::vector<int64_t>& ids,
                                int64_t step) {
    if (static_cast<int64_t>(ids.size()) == st.kept_micro_batches()) return absl::OkStatus();
    return absl::InternalError(absl::StrCat(
        "the coordinator's plan says this peer holds ", ids.size(), " micro-batch(es) of step ",
        step, ", it holds ", st.kept_micro_batches()));
  }

  // The step's decision, applied: AdamW on the round's sums, or DeMo on its payloads.
  absl::Status ApplyDecision(const v1::SwarmDecision& d) {
    if (d.lr() != round_.lr) {
      return absl::InternalError(absl::StrCat("step ", d.step(), " was decided with lr ", d.lr(),
                                              ", its round ran with ", round_.lr));
    }
    SHOAL_RETURN_IF_ERROR(runtime::SwarmStage::CheckStepArgs(d.lr(), d.clip_scale()));
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status applied = server_->WithStage([&](runtime::SwarmStage& st) -> absl::Status {
      if (st.demo()) return st.DemoApply(round_.own_payloads, round_.tied_payloads, d.lr());
      const std::vector<at::Tensor> grads = st.Gradients();
      for (size_t i = 0; i < grads.size(); ++i) grads[i].copy_(round_.sums[i]);
      st.Apply(d.lr(), d.clip_scale());
      return absl::OkStatus();
    });
    apply_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return applied;
  }

  // Steps [from, to] (to 0: all it has) from the catch-up log of the peer at `address`, applied
  // in order; how many. kOutOfRange when its log does not reach back to `from`.
  absl::StatusOr<int> TakeUpdates(const std::string& address, int64_t from, int64_t to) {
    runtime::FetchOptions fo;
    fo.token = options_.token;
    fo.tls_ca_file = options_.tls_ca_file;
    SHOAL_ASSIGN_OR_RETURN(std::vector<runtime::EncodedUpdate> got,
                           runtime::FetchUpdates(address, stage_index_, from, to, fo));
    auto apply = [&](runtime::SwarmStage& st) -> absl::Status {
      for (const runtime::EncodedUpdate& e : got) {
        SHOAL_ASSIGN_OR_RETURN(runtime::StepUpdate u, runtime::DecodeUpdate(st, e));
        SHOAL_RETURN_IF_ERROR(st.ApplyUpdate(u));
      }
      return absl::OkStatus();
    };
    SHOAL_RETURN_IF_ERROR(attached_ ? server_->WithStage(apply) : apply(*stage_));
    return static_cast<int>(got.size());
  }

  // Catches up to state `step + 1` from a serving peer of the stage that has applied `step`:
  // the step from its catch-up log, or else a copy of its state.
  absl::Status CatchUp(const v1::SwarmRoster& r, int64_t step) {
    const v1::SwarmStageEntry* st = StageOf(r, stage_index_);
    if (st == nullptr) return absl::InternalError("no such stage in the roster");
    for (const v1::SwarmPeerEntry& p : st->peers()) {
      if (p.id() == link_->id() || p.state() != "SERVING") continue;
      absl::StatusOr<int> taken = TakeUpdates(p.address(), step + 1, step + 1);
      if (taken.ok() && *taken == 1) {
        SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": caught up to state " << step + 1
                        << " from " << p.id() << "'s catch-up log";
        return absl::OkStatus();
      }
      runtime::FetchOptions fo;
      fo.token = options_.token;
      fo.tls_ca_file = options_.tls_ca_file;
      fo.attempts = 1;
      absl::StatusOr<runtime::StageSnapshot> snap =
          runtime::FetchStageState(p.address(), stage_index_, step + 1, fo);
      if (!snap.ok()) continue;
      absl::Status loaded = server_->WithStage(
          [&](runtime::SwarmStage& s) { return runtime::LoadSnapshot(s, *snap); });
      if (loaded.ok()) {
        SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": caught up to state " << step + 1
                        << " from " << p.id();
        return absl::OkStatus();
      }
    }
    return absl::UnavailableError(absl::StrCat("no peer of stage ", stage_index_,
                                               " holds state ", step + 1, " yet"));
  }

  absl::Status Serve() {
    std::string done_key;    // the plans this peer reduced and reported for
    bool draining = false;
    absl::Time grace_end = absl::InfiniteFuture();
    LoadWindows load;  // the work behind the load reports
    while (true) {
      const int64_t step = stage_->optimizer_steps();
      ReportLoad(&load);
      if (stop_->load() && !draining) {
        draining = true;
        grace_end = absl::Now() + absl::Seconds(options_.grace_s);
        SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": stopping; finishing the round "
                        << "(grace " << options_.grace_s << " s)";
        if (absl::Status d = link_->client().Drain(link_->id()).status(); !d.ok()) {
          SHOAL_LOG(Warning) << "swarm peer: drain: " << d;
        }
      }
      absl::StatusOr<v1::SwarmRoster> got = link_->Await(
          [&](const v1::SwarmRoster& r) {
            if (r.finished() || !r.rollback().empty() || DecisionOf(r, step) != nullptr) {
              return true;
            }
            if (r.counters().rollbacks() != rollbacks_seen_) return true;
            const v1::SwarmPeerEntry* me = PeerOf(r, link_->id());
            if (me == nullptr || (me->state() == "SYNCING" && !me->synced())) return true;
            if (r.step_open() && r.open_step() > step) return true;
            std::optional<Plans> p = PlansOf(r, step);
            return p.has_value() && p->key != done_key;
          },
          absl::Seconds(1), nullptr);
      if (!got.ok() && !absl::IsDeadlineExceeded(got.status())) return got.status();
      if (draining) {
        // Leave once that loses nothing (another peer serves the stage, nobody syncs from this
        // one, the stage needs nothing it holds), or when the grace is over.
        const v1::SwarmRoster r = link_->latest();
        const v1::SwarmPeerEntry* me = PeerOf(r, link_->id());
        if (me == nullptr || me->can_leave() || r.finished()) return absl::OkStatus();
        if (absl::Now() > grace_end) {
          SHOAL_LOG(Warning) << "swarm peer " << link_->id() << ": grace over; leaving with "
                             << me->accumulated() << " micro-batch(es) its stage will replay";
          return absl::OkStatus();
        }
      }
      if (!got.ok()) continue;
      const v1::SwarmRoster& r = *got;
      if (r.finished() && step >= r.total_steps() && (r.trainers_size() == 0 || draining)) {
        // The job is over and no trainer still pulls the final state (checked before anything
        // else in the roster: its peers leave one by one).
        return absl::OkStatus();
      }
      if (!r.rollback().empty()) {
        return absl::UnimplementedError(absl::StrCat(
            "the swarm needs a rollback (", r.rollback(), "), which peers cannot follow yet"));
      }
      const v1::SwarmPeerEntry* me = PeerOf(r, link_->id());
      if (me == nullptr) {
        for (const std::string& e : r.evictions()) {
          if (e.find("'" + link_->id() + "'") != std::string::npos) {
            return absl::FailedPreconditionError(absl::StrCat("evicted from the swarm: ", e));
          }
        }
        return absl::FailedPreconditionError("removed from the swarm's roster");
      }
      if (r.counters().rollbacks() != rollbacks_seen_) {
        const int64_t epoch = r.counters().rollbacks();
        if (rollbacks_seen_ >= 0) {
          // The swarm rolled back: the step in progress is void everywhere. What this peer kept
          // of it goes, unless the stage has kept the new epoch's work already (its commit
          // dropped the old; this peer learns of the rollback late).
          bool dropped = false;
          int64_t kept = 0;
          SHOAL_RETURN_IF_ERROR(server_->WithStage([&](runtime::SwarmStage& st) {
            dropped = st.EnterEpoch(epoch);
            kept = st.kept_micro_batches();
            return absl::OkStatus();
          }));
          SHOAL_LOG(Warning) << "swarm peer " << link_->id() << ": the swarm rolled back to step "
                             << r.next_step() << "; "
                             << (dropped  ? "dropped the step in progress"
                                 : kept > 0 ? absl::StrCat("holds ", kept,
                                                           " micro-batch(es) of the step run again")
                                            : "held nothing of the step in progress");
          round_ = RoundResult{};
          done_key.clear();
        }
        rollbacks_seen_ = epoch;
        continue;
      }
      if (draining && me->state() == "SYNCING") return absl::OkStatus();  // it holds nothing
      if (me->stage() != stage_index_) {
        // Moved by the rebalancer: the old stage's round is over for this peer.
        SHOAL_RETURN_IF_ERROR(SwitchStage(r, *me));
        round_ = RoundResult{};
        done_key.clear();
        // The old stage's work says nothing of the new one's: no figure until it has worked.
        (void)server_->TakeLoad();
        load = LoadWindows{};
        link_->SetStats(v1::StepStats());
        continue;
      }
      if (me->state() == "SYNCING" && !me->synced()) {
        // Sent back to syncing (a rollback, or a drift): load the state the roster names.
        const v1::SwarmPeerEntry* donor = PeerOf(r, me->donor());
        SHOAL_RETURN_IF_ERROR(Sync(me->sync_source(), me->donor(),
                                   donor != nullptr ? donor->address() : "", r.next_step()));
        round_ = RoundResult{};
        done_key.clear();
        continue;
      }
      if (const v1::SwarmDecision* d = DecisionOf(r, step); d != nullptr) {
        if (!round_.empty()) {
          SHOAL_RETURN_IF_ERROR(ApplyDecision(*d));
        } else {
          // Not in this round (a joiner one step behind): copy the state after it.
          absl::Status c = CatchUp(r, step);
          if (!c.ok()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            continue;
          }
        }
        round_ = RoundResult{};
        done_key.clear();
        continue;
      }
      // Stay while trainers may still pull the final state for their checkpoint.
      if (r.finished() && step >= r.total_steps()) continue;
      if (r.step_open() && r.open_step() > step && round_.empty()) {
        absl::Status c = CatchUp(r, step);
        if (!c.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      std::optional<Plans> plans = PlansOf(r, step);
      if (!plans.has_value() || plans->key == done_key) continue;
      absl::Status s = Reduce(*plans, step, r.open_lr());
      done_key = plans->key;
      if (absl::IsAborted(s)) {
        // Voided by a rollback (here or at a peer of the round): no peer is at fault.
        SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": round of step " << step
                        << " (plan " << plans->key << ") voided: " << s.message();
        continue;
      }
      if (!s.ok()) {
        SHOAL_LOG(Warning) << "swarm peer " << link_->id() << ": reduction of step " << step
                           << " (plan " << plans->key << ") failed: " << s;
        ReportPlanPeers(*plans, s);
        continue;
      }
    }
  }

  // The coordinator moved this peer to another stage (`me` is its entry there, SYNCING): a
  // fresh stage for its blocks, synced from the source the roster names, then served.
  absl::Status SwitchStage(const v1::SwarmRoster& r, const v1::SwarmPeerEntry& me) {
    const v1::SwarmStageEntry* entry = StageOf(r, me.stage());
    if (entry == nullptr || me.stage() < 0 || me.stage() >= stages_) {
      return absl::InvalidArgumentError(
          absl::StrCat("the coordinator moved this peer to stage ", me.stage(),
                       ", which its roster does not describe"));
    }
    SHOAL_LOG(Info) << "swarm peer " << link_->id() << ": moved from stage " << stage_index_
                    << " to stage " << me.stage() << " (blocks [" << entry->first_layer() << ", "
                    << entry->end_layer() << ")), syncing from " << me.sync_source()
                    << (me.donor().empty() ? "" : " " + me.donor());
    stage_index_ = me.stage();
    first_ = entry->first_layer();
    end_ = entry->end_layer();
    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<runtime::SwarmStage> fresh, MakeStage());
    retired_ = std::move(stage_);
    stage_ = std::move(fresh);
    attached_ = false;  // Sync loads the new stage directly; the server still has the old one
    const v1::SwarmPeerEntry* donor = PeerOf(r, me.donor());
    SHOAL_RETURN_IF_ERROR(Sync(me.sync_source().empty() ? "wait" : me.sync_source(), me.donor(),
                               donor != nullptr ? donor->address() : "", r.next_step()));
    server_->Attach(stage_.get(), first_, end_);
    attached_ = true;
    return absl::OkStatus();
  }

  // Folds the work done since the last call into the next heartbeat: samples per second of
  // compute over the current window (2 s or more old) and the whole window before it, 6 to 8 s
  // of work in all once it runs. A new window never stands alone: on a shared machine one call
  // can take a tenth or ten times its usual time, and the rebalancer must not move a peer on it
  // (it also waits for the same move to win two checks). Windows of 4 s, not longer, so that with
  // the two checks a move comes within 3 periods of 10 s. Sampled every 2 s, a 3x slowdown became
  // large enough for a move 9 to 14 s after it with 10 s windows (moves 29 and 34 s after it), 8
  // to 10 s with 5 s windows (a move at 24 s); with 4 s windows moves came 19.4 s after it in three
  // runs. A peer that computed nothing keeps its last figure.
  void ReportLoad(LoadWindows* load) {
    const runtime::SwarmPeerLoad add = server_->TakeLoad();
    if (add.compute_s > 0) {
      const absl::Time now = absl::Now();
      if (busy_s_ == 0) busy_from_ = now - absl::Seconds(add.compute_s);
      busy_s_ += add.compute_s;
      busy_to_ = now;
    }
    commit_s_ += add.commit_s;
    load->current.samples += add.samples;
    load->current.compute_s += add.compute_s;
    const double samples = load->current.samples + load->previous.samples;
    const double compute_s = load->current.compute_s + load->previous.compute_s;
    if (absl::Now() - load->start < absl::Seconds(2) || compute_s <= 0) return;
    v1::StepStats stats;
    stats.set_step(stage_->optimizer_steps());
    stats.set_samples_per_s(samples / compute_s);
    link_->SetStats(stats);
    if (absl::Now() - load->start >= absl::Seconds(kLoadWindowS)) {
      load->previous = load->current;
      load->current = runtime::SwarmPeerLoad{};
      load->start = absl::Now();
    }
  }

  // A reduction failed: the peers its error names are reported (the coordinator dials them and
  // fences the dead ones, which makes a new plan).
  void ReportPlanPeers(const Plans& plans, const absl::Status& error) {
    const std::string text(error.message());
    for (const v1::SwarmReductionPlan* plan : {plans.own, plans.other}) {
      if (plan == nullptr) continue;
      for (int i = 0; i < plan->peers_size(); ++i) {
        if (plan->peers(i) == link_->id()) continue;
        if (text.find(plan->addresses(i)) == std::string::npos) continue;
        v1::ReportPeerRequest rp;
        rp.set_worker_id(link_->id());
        rp.set_peer_id(plan->peers(i));
        rp.set_reason(text.substr(0, 200));
        (void)link_->client().ReportPeer(rp);
      }
    }
  }

  SwarmWorkerOptions options_;
  std::atomic<bool>* stop_;
  std::shared_ptr<comm::ExchangeMailbox> mailbox_;
  std::unique_ptr<runtime::SwarmPeerServer> server_;
  std::unique_ptr<SwarmLink> link_;
  runtime::Config config_;
  std::unique_ptr<runtime::SwarmStage> stage_;
  // The stage it served before its last move, kept while a call that began on it may still run
  // (moves are periods apart: the one before is long done).
  std::unique_ptr<runtime::SwarmStage> retired_;
  int stage_index_ = 0, stages_ = 1, micro_batches_ = 1, first_ = 0, end_ = 0;
  // What this peer's round of the step left for the decision (empty: it took no part).
  struct RoundResult {
    std::vector<at::Tensor> sums;                          // AdamW: the summed accumulation
    std::vector<at::Tensor> own_payloads, tied_payloads;   // DeMo: every peer's, in group order
    double lr = 0;                                         // the open step's, as the round used it
    bool empty() const { return sums.empty() && own_payloads.empty(); }
  };
  RoundResult round_;
  bool attached_ = false;           // the server serves stage_
  int64_t rounds_ = 0, round_bytes_ = 0;  // successful rounds, and the bytes they sent
  // Seconds computing (throttle included) from the first call served to the last one seen.
  double busy_s_ = 0;
  double commit_s_ = 0;  // of busy_s_, waiting for the ledger (SwarmPeerLoad::commit_s)
  absl::Time busy_from_, busy_to_;
  double round_s_ = 0, apply_s_ = 0;       // their time: from the plan to the report; applying
  int64_t rollbacks_seen_ = -1;     // the roster's rollback count this peer has acted on
};

}  // namespace

int RunSwarmPeer(const SwarmWorkerOptions& options, std::atomic<bool>* stop) {
  Peer peer(options, stop);
  return peer.Run();
}

}  // namespace shoal::launch
