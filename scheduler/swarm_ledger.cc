#include "scheduler/swarm_ledger.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace shoal::scheduler {

namespace {

// How many ids per stage a refusal lists before it says "and N more".
constexpr int kListedIds = 16;

}  // namespace

absl::Status SwarmLedger::CheckOpen(const char* what) const {
  if (phase_ == Phase::kNone) {
    return absl::FailedPreconditionError(absl::StrCat("swarm ledger: ", what, ": no step is open"));
  }
  if (phase_ == Phase::kClosed) {
    return absl::FailedPreconditionError(
        absl::StrCat("swarm ledger: ", what, ": step ", step_, " is closed"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> SwarmLedger::IndexOf(int64_t id) const {
  const int64_t first = step_ * micro_batches_;
  if (id < first || id >= first + micro_batches_) {
    return absl::OutOfRangeError(absl::StrCat("micro-batch ", id, " is not in step ", step_,
                                              " (ids ", first, "..", first + micro_batches_ - 1,
                                              ")"));
  }
  return static_cast<int>(id - first);
}

absl::Status SwarmLedger::OpenStep(int64_t step, int micro_batches,
                                   const std::vector<std::vector<std::string>>& rosters) {
  if (step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("swarm ledger: step must be >= 0, got ", step));
  }
  if (micro_batches < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm ledger: step ", step, ": micro-batches must be >= 1, got ", micro_batches));
  }
  if (step > (std::numeric_limits<int64_t>::max() - micro_batches) / micro_batches) {
    return absl::InvalidArgumentError(absl::StrCat("swarm ledger: step ", step, " of ",
                                                   micro_batches,
                                                   " micro-batches overflows the global ids"));
  }
  if (rosters.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm ledger: step ", step, ": no stages (empty roster list)"));
  }
  if (rosters.size() > static_cast<size_t>(std::numeric_limits<int>::max() / micro_batches)) {
    return absl::InvalidArgumentError(absl::StrCat("swarm ledger: step ", step, ": ",
                                                   rosters.size(), " stages of ", micro_batches,
                                                   " micro-batches is too many"));
  }
  std::map<std::string, int> stage_of;
  for (size_t s = 0; s < rosters.size(); ++s) {
    if (rosters[s].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("swarm ledger: step ", step, ": stage ", s, " has an empty round roster"));
    }
    for (const std::string& peer : rosters[s]) {
      if (peer.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("swarm ledger: step ", step, ": stage ", s, " lists an empty peer id"));
      }
      auto [it, inserted] = stage_of.emplace(peer, static_cast<int>(s));
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("swarm ledger: step ", step, ": peer '",
                                                       peer, "' is listed in stage ", it->second,
                                                       " and again in stage ", s));
      }
    }
  }

  absl::MutexLock lock(&mu_);
  if (phase_ != Phase::kNone) {
    if (step < step_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "swarm ledger: cannot open step ", step, " after step ", step_, " (steps only advance)"));
    }
    if (step == step_ && phase_ == Phase::kClosed) {
      return absl::FailedPreconditionError(
          absl::StrCat("swarm ledger: step ", step, " is closed already"));
    }
  }
  phase_ = Phase::kOpen;
  step_ = step;
  micro_batches_ = micro_batches;
  stages_ = static_cast<int>(rosters.size());
  peers_.clear();
  peer_index_.clear();
  stage_peers_.assign(stages_, {});
  for (int s = 0; s < stages_; ++s) {
    for (const std::string& id : rosters[s]) {
      peer_index_[id] = static_cast<int>(peers_.size());
      stage_peers_[s].push_back(static_cast<int>(peers_.size()));
      Peer p;
      p.id = id;
      p.stage = s;
      peers_.push_back(std::move(p));
    }
  }
  holder_.assign(static_cast<size_t>(stages_) * micro_batches_, -1);
  slots_.assign(micro_batches_, Slot{});
  for (Slot& slot : slots_) slot.needed = stages_;
  leases_.clear();
  missing_ = static_cast<int64_t>(stages_) * micro_batches_;
  return absl::OkStatus();
}

int SwarmLedger::DeadStage() const {
  for (int s = 0; s < stages_; ++s) {
    bool live = false;
    for (int p : stage_peers_[s]) live = live || !peers_[p].fenced;
    if (!live) return s;
  }
  return -1;
}

absl::StatusOr<std::vector<SwarmLease>> SwarmLedger::Lease(const std::string& trainer,
                                                           int max_leases) {
  if (trainer.empty()) return absl::InvalidArgumentError("swarm ledger: lease: empty trainer id");
  if (max_leases < 1) {
    return absl::InvalidArgumentError(absl::StrCat("swarm ledger: lease for trainer '", trainer,
                                                   "': max_leases must be >= 1, got ", max_leases));
  }
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckOpen("lease"); !s.ok()) return s;
  if (int dead = DeadStage(); dead >= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("swarm ledger: step ", step_, ": stage ", dead,
                     " has no live peer left in its round roster; reopen the step"));
  }
  // Replays first: they are what stands between the step and its close. Two passes over the ids.
  std::vector<SwarmLease> out;
  for (int pass = 0; pass < 2 && static_cast<int>(out.size()) < max_leases; ++pass) {
    const bool want_replays = pass == 0;
    for (int i = 0; i < micro_batches_ && static_cast<int>(out.size()) < max_leases; ++i) {
      Slot& slot = slots_[i];
      if (!slot.trainer.empty() || slot.needed == 0) continue;
      const bool replay = slot.needed < stages_;
      if (replay != want_replays) continue;
      SwarmLease lease;
      lease.id = step_ * micro_batches_ + i;
      lease.replay = replay;
      for (int s = 0; s < stages_; ++s) {
        if (HolderAt(s, i) < 0) lease.stages.push_back(s);
      }
      slot.trainer = trainer;
      slot.remaining = lease.stages;
      leases_[trainer].insert(i);
      ++counters_.leases;
      if (replay) ++counters_.replays;
      out.push_back(std::move(lease));
    }
  }
  return out;
}

void SwarmLedger::EndLease(int i) {
  Slot& slot = slots_[i];
  auto it = leases_.find(slot.trainer);
  if (it != leases_.end()) {
    it->second.erase(i);
    if (it->second.empty()) leases_.erase(it);
  }
  slot.trainer.clear();
  slot.remaining.clear();
}

absl::Status SwarmLedger::Commit(const std::string& trainer, int64_t id,
                                 const std::map<int, std::string>& peers) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckOpen("commit"); !s.ok()) return s;
  absl::Status s = CommitLocked(trainer, id, peers);
  if (s.code() == absl::StatusCode::kAlreadyExists) {
    ++counters_.duplicates_refused;
  } else if (!s.ok()) {
    ++counters_.commits_refused;
  }
  return s;
}

absl::Status SwarmLedger::CommitLocked(const std::string& trainer, int64_t id,
                                       const std::map<int, std::string>& peers) {
  const std::string what =
      absl::StrCat("commit of micro-batch ", id, " by trainer '", trainer, "'");
  if (trainer.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": empty trainer id"));
  }
  if (peers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": names no stage"));
  }
  absl::StatusOr<int> index = IndexOf(id);
  if (!index.ok()) return index.status();
  const int i = *index;
  for (const auto& [stage, peer] : peers) {
    if (stage < 0 || stage >= stages_) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": stage ", stage, " is out of range (", stages_, " stages)"));
    }
  }
  // Duplicates before the lease: a commit retried after its lease ended must read as one.
  for (const auto& [stage, peer] : peers) {
    if (int h = HolderAt(stage, i); h >= 0) {
      return absl::AlreadyExistsError(absl::StrCat(what, ": stage ", stage,
                                                   " already holds it (peer '", peers_[h].id,
                                                   "'); nothing recorded"));
    }
  }
  Slot& slot = slots_[i];
  if (slot.trainer != trainer) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": ",
        slot.trainer.empty() ? std::string("it is not leased")
                             : absl::StrCat("it is leased to trainer '", slot.trainer, "'")));
  }
  for (const auto& [stage, peer] : peers) {
    if (!std::binary_search(slot.remaining.begin(), slot.remaining.end(), stage)) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, ": its lease does not need stage ", stage, " (needs ",
          slot.remaining.empty() ? std::string("none") : absl::StrJoin(slot.remaining, ", "),
          ")"));
    }
    auto it = peer_index_.find(peer);
    if (it == peer_index_.end() || peers_[it->second].stage != stage) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": peer '", peer, "' is not in stage ", stage, "'s round roster"));
    }
    if (peers_[it->second].fenced) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": peer '", peer, "' of stage ", stage, " was fenced"));
    }
  }

  for (const auto& [stage, peer] : peers) {
    const int p = peer_index_.at(peer);
    HolderAt(stage, i) = p;
    peers_[p].held.insert(i);
    --slot.needed;
    --missing_;
    slot.remaining.erase(std::find(slot.remaining.begin(), slot.remaining.end(), stage));
    ++counters_.accumulations;
  }
  ++counters_.commits;
  if (slot.remaining.empty()) EndLease(i);
  return absl::OkStatus();
}

absl::Status SwarmLedger::Release(const std::string& trainer, int64_t id) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckOpen("release"); !s.ok()) return s;
  absl::StatusOr<int> index = IndexOf(id);
  if (!index.ok()) return index.status();
  if (slots_[*index].trainer != trainer || trainer.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("release of micro-batch ", id,
                                                      " by trainer '", trainer,
                                                      "': it is not leased to that trainer"));
  }
  EndLease(*index);
  ++counters_.released;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> SwarmLedger::FencePeer(const std::string& peer) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckOpen("fence"); !s.ok()) return s;
  auto it = peer_index_.find(peer);
  if (it == peer_index_.end()) {
    return absl::NotFoundError(absl::StrCat("swarm ledger: cannot fence peer '", peer,
                                            "': no stage of step ", step_, " has it"));
  }
  Peer& p = peers_[it->second];
  if (p.fenced) return 0;
  p.fenced = true;
  const int64_t dropped = static_cast<int64_t>(p.held.size());
  for (int i : p.held) {
    HolderAt(p.stage, i) = -1;
    ++slots_[i].needed;
    ++missing_;
  }
  p.held.clear();
  ++counters_.fences;
  counters_.accumulations_fenced += dropped;
  return dropped;
}

int64_t SwarmLedger::TrainerDied(const std::string& trainer) {
  absl::MutexLock lock(&mu_);
  if (phase_ != Phase::kOpen) return 0;
  auto it = leases_.find(trainer);
  if (it == leases_.end()) return 0;
  const std::set<int> held = it->second;
  for (int i : held) EndLease(i);
  counters_.released += static_cast<int64_t>(held.size());
  return static_cast<int64_t>(held.size());
}

std::string SwarmLedger::MissingSummary() const {
  std::vector<std::string> parts;
  for (int s = 0; s < stages_; ++s) {
    std::vector<int64_t> ids;
    int more = 0;
    for (int i = 0; i < micro_batches_; ++i) {
      if (HolderAt(s, i) >= 0) continue;
      if (static_cast<int>(ids.size()) < kListedIds) {
        ids.push_back(step_ * micro_batches_ + i);
      } else {
        ++more;
      }
    }
    if (ids.empty()) continue;
    std::string part = absl::StrCat("stage ", s, " ids ", absl::StrJoin(ids, ", "));
    if (more > 0) absl::StrAppend(&part, " and ", more, " more");
    parts.push_back(std::move(part));
  }
  int leased = 0;
  for (const auto& [trainer, ids] : leases_) leased += static_cast<int>(ids.size());
  return absl::StrCat(absl::StrJoin(parts, "; "), " (", leased, " micro-batches leased)");
}

absl::StatusOr<SwarmStepHoldings> SwarmLedger::Close() {
  absl::MutexLock lock(&mu_);
  if (phase_ == Phase::kNone) {
    return absl::FailedPreconditionError("swarm ledger: close: no step is open");
  }
  if (missing_ > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("swarm ledger: step ", step_, " cannot close: ", missing_, " of ",
                     static_cast<int64_t>(stages_) * micro_batches_,
                     " accumulations missing: ", MissingSummary()));
  }
  // Everything is held; check the two views of it agree before handing them to the peers.
  SwarmStepHoldings out;
  out.step = step_;
  out.micro_batches = micro_batches_;
  out.stages.resize(stages_);
  int64_t records = 0;
  for (const Peer& p : peers_) {
    if (p.fenced) {
      if (!p.held.empty()) {
        return absl::InternalError(
            absl::StrCat("swarm ledger: fenced peer '", p.id, "' still holds ids"));
      }
      continue;
    }
    std::vector<int64_t>& ids = out.stages[p.stage][p.id];
    for (int i : p.held) {
      if (HolderAt(p.stage, i) != peer_index_.at(p.id)) {
        return absl::InternalError(absl::StrCat("swarm ledger: peer '", p.id, "' lists id ", i,
                                                " at stage ", p.stage, " that it does not hold"));
      }
      ids.push_back(step_ * micro_batches_ + i);
    }
    records += static_cast<int64_t>(p.held.size());
  }
  if (records != static_cast<int64_t>(stages_) * micro_batches_) {
    return absl::InternalError(absl::StrCat("swarm ledger: peers hold ", records,
                                            " accumulations, the step has ",
                                            static_cast<int64_t>(stages_) * micro_batches_));
  }
  phase_ = Phase::kClosed;
  return out;
}

std::optional<std::string> SwarmLedger::Holder(int stage, int64_t id) const {
  absl::MutexLock lock(&mu_);
  if (phase_ == Phase::kNone || stage < 0 || stage >= stages_) return std::nullopt;
  absl::StatusOr<int> index = IndexOf(id);
  if (!index.ok()) return std::nullopt;
  const int h = HolderAt(stage, *index);
  if (h < 0) return std::nullopt;
  return peers_[h].id;
}

int64_t SwarmLedger::Missing() const {
  absl::MutexLock lock(&mu_);
  return phase_ == Phase::kNone ? 0 : missing_;
}

std::optional<int64_t> SwarmLedger::step() const {
  absl::MutexLock lock(&mu_);
  if (phase_ == Phase::kNone) return std::nullopt;
  return step_;
}

bool SwarmLedger::closed() const {
  absl::MutexLock lock(&mu_);
  return phase_ == Phase::kClosed;
}

SwarmLedgerCounters SwarmLedger::counters() const {
  absl::MutexLock lock(&mu_);
  SwarmLedgerCounters out = counters_;
  out.lost = 0;
  if (phase_ == Phase::kOpen) {
    for (int s = 0; s < stages_; ++s) {
      bool live = false;
      for (int p : stage_peers_[s]) live = live || !peers_[p].fenced;
      if (live) continue;
      for (int i = 0; i < micro_batches_; ++i) out.lost += HolderAt(s, i) < 0;
    }
  }
  return out;
}

}  // namespace shoal::scheduler
